//! TLS over GnuTLS, terminated once for every plugin.
//!
//! A [`TlsSession`] never touches a socket: the connection feeds it the
//! bytes it read and takes back the bytes to write (GnuTLS's transport
//! functions are pointed at in-memory buffers), so encrypted and plain
//! connections share the event loop and its code path, and no thread ever
//! blocks on a TLS socket.
//!
//! The bindings declare exactly the GnuTLS functions used, in `ffi`.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

use bytes::{Bytes, BytesMut};
use zeroize::Zeroize;

mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_void};

    pub type Session = *mut c_void;
    pub type Cred = *mut c_void;
    pub type Priority = *mut c_void;
    pub type Crt = *mut c_void;

    #[repr(C)]
    pub struct Datum {
        pub data: *mut u8,
        pub size: c_uint,
    }

    pub const SERVER: c_uint = 1;
    pub const NONBLOCK: c_uint = 1 << 3;
    pub const CRD_CERTIFICATE: c_int = 1;
    pub const CRD_PSK: c_int = 4;
    pub const X509_FMT_DER: c_int = 0;
    pub const X509_FMT_PEM: c_int = 1;
    pub const CERT_REQUIRE: c_int = 2;
    pub const SHUT_WR: c_int = 1;
    pub const E_AGAIN: c_int = -28;
    pub const E_INTERRUPTED: c_int = -52;
    pub const E_PREMATURE_TERMINATION: c_int = -110;

    pub type PushFn =
        unsafe extern "C" fn(ptr: *mut c_void, data: *const c_void, len: usize) -> isize;
    pub type PullFn =
        unsafe extern "C" fn(ptr: *mut c_void, data: *mut c_void, len: usize) -> isize;
    pub type PskFn =
        unsafe extern "C" fn(session: Session, username: *const c_char, key: *mut Datum) -> c_int;

    #[link(name = "gnutls")]
    extern "C" {
        pub static gnutls_malloc: unsafe extern "C" fn(usize) -> *mut c_void;

        pub fn gnutls_global_init() -> c_int;
        pub fn gnutls_strerror(code: c_int) -> *const c_char;
        pub fn gnutls_error_is_fatal(code: c_int) -> c_int;

        pub fn gnutls_init(session: *mut Session, flags: c_uint) -> c_int;
        pub fn gnutls_deinit(session: Session);
        pub fn gnutls_priority_init(
            p: *mut Priority,
            s: *const c_char,
            err: *mut *const c_char,
        ) -> c_int;
        pub fn gnutls_priority_deinit(p: Priority);
        pub fn gnutls_priority_set(session: Session, p: Priority) -> c_int;
        pub fn gnutls_credentials_set(session: Session, kind: c_int, cred: Cred) -> c_int;
        pub fn gnutls_auth_get_type(session: Session) -> c_int;

        pub fn gnutls_psk_allocate_server_credentials(cred: *mut Cred) -> c_int;
        pub fn gnutls_psk_free_server_credentials(cred: Cred);
        pub fn gnutls_psk_set_server_credentials_function(cred: Cred, f: PskFn);
        pub fn gnutls_psk_server_get_username(session: Session) -> *const c_char;

        pub fn gnutls_certificate_allocate_credentials(cred: *mut Cred) -> c_int;
        pub fn gnutls_certificate_free_credentials(cred: Cred);
        pub fn gnutls_certificate_set_x509_trust_file(
            cred: Cred,
            file: *const c_char,
            fmt: c_int,
        ) -> c_int;
        pub fn gnutls_certificate_set_x509_crl_file(
            cred: Cred,
            file: *const c_char,
            fmt: c_int,
        ) -> c_int;
        pub fn gnutls_certificate_set_x509_key_file(
            cred: Cred,
            cert: *const c_char,
            key: *const c_char,
            fmt: c_int,
        ) -> c_int;
        pub fn gnutls_certificate_server_set_request(session: Session, req: c_int);
        pub fn gnutls_certificate_verify_peers2(session: Session, status: *mut c_uint) -> c_int;
        pub fn gnutls_certificate_get_peers(session: Session, n: *mut c_uint) -> *const Datum;
        pub fn gnutls_x509_crt_init(crt: *mut Crt) -> c_int;
        pub fn gnutls_x509_crt_deinit(crt: Crt);
        pub fn gnutls_x509_crt_import(crt: Crt, data: *const Datum, fmt: c_int) -> c_int;
        pub fn gnutls_x509_crt_get_dn(crt: Crt, buf: *mut c_char, size: *mut usize) -> c_int;

        pub fn gnutls_transport_set_ptr(session: Session, ptr: *mut c_void);
        pub fn gnutls_transport_set_push_function(session: Session, f: PushFn);
        pub fn gnutls_transport_set_pull_function(session: Session, f: PullFn);
        pub fn gnutls_transport_set_errno(session: Session, err: c_int);
        pub fn gnutls_handshake(session: Session) -> c_int;
        pub fn gnutls_record_recv(session: Session, data: *mut c_void, len: usize) -> isize;
        pub fn gnutls_record_send(session: Session, data: *const c_void, len: usize) -> isize;
        pub fn gnutls_bye(session: Session, how: c_int) -> c_int;
        pub fn gnutls_protocol_get_version(session: Session) -> c_int;
        pub fn gnutls_protocol_get_name(version: c_int) -> *const c_char;
    }
}

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

