//! The image header and its extensions (qcow2.txt, "Header" and "Header
//! extensions"): parsed from the first cluster, checked before anything
//! else is read, and patched in place when the engine changes a field, so
//! that extensions it does not understand are kept byte for byte.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Largest cluster qemu opens (and creates): 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's limits on the L1 and refcount tables: images beyond them are not
/// qemu's, and they bound what an opened image holds in memory.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// See [`MAX_L1_BYTES`].
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qemu's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts, not closed cleanly).
    pub const DIRTY: u64 = 1 << 0;
    /// Something is corrupt; the image must not be written.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is not zlib.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits, with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this filter understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Refcount updates may be postponed, with the dirty bit set.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Header extension types.
mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Byte offsets of the fields the engine rewrites.
pub mod field {
    /// `refcount_table_offset` (u64).
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    /// `refcount_table_clusters` (u32).
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    /// `incompatible_features` (u64, version 3).
    pub const INCOMPATIBLE: usize = 72;
    /// `autoclear_features` (u64, version 3).
    pub const AUTOCLEAR: usize = 88;
}

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (qemu's default).
    Zlib,
    /// Zstandard.
    Zstd,
}

/// How guest data is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Not at all.
    None,
    /// A LUKS header stored in the image at `offset`, `length` bytes.
    Luks { offset: u64, length: u64 },
}

/// The parsed header of an image.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub compression: Compression,
    pub encryption: Encryption,
    /// The backing file name as recorded (not NUL-terminated on disk).
    pub backing_file: Option<PathBuf>,
    /// The backing file format extension, if any.
    pub backing_format: Option<String>,
    /// The bitmaps extension is present.
    pub has_bitmaps: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether `v` is a multiple of `1 << bits`.
fn aligned(v: u64, bits: u32) -> bool {
    v & ((1u64 << bits) - 1) == 0
}

/// The names a feature-name table gives, for messages about unknown bits.
fn feature_name(names: &[(u8, u8, String)], kind: u8, bit: u32) -> String {
    names
        .iter()
        .find(|(k, b, _)| *k == kind && u32::from(*b) == bit)
        .map_or_else(
            || format!("bit {bit}"),
            |(_, _, n)| format!("'{n}' (bit {bit})"),
        )
}

