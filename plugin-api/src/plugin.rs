//! The `Plugin` and `Handle` traits and the trampolines that expose them
//! through the C ABI.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use crate::abi;
use crate::boundary::{guard, quiet_panics, starting};
use crate::data::{BlockSize, ExportList, ExtentList, Flags, Support};
use crate::host;
use crate::instance::Instance;
use crate::requests::{ExtentsRequest, RangeRequest, ReadRequest, WriteRequest};
use crate::{Error, Result};

/// How much concurrency the plugin tolerates; the server never exceeds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum ThreadModel {
    /// One connection at a time; its requests one after another.
    SerializeConnections = abi::THREAD_MODEL_SERIALIZE_CONNECTIONS,
    /// Many connections, but only one request in the plugin at a time.
    SerializeAllRequests = abi::THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    /// One request at a time per connection.
    SerializeRequests = abi::THREAD_MODEL_SERIALIZE_REQUESTS,
    /// Any number of requests in parallel.
    Parallel = abi::THREAD_MODEL_PARALLEL,
}

/// A plugin: global state, configured from the command line before any
/// client connects, then shared by every connection.
///
/// The plugin is created with `Default` when the server loads it.
pub trait Plugin: Default + Send + Sync + 'static {
    /// Short name, as used on the command line.
    const NAME: &'static str;
    /// One-line description.
    const DESCRIPTION: &'static str;
    /// `key=value` lines shown by `--help`.
    const CONFIG_HELP: &'static str = "";
    /// The key a bare command-line value (without `=`) sets.
    const MAGIC_CONFIG_KEY: Option<&'static str> = None;
    /// Concurrency this plugin tolerates.
    const THREAD_MODEL: ThreadModel = ThreadModel::Parallel;

    /// The methods this `impl` block defines, written by
    /// [`macro@crate::callbacks`].
    const CALLBACKS: crate::Callbacks;

    /// Per-connection state.
    type Handle: Handle;

    /// One `key=value` parameter from the command line. Not defined, any
    /// parameter is refused.
    fn config(&mut self, key: &str, _value: &str) -> Result<()> {
        Err(Error::new(
            libc::EINVAL,
            format!("unknown parameter '{key}'"),
        ))
    }
    /// All parameters were given; check that the required ones were.
    fn config_complete(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called once before the server starts listening.
    fn get_ready(&self) -> Result<()> {
        Ok(())
    }
    /// Called once the server has gone to the background (if it does)
    /// and before it serves: the place to start threads, which a fork
    /// would not have kept.
    fn after_fork(&self) -> Result<()> {
        Ok(())
    }
    /// Asked once after [`Plugin::get_ready`]: whether, as configured, no
    /// callback ever waits (for I/O, a sleep, or a lock held across
    /// either), so the server may run them on its event loops and answer
    /// each request on the thread that read it. Leave it `false` if in
    /// doubt: a plugin that blocks there stalls other connections.
    fn nonblocking(&self) -> bool {
        false
    }
    /// Asked once after [`Plugin::get_ready`] (since ABI 1.9): whether, as
    /// configured, the handles' `async_*` methods are to be used. A plugin
    /// that can serve either way answers `false` when configured for
    /// threads: the server then starts every request with the synchronous
    /// methods, as it would for a plugin without asynchronous ones.
    fn asynchronous(&self) -> bool {
        true
    }
    /// Lines of its own for `--dump-plugin`, as `(key, value)`, printed
    /// as `key=value` after the server's (what the plugin was built with,
    /// say).
    fn dump_plugin(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// A client connected; refuse it by returning an error.
    fn preconnect(&self, _readonly: bool) -> Result<()> {
        Ok(())
    }
    /// The exports to list to clients. The default lists only the default
    /// export.
    fn list_exports(&self, readonly: bool, is_tls: bool, exports: &mut ExportList) -> Result<()> {
        exports.add(&self.default_export(readonly, is_tls)?, None)
    }
    /// The name the empty export name stands for.
    fn default_export(&self, _readonly: bool, _is_tls: bool) -> Result<String> {
        Ok(String::new())
    }
    /// Open a connection's handle; [`crate::host::export_name`] tells which
    /// export the client asked for.
    fn open(&self, readonly: bool) -> Result<Self::Handle>;
    /// Called once before the plugin is unloaded.
    fn unload(&mut self) {}
}

/// One open connection. Every method may be called concurrently from
/// several threads unless the plugin's thread model says otherwise.
pub trait Handle: Send + Sync + 'static {
    /// The methods this `impl` block defines, written by
    /// [`macro@crate::callbacks`].
    const CALLBACKS: crate::Callbacks;

    /// Size of the export in bytes.
    fn get_size(&self) -> Result<u64>;
    /// Block-size constraints, if any.
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(None)
    }
    /// Whether writes are possible; by default, when `pwrite` is defined.
    fn can_write(&self) -> Result<bool> {
        Ok(Self::CALLBACKS.has("pwrite"))
    }
    /// Whether `flush` does anything; by default, when it is defined.
    fn can_flush(&self) -> Result<bool> {
        Ok(Self::CALLBACKS.has("flush"))
    }
    /// Whether `trim` is supported; by default, when it is defined.
    fn can_trim(&self) -> Result<bool> {
        Ok(Self::CALLBACKS.has("trim"))
    }
    /// Whether to advertise write-zeroes. The server writes zeroes itself
    /// when `zero` fails with `ENOTSUP`.
    fn can_zero(&self) -> Result<bool> {
        Ok(true)
    }
    /// Whether `zero` honours [`Flags::FAST_ZERO`]. By default, only when
    /// `zero` is not defined: the server then fails a fast zero at once,
    /// which is what the flag asks for.
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(!Self::CALLBACKS.has("zero"))
    }
    /// How FUA is handled; by default emulated with a flush when the
    /// plugin can flush.
    fn can_fua(&self) -> Result<Support> {
        Ok(if self.can_flush()? {
            Support::Emulate
        } else {
            Support::None
        })
    }
    /// Whether several connections see a consistent view of the data.
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(false)
    }
    /// How cache requests are handled; by default natively when `cache`
    /// is defined, else not at all.
    fn can_cache(&self) -> Result<Support> {
        Ok(if Self::CALLBACKS.has("cache") {
            Support::Native
        } else {
            Support::None
        })
    }
    /// Whether `extents` reports real allocation; by default, when it is
    /// defined.
    fn can_extents(&self) -> Result<bool> {
        Ok(Self::CALLBACKS.has("extents"))
    }
    /// Whether the storage is rotational.
    fn is_rotational(&self) -> Result<bool> {
        Ok(false)
    }
    /// Human-readable description of the export.
    fn export_description(&self) -> Option<String> {
        None
    }
    /// The absolute path of the local file or block device whose bytes
    /// this handle serves, if it serves one (since ABI 1.8): format
    /// filters resolve relative backing-file names against its directory
    /// and lock it as qemu does.
    fn local_file(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Read `buf.len()` bytes at `offset`.
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()>;
    /// Write `buf` at `offset`.
    fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::errno(libc::EROFS))
    }
    /// Persist everything written so far.
    fn flush(&self, _flags: Flags) -> Result<()> {
        Err(Error::errno(libc::EINVAL))
    }
    /// Discard a range.
    fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::errno(libc::EINVAL))
    }
    /// Write zeroes to a range; `ENOTSUP` makes the server write them.
    fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::errno(libc::ENOTSUP))
    }
    /// Report allocation of `count` bytes at `offset`.
    fn extents(&self, count: u64, offset: u64, _flags: Flags, list: &mut ExtentList) -> Result<()> {
        list.add(offset, count, 0)
    }
    /// Prefetch a range.
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }

    /// Since ABI 1.9: start a read and return at once; answer it later,
    /// from any thread, with [`ReadRequest::complete`]. Defined, the
    /// server starts every read this way (the synchronous `pread` still
    /// serves filters that call it). See the asynchronous requests of
    /// nbdhost-plugin(3): the thread model governs the starting calls, not
    /// the time requests are in flight.
    fn async_pread(&self, mut req: ReadRequest) {
        let (offset, flags) = (req.offset(), req.flags());
        let r = self.pread(req.buf(), offset, flags);
        req.complete(r);
    }
    /// Since ABI 1.9: start a write; as [`Handle::async_pread`].
    fn async_pwrite(&self, req: WriteRequest) {
        let r = self.pwrite(req.buf(), req.offset(), req.flags());
        req.complete(r);
    }
    /// Since ABI 1.9: start a flush; as [`Handle::async_pread`].
    fn async_flush(&self, req: RangeRequest) {
        let r = self.flush(req.flags());
        req.complete(r);
    }
    /// Since ABI 1.9: start a trim; as [`Handle::async_pread`].
    fn async_trim(&self, req: RangeRequest) {
        let r = self.trim(req.count(), req.offset(), req.flags());
        req.complete(r);
    }
    /// Since ABI 1.9: start a zero; as [`Handle::async_pread`]. `ENOTSUP`
    /// makes the server write the zeroes.
    fn async_zero(&self, req: RangeRequest) {
        let r = self.zero(req.count(), req.offset(), req.flags());
        req.complete(r);
    }
    /// Since ABI 1.9: start a cache; as [`Handle::async_pread`].
    fn async_cache(&self, req: RangeRequest) {
        let r = self.cache(req.count(), req.offset(), req.flags());
        req.complete(r);
    }
    /// Since ABI 1.9: start an extents request; as
    /// [`Handle::async_pread`].
    fn async_extents(&self, mut req: ExtentsRequest) {
        let (count, offset, flags) = (req.count(), req.offset(), req.flags());
        let r = self.extents(count, offset, flags, req.list());
        req.complete(r);
    }
}

