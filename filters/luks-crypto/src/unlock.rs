//! Opening a keyslot with a passphrase: derive the slot key, decrypt the
//! split key material, merge it, and check the result against the digest.

use std::fmt;
use std::time::Instant;

use zeroize::Zeroizing;

use crate::header::{Header, Keyslot, ReadAt};
use crate::kdf::{af_merge, DeriveError};
use crate::sector::{self, CipherError};

/// Why no keyslot gave the volume key. None of these holds the secret.
#[derive(Debug)]
pub enum UnlockError {
    /// The keyslot asked for by number is not one of the active ones.
    NotActive(u32),
    /// No keyslot may be tried without being asked for by number.
    NoActiveKeyslot,
    /// Every slot tried derived a key the digest refuses.
    WrongPassphrase {
        /// The slots tried, in the order they were tried.
        tried: Vec<u32>,
    },
    /// A slot's key could not be derived.
    Derive {
        /// The keyslot.
        slot: u32,
        /// Why.
        source: DeriveError,
    },
    /// A slot's key material could not be read.
    ReadMaterial {
        /// The keyslot.
        slot: u32,
        /// The reader's error.
        source: std::io::Error,
    },
    /// A slot's key-material cipher cannot be built.
    Cipher(CipherError),
}

impl fmt::Display for UnlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnlockError::NotActive(n) => write!(f, "keyslot {n} is not an active keyslot"),
            UnlockError::NoActiveKeyslot => f.write_str("the header has no active keyslot"),
            UnlockError::WrongPassphrase { tried } => {
                let tried: Vec<String> = tried.iter().map(u32::to_string).collect();
                write!(
                    f,
                    "wrong passphrase or key file: no keyslot opens with it (tried {})",
                    tried.join(", ")
                )
            }
            UnlockError::Derive { slot, source } => write!(f, "keyslot {slot}: {source}"),
            UnlockError::ReadMaterial { slot, source } => {
                write!(f, "keyslot {slot}: reading key material: {source}")
            }
            UnlockError::Cipher(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UnlockError {}

/// The volume key and the slot that gave it.
pub struct Unlocked {
    /// The keyslot that opened.
    pub slot: u32,
    /// The volume key, wiped when dropped.
    pub key: Zeroizing<Vec<u8>>,
}

/// Try the header's keyslots (or only `only`) with `passphrase`, highest
/// priority first. Errors say which slots were tried, never the secret.
pub fn unlock(
    header: &Header,
    passphrase: &[u8],
    only: Option<u32>,
    read: &mut ReadAt,
    log: &mut dyn FnMut(&str),
) -> Result<Unlocked, UnlockError> {
    let mut slots: Vec<&Keyslot> = header
        .keyslots
        .iter()
        .filter(|k| match only {
            Some(n) => k.id == n,
            None => k.priority > 0,
        })
        .collect();
    if slots.is_empty() {
        return Err(match only {
            Some(n) => UnlockError::NotActive(n),
            None => UnlockError::NoActiveKeyslot,
        });
    }
    slots.sort_by_key(|k| (std::cmp::Reverse(k.priority), k.id));
    for k in &slots {
        let start = Instant::now();
        let key = open_slot(header, k, passphrase, read)?;
        log(&format!(
            "keyslot {}: {} in {:.2} s",
            k.id,
            if key.is_some() {
                "unlocked"
            } else {
                "passphrase does not match"
            },
            start.elapsed().as_secs_f64()
        ));
        if let Some(key) = key {
            return Ok(Unlocked { slot: k.id, key });
        }
    }
    Err(UnlockError::WrongPassphrase {
        tried: slots.iter().map(|k| k.id).collect(),
    })
}

/// The volume key if `passphrase` opens slot `k`, `None` if it does not;
/// an error only when the slot cannot be read at all.
fn open_slot(
    header: &Header,
    k: &Keyslot,
    passphrase: &[u8],
    read: &mut ReadAt,
) -> Result<Option<Zeroizing<Vec<u8>>>, UnlockError> {
    let slot = k.id;
    let slot_key = k
        .kdf
        .derive(passphrase, k.area_key_bytes)
        .map_err(|source| UnlockError::Derive { slot, source })?;
    let len = header.key_bytes * k.stripes;
    let mut material = Zeroizing::new(vec![0u8; len.div_ceil(512) * 512]);
    read(&mut material, k.area_offset)
        .map_err(|source| UnlockError::ReadMaterial { slot, source })?;
    sector::new(&k.area_cipher, &slot_key)
        .map_err(UnlockError::Cipher)?
        .decrypt(&mut material, 512, 0);
    let key = af_merge(&material, header.key_bytes, k.stripes, k.af_hash);
    Ok(k.digest.matches(&key).then_some(key))
}
