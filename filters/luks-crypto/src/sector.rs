//! The data ciphers of LUKS, in dm-crypt's notation
//! (`aes-xts-plain64`, `aes-cbc-essiv:sha256`, ...): each encrypts or
//! decrypts whole sectors in place, the IV of a sector being derived from
//! its number.
//!
//! XTS is done here over the `aes` crate's batched block calls rather than
//! with `xts-mode`, which encrypts one block at a time: the tweaks of a
//! sector are computed first, so AES-NI can pipeline eight blocks at once,
//! several times faster on the read path that dominates a disk's life.

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use sha2::{Digest, Sha256};

use crate::xor;

/// Largest LUKS sector; bounds the per-sector tweak table.
pub const MAX_SECTOR: usize = 4096;

/// A sector cipher keyed with a volume (or keyslot) key.
pub trait SectorCipher: Send + Sync {
    /// Encrypt `data` (whole sectors of `sector_size` bytes) in place. IV
    /// numbers count 512-byte units, as dm-crypt's do: the first sector's
    /// is `first_iv`, the next `first_iv + sector_size / 512`, and so on.
    fn encrypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64);
    /// The inverse of [`SectorCipher::encrypt`].
    fn decrypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64);
}

/// How a sector number becomes the IV.
#[derive(Clone, Copy)]
enum IvGen {
    /// 64-bit little-endian sector number.
    Plain64,
    /// 32-bit little-endian sector number (wraps, as dm-crypt's `plain`).
    Plain,
}

impl IvGen {
    fn iv(self, sector: u64) -> [u8; 16] {
        let n = match self {
            IvGen::Plain64 => u128::from(sector),
            IvGen::Plain => u128::from(sector as u32),
        };
        n.to_le_bytes()
    }
}

/// IV number of the `i`th sector of a run starting at IV `first`.
fn iv_at(first: u64, i: usize, sector_size: usize) -> u64 {
    first.wrapping_add((i * (sector_size / 512)) as u64)
}

/// The ciphers and modes this crate implements, for error messages.
pub const SUPPORTED: &str =
    "aes-xts-plain64, aes-xts-plain, aes-cbc-essiv:sha256, aes-cbc-plain64, aes-cbc-plain";

/// A cipher this crate does not implement, or not with the key given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CipherError {
    /// No such cipher and mode here (see [`SUPPORTED`]).
    Unsupported {
        /// The cipher, in dm-crypt notation.
        spec: String,
    },
    /// The cipher is here, but not with a key of this length.
    KeyLength {
        /// The cipher, in dm-crypt notation.
        spec: String,
        /// The key's length, in bits.
        bits: usize,
        /// The key lengths the mode takes, in words.
        takes: &'static str,
    },
}

impl std::fmt::Display for CipherError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CipherError::Unsupported { spec } => {
                write!(f, "cipher {spec} is not supported (supported: {SUPPORTED})")
            }
            CipherError::KeyLength { spec, bits, takes } => write!(
                f,
                "cipher {spec} with a {bits}-bit key is not supported ({takes})"
            ),
        }
    }
}

impl std::error::Error for CipherError {}

/// Build the cipher `spec` with `key`; the error names what is missing.
pub fn new(spec: &str, key: &[u8]) -> Result<Box<dyn SectorCipher>, CipherError> {
    let unsupported = || CipherError::Unsupported {
        spec: spec.to_owned(),
    };
    let (alg, mode) = spec.split_once('-').ok_or_else(unsupported)?;
    if alg != "aes" {
        return Err(unsupported());
    }
    let bad_key = |takes: &'static str| CipherError::KeyLength {
        spec: spec.to_owned(),
        bits: key.len() * 8,
        takes,
    };
    match mode {
        "xts-plain64" | "xts-plain" => {
            let iv = if mode == "xts-plain" {
                IvGen::Plain
            } else {
                IvGen::Plain64
            };
            let (k1, k2) = key.split_at(key.len() / 2);
            match key.len() {
                32 => Ok(Box::new(Xts::<Aes128>::new(k1, k2, iv))),
                64 => Ok(Box::new(Xts::<Aes256>::new(k1, k2, iv))),
                _ => Err(bad_key("XTS takes 256- or 512-bit keys")),
            }
        }
        "cbc-plain64" | "cbc-plain" | "cbc-essiv:sha256" => {
            let iv = match mode {
                "cbc-plain64" => CbcIv::Gen(IvGen::Plain64),
                "cbc-plain" => CbcIv::Gen(IvGen::Plain),
                _ => CbcIv::Essiv(Box::new(Aes256::new(&Sha256::digest(key)))),
            };
            match key.len() {
                16 => Ok(Box::new(Cbc::<Aes128>::new(key, iv))),
                24 => Ok(Box::new(Cbc::<Aes192>::new(key, iv))),
                32 => Ok(Box::new(Cbc::<Aes256>::new(key, iv))),
                _ => Err(bad_key("CBC takes 128-, 192- or 256-bit keys")),
            }
        }
        _ => Err(unsupported()),
    }
}

