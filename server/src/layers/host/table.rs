//! Host services: the function-pointer table handed to every plugin, and
//! the per-thread state those services read (the connection a call is made
//! for, the error the plugin recorded, the layer being called).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use nbdhost_plugin_api::{abi, Error};
use zeroize::Zeroize;

use super::exports::ExportCollector;
use super::extents::ExtentCollector;

/// The peer of a connection, as plugins may ask for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Inet(std::net::SocketAddr),
    /// A Unix-socket client, with its credentials where the kernel gave
    /// them.
    Unix(Option<Credentials>),
    /// An AF_VSOCK client: its context id and port.
    Vsock {
        cid: u32,
        port: u32,
    },
    Pipe,
}

/// A Unix-socket peer's process, user and group, as `SO_PEERCRED` reports
/// them at connection time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub pid: i64,
    pub uid: i64,
    pub gid: i64,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Inet(a) => write!(f, "{a}"),
            Peer::Unix(Some(c)) => write!(f, "a Unix-socket client (pid {})", c.pid),
            Peer::Unix(None) => f.write_str("a Unix-socket client"),
            Peer::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Peer::Pipe => f.write_str("the stdin client"),
        }
    }
}

/// What a plugin may ask about the connection a call is made for.
#[derive(Debug, Default)]
pub struct ConnContext {
    /// The connection's number, as the log gives it (from 1).
    pub id: u64,
    pub export_name: CString,
    pub peer: Option<Peer>,
    pub is_tls: bool,
    /// PSK user name or certificate subject DN, on a TLS connection.
    pub identity: Option<CString>,
    /// A verified client certificate's subject and issuer DNs.
    pub certificate: Option<(CString, CString)>,
    /// What a layer asked with `host->disconnect`: [`DISCONNECT_GRACEFUL`]
    /// or [`DISCONNECT_FORCE`], 0 for nothing.
    pub disconnect: AtomicU8,
}

/// A layer asked to close its connection after the running requests.
pub const DISCONNECT_GRACEFUL: u8 = 1;
/// A layer asked to close its connection at once.
pub const DISCONNECT_FORCE: u8 = 2;

impl ConnContext {
    /// The same connection under another export name.
    fn renamed(&self, name: &str) -> ConnContext {
        ConnContext {
            id: self.id,
            export_name: CString::new(name).unwrap_or_default(),
            peer: self.peer,
            is_tls: self.is_tls,
            identity: self.identity.clone(),
            certificate: self.certificate.clone(),
            disconnect: AtomicU8::new(0),
        }
    }
}

thread_local! {
    static CONTEXT: Cell<*const ConnContext> = const { Cell::new(std::ptr::null()) };
    static LAST_ERROR: RefCell<Option<Error>> = const { RefCell::new(None) };
    static LAYER: Cell<&'static str> = const { Cell::new("nbdhost") };
}

/// One `-D layer.flag=N` setting.
struct DebugFlag {
    layer: String,
    flag: CString,
    value: i32,
}

static DEBUG_FLAGS: OnceLock<Vec<DebugFlag>> = OnceLock::new();

/// Set the `-D layer.flag=N` values; called once at start-up.
pub fn set_debug_flags(flags: BTreeMap<String, i32>) {
    let flags = flags
        .into_iter()
        .filter_map(|(k, value)| {
            let (layer, flag) = k.split_once('.')?;
            Some(DebugFlag {
                layer: layer.to_owned(),
                flag: CString::new(flag).ok()?,
                value,
            })
        })
        .collect();
    let _ = DEBUG_FLAGS.set(flags);
}

/// The debug flags set for the layer being called, in name order.
fn layer_debug_flags() -> impl Iterator<Item = &'static DebugFlag> {
    let layer = LAYER.with(|l| l.get());
    DEBUG_FLAGS
        .get()
        .into_iter()
        .flatten()
        .filter(move |f| f.layer == layer)
}

/// Whether layers may use stdin and stdout: not when they carry the NBD
/// connection.
static STDIO_SAFE: AtomicBool = AtomicBool::new(true);

/// Say whether stdin and stdout are the NBD connection (`-s`).
pub fn set_stdio_safe(safe: bool) {
    STDIO_SAFE.store(safe, Ordering::Relaxed);
}

