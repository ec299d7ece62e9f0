//! An nbdkit plugin presented as an nbdhost plugin: the nbdhost struct
//! built from nbdkit's, and one callback per nbdkit callback the plugin
//! has (none for those it lacks, so the server's defaults, which are
//! nbdkit's, apply). Each callback unwraps the handle, calls the plugin
//! through [`calls::call`], and bridges what the API versions differ in:
//! 32-bit counts (longer requests are cut), API 1's calls without flags,
//! and FUA, which API 1 plugins can only emulate by flushing.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use nbdhost_plugin_api::abi;

use crate::calls::{self, ErrnoPolicy, Interned, Scope};
use crate::error::LoadError;
use crate::host;
use crate::lists::{self, ExportList, ExtentList};
use crate::nbdkit;

/// The nbdkit plugin this adapter serves.
pub struct Foreign {
    pub plugin: nbdkit::Plugin,
    /// Its shared object, kept loaded for the life of the process.
    pub lib: libloading::os::unix::Library,
    /// The nbdhost struct describing it.
    pub table: abi::Plugin,
    /// Strings the nbdhost struct points to.
    _strings: Vec<CString>,
}

// SAFETY: the struct holds the plugin's immutable table of function
// pointers and 'static strings, and ours built from it; nothing is written
// after `FOREIGN` is set.
unsafe impl Sync for Foreign {}
// SAFETY: as above.
unsafe impl Send for Foreign {}

static FOREIGN: OnceLock<Foreign> = OnceLock::new();

/// The plugin; callbacks only run once it is set.
fn foreign() -> &'static Foreign {
    FOREIGN
        .get()
        .expect("the nbdkit plugin is loaded before any callback")
}

fn plugin() -> &'static nbdkit::Plugin {
    &foreign().plugin
}

fn policy() -> ErrnoPolicy {
    ErrnoPolicy {
        preserved: plugin().errno_is_preserved != 0,
    }
}

fn v1() -> bool {
    plugin().api_version == 1
}

/// The largest count passed in one call: nbdkit's API has 32-bit counts,
/// and a power of two keeps every piece aligned.
const CHUNK: u64 = 1 << 30;

/// What the adapter hands the server as a handle.
struct Handle {
    inner: *mut c_void,
    interned: Interned,
    /// Cleared when the plugin's `can_zero` says no: nbdkit then still
    /// offers zeroing but writes zeroes instead of calling `zero`.
    zero_native: AtomicBool,
}

/// # Safety
/// `h` must be a handle this adapter's `open` returned and not yet closed.
unsafe fn handle<'a>(h: *mut c_void) -> &'a Handle {
    // SAFETY: as the caller promises.
    unsafe { &*h.cast::<Handle>() }
}

/// Call the plugin for open handle `h` (the server passes only those).
fn on<R>(h: *mut c_void, f: impl FnOnce(*mut c_void) -> R, failed: impl FnOnce(&R) -> bool) -> R {
    // SAFETY: the server passes back only handles our open returned.
    let hd = unsafe { handle(h) };
    calls::call(
        policy(),
        Scope::Handle(&hd.interned),
        || f(hd.inner),
        failed,
    )
}

/// Call the plugin outside any handle.
fn global<R>(f: impl FnOnce() -> R, failed: impl FnOnce(&R) -> bool) -> R {
    calls::call(policy(), Scope::Global, f, failed)
}

fn minus_one(r: &c_int) -> bool {
    *r == -1
}

/// Run `f` on each piece of at most [`CHUNK`] bytes of a range, stopping
/// at the first failure.
fn pieces(count: u64, offset: u64, mut f: impl FnMut(u32, u64, usize) -> c_int) -> c_int {
    let mut done = 0;
    while done < count {
        let n = (count - done).min(CHUNK);
        let r = f(n as u32, offset + done, done as usize);
        if r == -1 {
            return -1;
        }
        done += n;
    }
    0
}

