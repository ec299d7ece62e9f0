//! Revocation: the CA's certificate revocation list, `ca-crl.pem`, in
//! the CA's directory and copied into the server's, where nbdhost (and
//! qemu) read it.

use std::path::PathBuf;

use rcgen::{CertificateRevocationListParams, RevokedCertParams, SerialNumber};
use time::{Duration, OffsetDateTime};

use crate::ca::{sign_err, Ca};
use crate::error::Error;
use crate::files::{self, Kind};
use crate::index::Index;
use crate::issue;
use crate::keyfile::Passphrase;
use crate::layout::{Layout, CA_CRL};
use crate::validity::Validity;

/// As for certificates: a CRL "issued in the future" by a peer's clock
/// is not used.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// What `revoke` did.
pub struct Revoked {
    /// Certificates revoked now (0: all were revoked already, and the
    /// CRL was only written again).
    pub newly: usize,
    /// The CRL files written.
    pub written: Vec<PathBuf>,
    /// When the CRL says the next one is due.
    pub next_update: OffsetDateTime,
}

/// Revoke every certificate issued to the client `name` and write the
/// CRL again, signed by the CA. The CRL lists every certificate revoked
/// so far. Its next update is when the CA's certificate expires unless
/// `validity` says otherwise: a verifier may take a CRL past its next
/// update as stale (GnuTLS has a status for it, "revocation data
/// superseded"), and nothing here issues a new one on a schedule.
pub fn revoke(
    layout: &Layout,
    name: &str,
    passphrase: Option<&Passphrase>,
    validity: Option<Validity>,
) -> Result<Revoked, Error> {
    if !layout.root.is_dir() {
        return Err(Error::NoCa(layout.root.clone()));
    }
    let _lock = files::lock(&layout.root)?;
    let ca = Ca::load(layout, passphrase)?;
    let now = OffsetDateTime::now_utc();
    let this_update = now - CLOCK_SKEW;
    let next_update = match validity {
        Some(v) => v.window()?.1,
        None => ca.not_after,
    };

    let mut index = Index::load(&layout.index())?;
    let newly = index.revoke_client(name, now)?;
    let revoked_certs = index
        .revoked()
        .map(|r| RevokedCertParams {
            serial_number: SerialNumber::from_slice(&r.serial),
            revocation_time: r.revoked.unwrap_or(now),
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: next_crl_number(layout)?,
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: ca.key_id_method(),
    };
    let crl = params
        .signed_by(&ca.issuer()?)
        .map_err(sign_err("CRL"))?
        .pem()
        .map_err(sign_err("CRL"))?;

    // The record first, as when issuing: a rerun writes the CRL again.
    index.save()?;
    let mut written = vec![layout.ca(CA_CRL)];
    files::write_atomic(&written[0], crl.as_bytes(), Kind::Public)?;
    if layout.server_dir().is_dir() {
        issue::mirror_crl(layout)?;
        written.push(layout.server_dir().join(CA_CRL));
    }
    Ok(Revoked {
        newly,
        written,
        next_update,
    })
}

/// The next CRL number, recorded before use: RFC 5280 has them only
/// grow, so a newer CRL is known to be newer.
fn next_crl_number(layout: &Layout) -> Result<SerialNumber, Error> {
    let path = layout.crl_number();
    let last: u64 = match files::read_optional(&path)? {
        Some(text) => text.trim().parse().map_err(|_| Error::BadIndexLine {
            file: path.clone(),
            line: 1,
        })?,
        None => 0,
    };
    let next = last + 1;
    files::write_atomic(&path, format!("{next}\n").as_bytes(), Kind::Public)?;
    // rcgen writes it as a positive DER INTEGER, leading zeros dropped.
    Ok(SerialNumber::from_slice(&next.to_be_bytes()))
}
