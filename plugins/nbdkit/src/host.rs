//! The server's host-service table, kept from the adapter's entry point
//! until the process ends, and small safe wrappers for what the adapter
//! asks of it.

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::atomic::{AtomicPtr, Ordering};

use nbdhost_plugin_api::abi;

use crate::error::LoadError;

static HOST: AtomicPtr<abi::Host> = AtomicPtr::new(std::ptr::null_mut());

/// The oldest host the adapter works with: it needs `log` and the other
/// services of ABI 1.5.
const NEEDED: usize = std::mem::offset_of!(abi::Host, stdio_safe) + std::mem::size_of::<usize>();

/// Keep the server's table, if it offers what the adapter needs.
///
/// # Safety
/// `host` must be the table passed to an entry point: valid for the rest
/// of the process.
pub unsafe fn set(host: *const abi::Host) -> Result<(), LoadError> {
    // SAFETY: the caller passes the server's table.
    let h = unsafe { host.as_ref() }.ok_or(LoadError::NoHostTable)?;
    if (h.struct_size as usize) < NEEDED {
        return Err(LoadError::HostTooOld {
            abi_version: h.abi_version,
        });
    }
    HOST.store(host.cast_mut(), Ordering::Release);
    Ok(())
}

/// The table. Before [`set`] it is a table without services.
pub fn get() -> &'static abi::Host {
    static NONE: abi::Host = abi::Host {
        struct_size: 0,
        abi_version: 0,
        reserved: 0,
        error: None,
        debug: None,
        add_extent: None,
        add_export: None,
        parse_size: None,
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
    let p = HOST.load(Ordering::Acquire);
    // SAFETY: only ever set to the server's table, which outlives us.
    unsafe { p.as_ref() }.unwrap_or(&NONE)
}

/// A C string for the server; an inner NUL ends it early rather than
/// losing the message.
pub fn c(s: &str) -> CString {
    let end = s.find('\0').unwrap_or(s.len());
    CString::new(&s[..end]).unwrap_or_default()
}

/// Record the current callback's error.
pub fn error(errnum: c_int, msg: Option<&CStr>) {
    if let Some(f) = get().error {
        // SAFETY: a host service taking an errno and a string or null.
        unsafe { f(errnum, msg.map_or(std::ptr::null(), CStr::as_ptr)) }
    }
}

/// Log `msg` at `level` (`abi::LOG_*`) without failing anything.
pub fn log(level: c_int, msg: &CStr) {
    if let Some(f) = get().log {
        // SAFETY: a host service taking a level and a string.
        unsafe { f(level, msg.as_ptr()) }
    }
}

/// Log a debug message.
pub fn debug(msg: &CStr) {
    if let Some(f) = get().debug {
        // SAFETY: a host service taking a string.
        unsafe { f(msg.as_ptr()) }
    }
}

/// The errno a host service recorded during the current call, 0 if none.
pub fn recorded_errno() -> c_int {
    // SAFETY: a host service without arguments.
    get().last_errno.map_or(0, |f| unsafe { f() })
}

/// A string the server owns, copied; `None` for null.
pub fn string(p: *const c_char) -> Option<String> {
    // SAFETY: host services return null or a NUL-terminated string that
    // stays valid for the current call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}
