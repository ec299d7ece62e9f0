//! Safe wrappers over the host-service table the server hands the plugin.

use std::ffi::{c_char, CStr, CString};
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::abi;
use crate::{Error, Result};

/// One export as a layer lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// The name a client opens it by.
    pub name: String,
    /// What `nbdinfo --list` shows beside the name.
    pub description: Option<String>,
}

static HOST: AtomicPtr<abi::Host> = AtomicPtr::new(std::ptr::null_mut());

pub(crate) fn install(host: *const abi::Host) {
    HOST.store(host.cast_mut(), Ordering::Release);
}

fn table() -> Option<&'static abi::Host> {
    let p = HOST.load(Ordering::Acquire);
    // SAFETY: the pointer was handed to the entry point by the server, which
    // keeps the table alive until the plugin is unloaded; null before that.
    unsafe { p.as_ref() }
}

/// Whether the server's table is long enough to contain the field that
/// ends at `end` bytes, so newer services are only called on newer hosts.
fn has(host: &abi::Host, end: usize) -> bool {
    host.struct_size as usize >= end
}

macro_rules! service {
    ($field:ident) => {
        table().and_then(|h| {
            let end = std::mem::offset_of!(abi::Host, $field) + std::mem::size_of::<usize>();
            if has(h, end) {
                h.$field
            } else {
                None
            }
        })
    };
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).expect("NUL bytes were replaced")
}

/// Record an error for the current callback, with a message for the log.
pub(crate) fn report(err: &Error) {
    if err.is_propagated() {
        return;
    }
    if let Some(f) = service!(error) {
        let msg = err.message().map(cstring);
        let ptr = msg.as_ref().map_or(std::ptr::null(), |m| m.as_ptr());
        // SAFETY: `ptr` is null or a valid C string that outlives the call.
        unsafe { f(err.raw_errno(), ptr) }
    }
}

/// Log a debug message through the server (shown with `-v`).
pub fn debug(msg: &str) {
    if let Some(f) = service!(debug) {
        let m = cstring(msg);
        // SAFETY: `m` is a valid C string for the duration of the call.
        unsafe { f(m.as_ptr()) }
    }
}

/// How much a log line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
}

/// Log a line through the server at `level`, without recording an error
/// (since ABI 1.5; older servers get it as a debug message).
pub fn log(level: LogLevel, msg: &str) {
    let m = cstring(msg);
    if let Some(f) = service!(log) {
        let level = match level {
            LogLevel::Error => abi::LOG_ERROR,
            LogLevel::Warning => abi::LOG_WARNING,
            LogLevel::Info => abi::LOG_INFO,
            LogLevel::Debug => abi::LOG_DEBUG,
        };
        // SAFETY: `m` is a valid C string for the duration of the call.
        unsafe { f(level, m.as_ptr()) }
    } else if let Some(f) = service!(debug) {
        // SAFETY: as above.
        unsafe { f(m.as_ptr()) }
    }
}

/// Parse a boolean parameter as nbdkit does (`1`/`true`/`yes`/`on`,
/// `0`/`false`/`no`/`off`, any case); the error names `key`. Done in the
/// SDK, not by the server: C plugins have their own `strcmp`.
pub fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "f" | "no" | "n" | "off" | "" => Ok(false),
        _ => Err(Error::new(
            libc::EINVAL,
            format!("{key}: could not parse '{value}' as a boolean"),
        )),
    }
}

/// Parse a size with the server's rules (`512`, `64K`, `1G`, `1.5T`).
pub fn parse_size(s: &str) -> Result<u64> {
    let f = service!(parse_size).ok_or_else(|| Error::new(libc::ENOSYS, "no host"))?;
    let c = cstring(s);
    // SAFETY: `c` is a valid C string for the duration of the call.
    let n = unsafe { f(c.as_ptr()) };
    u64::try_from(n).map_err(|_| Error::new(libc::EINVAL, format!("could not parse size '{s}'")))
}

/// A secret read by the server; wiped and freed when dropped.
pub struct Secret {
    ptr: *mut c_char,
}

// SAFETY: the secret is a heap buffer owned solely by this value.
unsafe impl Send for Secret {}
// SAFETY: only shared reads happen through `&Secret`.
unsafe impl Sync for Secret {}

