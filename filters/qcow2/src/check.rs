//! A refcount consistency check of an image, as `qemu-img check` makes it
//! (qemu's `qcow2_check_refcounts`), over any [`Io`] and without changing
//! anything: the fuzz targets run it after every step, the tests after
//! qemu's tools and after the filter.
//!
//! It counts every reference the image's metadata makes to a host
//! cluster: the header cluster (with its extensions), the active L1 table
//! and every L2 table and data cluster it reaches (standard and extended
//! entries, compressed clusters by the span of their data, which may cross
//! cluster boundaries), the snapshot table and each snapshot's L1 table
//! with what it reaches, the refcount table and refcount blocks, the LUKS
//! header of an encrypted image, and persistent bitmaps (directory, tables
//! and data, only while the bitmaps' autoclear bit says they are kept, as
//! qemu counts them). Then it compares those counts with the refcounts
//! stored in the image:
//!
//! - a stored refcount below the references is a **corruption**: a cluster
//!   in use that the allocator may hand out again;
//! - one above is a **leak**: space lost, harmless to the data (a crash
//!   between dropping a reference and its refcount leaves one, by design).
//!
//! It also reports as corruptions what qemu's check reports as such:
//! reserved bits, offsets that are not cluster-aligned, refcount blocks
//! outside the image or counted more than once, compressed entries with
//! the COPIED flag or a subcluster bitmap, impossible subcluster bitmaps,
//! and the COPIED flag of active L1 and L2 entries set where the refcount
//! is not exactly 1, or clear where it is; and, beyond qemu, a cluster
//! used as two different things (an L2 table that is also a data cluster,
//! a data cluster inside the refcount table, ...).
//!
//! Tables that lie past the end of the image read as zeroes, as qemu reads
//! them; nothing is allocated for that part, so the memory the check takes
//! is bounded by the image's size, whatever its header claims.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use crate::error::{Error, Result};
use crate::header::{Encryption, Header, MAX_L1_BYTES};
use crate::image::Image;
use crate::io::Io;
use crate::layout::{
    self, Cluster, Geometry, COMPRESSED, COPIED, OFFSET_MASK, REFTABLE_OFFSET_MASK,
};
use crate::refcount;

/// Messages kept in a [`Report`]; past this only the counts grow.
pub const MAX_MESSAGES: usize = 100;

/// qemu's limit on one snapshot's extra data.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// qemu's limit on the bitmap directory.
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;
/// qemu's limit on the entries of one bitmap table.
const MAX_BITMAP_TABLE: u64 = 0x800_0000;
/// The autoclear bit that says the bitmaps extension is up to date.
const AUTOCLEAR_BITMAPS: u64 = 1;
/// The bitmaps header extension.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Bits of an L1 entry that must be zero.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard L2 entry that must be zero (bit 0, the zero flag,
/// is reserved too with extended entries).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of a bitmap table entry that must be zero.
const BITMAP_RESERVED: u64 = 0xff00_0000_0000_01fe;

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Errors that may lose data: a refcount below the references, bad
    /// offsets, wrong COPIED flags, overlapping metadata.
    pub corruptions: u64,
    /// Clusters whose refcount is above their references.
    pub leaks: u64,
    /// What was found, in qemu's words where qemu has them; at most
    /// [`MAX_MESSAGES`].
    pub messages: Vec<String>,
    /// Clusters past the end of the image, and referenced by nothing,
    /// whose refcount is not 0: leaks too (the allocator will not use
    /// them when the image grows), but qemu's check does not look there,
    /// so they are counted apart from [`Report::leaks`].
    pub leaks_past_end: u64,
    /// Messages left out past [`MAX_MESSAGES`].
    pub omitted: u64,
    /// The end of the last cluster that is referenced or has a refcount
    /// (qemu's "image end offset").
    pub image_end: u64,
}

impl Report {
    /// No corruption and no leak (past the end of the image either).
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.leaks_past_end == 0
    }

    fn say(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        } else {
            self.omitted += 1;
        }
    }

    fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        self.say(format!("ERROR {msg}"));
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.messages {
            writeln!(f, "{m}")?;
        }
        if self.omitted > 0 {
            writeln!(f, "... and {} more", self.omitted)?;
        }
        if self.is_clean() {
            write!(f, "No errors were found on the image.")
        } else {
            write!(
                f,
                "{} errors were found on the image; {} leaked clusters were found on the image",
                self.corruptions, self.leaks
            )?;
            if self.leaks_past_end > 0 {
                write!(f, ", and {} past its end", self.leaks_past_end)?;
            }
            write!(f, ".")
        }
    }
}

/// Check the image behind `io`. An image whose header does not parse is
/// an error; everything after the header is reported, not an error. Only
/// a failure of `io` itself is.
pub fn check(io: &dyn Io) -> Result<Report> {
    check_bounded(io, u64::MAX)
}

