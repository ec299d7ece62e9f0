//! The host table: the C functions every plugin and filter calls back
//! into, handed to each layer's entry point as one `abi::Host`.
//!
//! Each function only translates between C and the Rust service that
//! does the work (the sibling modules): it reads the C arguments, records
//! a failure as the call's error (which the layer reads back with
//! `host->last_errno`, and its caller collects) and answers in C's terms,
//! -1 or null. So the table is where the host's pointers from and to
//! layers are handled, and where most of its `unsafe` is.

use std::ffi::{c_char, c_int, c_void, CStr};

use nbdhost_plugin_api::{abi, Error};
use zeroize::Zeroize;

use super::context::{self, current};
use super::{call, debug_flags, secret, shutdown, size, stdio};
use crate::layers::connection::{Peer, DISCONNECT_FORCE, DISCONNECT_GRACEFUL};
use crate::layers::export_list::ExportCollector;
use crate::layers::extents::ExtentCollector;
use crate::layers::inflight::{self, Token};
use crate::protocol::handshake::MAX_NAME_LEN;

/// A C string a layer passed as `&str`, `None` for null; invalid UTF-8 is
/// shown as such rather than failing the call.
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

unsafe extern "C" fn host_complete(req: *mut abi::Request, errnum: c_int, msg: *const c_char) {
    let r = match (errnum, cstr(msg)) {
        (0, _) => Ok(()),
        (e, Some(m)) => Err(Error::new(e, m)),
        (e, None) => Err(Error::errno(e)),
    };
    // Often called on a thread of the layer's own (a client library's
    // callback thread): a panic in what the completion runs must not
    // unwind into it.
    let done =
        std::panic::catch_unwind(|| inflight::complete(Token::from_ptr(req), r, "host->complete"));
    if done.is_err() {
        log::error!("host->complete: completing a request panicked");
    }
}

/// The continuation a filter gave `request_then`, with what it runs for.
struct Continuation {
    done: abi::ContinuationFn,
    data: *mut c_void,
}

// SAFETY: the filter hands `data` to the server for the continuation,
// which runs it once, on whichever thread completes the request.
unsafe impl Send for Continuation {}

unsafe extern "C" fn host_request_then(
    done: abi::ContinuationFn,
    data: *mut c_void,
) -> *mut abi::Request {
    let Some(conn) = context::current_connection() else {
        call::record(Error::new(
            libc::EINVAL,
            "request_then outside a callback made for a connection",
        ));
        return std::ptr::null_mut();
    };
    let layer = call::layer();
    let cont = Continuation { done, data };
    let token = inflight::register(Box::new(move |r| {
        // The continuation gets only the errno: the message of the layer
        // below is logged here, as a synchronous caller would see it.
        if let Err(e) = &r {
            if let Some(m) = e.message() {
                log::error!("{layer}: the layer below failed: {m}");
            }
        }
        let errnum = r.err().map_or(0, |e| e.raw_errno());
        // On the pool: the thread that completed the request below may be
        // a client library's, which must not run a filter's work, and it
        // is inside `complete`.
        inflight::execute(Box::new(move || {
            let cont = cont;
            context::with_connection(Some(&conn), || {
                call::call_layer(layer, || {
                    // SAFETY: the filter's continuation with its own data,
                    // run once, as request_then promised.
                    unsafe { (cont.done)(cont.data, errnum) }
                })
            });
        }));
    }));
    token.as_ptr()
}

unsafe extern "C" fn host_error(errnum: c_int, msg: *const c_char) {
    let errnum = if errnum == 0 { libc::EIO } else { errnum };
    let err = match cstr(msg) {
        Some(m) => Error::new(errnum, m),
        None => Error::errno(errnum),
    };
    call::record(err);
}

