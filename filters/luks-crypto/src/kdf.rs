//! The key-derivation side of LUKS: hashes, PBKDF2 and Argon2 (turning a
//! passphrase into a keyslot key), and the anti-forensic merge that turns a
//! decrypted keyslot back into the volume key.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};

use argon2::{Algorithm, Argon2, Params, Version};
use sha1::Sha1;
use sha2::{Sha256, Sha512};
use zeroize::Zeroizing;

use crate::xor;

/// A hash name that is none of [`Hash`]'s; it holds the name as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedHash(pub String);

impl fmt::Display for UnsupportedHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hash {} is not supported (supported: sha1, sha256, sha512)",
            self.0
        )
    }
}

impl std::error::Error for UnsupportedHash {}

/// Why a keyslot key could not be derived (only Argon2 can fail).
#[derive(Debug)]
pub enum DeriveError {
    /// The header's Argon2 parameters are refused by the implementation.
    Parameters(argon2::Error),
    /// The threads that compute the lanes could not be started.
    Threads(rayon::ThreadPoolBuildError),
    /// Argon2 itself failed.
    Argon2(argon2::Error),
}

impl fmt::Display for DeriveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeriveError::Parameters(e) => write!(f, "argon2 parameters: {e}"),
            DeriveError::Threads(e) => write!(f, "argon2: cannot start threads: {e}"),
            DeriveError::Argon2(e) => write!(f, "argon2: {e}"),
        }
    }
}

impl std::error::Error for DeriveError {}

/// A hash named by a LUKS header (`hash-spec`, `af.hash`, `kdf.hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-1 (`sha1`).
    Sha1,
    /// SHA-256 (`sha256`).
    Sha256,
    /// SHA-512 (`sha512`).
    Sha512,
}

impl Hash {
    /// Parse a header's hash name; the error names it and what would do.
    pub fn parse(name: &str) -> Result<Hash, UnsupportedHash> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            _ => Err(UnsupportedHash(name.to_owned())),
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }

    /// Hash the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: sha2::Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            Hash::Sha1 => run::<Sha1>(parts),
            Hash::Sha256 => run::<Sha256>(parts),
            Hash::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, secret: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(secret, salt, iterations, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(secret, salt, iterations, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(secret, salt, iterations, out),
        }
    }
}

/// How a keyslot turns the passphrase into its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC (LUKS1, and LUKS2's `pbkdf2`).
    Pbkdf2 {
        /// Hash of the HMAC.
        hash: Hash,
        /// Iteration count.
        iterations: u32,
        /// Salt.
        salt: Vec<u8>,
    },
    /// Argon2, version 0x13 (LUKS2's `argon2i` and `argon2id`).
    Argon2 {
        /// Argon2id when true, Argon2i otherwise.
        id: bool,
        /// Number of passes.
        time: u32,
        /// Memory cost, in KiB.
        memory_kib: u32,
        /// Degree of parallelism (cryptsetup's `cpus`).
        lanes: u32,
        /// Salt.
        salt: Vec<u8>,
    },
}

impl Kdf {
    /// Derive a `len`-byte key from `passphrase`.
    pub fn derive(&self, passphrase: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>, DeriveError> {
        let mut out = Zeroizing::new(vec![0u8; len]);
        match self {
            Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => hash.pbkdf2(passphrase, salt, *iterations, &mut out),
            Kdf::Argon2 {
                id,
                time,
                memory_kib,
                lanes,
                salt,
            } => {
                let params = Params::new(*memory_kib, *time, *lanes, Some(len))
                    .map_err(DeriveError::Parameters)?;
                let alg = if *id {
                    Algorithm::Argon2id
                } else {
                    Algorithm::Argon2i
                };
                let argon2 = Argon2::new(alg, Version::V0x13, params);
                on_lanes(*lanes, || {
                    argon2.hash_password_into(passphrase, salt, &mut out)
                })
                .map_err(DeriveError::Threads)?
                .map_err(DeriveError::Argon2)?;
            }
        }
        Ok(out)
    }
}

/// Run `f` with the lanes of an Argon2 derivation computed in parallel, as
/// cryptsetup does, on a pool of this call's own: its threads have all
/// exited when this returns, because the server may fork into the
/// background afterwards and a fork keeps only the calling thread.
fn on_lanes<R: Send>(
    lanes: u32,
    f: impl FnOnce() -> R + Send,
) -> Result<R, rayon::ThreadPoolBuildError> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads = (lanes as usize).clamp(1, cpus);
    let live = Arc::new((Mutex::new(threads), Condvar::new()));
    let on_exit = live.clone();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("luks-kdf{i}"))
        .exit_handler(move |_| {
            let (n, cv) = &*on_exit;
            *n.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            cv.notify_all();
        })
        .build()?;
    let r = pool.install(f);
    drop(pool);
    let (n, cv) = &*live;
    let mut left = n.lock().unwrap_or_else(|e| e.into_inner());
    while *left > 0 {
        left = cv.wait(left).unwrap_or_else(|e| e.into_inner());
    }
    Ok(r)
}

/// Undo LUKS's anti-forensic split: `material` holds `stripes` blocks of
/// `key_len` bytes; all but the last are folded through the hash diffuser
/// and the last XORed in, giving the key.
pub fn af_merge(material: &[u8], key_len: usize, stripes: usize, hash: Hash) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    let mut blocks = material[..key_len * stripes].chunks_exact(key_len);
    for block in blocks.by_ref().take(stripes - 1) {
        xor(&mut d, block);
        diffuse(&mut d, hash);
    }
    xor(&mut d, blocks.next().expect("stripes >= 1"));
    d
}

/// Each hash-sized piece `i` becomes `H(be32(i) || piece)`, truncated.
fn diffuse(buf: &mut [u8], hash: Hash) {
    for (i, piece) in buf.chunks_mut(hash.digest_len()).enumerate() {
        let h = Zeroizing::new(hash.digest(&[&(i as u32).to_be_bytes(), piece]));
        piece.copy_from_slice(&h[..piece.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6070 test vector 2 (PBKDF2-HMAC-SHA1, 2 iterations).
    #[test]
    fn pbkdf2_sha1_matches_rfc_6070() {
        let mut out = [0u8; 20];
        Hash::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
    }

    /// A split built forward (random stripes, the last one chosen so the
    /// merge lands on the key) merges back to the key, for a key longer
    /// than the hash so the diffuser's partial last piece is exercised.
    #[test]
    fn af_merge_inverts_the_split() {
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let key: Vec<u8> = (0..72).map(|i| (i * 13 + 5) as u8).collect();
            let stripes = 7;
            let mut material = Vec::new();
            let mut d = vec![0u8; key.len()];
            for s in 0..stripes - 1 {
                let block: Vec<u8> = (0..key.len()).map(|i| (i * s + 3 * s) as u8).collect();
                xor(&mut d, &block);
                diffuse(&mut d, hash);
                material.extend(block);
            }
            xor(&mut d, &key);
            material.extend(&d);
            assert_eq!(*af_merge(&material, key.len(), stripes, hash), key);
        }
    }

    #[test]
    fn unknown_hashes_are_named() {
        let e = Hash::parse("ripemd160").unwrap_err().to_string();
        assert!(e.contains("ripemd160") && e.contains("sha256"));
        assert_eq!(Hash::parse("SHA256"), Ok(Hash::Sha256));
    }
}