static INSTANCE: Instance = Instance::new();
static TABLE: OnceLock<abi::Plugin> = OnceLock::new();

/// Borrow the handle behind a pointer that `open` produced.
///
/// # Safety
/// `h` must come from `open::<P>` and not have been closed.
unsafe fn handle<'a, P: Plugin>(h: *mut c_void) -> &'a P::Handle {
    // SAFETY: guaranteed by the caller.
    unsafe { &*(h as *const P::Handle) }
}

/// A layer's names as NUL-terminated C strings in statics of the layer's
/// own shared object, made at compile time by its `nbdhost_plugin!` or
/// `nbdhost_filter!`: no allocation outlives an unload.
#[derive(Clone, Copy)]
pub struct Strings {
    pub name: *const c_char,
    pub version: *const c_char,
    pub description: *const c_char,
    pub config_help: *const c_char,
}

pub(crate) fn str_arg<'a>(p: *const c_char) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::new(libc::EINVAL, "null string"));
    }
    // SAFETY: the server passes NUL-terminated strings valid for the call.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::new(libc::EINVAL, "parameter is not UTF-8"))
}

pub(crate) fn ok(r: Result<()>) -> Result<c_int> {
    r.map(|()| 0)
}

unsafe extern "C" fn load<P: Plugin>() -> c_int {
    guard(-1, || {
        INSTANCE.install(P::default())?;
        Ok(0)
    })
}

