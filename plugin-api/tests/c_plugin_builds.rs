//! The example C plugins in `examples/` build against `include/` alone,
//! with every warning an error, and behave as their comments say when
//! driven through the raw ABI, with a host table built here, the way the
//! server drives them.

mod common;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use common::TempDir;
use libloading::Library;
use nbdhost_plugin_api::abi;

thread_local! {
    /// Errors the plugin recorded with `host->error` on this thread.
    static ERRORS: RefCell<Vec<(c_int, String)>> = const { RefCell::new(Vec::new()) };
}

fn take_errors() -> Vec<(c_int, String)> {
    ERRORS.with(|e| std::mem::take(&mut *e.borrow_mut()))
}

fn record_error(errnum: c_int, msg: String) {
    ERRORS.with(|e| e.borrow_mut().push((errnum, msg)));
}

/// `host->error`.
unsafe extern "C" fn host_error(errnum: c_int, msg: *const c_char) {
    let msg = if msg.is_null() {
        String::new()
    } else {
        // SAFETY: the ABI passes NULL or a NUL-terminated string valid for
        // the call.
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    };
    record_error(errnum, msg);
}

/// `host->debug`.
unsafe extern "C" fn host_debug(msg: *const c_char) {
    if !msg.is_null() {
        // SAFETY: as for `host_error`.
        let msg = unsafe { CStr::from_ptr(msg) };
        eprintln!("plugin debug: {}", msg.to_string_lossy());
    }
}

/// A minimal size parser: digits and an optional K, M, G or T suffix.
fn parse_size(s: &str) -> Option<i64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let shift = match suffix {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return None,
    };
    let n: i64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

/// `host->parse_size`: the size, or -1 with the error recorded.
unsafe extern "C" fn host_parse_size(s: *const c_char) -> i64 {
    // SAFETY: the plugin passes a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(s) }.to_string_lossy();
    parse_size(&s).unwrap_or_else(|| {
        record_error(libc::EINVAL, format!("could not parse size '{s}'"));
        -1
    })
}

/// The host table handed to the entry points; plugins keep the pointer,
/// so it is a static.
static HOST: abi::Host = abi::Host {
    struct_size: size_of::<abi::Host>() as u64,
    abi_version: abi::ABI_VERSION,
    reserved: 0,
    error: Some(host_error),
    debug: Some(host_debug),
    add_extent: None,
    add_export: None,
    parse_size: Some(host_parse_size),
    read_secret: None,
    free_secret: None,
    peer_name: None,
    export_name: None,
    debug_flag: None,
    extents_new: None,
    extents_free: None,
    extents_count: None,
    extents_get: None,
    last_errno: None,
    is_tls: None,
    peer_identity: None,
    nanosleep: None,
    log: None,
    debug_flag_name: None,
    peer_credentials: None,
    peer_tls_dn: None,
    peer_tls_issuer_dn: None,
    shutdown: None,
    disconnect: None,
    stdio_safe: None,
    connection_id: None,
    exports_new: None,
    exports_free: None,
    exports_count: None,
    exports_get: None,
    complete: None,
    request_then: None,
};

/// Compile `examples/<file>` into `lib<name>plugin.so` in `dir`, with the
/// flags its comment documents plus `-Wextra`.
fn build(dir: &TempDir, name: &str, file: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    let out = dir.path(&format!("lib{name}plugin.so"));
    let include = common::include_dir();
    common::cc(&[
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        "-Wall".as_ref(),
        "-Wextra".as_ref(),
        "-Werror".as_ref(),
        "-I".as_ref(),
        include.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        src.as_os_str(),
    ]);
    out
}

/// dlopen `so` and call its entry point with [`HOST`].
fn load(so: &Path) -> (Library, *const abi::Plugin) {
    load_with(so, &HOST)
}