/// What `host->shutdown` does: set by the runtime once it serves.
static SHUTDOWN_REQUEST: Mutex<Option<Box<dyn Fn() + Send>>> = Mutex::new(None);

/// `host->shutdown` was called before the runtime was there to hear it
/// (from `get_ready` or `after_fork`, say).
static SHUTDOWN_EARLY: AtomicBool = AtomicBool::new(false);

/// Make `host->shutdown` call `f` (`None`: remember the request, as
/// before serving). A request made before `f` was set calls it at once.
pub fn on_shutdown_request(f: Option<Box<dyn Fn() + Send>>) {
    let mut slot = SHUTDOWN_REQUEST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = &f {
        if SHUTDOWN_EARLY.swap(false, Ordering::Relaxed) {
            f();
        }
    }
    *slot = f;
}

/// Sets a thread-local cell for the life of a call and puts the previous
/// value back when dropped, on every exit: a panic unwinding out of the
/// call (caught further up, as a filter's `next` calls catch them) must
/// not leave the cell pointing into the call's dead stack.
struct Restore<T: Copy + 'static> {
    key: &'static LocalKey<Cell<T>>,
    prev: T,
}

impl<T: Copy + 'static> Restore<T> {
    fn set(key: &'static LocalKey<Cell<T>>, value: T) -> Restore<T> {
        Restore {
            key,
            prev: key.with(|c| c.replace(value)),
        }
    }
}

impl<T: Copy + 'static> Drop for Restore<T> {
    fn drop(&mut self) {
        // (`try_with`: a thread being torn down has nothing to restore.)
        let _ = self.key.try_with(|c| c.set(self.prev));
    }
}

/// Run `f` on behalf of a connection, so that `export_name` and
/// `peer_name` answer for it.
pub fn with_context<T>(ctx: &ConnContext, f: impl FnOnce() -> T) -> T {
    let _restore = Restore::set(&CONTEXT, ctx);
    f()
}

/// Run `f` for the current connection but under another export name, as
/// a filter opening the next layer may ask.
pub fn with_export_name<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let cur = CONTEXT.with(|c| c.get());
    // SAFETY: CONTEXT is only non-null inside `with_context`, whose guard
    // takes it out again on every exit.
    let ctx = match unsafe { cur.as_ref() } {
        Some(c) => c.renamed(name),
        None => ConnContext {
            export_name: CString::new(name).unwrap_or_default(),
            ..Default::default()
        },
    };
    with_context(&ctx, f)
}

/// `f` of the connection the current call is made for, if any. Pointers
/// into the context that `f` returns stay valid for the rest of the call:
/// the context outlives every call made within `with_context`, and
/// [`Restore`] takes it out of the thread however that call ends.
fn current<R>(f: impl FnOnce(&ConnContext) -> R) -> Option<R> {
    let cur = CONTEXT.with(|c| c.get());
    // SAFETY: CONTEXT is only non-null inside `with_context`, whose borrow
    // outlives every call made within it and whose guard takes it out
    // again on every exit, panics included.
    unsafe { cur.as_ref() }.map(f)
}

/// The export name of the current connection ("" outside one).
pub fn export_name() -> CString {
    current(|c| c.export_name.clone()).unwrap_or_default()
}

/// Set once the server starts shutting down; wakes `host->nanosleep`.
static SHUTDOWN: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// The server is shutting down: cut short every sleep in a plugin or
/// filter, and any started later.
pub fn begin_shutdown() {
    *SHUTDOWN.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    SHUTDOWN.1.notify_all();
}

/// Names of the layers loaded, kept for the life of the process: the
/// per-thread record of the layer being called holds them as `&'static`.
static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// A layer's name with a `'static` lifetime, each name stored once.
pub fn intern(name: &str) -> &'static str {
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let n: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(n);
    n
}

/// Record `e` as the current call's error, as `host->error` does.
pub fn record(e: Error) {
    LAST_ERROR.with(|l| *l.borrow_mut() = Some(e));
}

/// Run `f` as a call into `layer`, collecting the error it records.
pub fn call_layer<T>(layer: &'static str, f: impl FnOnce() -> T) -> T {
    let _restore = Restore::set(&LAYER, layer);
    LAST_ERROR.with(|e| e.borrow_mut().take());
    f()
}

