//! One server-side TLS session over in-memory buffers, as the session's
//! [`TlsEngine`]: GnuTLS's transport functions read the ciphertext the
//! connection received and collect the ciphertext it will send, so no
//! thread ever blocks on a TLS socket.

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::certificates::Certificates;
use super::config::TlsConfig;
use super::{check, ffi, psk, TlsError};
use crate::session::{PeerIdentity, TlsEngine, TlsEngineError, TlsFactory, TlsHandshake, TlsRead};

/// The largest plaintext a TLS record carries.
const RECORD_MAX: usize = 16 * 1024;

/// The in-memory transport GnuTLS reads from and writes to. Ciphertext
/// is handed out as shares of `outgoing`, whose memory is reused once
/// they are written and dropped.
struct Io {
    session: ffi::Session,
    incoming: BytesMut,
    outgoing: BytesMut,
}

unsafe extern "C" fn push(ptr: *mut c_void, data: *const c_void, len: usize) -> isize {
    // SAFETY: `ptr` is the boxed Io of a live session, and GnuTLS passes a
    // readable buffer of `len` bytes.
    unsafe {
        let io = &mut *ptr.cast::<Io>();
        io.outgoing
            .extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), len));
    }
    len as isize
}

unsafe extern "C" fn pull(ptr: *mut c_void, data: *mut c_void, len: usize) -> isize {
    // SAFETY: `ptr` is the boxed Io of a live session, and GnuTLS passes a
    // writable buffer of `len` bytes.
    unsafe {
        let io = &mut *ptr.cast::<Io>();
        if io.incoming.is_empty() {
            ffi::gnutls_transport_set_errno(io.session, libc::EAGAIN);
            return -1;
        }
        let n = len.min(io.incoming.len());
        std::ptr::copy_nonoverlapping(io.incoming.as_ptr(), data.cast::<u8>(), n);
        io.incoming.advance(n);
        n as isize
    }
}

/// A GnuTLS server session.
pub struct GnutlsEngine {
    session: ffi::Session,
    io: Box<Io>,
    verify_peer: bool,
    /// The PSK user name the client offered, even if the handshake failed.
    attempted_user: Option<String>,
    /// Writes are being gathered into full records.
    corked: bool,
    /// The certificate set the session was started with, kept until the
    /// session is deinitialised, whatever set later connections get.
    certificates: Option<Arc<Certificates>>,
}

impl GnutlsEngine {
    /// A new server session using `cfg`'s credentials.
    pub fn new(cfg: &TlsConfig) -> Result<GnutlsEngine, TlsError> {
        let mut s: ffi::Session = std::ptr::null_mut();
        // SAFETY: initialises our local; freed in Drop.
        check(
            unsafe { ffi::gnutls_init(&mut s, ffi::SERVER | ffi::NONBLOCK) },
            "gnutls_init",
        )?;
        let certificates = cfg.certificates.as_ref().map(|d| d.current());
        let session = GnutlsEngine {
            session: s,
            verify_peer: cfg.verify_peer && certificates.is_some(),
            attempted_user: None,
            corked: false,
            certificates,
            io: Box::new(Io {
                session: s,
                incoming: BytesMut::new(),
                outgoing: BytesMut::new(),
            }),
        };
        // SAFETY: the session is live; the PSK credentials and priority
        // outlive it (the config is dropped after every connection), and it
        // holds its certificate set until Drop; the transport
        // pointer is the boxed Io, whose address is stable until Drop.
        unsafe {
            check(ffi::gnutls_priority_set(s, cfg.priority), "priority")?;
            if let Some(c) = cfg.psk {
                check(
                    ffi::gnutls_credentials_set(s, ffi::CRD_PSK, c),
                    "PSK credentials",
                )?;
            }
            if let Some(c) = &session.certificates {
                check(
                    ffi::gnutls_credentials_set(s, ffi::CRD_CERTIFICATE, c.cred()),
                    "certificates",
                )?;
                if cfg.verify_peer {
                    ffi::gnutls_certificate_server_set_request(s, ffi::CERT_REQUIRE);
                }
            }
            let ptr = (&*session.io as *const Io).cast_mut().cast::<c_void>();
            ffi::gnutls_transport_set_ptr(s, ptr);
            ffi::gnutls_transport_set_push_function(s, push);
            ffi::gnutls_transport_set_pull_function(s, pull);
        }
        Ok(session)
    }

