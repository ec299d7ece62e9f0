//! The server's TLS credentials and policy, shared by every connection
//! that starts TLS. The PSK file is read again for every PSK handshake
//! (`psk`), the certificate directory whenever its files change
//! (`certificates`).

use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::sync::Once;

use super::certificates::CertificateDir;
use super::key_file::{self, KeyOwner};
use super::{check, ffi, psk, TlsError};

/// What `--tls-*` asked for.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub psk_file: Option<PathBuf>,
    pub cert_dir: Option<PathBuf>,
    pub verify_peer: bool,
    pub priority: Option<String>,
    /// The user `-u` makes the server run as, who may own key files.
    pub run_as: Option<u32>,
}

/// Credentials and policy shared by every TLS connection.
pub struct TlsConfig {
    pub(super) psk: Option<ffi::Cred>,
    pub(super) certificates: Option<CertificateDir>,
    pub(super) priority: ffi::Priority,
    pub(super) verify_peer: bool,
}

// SAFETY: GnuTLS PSK credentials and priority caches may be shared by
// sessions on any thread once set up; nothing here changes them
// afterwards (the certificate sets are their own, behind a lock).
unsafe impl Send for TlsConfig {}
// SAFETY: as above.
unsafe impl Sync for TlsConfig {}

/// The default certificate directory for root.
pub const ROOT_CERT_DIR: &str = "/etc/pki/nbdhost";

/// The default certificate directory: [`ROOT_CERT_DIR`] for root,
/// `$HOME/.pki/nbdhost` otherwise, as qemu and nbdkit do.
pub fn default_cert_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from(ROOT_CERT_DIR)
    } else {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
        home.join(".pki/nbdhost")
    }
}

impl TlsConfig {
    /// Load and check credentials. Nothing in an error names key material.
    pub fn load(opts: &TlsOptions) -> Result<TlsConfig, TlsError> {
        static INIT: Once = Once::new();
        // SAFETY: gnutls_global_init is reference-counted and safe to call
        // once at start-up.
        INIT.call_once(|| unsafe {
            ffi::gnutls_global_init();
        });
        let mut cfg = TlsConfig {
            psk: None,
            certificates: None,
            priority: std::ptr::null_mut(),
            verify_peer: opts.verify_peer,
        };
        let owner = KeyOwner::new(opts.run_as);
        if let Some(file) = &opts.psk_file {
            key_file::check(file, owner)?;
            psk::install(file)?;
            let mut c: ffi::Cred = std::ptr::null_mut();
            // SAFETY: allocation into our local; freed in Drop.
            check(
                unsafe { ffi::gnutls_psk_allocate_server_credentials(&mut c) },
                "PSK credentials",
            )?;
            cfg.psk = Some(c);
            // SAFETY: `c` is live; the callback is a plain function.
            unsafe { ffi::gnutls_psk_set_server_credentials_function(c, psk::callback) };
        }
        let cert_dir = match (&opts.cert_dir, &opts.psk_file) {
            (Some(d), _) => Some(d.clone()),
            (None, None) => Some(default_cert_dir()),
            (None, Some(_)) => None,
        };
        if let Some(dir) = cert_dir {
            cfg.certificates = Some(CertificateDir::load(&dir, opts.verify_peer, owner)?);
        } else if opts.verify_peer {
            return Err(TlsError::VerifyPeerNeedsCertificates);
        }
        let prio = opts.priority.clone().unwrap_or_else(|| {
            if cfg.psk.is_some() {
                "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK".into()
            } else {
                "NORMAL".into()
            }
        });
        let cprio = CString::new(prio.clone()).map_err(|_| TlsError::NulInPriority)?;
        let mut err: *const c_char = std::ptr::null();
        // SAFETY: outputs into our locals; the cache is freed in Drop.
        let r = unsafe { ffi::gnutls_priority_init(&mut cfg.priority, cprio.as_ptr(), &mut err) };
        if r < 0 {
            return Err(TlsError::Priority {
                priority: prio,
                code: r,
            });
        }
        Ok(cfg)
    }
}

impl Drop for TlsConfig {
    fn drop(&mut self) {
        // SAFETY: each object was allocated in `load` and is freed once,
        // after every session using it (sessions end before the config).
        unsafe {
            if let Some(c) = self.psk {
                ffi::gnutls_psk_free_server_credentials(c);
            }
            if !self.priority.is_null() {
                ffi::gnutls_priority_deinit(self.priority);
            }
        }
    }
}