/// The error the current callback recorded, or a generic `EIO`.
pub fn take_error(what: &str) -> Error {
    LAST_ERROR
        .with(|e| e.borrow_mut().take())
        .unwrap_or_else(|| Error::new(libc::EIO, format!("{what} failed")))
}

/// Parse a size: a number with an optional binary suffix (`K`, `M`, `G`,
/// `T`, `P`, `E`, optionally followed by `iB` or `B`), or `s` for 512-byte
/// sectors. Fractions are allowed with a suffix (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let suffix = suffix.trim_end_matches("iB").trim_end_matches('B');
    let shift = match suffix {
        "" | "b" => 0,
        "s" | "S" => 9,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(format!("could not parse size '{s}': unknown suffix")),
    };
    let bad = || format!("could not parse size '{s}'");
    let value = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * (1u64 << shift) as f64;
        if !(0.0..9.223372036854776e18).contains(&v) {
            return Err(format!("size '{s}' is too large"));
        }
        v as u64
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_shl(shift)
            .filter(|v| v >> shift == n)
            .ok_or_else(|| format!("size '{s}' is too large"))?
    };
    if value > i64::MAX as u64 {
        return Err(format!("size '{s}' is too large"));
    }
    Ok(value)
}

/// Where a secret given as a parameter comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource<'a> {
    /// The value itself.
    Literal(&'a str),
    /// `+FILE`.
    File(&'a str),
    /// `-FD`: an open descriptor, above stderr.
    Fd(i32),
    /// `-`: ask at the terminal.
    Prompt,
}

impl<'a> SecretSource<'a> {
    /// Tell which form `value` has, without reading anything.
    pub fn parse(value: &'a str) -> Result<SecretSource<'a>, String> {
        if value == "-" {
            return Ok(SecretSource::Prompt);
        }
        if let Some(path) = value.strip_prefix('+') {
            return Ok(SecretSource::File(path));
        }
        if let Some(fd) = value.strip_prefix('-') {
            let fd: i32 = fd
                .parse()
                .map_err(|_| "secret '-FD' needs a file descriptor number".to_string())?;
            if fd <= 2 {
                return Err("secret '-FD' cannot use stdin, stdout or stderr".into());
            }
            return Ok(SecretSource::Fd(fd));
        }
        Ok(SecretSource::Literal(value))
    }
}

/// Read a secret: a literal, `+FILE`, `-FD`, or `-` to prompt. A single
/// trailing newline of a file or descriptor is dropped, as nbdkit does.
pub fn read_secret(value: &str) -> Result<Vec<u8>, String> {
    let mut data = match SecretSource::parse(value)? {
        SecretSource::Literal(v) => return Ok(v.as_bytes().to_vec()),
        SecretSource::Prompt => rpassword::prompt_password("Password: ")
            .map_err(|e| format!("cannot read password from the terminal: {e}"))?
            .into_bytes(),
        SecretSource::File(path) => {
            std::fs::read(path).map_err(|e| format!("cannot read secret from {path}: {e}"))?
        }
        SecretSource::Fd(fd) => {
            // SAFETY: the user named this descriptor on the command line for
            // us to read; we own it from here on and close it when done.
            let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut v = Vec::new();
            f.read_to_end(&mut v)
                .map_err(|e| format!("cannot read secret from fd {fd}: {e}"))?;
            v
        }
    };
    if data.last() == Some(&b'\n') {
        data.pop();
    }
    Ok(data)
}

fn cstr<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: plugins pass NUL-terminated strings valid for the call.
    Some(
        unsafe { CStr::from_ptr(p) }
            .to_str()
            .unwrap_or("<invalid UTF-8>"),
    )
}

unsafe extern "C" fn host_error(errnum: c_int, msg: *const c_char) {
    let errnum = if errnum == 0 { libc::EIO } else { errnum };
    let err = match cstr(msg) {
        Some(m) => Error::new(errnum, m),
        None => Error::errno(errnum),
    };
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(err));
}