/// dlopen `so` and call its entry point with `host`.
fn load_with(so: &Path, host: &'static abi::Host) -> (Library, *const abi::Plugin) {
    // SAFETY: loading runs the shared object's initialisers; it is one of
    // our examples, just compiled.
    let lib =
        unsafe { Library::new(so) }.unwrap_or_else(|e| panic!("cannot load {}: {e}", so.display()));
    // SAFETY: the header fixes the entry point's type, which
    // `abi::PluginEntry` mirrors (tests/layout.rs holds them together).
    let entry: abi::PluginEntry = *unsafe { lib.get(abi::PLUGIN_ENTRY.as_bytes()) }
        .unwrap_or_else(|e| panic!("{} has no {}: {e}", so.display(), abi::PLUGIN_ENTRY));
    // SAFETY: `host` is a complete, 'static host table.
    let table = unsafe { entry(host) };
    assert!(
        !table.is_null(),
        "{}: the entry point returned NULL",
        so.display()
    );
    (lib, table)
}

/// Field `$f` of the plugin struct at `$p`, or `None` when the plugin's
/// `struct_size` ends before it (an older plugin), as the server reads it.
/// Only for pointer-sized fields.
macro_rules! field {
    ($p:expr, $f:ident) => {{
        let p: *const abi::Plugin = $p;
        // SAFETY: every version of the struct starts with struct_size.
        let struct_size = unsafe { (*p).struct_size } as usize;
        if struct_size >= offset_of!(abi::Plugin, $f) + size_of::<usize>() {
            // SAFETY: the field lies inside the plugin's struct_size bytes;
            // no reference to the whole (possibly longer) struct is made.
            Some(unsafe { std::ptr::addr_of!((*p).$f).read() })
        } else {
            None
        }
    }};
}

/// A NUL-terminated string from a plugin struct, copied out.
fn string(p: *const c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: the plugin's strings are NUL-terminated and static in a
    // library the caller keeps loaded.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned()
}

/// A host table of another major version, which NBDHOST_REGISTER_PLUGIN
/// refuses.
static FUTURE_HOST: abi::Host = abi::Host {
    abi_version: (abi::ABI_MAJOR + 1) << 16,
    ..HOST
};

#[test]
fn the_register_macro_refuses_a_host_of_another_major() {
    let dir = TempDir::new("cmem-major");
    let so = build(&dir, "cmem", "cplugin.c");
    // SAFETY: as in `load`.
    let lib = unsafe { Library::new(&so) }.unwrap();
    // SAFETY: as in `load`.
    let entry: abi::PluginEntry = *unsafe { lib.get(abi::PLUGIN_ENTRY.as_bytes()) }.unwrap();
    // SAFETY: a complete, 'static host table.
    assert!(unsafe { entry(&FUTURE_HOST) }.is_null());
}