unsafe extern "C" fn unload<P: Plugin>() {
    guard((), || {
        INSTANCE.with_mut::<P, _>(|p| {
            p.unload();
            Ok(())
        })?;
        INSTANCE.remove();
        Ok(())
    })
}

unsafe extern "C" fn config<P: Plugin>(key: *const c_char, value: *const c_char) -> c_int {
    guard(-1, || {
        let (k, v) = (str_arg(key)?, str_arg(value)?);
        ok(INSTANCE.with_mut::<P, _>(|p| p.config(k, v)))
    })
}

unsafe extern "C" fn config_complete<P: Plugin>() -> c_int {
    guard(
        -1,
        || ok(INSTANCE.with_mut::<P, _>(|p| p.config_complete())),
    )
}

unsafe extern "C" fn after_fork<P: Plugin>() -> c_int {
    guard(-1, || ok(INSTANCE.with::<P, _>(|x| x.after_fork())))
}

unsafe extern "C" fn dump_plugin<P: Plugin>() {
    guard((), || {
        let lines = INSTANCE.with::<P, _>(|p| Ok(p.dump_plugin()))?;
        let text: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        write_stdout(text.as_bytes());
        Ok(())
    })
}

/// Write `bytes` to file descriptor 1 as they are. Not through this
/// library's own `std::io::stdout`, whose buffer would come out after
/// what the server prints next, and would stay allocated after the
/// library is unloaded. A closed or full stdout leaves nothing to report
/// to, so errors end the write.
fn write_stdout(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writing from a live slice to a descriptor number; the
        // call neither keeps nor frees the buffer.
        let n = unsafe { libc::write(1, bytes.as_ptr().cast(), bytes.len()) };
        match n {
            n if n > 0 => bytes = &bytes[n as usize..],
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

unsafe extern "C" fn get_ready<P: Plugin>() -> c_int {
    guard(-1, || ok(INSTANCE.with::<P, _>(|p| p.get_ready())))
}

unsafe extern "C" fn capabilities<P: Plugin>() -> u64 {
    guard(0, || {
        let (nonblocking, asynchronous) =
            INSTANCE.with::<P, _>(|p| Ok((p.nonblocking(), p.asynchronous())))?;
        let mut caps = 0;
        if nonblocking {
            caps |= abi::NONBLOCKING;
        }
        if !asynchronous {
            caps |= abi::SYNCHRONOUS;
        }
        Ok(caps)
    })
}

unsafe extern "C" fn preconnect<P: Plugin>(readonly: c_int) -> c_int {
    guard(-1, || {
        ok(INSTANCE.with::<P, _>(|p| p.preconnect(readonly != 0)))
    })
}

unsafe extern "C" fn list_exports<P: Plugin>(
    readonly: c_int,
    is_tls: c_int,
    exports: *mut abi::Exports,
) -> c_int {
    guard(-1, || {
        let mut list = ExportList::from_raw(exports);
        ok(INSTANCE.with::<P, _>(|p| p.list_exports(readonly != 0, is_tls != 0, &mut list)))
    })
}

thread_local! {
    static DEFAULT_EXPORT: std::cell::RefCell<std::ffi::CString> = Default::default();
}

unsafe extern "C" fn default_export<P: Plugin>(readonly: c_int, is_tls: c_int) -> *const c_char {
    guard(std::ptr::null(), || {
        let name = INSTANCE.with::<P, _>(|p| p.default_export(readonly != 0, is_tls != 0))?;
        let c = std::ffi::CString::new(name)
            .map_err(|_| Error::new(libc::EINVAL, "NUL in export name"))?;
        // The server copies the string before its next call on this thread.
        Ok(DEFAULT_EXPORT.with(|slot| {
            *slot.borrow_mut() = c;
            slot.borrow().as_ptr()
        }))
    })
}

unsafe extern "C" fn open<P: Plugin>(readonly: c_int) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        let h = INSTANCE.with::<P, _>(|p| p.open(readonly != 0))?;
        Ok(Box::into_raw(Box::new(h)).cast())
    })
}