unsafe extern "C" fn host_debug(msg: *const c_char) {
    if let Some(m) = cstr(msg) {
        let layer = LAYER.with(|l| l.get());
        log::debug!("{layer}: {m}");
    }
}

unsafe extern "C" fn host_add_extent(
    list: *mut abi::Extents,
    offset: u64,
    length: u64,
    typ: u32,
) -> c_int {
    // SAFETY: the only extent lists handed to plugins are `ExtentCollector`s
    // that live for the duration of the extents call.
    let list = unsafe { &mut *list.cast::<ExtentCollector>() };
    match list.add(offset, length, typ) {
        Ok(()) => 0,
        Err(e) => {
            LAST_ERROR.with(|l| *l.borrow_mut() = Some(e));
            -1
        }
    }
}

unsafe extern "C" fn host_add_export(
    list: *mut abi::Exports,
    name: *const c_char,
    desc: *const c_char,
) -> c_int {
    let Some(text) = cstr(name) else {
        LAST_ERROR
            .with(|l| *l.borrow_mut() = Some(Error::new(libc::EINVAL, "export name is NULL")));
        return -1;
    };
    if text.len() > 4096 {
        LAST_ERROR
            .with(|l| *l.borrow_mut() = Some(Error::new(libc::EINVAL, "export name too long")));
        return -1;
    }
    // SAFETY: every export list handed to a layer is an `ExportCollector`
    // that lives for the duration of the call (or until exports_free).
    let list = unsafe { &mut *list.cast::<ExportCollector>() };
    // SAFETY: `name` was just read as a NUL-terminated string; `desc` is
    // one too, or null.
    let (name, desc) = unsafe {
        (
            CStr::from_ptr(name),
            desc.as_ref().map(|d| CStr::from_ptr(d)),
        )
    };
    list.add(name, desc);
    0
}

unsafe extern "C" fn host_exports_new() -> *mut abi::Exports {
    Box::into_raw(Box::<ExportCollector>::default()).cast()
}

unsafe extern "C" fn host_exports_free(list: *mut abi::Exports) {
    if !list.is_null() {
        // SAFETY: lists given to filters by exports_new are boxed
        // collectors, freed once here.
        drop(unsafe { Box::from_raw(list.cast::<ExportCollector>()) });
    }
}

unsafe extern "C" fn host_exports_count(list: *const abi::Exports) -> usize {
    // SAFETY: every export list handed out is an `ExportCollector`.
    unsafe { list.cast::<ExportCollector>().as_ref() }.map_or(0, ExportCollector::len)
}

unsafe extern "C" fn host_exports_get(
    list: *const abi::Exports,
    i: usize,
    name: *mut *const c_char,
    description: *mut *const c_char,
) -> c_int {
    // SAFETY: every export list handed out is an `ExportCollector`.
    let found = unsafe { list.cast::<ExportCollector>().as_ref() }.and_then(|l| l.get(i));
    let Some((n, d)) = found else {
        record(Error::new(
            libc::EINVAL,
            format!("no export {i} in the list"),
        ));
        return -1;
    };
    // SAFETY: the filter passes two writable places.
    unsafe {
        *name = n.as_ptr();
        *description = d.map_or(std::ptr::null(), CStr::as_ptr);
    }
    0
}

unsafe extern "C" fn host_parse_size(s: *const c_char) -> i64 {
    let Some(s) = cstr(s) else { return -1 };
    match parse_size(s) {
        Ok(v) => v as i64,
        Err(e) => {
            LAST_ERROR.with(|l| *l.borrow_mut() = Some(Error::new(libc::EINVAL, e)));
            -1
        }
    }
}

unsafe extern "C" fn host_read_secret(value: *const c_char, out: *mut *mut c_char) -> c_int {
    let Some(v) = cstr(value) else { return -1 };
    match read_secret(v) {
        Ok(mut data) => {
            if data.contains(&0) {
                data.zeroize();
                LAST_ERROR.with(|l| {
                    *l.borrow_mut() = Some(Error::new(libc::EINVAL, "secret contains a NUL byte"))
                });
                return -1;
            }
            // SAFETY: plain allocation; checked for null below.
            let p = unsafe { libc::malloc(data.len() + 1) }.cast::<u8>();
            if p.is_null() {
                data.zeroize();
                return -1;
            }
            // SAFETY: `p` has room for the data and the terminating NUL, and
            // `out` is the plugin's place for the result.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len());
                *p.add(data.len()) = 0;
                *out = p.cast();
            }
            data.zeroize();
            0
        }
        Err(e) => {
            LAST_ERROR.with(|l| *l.borrow_mut() = Some(Error::new(libc::EINVAL, e)));
            -1
        }
    }
}

