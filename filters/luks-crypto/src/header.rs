//! Reading LUKS1 and LUKS2 headers into one description of the volume:
//! its data cipher and layout, and the keyslots that can unlock it.
//!
//! Everything here is a pure function of the bytes a reader returns, so
//! unit tests feed it buffers and a filter feeds it its disk. Anything
//! this crate cannot serve correctly (an unknown cipher, integrity
//! protection, a reencryption in progress) is refused here, naming it.

use base64::Engine as _;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

use crate::kdf::{Hash, Kdf, UnsupportedHash};
use crate::sector::{self, CipherError};

/// Reads exactly `buf.len()` bytes at a byte offset of the header device;
/// its error is shown as it is.
pub type ReadAt<'a> = dyn FnMut(&mut [u8], u64) -> std::io::Result<()> + 'a;

/// Why a header cannot be used: unreadable, not LUKS, damaged, or asking
/// for something this crate does not serve (which it names).
#[derive(Debug)]
pub enum HeaderError {
    /// The first header bytes could not be read; the reader's error.
    Read(std::io::Error),
    /// No LUKS magic at offset 0.
    NotLuks,
    /// A LUKS version other than 1 and 2.
    Version(u16),
    /// A hash named by the header (digest, KDF or anti-forensic split).
    Hash(UnsupportedHash),
    /// The data cipher, with the volume key's length.
    Cipher(CipherError),
    /// A LUKS1 key length outside 16 to 64 bytes.
    Luks1KeyLength(usize),
    /// A keyslot whose split key material would be empty or too large.
    Stripes {
        /// The keyslot.
        slot: u32,
        /// Its stripe count.
        stripes: usize,
    },
    /// A keyslot whose Argon2 would take too much memory, or no lanes or
    /// too many.
    Argon2Range {
        /// The keyslot.
        slot: u32,
        /// Its memory cost, in KiB.
        memory_kib: u32,
        /// Its lanes.
        lanes: u32,
    },
    /// Neither LUKS2 header copy has a valid checksum.
    NoValidCopy,
    /// The LUKS2 JSON metadata does not parse.
    Json(serde_json::Error),
    /// LUKS2 mandatory requirements (a reencryption in progress).
    Requirements(Vec<String>),
    /// More than one LUKS2 data segment (a reencryption in progress?).
    Segments(usize),
    /// A LUKS2 data segment of a type other than `crypt`.
    SegmentType(String),
    /// LUKS2 integrity protection (dm-integrity).
    Integrity,
    /// A LUKS2 data segment without an encryption.
    NoEncryption,
    /// A LUKS2 sector size outside 512 to 4096, or not a power of two.
    SectorSize(u32),
    /// A LUKS2 data segment size that is neither a number nor `dynamic`.
    SegmentSize(String),
    /// A LUKS2 base64 field that does not decode.
    Base64 {
        /// Which field: `digest`, `digest salt` or `kdf salt`.
        field: &'static str,
        /// The decoder's error.
        source: base64::DecodeError,
    },
    /// A LUKS2 digest too short to tell keys apart, in bytes.
    DigestTooShort(usize),
    /// A LUKS2 keyslot whose JSON does not parse.
    KeyslotJson {
        /// The keyslot, as the JSON names it.
        slot: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A LUKS2 keyslot without an anti-forensic split.
    NoAf(String),
    /// A LUKS2 keyslot whose anti-forensic split is not `luks1`.
    AfType {
        /// The keyslot, as the JSON names it.
        slot: String,
        /// The split's type.
        kind: String,
    },
    /// A LUKS2 keyslot's KDF without one of the values its type needs.
    KdfMissing {
        /// The keyslot, as the JSON names it.
        slot: String,
        /// The missing value.
        what: &'static str,
    },
    /// A LUKS2 keyslot's KDF of a type other than PBKDF2 and Argon2.
    KdfType {
        /// The keyslot, as the JSON names it.
        slot: String,
        /// The KDF's type.
        kind: String,
    },
    /// A LUKS2 keyslot's area without an encryption.
    AreaWithoutEncryption(String),
    /// A LUKS2 keyslot's area cipher.
    AreaCipher {
        /// The keyslot, as the JSON names it.
        slot: String,
        /// What is wrong with its cipher.
        source: CipherError,
    },
    /// A LUKS2 keyslot named by something other than a number.
    KeyslotId(String),
    /// No LUKS2 keyslot this crate can open.
    NoUsableKeyslot,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Read(e) => write!(f, "{e}"),
            HeaderError::NotLuks => f.write_str("not a LUKS disk (no LUKS magic at offset 0)"),
            HeaderError::Version(v) => {
                write!(f, "LUKS version {v} is not supported (1 and 2 are)")
            }
            HeaderError::Hash(e) => write!(f, "{e}"),
            HeaderError::Cipher(e) => write!(f, "{e}"),
            HeaderError::Luks1KeyLength(n) => {
                write!(f, "LUKS1 header: implausible key length {n}")
            }
            HeaderError::Stripes { slot, stripes } => {
                write!(f, "keyslot {slot}: implausible stripe count {stripes}")
            }
            HeaderError::Argon2Range {
                slot,
                memory_kib,
                lanes,
            } => write!(
                f,
                "keyslot {slot}: argon2 memory {memory_kib} KiB with {lanes} lanes is out of range"
            ),
            HeaderError::NoValidCopy => f.write_str("LUKS2 header: no copy with a valid checksum"),
            HeaderError::Json(e) => write!(f, "LUKS2 JSON metadata: {e}"),
            HeaderError::Requirements(r) => write!(
                f,
                "LUKS2 requirement {} is not supported (a reencryption in progress must be finished with cryptsetup first)",
                r.join(", ")
            ),
            HeaderError::Segments(n) => write!(
                f,
                "LUKS2 with {n} data segments (a reencryption in progress?) is not supported"
            ),
            HeaderError::SegmentType(t) => write!(f, "LUKS2 segment type {t} is not supported"),
            HeaderError::Integrity => {
                f.write_str("LUKS2 integrity protection (dm-integrity) is not supported")
            }
            HeaderError::NoEncryption => f.write_str("LUKS2 segment without an encryption"),
            HeaderError::SectorSize(n) => write!(f, "LUKS2 sector size {n} is not supported"),
            HeaderError::SegmentSize(s) => write!(f, "LUKS2 segment size {s:?}"),
            HeaderError::Base64 { field, source } => write!(f, "LUKS2 {field}: {source}"),
            HeaderError::DigestTooShort(n) => {
                write!(f, "LUKS2 digest of {n} bytes is too short")
            }
            HeaderError::KeyslotJson { slot, source } => write!(f, "LUKS2 keyslot {slot}: {source}"),
            HeaderError::NoAf(slot) => write!(f, "LUKS2 keyslot {slot} without af"),
            HeaderError::AfType { slot, kind } => {
                write!(f, "LUKS2 keyslot {slot}: af type {kind} is not supported")
            }
            HeaderError::KdfMissing { slot, what } => {
                write!(f, "LUKS2 keyslot {slot}: kdf without {what}")
            }
            HeaderError::KdfType { slot, kind } => {
                write!(f, "LUKS2 keyslot {slot}: kdf {kind} is not supported")
            }
            HeaderError::AreaWithoutEncryption(slot) => {
                write!(f, "LUKS2 keyslot {slot}: area without encryption")
            }
            HeaderError::AreaCipher { slot, source } => write!(f, "LUKS2 keyslot {slot}: {source}"),
            HeaderError::KeyslotId(id) => write!(f, "LUKS2 keyslot id {id:?}"),
            HeaderError::NoUsableKeyslot => f.write_str("LUKS2 header has no usable keyslot"),
        }
    }
}