unsafe extern "C" fn host_debug(msg: *const c_char) {
    if let Some(m) = cstr(msg) {
        log::debug!("{}: {m}", call::layer());
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
            call::record(e);
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
        call::record(Error::new(libc::EINVAL, "export name is NULL"));
        return -1;
    };
    // SAFETY: `name` was just read as a NUL-terminated string; `desc` is
    // one too, or null.
    let (name, desc) = unsafe {
        (
            CStr::from_ptr(name),
            desc.as_ref().map(|d| CStr::from_ptr(d)),
        )
    };
    // Both go on the wire as NBD strings, which the protocol caps; nbdkit
    // refuses either when too long, so the listing fails as a whole.
    if text.len() > MAX_NAME_LEN {
        call::record(Error::new(libc::EINVAL, "export name too long"));
        return -1;
    }
    if desc.is_some_and(|d| d.to_bytes().len() > MAX_NAME_LEN) {
        call::record(Error::new(
            libc::EINVAL,
            format!("export description of '{text}' too long (over {MAX_NAME_LEN} bytes)"),
        ));
        return -1;
    }
    // SAFETY: every export list handed to a layer is an `ExportCollector`
    // that lives for the duration of the call (or until exports_free).
    let list = unsafe { &mut *list.cast::<ExportCollector>() };
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
        call::record(Error::new(
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
    match size::parse_size(s) {
        Ok(v) => v as i64,
        Err(e) => {
            call::record(Error::new(libc::EINVAL, e.to_string()));
            -1
        }
    }
}

unsafe extern "C" fn host_read_secret(value: *const c_char, out: *mut *mut c_char) -> c_int {
    let Some(v) = cstr(value) else { return -1 };
    match secret::read_secret(v) {
        Ok(mut data) => {
            if data.contains(&0) {
                data.zeroize();
                call::record(Error::new(libc::EINVAL, "secret contains a NUL byte"));
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
            call::record(Error::new(libc::EINVAL, e.to_string()));
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
        // A stdin client on a socket pair is a Unix client, as nbdkit's
        // getpeername on it finds.
        Some(Peer::Unix(_) | Peer::Pipe(Some(_))) => match socket2::SockAddr::unix("") {
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
    debug_flags::value(name)
}

unsafe extern "C" fn host_debug_flag_name(i: usize) -> *const c_char {
    debug_flags::name(i).map_or(std::ptr::null(), CStr::as_ptr)
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
    call::last_errno()
}

unsafe extern "C" fn host_is_tls() -> c_int {
    current(|c| c_int::from(c.is_tls)).unwrap_or(0)
}

unsafe extern "C" fn host_nanosleep(sec: u64, nsec: u64) -> c_int {
    match shutdown::nanosleep(sec, nsec) {
        Ok(()) => 0,
        Err(e) => {
            call::record(e);
            -1
        }
    }
}

unsafe extern "C" fn host_peer_identity() -> *const c_char {
    current(|c| c.identity.as_ref().map(|i| i.as_ptr()))
        .flatten()
        .unwrap_or(std::ptr::null())
}

unsafe extern "C" fn host_log(level: c_int, msg: *const c_char) {
    let Some(m) = cstr(msg) else { return };
    let layer = call::layer();
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
        Some(Peer::Unix(Some(c)) | Peer::Pipe(Some(c))) => c,
        Some(Peer::Unix(None)) => {
            call::record(Error::new(
                libc::ENOTSUP,
                "the peer's credentials are unknown",
            ));
            return -1;
        }
        Some(_) => {
            call::record(Error::new(
                libc::ENOTSUP,
                "peer credentials exist only for Unix-socket clients",
            ));
            return -1;
        }
        None => {
            call::record(Error::new(libc::EINVAL, "no connection in this call"));
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
    shutdown::request_shutdown();
}

unsafe extern "C" fn host_disconnect(force: c_int) {
    let how = if force != 0 {
        DISCONNECT_FORCE
    } else {
        DISCONNECT_GRACEFUL
    };
    current(|c| c.ask_disconnect(how));
}

unsafe extern "C" fn host_connection_id() -> u64 {
    current(|c| c.id).unwrap_or(0)
}

unsafe extern "C" fn host_stdio_safe() -> c_int {
    c_int::from(stdio::stdio_safe())
}

/// The table every plugin and filter receives.
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
    complete: Some(host_complete),
    request_then: Some(host_request_then),
};