/// Build the nbdhost struct for `p`, loaded from `lib`, and keep both.
pub fn install(
    p: nbdkit::Plugin,
    lib: libloading::os::unix::Library,
) -> Result<&'static abi::Plugin, LoadError> {
    let name = host::string(p.name)
        .filter(|n| !n.is_empty())
        .ok_or(LoadError::NoName)?;
    if p.open.is_none() || p.get_size.is_none() {
        return Err(LoadError::NoOpenOrGetSize { name });
    }
    let is_v1 = p.api_version == 1;
    let has_pread = if is_v1 {
        p.pread_v1.is_some()
    } else {
        p.pread.is_some()
    };
    if !has_pread {
        return Err(LoadError::NoPread { name });
    }
    let summary = host::string(p.longname)
        .or_else(|| host::string(p.description).map(|d| d.lines().next().unwrap_or("").to_owned()))
        .unwrap_or_default();
    let strings: Vec<CString> = [Some(name), host::string(p.version), Some(summary)]
        .into_iter()
        .map(|s| host::c(&s.unwrap_or_default()))
        .collect();
    let (pwrite, flush, trim, zero) = if is_v1 {
        (
            p.pwrite_v1.is_some(),
            p.flush_v1.is_some(),
            p.trim_v1.is_some(),
            p.zero_v1.is_some(),
        )
    } else {
        (
            p.pwrite.is_some(),
            p.flush.is_some(),
            p.trim.is_some(),
            p.zero.is_some(),
        )
    };
    let table = abi::Plugin {
        struct_size: std::mem::size_of::<abi::Plugin>() as u64,
        abi_version: abi::ABI_VERSION,
        thread_model: p.thread_model.clamp(0, 3) as u32,
        name: strings[0].as_ptr(),
        version: strings[1].as_ptr(),
        description: strings[2].as_ptr(),
        config_help: p.config_help,
        magic_config_key: p.magic_config_key,
        load: Some(load),
        unload: Some(unload),
        config: (p.config.is_some()).then_some(config as _),
        config_complete: (p.config_complete.is_some()).then_some(config_complete as _),
        get_ready: Some(get_ready),
        preconnect: (p.preconnect.is_some()).then_some(preconnect as _),
        list_exports: (p.list_exports.is_some()).then_some(list_exports as _),
        default_export: (p.default_export.is_some()).then_some(default_export as _),
        open: Some(open),
        close: Some(close),
        get_size: Some(get_size),
        block_size: (p.block_size.is_some()).then_some(block_size as _),
        can_write: (p.can_write.is_some()).then_some(can_write as _),
        can_flush: (p.can_flush.is_some()).then_some(can_flush as _),
        can_trim: (p.can_trim.is_some()).then_some(can_trim as _),
        can_zero: (p.can_zero.is_some()).then_some(can_zero as _),
        can_fast_zero: Some(can_fast_zero),
        can_fua: (p.can_fua.is_some()).then_some(can_fua as _),
        can_multi_conn: (p.can_multi_conn.is_some()).then_some(can_multi_conn as _),
        can_cache: (p.can_cache.is_some()).then_some(can_cache as _),
        can_extents: (p.can_extents.is_some()).then_some(can_extents as _),
        is_rotational: (p.is_rotational.is_some()).then_some(is_rotational as _),
        export_description: (p.export_description.is_some()).then_some(export_description as _),
        pread: Some(pread),
        pwrite: (pwrite).then_some(pwrite_cb as _),
        flush: (flush).then_some(flush_cb as _),
        trim: (trim).then_some(trim_cb as _),
        zero: (zero).then_some(zero_cb as _),
        extents: (p.extents.is_some()).then_some(extents as _),
        cache: (p.cache.is_some()).then_some(cache as _),
        capabilities: None,
        configured_thread_model: (p.thread_model_cb.is_some()).then_some(thread_model as _),
        after_fork: (p.after_fork.is_some()).then_some(after_fork as _),
        dump_plugin: Some(dump_plugin),
        // nbdkit plugins cannot say which file they serve.
        local_file: None,
        async_pread: None,
        async_pwrite: None,
        async_flush: None,
        async_trim: None,
        async_zero: None,
        async_cache: None,
        async_extents: None,
    };
    let f = Foreign {
        plugin: p,
        lib,
        table,
        _strings: strings,
    };
    FOREIGN.set(f).map_err(|_| LoadError::SecondPlugin)?;
    Ok(&foreign().table)
}