impl Header {
    /// Parse and check the header in `first`, the image's first cluster
    /// (or its first 64 KiB, whichever is smaller: enough to hold the
    /// header of any cluster size it then names).
    pub fn parse(first: &[u8]) -> Result<Header> {
        if first.len() < 72 || be32(first, 0) != MAGIC {
            return Err(Error::Invalid(
                "not a qcow2 image (no QFI\\xfb magic)".into(),
            ));
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!(
                "qcow2 version {version}: only versions 2 and 3 exist"
            )));
        }
        let cluster_bits = be32(first, 20);
        if !(9..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::Unsupported(format!(
                "cluster size 2^{cluster_bits}: qemu uses 512 bytes to 2 MiB"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if first.len() < 104 {
                return Err(Error::corrupt("the version 3 header is cut short"));
            }
            (
                be64(first, 72),
                be64(first, 80),
                be64(first, 88),
                be32(first, 96),
                be32(first, 100),
            )
        } else {
            (0, 0, 0, 4, 72)
        };
        if version == 3
            && (header_length < 104
                || header_length % 8 != 0
                || u64::from(header_length) > cluster_size
                || header_length as usize > first.len())
        {
            return Err(Error::corrupt(format!(
                "header length {header_length} is impossible"
            )));
        }
        if refcount_order > 6 {
            return Err(Error::corrupt(format!(
                "refcount order {refcount_order}: at most 6 (64-bit refcounts)"
            )));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            compression: Compression::Zlib,
            encryption: Encryption::None,
            backing_file: None,
            backing_format: None,
            has_bitmaps: false,
        };
        let names = h.read_extensions(first, header_length as usize)?;
        h.check_features(&names)?;
        if version == 3 && header_length >= 105 {
            h.compression = match first[104] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => {
                    return Err(Error::Unsupported(format!(
                        "compression type {other}: only zlib (0) and zstd (1) exist"
                    )))
                }
            };
        }
        if (h.incompatible & incompat::COMPRESSION != 0) != (h.compression != Compression::Zlib) {
            return Err(Error::corrupt(
                "the compression-type feature bit and the compression type disagree",
            ));
        }
        h.read_backing_name(first)?;
        h.check_crypt_method(be32(first, 32))?;
        h.check_tables()?;
        Ok(h)
    }

    /// Walk the header extensions, returning the feature-name table.
    fn read_extensions(&mut self, first: &[u8], start: usize) -> Result<Vec<(u8, u8, String)>> {
        let mut names = Vec::new();
        let mut at = start;
        let mut crypto = None;
        while at + 8 <= first.len() {
            let (typ, len) = (be32(first, at), be32(first, at + 4) as usize);
            at += 8;
            if typ == ext::END {
                break;
            }
            let Some(data) = first.get(at..at.saturating_add(len)) else {
                return Err(Error::corrupt(format!(
                    "header extension {typ:#x} of {len} bytes runs past the first cluster"
                )));
            };
            match typ {
                ext::BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned())
                }
                ext::FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|&b| b == 0).next().unwrap_or_default();
                        names.push((e[0], e[1], String::from_utf8_lossy(name).into_owned()));
                    }
                }
                ext::BITMAPS => self.has_bitmaps = true,
                ext::CRYPTO => {
                    if len < 16 {
                        return Err(Error::corrupt("the encryption header extension is short"));
                    }
                    crypto = Some((be64(data, 0), be64(data, 8)));
                }
                ext::DATA_FILE => {}
                // Unknown extensions are kept as they are: the header is
                // only ever patched in place.
                _ => {}
            }
            at += len.div_ceil(8) * 8;
        }
        if let Some((offset, length)) = crypto {
            self.encryption = Encryption::Luks { offset, length };
        }
        Ok(names)
    }

    /// Refuse what cannot be served: unknown incompatible features and
    /// external data files.
    fn check_features(&self, names: &[(u8, u8, String)]) -> Result<()> {
        let unknown = self.incompatible & !incompat::KNOWN;
        if unknown != 0 {
            let list: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| feature_name(names, 0, b))
                .collect();
            return Err(Error::Unsupported(format!(
                "the image uses incompatible features this filter does not know: {}",
                list.join(", ")
            )));
        }
        if self.incompatible & incompat::DATA_FILE != 0 {
            return Err(Error::Unsupported(
                "the image keeps its data in an external data file (data_file), \
                 which this filter does not serve; convert it with \
                 qemu-img convert -O qcow2"
                    .into(),
            ));
        }
        if self.incompatible & incompat::EXTENDED_L2 != 0 && self.cluster_bits < 14 {
            return Err(Error::corrupt(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        Ok(())
    }

    fn read_backing_name(&mut self, first: &[u8]) -> Result<()> {
        let offset = be64(first, 8);
        let len = be32(first, 16) as u64;
        if offset == 0 {
            return Ok(());
        }
        if len > 1023 || offset + len > first.len() as u64 {
            return Err(Error::corrupt(format!(
                "backing file name of {len} bytes at {offset} is out of bounds"
            )));
        }
        let bytes = &first[offset as usize..(offset + len) as usize];
        use std::os::unix::ffi::OsStrExt;
        self.backing_file = Some(std::ffi::OsStr::from_bytes(bytes).into());
        Ok(())
    }

    fn check_crypt_method(&mut self, method: u32) -> Result<()> {
        match (method, self.encryption) {
            (0, Encryption::None) => Ok(()),
            (1, _) => Err(Error::Unsupported(
                "the image is encrypted with qcow2's old AES scheme \
                 (encrypt.format=aes), which qemu deprecated as insecure; \
                 convert it to encrypt.format=luks with qemu-img convert"
                    .into(),
            )),
            (2, Encryption::Luks { offset, length }) => {
                if !aligned(offset, self.cluster_bits) || length == 0 {
                    return Err(Error::corrupt("the LUKS header pointer is invalid"));
                }
                Ok(())
            }
            (2, Encryption::None) => Err(Error::corrupt(
                "LUKS encryption without the encryption header extension",
            )),
            (0, _) => Err(Error::corrupt(
                "an encryption header extension on an unencrypted image",
            )),
            (m, _) => Err(Error::Unsupported(format!("encryption method {m}"))),
        }
    }

    fn check_tables(&self) -> Result<()> {
        let cb = self.cluster_bits;
        let entry = if self.extended_l2() { 16 } else { 8 };
        let l2_entries = (1u64 << cb) / entry;
        let needed = self.size.div_ceil(l2_entries << cb);
        if u64::from(self.l1_size) < needed {
            return Err(Error::corrupt(format!(
                "an L1 table of {} entries cannot map {} bytes",
                self.l1_size, self.size
            )));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::Unsupported(format!(
                "an L1 table of {} entries is beyond qemu's limit",
                self.l1_size
            )));
        }
        if self.l1_size > 0 && (self.l1_table_offset == 0 || !aligned(self.l1_table_offset, cb)) {
            return Err(Error::corrupt("the L1 table offset is not cluster-aligned"));
        }
        if !aligned(self.refcount_table_offset, cb) || self.refcount_table_offset == 0 {
            return Err(Error::corrupt(
                "the refcount table offset is not cluster-aligned",
            ));
        }
        let reftable = u64::from(self.refcount_table_clusters) << cb;
        if reftable == 0 || reftable > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(format!(
                "a refcount table of {} clusters is beyond qemu's limit",
                self.refcount_table_clusters
            )));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS
            || self.nb_snapshots > 0 && !aligned(self.snapshots_offset, cb)
        {
            return Err(Error::corrupt("the snapshot table is out of bounds"));
        }
        Ok(())
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & incompat::EXTENDED_L2 != 0
    }

    /// Whether the image was left with stale refcounts.
    pub fn dirty(&self) -> bool {
        self.incompatible & incompat::DIRTY != 0
    }

    /// Whether qemu marked the image corrupt.
    pub fn corrupt(&self) -> bool {
        self.incompatible & incompat::CORRUPT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal version 3 header of 104 bytes with 64 KiB clusters.
    fn v3() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    #[test]
    fn a_plain_version_3_header_parses() {
        let h = Header::parse(&v3()).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.encryption, Encryption::None);
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn an_unknown_incompatible_feature_is_refused_by_its_name() {
        let mut b = v3();
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        // A feature-name table naming bit 9.
        let at = 104;
        b[at..at + 4].copy_from_slice(&0x6803_f857u32.to_be_bytes());
        b[at + 4..at + 8].copy_from_slice(&48u32.to_be_bytes());
        b[at + 8] = 0;
        b[at + 9] = 9;
        b[at + 10..at + 15].copy_from_slice(b"shiny");
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("'shiny' (bit 9)"), "{e}");
    }

    #[test]
    fn an_l1_table_too_small_for_the_size_is_corrupt() {
        let mut b = v3();
        b[36..40].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(Header::parse(&b), Err(Error::Corrupt(_))));
    }

    #[test]
    fn old_aes_encryption_is_refused_with_the_reason() {
        let mut b = v3();
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("encrypt.format=aes"), "{e}");
    }

    #[test]
    fn external_data_files_are_refused_with_the_reason() {
        let mut b = v3();
        b[72..80].copy_from_slice(&incompat::DATA_FILE.to_be_bytes());
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("external data file"), "{e}");
    }

    #[test]
    fn a_backing_name_past_the_first_cluster_is_corrupt() {
        let mut b = v3();
        b[8..16].copy_from_slice(&4090u64.to_be_bytes());
        b[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert!(matches!(Header::parse(&b), Err(Error::Corrupt(_))));
    }

    #[test]
    fn extension_lengths_cannot_run_past_the_buffer() {
        let mut b = v3();
        b[104..108].copy_from_slice(&0xe279_2acau32.to_be_bytes());
        b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Header::parse(&b), Err(Error::Corrupt(_))));
    }
}
