//! The certificate authority: making one, and loading it again to sign.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, PublicKeyData,
};
use time::OffsetDateTime;
use x509_parser::extensions::ParsedExtension;
use x509_parser::pem::parse_x509_pem;
use zeroize::Zeroizing;

use crate::error::{io, Error};
use crate::files::{self, Kind};
use crate::index::Index;
use crate::keyfile::{self, Passphrase};
use crate::layout::{Layout, CA_CERT, CA_CRL, CA_KEY};
use crate::validity::{self, Validity};

/// What `nbdhost-keys ca` makes.
pub struct NewCa<'a> {
    /// The CA's common name.
    pub name: &'a str,
    pub validity: Validity,
    /// Encrypt the CA's key under this.
    pub passphrase: Option<&'a Passphrase>,
    /// Replace an existing CA.
    pub force: bool,
}

/// Make a CA in `layout`'s directory: a new ECDSA P-256 key (0600,
/// encrypted if a passphrase is given) and a self-signed certificate
/// that may sign certificates and CRLs, and nothing else. Returns when
/// the certificate expires.
///
/// A CA replaced with `force` starts a new, empty index (what the old
/// one issued is not its to revoke) and drops the old CA's CRL; the
/// copies in `server/` and `clients/` stay until each is issued again.
pub fn create(layout: &Layout, new: &NewCa) -> Result<OffsetDateTime, Error> {
    if new.name.trim().is_empty() || new.name.chars().any(char::is_control) {
        return Err(Error::BadName {
            name: new.name.to_owned(),
            why: "a CA name is some text without control characters",
        });
    }
    files::private_dir(&layout.root)?;
    let _lock = files::lock(&layout.root)?;
    files::refuse_existing(&[layout.ca(CA_KEY), layout.ca(CA_CERT)], new.force)?;

    let key = Zeroizing::new(KeyPair::generate().map_err(sign_err("CA key"))?);
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, new.name);
    // A path length of 0: this CA signs servers and clients, never
    // another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (not_before, not_after) = new.validity.window()?;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(validity::serial()?);
    let cert = params
        .self_signed(&*key)
        .map_err(sign_err("CA certificate"))?;

    // The key first: a certificate without its key is of no use, a key
    // without its certificate is harmless (a rerun with --force replaces
    // it).
    let key_pem = keyfile::to_pem(&key, new.passphrase)?;
    files::write_atomic(&layout.ca(CA_KEY), key_pem.as_bytes(), Kind::Secret)?;
    files::write_atomic(&layout.ca(CA_CERT), cert.pem().as_bytes(), Kind::Public)?;
    Index::empty(&layout.index()).save()?;
    files::remove(&layout.ca(CA_CRL))?;
    Ok(not_after)
}

/// A CA loaded to sign with.
pub struct Ca {
    cert_pem: String,
    key: Zeroizing<KeyPair>,
    /// The certificate's subject key identifier, which a CRL names as
    /// its authority key identifier.
    key_id: Option<Vec<u8>>,
    /// When the CA's certificate expires.
    pub not_after: OffsetDateTime,
}

impl Ca {
    /// Load the CA of `layout`, decrypting its key with `passphrase` if
    /// it is encrypted, and check that the key is the certificate's.
    pub fn load(layout: &Layout, passphrase: Option<&Passphrase>) -> Result<Ca, Error> {
        let (key_path, cert_path) = (layout.ca(CA_KEY), layout.ca(CA_CERT));
        if !key_path.exists() || !cert_path.exists() {
            return Err(Error::NoCa(layout.root.clone()));
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let not_a_cert = || Error::BadPem {
            path: cert_path.clone(),
            what: "a PEM certificate".into(),
        };
        let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).map_err(|_| not_a_cert())?;
        let x509 = pem.parse_x509().map_err(|_| not_a_cert())?;
        let not_after = OffsetDateTime::from_unix_timestamp(x509.validity().not_after.timestamp())
            .map_err(|_| not_a_cert())?;

        let key_id = x509
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });

        let key = keyfile::load(&key_path, passphrase)?;
        if key.subject_public_key_info() != x509.tbs_certificate.subject_pki.raw {
            return Err(Error::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        Ok(Ca {
            cert_pem,
            key,
            key_id,
            not_after,
        })
    }

    /// The issuer that signs certificates and CRLs: the certificate's
    /// subject, key identifier and usages, with the CA's key.
    pub fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, Error> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &*self.key).map_err(sign_err("CA issuer"))
    }

    /// How a CRL names this CA's key: by the certificate's own key
    /// identifier, or else as rcgen derives one.
    pub fn key_id_method(&self) -> KeyIdMethod {
        match &self.key_id {
            Some(id) => KeyIdMethod::PreSpecified(id.clone()),
            None => KeyIdMethod::Sha256,
        }
    }

    /// The CA's certificate, as copied next to every certificate it
    /// issues.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
}

/// Turn rcgen's error into ours, naming what was being made.
pub fn sign_err(what: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |e| Error::Sign {
        what,
        why: e.to_string(),
    }
}
