//! An open qcow2 image: its metadata in memory and the operations that
//! serve its guest disk over the bytes below ([`Io`]).
//!
//! One `Image` serves every connection to it. Its metadata sits behind
//! one mutex ([`Meta`]), held only while entries are looked up or
//! changed, never across data I/O, so requests to different clusters run
//! in parallel. Changes are ordered as the specification asks, by the
//! flush sequence in `flush.rs`:
//!
//! - a cluster's refcount increment is durable before any L2 entry that
//!   points to it, and the data written there is too;
//! - an L2 table is durable before the L1 entry that points to it;
//! - a reference is durably removed before its cluster's refcount is
//!   decremented (frees wait in [`Meta::frees`]), and a freed cluster is
//!   reused only once no request that could still see it is running
//!   (the two epochs of [`Image::passes`]);
//! - new refcount blocks and tables are durable before what points to
//!   them (`alloc.rs` writes them at once, in order).
//!
//! A cluster whose L2 entry a request is about to change is marked in
//! [`Meta::in_flight`] until the change is made; others touching it wait.

mod alloc;
mod cache;
mod discard;
mod flush;
mod map;
mod write;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::compress::Decompressor;
use crate::crypto::Crypto;
use crate::error::{Error, Result};
use crate::header::{self, Header};
use crate::io::{Beneath, Io};
use crate::layout::{self, Geometry, COPIED};

pub use cache::Cache;
pub use map::{HOLE, ZERO};

/// How an image is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes of L2 tables to keep in memory.
    pub l2_cache: u64,
    /// Bytes of refcount blocks to keep in memory.
    pub refcount_cache: u64,
    /// Whether the layer below makes one connection's flush cover every
    /// connection's writes; without it, data is flushed by the connection
    /// that wrote it before metadata pointing at it is published.
    pub shared_flush: bool,
    /// The layer below's minimum I/O size (1 if none).
    pub align: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            l2_cache: 32 << 20,
            refcount_cache: 1 << 20,
            shared_flush: true,
            align: 1,
        }
    }
}

/// The metadata of an image, behind [`Image::meta`].
pub(crate) struct Meta {
    /// The active L1 table, host-endian.
    pub l1: Vec<u64>,
    /// Dirty pieces of the L1 table (by `align`-sized block) and the
    /// change count they were last changed at.
    pub l1_dirty: HashMap<usize, u64>,
    pub l2: Cache,
    pub refblocks: Cache,
    /// The refcount table, host-endian.
    pub reftable: Vec<u64>,
    pub reftable_offset: u64,
    /// Guest clusters whose L2 entries a request is changing.
    pub in_flight: HashSet<u64>,
    /// Tables being read into the cache by some request.
    pub loading: HashSet<u64>,
    /// Allocations whose last reference was removed but not yet durably:
    /// `(offset, bytes)`, each to be decremented once.
    pub frees: Vec<(u64, u64)>,
    /// No free cluster below this cluster index.
    pub free_hint: u64,
    /// Clusters from here on have never been written since the image was
    /// opened and lie past the end the layer below had then: they read as
    /// zeroes without being written.
    pub fresh_from: u64,
    /// Counts changes, so the flush sequence can tell what changed while
    /// it was writing.
    pub gen: u64,
    /// Which of [`Image::passes`] new requests count themselves in.
    pub epoch: usize,
    /// The caches hold more than they should: the request that notices
    /// runs the flush sequence.
    pub need_flush: bool,
}

impl Meta {
    /// The next change count.
    pub fn change(&mut self) -> u64 {
        self.gen += 1;
        self.gen
    }
}