    fn verify(&self) -> Result<(), TlsError> {
        // SAFETY: live session after a completed handshake.
        if !self.verify_peer
            || unsafe { ffi::gnutls_auth_get_type(self.session) } != ffi::CRD_CERTIFICATE
        {
            return Ok(());
        }
        let mut status: c_uint = 0;
        // SAFETY: writes one unsigned int into our local.
        let r = unsafe { ffi::gnutls_certificate_verify_peers2(self.session, &mut status) };
        if r < 0 {
            return Err(TlsError::Gnutls {
                what: "client certificate".into(),
                code: r,
            });
        }
        if status != 0 {
            return Err(TlsError::CertificateRejected(status));
        }
        Ok(())
    }

    /// The subject and issuer DNs of the client's certificate.
    fn peer_certificate(&self) -> Option<(String, String)> {
        let mut n: c_uint = 0;
        // SAFETY: returns null or an array of `n` data owned by the session.
        let certs = unsafe { ffi::gnutls_certificate_get_peers(self.session, &mut n) };
        if certs.is_null() || n == 0 {
            return None;
        }
        let mut crt: ffi::Crt = std::ptr::null_mut();
        type GetDn = unsafe extern "C" fn(ffi::Crt, *mut std::ffi::c_char, *mut usize) -> c_int;
        let dn = |crt: ffi::Crt, get: GetDn| {
            let mut buf = vec![0u8; 1024];
            let mut size = buf.len();
            // SAFETY: `crt` holds an imported certificate; the DN is
            // written into our buffer of `size` bytes.
            let ok = unsafe { get(crt, buf.as_mut_ptr().cast(), &mut size) } >= 0;
            ok.then(|| {
                CStr::from_bytes_until_nul(&buf)
                    .ok()
                    .map(|c| c.to_string_lossy().into_owned())
            })
            .flatten()
        };
        // SAFETY: initialise, import the first (the peer's own)
        // certificate, read its DNs, and free it.
        unsafe {
            if ffi::gnutls_x509_crt_init(&mut crt) < 0 {
                return None;
            }
            let names = (ffi::gnutls_x509_crt_import(crt, certs, ffi::X509_FMT_DER) >= 0)
                .then(|| {
                    Some((
                        dn(crt, ffi::gnutls_x509_crt_get_dn)?,
                        dn(crt, ffi::gnutls_x509_crt_get_issuer_dn)?,
                    ))
                })
                .flatten();
            ffi::gnutls_x509_crt_deinit(crt);
            names
        }
    }
}

/// Each connection that starts TLS gets a new session over the shared
/// credentials.
impl TlsFactory for TlsConfig {
    fn start(&self) -> Result<Box<dyn TlsEngine>, TlsEngineError> {
        Ok(Box::new(GnutlsEngine::new(self)?))
    }
}

impl TlsEngine for GnutlsEngine {
    fn incoming(&mut self) -> &mut BytesMut {
        &mut self.io.incoming
    }

    fn handshake(&mut self) -> Result<TlsHandshake, TlsEngineError> {
        psk::take_attempted_user();
        // SAFETY: live session; its transport points at our buffers.
        let r = unsafe { ffi::gnutls_handshake(self.session) };
        if let Some(u) = psk::take_attempted_user() {
            self.attempted_user = Some(u);
        }
        match r {
            0 => {
                self.verify()?;
                Ok(TlsHandshake::Done)
            }
            ffi::E_AGAIN | ffi::E_INTERRUPTED => Ok(TlsHandshake::InProgress),
            // A warning (an alert, say): go on.
            // SAFETY: a pure query.
            r if unsafe { ffi::gnutls_error_is_fatal(r) } == 0 => Ok(TlsHandshake::InProgress),
            r => Err(TlsError::Session(r).into()),
        }
    }

    fn read(&mut self, out: &mut BytesMut) -> Result<TlsRead, TlsEngineError> {
        loop {
            out.reserve(RECORD_MAX);
            let spare = out.spare_capacity_mut();
            // SAFETY: GnuTLS writes at most `spare.len()` bytes of plaintext
            // into the spare capacity; only what it reports is kept.
            let r = unsafe {
                ffi::gnutls_record_recv(self.session, spare.as_mut_ptr().cast(), spare.len())
            };
            match r {
                n if n > 0 => {
                    // SAFETY: GnuTLS initialised the first `n` spare bytes.
                    unsafe { out.set_len(out.len() + n as usize) };
                }
                // close_notify.
                0 => return Ok(TlsRead::Closed),
                n => match n as c_int {
                    ffi::E_AGAIN | ffi::E_INTERRUPTED => return Ok(TlsRead::Open),
                    ffi::E_PREMATURE_TERMINATION => return Ok(TlsRead::Closed),
                    e => return Err(TlsError::Session(e).into()),
                },
            }
        }
    }