/// What `--tls-*` asked for.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub psk_file: Option<PathBuf>,
    pub cert_dir: Option<PathBuf>,
    pub verify_peer: bool,
    pub priority: Option<String>,
}

/// The PSK file, read again for every lookup so that users added or
/// removed take effect on the next connection. GnuTLS's lookup callback
/// carries no user pointer of ours, and a process has one TLS setup.
static PSK_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Credentials and policy shared by every TLS connection.
pub struct TlsConfig {
    psk: Option<ffi::Cred>,
    cert: Option<ffi::Cred>,
    priority: ffi::Priority,
    verify_peer: bool,
}

// SAFETY: GnuTLS credentials and priority caches may be shared by sessions
// on any thread once set up; nothing here changes them afterwards.
unsafe impl Send for TlsConfig {}
// SAFETY: as above.
unsafe impl Sync for TlsConfig {}

/// Refuse a secret file others can read; warn if the group can.
fn check_secret_file(p: &Path) -> Result<(), String> {
    let md = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mode = md.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(format!(
            "{} is readable by other users (mode {:o}); run chmod o-rwx on it",
            p.display(),
            mode & 0o777
        ));
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

/// The default certificate directory: `/etc/pki/nbdhost` for root,
/// `$HOME/.pki/nbdhost` otherwise, as qemu and nbdkit do.
pub fn default_cert_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/etc/pki/nbdhost")
    } else {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
        home.join(".pki/nbdhost")
    }
}

/// Find `username` in a psktool file (`username:hexkey` lines).
fn lookup_psk(file: &Path, username: &str) -> Option<Vec<u8>> {
    let mut text = std::fs::read_to_string(file).ok()?;
    let key = text.lines().find_map(|line| {
        let (user, hexkey) = line.split_once(':')?;
        (user == username)
            .then(|| hex::decode(hexkey.trim()).ok())
            .flatten()
    });
    text.zeroize();
    key
}

/// Check a PSK file's format without keeping any key.
fn validate_psk_file(file: &Path) -> Result<(), String> {
    let mut text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut users = 0;
    let mut bad = None;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match line.split_once(':') {
            Some((u, k)) if !u.is_empty() && hex::decode(k.trim()).is_ok_and(|k| !k.is_empty()) => {
                users += 1
            }
            _ => bad = bad.or(Some(n + 1)),
        }
    }
    text.zeroize();
    if let Some(n) = bad {
        return Err(format!(
            "{}: line {n} is not username:hexkey",
            file.display()
        ));
    }
    if users == 0 {
        return Err(format!("{}: no users", file.display()));
    }
    Ok(())
}