impl std::error::Error for HeaderError {}

impl From<UnsupportedHash> for HeaderError {
    fn from(e: UnsupportedHash) -> Self {
        HeaderError::Hash(e)
    }
}

impl From<CipherError> for HeaderError {
    fn from(e: CipherError) -> Self {
        HeaderError::Cipher(e)
    }
}

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const LUKS1_HEADER: usize = 592;
const LUKS1_ACTIVE: u32 = 0x00ac_71f3;
const LUKS2_BINARY: usize = 4096;
/// Where a LUKS2 secondary header may sit when the primary is damaged.
const LUKS2_SECONDARY: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];

/// How the volume key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Hash of the PBKDF2 that makes the digest.
    pub hash: Hash,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: Vec<u8>,
    /// The expected PBKDF2 output for the volume key.
    pub value: Vec<u8>,
}

impl Digest {
    /// Whether `key` is the volume key this digest describes.
    pub fn matches(&self, key: &[u8]) -> bool {
        let mut out = zeroize::Zeroizing::new(vec![0u8; self.value.len()]);
        self.hash.pbkdf2(key, &self.salt, self.iterations, &mut out);
        *out == self.value
    }
}

/// One active keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyslot {
    /// Keyslot number, as cryptsetup shows it.
    pub id: u32,
    /// LUKS2 priority: 2 tried first, 0 only when asked for by number.
    pub priority: u8,
    /// How the passphrase becomes this slot's key.
    pub kdf: Kdf,
    /// Byte offset of the encrypted, split key material.
    pub area_offset: u64,
    /// Cipher of the key material, in dm-crypt notation.
    pub area_cipher: String,
    /// Length of the key of `area_cipher`, in bytes.
    pub area_key_bytes: usize,
    /// Number of anti-forensic stripes the volume key is split into.
    pub stripes: usize,
    /// Hash of the anti-forensic diffuser.
    pub af_hash: Hash,
    /// How the volume key this slot gives is checked.
    pub digest: Digest,
}