/// Whether `spec` names a supported cipher for a key of `key_bytes`, without
/// needing the key.
pub fn check(spec: &str, key_bytes: usize) -> Result<(), CipherError> {
    new(spec, &vec![0; key_bytes]).map(drop)
}

/// AES-XTS (IEEE 1619) over 16-byte blocks; LUKS sectors are whole blocks,
/// so no ciphertext stealing is needed.
struct Xts<C> {
    data: C,
    tweak: C,
    iv: IvGen,
}

impl<C: BlockCipher + BlockEncrypt + BlockDecrypt + KeyInit> Xts<C> {
    fn new(k1: &[u8], k2: &[u8], iv: IvGen) -> Self {
        Xts {
            data: C::new_from_slice(k1).expect("key length checked by caller"),
            tweak: C::new_from_slice(k2).expect("key length checked by caller"),
            iv,
        }
    }

    fn run(&self, data: &mut [u8], sector_size: usize, first_iv: u64, encrypt: bool)
    where
        C: BlockCipher<BlockSize = U16>,
    {
        let mut tweaks = [0u8; MAX_SECTOR];
        for (i, sector) in data.chunks_exact_mut(sector_size).enumerate() {
            let tweaks = &mut tweaks[..sector.len()];
            let mut t = GenericArray::from(self.iv.iv(iv_at(first_iv, i, sector_size)));
            self.tweak.encrypt_block(&mut t);
            let mut t = u128::from_le_bytes(t.into());
            for chunk in tweaks.chunks_exact_mut(16) {
                chunk.copy_from_slice(&t.to_le_bytes());
                // Multiply by x in GF(2^128), little-endian, as IEEE 1619.
                t = (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 };
            }
            xor(sector, tweaks);
            let (blocks, _) = InOutBuf::from(&mut *sector).into_chunks::<U16>();
            if encrypt {
                self.data.encrypt_blocks_inout(blocks);
            } else {
                self.data.decrypt_blocks_inout(blocks);
            }
            xor(sector, tweaks);
        }
    }
}

impl<C> SectorCipher for Xts<C>
where
    C: BlockCipher<BlockSize = U16> + BlockEncrypt + BlockDecrypt + KeyInit + Send + Sync,
{
    fn encrypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64) {
        self.run(data, sector_size, first_iv, true);
    }
    fn decrypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64) {
        self.run(data, sector_size, first_iv, false);
    }
}

/// IV generator of a CBC cipher: a sector number, or ESSIV (the sector
/// number encrypted with the hash of the volume key).
enum CbcIv {
    Gen(IvGen),
    Essiv(Box<Aes256>),
}

impl CbcIv {
    fn iv(&self, sector: u64) -> GenericArray<u8, U16> {
        match self {
            CbcIv::Gen(g) => GenericArray::from(g.iv(sector)),
            CbcIv::Essiv(c) => {
                let mut b = GenericArray::from(IvGen::Plain64.iv(sector));
                c.encrypt_block(&mut b);
                b
            }
        }
    }
}

/// AES-CBC, each sector chained from its own IV (the `cbc` crate does the
/// chaining; the key schedule is expanded once and cloned per sector).
struct Cbc<C> {
    cipher: C,
    iv: CbcIv,
}

impl<C: KeyInit> Cbc<C> {
    fn new(key: &[u8], iv: CbcIv) -> Self {
        Cbc {
            cipher: C::new_from_slice(key).expect("key length checked by caller"),
            iv,
        }
    }
}