unsafe extern "C" fn close<P: Plugin>(h: *mut c_void) {
    guard((), || {
        // SAFETY: the server closes each handle from `open` exactly once.
        drop(unsafe { Box::from_raw(h as *mut P::Handle) });
        Ok(())
    })
}

unsafe extern "C" fn get_size<P: Plugin>(h: *mut c_void) -> i64 {
    guard(-1, || {
        // SAFETY: the server passes a live handle from `open`.
        let size = unsafe { handle::<P>(h) }.get_size()?;
        i64::try_from(size).map_err(|_| Error::new(libc::EOVERFLOW, "size too large"))
    })
}

unsafe extern "C" fn block_size<P: Plugin>(
    h: *mut c_void,
    min: *mut u32,
    pref: *mut u32,
    max: *mut u32,
) -> c_int {
    guard(-1, || {
        // SAFETY: the server passes a live handle from `open`.
        let bs = unsafe { handle::<P>(h) }.block_size()?;
        let bs = bs.unwrap_or(BlockSize {
            minimum: 0,
            preferred: 0,
            maximum: 0,
        });
        // SAFETY: the server passes three writable u32 places.
        unsafe {
            *min = bs.minimum;
            *pref = bs.preferred;
            *max = bs.maximum;
        }
        Ok(0)
    })
}

macro_rules! can_fn {
    ($name:ident, $method:ident, $conv:expr) => {
        unsafe extern "C" fn $name<P: Plugin>(h: *mut c_void) -> c_int {
            guard(-1, || {
                // SAFETY: the server passes a live handle from `open`.
                let v = unsafe { handle::<P>(h) }.$method()?;
                Ok($conv(v))
            })
        }
    };
}

can_fn!(can_write, can_write, c_int::from);
can_fn!(can_flush, can_flush, c_int::from);
can_fn!(can_trim, can_trim, c_int::from);
can_fn!(can_zero, can_zero, c_int::from);
can_fn!(can_fast_zero, can_fast_zero, c_int::from);
can_fn!(can_fua, can_fua, |s: Support| s as c_int);
can_fn!(can_multi_conn, can_multi_conn, c_int::from);
can_fn!(can_cache, can_cache, |s: Support| s as c_int);
can_fn!(can_extents, can_extents, c_int::from);
can_fn!(is_rotational, is_rotational, c_int::from);

thread_local! {
    static LENT: std::cell::RefCell<std::ffi::CString> = Default::default();
}