unsafe extern "C" fn host_free_secret(secret: *mut c_char) {
    if secret.is_null() {
        return;
    }
    // SAFETY: `secret` came from host_read_secret: a malloc'd NUL-terminated
    // buffer that we wipe and free exactly once.
    unsafe {
        let len = libc::strlen(secret);
        std::slice::from_raw_parts_mut(secret.cast::<u8>(), len).zeroize();
        libc::free(secret.cast());
    }
}

unsafe extern "C" fn host_peer_name(addr: *mut libc::sockaddr, len: *mut libc::socklen_t) -> c_int {
    let Some(peer) = current(|c| c.peer) else {
        return -1;
    };
    let sa = match peer {
        Some(Peer::Inet(a)) => socket2::SockAddr::from(a),
        Some(Peer::Unix(_)) => match socket2::SockAddr::unix("") {
            Ok(a) => a,
            Err(_) => return -1,
        },
        Some(Peer::Vsock { cid, port }) => socket2::SockAddr::vsock(cid, port),
        _ => return -1,
    };
    if addr.is_null() || len.is_null() {
        return -1;
    }
    // SAFETY: the plugin passes a buffer of *len bytes, as getpeername does;
    // we copy at most that many bytes and report the full length.
    unsafe {
        let n = (*len as usize).min(sa.len() as usize);
        std::ptr::copy_nonoverlapping(sa.as_ptr().cast::<u8>(), addr.cast::<u8>(), n);
        *len = sa.len();
    }
    0
}

unsafe extern "C" fn host_export_name() -> *const c_char {
    current(|c| c.export_name.as_ptr()).unwrap_or(std::ptr::null())
}

unsafe extern "C" fn host_debug_flag(name: *const c_char) -> c_int {
    let Some(name) = cstr(name) else { return 0 };
    layer_debug_flags()
        .find(|f| f.flag.to_bytes() == name.as_bytes())
        .map_or(0, |f| f.value)
}

unsafe extern "C" fn host_debug_flag_name(i: usize) -> *const c_char {
    layer_debug_flags()
        .nth(i)
        .map_or(std::ptr::null(), |f| f.flag.as_ptr())
}

unsafe extern "C" fn host_extents_new(offset: u64) -> *mut abi::Extents {
    Box::into_raw(Box::new(ExtentCollector::new(offset))).cast()
}

unsafe extern "C" fn host_extents_free(list: *mut abi::Extents) {
    if !list.is_null() {
        // SAFETY: lists given to filters by extents_new are boxed
        // collectors, freed once here.
        drop(unsafe { Box::from_raw(list.cast::<ExtentCollector>()) });
    }
}

unsafe extern "C" fn host_extents_count(list: *const abi::Extents) -> usize {
    // SAFETY: every extent list handed out is an `ExtentCollector`.
    unsafe { list.cast::<ExtentCollector>().as_ref() }.map_or(0, |l| l.extents().len())
}

unsafe extern "C" fn host_extents_get(
    list: *const abi::Extents,
    i: usize,
    offset: *mut u64,
    length: *mut u64,
    typ: *mut u32,
) -> c_int {
    // SAFETY: every extent list handed out is an `ExtentCollector`.
    let Some(l) = (unsafe { list.cast::<ExtentCollector>().as_ref() }) else {
        return -1;
    };
    let Some(e) = l.extents().get(i) else {
        return -1;
    };
    // SAFETY: the filter passes three writable places.
    unsafe {
        *offset = e.offset;
        *length = e.length;
        *typ = e.flags;
    }
    0
}

unsafe extern "C" fn host_last_errno() -> c_int {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(0, |e| e.raw_errno()))
}

unsafe extern "C" fn host_is_tls() -> c_int {
    current(|c| c_int::from(c.is_tls)).unwrap_or(0)
}