thread_local! {
    /// The PSK user the last lookup on this thread was for: handshakes run
    /// synchronously inside `TlsSession::handshake`, which collects it so a
    /// failure can say who tried.
    static PSK_USER: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

unsafe extern "C" fn psk_lookup(
    _session: ffi::Session,
    username: *const c_char,
    key: *mut ffi::Datum,
) -> c_int {
    let found = std::panic::catch_unwind(|| {
        let file = PSK_FILE.get()?;
        // SAFETY: GnuTLS passes the client's user name as a C string.
        let user = unsafe { CStr::from_ptr(username) }.to_str().ok()?;
        PSK_USER.with(|u| *u.borrow_mut() = Some(user.to_string()));
        lookup_psk(file, user)
    });
    let Ok(Some(mut k)) = found else { return -1 };
    // SAFETY: GnuTLS frees the key with gnutls_free, so it must come from
    // gnutls_malloc; `key` is the datum GnuTLS gave us to fill.
    unsafe {
        let p = ffi::gnutls_malloc(k.len()).cast::<u8>();
        if p.is_null() {
            k.zeroize();
            return -1;
        }
        std::ptr::copy_nonoverlapping(k.as_ptr(), p, k.len());
        (*key).data = p;
        (*key).size = k.len() as c_uint;
    }
    k.zeroize();
    0
}

impl TlsConfig {
    /// Load and check credentials. Nothing in an error names key material.
    pub fn load(opts: &TlsOptions) -> Result<TlsConfig, String> {
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
            validate_psk_file(file)?;
            let abs = std::path::absolute(file).map_err(|e| format!("{}: {e}", file.display()))?;
            PSK_FILE
                .set(abs)
                .map_err(|_| "TLS configured twice".to_string())?;
            let mut c: ffi::Cred = std::ptr::null_mut();
            // SAFETY: allocation into our local; freed in Drop.
            check(
                unsafe { ffi::gnutls_psk_allocate_server_credentials(&mut c) },
                "PSK credentials",
            )?;
            cfg.psk = Some(c);
            // SAFETY: `c` is live; the callback is a plain function.
            unsafe { ffi::gnutls_psk_set_server_credentials_function(c, psk_lookup) };
        }
        let cert_dir = match (&opts.cert_dir, &opts.psk_file) {
            (Some(d), _) => Some(d.clone()),
            (None, None) => Some(default_cert_dir()),
            (None, Some(_)) => None,
        };
        if let Some(dir) = cert_dir {
            cfg.cert = Some(load_certificates(&dir, opts.verify_peer)?);
        } else if opts.verify_peer {
            return Err("--tls-verify-peer needs --tls-certificates".into());
        }
        let prio = opts.priority.clone().unwrap_or_else(|| {
            if cfg.psk.is_some() {
                "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK".into()
            } else {
                "NORMAL".into()
            }
        });
        let cprio = CString::new(prio.clone()).map_err(|_| "NUL in --tls-priority".to_string())?;
        let mut err: *const c_char = std::ptr::null();
        // SAFETY: outputs into our locals; the cache is freed in Drop.
        let r = unsafe { ffi::gnutls_priority_init(&mut cfg.priority, cprio.as_ptr(), &mut err) };
        if r < 0 {
            return Err(format!("--tls-priority '{prio}': {}", strerror(r)));
        }
        Ok(cfg)
    }
}