/// Permission for one request's data I/O against the mapping it looked
/// up: while it lives, clusters freed after the lookup are not reused.
pub(crate) struct Pass<'a>(&'a AtomicU64);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// An open image.
pub struct Image {
    pub(crate) geo: Geometry,
    pub(crate) opts: Options,
    /// The image's first `align`-sized block (at least the 104 bytes of a
    /// header), to patch header fields in.
    pub(crate) header_block: Mutex<Vec<u8>>,
    pub(crate) header: Header,
    pub(crate) backing: Option<Arc<dyn Beneath>>,
    pub(crate) crypto: Option<Arc<Crypto>>,
    pub(crate) decompressor: Decompressor,
    pub(crate) meta: Mutex<Meta>,
    /// Signalled when an in-flight cluster is done or a table is loaded.
    pub(crate) changed: Condvar,
    /// One flush sequence at a time.
    pub(crate) flushing: Mutex<()>,
    /// Requests counted in the two epochs (see [`Pass`]).
    pub(crate) passes: [AtomicU64; 2],
    /// Where the layer below ends as far as this image knows: past it,
    /// reads see zeroes, as qemu's do.
    pub(crate) file_end: AtomicU64,
    pub(crate) writable: AtomicBool,
}

/// The big-endian u32 at `at`.
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The big-endian u64 at `at`.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Image {
    /// Read and check the header of the image behind `io`: the parsed
    /// header and the whole first cluster.
    pub fn read_header(io: &dyn Io) -> Result<(Header, Vec<u8>)> {
        let size = io.size()?;
        let mut first = vec![0u8; 4096.min(size) as usize];
        io.read_at(&mut first, 0)?;
        // The cluster size is in the first bytes; the extensions and the
        // backing name may fill the rest of the first cluster, and end
        // with it, as qemu reads them (not in the next cluster's bytes).
        let field = |at: usize| first.get(at..at + 4).map(|b| be32(b, 0));
        if let (Some(header::MAGIC), Some(bits)) = (field(0), field(20)) {
            if (9..=header::MAX_CLUSTER_BITS).contains(&bits) {
                let want = (1u64 << bits).min(size) as usize;
                if want > first.len() {
                    first.resize(want, 0);
                    io.read_at(&mut first, 0)?;
                }
                first.truncate(want);
            }
        }
        Ok((Header::parse(&first)?, first))
    }

    /// Open the image behind `io`, whose header `read_header` returned,
    /// with its backing chain and decryption already set up.
    pub fn open(
        io: &dyn Io,
        header: Header,
        first: &[u8],
        opts: Options,
        backing: Option<Arc<dyn Beneath>>,
        crypto: Option<Arc<Crypto>>,
    ) -> Result<Image> {
        let geo = Geometry::of(&header);
        let align = opts.align.max(1);
        if align > geo.cluster_size() {
            return Err(Error::Unsupported(format!(
                "clusters of {} bytes are smaller than the {align}-byte blocks the layer below needs",
                geo.cluster_size()
            )));
        }
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        io.read_at(&mut l1_bytes, header.l1_table_offset)?;
        let l1: Vec<u64> = l1_bytes.chunks_exact(8).map(|c| be64(c, 0)).collect();
        for &e in &l1 {
            layout::l1_offset(&geo, e)?;
        }
        let reftable_len = (u64::from(header.refcount_table_clusters) << geo.cluster_bits) as usize;
        let mut rt = vec![0u8; reftable_len];
        io.read_at(&mut rt, header.refcount_table_offset)?;
        let reftable: Vec<u64> = rt.chunks_exact(8).map(|c| be64(c, 0)).collect();
        for &e in &reftable {
            if e & !layout::REFTABLE_OFFSET_MASK != 0 || !geo.aligned(e) {
                return Err(Error::corrupt(format!(
                    "refcount table entry {e:#x} is not cluster-aligned"
                )));
            }
        }
        let file_end = io.size()?;
        let cs = geo.cluster_size();
        let tables = |bytes: u64| (bytes / cs) as usize;
        let mut block = first[..(align as usize).max(512).min(first.len())].to_vec();
        block.resize((align as usize).max(512), 0);
        let compression = header.compression;
        Ok(Image {
            geo,
            header_block: Mutex::new(block),
            backing,
            crypto,
            decompressor: Decompressor::new(compression, cs as usize),
            meta: Mutex::new(Meta {
                l1,
                l1_dirty: HashMap::new(),
                l2: Cache::new(tables(opts.l2_cache)),
                refblocks: Cache::new(tables(opts.refcount_cache)),
                reftable,
                reftable_offset: header.refcount_table_offset,
                in_flight: HashSet::new(),
                loading: HashSet::new(),
                frees: Vec::new(),
                free_hint: 0,
                fresh_from: file_end.div_ceil(cs) * cs,
                gen: 0,
                epoch: 0,
                need_flush: false,
            }),
            header,
            opts,
            changed: Condvar::new(),
            flushing: Mutex::new(()),
            passes: [AtomicU64::new(0), AtomicU64::new(0)],
            file_end: AtomicU64::new(file_end),
            writable: AtomicBool::new(false),
        })
    }

    /// The guest disk's size.
    pub fn size(&self) -> u64 {
        self.geo.size
    }

    /// The image's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The parsed header, as it was opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether the image has a backing file in use.
    pub fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// Whether the image is encrypted.
    pub fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// Whether writes are allowed (see [`Image::make_writable`]).
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Allow writes: refuse an image qemu marked corrupt or left with
    /// stale refcounts, and clear the autoclear feature bits first, as the
    /// specification requires of a writer that does not maintain what
    /// they stand for (persistent bitmaps, above all, are not kept up to
    /// date here: with the bit clear, qemu treats them as inconsistent).
    pub fn make_writable(&self, io: &dyn Io) -> Result<()> {
        if self.writable() {
            return Ok(());
        }
        self.check_can_write()?;
        if self.header.version >= 3 && self.header.autoclear != 0 {
            let mut block = self.header_block.lock().expect("header lock");
            block[header::field::AUTOCLEAR..header::field::AUTOCLEAR + 8]
                .copy_from_slice(&0u64.to_be_bytes());
            self.write_host(io, &block, 0)?;
            io.flush()?;
        }
        self.writable.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the image's state lets it be written at all.
    pub fn check_can_write(&self) -> Result<()> {
        if self.header.corrupt() {
            return Err(Error::ReadOnly(
                "qemu marked the image corrupt; it is served read-only \
                 (qemu-img check -r all repairs it)"
                    .into(),
            ));
        }
        if self.header.dirty() {
            return Err(Error::ReadOnly(
                "the image was not closed cleanly and its lazy refcounts are stale; \
                 it is served read-only until qemu-img check -r all repairs it"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The metadata, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().expect("qcow2 metadata lock poisoned")
    }

    /// Wait for a change (an in-flight cluster done, a table loaded).
    pub(crate) fn wait<'a>(&self, m: MutexGuard<'a, Meta>) -> MutexGuard<'a, Meta> {
        self.changed.wait(m).expect("qcow2 metadata lock poisoned")
    }

    /// Count the caller's data I/O in the current epoch.
    pub(crate) fn pass(&self, m: &Meta) -> Pass<'_> {
        let c = &self.passes[m.epoch];
        c.fetch_add(1, Ordering::AcqRel);
        Pass(c)
    }

    /// Lock the metadata with the L2 table of `l1_index` in the cache:
    /// returns its offset, or 0 when the L1 entry has none.
    pub(crate) fn lock_l2(
        &self,
        io: &dyn Io,
        l1_index: usize,
    ) -> Result<(MutexGuard<'_, Meta>, u64)> {
        let mut m = self.lock();
        loop {
            let entry = *m.l1.get(l1_index).ok_or_else(|| {
                Error::corrupt(format!(
                    "guest offset beyond the L1 table (index {l1_index})"
                ))
            })?;
            let table = layout::l1_offset(&self.geo, entry)?;
            if table == 0 || m.l2.contains(table) {
                return Ok((m, table));
            }
            if m.loading.contains(&table) {
                m = self.wait(m);
                continue;
            }
            m.loading.insert(table);
            drop(m);
            let mut data = vec![0u8; self.geo.cluster_size() as usize].into_boxed_slice();
            let read = self.read_host(io, &mut data, table);
            m = self.lock();
            m.loading.remove(&table);
            self.changed.notify_all();
            read?;
            if m.l2.insert(table, data, None) {
                m.need_flush = true;
            }
        }
    }

    /// Read at `host` in the image, seeing zeroes past its known end.
    pub(crate) fn read_host(&self, io: &dyn Io, buf: &mut [u8], host: u64) -> Result<()> {
        let end = self.file_end.load(Ordering::Acquire);
        let len = buf.len() as u64;
        if host + len <= end {
            return io.read_at(buf, host);
        }
        let inside = end.saturating_sub(host).min(len) as usize;
        if inside > 0 {
            io.read_at(&mut buf[..inside], host)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    /// Write at `host` in the image.
    pub(crate) fn write_host(&self, io: &dyn Io, buf: &[u8], host: u64) -> Result<()> {
        io.write_at(buf, host, false)?;
        self.file_end
            .fetch_max(host + buf.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    /// Refuse a change unless the image is writable.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.writable() {
            Ok(())
        } else {
            Err(Error::ReadOnly("the image is open read-only".into()))
        }
    }

    /// The L2 entry (and extended bitmap) at `index` of a cached table.
    pub(crate) fn l2_entry(&self, table: &[u8], index: usize) -> (u64, u64) {
        if self.geo.extended {
            (be64(table, index * 16), be64(table, index * 16 + 8))
        } else {
            (be64(table, index * 8), 0)
        }
    }

    /// Store an L2 entry (and bitmap) at `index` of a table.
    pub(crate) fn set_l2_entry(&self, table: &mut [u8], index: usize, entry: u64, bitmap: u64) {
        if self.geo.extended {
            table[index * 16..index * 16 + 8].copy_from_slice(&entry.to_be_bytes());
            table[index * 16 + 8..index * 16 + 16].copy_from_slice(&bitmap.to_be_bytes());
        } else {
            table[index * 8..index * 8 + 8].copy_from_slice(&entry.to_be_bytes());
        }
    }

    /// Set L1 entry `index`, marking its block dirty.
    pub(crate) fn set_l1(&self, m: &mut Meta, index: usize, entry: u64) {
        m.l1[index] = entry;
        let gen = m.change();
        let per_block = (self.opts.align.max(512) / 8) as usize;
        m.l1_dirty.insert(index / per_block, gen);
    }

    /// Make the L2 table of `l1_index` this image's alone, so its entries
    /// may change: a new one if there is none, a copy if a snapshot
    /// shares it. Returns its offset; it is in the cache.
    pub(crate) fn own_l2(
        &self,
        m: &mut Meta,
        io: &dyn Io,
        l1_index: usize,
        table: u64,
    ) -> Result<u64> {
        let entry = m.l1[l1_index];
        if table != 0 && entry & COPIED != 0 {
            return Ok(table);
        }
        let new = self.alloc_cluster(m, io)?;
        let data = match table {
            0 => vec![0u8; self.geo.cluster_size() as usize].into_boxed_slice(),
            t => {
                m.l2.get(t)
                    .ok_or_else(|| Error::corrupt("shared L2 table left the cache"))?
                    .data
                    .clone()
            }
        };
        let gen = m.change();
        if m.l2.insert(new, data, Some(gen)) {
            m.need_flush = true;
        }
        self.set_l1(m, l1_index, new | COPIED);
        if table != 0 {
            // The snapshot keeps the old table; it loses this reference
            // once the new L1 entry is durable.
            m.frees.push((table, self.geo.cluster_size()));
        }
        Ok(new)
    }

    /// Write back everything and make it durable (a client's flush, and
    /// the last connection's goodbye).
    pub fn flush(&self, io: &dyn Io) -> Result<()> {
        if !self.writable() {
            return io.flush();
        }
        self.flush_metadata(io)?;
        // The frees that sequence made safe dropped their refcounts in
        // memory only: write those too, or a flushed image (and one closed
        // after its last flush) keeps the freed clusters as leaks.
        if self.lock().refblocks.dirty_count() > 0 {
            self.flush_metadata(io)?;
        }
        Ok(())
    }

    /// Run the flush sequence if the caches asked for it.
    pub(crate) fn flush_if_needed(&self, io: &dyn Io) -> Result<()> {
        let needed = {
            let mut m = self.lock();
            let over = m.frees.len() > 4096
                || m.l2.dirty_count() > m.l2.capacity() / 2
                || m.refblocks.dirty_count() > m.refblocks.capacity() / 2;
            std::mem::replace(&mut m.need_flush, false) || over
        };
        if needed {
            self.flush_metadata(io)?;
        }
        Ok(())
    }
}