unsafe extern "C" fn host_nanosleep(sec: u64, nsec: u64) -> c_int {
    // Saturating: no input may panic here, across the C boundary.
    let until = Duration::from_secs(sec)
        .checked_add(Duration::from_nanos(nsec))
        .and_then(|d| Instant::now().checked_add(d))
        // Far enough: a sleep this long ends at shutdown anyway.
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(u32::MAX.into()));
    let mut down = SHUTDOWN.0.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if *down {
            record(Error::new(libc::ESHUTDOWN, "interrupted by shutdown"));
            return -1;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return 0;
        }
        down = SHUTDOWN
            .1
            .wait_timeout(down, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

unsafe extern "C" fn host_peer_identity() -> *const c_char {
    current(|c| c.identity.as_ref().map(|i| i.as_ptr()))
        .flatten()
        .unwrap_or(std::ptr::null())
}

unsafe extern "C" fn host_log(level: c_int, msg: *const c_char) {
    let Some(m) = cstr(msg) else { return };
    let layer = LAYER.with(|l| l.get());
    let level = match level {
        abi::LOG_ERROR => log::Level::Error,
        abi::LOG_WARNING => log::Level::Warn,
        abi::LOG_INFO => log::Level::Info,
        _ => log::Level::Debug,
    };
    log::log!(level, "{layer}: {m}");
}

unsafe extern "C" fn host_peer_credentials(pid: *mut i64, uid: *mut i64, gid: *mut i64) -> c_int {
    let creds = match current(|c| c.peer).flatten() {
        Some(Peer::Unix(Some(c))) => c,
        Some(Peer::Unix(None)) => {
            record(Error::new(
                libc::ENOTSUP,
                "the peer's credentials are unknown",
            ));
            return -1;
        }
        Some(_) => {
            record(Error::new(
                libc::ENOTSUP,
                "peer credentials exist only for Unix-socket clients",
            ));
            return -1;
        }
        None => {
            record(Error::new(libc::EINVAL, "no connection in this call"));
            return -1;
        }
    };
    // SAFETY: the layer passes three writable places (or null ones it does
    // not want).
    unsafe {
        for (p, v) in [(pid, creds.pid), (uid, creds.uid), (gid, creds.gid)] {
            if let Some(p) = p.as_mut() {
                *p = v;
            }
        }
    }
    0
}

unsafe extern "C" fn host_peer_tls_dn() -> *const c_char {
    current(|c| c.certificate.as_ref().map(|(subject, _)| subject.as_ptr()))
        .flatten()
        .unwrap_or(std::ptr::null())
}

unsafe extern "C" fn host_peer_tls_issuer_dn() -> *const c_char {
    current(|c| c.certificate.as_ref().map(|(_, issuer)| issuer.as_ptr()))
        .flatten()
        .unwrap_or(std::ptr::null())
}

unsafe extern "C" fn host_shutdown() {
    let layer = LAYER.with(|l| l.get());
    log::info!("{layer} asked the server to shut down");
    match SHUTDOWN_REQUEST
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        Some(f) => f(),
        None => SHUTDOWN_EARLY.store(true, Ordering::Relaxed),
    }
}

unsafe extern "C" fn host_disconnect(force: c_int) {
    let how = if force != 0 {
        DISCONNECT_FORCE
    } else {
        DISCONNECT_GRACEFUL
    };
    current(|c| c.disconnect.fetch_max(how, Ordering::Relaxed));
}

unsafe extern "C" fn host_connection_id() -> u64 {
    current(|c| c.id).unwrap_or(0)
}

unsafe extern "C" fn host_stdio_safe() -> c_int {
    c_int::from(STDIO_SAFE.load(Ordering::Relaxed))
}