fn load_certificates(dir: &Path, verify_peer: bool) -> Result<ffi::Cred, String> {
    let cert = dir.join("server-cert.pem");
    let key = dir.join("server-key.pem");
    let ca = dir.join("ca-cert.pem");
    let crl = dir.join("ca-crl.pem");
    for f in [&cert, &key] {
        if !f.exists() {
            return Err(format!("{} not found (see nbdhost-tls(1))", f.display()));
        }
    }
    check_secret_file(&key)?;
    let mut c: ffi::Cred = std::ptr::null_mut();
    // SAFETY: allocation into our local.
    check(
        unsafe { ffi::gnutls_certificate_allocate_credentials(&mut c) },
        "certificate credentials",
    )?;
    let fail = |msg: String| {
        // SAFETY: freeing what we just allocated, once.
        unsafe { ffi::gnutls_certificate_free_credentials(c) };
        msg
    };
    if ca.exists() {
        // SAFETY: `c` is live and the path a valid C string.
        let r = unsafe {
            ffi::gnutls_certificate_set_x509_trust_file(c, cpath(&ca)?.as_ptr(), ffi::X509_FMT_PEM)
        };
        if r < 0 {
            return Err(fail(format!("{}: {}", ca.display(), strerror(r))));
        }
    } else if verify_peer {
        return Err(fail(format!("--tls-verify-peer needs {}", ca.display())));
    }
    if crl.exists() {
        // SAFETY: as above.
        let r = unsafe {
            ffi::gnutls_certificate_set_x509_crl_file(c, cpath(&crl)?.as_ptr(), ffi::X509_FMT_PEM)
        };
        if r < 0 {
            return Err(fail(format!("{}: {}", crl.display(), strerror(r))));
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
        return Err(fail(format!(
            "{} and {}: {}",
            cert.display(),
            key.display(),
            strerror(r)
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

/// The in-memory transport GnuTLS reads from and writes to.
struct Io {
    session: ffi::Session,
    incoming: VecDeque<u8>,
    outgoing: Vec<u8>,
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
        let out = std::slice::from_raw_parts_mut(data.cast::<u8>(), n);
        for (dst, src) in out.iter_mut().zip(io.incoming.drain(..n)) {
            *dst = src;
        }
        n as isize
    }
}

/// The outcome of reading decrypted data.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// This many plaintext bytes were appended (maybe 0: need more input).
    Data(usize),
    /// The peer closed the TLS session.
    Closed,
}

/// One server-side TLS session.
pub struct TlsSession {
    session: ffi::Session,
    io: Box<Io>,
    verify_peer: bool,
    /// The PSK user name the client offered, even if the handshake failed.
    attempted_user: Option<String>,
}

// SAFETY: a session is used by one thread at a time (its connection's,
// on the event loop); GnuTLS sessions may move between threads.
unsafe impl Send for TlsSession {}

impl TlsSession {
    /// A new server session using `cfg`'s credentials.
    pub fn new(cfg: &TlsConfig) -> Result<TlsSession, String> {
        let mut s: ffi::Session = std::ptr::null_mut();
        // SAFETY: initialises our local; freed in Drop.
        check(
            unsafe { ffi::gnutls_init(&mut s, ffi::SERVER | ffi::NONBLOCK) },
            "gnutls_init",
        )?;
        let session = TlsSession {
            session: s,
            verify_peer: cfg.verify_peer && cfg.cert.is_some(),
            attempted_user: None,
            io: Box::new(Io {
                session: s,
                incoming: VecDeque::new(),
                outgoing: Vec::new(),
            }),
        };
        // SAFETY: the session is live; the credentials and priority outlive
        // it (the config is dropped after every connection); the transport
        // pointer is the boxed Io, whose address is stable until Drop.
        unsafe {
            check(ffi::gnutls_priority_set(s, cfg.priority), "priority")?;
            if let Some(c) = cfg.psk {
                check(
                    ffi::gnutls_credentials_set(s, ffi::CRD_PSK, c),
                    "PSK credentials",
                )?;
            }
            if let Some(c) = cfg.cert {
                check(
                    ffi::gnutls_credentials_set(s, ffi::CRD_CERTIFICATE, c),
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

    /// Bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        self.io.incoming.extend(data);
    }

    /// Encrypted bytes to write to the socket, if any.
    pub fn take_output(&mut self) -> Option<Bytes> {
        (!self.io.outgoing.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.io.outgoing)))
    }

    /// Advance the handshake: `Ok(true)` once it is complete (and the
    /// client certificate verified, if required).
    pub fn handshake(&mut self) -> Result<bool, String> {
        PSK_USER.with(|u| u.borrow_mut().take());
        // SAFETY: live session; its transport points at our buffers.
        let r = unsafe { ffi::gnutls_handshake(self.session) };
        if let Some(u) = PSK_USER.with(|u| u.borrow_mut().take()) {
            self.attempted_user = Some(u);
        }
        match r {
            0 => {
                self.verify()?;
                Ok(true)
            }
            ffi::E_AGAIN | ffi::E_INTERRUPTED => Ok(false),
            // SAFETY: a pure query.
            r if unsafe { ffi::gnutls_error_is_fatal(r) } == 0 => Ok(false),
            r => Err(strerror(r)),
        }
    }

    fn verify(&self) -> Result<(), String> {
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
            return Err(format!("client certificate: {}", strerror(r)));
        }
        if status != 0 {
            return Err(format!(
                "client certificate rejected: {}",
                describe_status(status)
            ));
        }
        Ok(())
    }

    /// Decrypt what has arrived, appending plaintext to `out`.
    pub fn read_plaintext(&mut self, out: &mut BytesMut) -> Result<Read, String> {
        let mut total = 0;
        let mut buf = [0u8; 16 * 1024];
        loop {
            // SAFETY: `buf` is writable for its length.
            let r = unsafe {
                ffi::gnutls_record_recv(self.session, buf.as_mut_ptr().cast(), buf.len())
            };
            match r {
                n if n > 0 => {
                    out.extend_from_slice(&buf[..n as usize]);
                    total += n as usize;
                }
                0 => {
                    return Ok(if total > 0 {
                        Read::Data(total)
                    } else {
                        Read::Closed
                    })
                }
                n => match n as c_int {
                    ffi::E_AGAIN | ffi::E_INTERRUPTED => return Ok(Read::Data(total)),
                    ffi::E_PREMATURE_TERMINATION => return Ok(Read::Closed),
                    e => return Err(strerror(e)),
                },
            }
        }
    }

    /// Encrypt `data` for sending; the records go to [`take_output`].
    ///
    /// [`take_output`]: TlsSession::take_output
    pub fn write_plaintext(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            // SAFETY: `data` is readable for its length.
            let r =
                unsafe { ffi::gnutls_record_send(self.session, data.as_ptr().cast(), data.len()) };
            if r < 0 {
                return Err(strerror(r as c_int));
            }
            data = &data[r as usize..];
        }
        Ok(())
    }

    /// Queue a close_notify alert.
    pub fn close_notify(&mut self) {
        // SAFETY: live session; the alert goes to our buffer.
        unsafe { ffi::gnutls_bye(self.session, ffi::SHUT_WR) };
    }

    /// The negotiated protocol, such as "TLS1.3".
    pub fn protocol(&self) -> String {
        // SAFETY: pure queries returning static strings or null.
        let p = unsafe {
            ffi::gnutls_protocol_get_name(ffi::gnutls_protocol_get_version(self.session))
        };
        if p.is_null() {
            return "unknown".into();
        }
        // SAFETY: non-null static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// The PSK user name the client offered, known even when the handshake
    /// failed (for the log line).
    pub fn attempted_user(&self) -> Option<&str> {
        self.attempted_user.as_deref()
    }

    /// The peer's identity once the handshake is complete: the PSK user
    /// name, or the subject DN of its certificate.
    pub fn peer_identity(&self) -> Option<String> {
        // SAFETY: live session after the handshake.
        match unsafe { ffi::gnutls_auth_get_type(self.session) } {
            ffi::CRD_PSK => {
                // SAFETY: null or a string owned by the session.
                let u = unsafe { ffi::gnutls_psk_server_get_username(self.session) };
                // SAFETY: checked non-null; valid while the session lives.
                (!u.is_null()).then(|| unsafe { CStr::from_ptr(u) }.to_string_lossy().into_owned())
            }
            ffi::CRD_CERTIFICATE => self.peer_dn(),
            _ => None,
        }
    }

    fn peer_dn(&self) -> Option<String> {
        let mut n: c_uint = 0;
        // SAFETY: returns null or an array of `n` data owned by the session.
        let certs = unsafe { ffi::gnutls_certificate_get_peers(self.session, &mut n) };
        if certs.is_null() || n == 0 {
            return None;
        }
        let mut crt: ffi::Crt = std::ptr::null_mut();
        // SAFETY: initialise, import the first (the peer's own)
        // certificate, read its DN into our buffer, and free it.
        unsafe {
            if ffi::gnutls_x509_crt_init(&mut crt) < 0 {
                return None;
            }
            let mut buf = vec![0u8; 1024];
            let mut size = buf.len();
            let ok = ffi::gnutls_x509_crt_import(crt, certs, ffi::X509_FMT_DER) >= 0
                && ffi::gnutls_x509_crt_get_dn(crt, buf.as_mut_ptr().cast(), &mut size) >= 0;
            ffi::gnutls_x509_crt_deinit(crt);
            ok.then(|| {
                CStr::from_bytes_until_nul(&buf)
                    .ok()
                    .map(|c| c.to_string_lossy().into_owned())
            })
            .flatten()
        }
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        // SAFETY: freed once; the transport buffers outlive this call.
        unsafe { ffi::gnutls_deinit(self.session) };
    }
}

/// Name the reasons in a certificate verification status.
fn describe_status(status: c_uint) -> String {
    const REASONS: [(c_uint, &str); 7] = [
        (1 << 5, "revoked"),
        (1 << 6, "issuer unknown"),
        (1 << 7, "issuer is not a CA"),
        (1 << 8, "insecure algorithm"),
        (1 << 9, "not yet valid"),
        (1 << 10, "expired"),
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