#[test]
fn cmem_ram_disk_works_through_the_abi() {
    let dir = TempDir::new("cmem");
    let so = build(&dir, "cmem", "cplugin.c");
    let (lib, table) = load(&so);

    // SAFETY: every version of the struct starts with struct_size.
    let struct_size = unsafe { (*table).struct_size };
    assert_eq!(
        struct_size,
        size_of::<abi::Plugin>() as u64,
        "cmem sets struct_size to the full sizeof"
    );
    // SAFETY: the struct is as long as abi::Plugin (checked just above)
    // and lives as long as `lib`, which outlives `t`.
    let t: &abi::Plugin = unsafe { &*table };
    assert_eq!(t.abi_version, abi::ABI_VERSION);
    assert!(t.thread_model <= abi::THREAD_MODEL_PARALLEL);
    assert_eq!(string(t.name), "cmem");
    assert_eq!(string(t.magic_config_key), "size");
    assert!(string(t.config_help).contains("size="));

    let load = t.load.expect("load");
    let unload = t.unload.expect("unload");
    let config = t.config.expect("config");
    let config_complete = t.config_complete.expect("config_complete");
    let open = t.open.expect("open");
    let close = t.close.expect("close");
    let get_size = t.get_size.expect("get_size");
    let can_write = t.can_write.expect("can_write");
    let can_flush = t.can_flush.expect("can_flush");
    let can_trim = t.can_trim.expect("can_trim");
    let pread = t.pread.expect("pread");
    let pwrite = t.pwrite.expect("pwrite");
    let flush = t.flush.expect("flush");
    let trim = t.trim.expect("trim");

    let config_str = |key: &str, value: &str| {
        let (k, v) = (CString::new(key).unwrap(), CString::new(value).unwrap());
        // SAFETY: ABI callback; both strings are valid for the call.
        unsafe { config(k.as_ptr(), v.as_ptr()) }
    };

    // SAFETY: ABI callback with no arguments, called once, first.
    assert_eq!(unsafe { load() }, 0);
    assert_eq!(take_errors(), []);

    assert_eq!(config_str("colour", "blue"), -1, "unknown keys are refused");
    let errors = take_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, libc::EINVAL);
    assert!(errors[0].1.contains("colour"), "{errors:?}");

    assert_eq!(
        config_str("size", "lots"),
        -1,
        "parse_size failures pass up"
    );
    assert_eq!(take_errors().len(), 1, "parse_size recorded the error");

    assert_eq!(config_str("size", "65536"), 0);
    // SAFETY: ABI callback, after configuration.
    assert_eq!(unsafe { config_complete() }, 0);
    assert_eq!(take_errors(), []);

    // SAFETY: ABI callback; readonly = 0.
    let h = unsafe { open(0) };
    assert!(!h.is_null());
    // SAFETY (this and the calls below): ABI callbacks on the live handle
    // `h`, with buffers at least `count` bytes long.
    unsafe {
        assert_eq!(get_size(h), 65536);
        assert_eq!(can_write(h), 1);
        assert_eq!(can_flush(h), 1);
        assert_eq!(can_trim(h), 1);
    }

    let mut buf = vec![0xffu8; 65536];
    // SAFETY: see above.
    let r = unsafe { pread(h, buf.as_mut_ptr().cast(), 65536, 0, 0) };
    assert_eq!(r, 0);
    assert!(buf.iter().all(|&b| b == 0), "a new disk reads as zeroes");

    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    // SAFETY: see above.
    let r = unsafe { pwrite(h, data.as_ptr().cast(), 8192, 4096, abi::FLAG_FUA) };
    assert_eq!(r, 0);
    let mut back = vec![0u8; 8192];
    // SAFETY: see above.
    let r = unsafe { pread(h, back.as_mut_ptr().cast(), 8192, 4096, 0) };
    assert_eq!(r, 0);
    assert_eq!(back, data, "pwrite then pread round-trips");

    // The last byte is inside the disk.
    // SAFETY: see above.
    let r = unsafe { pwrite(h, [0x5au8].as_ptr().cast(), 1, 65535, 0) };
    assert_eq!(r, 0);
    let mut last = [0u8; 1];
    // SAFETY: see above.
    let r = unsafe { pread(h, last.as_mut_ptr().cast(), 1, 65535, 0) };
    assert_eq!((r, last), (0, [0x5a]));

    // SAFETY: see above.
    unsafe {
        assert_eq!(flush(h, 0), 0);
        assert_eq!(trim(h, 4096, 4096, 0), 0);
    }
    // SAFETY: see above.
    let r = unsafe { pread(h, back.as_mut_ptr().cast(), 8192, 4096, 0) };
    assert_eq!(r, 0);
    assert!(back[..4096].iter().all(|&b| b == 0), "trim zeroes");
    assert_eq!(back[4096..], data[4096..], "trim leaves the rest alone");
    assert_eq!(take_errors(), []);

    // Out of range: -1 and an errno recorded through host->error. The
    // buffer is large enough for `count`, so a plugin that failed to check
    // would still not write out of bounds here.
    let mut small = [0u8; 16];
    for (count, offset) in [(8, 65532), (1, 65536), (16, u64::MAX - 7)] {
        // SAFETY: see above; `small` holds `count` bytes.
        let r = unsafe { pread(h, small.as_mut_ptr().cast(), count, offset, 0) };
        assert_eq!(r, -1, "pread of {count} bytes at {offset}");
        let errors = take_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            [libc::EINVAL, libc::EIO].contains(&errors[0].0),
            "{errors:?}"
        );
        // nbdhost_error's formatting, numbers and all.
        assert_eq!(
            errors[0].1,
            format!("read out of range: {count} bytes at offset {offset} on a disk of 65536 bytes")
        );
    }
    // SAFETY: see above.
    let r = unsafe { pwrite(h, small.as_ptr().cast(), 16, 65536 - 8, 0) };
    assert_eq!(r, -1);
    assert_eq!(take_errors().len(), 1);
    // SAFETY: see above.
    let r = unsafe { trim(h, 2, 65535, 0) };
    assert_eq!(r, -1);
    assert_eq!(take_errors().len(), 1);

    // A read-only connection sees the same disk but may not write.
    // SAFETY: ABI callback; readonly = 1.
    let ro = unsafe { open(1) };
    assert!(!ro.is_null());
    // SAFETY: see above, for the live handle `ro`.
    unsafe {
        assert_eq!(can_write(ro), 0);
        assert_eq!(pread(ro, last.as_mut_ptr().cast(), 1, 65535, 0), 0);
        close(ro);
    }
    assert_eq!(last, [0x5a]);

    // SAFETY: the handle is closed once and not used afterwards; unload
    // comes last.
    unsafe {
        close(h);
        unload();
    }
    assert_eq!(take_errors(), []);
    drop(lib);
}

