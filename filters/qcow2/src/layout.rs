//! Where things are in an image: its geometry (cluster, subcluster, table
//! and refcount sizes) and the encodings of L1, L2 and refcount-table
//! entries (qcow2.txt, "Cluster mapping" and "Extended L2 Entries").

use crate::error::{Error, Result};
use crate::header::Header;

/// Bit 63 of L1 and L2 entries: the refcount is exactly one, so the
/// cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries: the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Bits 9-55: a cluster offset in an L1 or standard L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard L2 entry that must be zero (bit 0 is the zero flag,
/// itself reserved with extended entries).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits 9-63: a refcount block offset in a refcount-table entry.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// The low half of an extended entry's bitmap: allocated subclusters.
pub const ALLOC_BITS: u64 = 0xffff_ffff;

/// The sizes an image's header fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    /// log2 of the entries in an L2 table.
    pub l2_bits: u32,
    /// L2 entries are 128 bits, with 32 subclusters each.
    pub extended: bool,
    /// log2 of a subcluster's size (the cluster's own without extended
    /// entries).
    pub subcluster_bits: u32,
    /// log2 of the width of a refcount, in bits.
    pub refcount_order: u32,
    /// log2 of the refcounts in a refcount block.
    pub refblock_bits: u32,
    /// Where the sector count starts in a compressed cluster descriptor.
    pub csize_shift: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Version 3 (zero flags) or 2.
    pub version: u32,
}

impl Geometry {
    /// The geometry a parsed header describes.
    pub fn of(h: &Header) -> Geometry {
        let extended = h.extended_l2();
        let cb = h.cluster_bits;
        Geometry {
            cluster_bits: cb,
            l2_bits: cb - if extended { 4 } else { 3 },
            extended,
            subcluster_bits: if extended { cb - 5 } else { cb },
            refcount_order: h.refcount_order,
            refblock_bits: cb + 3 - h.refcount_order,
            csize_shift: 62 - (cb - 8),
            size: h.size,
            version: h.version,
        }
    }

    /// Bytes in a cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes in a subcluster.
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits
    }

    /// Subclusters in a cluster: 32 with extended entries, else 1.
    pub fn subclusters(&self) -> u32 {
        1 << (self.cluster_bits - self.subcluster_bits)
    }

    /// Bytes of guest disk one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        1 << (self.l2_bits + self.cluster_bits)
    }

    /// Entries in an L2 table.
    pub fn l2_entries(&self) -> usize {
        1 << self.l2_bits
    }

    /// The L1 index of a guest offset.
    pub fn l1_index(&self, guest: u64) -> usize {
        (guest >> (self.l2_bits + self.cluster_bits)) as usize
    }

    /// The L2 index of a guest offset.
    pub fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize
    }

    /// The largest refcount a block entry holds.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.refcount_order)) - 1
        }
    }

    /// Whether `v` is cluster-aligned.
    pub fn aligned(&self, v: u64) -> bool {
        v & (self.cluster_size() - 1) == 0
    }

    /// The host cluster index of `host`.
    pub fn cluster_of(&self, host: u64) -> u64 {
        host >> self.cluster_bits
    }
}

/// The offset of the L2 table an L1 entry points to (0: none).
pub fn l1_offset(geo: &Geometry, entry: u64) -> Result<u64> {
    let off = entry & OFFSET_MASK;
    if entry & L1_RESERVED != 0 || !geo.aligned(off) {
        return Err(Error::corrupt(format!(
            "L1 entry {entry:#x} has reserved bits set or is not cluster-aligned"
        )));
    }
    Ok(off)
}

/// What an L2 entry says about a whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Nothing: backing file, or zeroes. With extended entries, the
    /// subcluster bitmap may still say which subclusters read as zeroes.
    Unallocated,
    /// Reads as zeroes (standard entries only); `host` keeps a
    /// preallocation, or is 0.
    Zero { host: u64, copied: bool },
    /// Data in place at `host`. With extended entries, the bitmap says
    /// which subclusters are there.
    Normal { host: u64, copied: bool },
    /// Compressed data: `bytes` bytes starting at `offset`, which is not
    /// aligned.
    Compressed { offset: u64, bytes: u64 },
}

impl Cluster {
    /// Decode the standard half of an L2 entry (with extended entries, the
    /// bitmap is checked by [`subcluster`]).
    pub fn decode(geo: &Geometry, entry: u64) -> Result<Cluster> {
        if entry & COMPRESSED != 0 {
            let offset_mask = (1u64 << geo.csize_shift) - 1;
            let offset = entry & offset_mask;
            let sectors = ((entry & !(COPIED | COMPRESSED)) >> geo.csize_shift) + 1;
            if entry & COPIED != 0 {
                return Err(Error::corrupt(format!(
                    "compressed L2 entry {entry:#x} has the COPIED flag"
                )));
            }
            // The data runs from `offset` to the end of the last of its
            // 512-byte sectors.
            let bytes = (offset & !511) + sectors * 512 - offset;
            return Ok(Cluster::Compressed { offset, bytes });
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        let reserved = L2_RESERVED | if geo.extended { ZERO } else { 0 };
        if entry & reserved != 0 || !geo.aligned(host) {
            return Err(Error::corrupt(format!(
                "L2 entry {entry:#x} has reserved bits set or is not cluster-aligned"
            )));
        }
        Ok(if entry & ZERO != 0 {
            Cluster::Zero { host, copied }
        } else if host == 0 {
            if copied {
                return Err(Error::corrupt(format!(
                    "L2 entry {entry:#x} points at offset 0"
                )));
            }
            Cluster::Unallocated
        } else {
            Cluster::Normal { host, copied }
        })
    }

    /// The host cluster this entry keeps allocated, if any, for freeing:
    /// `(offset, bytes)`.
    pub fn allocation(&self, geo: &Geometry) -> Option<(u64, u64)> {
        match *self {
            Cluster::Normal { host, .. } | Cluster::Zero { host, .. } if host != 0 => {
                Some((host, geo.cluster_size()))
            }
            Cluster::Compressed { offset, bytes } => Some((offset & !511, bytes + (offset & 511))),
            _ => None,
        }
    }
}

/// What one subcluster (the whole cluster, without extended entries)
/// reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// Data at this host offset (of the subcluster itself).
    Data(u64),
    /// Zeroes.
    Zero,
    /// Whatever the backing file holds there, or zeroes without one.
    Unallocated,
    /// Part of a compressed cluster.
    Compressed { offset: u64, bytes: u64 },
}