/// A string returned through the ABI as a C pointer (null for `None`),
/// kept in a thread-local until the next string this thread lends: the
/// server copies each one before it makes another call on the thread.
/// `what` names the string in the error for an embedded NUL.
pub(crate) fn lend(s: Option<impl Into<Vec<u8>>>, what: &str) -> Result<*const c_char> {
    let Some(s) = s else {
        return Ok(std::ptr::null());
    };
    let c = std::ffi::CString::new(s)
        .map_err(|_| Error::new(libc::EINVAL, format!("NUL in {what}")))?;
    Ok(LENT.with(|slot| {
        *slot.borrow_mut() = c;
        slot.borrow().as_ptr()
    }))
}

/// A path's bytes, for [`lend`].
pub(crate) fn path_bytes(p: std::path::PathBuf) -> Vec<u8> {
    p.into_os_string().into_encoded_bytes()
}

unsafe extern "C" fn export_description<P: Plugin>(h: *mut c_void) -> *const c_char {
    guard(std::ptr::null(), || {
        // SAFETY: the server passes a live handle from `open`.
        lend(
            unsafe { handle::<P>(h) }.export_description(),
            "description",
        )
    })
}

unsafe extern "C" fn local_file<P: Plugin>(h: *mut c_void) -> *const c_char {
    guard(std::ptr::null(), || {
        // SAFETY: the server passes a live handle from `open`.
        let path = unsafe { handle::<P>(h) }.local_file().map(path_bytes);
        lend(path, "local file")
    })
}

pub(crate) fn flags(f: u32) -> Flags {
    Flags::from_bits_truncate(f)
}

pub(crate) fn len(count: u64) -> Result<usize> {
    usize::try_from(count).map_err(|_| Error::new(libc::EOVERFLOW, "request too large"))
}

unsafe extern "C" fn pread<P: Plugin>(
    h: *mut c_void,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    f: u32,
) -> c_int {
    guard(-1, || {
        // SAFETY: the server passes a writable buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len(count)?) };
        // SAFETY: the server passes a live handle from `open`.
        ok(unsafe { handle::<P>(h) }.pread(buf, offset, flags(f)))
    })
}

unsafe extern "C" fn pwrite<P: Plugin>(
    h: *mut c_void,
    buf: *const c_void,
    count: u64,
    offset: u64,
    f: u32,
) -> c_int {
    guard(-1, || {
        // SAFETY: the server passes a readable buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len(count)?) };
        // SAFETY: the server passes a live handle from `open`.
        ok(unsafe { handle::<P>(h) }.pwrite(buf, offset, flags(f)))
    })
}

unsafe extern "C" fn flush<P: Plugin>(h: *mut c_void, f: u32) -> c_int {
    // SAFETY: the server passes a live handle from `open`.
    guard(-1, || ok(unsafe { handle::<P>(h) }.flush(flags(f))))
}

macro_rules! range_fn {
    ($name:ident) => {
        unsafe extern "C" fn $name<P: Plugin>(
            h: *mut c_void,
            count: u64,
            offset: u64,
            f: u32,
        ) -> c_int {
            // SAFETY: the server passes a live handle from `open`.
            guard(-1, || {
                ok(unsafe { handle::<P>(h) }.$name(count, offset, flags(f)))
            })
        }
    };
}

range_fn!(trim);
range_fn!(zero);
range_fn!(cache);

unsafe extern "C" fn extents<P: Plugin>(
    h: *mut c_void,
    count: u64,
    offset: u64,
    f: u32,
    list: *mut abi::Extents,
) -> c_int {
    guard(-1, || {
        let mut list = ExtentList::from_raw(list);
        // SAFETY: the server passes a live handle from `open`.
        ok(unsafe { handle::<P>(h) }.extents(count, offset, flags(f), &mut list))
    })
}

unsafe extern "C" fn async_pread<P: Plugin>(
    h: *mut c_void,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    f: u32,
    req: *mut abi::Request,
) {
    starting(|| {
        let req = ReadRequest::new(buf, count as usize, offset, flags(f), req);
        // SAFETY: the server passes a live handle from `open`, and a
        // writable buffer of `count` bytes until the request completes.
        unsafe { handle::<P>(h) }.async_pread(req)
    })
}

unsafe extern "C" fn async_pwrite<P: Plugin>(
    h: *mut c_void,
    buf: *const c_void,
    count: u64,
    offset: u64,
    f: u32,
    req: *mut abi::Request,
) {
    starting(|| {
        let req = WriteRequest::new(buf, count as usize, offset, flags(f), req);
        // SAFETY: as for async_pread, with a readable buffer.
        unsafe { handle::<P>(h) }.async_pwrite(req)
    })
}