/// Before nbdkit's `load`: set the `-D PLUGIN.FLAG=N` variables, which
/// nbdkit plugins read as globals named `PLUGIN_debug_FLAG`. A flag the
/// plugin has no variable for is a warning, as in nbdkit.
fn set_debug_flags() {
    let f = foreign();
    let name = host::string(f.table.name).unwrap_or_default();
    let (Some(flag_name), Some(flag)) = (host::get().debug_flag_name, host::get().debug_flag)
    else {
        return;
    };
    for i in 0.. {
        // SAFETY: host services returning null or a string, and an int.
        let p = unsafe { flag_name(i) };
        let Some(flag_s) = host::string(p) else { break };
        // SAFETY: as above; `p` is valid for the call.
        let value = unsafe { flag(p) };
        let symbol = format!("{name}_debug_{}", flag_s.replace('.', "_"));
        // SAFETY: a global `int` of the plugin, as nbdkit's -D contract
        // has plugins declare it.
        match unsafe { f.lib.get::<*mut c_int>(symbol.as_bytes()) } {
            Ok(var) => unsafe { **var = value },
            Err(_) => host::log(
                abi::LOG_WARNING,
                &host::c(&format!(
                    "-D {name}.{flag_s}: {name} does not contain a global variable called {symbol}"
                )),
            ),
        }
    }
}

unsafe extern "C" fn load() -> c_int {
    set_debug_flags();
    if let Some(f) = plugin().load {
        // SAFETY: nbdkit's load takes nothing and returns nothing.
        global(|| unsafe { f() }, |_| false);
    }
    0
}

unsafe extern "C" fn unload() {
    let p = plugin();
    if let Some(f) = p.cleanup.filter(|_| READY.load(Ordering::Relaxed)) {
        // SAFETY: nbdkit calls cleanup once, before unload.
        global(|| unsafe { f() }, |_| false);
    }
    if let Some(f) = p.unload {
        // SAFETY: the last call into the plugin.
        global(|| unsafe { f() }, |_| false);
    }
    calls::forget_global();
}

unsafe extern "C" fn config(key: *const c_char, value: *const c_char) -> c_int {
    let Some(f) = plugin().config else { return -1 };
    // nbdkit passes pieces of argv, which live as long as the process, and
    // plugins keep them (eval keeps the keys); the server's copies last
    // only for the call.
    let keep = |p| calls::keep(host::string(p).map(|s| host::c(&s)).unwrap_or_default());
    let (key, value) = (keep(key), keep(value));
    // SAFETY: strings kept until unload.
    global(|| unsafe { f(key, value) }, minus_one)
}

unsafe extern "C" fn config_complete() -> c_int {
    let Some(f) = plugin().config_complete else {
        return 0;
    };
    // SAFETY: a callback without arguments.
    global(|| unsafe { f() }, minus_one)
}

unsafe extern "C" fn thread_model() -> c_int {
    let Some(f) = plugin().thread_model_cb else {
        return -1;
    };
    // SAFETY: a callback without arguments.
    global(|| unsafe { f() }, minus_one)
}

/// Set once the plugin is ready to serve: only then does nbdkit call its
/// `cleanup` (not, say, after `--dump-plugin`).
static READY: AtomicBool = AtomicBool::new(false);

unsafe extern "C" fn get_ready() -> c_int {
    if let Some(f) = plugin().get_ready {
        // SAFETY: a callback without arguments.
        if global(|| unsafe { f() }, minus_one) == -1 {
            return -1;
        }
    }
    READY.store(true, Ordering::Relaxed);
    0
}

unsafe extern "C" fn after_fork() -> c_int {
    let Some(f) = plugin().after_fork else {
        return 0;
    };
    // SAFETY: a callback without arguments.
    global(|| unsafe { f() }, minus_one)
}

