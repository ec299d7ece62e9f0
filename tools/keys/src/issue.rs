//! Server and client certificates, signed by the CA, each written with
//! its key and a copy of the CA's certificate into the directory its
//! holder is given.

use std::net::IpAddr;
use std::path::PathBuf;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::ca::{sign_err, Ca};
use crate::error::Error;
use crate::files::{self, Kind};
use crate::index::{Index, Record, Role};
use crate::keyfile::{self, Passphrase};
use crate::layout::{Layout, CA_CERT, CA_CRL, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
use crate::validity::{serial, Validity};

/// A certificate just issued.
pub struct Issued {
    /// The directory its holder is given.
    pub dir: PathBuf,
    pub serial: Vec<u8>,
    pub not_after: OffsetDateTime,
}

/// What every issued certificate needs besides its subject.
pub struct Request<'a> {
    pub validity: Validity,
    /// The CA key's passphrase, if it is encrypted.
    pub passphrase: Option<&'a Passphrase>,
    /// Replace an existing key and certificate.
    pub force: bool,
}

/// Issue the server's certificate, for the names clients connect to,
/// into `DIR/server/` (what `nbdhost --tls-certificates=` is given),
/// with the CA's CRL if there is one.
pub fn server(
    layout: &Layout,
    dns: &[String],
    ips: &[IpAddr],
    req: &Request,
) -> Result<Issued, Error> {
    for d in dns {
        check_dns_name(d)?;
    }
    let first = dns
        .first()
        .cloned()
        .or_else(|| ips.first().map(IpAddr::to_string))
        .ok_or(Error::NoServerNames)?;
    let mut params = leaf_params(&first, req.validity)?;
    for d in dns {
        let name = d.as_str().try_into().map_err(sign_err("server name"))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let dir = layout.server_dir();
    let paths = LeafPaths {
        cert: dir.join(SERVER_CERT),
        key: dir.join(SERVER_KEY),
        dir,
    };
    issue(layout, &paths, params, Role::Server, &first, req)
}

/// Issue a client certificate whose subject is `CN=name` (the DN nbdhost
/// shows to plugins and matches against an export's `allow-dn`) into
/// `DIR/clients/NAME/`.
pub fn client(layout: &Layout, name: &str, req: &Request) -> Result<Issued, Error> {
    check_client_name(name)?;
    let mut params = leaf_params(name, req.validity)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let dir = layout.client_dir(name);
    let paths = LeafPaths {
        cert: dir.join(CLIENT_CERT),
        key: dir.join(CLIENT_KEY),
        dir,
    };
    issue(layout, &paths, params, Role::Client, name, req)
}

/// Whether `name` can be a client's name: it is both the certificate's
/// CN and a directory name, and is printed in command lines, so letters,
/// digits and `.`, `_`, `@`, `-`, starting with a letter or digit.
fn check_client_name(name: &str) -> Result<(), Error> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName {
            name: name.to_owned(),
            why: "a client name is 1 to 64 letters, digits, '.', '_', '@' or '-', \
                  starting with a letter or digit",
        })
    }
}

/// Whether `name` can be a DNS name in a certificate: ASCII labels of
/// letters, digits, `-` and `_`, and `*` for a wildcard.
fn check_dns_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_*".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::BadName {
            name: name.to_owned(),
            why: "not a DNS name (an IP address goes with --ip)",
        })
    }
}

/// What qemu's TLS guide asks of a server or client certificate: signed
/// by a CA, not one itself, for signatures and key exchange.
fn leaf_params(common_name: &str, validity: Validity) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    let (not_before, not_after) = validity.window()?;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(serial()?);
    Ok(params)
}

struct LeafPaths {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn issue(
    layout: &Layout,
    paths: &LeafPaths,
    params: CertificateParams,
    role: Role,
    name: &str,
    req: &Request,
) -> Result<Issued, Error> {
    if !layout.root.is_dir() {
        return Err(Error::NoCa(layout.root.clone()));
    }
    let _lock = files::lock(&layout.root)?;
    let ca = Ca::load(layout, req.passphrase)?;
    let ca_copy = paths.dir.join(CA_CERT);
    let mut existing = vec![paths.cert.clone(), paths.key.clone()];
    // A copy of this very CA certificate is no file of anyone's to lose.
    if files::read_optional(&ca_copy)?.is_some_and(|t| t.as_str() != ca.cert_pem()) {
        existing.push(ca_copy.clone());
    }
    files::refuse_existing(&existing, req.force)?;

    let key = Zeroizing::new(KeyPair::generate().map_err(sign_err("key"))?);
    let cert = params
        .signed_by(&*key, &ca.issuer()?)
        .map_err(sign_err("certificate"))?;
    let serial = params
        .serial_number
        .as_ref()
        .map(SerialNumber::to_bytes)
        .unwrap_or_default();

    // The record first: a certificate the record names but nobody
    // received is harmless; one received but not recorded cannot be
    // revoked.
    let mut index = Index::load(&layout.index())?;
    index.push(Record {
        serial: serial.clone(),
        role,
        name: name.to_owned(),
        not_after: params.not_after,
        revoked: None,
    });
    index.save()?;

    files::private_dir(&paths.dir)?;
    let key_pem = keyfile::to_pem(&key, None)?;
    files::write_atomic(&paths.key, key_pem.as_bytes(), Kind::Secret)?;
    files::write_atomic(&paths.cert, cert.pem().as_bytes(), Kind::Public)?;
    files::write_atomic(&ca_copy, ca.cert_pem().as_bytes(), Kind::Public)?;
    if role == Role::Server {
        mirror_crl(layout)?;
    }
    Ok(Issued {
        dir: paths.dir.clone(),
        serial,
        not_after: params.not_after,
    })
}

/// Make the server directory's CRL the CA's: a copy, or none when the CA
/// has none (a CA made again has not revoked what the old one did, and
/// the old CA's CRL would not verify against the new certificate).
pub fn mirror_crl(layout: &Layout) -> Result<(), Error> {
    let copy = layout.server_dir().join(CA_CRL);
    match files::read_optional(&layout.ca(CA_CRL))? {
        Some(crl) => files::write_atomic(&copy, crl.as_bytes(), Kind::Public),
        None => files::remove(&copy),
    }
}
