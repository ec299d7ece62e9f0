//! The `nbdkit_*` functions of nbdkit's plugin API that take fixed
//! arguments, on top of the server's host services. Each follows the
//! manual page of its name: the same results, the same errors reported
//! through `nbdkit_error` with nbdkit's wording. (The printf-style ones are
//! in `format.c`, the list functions in `lists.rs`, and
//! `nbdkit_use_default_export` in `plugin.rs`.)

use std::ffi::{c_char, c_int, c_uint, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;

use crate::calls::{self, fail, report};
use crate::host;

/// A copy of `s` in memory the plugin may `free`.
fn malloc_string(s: &CStr) -> *mut c_char {
    // SAFETY: strdup copies a NUL-terminated string; null on no memory.
    let p = unsafe { libc::strdup(s.as_ptr()) };
    if p.is_null() {
        fail(libc::ENOMEM, "strdup: out of memory");
    }
    p
}

/// A plugin's string argument, or `None` for null.
fn arg<'a>(p: *const c_char) -> Option<&'a CStr> {
    // SAFETY: the plugin passes null or a NUL-terminated string that lives
    // through the call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

/// A message without the newlines C code often ends one with, as nbdkit
/// drops them: the log ends each line itself.
fn one_line(m: &CStr) -> std::ffi::CString {
    let b = m.to_bytes();
    let end = b.iter().rposition(|&c| c != b'\n').map_or(0, |i| i + 1);
    std::ffi::CString::new(&b[..end]).unwrap_or_default()
}

/// Called by `format.c` with a formatted `nbdkit_error` message.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdhost_nbdkit_error_message(msg: *const c_char) {
    if let Some(m) = arg(msg) {
        report(&one_line(m));
    }
}

/// Called by `format.c` with a formatted `nbdkit_debug` message.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdhost_nbdkit_debug_message(msg: *const c_char) {
    if let Some(m) = arg(msg) {
        host::debug(&one_line(m));
    }
}

/// Called by `format.c`: intern `len` bytes of `s` (all of it if `len`
/// is `usize::MAX`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdhost_nbdkit_intern(s: *const c_char, len: usize) -> *const c_char {
    let Some(s) = arg(s) else {
        report(c"nbdkit_strdup_intern: no string given");
        return std::ptr::null();
    };
    let bytes = s.to_bytes();
    let bytes = &bytes[..len.min(bytes.len())];
    // Cannot fail: a prefix of a C string has no NUL.
    calls::intern(CString::new(bytes).unwrap_or_default())
}

/// See nbdkit_strdup_intern(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_strdup_intern(s: *const c_char) -> *const c_char {
    // SAFETY: the same contract.
    unsafe { nbdhost_nbdkit_intern(s, usize::MAX) }
}

/// See nbdkit_strndup_intern(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_strndup_intern(s: *const c_char, n: usize) -> *const c_char {
    // SAFETY: the same contract; a shorter string than `n` is copied whole.
    unsafe { nbdhost_nbdkit_intern(s, n) }
}

/// See nbdkit_set_error(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_set_error(err: c_int) {
    calls::set_errno(err);
}

/// An OS error as C's `%m` prints it, without Rust's "(os error N)".
fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match e.raw_os_error() {
        Some(n) => s
            .strip_suffix(&format!(" (os error {n})"))
            .map_or_else(|| s.clone(), str::to_owned),
        None => s,
    }
}

/// See nbdkit_absolute_path(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_absolute_path(path: *const c_char) -> *mut c_char {
    let Some(p) = arg(path).filter(|p| !p.is_empty()) else {
        report(c"cannot convert null or empty path to an absolute path");
        return std::ptr::null_mut();
    };
    let p = std::path::Path::new(OsStr::from_bytes(p.to_bytes()));
    let abs = match std::env::current_dir() {
        Ok(cwd) => cwd.join(p),
        Err(e) => {
            fail(
                e.raw_os_error().unwrap_or(libc::EIO),
                &format!("get_current_dir_name: {}", os_message(&e)),
            );
            return std::ptr::null_mut();
        }
    };
    malloc_string(&host::c(&abs.to_string_lossy()))
}

/// See nbdkit_realpath(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_realpath(path: *const c_char) -> *mut c_char {
    let Some(p) = arg(path).filter(|p| !p.is_empty()) else {
        report(c"cannot resolve a null or empty path");
        return std::ptr::null_mut();
    };
    let shown = p.to_string_lossy();
    match std::fs::canonicalize(OsStr::from_bytes(p.to_bytes())) {
        Ok(abs) => malloc_string(&host::c(&abs.to_string_lossy())),
        Err(e) => {
            fail(
                e.raw_os_error().unwrap_or(libc::EIO),
                &format!("realpath: {shown}: {}", os_message(&e)),
            );
            std::ptr::null_mut()
        }
    }
}