unsafe extern "C" fn dump_plugin() {
    let p = plugin();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "api_version={}", p.api_version);
    let _ = writeln!(out, "errno_is_preserved={}", p.errno_is_preserved);
    if let Some(d) = host::string(p.description) {
        let _ = writeln!(out, "nbdkit_description={}", d.replace('\n', " "));
    }
    let _ = out.flush();
    drop(out);
    if let Some(f) = p.dump_plugin {
        // SAFETY: a callback without arguments, printing on stdout.
        global(|| unsafe { f() }, |_| false);
        // SAFETY: the plugin printed through C's stdio; flush it before
        // anything else the server prints.
        unsafe { libc::fflush(std::ptr::null_mut()) };
    }
}

unsafe extern "C" fn preconnect(readonly: c_int) -> c_int {
    let Some(f) = plugin().preconnect else {
        return 0;
    };
    // SAFETY: a callback taking an int.
    global(|| unsafe { f(readonly) }, minus_one)
}

unsafe extern "C" fn list_exports(readonly: c_int, is_tls: c_int, to: *mut abi::Exports) -> c_int {
    let Some(f) = plugin().list_exports else {
        return -1;
    };
    let mut list = ExportList::forwarding(readonly, is_tls, to);
    let p: *mut ExportList = &mut list;
    // SAFETY: the list outlives the call; the plugin fills it through
    // nbdkit_add_export.
    global(|| unsafe { f(readonly, is_tls, p.cast()) }, minus_one)
}

/// The plugin's default export name, as `nbdkit_use_default_export` and
/// the server ask for it; "" without a `default_export` callback. With
/// `record`, a failure is recorded for the server as the plugin reported
/// it; without, what the plugin said is logged at once.
fn default_export_name(readonly: c_int, is_tls: c_int, record: bool) -> Option<CString> {
    let Some(f) = plugin().default_export else {
        return Some(CString::default());
    };
    // SAFETY: a callback taking two ints; the result is copied at once.
    let p = global(|| unsafe { f(readonly, is_tls) }, |p| record && p.is_null());
    // SAFETY: checked non-null; the plugin's string lives through the call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_owned())
}

/// See nbdkit_use_default_export(3): list the name the plugin's
/// `default_export` gives. As in nbdkit, a default export that cannot be
/// named is left out of the list (which may then be empty) rather than
/// failing it, and the plugin's message is logged.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_use_default_export(list: *mut c_void) -> c_int {
    // SAFETY: plugins only have the lists the adapter gave them.
    let Some(l) = (unsafe { lists::exports(list) }) else {
        calls::report(c"nbdkit_use_default_export: no export list");
        return -1;
    };
    match default_export_name(l.readonly, l.is_tls, false) {
        Some(name) => l.add(name.as_ptr(), std::ptr::null()),
        None => {
            host::log(
                abi::LOG_WARNING,
                c"default_export failed: the default export is left out of the list",
            );
            0
        }
    }
}

unsafe extern "C" fn default_export(readonly: c_int, is_tls: c_int) -> *const c_char {
    thread_local! {
        /// The last answer, kept until the next call on this thread: the
        /// server copies it as soon as the callback returns.
        static LAST: std::cell::RefCell<Option<CString>> = const { std::cell::RefCell::new(None) };
    }
    match default_export_name(readonly, is_tls, true) {
        Some(name) => LAST.with(|l| l.borrow_mut().insert(name).as_ptr()),
        None => std::ptr::null(),
    }
}

unsafe extern "C" fn open(readonly: c_int) -> *mut c_void {
    let Some(f) = plugin().open else {
        return std::ptr::null_mut();
    };
    let inner = calls::call(
        policy(),
        Scope::Opening,
        // SAFETY: a callback taking an int.
        || unsafe { f(readonly) },
        |h| h.is_null(),
    );
    let collected = calls::take_opening();
    if inner.is_null() {
        return std::ptr::null_mut();
    }
    let h = Handle {
        inner,
        interned: Interned::default(),
        zero_native: AtomicBool::new(true),
    };
    h.interned.adopt(collected);
    Box::into_raw(Box::new(h)).cast()
}

unsafe extern "C" fn close(h: *mut c_void) {
    if let Some(f) = plugin().close {
        // SAFETY: the plugin's handle, closed once.
        on(h, |i| unsafe { f(i) }, |_| false);
    }
    // SAFETY: our handle, freed once: the server closes each handle once.
    drop(unsafe { Box::from_raw(h.cast::<Handle>()) });
}

