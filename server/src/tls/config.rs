//! The server's TLS credentials and policy, loaded once and shared by
//! every connection that starts TLS.

use std::ffi::{c_char, CString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

use super::{check, cpath, ffi, psk, TlsError};

/// What `--tls-*` asked for.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub psk_file: Option<PathBuf>,
    pub cert_dir: Option<PathBuf>,
    pub verify_peer: bool,
    pub priority: Option<String>,
}

/// Credentials and policy shared by every TLS connection.
pub struct TlsConfig {
    pub(super) psk: Option<ffi::Cred>,
    pub(super) cert: Option<ffi::Cred>,
    pub(super) priority: ffi::Priority,
    pub(super) verify_peer: bool,
}

// SAFETY: GnuTLS credentials and priority caches may be shared by sessions
// on any thread once set up; nothing here changes them afterwards.
unsafe impl Send for TlsConfig {}
// SAFETY: as above.
unsafe impl Sync for TlsConfig {}

/// Refuse a secret file others can read; warn if the group can.
fn check_secret_file(p: &Path) -> Result<(), TlsError> {
    let md = std::fs::metadata(p).map_err(|error| TlsError::File {
        path: p.to_path_buf(),
        error,
    })?;
    let mode = md.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(TlsError::ReadableByOthers {
            path: p.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    if mode & 0o040 != 0 {
        log::warn!(
            "{} is readable by its group (mode {:o})",
            p.display(),
            mode & 0o777
        );
    }
    Ok(())
}

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
            cert: None,
            priority: std::ptr::null_mut(),
            verify_peer: opts.verify_peer,
        };
        if let Some(file) = &opts.psk_file {
            check_secret_file(file)?;
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
            cfg.cert = Some(load_certificates(&dir, opts.verify_peer)?);
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

fn load_certificates(dir: &Path, verify_peer: bool) -> Result<ffi::Cred, TlsError> {
    let cert = dir.join("server-cert.pem");
    let key = dir.join("server-key.pem");
    let ca = dir.join("ca-cert.pem");
    let crl = dir.join("ca-crl.pem");
    for f in [&cert, &key] {
        if !f.exists() {
            return Err(TlsError::NotFound(f.clone()));
        }
    }
    check_secret_file(&key)?;
    let mut c: ffi::Cred = std::ptr::null_mut();
    // SAFETY: allocation into our local.
    check(
        unsafe { ffi::gnutls_certificate_allocate_credentials(&mut c) },
        "certificate credentials",
    )?;
    let fail = |e: TlsError| {
        // SAFETY: freeing what we just allocated, once.
        unsafe { ffi::gnutls_certificate_free_credentials(c) };
        e
    };
    let gnutls = |what: String, code| TlsError::Gnutls { what, code };
    if ca.exists() {
        // SAFETY: `c` is live and the path a valid C string.
        let r = unsafe {
            ffi::gnutls_certificate_set_x509_trust_file(c, cpath(&ca)?.as_ptr(), ffi::X509_FMT_PEM)
        };
        if r < 0 {
            return Err(fail(gnutls(ca.display().to_string(), r)));
        }
    } else if verify_peer {
        return Err(fail(TlsError::VerifyPeerNeedsCa(ca)));
    }
    if crl.exists() {
        // SAFETY: as above.
        let r = unsafe {
            ffi::gnutls_certificate_set_x509_crl_file(c, cpath(&crl)?.as_ptr(), ffi::X509_FMT_PEM)
        };
        if r < 0 {
            return Err(fail(gnutls(crl.display().to_string(), r)));
        }
    }
    // SAFETY: as above.
    let r = unsafe {
        ffi::gnutls_certificate_set_x509_key_file(
            c,
            cpath(&cert)?.as_ptr(),
            cpath(&key)?.as_ptr(),
            ffi::X509_FMT_PEM,
        )
    };
    if r < 0 {
        return Err(fail(gnutls(
            format!("{} and {}", cert.display(), key.display()),
            r,
        )));
    }
    Ok(c)
}

impl Drop for TlsConfig {
    fn drop(&mut self) {
        // SAFETY: each object was allocated in `load` and is freed once,
        // after every session using it (sessions end before the config).
        unsafe {
            if let Some(c) = self.psk {
                ffi::gnutls_psk_free_server_credentials(c);
            }
            if let Some(c) = self.cert {
                ffi::gnutls_certificate_free_credentials(c);
            }
            if !self.priority.is_null() {
                ffi::gnutls_priority_deinit(self.priority);
            }
        }
    }
}