impl<C> SectorCipher for Cbc<C>
where
    C: BlockCipher<BlockSize = U16> + BlockEncrypt + BlockDecrypt + Clone + Send + Sync,
{
    fn encrypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64) {
        for (i, sector) in data.chunks_exact_mut(sector_size).enumerate() {
            let iv = self.iv.iv(iv_at(first_iv, i, sector_size));
            let mut enc = cbc::Encryptor::<C>::inner_iv_init(self.cipher.clone(), &iv);
            let (blocks, _) = InOutBuf::from(sector).into_chunks::<U16>();
            enc.encrypt_blocks_inout_mut(blocks);
        }
    }
    fn decrypt(&self, data: &mut [u8], sector_size: usize, first_iv: u64) {
        for (i, sector) in data.chunks_exact_mut(sector_size).enumerate() {
            let iv = self.iv.iv(iv_at(first_iv, i, sector_size));
            let mut dec = cbc::Decryptor::<C>::inner_iv_init(self.cipher.clone(), &iv);
            let (blocks, _) = InOutBuf::from(sector).into_chunks::<U16>();
            dec.decrypt_blocks_inout_mut(blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// IEEE 1619-2007 XTS-AES-128 vector 4 (data unit sequence number 0,
    /// 512 bytes of 00..ff twice): the first and last blocks.
    #[test]
    fn xts_aes128_matches_ieee_1619_vector_4() {
        let key = hex(concat!(
            "27182818284590452353602874713526",
            "31415926535897932384626433832795"
        ));
        let c = new("aes-xts-plain64", &key).unwrap();
        let mut data: Vec<u8> = (0..512).map(|i| i as u8).collect();
        c.encrypt(&mut data, 512, 0);
        assert_eq!(data[..16], hex("27a7479befa1d476489f308cd4cfa6e2"));
        assert_eq!(data[496..], hex("0a282df920147beabe421ee5319d0568"));
        c.decrypt(&mut data, 512, 0);
        assert!(data.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    /// IEEE 1619-2007 vector 10: XTS-AES-256, data unit 0xff.
    #[test]
    fn xts_aes256_matches_ieee_1619_vector_10() {
        let key = hex(concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ));
        let c = new("aes-xts-plain64", &key).unwrap();
        let mut data: Vec<u8> = (0..512).map(|i| i as u8).collect();
        c.encrypt(&mut data, 512, 0xff);
        assert_eq!(data[..16], hex("1c3b3a102f770386e4836c99e370cf9b"));
        assert_eq!(data[496..], hex("c4f36ffda9fcea70b9c6e693e148c151"));
    }

    #[test]
    fn every_cipher_round_trips_and_depends_on_the_sector() {
        for (spec, len) in [
            ("aes-xts-plain64", 64),
            ("aes-xts-plain", 32),
            ("aes-cbc-essiv:sha256", 32),
            ("aes-cbc-plain64", 16),
            ("aes-cbc-plain", 24),
        ] {
            let key: Vec<u8> = (0..len).map(|i: u8| i.wrapping_mul(7)).collect();
            let c = new(spec, &key).unwrap();
            let plain: Vec<u8> = (0..8192).map(|i| (i * 31 % 251) as u8).collect();
            let mut a = plain.clone();
            c.encrypt(&mut a, 4096, 10);
            assert_ne!(a, plain, "{spec}");
            assert_ne!(a[..4096], a[4096..], "{spec}: sectors share an IV");
            let mut b = plain[4096..].to_vec();
            c.encrypt(&mut b, 4096, 18);
            assert_eq!(a[4096..], b, "{spec}: IV does not count 512-byte units");
            c.decrypt(&mut a, 4096, 10);
            assert_eq!(a, plain, "{spec}");
        }
    }

    #[test]
    fn other_ciphers_and_key_sizes_are_named_in_the_refusal() {
        let e = check("serpent-xts-plain64", 64).err().unwrap().to_string();
        assert!(e.contains("serpent-xts-plain64") && e.contains("aes-xts-plain64"));
        assert!(check("aes-xts-plain64", 48)
            .unwrap_err()
            .to_string()
            .contains("384-bit"));
        assert!(check("aes-ecb", 32).is_err());
        assert!(check("aes-cbc-essiv:sha1", 32).is_err());
    }
}