/// [`check`], giving up with an error once more than `work` table entries
/// and clusters have been visited: a small hostile image can make a
/// check walk the same tables again and again (as many snapshots as it
/// likes, all with the same large L1 table), so the fuzz targets bound it.
pub fn check_bounded(io: &dyn Io, work: u64) -> Result<Report> {
    let (h, first) = Image::read_header(io)?;
    check_header(io, &h, &first, work)
}

/// [`check_bounded`] with the header already read (`first` is the image's
/// first cluster, as [`Image::read_header`] returns it).
pub fn check_header(io: &dyn Io, h: &Header, first: &[u8], work: u64) -> Result<Report> {
    let geo = Geometry::of(h);
    let file_size = io.size()?;
    let clusters = file_size.div_ceil(geo.cluster_size());
    let mut c = Checker {
        io,
        h,
        geo,
        file_size,
        clusters,
        expected: vec![0; clusters as usize],
        kinds: vec![Kind::None; clusters as usize],
        beyond: BTreeMap::new(),
        overlaps: HashSet::new(),
        reftable: Vec::new(),
        blocks: Vec::new(),
        work,
        report: Report::default(),
    };
    c.run(first)?;
    Ok(c.report)
}

/// What a cluster is used for, to find overlaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Header,
    ActiveL1,
    SnapshotL1,
    L2,
    Data,
    Compressed,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    Luks,
    BitmapDirectory,
    BitmapTable,
    BitmapData,
}

impl Kind {
    /// Whether more than one reference of this kind to one cluster is
    /// legitimate (shared by snapshots, or several compressed clusters
    /// packed into one host cluster).
    fn shared(self) -> bool {
        matches!(
            self,
            Kind::L2 | Kind::Data | Kind::Compressed | Kind::SnapshotL1 | Kind::BitmapData
        )
    }

    fn name(self) -> &'static str {
        match self {
            Kind::None => "nothing",
            Kind::Header => "the header",
            Kind::ActiveL1 => "the active L1 table",
            Kind::SnapshotL1 => "a snapshot's L1 table",
            Kind::L2 => "an L2 table",
            Kind::Data => "a data cluster",
            Kind::Compressed => "compressed data",
            Kind::RefcountTable => "the refcount table",
            Kind::RefcountBlock => "a refcount block",
            Kind::SnapshotTable => "the snapshot table",
            Kind::Luks => "the LUKS header",
            Kind::BitmapDirectory => "the bitmap directory",
            Kind::BitmapTable => "a bitmap table",
            Kind::BitmapData => "bitmap data",
        }
    }
}

