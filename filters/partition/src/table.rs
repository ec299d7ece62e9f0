//! Finding one partition in an MBR or GPT partition table. Sectors are
//! 512 bytes, as nbdkit and `qemu-nbd -P` assume.

use std::fmt;

/// Sector size the tables are read with.
pub const SECTOR: u64 = 512;

/// A partition's place on the disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub offset: u64,
    pub length: u64,
    /// "MBR" or "GPT".
    pub scheme: &'static str,
}

/// Random access to the disk being parsed.
pub trait Disk {
    /// Fill `buf` from `offset`; the caller keeps reads inside the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// Why partition `n` cannot be served: the disk could not be read, has no
/// table, has a damaged one, or has no such partition.
#[derive(Debug)]
pub enum TableError {
    /// Partition 0 was asked for.
    NumberedFromOne,
    /// A disk of this many bytes, too small for a table.
    TooSmall(u64),
    /// Reading the table failed.
    Read {
        /// Where the read began, in bytes.
        offset: u64,
        /// The disk's error.
        source: std::io::Error,
    },
    /// Neither an MBR nor a GPT signature.
    NoSignature,
    /// The partition found does not fit in the disk, or is empty.
    OutsideDisk {
        /// "MBR" or "GPT".
        scheme: &'static str,
        /// The partition.
        n: u32,
        /// Its offset, in bytes.
        offset: u64,
        /// Its length, in bytes.
        length: u64,
        /// The disk's size, in bytes.
        size: u64,
    },
    /// The partition is the table's empty slot or is past its end.
    NotFound {
        /// "MBR" or "GPT".
        scheme: &'static str,
        /// The partition.
        n: u32,
    },
    /// The MBR partition asked for is the extended partition.
    Extended(u32),
    /// A logical MBR partition was asked for, and there is no extended one.
    NoExtended(u32),
    /// An EBR (at this byte) outside the disk.
    EbrOutside(u64),
    /// A logical partition outside its extended partition.
    LogicalOutside {
        /// The partition.
        n: u32,
        /// Its offset, in bytes.
        offset: u64,
        /// Its length, in bytes.
        length: u64,
    },
    /// An EBR that links back to an earlier byte.
    LinksBack {
        /// The EBR, in bytes.
        from: u64,
        /// Where it links to, in bytes.
        to: u64,
    },
    /// A GPT partition number past the table's entries.
    PastEntries {
        /// The partition.
        n: u32,
        /// The number of entries.
        count: u32,
    },
    /// GPT entries smaller than 128 bytes.
    EntrySize(u64),
    /// A GPT entry array that does not fit on the disk.
    EntryArray {
        /// Its LBA.
        lba: u64,
        /// Its number of entries.
        count: u32,
        /// The size of an entry, in bytes.
        entry_size: u64,
    },
    /// A GPT partition that ends before it starts.
    Backwards {
        /// The partition.
        n: u32,
        /// Its first LBA.
        first: u64,
        /// Its last LBA.
        last: u64,
    },
    /// A GPT partition whose byte offset or length overflows.
    GptOutside(u32),
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::NumberedFromOne => f.write_str("partitions are numbered from 1"),
            TableError::TooSmall(size) => write!(
                f,
                "not a partitioned disk: {size} bytes is too small to hold a partition table"
            ),
            TableError::Read { offset, source } => {
                write!(f, "reading the partition table at byte {offset}: {source}")
            }
            TableError::NoSignature => {
                f.write_str("not a partitioned disk (no MBR or GPT signature)")
            }
            TableError::OutsideDisk {
                scheme,
                n,
                offset,
                length,
                size,
            } => write!(
                f,
                "{scheme} partition {n} (offset {offset}, length {length}) lies outside the disk of {size} bytes"
            ),
            TableError::NotFound { scheme, n } => write!(f, "{scheme} partition {n} not found"),
            // Each begins as nbdkit's does, which scripts look for.
            TableError::Extended(n) => write!(
                f,
                "MBR partition {n} not found: it is the extended partition; serve \
                 its logical partitions (5 and up) instead"
            ),
            TableError::NoExtended(n) => write!(
                f,
                "MBR partition {n} not found: there is no extended partition, so \
                 no logical partitions"
            ),
            TableError::EbrOutside(at) => write!(
                f,
                "invalid MBR logical partition chain: an EBR at byte {at} lies outside the disk"
            ),
            TableError::LogicalOutside { n, offset, length } => write!(
                f,
                "MBR partition {n} (offset {offset}, length {length}) does not lie \
                 inside its extended partition"
            ),
            TableError::LinksBack { from, to } => write!(
                f,
                "invalid MBR logical partition chain: the EBR at byte {from} links back to byte {to}"
            ),
            TableError::PastEntries { n, count } => write!(
                f,
                "GPT partition {n} not found: the table has {count} entries"
            ),
            TableError::EntrySize(size) => write!(
                f,
                "invalid GPT: partition entries of {size} bytes (at least 128 expected)"
            ),
            TableError::EntryArray {
                lba,
                count,
                entry_size,
            } => write!(
                f,
                "invalid GPT: the partition entry array (LBA {lba}, {count} entries of \
                 {entry_size} bytes) does not fit on the disk"
            ),
            TableError::Backwards { n, first, last } => write!(
                f,
                "invalid GPT: partition {n} ends (LBA {last}) before it starts (LBA {first})"
            ),
            TableError::GptOutside(n) => write!(f, "invalid GPT: partition {n} lies outside the disk"),
        }
    }
}

