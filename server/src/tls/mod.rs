//! TLS over GnuTLS, terminated once for every plugin.
//!
//! The server's credentials are loaded once ([`TlsConfig`]); each
//! connection that sends STARTTLS gets an engine over in-memory buffers, so
//! encrypted and plain connections share the event loops and their code
//! path. The GnuTLS functions used are declared by hand in `ffi`.

mod config;
mod engine;
mod ffi;
pub mod psk;

use std::ffi::{c_int, CStr, CString};
use std::path::Path;

pub use config::{default_cert_dir, TlsConfig, TlsOptions, ROOT_CERT_DIR};

fn strerror(code: c_int) -> String {
    // SAFETY: gnutls_strerror returns a static string for any code.
    unsafe { CStr::from_ptr(ffi::gnutls_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

fn check(code: c_int, what: &str) -> Result<c_int, String> {
    if code < 0 {
        Err(format!("{what}: {}", strerror(code)))
    } else {
        Ok(code)
    }
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: NUL in path", p.display()))
}
