//! Opening a keyslot with a passphrase: derive the slot key, decrypt the
//! split key material, merge it, and check the result against the digest.

use std::time::Instant;

use zeroize::Zeroizing;

use crate::header::{Header, Keyslot, ReadAt};
use crate::kdf::af_merge;
use crate::sector;

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
) -> Result<Unlocked, String> {
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
            Some(n) => format!("keyslot {n} is not an active keyslot"),
            None => "the header has no active keyslot".into(),
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
    let tried: Vec<String> = slots.iter().map(|k| k.id.to_string()).collect();
    Err(format!(
        "wrong passphrase or key file: no keyslot opens with it (tried {})",
        tried.join(", ")
    ))
}

/// The volume key if `passphrase` opens slot `k`, `None` if it does not;
/// an error only when the slot cannot be read at all.
fn open_slot(
    header: &Header,
    k: &Keyslot,
    passphrase: &[u8],
    read: &mut ReadAt,
) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    let slot_key = k
        .kdf
        .derive(passphrase, k.area_key_bytes)
        .map_err(|e| format!("keyslot {}: {e}", k.id))?;
    let len = header.key_bytes * k.stripes;
    let mut material = Zeroizing::new(vec![0u8; len.div_ceil(512) * 512]);
    read(&mut material, k.area_offset)
        .map_err(|e| format!("keyslot {}: reading key material: {e}", k.id))?;
    sector::new(&k.area_cipher, &slot_key)?.decrypt(&mut material, 512, 0);
    let key = af_merge(&material, header.key_bytes, k.stripes, k.af_hash);
    Ok(k.digest.matches(&key).then_some(key))
}