/// See nbdkit_parse_size(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_parse_size(s: *const c_char) -> i64 {
    let Some(text) = arg(s) else {
        report(c"could not parse size string (null)");
        return -1;
    };
    match crate::parse::size(&text.to_string_lossy()) {
        Ok(v) => v,
        Err(e) => {
            fail(libc::EINVAL, &e.to_string());
            -1
        }
    }
}

/// See nbdkit_parse_bool(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_parse_bool(s: *const c_char) -> c_int {
    let text = arg(s).map(CStr::to_string_lossy).unwrap_or_default();
    match crate::parse::boolean(&text) {
        Some(b) => c_int::from(b),
        None => {
            fail(
                libc::EINVAL,
                &format!("could not decipher boolean ({text})"),
            );
            -1
        }
    }
}

/// See nbdkit_parse_probability(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_parse_probability(
    what: *const c_char,
    s: *const c_char,
    r: *mut f64,
) -> c_int {
    let what = arg(what).map(CStr::to_string_lossy).unwrap_or_default();
    let text = arg(s).map(CStr::to_string_lossy).unwrap_or_default();
    match crate::parse::probability(&text) {
        Ok(p) => {
            // SAFETY: the plugin passes a writable double or null.
            if let Some(r) = unsafe { r.as_mut() } {
                *r = p;
            }
            0
        }
        Err(why) => {
            fail(libc::EINVAL, &format!("{what}: {why}: \"{text}\""));
            -1
        }
    }
}

/// See nbdkit_parse_delay(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_parse_delay(
    what: *const c_char,
    s: *const c_char,
    sec: *mut c_uint,
    nsec: *mut c_uint,
) -> c_int {
    let what = arg(what).map(CStr::to_string_lossy).unwrap_or_default();
    let text = arg(s).map(CStr::to_string_lossy).unwrap_or_default();
    match crate::parse::delay(&text) {
        Ok((s, ns)) => {
            // SAFETY: the plugin passes two writable unsigneds.
            unsafe {
                if let Some(p) = sec.as_mut() {
                    *p = s;
                }
                if let Some(p) = nsec.as_mut() {
                    *p = ns;
                }
            }
            0
        }
        Err(why) => {
            fail(libc::EINVAL, &format!("{what}: {why}: \"{text}\""));
            -1
        }
    }
}

/// The integer parsers: `strtol` (or `strtoul`) in base 0, then nbdkit's
/// checks of range, emptiness and trailing garbage.
macro_rules! parse_ints {
    ($($name:ident: $t:ty, $unsigned:expr;)*) => {$(
        /// See nbdkit_parse_int(3).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(what: *const c_char, s: *const c_char, r: *mut $t) -> c_int {
            let what = arg(what).map(CStr::to_string_lossy).unwrap_or_default();
            let Some(text) = arg(s) else {
                report(&host::c(&format!("{what}: empty string where we expected a number")));
                return -1;
            };
            match crate::parse::integer(text, $unsigned)
                .and_then(|v| <$t>::try_from(v).map_err(|_| crate::parse::IntError::Range))
            {
                Ok(v) => {
                    // SAFETY: the plugin passes a writable integer or null.
                    if let Some(r) = unsafe { r.as_mut() } {
                        *r = v;
                    }
                    0
                }
                Err(e) => {
                    fail(libc::EINVAL, &e.message(&what, &text.to_string_lossy()));
                    -1
                }
            }
        }
    )*};
}

parse_ints! {
    nbdkit_parse_int: c_int, false;
    nbdkit_parse_unsigned: c_uint, true;
    nbdkit_parse_int8_t: i8, false;
    nbdkit_parse_uint8_t: u8, true;
    nbdkit_parse_int16_t: i16, false;
    nbdkit_parse_uint16_t: u16, true;
    nbdkit_parse_int32_t: i32, false;
    nbdkit_parse_uint32_t: u32, true;
    nbdkit_parse_int64_t: i64, false;
    nbdkit_parse_uint64_t: u64, true;
}

/// See nbdkit_read_password(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_read_password(
    value: *const c_char,
    password: *mut *mut c_char,
) -> c_int {
    if password.is_null() || value.is_null() {
        report(c"nbdkit_read_password: no value or result");
        return -1;
    }
    let (Some(read), Some(free)) = (host::get().read_secret, host::get().free_secret) else {
        return -1;
    };
    let mut secret: *mut c_char = std::ptr::null_mut();
    // SAFETY: a host service writing a string it allocated into `secret`.
    if unsafe { read(value, &mut secret) } != 0 {
        return -1;
    }
    // The plugin frees what it gets with free(3); the server's copy is
    // wiped by free_secret.
    // SAFETY: `secret` is the server's NUL-terminated copy.
    let copy = malloc_string(unsafe { CStr::from_ptr(secret) });
    // SAFETY: released once, as the service requires.
    unsafe { free(secret) };
    if copy.is_null() {
        return -1;
    }
    // SAFETY: the plugin passes a writable pointer.
    unsafe { *password = copy };
    0
}