#[test]
fn old_abi_plugin_has_a_short_struct_and_reads() {
    let dir = TempDir::new("oldabi");
    let so = build(&dir, "oldabi", "cplugin-old.c");
    let (lib, table) = load(&so);

    // SAFETY: every version of the struct starts with struct_size and
    // abi_version.
    let (struct_size, abi_version) = unsafe { ((*table).struct_size, (*table).abi_version) };
    assert!(
        (struct_size as usize) < size_of::<abi::Plugin>(),
        "the old struct ({struct_size} bytes) is shorter than the current one"
    );
    assert_eq!(
        struct_size as usize,
        offset_of!(abi::Plugin, pwrite),
        "the old struct ends just before pwrite"
    );
    assert_eq!(abi_version, abi::ABI_VERSION);
    assert_eq!(string(field!(table, name).unwrap()), "oldabi");

    // Everything after pread lies past the end: absent.
    assert!(field!(table, pwrite).is_none());
    assert!(field!(table, flush).is_none());
    assert!(field!(table, cache).is_none());
    // Inside the struct but not provided.
    assert!(field!(table, can_write).unwrap().is_none());
    assert!(field!(table, close).unwrap().is_none());

    let open = field!(table, open).unwrap().expect("open");
    let get_size = field!(table, get_size).unwrap().expect("get_size");
    let pread = field!(table, pread).unwrap().expect("pread");

    // SAFETY: ABI callback; readonly = 1.
    let h = unsafe { open(1) };
    assert!(!h.is_null());
    // SAFETY: ABI callback on the live handle.
    assert_eq!(unsafe { get_size(h) }, 1 << 20);

    let read = |count: usize, offset: u64| -> (c_int, Vec<u8>) {
        let mut buf = vec![0u8; count];
        // SAFETY: ABI callback on the live handle; `buf` holds `count`
        // bytes.
        let r = unsafe {
            pread(
                h,
                buf.as_mut_ptr().cast::<c_void>(),
                count as u64,
                offset,
                0,
            )
        };
        (r, buf)
    };
    assert_eq!(read(4, 254), (0, vec![254, 255, 0, 1]));
    assert_eq!(read(3, 4095), (0, vec![255, 0, 1]));
    assert_eq!(read(256, 65536 + 256), (0, (0..=255).collect()));
    assert_eq!(read(1, (1 << 20) - 1), (0, vec![255]));
    assert_eq!(take_errors(), []);

    assert_eq!(read(2, (1 << 20) - 1).0, -1, "out of range");
    let errors = take_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, libc::EINVAL);
    drop(lib);
}

#[test]
fn future_abi_plugin_declares_the_next_major() {
    let dir = TempDir::new("future");
    let so = build(&dir, "future", "cplugin-future.c");
    let (lib, table) = load(&so);

    // SAFETY: every version of the struct starts with struct_size and
    // abi_version; a server reads nothing else before refusing.
    let (struct_size, abi_version) = unsafe { ((*table).struct_size, (*table).abi_version) };
    assert_eq!(abi_version >> 16, abi::ABI_MAJOR + 1);
    assert_ne!(abi_version >> 16, abi::ABI_MAJOR, "a server must refuse it");
    // This particular file is laid out like today's struct, so its name can
    // be read to make sure the right file was built.
    assert_eq!(struct_size as usize, size_of::<abi::Plugin>());
    assert_eq!(string(field!(table, name).unwrap()), "future");
    drop(lib);
}