/// The most split key material a slot may have (cryptsetup writes 4000
/// stripes of at most 64 bytes), so a hostile header cannot make us
/// allocate without bound.
const MAX_MATERIAL: usize = 4 << 20;
/// cryptsetup's own ceiling for Argon2 memory (4 GiB, in KiB).
const MAX_ARGON2_KIB: u32 = 4 << 20;

impl Keyslot {
    fn checked(self, key_bytes: usize) -> Result<Keyslot, HeaderError> {
        let slot = self.id;
        if self.stripes == 0 || key_bytes.saturating_mul(self.stripes) > MAX_MATERIAL {
            return Err(HeaderError::Stripes {
                slot,
                stripes: self.stripes,
            });
        }
        if let Kdf::Argon2 {
            memory_kib, lanes, ..
        } = self.kdf
        {
            if memory_kib > MAX_ARGON2_KIB || lanes == 0 || lanes > 64 {
                return Err(HeaderError::Argon2Range {
                    slot,
                    memory_kib,
                    lanes,
                });
            }
        }
        Ok(self)
    }
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// LUKS version: 1 or 2.
    pub version: u8,
    /// Data cipher in dm-crypt notation, for example `aes-xts-plain64`.
    pub cipher: String,
    /// Length of the volume key, in bytes.
    pub key_bytes: usize,
    /// Encryption sector size in bytes: 512 for LUKS1, 512 to 4096 for LUKS2.
    pub sector_size: u32,
    /// Byte offset of the encrypted data.
    pub payload_offset: u64,
    /// Fixed size of the encrypted data; `None` runs to the end of the disk.
    pub payload_size: Option<u64>,
    /// Added to the sector number (in 512-byte units) before the IV is made.
    pub iv_tweak: u64,
    /// The active keyslots this crate can open.
    pub keyslots: Vec<Keyslot>,
    /// The header bytes read, and where they were read (the LUKS2 copy
    /// used may be the secondary), so a connection can check that its disk
    /// carries the header that was unlocked.
    pub raw: Vec<u8>,
    /// Byte offset `raw` was read at.
    pub raw_at: u64,
}

