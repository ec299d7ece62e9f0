//! Private keys as PEM files: PKCS#8, and for the CA optionally
//! encrypted under a passphrase (PKCS#8 PBES2: PBKDF2-HMAC-SHA256 and
//! AES-256-CBC, which GnuTLS's `certtool --password` and OpenSSL read).

use std::path::{Path, PathBuf};

use pkcs8::der::pem::LineEnding;
use pkcs8::pkcs5::pbes2;
use pkcs8::{EncryptedPrivateKeyInfo, PrivateKeyInfo, SecretDocument};
use rcgen::KeyPair;
use zeroize::Zeroizing;

use crate::error::{io, Error};
use crate::random;

/// PBKDF2 rounds for an encrypted key: OWASP's 2023 figure for
/// HMAC-SHA256. A key is decrypted once per command, so a fraction of a
/// second is a price worth paying against guessing.
const PBKDF2_ROUNDS: u32 = 600_000;

const PLAIN_LABEL: &str = "PRIVATE KEY";
const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";

/// A passphrase, read from a file so that it is in no command line.
pub struct Passphrase {
    bytes: Zeroizing<Vec<u8>>,
}

impl Passphrase {
    /// The passphrase in `path`: its contents less one trailing line
    /// break, so that `echo secret > file` means "secret".
    pub fn read(path: &Path) -> Result<Passphrase, Error> {
        let mut bytes = Zeroizing::new(std::fs::read(path).map_err(io(path))?);
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(Error::EmptyPassphrase(path.to_path_buf()));
        }
        Ok(Passphrase { bytes })
    }
}

/// `key` as a PEM file's text, encrypted under `passphrase` if one is
/// given.
pub fn to_pem(key: &KeyPair, passphrase: Option<&Passphrase>) -> Result<Zeroizing<String>, Error> {
    let der = Zeroizing::new(key.serialize_der());
    let bad = |e: &dyn std::fmt::Display| Error::Sign {
        what: "private key file",
        why: e.to_string(),
    };
    let (doc, label) = match passphrase {
        None => (
            SecretDocument::try_from(der.as_slice()).map_err(|e| bad(&e))?,
            PLAIN_LABEL,
        ),
        Some(p) => {
            let salt = random::bytes::<16>()?;
            let iv = random::bytes::<16>()?;
            let params = pbes2::Parameters::pbkdf2_sha256_aes256cbc(PBKDF2_ROUNDS, &salt, &iv)
                .map_err(|e| bad(&e))?;
            let info = PrivateKeyInfo::try_from(der.as_slice()).map_err(|e| bad(&e))?;
            let doc = info
                .encrypt_with_params(params, p.bytes.as_slice())
                .map_err(|e| bad(&e))?;
            (doc, ENCRYPTED_LABEL)
        }
    };
    doc.to_pem(label, LineEnding::LF).map_err(|e| bad(&e))
}

/// The key in the PEM file at `path`, decrypted with `passphrase` if it
/// is encrypted.
pub fn load(path: &Path, passphrase: Option<&Passphrase>) -> Result<Zeroizing<KeyPair>, Error> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
    let not_a_key = |path: &Path| Error::BadPem {
        path: path.to_path_buf(),
        what: "a PKCS#8 private key".into(),
    };
    let (label, doc) = SecretDocument::from_pem(&text).map_err(|_| not_a_key(path))?;
    let plain = match label {
        PLAIN_LABEL => doc,
        ENCRYPTED_LABEL => {
            let p = passphrase.ok_or_else(|| Error::NeedPassphrase(path.to_path_buf()))?;
            let info =
                EncryptedPrivateKeyInfo::try_from(doc.as_bytes()).map_err(|_| not_a_key(path))?;
            info.decrypt(p.bytes.as_slice())
                .map_err(|_| Error::WrongPassphrase(path.to_path_buf()))?
        }
        _ => return Err(not_a_key(path)),
    };
    let key = KeyPair::try_from(plain.as_bytes()).map_err(|_| match label {
        // A wrong passphrase can decrypt, by chance, to garbage with
        // valid padding.
        ENCRYPTED_LABEL => Error::WrongPassphrase(PathBuf::from(path)),
        _ => not_a_key(path),
    })?;
    Ok(Zeroizing::new(key))
}