unsafe extern "C" fn get_size(h: *mut c_void) -> i64 {
    let Some(f) = plugin().get_size else {
        return -1;
    };
    // SAFETY: the plugin's live handle.
    on(h, |i| unsafe { f(i) }, |r| *r == -1)
}

unsafe extern "C" fn block_size(
    h: *mut c_void,
    min: *mut u32,
    pref: *mut u32,
    max: *mut u32,
) -> c_int {
    let Some(f) = plugin().block_size else {
        return -1;
    };
    // SAFETY: the plugin's live handle and the server's three places.
    on(h, |i| unsafe { f(i, min, pref, max) }, minus_one)
}

/// The `can_*` callbacks nbdkit and nbdhost share word for word.
macro_rules! handle_queries {
    ($($name:ident),*) => {$(
        unsafe extern "C" fn $name(h: *mut c_void) -> c_int {
            let Some(f) = plugin().$name else { return -1 };
            // SAFETY: the plugin's live handle.
            on(h, |i| unsafe { f(i) }, minus_one)
        }
    )*};
}

handle_queries!(
    can_write,
    can_flush,
    can_trim,
    can_multi_conn,
    can_cache,
    can_extents,
    is_rotational
);

/// nbdkit's `can_zero` only says whether to call `zero`: zeroing is
/// offered either way, by writing zeroes when the answer is no.
unsafe extern "C" fn can_zero(h: *mut c_void) -> c_int {
    let Some(f) = plugin().can_zero else { return 1 };
    // SAFETY: the plugin's live handle.
    let r = on(h, |i| unsafe { f(i) }, minus_one);
    if r == -1 {
        return -1;
    }
    // SAFETY: the server passes back only handles our open returned.
    unsafe { handle(h) }
        .zero_native
        .store(r != 0, Ordering::Relaxed);
    1
}

/// Without its own answer, nbdkit promises fast zeroes exactly when it
/// would not call the plugin's `zero` (and so fails them at once).
unsafe extern "C" fn can_fast_zero(h: *mut c_void) -> c_int {
    if let Some(f) = plugin().can_fast_zero {
        // SAFETY: the plugin's live handle.
        return on(h, |i| unsafe { f(i) }, minus_one);
    }
    // An API 1 zero cannot be fast, and without an API 2 zero there is
    // none: either way fast zeroes fail at once, so they are promised.
    if v1() || plugin().zero.is_none() {
        return 1;
    }
    let Some(f) = plugin().can_zero else { return 0 };
    // SAFETY: the plugin's live handle.
    match on(h, |i| unsafe { f(i) }, minus_one) {
        -1 => -1,
        0 => 1,
        _ => 0,
    }
}

unsafe extern "C" fn can_fua(h: *mut c_void) -> c_int {
    let Some(f) = plugin().can_fua else { return -1 };
    // SAFETY: the plugin's live handle.
    let r = on(h, |i| unsafe { f(i) }, minus_one);
    // An API 1 write takes no flags, so FUA can only be emulated.
    if v1() && r == nbdkit::FUA_NATIVE {
        nbdkit::FUA_EMULATE
    } else {
        r
    }
}

unsafe extern "C" fn export_description(h: *mut c_void) -> *const c_char {
    let Some(f) = plugin().export_description else {
        return std::ptr::null();
    };
    // SAFETY: the plugin's live handle; a null answer is "none".
    on(h, |i| unsafe { f(i) }, |_| false)
}

unsafe extern "C" fn pread(
    h: *mut c_void,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
) -> c_int {
    let p = plugin();
    on(
        h,
        |i| {
            pieces(count, offset, |n, off, done| {
                // SAFETY: `buf` holds `count` bytes; each piece lies in it.
                let b = unsafe { buf.cast::<u8>().add(done) }.cast();
                match (p.pread, p.pread_v1) {
                    // SAFETY: the plugin's live handle and our buffer.
                    (Some(f), _) if !v1() => unsafe { f(i, b, n, off, flags) },
                    // SAFETY: as above.
                    (_, Some(f)) => unsafe { f(i, b, n, off) },
                    _ => -1,
                }
            })
        },
        minus_one,
    )
}

