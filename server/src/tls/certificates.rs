//! The server's X.509 credentials, from a directory in qemu's layout
//! (`server-cert.pem`, `server-key.pem`, `ca-cert.pem`, `ca-crl.pem`).
//!
//! They are read at start, and again for a new connection whenever one of
//! those files has changed, so that a renewed certificate, a new CA or a
//! new CRL takes effect without a restart. A change is noticed by each
//! file's identity and time as `stat` gives them through links (device,
//! inode, modification time, size): a file rewritten, replaced by rename,
//! or reached through a swapped symlink is seen. A set that does not load
//! (a broken file, a key that does not match its certificate, a
//! certificate outside its validity) leaves the set in use as it was, and
//! its reason is logged once; the next change is tried again.
//! Connections keep the set they started with until they end.

use std::ffi::c_uint;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::key_file::{self, KeyOwner};
use super::{cpath, ffi, TlsError};

/// A server certificate expiring sooner than this is warned about.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// One loaded set of certificate credentials. A TLS session holds the set
/// it was started with, so a newer set never frees it under the session.
pub struct Certificates {
    cred: ffi::Cred,
}

// SAFETY: GnuTLS certificate credentials may be used by sessions on any
// thread once set up; nothing changes them after `load`.
unsafe impl Send for Certificates {}
// SAFETY: as above.
unsafe impl Sync for Certificates {}

impl Certificates {
    /// The credentials, for `gnutls_credentials_set`.
    pub(super) fn cred(&self) -> ffi::Cred {
        self.cred
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        // SAFETY: allocated in `Files::load`, freed once, after every
        // session holding this set has been deinitialised.
        unsafe { ffi::gnutls_certificate_free_credentials(self.cred) };
    }
}

/// A file's identity and time, by which a change is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

/// The stamps of a directory's four files (`None`: absent).
type Stamps = [Option<FileStamp>; 4];