// ---------------------------------------------------------------------------
// casync (examples/cplugin-async.c): asynchronous requests (ABI 1.9),
// driven through the raw ABI with a host table that records completions.

/// One call of `host->complete`, and the thread that made it.
struct Completed {
    errnum: c_int,
    msg: String,
    thread: std::thread::ThreadId,
}

/// Completions by request token, as `host->complete` received them.
static COMPLETED: Mutex<Vec<(usize, Completed)>> = Mutex::new(Vec::new());
static COMPLETED_CHANGED: Condvar = Condvar::new();
/// What the plugin logged with `host->log`.
static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A C string the ABI passed (NULL as empty), copied out.
fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the ABI passes NUL-terminated strings valid for the call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `host->complete`: record it, from whichever thread calls.
unsafe extern "C" fn host_complete(req: *mut abi::Request, errnum: c_int, msg: *const c_char) {
    let c = Completed {
        errnum,
        msg: c_text(msg),
        thread: std::thread::current().id(),
    };
    COMPLETED.lock().unwrap().push((req.addr(), c));
    COMPLETED_CHANGED.notify_all();
}

/// `host->log`.
unsafe extern "C" fn host_log(_level: c_int, msg: *const c_char) {
    LOGGED.lock().unwrap().push(c_text(msg));
}

/// `host->connection_id`, `export_name` and `debug_flag`: what a callback
/// made for connection 7 to export "disk", with `-D casync.trace=1`,
/// would be told.
unsafe extern "C" fn host_connection_id() -> u64 {
    7
}

unsafe extern "C" fn host_export_name() -> *const c_char {
    c"disk".as_ptr()
}

unsafe extern "C" fn host_debug_flag(name: *const c_char) -> c_int {
    c_int::from(c_text(name) == "trace")
}

/// The host table of a 1.9 server, with the services casync uses.
static ASYNC_HOST: abi::Host = abi::Host {
    log: Some(host_log),
    connection_id: Some(host_connection_id),
    export_name: Some(host_export_name),
    debug_flag: Some(host_debug_flag),
    complete: Some(host_complete),
    ..HOST
};

/// The host table of a 1.8 server: it ends before `complete`.
static HOST_1_8: abi::Host = abi::Host {
    struct_size: offset_of!(abi::Host, complete) as u64,
    abi_version: (abi::ABI_MAJOR << 16) | 8,
    ..HOST
};

/// A request token: the plugin passes it back and never reads it.
fn token(n: usize) -> *mut abi::Request {
    std::ptr::without_provenance_mut(n)
}

/// The completion of request `n`, taken from the record: waited for up
/// to 10 s when `wait`, else it must be there already.
fn completion(n: usize, wait: bool) -> Completed {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut done = COMPLETED.lock().unwrap();
    loop {
        if let Some(i) = done.iter().position(|(r, _)| *r == n) {
            return done.remove(i).1;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(wait && !left.is_zero(), "request {n} was not completed");
        done = COMPLETED_CHANGED.wait_timeout(done, left).unwrap().0;
    }
}

/// How many completions request `n` has had and not been taken.
fn completions_left(n: usize) -> usize {
    COMPLETED
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _)| *r == n)
        .count()
}

#[test]
fn casync_refuses_a_server_older_than_1_9_in_load() {
    let dir = TempDir::new("casync-old");
    let so = build(&dir, "casyncold", "cplugin-async.c");
    let (lib, table) = load_with(&so, &HOST_1_8);
    // SAFETY: the plugin's struct is as long as abi::Plugin (it is built
    // against these headers) and lives as long as `lib`.
    let load = unsafe { &*table }.load.expect("load");
    take_errors();
    // SAFETY: ABI callback with no arguments.
    assert_eq!(unsafe { load() }, -1);
    let errors = take_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, libc::ENOTSUP);
    assert!(errors[0].1.contains("ABI 1.9"), "{errors:?}");
    drop(lib);
}