struct Checker<'a> {
    io: &'a dyn Io,
    h: &'a Header,
    geo: Geometry,
    file_size: u64,
    /// Clusters in the image (the last may be partial).
    clusters: u64,
    /// References to each cluster of the image.
    expected: Vec<u64>,
    kinds: Vec<Kind>,
    /// References past the end of the image, with their kinds.
    beyond: BTreeMap<u64, (u64, Kind)>,
    /// Clusters already reported as overlapping.
    overlaps: HashSet<u64>,
    /// The refcount table as stored (the part inside the image).
    reftable: Vec<u64>,
    /// Refcount blocks read so far, by refcount table index.
    blocks: Vec<Option<Box<[u8]>>>,
    /// Entries and clusters still allowed to be visited.
    work: u64,
    report: Report,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Checker<'_> {
    fn run(&mut self, first: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.add(0, cs, Kind::Header)?;
        let (l1_offset, l1_size) = (self.h.l1_table_offset, self.h.l1_size);
        self.walk_l1(l1_offset, l1_size, Kind::ActiveL1, "active")?;
        self.snapshots()?;
        let reftable_bytes = u64::from(self.h.refcount_table_clusters) << self.geo.cluster_bits;
        self.add(
            self.h.refcount_table_offset,
            reftable_bytes,
            Kind::RefcountTable,
        )?;
        if let Encryption::Luks { offset, length } = self.h.encryption {
            self.add(offset, length, Kind::Luks)?;
        }
        self.bitmaps(first)?;
        self.refcount_blocks(reftable_bytes / 8)?;
        self.compare()?;
        self.copied_flags()
    }

    /// Spend `n` units of the work allowed.
    fn spend(&mut self, n: u64) -> Result<()> {
        self.work = self.work.checked_sub(n).ok_or_else(|| {
            Error::Unsupported("the check visits more entries than it was allowed".into())
        })?;
        Ok(())
    }

    /// Read `buf` at `offset`; what lies past the end of the image reads
    /// as zeroes.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inside = self.file_size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if inside > 0 {
            self.io.read_at(&mut buf[..inside], offset)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    /// The first `entries` big-endian u64 of a table at `offset`, without
    /// those that lie wholly past the end of the image (zeroes).
    fn read_table(&mut self, offset: u64, entries: u64) -> Result<Vec<u64>> {
        let inside = self
            .file_size
            .saturating_sub(offset)
            .div_ceil(8)
            .min(entries);
        self.spend(inside)?;
        let mut bytes = vec![0u8; inside as usize * 8];
        self.read(&mut bytes, offset)?;
        Ok(bytes.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// Count one reference to every cluster that `len` bytes at `offset`
    /// touch, as `kind`.
    fn add(&mut self, offset: u64, len: u64, kind: Kind) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let Some(end) = offset.checked_add(len) else {
            self.report.corrupt(format!(
                "{} at offset={offset:#x} of {len} bytes runs past 2^64",
                kind.name()
            ));
            return Ok(());
        };
        let cb = self.geo.cluster_bits;
        let (first, last) = (offset >> cb, (end - 1) >> cb);
        self.spend(last - first + 1)?;
        for c in first..=last {
            let old = if c < self.clusters {
                self.expected[c as usize] += 1;
                std::mem::replace(&mut self.kinds[c as usize], kind)
            } else {
                let e = self.beyond.entry(c).or_insert((0, kind));
                e.0 += 1;
                std::mem::replace(&mut e.1, kind)
            };
            let clash = match old {
                Kind::None => false,
                k => k != kind || !kind.shared(),
            };
            if clash && self.overlaps.insert(c) {
                self.report.corrupt(format!(
                    "cluster {c} is used as {} and as {}",
                    old.name(),
                    kind.name()
                ));
            }
        }
        Ok(())
    }

    /// Count an L1 table (of the active image or of a snapshot, `what`),
    /// its L2 tables and everything they map.
    fn walk_l1(&mut self, offset: u64, entries: u32, kind: Kind, what: &str) -> Result<()> {
        let bytes = u64::from(entries) * 8;
        if bytes > MAX_L1_BYTES {
            self.report
                .corrupt(format!("{what} L1 table of {entries} entries is too large"));
            return Ok(());
        }
        if entries > 0 && !self.geo.aligned(offset) {
            self.report.corrupt(format!(
                "{what} L1 table at offset={offset:#x} is not cluster aligned"
            ));
            return Ok(());
        }
        self.add(offset, bytes, kind)?;
        let l1 = self.read_table(offset, u64::from(entries))?;
        for (i, &e) in l1.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let l2 = e & OFFSET_MASK;
            if e & L1_RESERVED != 0 {
                self.report.corrupt(format!(
                    "found L1 entry with reserved bits set: {e:#x} ({what} L1 index {i})"
                ));
            }
            if l2 == 0 {
                continue;
            }
            self.add(l2, self.geo.cluster_size(), Kind::L2)?;
            if !self.geo.aligned(l2) {
                self.report.corrupt(format!(
                    "l2_offset={l2:#x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                continue;
            }
            self.walk_l2(l2)?;
        }
        Ok(())
    }

    /// The L2 table at `offset`, whole.
    fn read_l2(&mut self, offset: u64) -> Result<Box<[u8]>> {
        let mut t = vec![0u8; self.geo.cluster_size() as usize].into_boxed_slice();
        self.spend(self.geo.l2_entries() as u64)?;
        self.read(&mut t, offset)?;
        Ok(t)
    }

    /// Entry `i` of an L2 table and its bitmap (0 without extended
    /// entries).
    fn l2_entry(&self, t: &[u8], i: usize) -> (u64, u64) {
        if self.geo.extended {
            (be64(t, i * 16), be64(t, i * 16 + 8))
        } else {
            (be64(t, i * 8), 0)
        }
    }

    /// Count what the L2 table at `offset` maps.
    fn walk_l2(&mut self, offset: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let t = self.read_l2(offset)?;
        for i in 0..geo.l2_entries() {
            let (entry, bitmap) = self.l2_entry(&t, i);
            if entry == 0 && bitmap == 0 {
                continue;
            }
            if entry & COMPRESSED != 0 {
                if entry & COPIED != 0 {
                    self.report.corrupt(format!(
                        "coffset={:#x}: copied flag must never be set for compressed clusters",
                        entry & ((1u64 << geo.csize_shift) - 1)
                    ));
                }
                if bitmap != 0 {
                    self.report.corrupt(format!(
                        "compressed cluster {i} of the L2 table at {offset:#x} \
                         with non-zero subcluster allocation bitmap"
                    ));
                }
                if let Ok(Some((at, bytes))) =
                    Cluster::decode(&geo, entry & !COPIED).map(|c| c.allocation(&geo))
                {
                    self.add(at, bytes, Kind::Compressed)?;
                }
                continue;
            }
            let reserved = L2_RESERVED | if geo.extended { layout::ZERO } else { 0 };
            if entry & reserved != 0 {
                self.report.corrupt(format!(
                    "found L2 entry with reserved bits set: {entry:#x} (L2 table at {offset:#x}, index {i})"
                ));
            }
            let host = entry & OFFSET_MASK;
            let (alloc, zero) = (bitmap & layout::ALLOC_BITS, bitmap >> 32);
            if host == 0 {
                if alloc != 0 {
                    self.report.corrupt(format!(
                        "Unallocated cluster has non-zero subcluster allocation map \
                         (L2 table at {offset:#x}, index {i}, bitmap {bitmap:#x})"
                    ));
                }
                continue;
            }
            if alloc & zero != 0 {
                self.report.corrupt(format!(
                    "offset={host:#x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
            }
            if !geo.aligned(host) {
                self.report.corrupt(format!(
                    "offset={host:#x}: Cluster is not properly aligned; L2 entry corrupted."
                ));
            }
            self.add(host, cs, Kind::Data)?;
        }
        Ok(())
    }

    /// The snapshot table: itself, and each snapshot's L1 table with what
    /// it reaches.
    fn snapshots(&mut self) -> Result<()> {
        let n = self.h.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        let mut at = self.h.snapshots_offset;
        for i in 0..n {
            let mut head = [0u8; 40];
            self.read(&mut head, at)?;
            self.spend(1)?;
            let l1_offset = be64(&head, 0);
            let l1_size = be32(&head, 8);
            let id_len = u64::from(u16::from_be_bytes([head[12], head[13]]));
            let name_len = u64::from(u16::from_be_bytes([head[14], head[15]]));
            let extra = be32(&head, 36);
            if extra > MAX_SNAPSHOT_EXTRA {
                self.report.corrupt(format!(
                    "snapshot {i}: {extra} bytes of extra data, beyond qemu's limit; \
                     the rest of the snapshot table is not checked"
                ));
                break;
            }
            let len = (40 + u64::from(extra) + id_len + name_len).div_ceil(8) * 8;
            let Some(next) = at.checked_add(len) else {
                self.report
                    .corrupt("the snapshot table runs past 2^64".to_string());
                break;
            };
            self.walk_l1(
                l1_offset,
                l1_size,
                Kind::SnapshotL1,
                &format!("snapshot {i}"),
            )?;
            at = next;
        }
        let table = at - self.h.snapshots_offset;
        self.add(self.h.snapshots_offset, table, Kind::SnapshotTable)
    }

    /// Where the bitmaps extension says the bitmap directory is, if the
    /// image has one qemu would use: `(bitmaps, size, offset)`.
    fn bitmaps_extension(&self, first: &[u8]) -> Option<(u32, u64, u64)> {
        if self.h.version < 3 || self.h.autoclear & AUTOCLEAR_BITMAPS == 0 {
            return None;
        }
        let mut at = be32(first, 100) as usize;
        while at + 8 <= first.len() {
            let (typ, len) = (be32(first, at), be32(first, at + 4) as usize);
            at += 8;
            let data = first.get(at..at.checked_add(len)?)?;
            match typ {
                0 => return None,
                EXT_BITMAPS if len >= 24 => {
                    return Some((be32(data, 0), be64(data, 8), be64(data, 16)))
                }
                _ => {}
            }
            at = at.checked_add(len.div_ceil(8) * 8)?;
        }
        None
    }

    /// Persistent bitmaps: the directory, each bitmap's table and the
    /// clusters it names.
    fn bitmaps(&mut self, first: &[u8]) -> Result<()> {
        let Some((n, size, offset)) = self.bitmaps_extension(first) else {
            return Ok(());
        };
        if size > MAX_BITMAP_DIRECTORY || !self.geo.aligned(offset) {
            self.report.corrupt(format!(
                "the bitmap directory of {size} bytes at offset={offset:#x} is invalid"
            ));
            return Ok(());
        }
        self.add(offset, size, Kind::BitmapDirectory)?;
        let inside = self.file_size.saturating_sub(offset).min(size);
        self.spend(inside / 8)?;
        let mut dir = vec![0u8; inside as usize];
        self.read(&mut dir, offset)?;
        let mut at = 0usize;
        for i in 0..n {
            let Some(e) = dir.get(at..at + 24) else {
                break;
            };
            let (table, entries) = (be64(e, 0), u64::from(be32(e, 8)));
            let name_len = usize::from(u16::from_be_bytes([e[18], e[19]]));
            let extra = be32(e, 20) as usize;
            at = (at + 24 + extra + name_len).div_ceil(8) * 8;
            if entries > MAX_BITMAP_TABLE || !self.geo.aligned(table) {
                self.report.corrupt(format!(
                    "bitmap {i}: its table of {entries} entries at offset={table:#x} is invalid"
                ));
                continue;
            }
            self.add(table, entries * 8, Kind::BitmapTable)?;
            for e in self.read_table(table, entries)? {
                let data = e & OFFSET_MASK;
                if e & BITMAP_RESERVED != 0 || !self.geo.aligned(data) {
                    self.report.corrupt(format!(
                        "bitmap {i}: table entry {e:#x} has reserved bits set or is not aligned"
                    ));
                }
                if data != 0 {
                    self.add(data, self.geo.cluster_size(), Kind::BitmapData)?;
                }
            }
        }
        Ok(())
    }

    /// The refcount blocks, counted once each and checked to lie in the
    /// image; the table is kept to look refcounts up.
    fn refcount_blocks(&mut self, entries: u64) -> Result<()> {
        let offset = self.h.refcount_table_offset;
        self.reftable = self.read_table(offset, entries)?;
        self.blocks = vec![None; self.reftable.len()];
        let cs = self.geo.cluster_size();
        let mut counted = Vec::new();
        for i in 0..self.reftable.len() {
            let e = self.reftable[i];
            if e == 0 {
                continue;
            }
            if e & !REFTABLE_OFFSET_MASK != 0 || !self.geo.aligned(e) {
                self.report.corrupt(format!(
                    "refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.reftable[i] = 0;
                continue;
            }
            if e >> self.geo.cluster_bits >= self.clusters {
                self.report
                    .corrupt(format!("refcount block {i} is outside image"));
                self.reftable[i] = 0;
                continue;
            }
            self.add(e, cs, Kind::RefcountBlock)?;
            counted.push((i, e >> self.geo.cluster_bits));
        }
        for (i, c) in counted {
            let n = self.expected[c as usize];
            if n != 1 {
                self.report
                    .corrupt(format!("refcount block {i} refcount={n}"));
            }
        }
        Ok(())
    }

    /// The refcount block of refcount table entry `bi`, read once (None
    /// where there is none, or none that is valid).
    fn block(&mut self, bi: u64) -> Result<Option<&[u8]>> {
        let Some(i) = usize::try_from(bi)
            .ok()
            .filter(|&i| i < self.reftable.len())
        else {
            return Ok(None);
        };
        let offset = self.reftable[i];
        if offset == 0 {
            return Ok(None);
        }
        if self.blocks[i].is_none() {
            let mut data = vec![0u8; self.geo.cluster_size() as usize].into_boxed_slice();
            self.read(&mut data, offset)?;
            self.blocks[i] = Some(data);
        }
        Ok(self.blocks[i].as_deref())
    }

    /// The refcount stored for cluster `c` (0 where no valid block covers
    /// it).
    fn stored(&mut self, c: u64) -> Result<u64> {
        let (rbb, order) = (self.geo.refblock_bits, self.geo.refcount_order);
        let index = (c & ((1 << rbb) - 1)) as usize;
        Ok(self
            .block(c >> rbb)?
            .map_or(0, |b| refcount::get(b, order, index)))
    }

    /// Compare what is stored with what was counted, for every cluster of
    /// the image and every one referenced past its end.
    fn compare(&mut self) -> Result<()> {
        let mut highest = None;
        self.spend(self.clusters)?;
        let beyond: Vec<(u64, u64)> = self.beyond.iter().map(|(&c, &(n, _))| (c, n)).collect();
        let inside = (0..self.clusters).map(|c| (c, None));
        for (c, counted) in inside.chain(beyond.into_iter().map(|(c, n)| (c, Some(n)))) {
            let reference = counted.unwrap_or_else(|| self.expected[c as usize]);
            let refcount = self.stored(c)?;
            if refcount > 0 || reference > 0 {
                highest = Some(c);
            }
            if refcount < reference {
                self.report.corrupt(format!(
                    "cluster {c} refcount={refcount} reference={reference}"
                ));
            } else if refcount > reference {
                self.report.leaks += 1;
                self.report.say(format!(
                    "Leaked cluster {c} refcount={refcount} reference={reference}"
                ));
            }
        }
        self.report.image_end = highest.map_or(0, |c| (c + 1) << self.geo.cluster_bits);
        self.past_the_end()
    }

    /// Count the refcounts stored for clusters past the end of the image
    /// that nothing references.
    fn past_the_end(&mut self) -> Result<()> {
        let (rbb, order) = (self.geo.refblock_bits, self.geo.refcount_order);
        for bi in 0..self.reftable.len() as u64 {
            let first = bi << rbb;
            let last = first + (1 << rbb) - 1;
            if self.reftable[bi as usize] == 0 || last < self.clusters {
                continue;
            }
            self.spend(1 << rbb)?;
            let from = first.max(self.clusters);
            let Some(block) = self.block(bi)? else {
                continue;
            };
            let stored: Vec<(u64, u64)> = (from..=last)
                .map(|c| (c, refcount::get(block, order, (c - first) as usize)))
                .filter(|&(_, r)| r > 0)
                .collect();
            for (c, refcount) in stored {
                if self.beyond.contains_key(&c) {
                    continue;
                }
                self.report.leaks_past_end += 1;
                self.report.say(format!(
                    "Leaked cluster {c} past the end of the image refcount={refcount} reference=0"
                ));
            }
        }
        Ok(())
    }

    /// The COPIED flag of the active L1 table's entries and of the L2
    /// entries they reach: set exactly where the refcount is 1.
    fn copied_flags(&mut self) -> Result<()> {
        let l1 = self.read_table(self.h.l1_table_offset, u64::from(self.h.l1_size))?;
        let mut seen = HashSet::new();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let refcount = self.stored(l2 >> self.geo.cluster_bits)?;
            if (refcount == 1) != (e & COPIED != 0) {
                self.report.corrupt(format!(
                    "OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:#x} refcount={refcount}"
                ));
            }
            if !self.geo.aligned(l2) || !seen.insert(l2) {
                continue;
            }
            let t = self.read_l2(l2)?;
            for j in 0..self.geo.l2_entries() {
                let (entry, _) = self.l2_entry(&t, j);
                let host = match Cluster::decode(&self.geo, entry) {
                    Ok(Cluster::Normal { host, .. }) => host,
                    Ok(Cluster::Zero { host, .. }) if host != 0 => host,
                    _ => continue,
                };
                let refcount = self.stored(host >> self.geo.cluster_bits)?;
                if (refcount == 1) != (entry & COPIED != 0) {
                    self.report.corrupt(format!(
                        "OFLAG_COPIED data cluster: l2_entry={entry:#x} refcount={refcount}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Against images that qemu-img and qemu-io make, with `qemu-img
    //! check` as the oracle; skipped (with a message) where they are not
    //! installed.

    use super::*;
    use crate::io::FileIo;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A temporary directory, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "qcow2-check-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }

        fn file(&self, name: &str) -> String {
            self.0.join(name).to_str().unwrap().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Whether qemu-img and qemu-io can be run; says why not.
    fn have_qemu(test: &str) -> bool {
        let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
            Command::new(t)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !ok {
            eprintln!("{test}: skipped: qemu-img or qemu-io is not installed");
        }
        ok
    }

    fn run(args: &[&str]) {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// qemu-io commands on an image (`-c` each).
    fn qemu_io(path: &str, cmds: &[&str]) {
        let mut args = vec!["qemu-io", "-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(path);
        run(&args);
    }

    /// `qemu-img check`'s exit status: 0 clean, 2 corrupt, 3 leaks only.
    fn qemu_check(path: &str) -> i32 {
        qemu_check_with(&["-f", "qcow2", path])
    }

    fn qemu_check_with(args: &[&str]) -> i32 {
        Command::new("qemu-img")
            .arg("check")
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
            .unwrap()
    }

    /// This module's check of the image at `path`.
    fn ours(path: &str) -> Report {
        let io = FileIo::new(File::open(path).unwrap(), path.into());
        check(&io).unwrap()
    }

    /// Ours and qemu's agree that the image is clean.
    fn assert_clean(path: &str) {
        let r = ours(path);
        assert!(r.is_clean(), "{path}:\n{r}");
        assert_eq!(qemu_check(path), 0, "{path}: qemu-img check disagrees");
    }

    fn create(path: &str, opts: &str, size: &str) {
        run(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, size,
        ]);
    }

    /// Bytes that compress to about half: deflate packs compressed
    /// clusters so that they cross cluster boundaries.
    fn half_random(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x & 0x0f) as u8
            })
            .collect()
    }

    fn header(path: &str) -> Header {
        let mut first = vec![0u8; 4096];
        File::open(path).unwrap().read_at(&mut first, 0).unwrap();
        Header::parse(&first).unwrap()
    }

    fn read_u64(path: &str, at: u64) -> u64 {
        let mut b = [0u8; 8];
        File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    }

    fn write_at(path: &str, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// Where the 16-bit refcount of the cluster at `host` is stored.
    fn refcount_at(path: &str, h: &Header, host: u64) -> u64 {
        let geo = Geometry::of(h);
        let c = host >> geo.cluster_bits;
        let block = read_u64(path, h.refcount_table_offset + (c >> geo.refblock_bits) * 8);
        assert_ne!(block, 0);
        assert_eq!(h.refcount_order, 4);
        block + (c & ((1 << geo.refblock_bits) - 1)) * 2
    }

    /// The offset of the first L2 table and of guest cluster 0's data.
    fn first_cluster(path: &str, h: &Header) -> (u64, u64) {
        let l2 = read_u64(path, h.l1_table_offset) & OFFSET_MASK;
        let data = read_u64(path, l2) & OFFSET_MASK;
        assert!(l2 != 0 && data != 0);
        (l2, data)
    }

    const KINDS: &[&str] = &[
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=65536,refcount_bits=64",
        "compat=0.10",
        "compat=0.10,cluster_size=1024",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16384,refcount_bits=8",
        "cluster_size=2M",
        "preallocation=metadata,cluster_size=4096",
        "lazy_refcounts=on",
        "compression_type=zstd,cluster_size=4096",
    ];

    #[test]
    fn fresh_images_of_every_kind_are_clean() {
        if !have_qemu("fresh_images_of_every_kind_are_clean") {
            return;
        }
        let d = Dir::new();
        for (i, opts) in KINDS.iter().enumerate() {
            let p = d.file(&format!("{i}.qcow2"));
            create(&p, opts, "8M");
            assert_clean(&p);
        }
    }

    #[test]
    fn images_written_by_qemu_are_clean() {
        if !have_qemu("images_written_by_qemu_are_clean") {
            return;
        }
        let d = Dir::new();
        for (i, opts) in KINDS.iter().enumerate() {
            let p = d.file(&format!("{i}.qcow2"));
            create(&p, opts, "8M");
            let compat2 = opts.contains("compat=0.10");
            let mut cmds = vec![
                "write -P 0xab 0 300k",
                "write -P 0x11 1000k 5k",
                "discard 128k 128k",
                "write -z 4M 1M",
            ];
            let compressed = format!("write -c -P 0x22 6M {}", header(&p).cluster_size());
            if !opts.contains("preallocation") {
                // (qemu writes compressed clusters only where none is.)
                cmds.push(&compressed);
            }
            if !compat2 {
                cmds.push("write -z -u 64k 64k");
            }
            qemu_io(&p, &cmds);
            assert_clean(&p);
            if opts.contains("refcount_bits=1") {
                // No room for a refcount of 2: no snapshots.
                continue;
            }
            // A snapshot shares everything; writing after it copies.
            run(&["qemu-img", "snapshot", "-c", "s1", &p]);
            qemu_io(&p, &["write -P 0x33 0 8k", "write -P 0x44 2M 100k"]);
            run(&["qemu-img", "snapshot", "-c", "s2", &p]);
            qemu_io(&p, &["discard 0 1M", "write -P 0x55 7M 512"]);
            let r = ours(&p);
            assert!(r.is_clean(), "{opts}:\n{r}");
            assert_eq!(qemu_check(&p), 0, "{opts}");
        }
    }

    #[test]
    fn compressed_clusters_that_cross_cluster_boundaries_are_counted() {
        if !have_qemu("compressed_clusters_that_cross_cluster_boundaries_are_counted") {
            return;
        }
        let d = Dir::new();
        let raw = d.file("raw");
        std::fs::write(&raw, half_random(1 << 20)).unwrap();
        for (i, opts) in [
            "cluster_size=512",
            "cluster_size=4096,compression_type=zstd",
            "extended_l2=on,cluster_size=16384",
        ]
        .iter()
        .enumerate()
        {
            let p = d.file(&format!("{i}.qcow2"));
            run(&[
                "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, &raw, &p,
            ]);
            assert_clean(&p);
        }
    }

    #[test]
    fn bitmaps_and_luks_headers_are_counted() {
        if !have_qemu("bitmaps_and_luks_headers_are_counted") {
            return;
        }
        let d = Dir::new();
        let p = d.file("bitmaps.qcow2");
        create(&p, "cluster_size=4096", "64M");
        run(&["qemu-img", "bitmap", "--add", &p, "b0"]);
        run(&["qemu-img", "bitmap", "--add", "-g", "65536", &p, "b1"]);
        qemu_io(&p, &["write -P 1 0 1M", "write -P 2 32M 64k"]);
        assert!(header(&p).has_bitmaps);
        assert_clean(&p);

        let p = d.file("luks.qcow2");
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            &p,
            "4M",
        ]);
        run(&[
            "qemu-io",
            "--object",
            "secret,id=s0,data=pw",
            "--image-opts",
            "-c",
            "write -P 7 0 100k",
            &format!("driver=qcow2,file.filename={p},encrypt.key-secret=s0"),
        ]);
        assert!(matches!(header(&p).encryption, Encryption::Luks { .. }));
        let r = ours(&p);
        assert!(r.is_clean(), "{r}");
        let opts = format!("driver=qcow2,file.filename={p},encrypt.key-secret=s0");
        let args = ["--object", "secret,id=s0,data=pw", "--image-opts", &opts];
        assert_eq!(qemu_check_with(&args), 0);
    }

    #[test]
    fn a_refcount_too_low_is_a_corruption_and_too_high_a_leak() {
        if !have_qemu("a_refcount_too_low_is_a_corruption_and_too_high_a_leak") {
            return;
        }
        let d = Dir::new();
        let p = d.file("a.qcow2");
        create(&p, "cluster_size=4096", "8M");
        qemu_io(&p, &["write -P 0xab 0 64k"]);
        let h = header(&p);
        let (_, data) = first_cluster(&p, &h);
        let at = refcount_at(&p, &h, data);

        // The data cluster's refcount drops to 0: a corruption, and its
        // COPIED flag no longer matches.
        write_at(&p, at, &0u16.to_be_bytes());
        let r = ours(&p);
        let c = data >> 12;
        assert!(
            r.messages
                .contains(&format!("ERROR cluster {c} refcount=0 reference=1")),
            "{r}"
        );
        assert!(
            r.messages
                .iter()
                .any(|m| m.contains("OFLAG_COPIED data cluster")),
            "{r}"
        );
        assert_eq!((r.corruptions, r.leaks), (2, 0), "{r}");
        assert_eq!(qemu_check(&p), 2);

        // At 2 it leaks, and COPIED is still wrong.
        write_at(&p, at, &2u16.to_be_bytes());
        let r = ours(&p);
        assert_eq!((r.corruptions, r.leaks), (1, 1), "{r}");
        assert_eq!(qemu_check(&p), 2);

        // The L1 table's cluster at 2: a leak only.
        write_at(&p, at, &1u16.to_be_bytes());
        assert_clean(&p);
        write_at(
            &p,
            refcount_at(&p, &h, h.l1_table_offset),
            &2u16.to_be_bytes(),
        );
        let r = ours(&p);
        assert_eq!((r.corruptions, r.leaks), (0, 1), "{r}");
        assert!(r.messages[0].starts_with("Leaked cluster"), "{r}");
        assert_eq!(qemu_check(&p), 3);
    }

    #[test]
    fn entries_into_metadata_and_misaligned_entries_are_corruptions() {
        if !have_qemu("entries_into_metadata_and_misaligned_entries_are_corruptions") {
            return;
        }
        let d = Dir::new();
        let p = d.file("a.qcow2");
        create(&p, "cluster_size=4096", "8M");
        qemu_io(&p, &["write -P 0xab 0 4k"]);
        let h = header(&p);
        let (l2, data) = first_cluster(&p, &h);

        // Guest cluster 0 mapped onto the refcount table.
        write_at(&p, l2, &(h.refcount_table_offset | COPIED).to_be_bytes());
        let r = ours(&p);
        assert!(
            r.messages.iter().any(|m| m.contains("is used as")
                && m.contains("the refcount table")
                && m.contains("a data cluster")),
            "{r}"
        );
        assert!(r.corruptions >= 2, "{r}");
        assert_eq!(qemu_check(&p), 2);

        // Not cluster-aligned.
        write_at(&p, l2, &((data + 512) | COPIED).to_be_bytes());
        let r = ours(&p);
        assert!(
            r.messages
                .iter()
                .any(|m| m.contains("not properly aligned")),
            "{r}"
        );
        assert_eq!(qemu_check(&p), 2);

        // Reserved bits, and a compressed entry with COPIED.
        write_at(&p, l2, &(data | COPIED | 1 << 56).to_be_bytes());
        let r = ours(&p);
        assert!(
            r.messages.iter().any(|m| m.contains("reserved bits")),
            "{r}"
        );
        write_at(&p, l2, &(data | COPIED | COMPRESSED).to_be_bytes());
        let r = ours(&p);
        assert!(
            r.messages
                .iter()
                .any(|m| m.contains("copied flag must never")),
            "{r}"
        );
        assert_eq!(qemu_check(&p), 2);
    }

    #[test]
    fn a_refcount_block_outside_the_image_is_a_corruption() {
        if !have_qemu("a_refcount_block_outside_the_image_is_a_corruption") {
            return;
        }
        let d = Dir::new();
        let p = d.file("a.qcow2");
        create(&p, "cluster_size=4096", "8M");
        let h = header(&p);
        write_at(&p, h.refcount_table_offset + 8, &(1u64 << 40).to_be_bytes());
        let r = ours(&p);
        assert!(
            r.messages
                .iter()
                .any(|m| m.contains("refcount block 1 is outside image")),
            "{r}"
        );
        assert_eq!(qemu_check(&p), 2);
    }

    #[test]
    fn a_refcount_past_the_end_of_the_image_is_a_leak_qemu_does_not_see() {
        if !have_qemu("a_refcount_past_the_end_of_the_image_is_a_leak_qemu_does_not_see") {
            return;
        }
        let d = Dir::new();
        let p = d.file("a.qcow2");
        create(&p, "cluster_size=4096", "8M");
        let h = header(&p);
        let end = std::fs::metadata(&p).unwrap().len();
        write_at(
            &p,
            refcount_at(&p, &h, end + 10 * 4096),
            &1u16.to_be_bytes(),
        );
        let r = ours(&p);
        assert_eq!((r.corruptions, r.leaks, r.leaks_past_end), (0, 0, 1), "{r}");
        assert!(!r.is_clean());
        assert_eq!(qemu_check(&p), 0, "qemu does not look past the end");
    }

    /// A header claiming the largest tables, in a tiny file: the check
    /// reads zeroes past the end without allocating for them.
    #[test]
    fn tables_past_the_end_of_a_tiny_image_read_as_zeroes() {
        let d = Dir::new();
        let p = d.file("tiny");
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(&crate::header::MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&9u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 36).to_be_bytes());
        b[36..40].copy_from_slice(&((MAX_L1_BYTES / 8) as u32).to_be_bytes());
        b[40..48].copy_from_slice(&(1u64 << 50).to_be_bytes());
        b[48..56].copy_from_slice(&512u64.to_be_bytes());
        b[56..60].copy_from_slice(&16384u32.to_be_bytes());
        b[60..64].copy_from_slice(&65536u32.to_be_bytes());
        b[64..72].copy_from_slice(&(1u64 << 45).to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        std::fs::write(&p, &b).unwrap();
        let r = ours(&p);
        // The reftable is the header's own cluster, and nothing counts.
        assert!(r.corruptions > 0, "{r}");
        assert!(Path::new(&p).exists());
    }
}