unsafe extern "C" fn pwrite_cb(
    h: *mut c_void,
    buf: *const c_void,
    count: u64,
    offset: u64,
    flags: u32,
) -> c_int {
    let p = plugin();
    on(
        h,
        |i| {
            pieces(count, offset, |n, off, done| {
                // SAFETY: `buf` holds `count` bytes; each piece lies in it.
                let b = unsafe { buf.cast::<u8>().add(done) }.cast();
                match (p.pwrite, p.pwrite_v1) {
                    // SAFETY: the plugin's live handle and our buffer.
                    (Some(f), _) if !v1() => unsafe { f(i, b, n, off, flags) },
                    // SAFETY: as above; the server flushes for FUA.
                    (_, Some(f)) => unsafe { f(i, b, n, off) },
                    _ => -1,
                }
            })
        },
        minus_one,
    )
}

unsafe extern "C" fn flush_cb(h: *mut c_void, flags: u32) -> c_int {
    let p = plugin();
    on(
        h,
        |i| match (p.flush, p.flush_v1) {
            // SAFETY: the plugin's live handle.
            (Some(f), _) if !v1() => unsafe { f(i, flags) },
            // SAFETY: as above.
            (_, Some(f)) => unsafe { f(i) },
            _ => -1,
        },
        minus_one,
    )
}

unsafe extern "C" fn trim_cb(h: *mut c_void, count: u64, offset: u64, flags: u32) -> c_int {
    let p = plugin();
    on(
        h,
        |i| {
            pieces(count, offset, |n, off, _| match (p.trim, p.trim_v1) {
                // SAFETY: the plugin's live handle.
                (Some(f), _) if !v1() => unsafe { f(i, n, off, flags) },
                // SAFETY: as above.
                (_, Some(f)) => unsafe { f(i, n, off) },
                _ => -1,
            })
        },
        minus_one,
    )
}

unsafe extern "C" fn zero_cb(h: *mut c_void, count: u64, offset: u64, flags: u32) -> c_int {
    let p = plugin();
    // SAFETY: the server passes back only handles our open returned.
    if !unsafe { handle(h) }.zero_native.load(Ordering::Relaxed) {
        // As nbdkit: the server writes zeroes, or fails a fast zero.
        host::error(libc::ENOTSUP, None);
        return -1;
    }
    if v1() && flags & nbdkit::FLAG_FAST_ZERO != 0 {
        // API 1 cannot promise a fast zero; the server writes zeroes or
        // answers as the client asked.
        host::error(libc::ENOTSUP, None);
        return -1;
    }
    on(
        h,
        |i| {
            pieces(count, offset, |n, off, _| match (p.zero, p.zero_v1) {
                // SAFETY: the plugin's live handle.
                (Some(f), _) if !v1() => unsafe { f(i, n, off, flags) },
                // SAFETY: as above.
                (_, Some(f)) => unsafe {
                    f(i, n, off, c_int::from(flags & nbdkit::FLAG_MAY_TRIM != 0))
                },
                _ => -1,
            })
        },
        minus_one,
    )
}

unsafe extern "C" fn extents(
    h: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    to: *mut abi::Extents,
) -> c_int {
    let Some(f) = plugin().extents else { return -1 };
    let n = count.min(CHUNK);
    let mut list = ExtentList::forwarding(offset, offset + n, to);
    let l: *mut ExtentList = &mut list;
    // SAFETY: the plugin's live handle; the list outlives the call and is
    // filled through nbdkit_add_extent.
    on(
        h,
        |i| unsafe { f(i, n as u32, offset, flags, l.cast()) },
        minus_one,
    )
}

unsafe extern "C" fn cache(h: *mut c_void, count: u64, offset: u64, flags: u32) -> c_int {
    let Some(f) = plugin().cache else { return -1 };
    on(
        h,
        // SAFETY: the plugin's live handle.
        |i| pieces(count, offset, |n, off, _| unsafe { f(i, n, off, flags) }),
        minus_one,
    )
}