/// The state of subcluster `sc` of a cluster whose entry decodes to
/// `cluster`, with `bitmap` its extended bitmap (0 without extended
/// entries).
pub fn subcluster(geo: &Geometry, cluster: Cluster, bitmap: u64, sc: u32) -> Result<Sub> {
    if !geo.extended {
        return Ok(match cluster {
            Cluster::Unallocated => Sub::Unallocated,
            Cluster::Zero { .. } => Sub::Zero,
            Cluster::Normal { host, .. } => Sub::Data(host),
            Cluster::Compressed { offset, bytes } => Sub::Compressed { offset, bytes },
        });
    }
    let alloc = bitmap & (1 << sc) != 0;
    let zero = bitmap & (1 << (sc + 32)) != 0;
    match cluster {
        Cluster::Compressed { offset, bytes } => {
            if bitmap != 0 {
                return Err(Error::corrupt(
                    "a compressed cluster has a subcluster bitmap",
                ));
            }
            Ok(Sub::Compressed { offset, bytes })
        }
        _ if alloc && zero => Err(Error::corrupt(format!(
            "subcluster {sc} is both allocated and zero (bitmap {bitmap:#x})"
        ))),
        Cluster::Normal { host, .. } if alloc => {
            Ok(Sub::Data(host + (u64::from(sc) << geo.subcluster_bits)))
        }
        Cluster::Unallocated if alloc => Err(Error::corrupt(format!(
            "subcluster {sc} is allocated in a cluster without an offset"
        ))),
        _ if zero => Ok(Sub::Zero),
        _ => Ok(Sub::Unallocated),
    }
}

/// The bitmap with subclusters `first..first + n` set in the half that
/// starts at bit `base` (0: allocated, 32: zero).
pub fn bits(first: u32, n: u32, base: u32) -> u64 {
    let run = if n >= 32 { ALLOC_BITS } else { (1u64 << n) - 1 };
    (run << first) << base
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, extended: bool) -> Geometry {
        Geometry {
            cluster_bits,
            l2_bits: cluster_bits - if extended { 4 } else { 3 },
            extended,
            subcluster_bits: if extended {
                cluster_bits - 5
            } else {
                cluster_bits
            },
            refcount_order: 4,
            refblock_bits: cluster_bits + 3 - 4,
            csize_shift: 62 - (cluster_bits - 8),
            size: 1 << 30,
            version: 3,
        }
    }

    #[test]
    fn standard_entries_decode_to_their_kinds() {
        let g = geo(16, false);
        assert_eq!(Cluster::decode(&g, 0).unwrap(), Cluster::Unallocated);
        assert_eq!(
            Cluster::decode(&g, ZERO).unwrap(),
            Cluster::Zero {
                host: 0,
                copied: false
            }
        );
        assert_eq!(
            Cluster::decode(&g, COPIED | 0x30000).unwrap(),
            Cluster::Normal {
                host: 0x30000,
                copied: true
            }
        );
        assert!(Cluster::decode(&g, 0x30200).is_err(), "misaligned");
        assert!(Cluster::decode(&g, 1 << 57 | 0x30000).is_err(), "reserved");
    }

    #[test]
    fn compressed_descriptors_split_at_the_cluster_size_s_shift() {
        let g = geo(16, false);
        // 64 KiB clusters: x = 62 - 8 = 54; 3 additional sectors.
        let e = COMPRESSED | (3u64 << 54) | 0x1_0234;
        assert_eq!(
            Cluster::decode(&g, e).unwrap(),
            Cluster::Compressed {
                offset: 0x1_0234,
                bytes: 0x1_0200 + 4 * 512 - 0x1_0234
            }
        );
    }

    #[test]
    fn extended_bitmaps_say_what_each_subcluster_holds() {
        let g = geo(16, true);
        let c = Cluster::decode(&g, COPIED | 0x40000).unwrap();
        let bitmap = bits(0, 1, 0) | bits(1, 1, 32);
        assert_eq!(subcluster(&g, c, bitmap, 0).unwrap(), Sub::Data(0x40000));
        assert_eq!(subcluster(&g, c, bitmap, 1).unwrap(), Sub::Zero);
        assert_eq!(subcluster(&g, c, bitmap, 2).unwrap(), Sub::Unallocated);
        assert!(subcluster(&g, c, bits(3, 1, 0) | bits(3, 1, 32), 3).is_err());
        assert!(
            Cluster::decode(&g, COPIED | 0x40000 | ZERO).is_err(),
            "no zero flag"
        );
    }
}