impl std::error::Error for TableError {}

/// Read from `disk`, saying where a failed read began.
fn read(disk: &dyn Disk, buf: &mut [u8], offset: u64) -> Result<(), TableError> {
    disk.read_at(buf, offset)
        .map_err(|source| TableError::Read { offset, source })
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Find partition `n` (counting from 1) of a disk of `size` bytes.
pub fn find(disk: &dyn Disk, size: u64, n: u32) -> Result<Partition, TableError> {
    if n == 0 {
        return Err(TableError::NumberedFromOne);
    }
    if size < 2 * SECTOR {
        return Err(TableError::TooSmall(size));
    }
    let mut lba01 = [0u8; 2 * SECTOR as usize];
    read(disk, &mut lba01, 0)?;
    let (mbr, gpt) = lba01.split_at(SECTOR as usize);
    // GPT first: its protective MBR also carries the MBR signature. A GPT
    // needs at least the header and a minimal entry array at each end.
    let p = if size >= 2 * 34 * SECTOR && &gpt[..8] == b"EFI PART" {
        find_gpt(disk, size, gpt, n)?
    } else if mbr[510] == 0x55 && mbr[511] == 0xaa {
        find_mbr(disk, size, mbr, n)?
    } else {
        return Err(TableError::NoSignature);
    };
    match p.offset.checked_add(p.length) {
        Some(end) if end <= size && p.length > 0 => Ok(p),
        _ => Err(TableError::OutsideDisk {
            scheme: p.scheme,
            n,
            offset: p.offset,
            length: p.length,
            size,
        }),
    }
}

/// One 16-byte MBR or EBR entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: u8,
    start: u32,
    sectors: u32,
}