/// The table every plugin receives.
pub static HOST: abi::Host = abi::Host {
    struct_size: std::mem::size_of::<abi::Host>() as u64,
    abi_version: abi::ABI_VERSION,
    reserved: 0,
    error: Some(host_error),
    debug: Some(host_debug),
    add_extent: Some(host_add_extent),
    add_export: Some(host_add_export),
    parse_size: Some(host_parse_size),
    read_secret: Some(host_read_secret),
    free_secret: Some(host_free_secret),
    peer_name: Some(host_peer_name),
    export_name: Some(host_export_name),
    debug_flag: Some(host_debug_flag),
    extents_new: Some(host_extents_new),
    extents_free: Some(host_extents_free),
    extents_count: Some(host_extents_count),
    extents_get: Some(host_extents_get),
    last_errno: Some(host_last_errno),
    is_tls: Some(host_is_tls),
    peer_identity: Some(host_peer_identity),
    nanosleep: Some(host_nanosleep),
    log: Some(host_log),
    debug_flag_name: Some(host_debug_flag_name),
    peer_credentials: Some(host_peer_credentials),
    peer_tls_dn: Some(host_peer_tls_dn),
    peer_tls_issuer_dn: Some(host_peer_tls_issuer_dn),
    shutdown: Some(host_shutdown),
    disconnect: Some(host_disconnect),
    stdio_safe: Some(host_stdio_safe),
    connection_id: Some(host_connection_id),
    exports_new: Some(host_exports_new),
    exports_free: Some(host_exports_free),
    exports_count: Some(host_exports_count),
    exports_get: Some(host_exports_get),
};

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for both cases: shutdown is process-wide and for good.
    #[test]
    fn nanosleep_sleeps_until_shutdown_cuts_it_short() {
        let t = Instant::now();
        // SAFETY: a plain call with two integers.
        assert_eq!(unsafe { host_nanosleep(0, 20_000_000) }, 0);
        assert!(t.elapsed() >= Duration::from_millis(20));
        // SAFETY: as above; the largest request must not overflow.
        let forever = std::thread::spawn(|| unsafe { host_nanosleep(u64::MAX, u64::MAX) });
        std::thread::sleep(Duration::from_millis(50));
        begin_shutdown();
        assert_eq!(forever.join().unwrap(), -1);
        // SAFETY: as above.
        assert_eq!(
            unsafe { host_nanosleep(1, 0) },
            -1,
            "sleeps after shutdown end at once"
        );
    }

    /// A filter's `next->open` runs the layer below under the name the
    /// filter asked for (`with_export_name`), inside `below`'s
    /// `catch_unwind`: a panic down there must leave this thread's
    /// connection, and the layer being called, as they were.
    #[test]
    fn a_panic_below_a_renamed_open_leaves_the_thread_context_as_it_was() {
        let outer = ConnContext {
            export_name: CString::new("outer").unwrap(),
            ..Default::default()
        };
        with_context(&outer, || {
            call_layer("filter", || {
                let unwound = std::panic::catch_unwind(|| {
                    with_export_name("inner", || call_layer("plugin", || panic!("below")))
                });
                assert!(unwound.is_err());
                assert_eq!(export_name().to_bytes(), b"outer");
                assert_eq!(LAYER.with(|l| l.get()), "filter");
            });
        });
        assert_eq!(export_name().to_bytes(), b"");
        assert_eq!(LAYER.with(|l| l.get()), "nbdhost");
    }

    #[test]
    fn sizes_parse_like_nbdkit() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("2s"), Ok(1024));
        assert!(parse_size("8E").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn secret_forms_are_told_apart_without_reading() {
        assert_eq!(SecretSource::parse("pw"), Ok(SecretSource::Literal("pw")));
        assert_eq!(SecretSource::parse("+/k"), Ok(SecretSource::File("/k")));
        assert_eq!(SecretSource::parse("-7"), Ok(SecretSource::Fd(7)));
        assert_eq!(SecretSource::parse("-"), Ok(SecretSource::Prompt));
        assert!(SecretSource::parse("-2").is_err());
        assert!(SecretSource::parse("-x").is_err());
    }

    #[test]
    fn literal_and_file_secrets() {
        assert_eq!(read_secret("abc").unwrap(), b"abc");
        let p = std::env::temp_dir().join(format!("nbdhost-secret-{}", std::process::id()));
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(
            read_secret(&format!("+{}", p.display())).unwrap(),
            b"s3cret"
        );
        std::fs::remove_file(&p).unwrap();
        let e = read_secret("+/nonexistent/x").unwrap_err();
        assert!(e.contains("/nonexistent/x"));
    }
}