#[test]
fn casync_completes_in_the_starting_call_then_on_its_own_thread() {
    let dir = TempDir::new("casync");
    let so = build(&dir, "casync", "cplugin-async.c");
    let (lib, table) = load_with(&so, &ASYNC_HOST);
    // SAFETY: as in the test above.
    let t: &abi::Plugin = unsafe { &*table };
    assert_eq!(t.struct_size, size_of::<abi::Plugin>() as u64);
    assert_eq!(string(t.name), "casync");
    // Asynchronous only: nothing synchronous to read or write with.
    assert!(t.pread.is_none() && t.pwrite.is_none());
    let async_pread = t.async_pread.expect("async_pread");
    let async_pwrite = t.async_pwrite.expect("async_pwrite");
    let async_zero = t.async_zero.expect("async_zero");
    let async_trim = t.async_trim.expect("async_trim");
    let me = std::thread::current().id();

    // SAFETY (this block): ABI callbacks in the order the server makes
    // them, each once.
    unsafe {
        assert_eq!(t.load.expect("load")(), 0);
        let (k, v) = (c"size", c"1M");
        assert_eq!(t.config.expect("config")(k.as_ptr(), v.as_ptr()), 0);
        assert_eq!(t.get_ready.expect("get_ready")(), 0);
        assert_eq!(t.capabilities.expect("capabilities")(), abi::NONBLOCKING);
    }
    assert_eq!(take_errors(), []);

    // Opened before after_fork (as for a filter's startup): no thread
    // yet, so the request is answered inside the call that started it.
    // SAFETY: ABI callback; readonly = 0.
    let h = unsafe { t.open.expect("open")(0) };
    assert!(!h.is_null());
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    // SAFETY: `data` outlives the request, which completes in the call.
    unsafe { async_pwrite(h, data.as_ptr().cast(), 8192, 4096, 0, token(1)) };
    let c = completion(1, false);
    assert_eq!((c.errnum, c.thread), (0, me), "{}", c.msg);

    // SAFETY: ABI callback, once, after get_ready.
    assert_eq!(unsafe { t.after_fork.expect("after_fork")() }, 0);

    // Now the plugin's thread answers: the buffer must stay put until
    // then, which waiting for the completion here ensures.
    let mut back = vec![0u8; 8192];
    // SAFETY: `back` lives until the completion is waited for below.
    unsafe { async_pread(h, back.as_mut_ptr().cast(), 8192, 4096, 0, token(2)) };
    let c = completion(2, true);
    assert_eq!(c.errnum, 0, "{}", c.msg);
    assert_ne!(c.thread, me, "completed on the plugin's own thread");
    assert_eq!(back, data, "async_pwrite then async_pread round-trip");

    // Zero and trim, then many reads in flight at once, each answered
    // exactly once.
    // SAFETY: plain ranges inside the disk.
    unsafe {
        async_zero(h, 1024, 4096, 0, token(3));
        async_trim(h, 1024, 8192, 0, token(4));
    }
    assert_eq!(completion(3, true).errnum, 0);
    assert_eq!(completion(4, true).errnum, 0);
    let mut bufs = vec![vec![0xffu8; 4096]; 16];
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: every buffer lives until all sixteen are completed.
        unsafe {
            async_pread(
                h,
                b.as_mut_ptr().cast(),
                4096,
                4096 * i as u64,
                0,
                token(10 + i),
            )
        };
    }
    for i in 0..16 {
        assert_eq!(completion(10 + i, true).errnum, 0);
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    for i in 0..16 {
        assert_eq!(
            completions_left(10 + i),
            0,
            "request {} completed twice",
            10 + i
        );
    }
    assert!(
        bufs[0].iter().all(|&b| b == 0),
        "a new disk reads as zeroes"
    );
    assert!(bufs[1][..1024].iter().all(|&b| b == 0), "zeroed");
    assert_eq!(bufs[1][1024..], data[1024..4096]);
    assert!(bufs[2][..1024].iter().all(|&b| b == 0), "trimmed");
    assert_eq!(bufs[2][1024..], data[5120..]);

    // What open saved answers on the plugin's thread.
    let logged = LOGGED.lock().unwrap().join("\n");
    assert!(
        logged.contains("casync: connection 7 (export \"disk\"): read of 8192 bytes at 4096"),
        "{logged}"
    );

    // SAFETY: nothing is in flight on `h`; unload (which stops the
    // plugin's thread) comes last, before the library goes.
    unsafe {
        t.close.expect("close")(h);
        t.unload.expect("unload")();
    }
    assert_eq!(take_errors(), []);
    drop(lib);
}