fn entry(sector: &[u8], i: usize) -> Entry {
    let at = 446 + 16 * i;
    Entry {
        kind: sector[at + 4],
        start: le32(sector, at + 8),
        sectors: le32(sector, at + 12),
    }
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn find_mbr(disk: &dyn Disk, size: u64, mbr: &[u8], n: u32) -> Result<Partition, TableError> {
    let bytes = |sectors: u64| sectors * SECTOR;
    let not_found = TableError::NotFound { scheme: "MBR", n };
    if (1..=4).contains(&n) {
        let e = entry(mbr, n as usize - 1);
        if is_extended(e.kind) && e.sectors > 0 {
            return Err(TableError::Extended(n));
        }
        if e.kind == 0 || e.sectors == 0 {
            return Err(not_found);
        }
        return Ok(Partition {
            offset: bytes(e.start.into()),
            length: bytes(e.sectors.into()),
            scheme: "MBR",
        });
    }
    let Some(ext) = (0..4)
        .map(|i| entry(mbr, i))
        .find(|e| is_extended(e.kind) && e.sectors > 0)
    else {
        return Err(TableError::NoExtended(n));
    };
    let ext_start = u64::from(ext.start);
    let ext_end = bytes(ext_start + u64::from(ext.sectors));
    let mut ebr = bytes(ext_start);
    let mut sector = [0u8; SECTOR as usize];
    // Links must move strictly forward, so the walk ends (at worst at the
    // end of the disk); tables that link backwards are refused.
    for i in 5.. {
        if ebr < SECTOR || ebr + SECTOR > size {
            return Err(TableError::EbrOutside(ebr));
        }
        read(disk, &mut sector, ebr)?;
        if i == n {
            let e = entry(&sector, 0);
            if e.kind == 0 || e.sectors == 0 {
                return Err(not_found);
            }
            // The logical partition's start counts from its own EBR.
            let offset = ebr + bytes(e.start.into());
            let length = bytes(e.sectors.into());
            if offset <= ebr || offset + length > ext_end {
                return Err(TableError::LogicalOutside { n, offset, length });
            }
            return Ok(Partition {
                offset,
                length,
                scheme: "MBR",
            });
        }
        // The link's start counts from the extended partition's start.
        let link = entry(&sector, 1);
        if link.start == 0 && link.sectors == 0 {
            break;
        }
        let next = bytes(ext_start + u64::from(link.start));
        if next <= ebr {
            return Err(TableError::LinksBack {
                from: ebr,
                to: next,
            });
        }
        ebr = next;
    }
    Err(not_found)
}

fn find_gpt(disk: &dyn Disk, size: u64, header: &[u8], n: u32) -> Result<Partition, TableError> {
    let entries_lba = le64(header, 72);
    let count = le32(header, 80);
    let entry_size = u64::from(le32(header, 84));
    if n > count {
        return Err(TableError::PastEntries { n, count });
    }
    if entry_size < 128 {
        return Err(TableError::EntrySize(entry_size));
    }
    let array_start = entries_lba.checked_mul(SECTOR).filter(|&a| a >= 2 * SECTOR);
    let array_end =
        array_start.and_then(|a| a.checked_add(u64::from(count).checked_mul(entry_size)?));
    let (Some(array_start), true) = (array_start, array_end.is_some_and(|end| end <= size)) else {
        return Err(TableError::EntryArray {
            lba: entries_lba,
            count,
            entry_size,
        });
    };
    let mut e = [0u8; 128];
    read(disk, &mut e, array_start + u64::from(n - 1) * entry_size)?;
    if e[..16].iter().all(|&b| b == 0) {
        return Err(TableError::NotFound { scheme: "GPT", n });
    }
    let (first, last) = (le64(&e, 32), le64(&e, 40));
    if last < first {
        return Err(TableError::Backwards { n, first, last });
    }
    let offset = first.checked_mul(SECTOR);
    let length = (last - first)
        .checked_add(1)
        .and_then(|s| s.checked_mul(SECTOR));
    match (offset, length) {
        (Some(offset), Some(length)) => Ok(Partition {
            offset,
            length,
            scheme: "GPT",
        }),
        _ => Err(TableError::GptOutside(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Disk for Vec<u8> {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            // The parser promises to read inside the disk; hold it to that.
            let o = offset as usize;
            let end = o.checked_add(buf.len()).expect("offset overflow");
            assert!(end <= self.len(), "read past the end: {o}+{}", buf.len());
            let src = &self[o..end];
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    const MIB: u64 = 1 << 20;

    fn put_entry(disk: &mut [u8], sector_at: u64, i: usize, kind: u8, start: u64, sectors: u64) {
        let at = sector_at as usize + 446 + 16 * i;
        disk[at + 4] = kind;
        disk[at + 8..at + 12].copy_from_slice(&(start as u32).to_le_bytes());
        disk[at + 12..at + 16].copy_from_slice(&(sectors as u32).to_le_bytes());
    }

    fn sign(disk: &mut [u8], sector_at: u64) {
        disk[sector_at as usize + 510] = 0x55;
        disk[sector_at as usize + 511] = 0xaa;
    }

    /// 16 MiB: primaries 1 (1 MiB at 1 MiB) and 2 (2 MiB at 2 MiB), an
    /// extended partition 3 at 8 MiB holding logicals 5 and 6.
    fn mbr_disk() -> Vec<u8> {
        let mut d = vec![0u8; 16 * MIB as usize];
        let s = |b: u64| b / SECTOR;
        put_entry(&mut d, 0, 0, 0x83, s(MIB), s(MIB));
        put_entry(&mut d, 0, 1, 0x83, s(2 * MIB), s(2 * MIB));
        put_entry(&mut d, 0, 2, 0x05, s(8 * MIB), s(8 * MIB));
        sign(&mut d, 0);
        // EBR 1 at 8 MiB: logical 5 one MiB later, next EBR at +4 MiB.
        put_entry(&mut d, 8 * MIB, 0, 0x83, s(MIB), s(2 * MIB));
        put_entry(&mut d, 8 * MIB, 1, 0x05, s(4 * MIB), s(4 * MIB));
        sign(&mut d, 8 * MIB);
        // EBR 2 at 12 MiB: logical 6 at 13 MiB, end of chain.
        put_entry(&mut d, 12 * MIB, 0, 0x83, s(MIB), s(3 * MIB));
        sign(&mut d, 12 * MIB);
        d
    }

    fn gpt_disk() -> Vec<u8> {
        let mut d = vec![0u8; 8 * MIB as usize];
        put_entry(&mut d, 0, 0, 0xee, 1, 8 * MIB / SECTOR - 1);
        sign(&mut d, 0);
        let h = SECTOR as usize;
        d[h..h + 8].copy_from_slice(b"EFI PART");
        d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, (first, last)) in [(2048u64, 4095u64), (4096, 8191)].into_iter().enumerate() {
            // Entry 1 (i = 0) and entry 3 (i = 1); entry 2 stays empty.
            let at = 2 * h + 128 * (2 * i);
            d[at..at + 16].copy_from_slice(&[0xaf; 16]);
            d[at + 32..at + 40].copy_from_slice(&first.to_le_bytes());
            d[at + 40..at + 48].copy_from_slice(&last.to_le_bytes());
        }
        d
    }

    fn part(offset: u64, length: u64, scheme: &'static str) -> Partition {
        Partition {
            offset,
            length,
            scheme,
        }
    }

    #[test]
    fn partition_zero_is_an_error() {
        struct Zeroes;
        impl Disk for Zeroes {
            fn read_at(&self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
                buf.fill(0);
                Ok(())
            }
        }
        assert!(find(&Zeroes, 1 << 20, 0)
            .unwrap_err()
            .to_string()
            .contains("from 1"));
    }

    #[test]
    fn mbr_primary_and_logical_partitions() {
        let d = mbr_disk();
        let size = d.len() as u64;
        assert_eq!(find(&d, size, 1).unwrap(), part(MIB, MIB, "MBR"));
        assert_eq!(find(&d, size, 2).unwrap(), part(2 * MIB, 2 * MIB, "MBR"));
        assert_eq!(find(&d, size, 5).unwrap(), part(9 * MIB, 2 * MIB, "MBR"));
        assert_eq!(find(&d, size, 6).unwrap(), part(13 * MIB, 3 * MIB, "MBR"));
        assert_eq!(
            find(&d, size, 4).unwrap_err().to_string(),
            "MBR partition 4 not found"
        );
        assert_eq!(
            find(&d, size, 7).unwrap_err().to_string(),
            "MBR partition 7 not found"
        );
        assert!(find(&d, size, 3)
            .unwrap_err()
            .to_string()
            .starts_with("MBR partition 3 not found: it is the extended partition"));
    }

    #[test]
    fn mbr_errors_name_the_problem() {
        let mut d = mbr_disk();
        let size = d.len() as u64;
        // A chain that links backwards is refused rather than followed.
        put_entry(&mut d, 12 * MIB, 1, 0x05, 0, 1);
        assert!(find(&d, size, 7)
            .unwrap_err()
            .to_string()
            .contains("links back"));
        // A partition running past the disk's end.
        put_entry(&mut d, 0, 1, 0x83, 4096, 1 << 20);
        assert!(find(&d, size, 2)
            .unwrap_err()
            .to_string()
            .contains("outside the disk"));
        // No extended partition: no logical ones.
        put_entry(&mut d, 0, 2, 0, 0, 0);
        assert!(find(&d, size, 5)
            .unwrap_err()
            .to_string()
            .starts_with("MBR partition 5 not found: there is no extended partition"));
        d[510] = 0;
        assert_eq!(
            find(&d, size, 1).unwrap_err().to_string(),
            "not a partitioned disk (no MBR or GPT signature)"
        );
        assert!(find(&vec![0u8; 600], 600, 1)
            .unwrap_err()
            .to_string()
            .starts_with("not a partitioned disk"));
    }

    #[test]
    fn gpt_partitions() {
        let d = gpt_disk();
        let size = d.len() as u64;
        assert_eq!(find(&d, size, 1).unwrap(), part(MIB, MIB, "GPT"));
        assert_eq!(find(&d, size, 3).unwrap(), part(2 * MIB, 2 * MIB, "GPT"));
        assert_eq!(
            find(&d, size, 2).unwrap_err().to_string(),
            "GPT partition 2 not found"
        );
        assert_eq!(
            find(&d, size, 128).unwrap_err().to_string(),
            "GPT partition 128 not found"
        );
        assert!(find(&d, size, 129)
            .unwrap_err()
            .to_string()
            .contains("has 128 entries"));
    }

    #[test]
    fn gpt_errors_name_the_problem() {
        let mut d = gpt_disk();
        let size = d.len() as u64;
        // An entry array that cannot fit on the disk.
        d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(find(&d, size, 1)
            .unwrap_err()
            .to_string()
            .contains("does not fit"));
        d[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&64u32.to_le_bytes());
        assert!(find(&d, size, 1)
            .unwrap_err()
            .to_string()
            .contains("at least 128"));
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        // Partition 3 past the end of the disk.
        let at = 1024 + 256;
        d[at + 40..at + 48].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(find(&d, size, 3)
            .unwrap_err()
            .to_string()
            .contains("outside the disk"));
        d[at + 40..at + 48].copy_from_slice(&10u64.to_le_bytes());
        assert!(find(&d, size, 3)
            .unwrap_err()
            .to_string()
            .contains("before it starts"));
    }

    /// Random damage to the tables is an error or an answer inside the
    /// disk, never a panic or a read outside it.
    #[test]
    fn damaged_tables_are_errors_not_panics() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for (mut d, hot) in [
            (mbr_disk(), vec![0u64, 8 * MIB, 12 * MIB]),
            (gpt_disk(), vec![0, SECTOR, 2 * SECTOR, 3 * SECTOR]),
        ] {
            let size = d.len() as u64;
            for _ in 0..2000 {
                // Damage a few bytes in place and put them back after.
                let mut undo = Vec::new();
                for _ in 0..(next() % 6 + 1) {
                    let sector = hot[(next() % hot.len() as u64) as usize];
                    let at = (sector + next() % SECTOR) as usize;
                    undo.push((at, d[at]));
                    d[at] = next() as u8;
                }
                for n in 1..8 {
                    if let Ok(p) = find(&d, size, n) {
                        assert!(p.offset + p.length <= size, "{p:?}");
                    }
                }
                for (at, b) in undo.into_iter().rev() {
                    d[at] = b;
                }
            }
        }
    }
}