/// Read and parse the header at the start of the device behind `read`.
pub fn read(read: &mut ReadAt) -> Result<Header, HeaderError> {
    let mut bin = vec![0u8; LUKS2_BINARY];
    read(&mut bin[..LUKS1_HEADER], 0).map_err(HeaderError::Read)?;
    if &bin[..6] != MAGIC {
        return Err(HeaderError::NotLuks);
    }
    match be16(&bin, 6) {
        1 => luks1(&bin[..LUKS1_HEADER]),
        2 => luks2(read),
        v => Err(HeaderError::Version(v)),
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
/// A NUL-padded string field.
fn field(b: &[u8], at: usize, len: usize) -> String {
    let f = &b[at..at + len];
    let end = f.iter().position(|&c| c == 0).unwrap_or(len);
    String::from_utf8_lossy(&f[..end]).into_owned()
}

fn luks1(b: &[u8]) -> Result<Header, HeaderError> {
    let cipher = format!("{}-{}", field(b, 8, 32), field(b, 40, 32));
    let hash = Hash::parse(&field(b, 72, 32))?;
    let key_bytes = be32(b, 108) as usize;
    if !(16..=64).contains(&key_bytes) {
        return Err(HeaderError::Luks1KeyLength(key_bytes));
    }
    sector::check(&cipher, key_bytes)?;
    let digest = Digest {
        hash,
        iterations: be32(b, 164),
        salt: b[132..164].to_vec(),
        value: b[112..132].to_vec(),
    };
    let keyslots = (0..8)
        .filter_map(|i| {
            let s = &b[208 + 48 * i..208 + 48 * (i + 1)];
            (be32(s, 0) == LUKS1_ACTIVE).then(|| Keyslot {
                id: i as u32,
                priority: 1,
                kdf: Kdf::Pbkdf2 {
                    hash,
                    iterations: be32(s, 4),
                    salt: s[8..40].to_vec(),
                },
                area_offset: u64::from(be32(s, 40)) * 512,
                area_cipher: cipher.clone(),
                area_key_bytes: key_bytes,
                stripes: be32(s, 44) as usize,
                af_hash: hash,
                digest: digest.clone(),
            })
        })
        .map(|k| k.checked(key_bytes))
        .collect::<Result<_, HeaderError>>()?;
    Ok(Header {
        version: 1,
        cipher,
        key_bytes,
        sector_size: 512,
        payload_offset: u64::from(be32(b, 104)) * 512,
        payload_size: None,
        iv_tweak: 0,
        keyslots,
        raw: b.to_vec(),
        raw_at: 0,
    })
}

/// A LUKS2 header copy: its sequence number, offset and bytes.
type Copy = (u64, u64, Vec<u8>);

/// Read the LUKS2 header copy at `at`; `None` when it is absent or its
/// checksum does not match.
fn luks2_copy(read: &mut ReadAt, at: u64) -> Option<Copy> {
    let mut bin = vec![0u8; LUKS2_BINARY];
    read(&mut bin, at).ok()?;
    if &bin[..6] != MAGIC && &bin[..6] != b"SKUL\xba\xbe" || be16(&bin, 6) != 2 {
        return None;
    }
    let size = be64(&bin, 8);
    if !(LUKS2_BINARY as u64 * 2..=4 << 20).contains(&size) || be64(&bin, 256) != at {
        return None;
    }
    let mut all = vec![0u8; size as usize];
    all[..LUKS2_BINARY].copy_from_slice(&bin);
    read(&mut all[LUKS2_BINARY..], at + LUKS2_BINARY as u64).ok()?;
    let hash = Hash::parse(&field(&bin, 72, 32)).ok()?;
    let stored = bin[448..448 + hash.digest_len()].to_vec();
    all[448..448 + 64].fill(0);
    if hash.digest(&[&all]) != stored {
        return None;
    }
    all[448..448 + hash.digest_len()].copy_from_slice(&stored);
    Some((be64(&bin, 16), at, all))
}

fn luks2(read: &mut ReadAt) -> Result<Header, HeaderError> {
    let primary = luks2_copy(read, 0);
    let secondary_at = primary
        .as_ref()
        .map(|(_, _, b)| vec![b.len() as u64])
        .unwrap_or_else(|| LUKS2_SECONDARY.to_vec());
    let secondary = secondary_at.into_iter().find_map(|at| luks2_copy(read, at));
    let (_, raw_at, raw) = match (primary, secondary) {
        (Some(p), Some(s)) if s.0 > p.0 => s,
        (Some(p), _) => p,
        (None, Some(s)) => s,
        (None, None) => return Err(HeaderError::NoValidCopy),
    };
    let area = &raw[LUKS2_BINARY..];
    let end = area.iter().position(|&c| c == 0).unwrap_or(area.len());
    let meta: Metadata = serde_json::from_slice(&area[..end]).map_err(HeaderError::Json)?;
    from_metadata(meta, raw, raw_at)
}

#[derive(Deserialize)]
struct Metadata {
    /// Parsed one by one: only `luks2` keyslots are ours to understand
    /// (a `reencrypt` slot has no KDF, for example).
    keyslots: BTreeMap<String, serde_json::Value>,
    segments: BTreeMap<String, Segment>,
    digests: BTreeMap<String, JsonDigest>,
    #[serde(default)]
    config: Config,
}

#[derive(Deserialize)]
struct JsonKeyslot {
    key_size: usize,
    #[serde(default)]
    priority: Option<u8>,
    area: Area,
    kdf: JsonKdf,
    af: Option<Af>,
}

#[derive(Deserialize)]
struct Area {
    #[serde(rename = "type")]
    kind: String,
    #[serde(with = "text_u64")]
    offset: u64,
    encryption: Option<String>,
    key_size: Option<usize>,
}

#[derive(Deserialize)]
struct Af {
    #[serde(rename = "type")]
    kind: String,
    stripes: usize,
    hash: String,
}

#[derive(Deserialize)]
struct JsonKdf {
    #[serde(rename = "type")]
    kind: String,
    salt: String,
    hash: Option<String>,
    iterations: Option<u32>,
    time: Option<u32>,
    memory: Option<u32>,
    cpus: Option<u32>,
}

#[derive(Deserialize)]
struct Segment {
    #[serde(rename = "type")]
    kind: String,
    #[serde(with = "text_u64")]
    offset: u64,
    size: String,
    #[serde(default, with = "opt_text_u64")]
    iv_tweak: Option<u64>,
    encryption: Option<String>,
    sector_size: Option<u32>,
    integrity: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct JsonDigest {
    #[serde(rename = "type")]
    kind: String,
    keyslots: Vec<String>,
    segments: Vec<String>,
    hash: String,
    iterations: u32,
    salt: String,
    digest: String,
}

#[derive(Deserialize, Default)]
struct Config {
    requirements: Option<Requirements>,
}

#[derive(Deserialize)]
struct Requirements {
    #[serde(default)]
    mandatory: Vec<String>,
}

/// LUKS2 writes 64-bit numbers as JSON strings.
mod text_u64 {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod opt_text_u64 {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

fn b64(s: &str, field: &'static str) -> Result<Vec<u8>, HeaderError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|source| HeaderError::Base64 { field, source })
}

fn from_metadata(meta: Metadata, raw: Vec<u8>, raw_at: u64) -> Result<Header, HeaderError> {
    if let Some(r) = meta.config.requirements {
        if !r.mandatory.is_empty() {
            return Err(HeaderError::Requirements(r.mandatory));
        }
    }
    if meta.segments.len() != 1 {
        return Err(HeaderError::Segments(meta.segments.len()));
    }
    let (seg_id, seg) = meta.segments.into_iter().next().unwrap();
    if seg.kind != "crypt" {
        return Err(HeaderError::SegmentType(seg.kind));
    }
    if seg.integrity.is_some() {
        return Err(HeaderError::Integrity);
    }
    let cipher = seg.encryption.ok_or(HeaderError::NoEncryption)?;
    let sector_size = seg.sector_size.unwrap_or(512);
    if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
        return Err(HeaderError::SectorSize(sector_size));
    }
    let payload_size = match seg.size.as_str() {
        "dynamic" => None,
        s => Some(
            s.parse::<u64>()
                .map_err(|_| HeaderError::SegmentSize(s.to_owned()))?,
        ),
    };
    let digests: Vec<(Vec<String>, Digest)> = meta
        .digests
        .into_values()
        .filter(|d| d.kind == "pbkdf2" && d.segments.contains(&seg_id))
        .map(|d| {
            let value = b64(&d.digest, "digest")?;
            // An empty or short digest would let any passphrase "match".
            if value.len() < 16 {
                return Err(HeaderError::DigestTooShort(value.len()));
            }
            Ok((
                d.keyslots,
                Digest {
                    hash: Hash::parse(&d.hash)?,
                    iterations: d.iterations,
                    salt: b64(&d.salt, "digest salt")?,
                    value,
                },
            ))
        })
        .collect::<Result<_, HeaderError>>()?;
    let mut key_bytes = None;
    let mut keyslots = Vec::new();
    for (id, k) in meta.keyslots {
        let Some((_, digest)) = digests.iter().find(|(slots, _)| slots.contains(&id)) else {
            continue;
        };
        if k.get("type").and_then(|t| t.as_str()) != Some("luks2") {
            continue;
        }
        let k: JsonKeyslot =
            serde_json::from_value(k).map_err(|source| HeaderError::KeyslotJson {
                slot: id.clone(),
                source,
            })?;
        if k.area.kind != "raw" {
            continue;
        }
        let af = k.af.ok_or_else(|| HeaderError::NoAf(id.clone()))?;
        if af.kind != "luks1" {
            return Err(HeaderError::AfType {
                slot: id,
                kind: af.kind,
            });
        }
        let salt = b64(&k.kdf.salt, "kdf salt")?;
        let missing = |what: &'static str| HeaderError::KdfMissing {
            slot: id.clone(),
            what,
        };
        let kdf = match k.kdf.kind.as_str() {
            "pbkdf2" => Kdf::Pbkdf2 {
                hash: Hash::parse(k.kdf.hash.as_deref().ok_or_else(|| missing("hash"))?)?,
                iterations: k.kdf.iterations.ok_or_else(|| missing("iterations"))?,
                salt,
            },
            "argon2i" | "argon2id" => Kdf::Argon2 {
                id: k.kdf.kind == "argon2id",
                time: k.kdf.time.ok_or_else(|| missing("time"))?,
                memory_kib: k.kdf.memory.ok_or_else(|| missing("memory"))?,
                lanes: k.kdf.cpus.ok_or_else(|| missing("cpus"))?,
                salt,
            },
            other => {
                return Err(HeaderError::KdfType {
                    slot: id,
                    kind: other.to_owned(),
                })
            }
        };
        let area_cipher = k
            .area
            .encryption
            .ok_or_else(|| HeaderError::AreaWithoutEncryption(id.clone()))?;
        let area_key_bytes = k.area.key_size.unwrap_or(k.key_size);
        sector::check(&area_cipher, area_key_bytes).map_err(|source| HeaderError::AreaCipher {
            slot: id.clone(),
            source,
        })?;
        key_bytes.get_or_insert(k.key_size);
        keyslots.push(
            Keyslot {
                id: id.parse().map_err(|_| HeaderError::KeyslotId(id.clone()))?,
                priority: k.priority.unwrap_or(1),
                kdf,
                area_offset: k.area.offset,
                area_cipher,
                area_key_bytes,
                stripes: af.stripes,
                af_hash: Hash::parse(&af.hash)?,
                digest: digest.clone(),
            }
            .checked(k.key_size)?,
        );
    }
    let key_bytes = key_bytes.ok_or(HeaderError::NoUsableKeyslot)?;
    sector::check(&cipher, key_bytes)?;
    Ok(Header {
        version: 2,
        cipher,
        key_bytes,
        sector_size,
        payload_offset: seg.offset,
        payload_size,
        iv_tweak: seg.iv_tweak.unwrap_or(0),
        keyslots,
        raw,
        raw_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(disk: &[u8]) -> impl FnMut(&mut [u8], u64) -> std::io::Result<()> + '_ {
        move |buf: &mut [u8], off: u64| {
            let off = off as usize;
            match disk.get(off..off + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => Err(std::io::Error::other("short read")),
            }
        }
    }

    fn luks1_disk(cipher: &str, mode: &str) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        d[..6].copy_from_slice(MAGIC);
        d[6..8].copy_from_slice(&1u16.to_be_bytes());
        d[8..8 + cipher.len()].copy_from_slice(cipher.as_bytes());
        d[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
        d[72..78].copy_from_slice(b"sha256");
        d[104..108].copy_from_slice(&4096u32.to_be_bytes());
        d[108..112].copy_from_slice(&64u32.to_be_bytes());
        d[164..168].copy_from_slice(&1000u32.to_be_bytes());
        let slot = 208 + 48 * 3;
        d[slot..slot + 4].copy_from_slice(&LUKS1_ACTIVE.to_be_bytes());
        d[slot + 4..slot + 8].copy_from_slice(&5000u32.to_be_bytes());
        d[slot + 40..slot + 44].copy_from_slice(&8u32.to_be_bytes());
        d[slot + 44..slot + 48].copy_from_slice(&4000u32.to_be_bytes());
        d
    }

    #[test]
    fn luks1_fields_and_active_slots_are_read() {
        let d = luks1_disk("aes", "xts-plain64");
        let h = read(&mut reader(&d)).unwrap();
        assert_eq!(h.version, 1);
        assert_eq!(h.cipher, "aes-xts-plain64");
        assert_eq!(h.payload_offset, 4096 * 512);
        assert_eq!(h.keyslots.len(), 1);
        let k = &h.keyslots[0];
        assert_eq!((k.id, k.area_offset, k.stripes), (3, 8 * 512, 4000));
        assert_eq!(k.digest.iterations, 1000);
    }

    #[test]
    fn unsupported_luks1_ciphers_are_named() {
        let d = luks1_disk("twofish", "xts-plain64");
        let e = read(&mut reader(&d)).unwrap_err().to_string();
        assert!(e.contains("twofish-xts-plain64"), "{e}");
    }

    #[test]
    fn not_luks_is_said_plainly() {
        let d = vec![0u8; 4096];
        assert!(read(&mut reader(&d))
            .unwrap_err()
            .to_string()
            .contains("not a LUKS"));
    }

    /// A minimal LUKS2 header around `json`, with a correct checksum.
    fn luks2_disk(json: &str, seqid: u64) -> Vec<u8> {
        let size = 16384usize;
        let mut d = vec![0u8; size * 2];
        for (at, copy) in [
            (0usize, MAGIC.as_slice()),
            (size, b"SKUL\xba\xbe".as_slice()),
        ] {
            let h = &mut d[at..at + size];
            h[..6].copy_from_slice(copy);
            h[6..8].copy_from_slice(&2u16.to_be_bytes());
            h[8..16].copy_from_slice(&(size as u64).to_be_bytes());
            h[16..24].copy_from_slice(&seqid.to_be_bytes());
            h[72..78].copy_from_slice(b"sha256");
            h[256..264].copy_from_slice(&(at as u64).to_be_bytes());
            h[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
            let sum = Hash::Sha256.digest(&[h]);
            h[448..480].copy_from_slice(&sum);
        }
        d
    }

    const JSON: &str = r#"{"keyslots":{"0":{"type":"luks2","key_size":64,
        "af":{"type":"luks1","stripes":4000,"hash":"sha256"},
        "area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},
        "kdf":{"type":"argon2id","time":4,"memory":1024,"cpus":2,"salt":"AAAA"}}},
        "tokens":{},
        "segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0",
        "encryption":"aes-xts-plain64","sector_size":4096}},
        "digests":{"0":{"type":"pbkdf2","keyslots":["0"],"segments":["0"],"hash":"sha256",
        "iterations":1000,"salt":"AAAA","digest":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
        "config":{"json_size":"12288","keyslots_size":"16744448"}}"#;

    #[test]
    fn luks2_metadata_is_read_and_checked() {
        let d = luks2_disk(JSON, 1);
        let h = read(&mut reader(&d)).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!((h.sector_size, h.payload_offset), (4096, 16 << 20));
        assert_eq!(h.keyslots[0].area_offset, 32768);
        assert!(matches!(
            h.keyslots[0].kdf,
            Kdf::Argon2 {
                id: true,
                memory_kib: 1024,
                ..
            }
        ));
    }

    #[test]
    fn a_damaged_primary_falls_back_to_the_secondary() {
        let mut d = luks2_disk(JSON, 1);
        d[5000] ^= 1;
        assert_eq!(read(&mut reader(&d)).unwrap().raw_at, 16384);
        d[16384 + 5000] ^= 1;
        assert!(read(&mut reader(&d))
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }

    #[test]
    fn reencryption_and_integrity_are_refused_by_name() {
        let j = JSON.replace(
            r#""config":{"#,
            r#""config":{"requirements":{"mandatory":["online-reencrypt-v2"]},"#,
        );
        let e = read(&mut reader(&luks2_disk(&j, 1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("online-reencrypt-v2"), "{e}");
        let j = JSON.replace(
            r#""sector_size":4096}"#,
            r#""sector_size":4096,"integrity":{"type":"hmac(sha256)"}}"#,
        );
        let e = read(&mut reader(&luks2_disk(&j, 1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("integrity"), "{e}");
        let j = JSON.replace(
            "aes-xts-plain64\",\"sector",
            "serpent-xts-plain64\",\"sector",
        );
        let e = read(&mut reader(&luks2_disk(&j, 1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("serpent"), "{e}");
    }

    /// A tiny deterministic generator, so the mutation tests need no crate.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Hostile headers get an error, never a panic or a huge allocation:
    /// random bytes of a LUKS1 header, and random bytes of LUKS2 JSON
    /// re-checksummed so the parser behind the checksum sees them.
    #[test]
    fn mutated_headers_are_errors_not_panics() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let base = luks1_disk("aes", "xts-plain64");
        for _ in 0..3000 {
            let mut d = base.clone();
            for _ in 0..(xorshift(&mut rng) % 8 + 1) {
                let at = (xorshift(&mut rng) % LUKS1_HEADER as u64) as usize;
                d[at] = xorshift(&mut rng) as u8;
            }
            let _ = read(&mut reader(&d));
        }
        for _ in 0..3000 {
            let mut json = JSON.as_bytes().to_vec();
            for _ in 0..(xorshift(&mut rng) % 4 + 1) {
                let at = (xorshift(&mut rng) % json.len() as u64) as usize;
                let alphabet = b"0123456789\"{}[],:-x ";
                json[at] = alphabet[(xorshift(&mut rng) % alphabet.len() as u64) as usize];
            }
            let d = luks2_disk(&String::from_utf8_lossy(&json), 1);
            let _ = read(&mut reader(&d));
        }
    }
}