/// See nbdkit_nanosleep(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_nanosleep(sec: c_uint, nsec: c_uint) -> c_int {
    // SAFETY: a host service taking two integers.
    let r = host::get()
        .nanosleep
        .map_or(-1, |f| unsafe { f(u64::from(sec), u64::from(nsec)) });
    if r == -1 {
        // nbdkit's promise: a sleep cut short by shutdown says so in errno.
        // SAFETY: this thread's errno.
        unsafe { *libc::__errno_location() = libc::ESHUTDOWN };
    }
    r
}

/// See nbdkit_export_name(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_export_name() -> *const c_char {
    // SAFETY: a host service without arguments.
    let p = host::get()
        .export_name
        .map_or(std::ptr::null(), |f| unsafe { f() });
    if p.is_null() {
        report(c"no connection in this thread");
    }
    p
}

/// See nbdkit_is_tls(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_is_tls() -> c_int {
    // SAFETY: a host service without arguments.
    host::get().is_tls.map_or(0, |f| unsafe { f() })
}

/// See nbdkit_peer_name(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_peer_name(
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) -> c_int {
    // SAFETY: a host service with getpeername's contract, which the
    // plugin's arguments follow.
    let r = host::get()
        .peer_name
        .map_or(-1, |f| unsafe { f(addr, len) });
    if r != 0 {
        report(c"peername: the peer's address is not known here");
    }
    r
}

/// `(pid, uid, gid)` of the peer, or -1 after reporting why not.
fn credentials() -> Option<(i64, i64, i64)> {
    let (mut pid, mut uid, mut gid) = (-1, -1, -1);
    // SAFETY: a host service writing three integers.
    let r = host::get()
        .peer_credentials
        .map_or(-1, |f| unsafe { f(&mut pid, &mut uid, &mut gid) });
    (r == 0).then_some((pid, uid, gid))
}

/// See nbdkit_peer_pid(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_peer_pid() -> i64 {
    credentials().map_or(-1, |c| c.0)
}

/// See nbdkit_peer_uid(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_peer_uid() -> i64 {
    credentials().map_or(-1, |c| c.1)
}

/// See nbdkit_peer_gid(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_peer_gid() -> i64 {
    credentials().map_or(-1, |c| c.2)
}

/// See nbdkit_peer_security_context(3): nbdhost does not read labels.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_peer_security_context() -> *mut c_char {
    fail(
        libc::ENOTSUP,
        "nbdkit_peer_security_context: not supported by nbdhost",
    );
    std::ptr::null_mut()
}

/// A DN from the server, or "" when there is none; the plugin frees it.
fn dn(service: Option<unsafe extern "C" fn() -> *const c_char>) -> *mut c_char {
    // SAFETY: a host service without arguments.
    let p = service.map_or(std::ptr::null(), |f| unsafe { f() });
    malloc_string(arg(p).unwrap_or(c""))
}

/// See nbdkit_peer_tls_dn(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_peer_tls_dn() -> *mut c_char {
    dn(host::get().peer_tls_dn)
}

/// See nbdkit_peer_tls_issuer_dn(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_peer_tls_issuer_dn() -> *mut c_char {
    dn(host::get().peer_tls_issuer_dn)
}

/// See nbdkit_shutdown(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_shutdown() {
    if let Some(f) = host::get().shutdown {
        // SAFETY: a host service without arguments.
        unsafe { f() }
    }
}

/// See nbdkit_disconnect(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_disconnect(force: c_int) {
    if let Some(f) = host::get().disconnect {
        // SAFETY: a host service taking an int.
        unsafe { f(force) }
    }
}

/// See nbdkit_stdio_safe(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_stdio_safe() -> c_int {
    // SAFETY: a host service without arguments.
    host::get().stdio_safe.map_or(0, |f| unsafe { f() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_lose_their_trailing_newlines_only() {
        assert_eq!(one_line(c"a\nb\n\n").as_bytes(), b"a\nb");
        assert_eq!(one_line(c"\n").as_bytes(), b"");
        assert_eq!(one_line(c"plain").as_bytes(), b"plain");
    }

    #[test]
    fn os_errors_read_as_c_prints_them() {
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_message(&e), "No such file or directory");
        let e = std::io::Error::other("no errno");
        assert_eq!(os_message(&e), "no errno");
    }
}