fn stamp(p: &Path) -> Option<FileStamp> {
    let md = std::fs::metadata(p).ok()?;
    Some(FileStamp {
        dev: md.dev(),
        ino: md.ino(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
        size: md.size(),
    })
}

/// The files of a certificate directory.
struct Files {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    crl: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Files {
        Files {
            dir: dir.to_path_buf(),
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
            ca: dir.join("ca-cert.pem"),
            crl: dir.join("ca-crl.pem"),
        }
    }

    fn stamps(&self) -> Stamps {
        [&self.cert, &self.key, &self.ca, &self.crl].map(|p| stamp(p))
    }

    /// Load the set, checking the key file's ownership and the server
    /// certificate's validity at `now`.
    fn load(&self, verify_peer: bool, owner: KeyOwner, now: i64) -> Result<Certificates, TlsError> {
        for f in [&self.cert, &self.key] {
            if !f.exists() {
                return Err(TlsError::NotFound(f.clone()));
            }
        }
        key_file::check(&self.key, owner)?;
        let validity = Validity::of_certificate(&self.cert)?;
        validity.check(&self.cert, now)?;
        let mut c: ffi::Cred = std::ptr::null_mut();
        // SAFETY: allocation into our local.
        super::check(
            unsafe { ffi::gnutls_certificate_allocate_credentials(&mut c) },
            "certificate credentials",
        )?;
        // From here on the set owns `c` and frees it on every error path.
        let set = Certificates { cred: c };
        let gnutls = |what: String, code| TlsError::Gnutls { what, code };
        if self.ca.exists() {
            // SAFETY: `c` is live and the path a valid C string.
            let r = unsafe {
                ffi::gnutls_certificate_set_x509_trust_file(
                    c,
                    cpath(&self.ca)?.as_ptr(),
                    ffi::X509_FMT_PEM,
                )
            };
            if r < 0 {
                return Err(gnutls(self.ca.display().to_string(), r));
            }
        } else if verify_peer {
            return Err(TlsError::VerifyPeerNeedsCa(self.ca.clone()));
        }
        if self.crl.exists() {
            // SAFETY: as above.
            let r = unsafe {
                ffi::gnutls_certificate_set_x509_crl_file(
                    c,
                    cpath(&self.crl)?.as_ptr(),
                    ffi::X509_FMT_PEM,
                )
            };
            if r < 0 {
                return Err(gnutls(self.crl.display().to_string(), r));
            }
            if verify_peer {
                warn_stale_crl(&self.crl, now);
            }
        }
        // SAFETY: as above. GnuTLS refuses a key that does not match the
        // certificate.
        let r = unsafe {
            ffi::gnutls_certificate_set_x509_key_file(
                c,
                cpath(&self.cert)?.as_ptr(),
                cpath(&self.key)?.as_ptr(),
                ffi::X509_FMT_PEM,
            )
        };
        if r < 0 {
            return Err(gnutls(
                format!("{} and {}", self.cert.display(), self.key.display()),
                r,
            ));
        }
        validity.warn_if_expiring(&self.cert, now);
        Ok(set)
    }
}

/// The server's certificate directory, and the set new connections get.
pub struct CertificateDir {
    files: Files,
    verify_peer: bool,
    owner: KeyOwner,
    state: Mutex<State>,
}

struct State {
    /// The stamps the set in use was loaded under.
    stamps: Stamps,
    current: Arc<Certificates>,
    /// The stamps of the last change that failed to load: it is tried,
    /// and logged, once.
    refused: Option<Stamps>,
}

impl CertificateDir {
    /// Load the directory at start. Anything wrong is an error, including
    /// a server certificate that has expired or is not valid yet.
    pub fn load(
        dir: &Path,
        verify_peer: bool,
        owner: KeyOwner,
    ) -> Result<CertificateDir, TlsError> {
        let files = Files::new(dir);
        let stamps = files.stamps();
        let current = Arc::new(files.load(verify_peer, owner, unix_now())?);
        Ok(CertificateDir {
            files,
            verify_peer,
            owner,
            state: Mutex::new(State {
                stamps,
                current,
                refused: None,
            }),
        })
    }

    /// The set for a new connection: the one in use, after loading the
    /// files again if they changed since it was loaded.
    pub fn current(&self) -> Arc<Certificates> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let stamps = self.files.stamps();
        if stamps != state.stamps && state.refused != Some(stamps) {
            let dir = self.files.dir.display();
            match self.files.load(self.verify_peer, self.owner, unix_now()) {
                Ok(set) => {
                    log::info!("{dir}: the certificates changed; new connections use them");
                    state.current = Arc::new(set);
                    state.stamps = stamps;
                    state.refused = None;
                }
                Err(e) => {
                    log::error!(
                        "{dir}: keeping the previous certificates, as the changed ones do not load: {e}"
                    );
                    state.refused = Some(stamps);
                }
            }
        }
        state.current.clone()
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A time as a UTC date for messages.
pub(super) fn date(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{t} seconds after 1970"))
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
struct Validity {
    not_before: i64,
    not_after: i64,
}

impl Validity {
    /// The validity of the first certificate in a PEM file.
    fn of_certificate(path: &Path) -> Result<Validity, TlsError> {
        let mut pem = std::fs::read(path).map_err(|error| TlsError::File {
            path: path.to_path_buf(),
            error,
        })?;
        let datum = ffi::Datum {
            data: pem.as_mut_ptr(),
            size: pem.len() as c_uint,
        };
        let mut crt: ffi::Crt = std::ptr::null_mut();
        // SAFETY: initialise our local, import from our buffer (GnuTLS
        // copies what it keeps), read two times, and free it.
        unsafe {
            super::check(ffi::gnutls_x509_crt_init(&mut crt), "certificate")?;
            let r = ffi::gnutls_x509_crt_import(crt, &datum, ffi::X509_FMT_PEM);
            let validity = Validity {
                not_before: ffi::gnutls_x509_crt_get_activation_time(crt),
                not_after: ffi::gnutls_x509_crt_get_expiration_time(crt),
            };
            ffi::gnutls_x509_crt_deinit(crt);
            if r < 0 {
                return Err(TlsError::Gnutls {
                    what: path.display().to_string(),
                    code: r,
                });
            }
            Ok(validity)
        }
    }

    fn check(self, path: &Path, now: i64) -> Result<(), TlsError> {
        if now < self.not_before {
            return Err(TlsError::NotYetValid {
                path: path.to_path_buf(),
                from: date(self.not_before),
            });
        }
        if now > self.not_after {
            return Err(TlsError::Expired {
                path: path.to_path_buf(),
                on: date(self.not_after),
            });
        }
        Ok(())
    }

    fn warn_if_expiring(self, path: &Path, now: i64) {
        let days = (self.not_after - now) / 86_400;
        if days < EXPIRY_WARNING_DAYS {
            log::warn!(
                "{}: the server certificate expires on {}, in {days} day(s)",
                path.display(),
                date(self.not_after)
            );
        }
    }
}

/// Warn when a CRL's next update has passed. GnuTLS goes on using it (the
/// certificates it lists stay refused, and the others are accepted), so
/// nothing breaks, but revocations made since are missing from it.
fn warn_stale_crl(path: &Path, now: i64) {
    let Ok(mut pem) = std::fs::read(path) else {
        return;
    };
    let datum = ffi::Datum {
        data: pem.as_mut_ptr(),
        size: pem.len() as c_uint,
    };
    let mut crl: ffi::Crl = std::ptr::null_mut();
    // SAFETY: initialise our local, import from our buffer, read one
    // time, and free it.
    let next = unsafe {
        if ffi::gnutls_x509_crl_init(&mut crl) < 0 {
            return;
        }
        let ok = ffi::gnutls_x509_crl_import(crl, &datum, ffi::X509_FMT_PEM) >= 0;
        let next = ffi::gnutls_x509_crl_get_next_update(crl);
        ffi::gnutls_x509_crl_deinit(crl);
        if !ok {
            return;
        }
        next
    };
    // (time_t)-1: the CRL names no next update.
    if next != -1 && next < now {
        log::warn!(
            "{}: the CRL's next update was due on {}; it is still used, but it may miss revocations since: make a newer one (nbdhost-keys revoke)",
            path.display(),
            date(next)
        );
    }
}