impl Secret {
    /// The secret's bytes, without the terminating NUL.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is the NUL-terminated string read_secret returned
        // and stays valid until `drop`.
        unsafe { CStr::from_ptr(self.ptr) }.to_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        if let Some(free) = service!(free_secret) {
            // SAFETY: `ptr` came from read_secret and is freed exactly once.
            unsafe { free(self.ptr) }
        }
    }
}

/// Read a secret given on the command line: a literal, `+FILE`, `-FD`, or
/// `-` to prompt. The value never reaches a log.
pub fn read_secret(value: &str) -> Result<Secret> {
    let f = service!(read_secret).ok_or_else(|| Error::new(libc::ENOSYS, "no host"))?;
    let c = cstring(value);
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: `c` is valid for the call and `out` is a valid place to store
    // the result pointer.
    let r = unsafe { f(c.as_ptr(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(Error::errno(libc::EINVAL));
    }
    Ok(Secret { ptr: out })
}

/// The export name the current connection asked for.
pub fn export_name() -> Option<String> {
    let f = service!(export_name)?;
    // SAFETY: the host returns null or a C string valid for the connection.
    let p = unsafe { f() };
    // SAFETY: checked non-null; the host keeps it alive for the connection.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The peer address of the current connection, if it has one (a socket).
pub fn peer_name() -> Option<std::net::SocketAddr> {
    let f = service!(peer_name)?;
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` and `len` describe a writable buffer of that size.
    if unsafe { f((&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) } != 0 {
        return None;
    }
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(&ss as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some((ip, u16::from_be(sin.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(&ss as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some((ip, u16::from_be(sin6.sin6_port)).into())
        }
        _ => None,
    }
}

/// How the current connection's client reached the server, with what
/// the socket says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// TCP, from this address.
    Inet(std::net::SocketAddr),
    /// A Unix-domain socket (its peer address is always unnamed).
    Unix,
    /// AF_VSOCK, from this context ID and port.
    Vsock { cid: u32, port: u32 },
}

/// The current connection's peer, whatever its address family; `None`
/// outside a connection, for standard input (`-s`), or for a family the
/// SDK does not know. ([`peer_name`] answers only for IP peers.)
pub fn peer() -> Option<Peer> {
    let f = service!(peer_name)?;
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` and `len` describe a writable buffer of that size.
    if unsafe { f((&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) } != 0 {
        return None;
    }
    match ss.ss_family as i32 {
        libc::AF_UNIX => Some(Peer::Unix),
        libc::AF_VSOCK => {
            // SAFETY: the family says the storage holds a sockaddr_vm.
            let vm = unsafe { &*(&ss as *const _ as *const libc::sockaddr_vm) };
            Some(Peer::Vsock {
                cid: vm.svm_cid,
                port: vm.svm_port,
            })
        }
        _ => peer_name().map(Peer::Inet),
    }
}

/// A Unix-socket client's process, user and group, as the kernel gave
/// them when it connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub pid: i64,
    pub uid: i64,
    pub gid: i64,
}

/// The current connection's peer credentials; an error for a client that
/// is not on a Unix socket, or with a server older than ABI 1.5.
pub fn peer_credentials() -> Result<Credentials> {
    let f = service!(peer_credentials)
        .ok_or_else(|| Error::new(libc::ENOTSUP, "the server has no peer credentials"))?;
    let (mut pid, mut uid, mut gid) = (-1i64, -1i64, -1i64);
    // SAFETY: three writable places of the types the service fills.
    match unsafe { f(&mut pid, &mut uid, &mut gid) } {
        0 => Ok(Credentials { pid, uid, gid }),
        _ => Err(Error::from_next(last_errno())),
    }
}

fn owned(p: *const c_char) -> Option<String> {
    // SAFETY: the host returns null or a C string valid for the
    // connection; checked non-null first.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The subject DN of the client certificate the server verified
/// (`--tls-verify-peer`), or `None`.
pub fn peer_tls_dn() -> Option<String> {
    // SAFETY: a plain query of the current connection.
    owned(unsafe { service!(peer_tls_dn)?() })
}

/// The issuer DN of the client certificate the server verified, or
/// `None`.
pub fn peer_tls_issuer_dn() -> Option<String> {
    // SAFETY: a plain query of the current connection.
    owned(unsafe { service!(peer_tls_issuer_dn)?() })
}

/// The number of the connection the current call is made for (1, 2, ...
/// in the order the server accepted them, as its log numbers them), or
/// `None` outside a connection or with a server older than ABI 1.6.
pub fn connection_id() -> Option<u64> {
    // SAFETY: a plain query of the current connection.
    service!(connection_id)
        .map(|f| unsafe { f() })
        .filter(|&id| id != 0)
}

/// Whether the current connection is protected by TLS.
pub fn is_tls() -> bool {
    // SAFETY: a plain query of the current connection.
    service!(is_tls).is_some_and(|f| unsafe { f() } != 0)
}

/// The current connection's TLS identity: the PSK user name, or the
/// client certificate's subject DN.
pub fn peer_identity() -> Option<String> {
    let f = service!(peer_identity)?;
    // SAFETY: null or a C string valid for the connection.
    let p = unsafe { f() };
    // SAFETY: checked non-null.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Sleep for `d`, waking early with `ESHUTDOWN` when the server starts
/// shutting down, so a deliberate wait never holds up an exit. Against a
/// host older than ABI 1.3 this is a plain sleep.
pub fn sleep(d: std::time::Duration) -> Result<()> {
    let Some(f) = service!(nanosleep) else {
        std::thread::sleep(d);
        return Ok(());
    };
    // SAFETY: a plain call with two integers.
    match unsafe { f(d.as_secs(), u64::from(d.subsec_nanos())) } {
        0 => Ok(()),
        _ => Err(Error::errno(libc::ESHUTDOWN)),
    }
}

/// Ask the server to shut down, as a signal would: it stops accepting
/// clients and exits. Callable from any thread, a filter's own included
/// (since ABI 1.5; an older server ignores it).
pub fn shutdown() {
    if let Some(f) = service!(shutdown) {
        // SAFETY: a plain call without arguments.
        unsafe { f() }
    }
}

/// Ask the server to drop the current connection once the callback
/// returns: at once with `force`, otherwise after the requests in
/// flight are answered (since ABI 1.5; an older server ignores it).
pub fn disconnect(force: bool) {
    if let Some(f) = service!(disconnect) {
        // SAFETY: a plain call with an integer.
        unsafe { f(i32::from(force)) }
    }
}

/// The value of debug flag `name` (`-D plugin.name=N`), or 0.
pub fn debug_flag(name: &str) -> i32 {
    let Some(f) = service!(debug_flag) else {
        return 0;
    };
    let c = cstring(name);
    // SAFETY: `c` is a valid C string for the duration of the call.
    unsafe { f(c.as_ptr()) }
}

/// Append an extent through the host service.
pub(crate) fn add_extent(
    list: *mut abi::Extents,
    offset: u64,
    length: u64,
    typ: u32,
) -> Result<()> {
    let f = service!(add_extent).ok_or_else(|| Error::new(libc::ENOSYS, "no host"))?;
    // SAFETY: `list` is the server's list passed to this extents callback.
    match unsafe { f(list, offset, length, typ) } {
        0 => Ok(()),
        _ => Err(Error::errno(libc::EINVAL)),
    }
}

/// Append an export through the host service.
pub(crate) fn add_export(
    list: *mut abi::Exports,
    name: &str,
    description: Option<&str>,
) -> Result<()> {
    let f = service!(add_export).ok_or_else(|| Error::new(libc::ENOSYS, "no host"))?;
    let n = cstring(name);
    let d = description.map(cstring);
    let dp = d.as_ref().map_or(std::ptr::null(), |d| d.as_ptr());
    // SAFETY: `list` is the server's list passed to list_exports; the strings
    // outlive the call.
    match unsafe { f(list, n.as_ptr(), dp) } {
        0 => Ok(()),
        _ => Err(Error::errno(libc::EINVAL)),
    }
}

/// The errno the last failed call on this thread recorded.
pub(crate) fn last_errno() -> i32 {
    match service!(last_errno) {
        // SAFETY: a plain query of the server's thread-local state.
        Some(f) => unsafe { f() },
        None => libc::EIO,
    }
}

/// A fresh extent list from the server, freed on drop.
pub(crate) struct OwnedExtents(pub(crate) *mut abi::Extents);

impl OwnedExtents {
    pub(crate) fn new(offset: u64) -> Result<OwnedExtents> {
        let f = service!(extents_new)
            .ok_or_else(|| Error::new(libc::ENOSYS, "host lacks extents_new"))?;
        // SAFETY: a plain allocation by the server.
        let p = unsafe { f(offset) };
        if p.is_null() {
            return Err(Error::new(libc::ENOMEM, "extents_new failed"));
        }
        Ok(OwnedExtents(p))
    }

    pub(crate) fn to_vec(&self) -> Vec<(u64, u64, u32)> {
        let (Some(count), Some(get)) = (service!(extents_count), service!(extents_get)) else {
            return Vec::new();
        };
        // SAFETY: `self.0` is a live list from extents_new.
        let n = unsafe { count(self.0) };
        (0..n)
            .filter_map(|i| {
                let (mut o, mut l, mut t) = (0u64, 0u64, 0u32);
                // SAFETY: `i` is in range and the out-pointers are our locals.
                (unsafe { get(self.0, i, &mut o, &mut l, &mut t) } == 0).then_some((o, l, t))
            })
            .collect()
    }
}

impl Drop for OwnedExtents {
    fn drop(&mut self) {
        if let Some(f) = service!(extents_free) {
            // SAFETY: freed once; it came from extents_new.
            unsafe { f(self.0) }
        }
    }
}

/// A fresh export list from the server, freed on drop (since ABI 1.7).
pub(crate) struct OwnedExports(pub(crate) *mut abi::Exports);

impl OwnedExports {
    pub(crate) fn new() -> Result<OwnedExports> {
        let f = service!(exports_new)
            .ok_or_else(|| Error::new(libc::ENOSYS, "host lacks exports_new"))?;
        // SAFETY: a plain allocation by the server.
        let p = unsafe { f() };
        if p.is_null() {
            return Err(Error::new(libc::ENOMEM, "exports_new failed"));
        }
        Ok(OwnedExports(p))
    }

    pub(crate) fn to_vec(&self) -> Vec<Export> {
        let (Some(count), Some(get)) = (service!(exports_count), service!(exports_get)) else {
            return Vec::new();
        };
        // SAFETY: `self.0` is a live list from exports_new.
        let n = unsafe { count(self.0) };
        (0..n)
            .filter_map(|i| {
                let (mut name, mut desc) = (std::ptr::null(), std::ptr::null());
                // SAFETY: `i` is in range and the out-pointers are our locals.
                if unsafe { get(self.0, i, &mut name, &mut desc) } != 0 || name.is_null() {
                    return None;
                }
                // SAFETY: the server's strings live until the list is freed,
                // which is after this copy.
                let text =
                    |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
                Some(Export {
                    name: text(name),
                    description: (!desc.is_null()).then(|| text(desc)),
                })
            })
            .collect()
    }
}

impl Drop for OwnedExports {
    fn drop(&mut self) {
        if let Some(f) = service!(exports_free) {
            // SAFETY: freed once; it came from exports_new.
            unsafe { f(self.0) }
        }
    }
}

/// Answer an asynchronous request (since ABI 1.9). On a server without
/// asynchronous requests none was ever started, so there is nothing to
/// answer.
pub(crate) fn complete(req: *mut abi::Request, r: Result<()>) {
    let Some(f) = service!(complete) else {
        return;
    };
    let (errnum, msg) = match &r {
        Ok(()) => (0, None),
        Err(e) if e.is_propagated() => (e.raw_errno(), None),
        Err(e) => (e.raw_errno(), e.message().map(cstring)),
    };
    let ptr = msg.as_ref().map_or(std::ptr::null(), |m| m.as_ptr());
    // SAFETY: `req` is the server's token, completed once (the request
    // types consume themselves); `ptr` is null or a C string for the call.
    unsafe { f(req, errnum, ptr) }
}

/// A request whose completion runs `done(data, errnum)` on a worker
/// thread (since ABI 1.9).
pub(crate) fn request_then(
    done: abi::ContinuationFn,
    data: *mut std::ffi::c_void,
) -> Result<*mut abi::Request> {
    let f = service!(request_then)
        .ok_or_else(|| Error::new(libc::ENOTSUP, "the server has no asynchronous requests"))?;
    // SAFETY: a plain call; the server gives `data` back to `done` once.
    let req = unsafe { f(done, data) };
    if req.is_null() {
        Err(Error::from_next(libc::ENOMEM))
    } else {
        Ok(req)
    }
}