    fn write(&mut self, mut data: &[u8]) -> Result<(), TlsEngineError> {
        // Small pieces (headers, short replies) are gathered into shared
        // records; a large piece fills records of its own, encrypted
        // straight from the caller's buffer rather than copied first.
        let large = data.len() >= RECORD_MAX;
        if large {
            self.flush()?;
        } else if !self.corked {
            // SAFETY: live session; corking only buffers inside GnuTLS.
            unsafe { ffi::gnutls_record_cork(self.session) };
            self.corked = true;
        }
        // Room for the records and their headers and tags, so the
        // ciphertext buffer does not grow by copying.
        self.io
            .outgoing
            .reserve(data.len() + data.len() / RECORD_MAX * 64 + 64);
        while !data.is_empty() {
            // SAFETY: `data` is readable for its length.
            let r =
                unsafe { ffi::gnutls_record_send(self.session, data.as_ptr().cast(), data.len()) };
            if r < 0 {
                return Err(TlsError::Session(r as c_int).into());
            }
            data = &data[r as usize..];
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TlsEngineError> {
        if !std::mem::take(&mut self.corked) {
            return Ok(());
        }
        // SAFETY: live session; the push function takes everything at once,
        // so uncorking never has to wait.
        let r = unsafe { ffi::gnutls_record_uncork(self.session, 0) };
        Ok(check(r, "TLS").map(drop)?)
    }

    fn take_output(&mut self) -> Option<Bytes> {
        (!self.io.outgoing.is_empty()).then(|| self.io.outgoing.split().freeze())
    }

    fn close_notify(&mut self) {
        // SAFETY: live session; the alert goes to our buffer.
        unsafe { ffi::gnutls_bye(self.session, ffi::SHUT_WR) };
    }

    fn protocol(&self) -> String {
        let name = |p: *const std::ffi::c_char| {
            // SAFETY: null or a static string from GnuTLS.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        // SAFETY: pure queries of a live session, returning static strings.
        let (version, cipher) = unsafe {
            (
                ffi::gnutls_protocol_get_name(ffi::gnutls_protocol_get_version(self.session)),
                ffi::gnutls_cipher_get_name(ffi::gnutls_cipher_get(self.session)),
            )
        };
        format!(
            "{} {}",
            name(version).unwrap_or_else(|| "unknown".into()),
            name(cipher).unwrap_or_else(|| "unknown cipher".into())
        )
    }

    fn peer_identity(&self) -> Option<PeerIdentity> {
        // SAFETY: live session after the handshake.
        match unsafe { ffi::gnutls_auth_get_type(self.session) } {
            ffi::CRD_PSK => {
                // SAFETY: null or a string owned by the session.
                let u = unsafe { ffi::gnutls_psk_server_get_username(self.session) };
                if u.is_null() {
                    return None;
                }
                // SAFETY: checked non-null; valid while the session lives.
                let user = unsafe { CStr::from_ptr(u) };
                Some(PeerIdentity::Psk(user.to_string_lossy().into_owned()))
            }
            ffi::CRD_CERTIFICATE => self
                .peer_certificate()
                .map(|(subject, issuer)| PeerIdentity::Certificate { subject, issuer }),
            _ => None,
        }
    }

    fn attempted_user(&self) -> Option<String> {
        self.attempted_user.clone()
    }
}

impl Drop for GnutlsEngine {
    fn drop(&mut self) {
        // SAFETY: freed once; the transport buffers and the certificate
        // set (fields, dropped after this) outlive this call.
        unsafe { ffi::gnutls_deinit(self.session) };
    }
}

/// Name the reasons in a certificate verification status.
pub(super) fn describe_status(status: c_uint) -> String {
    const REASONS: [(c_uint, &str); 9] = [
        (1 << 5, "revoked"),
        (1 << 6, "issuer unknown"),
        (1 << 7, "issuer is not a CA"),
        (1 << 8, "insecure algorithm"),
        (1 << 9, "not yet valid"),
        (1 << 10, "expired"),
        (
            1 << 12,
            "revocation data superseded (the CRL's next update has passed)",
        ),
        (1 << 13, "revocation data issued in the future"),
        (1 << 1, "not trusted"),
    ];
    let reasons: Vec<&str> = REASONS
        .iter()
        .filter(|(bit, _)| status & bit != 0)
        .map(|(_, r)| *r)
        .collect();
    if reasons.is_empty() {
        format!("verification status 0x{status:x}")
    } else {
        reasons.join(", ")
    }
}
