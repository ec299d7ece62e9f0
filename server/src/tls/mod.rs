//! TLS over GnuTLS, terminated once for every plugin.
//!
//! The server's credentials are loaded at start ([`TlsConfig`]) and
//! followed as their files change; each
//! connection that sends STARTTLS gets an engine over in-memory buffers, so
//! encrypted and plain connections share the event loops and their code
//! path. The GnuTLS functions used are declared by hand in `ffi`.

mod certificates;
mod config;
mod engine;
mod ffi;
mod key_file;
pub mod psk;

use std::ffi::{c_int, CStr, CString};
use std::path::{Path, PathBuf};

pub use config::{default_cert_dir, TlsConfig, TlsOptions, ROOT_CERT_DIR};
pub use psk::PskFileError;

/// Why the server's TLS credentials could not be set up, or a connection's
/// TLS session could not start. Its message names files and settings,
/// never key material.
#[derive(Debug)]
pub enum TlsError {
    /// A GnuTLS call failed while doing `what`.
    Gnutls { what: String, code: c_int },
    /// A file could not be read or inspected.
    File {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A path cannot be passed to GnuTLS.
    NulInPath(PathBuf),
    /// A key file that gives other users access.
    OpenToOthers { path: PathBuf, mode: u32 },
    /// A key file owned by neither root nor the user the server runs as.
    KeyFileOwner {
        path: PathBuf,
        owner: u32,
        runs_as: u32,
    },
    /// The server certificate has expired.
    Expired { path: PathBuf, on: String },
    /// The server certificate is not valid yet.
    NotYetValid { path: PathBuf, from: String },
    /// A certificate or key file that is not there.
    NotFound(PathBuf),
    /// The PSK file is not in psktool's format.
    PskFile { path: PathBuf, error: PskFileError },
    /// A second TLS set-up in one process.
    ConfiguredTwice,
    /// `--tls-verify-peer` without `--tls-certificates`.
    VerifyPeerNeedsCertificates,
    /// `--tls-verify-peer` without the CA certificate it checks against.
    VerifyPeerNeedsCa(PathBuf),
    /// `--tls-priority` contains a NUL byte.
    NulInPriority,
    /// GnuTLS refused the `--tls-priority` string.
    Priority { priority: String, code: c_int },
    /// A connection's TLS session failed (handshake, record or alert).
    Session(c_int),
    /// The client's certificate did not verify: the status's reasons.
    CertificateRejected(std::ffi::c_uint),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Gnutls { what, code } => write!(f, "{what}: {}", strerror(*code)),
            TlsError::File { path, error } => write!(f, "{}: {error}", path.display()),
            TlsError::NulInPath(path) => write!(f, "{}: NUL in path", path.display()),
            TlsError::OpenToOthers { path, mode } => write!(
                f,
                "{} is {} other users (mode {mode:o}); run chmod o-rwx on it",
                path.display(),
                if mode & 0o004 != 0 {
                    "readable by"
                } else {
                    "open to"
                }
            ),
            TlsError::KeyFileOwner {
                path,
                owner,
                runs_as,
            } => write!(
                f,
                "{} is owned by uid {owner}: a key file must belong to root or to the user the server runs as (uid {runs_as})",
                path.display()
            ),
            TlsError::Expired { path, on } => {
                write!(f, "{}: the server certificate expired on {on}", path.display())
            }
            TlsError::NotYetValid { path, from } => write!(
                f,
                "{}: the server certificate is not valid until {from}",
                path.display()
            ),
            TlsError::NotFound(path) => {
                write!(f, "{} not found (see nbdhost-tls(1))", path.display())
            }
            TlsError::PskFile { path, error } => write!(f, "{}: {error}", path.display()),
            TlsError::ConfiguredTwice => f.write_str("TLS configured twice"),
            TlsError::VerifyPeerNeedsCertificates => {
                f.write_str("--tls-verify-peer needs --tls-certificates")
            }
            TlsError::VerifyPeerNeedsCa(ca) => {
                write!(f, "--tls-verify-peer needs {}", ca.display())
            }
            TlsError::NulInPriority => f.write_str("NUL in --tls-priority"),
            TlsError::Priority { priority, code } => {
                write!(f, "--tls-priority '{priority}': {}", strerror(*code))
            }
            TlsError::Session(code) => f.write_str(&strerror(*code)),
            TlsError::CertificateRejected(status) => write!(
                f,
                "client certificate rejected: {}",
                engine::describe_status(*status)
            ),
        }
    }
}

impl std::error::Error for TlsError {}

fn strerror(code: c_int) -> String {
    // SAFETY: gnutls_strerror returns a static string for any code.
    unsafe { CStr::from_ptr(ffi::gnutls_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

fn check(code: c_int, what: &str) -> Result<c_int, TlsError> {
    if code < 0 {
        Err(TlsError::Gnutls {
            what: what.to_string(),
            code,
        })
    } else {
        Ok(code)
    }
}

fn cpath(p: &Path) -> Result<CString, TlsError> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| TlsError::NulInPath(p.to_path_buf()))
}
