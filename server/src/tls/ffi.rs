//! Exactly the GnuTLS functions nbdhost uses. The Rust crates for GnuTLS
//! are years out of date, and this surface is small.

use std::ffi::{c_char, c_int, c_uint, c_void};

pub type Session = *mut c_void;
pub type Cred = *mut c_void;
pub type Priority = *mut c_void;
pub type Crt = *mut c_void;
pub type Crl = *mut c_void;

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

pub type PushFn = unsafe extern "C" fn(ptr: *mut c_void, data: *const c_void, len: usize) -> isize;
pub type PullFn = unsafe extern "C" fn(ptr: *mut c_void, data: *mut c_void, len: usize) -> isize;
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
    pub fn gnutls_x509_crt_get_issuer_dn(crt: Crt, buf: *mut c_char, size: *mut usize) -> c_int;
    pub fn gnutls_x509_crt_get_activation_time(crt: Crt) -> libc::time_t;
    pub fn gnutls_x509_crt_get_expiration_time(crt: Crt) -> libc::time_t;
    pub fn gnutls_x509_crl_init(crl: *mut Crl) -> c_int;
    pub fn gnutls_x509_crl_deinit(crl: Crl);
    pub fn gnutls_x509_crl_import(crl: Crl, data: *const Datum, fmt: c_int) -> c_int;
    pub fn gnutls_x509_crl_get_next_update(crl: Crl) -> libc::time_t;

    pub fn gnutls_transport_set_ptr(session: Session, ptr: *mut c_void);
    pub fn gnutls_transport_set_push_function(session: Session, f: PushFn);
    pub fn gnutls_transport_set_pull_function(session: Session, f: PullFn);
    pub fn gnutls_transport_set_errno(session: Session, err: c_int);
    pub fn gnutls_handshake(session: Session) -> c_int;
    pub fn gnutls_record_recv(session: Session, data: *mut c_void, len: usize) -> isize;
    pub fn gnutls_record_send(session: Session, data: *const c_void, len: usize) -> isize;
    pub fn gnutls_record_cork(session: Session);
    pub fn gnutls_record_uncork(session: Session, flags: c_uint) -> c_int;
    pub fn gnutls_bye(session: Session, how: c_int) -> c_int;
    pub fn gnutls_protocol_get_version(session: Session) -> c_int;
    pub fn gnutls_protocol_get_name(version: c_int) -> *const c_char;
    pub fn gnutls_cipher_get(session: Session) -> c_int;
    pub fn gnutls_cipher_get_name(cipher: c_int) -> *const c_char;
}