unsafe extern "C" fn async_flush<P: Plugin>(h: *mut c_void, f: u32, req: *mut abi::Request) {
    starting(|| {
        let req = RangeRequest::new(0, 0, flags(f), req);
        // SAFETY: the server passes a live handle from `open`.
        unsafe { handle::<P>(h) }.async_flush(req)
    })
}

macro_rules! async_range_fn {
    ($name:ident) => {
        unsafe extern "C" fn $name<P: Plugin>(
            h: *mut c_void,
            count: u64,
            offset: u64,
            f: u32,
            req: *mut abi::Request,
        ) {
            starting(|| {
                let req = RangeRequest::new(count, offset, flags(f), req);
                // SAFETY: the server passes a live handle from `open`.
                unsafe { handle::<P>(h) }.$name(req)
            })
        }
    };
}

async_range_fn!(async_trim);
async_range_fn!(async_zero);
async_range_fn!(async_cache);

unsafe extern "C" fn async_extents<P: Plugin>(
    h: *mut c_void,
    count: u64,
    offset: u64,
    f: u32,
    list: *mut abi::Extents,
    req: *mut abi::Request,
) {
    starting(|| {
        let req = ExtentsRequest::new(count, offset, flags(f), list, req);
        // SAFETY: the server passes a live handle from `open`, and a list
        // that lives until the request completes.
        unsafe { handle::<P>(h) }.async_extents(req)
    })
}

/// Build the plugin's C table; called by [`crate::nbdhost_plugin!`].
///
/// # Safety
/// `host` must point to a host table that outlives the plugin, and the
/// strings (`magic` may be null) to NUL-terminated statics of the plugin.
pub unsafe fn entry<P: Plugin>(
    host: *const abi::Host,
    strings: Strings,
    magic: *const c_char,
) -> *const abi::Plugin {
    host::install(host);
    quiet_panics();
    TABLE.get_or_init(|| abi::Plugin {
        struct_size: std::mem::size_of::<abi::Plugin>() as u64,
        abi_version: abi::ABI_VERSION,
        thread_model: P::THREAD_MODEL as u32,
        name: strings.name,
        version: strings.version,
        description: strings.description,
        config_help: strings.config_help,
        magic_config_key: magic,
        load: Some(load::<P>),
        unload: Some(unload::<P>),
        config: defined!(P, P, config),
        config_complete: defined!(P, P, config_complete),
        get_ready: defined!(P, P, get_ready),
        preconnect: defined!(P, P, preconnect),
        list_exports: defined!(P, P, list_exports),
        default_export: defined!(P, P, default_export),
        open: Some(open::<P>),
        close: Some(close::<P>),
        get_size: Some(get_size::<P>),
        block_size: defined!(P, P::Handle, block_size),
        can_write: defined!(P, P::Handle, can_write),
        can_flush: defined!(P, P::Handle, can_flush),
        can_trim: defined!(P, P::Handle, can_trim),
        can_zero: defined!(P, P::Handle, can_zero),
        can_fast_zero: defined!(P, P::Handle, can_fast_zero),
        can_fua: defined!(P, P::Handle, can_fua),
        can_multi_conn: defined!(P, P::Handle, can_multi_conn),
        can_cache: defined!(P, P::Handle, can_cache),
        can_extents: defined!(P, P::Handle, can_extents),
        is_rotational: defined!(P, P::Handle, is_rotational),
        export_description: defined!(P, P::Handle, export_description),
        pread: Some(pread::<P>),
        pwrite: defined!(P, P::Handle, pwrite),
        flush: defined!(P, P::Handle, flush),
        trim: defined!(P, P::Handle, trim),
        zero: defined!(P, P::Handle, zero),
        extents: defined!(P, P::Handle, extents),
        cache: defined!(P, P::Handle, cache),
        capabilities: (P::CALLBACKS.has("nonblocking") || P::CALLBACKS.has("asynchronous"))
            .then_some(capabilities::<P> as _),
        configured_thread_model: None,
        after_fork: defined!(P, P, after_fork),
        dump_plugin: defined!(P, P, dump_plugin),
        local_file: defined!(P, P::Handle, local_file),
        async_pread: defined!(P, P::Handle, async_pread),
        async_pwrite: defined!(P, P::Handle, async_pwrite),
        async_flush: defined!(P, P::Handle, async_flush),
        async_trim: defined!(P, P::Handle, async_trim),
        async_zero: defined!(P, P::Handle, async_zero),
        async_cache: defined!(P, P::Handle, async_cache),
        async_extents: defined!(P, P::Handle, async_extents),
    })
}
