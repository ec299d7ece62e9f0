//! Host clusters: reading and changing refcounts, finding free clusters,
//! and growing the refcount structures when the image outgrows them.
//!
//! Refcount blocks and the refcount table are written here, at once and
//! in order (a new block before the table entry that names it, a new
//! table before the header that points to it), so the rest of the engine
//! only ever sees refcount blocks that exist. That takes the metadata
//! lock across the writes, which is rare: one 64 KiB block of 16-bit
//! refcounts covers 2 GiB of clusters.

use crate::error::{Error, Result};
use crate::header::{self, MAX_REFTABLE_BYTES};
use crate::io::Io;
use crate::refcount;

use super::{Image, Meta};

impl Image {
    /// Bring the refcount block at `block` into the cache.
    fn load_refblock(&self, m: &mut Meta, io: &dyn Io, block: u64) -> Result<()> {
        if m.refblocks.contains(block) {
            return Ok(());
        }
        let mut data = vec![0u8; self.geo.cluster_size() as usize];
        self.read_host(io, &mut data, block)?;
        if m.refblocks.insert(block, data.into_boxed_slice(), None) {
            m.need_flush = true;
        }
        Ok(())
    }

    /// The refcount block covering host cluster `c`, if there is one.
    fn refblock_of(&self, m: &Meta, c: u64) -> Option<u64> {
        let bi = (c >> self.geo.refblock_bits) as usize;
        m.reftable.get(bi).copied().filter(|&b| b != 0)
    }

    /// The refcount of host cluster `c` (0 where no block covers it).
    pub(crate) fn refcount(&self, m: &mut Meta, io: &dyn Io, c: u64) -> Result<u64> {
        let Some(block) = self.refblock_of(m, c) else {
            return Ok(0);
        };
        self.load_refblock(m, io, block)?;
        let index = (c & ((1 << self.geo.refblock_bits) - 1)) as usize;
        let t = m.refblocks.get(block).expect("just loaded");
        Ok(refcount::get(&t.data, self.geo.refcount_order, index))
    }

    /// Add one to (`up`) or take one from the refcount of host cluster `c`.
    pub(crate) fn adjust(&self, m: &mut Meta, io: &dyn Io, c: u64, up: bool) -> Result<()> {
        if up {
            self.ensure_refblock(m, io, (c >> self.geo.refblock_bits) as usize)?;
        }
        let block = self.refblock_of(m, c).ok_or_else(|| {
            Error::corrupt(format!(
                "freeing cluster {c}, which no refcount block covers"
            ))
        })?;
        self.load_refblock(m, io, block)?;
        let gen = m.change();
        let order = self.geo.refcount_order;
        let max = self.geo.max_refcount();
        let index = (c & ((1 << self.geo.refblock_bits) - 1)) as usize;
        let t = m.refblocks.get(block).expect("just loaded");
        let v = refcount::get(&t.data, order, index);
        let nv = match (up, v) {
            (true, v) if v == max => {
                return Err(Error::NoSpace(format!(
                    "the refcount of cluster {c} would overflow"
                )))
            }
            (true, v) => v + 1,
            (false, 0) => {
                return Err(Error::corrupt(format!(
                    "freeing cluster {c}, whose refcount is already 0"
                )))
            }
            (false, v) => v - 1,
        };
        refcount::set(&mut t.data, order, index, nv);
        t.dirty = Some(gen);
        if nv == 0 {
            m.free_hint = m.free_hint.min(c);
        }
        Ok(())
    }

    /// Allocate a run of contiguous host clusters, at least one and at
    /// most `n`, at the first free cluster: their refcounts become 1.
    /// Returns the first one's offset, how many there are, and whether the
    /// whole run is fresh (never written since the image was opened, past
    /// the end of the layer below then), so reads there see zeroes.
    ///
    /// A run stops where a range with no refcount block begins: that
    /// block will take the range's first cluster, so no run can span it.
    pub(crate) fn alloc_run(&self, m: &mut Meta, io: &dyn Io, n: u64) -> Result<(u64, u64, bool)> {
        let cb = self.geo.cluster_bits;
        let mut start = m.free_hint;
        loop {
            if (start + 1) << cb > 1 << 56 {
                return Err(Error::NoSpace(
                    "no room left below 64 PiB, qcow2's limit for clusters".into(),
                ));
            }
            if self.refblock_of(m, start).is_none() {
                self.ensure_refblock(m, io, (start >> self.geo.refblock_bits) as usize)?;
            }
            if self.refcount(m, io, start)? == 0 {
                break;
            }
            start += 1;
        }
        let mut count = 1;
        while count < n
            && self.refblock_of(m, start + count).is_some()
            && self.refcount(m, io, start + count)? == 0
        {
            count += 1;
        }
        for c in start..start + count {
            self.adjust(m, io, c, true)?;
        }
        // Everything below the run is in use: the search began there.
        m.free_hint = start + count;
        let (first, end) = (start << cb, (start + count) << cb);
        let fresh = first >= m.fresh_from;
        m.fresh_from = m.fresh_from.max(end);
        Ok((first, count, fresh))
    }

    /// Allocate one host cluster for metadata, which is written whole.
    pub(crate) fn alloc_cluster(&self, m: &mut Meta, io: &dyn Io) -> Result<u64> {
        self.alloc_run(m, io, 1).map(|(at, _, _)| at)
    }

    /// Make sure refcount block `bi` exists: a new one goes in the first
    /// cluster of the range it covers (free, since nothing counted it),
    /// counting itself, durable before the table entry that names it.
    fn ensure_refblock(&self, m: &mut Meta, io: &dyn Io, bi: usize) -> Result<()> {
        if m.reftable.get(bi).is_some_and(|&b| b != 0) {
            return Ok(());
        }
        if bi >= m.reftable.len() {
            self.grow_reftable(m, io, bi)?;
            if m.reftable[bi] != 0 {
                return Ok(());
            }
        }
        let cs = self.geo.cluster_size();
        let c = (bi as u64) << self.geo.refblock_bits;
        if c == 0 {
            return Err(Error::corrupt("no refcount block covers the header"));
        }
        let at = c * cs;
        let mut data = vec![0u8; cs as usize].into_boxed_slice();
        refcount::set(&mut data, self.geo.refcount_order, 0, 1);
        self.write_host(io, &data, at)?;
        io.flush()?;
        m.reftable[bi] = at;
        self.write_reftable_entry(m, io, bi)?;
        io.flush()?;
        if m.refblocks.insert(at, data, None) {
            m.need_flush = true;
        }
        m.fresh_from = m.fresh_from.max(at + cs);
        Ok(())
    }

    /// Write the piece of the refcount table holding entry `bi`.
    fn write_reftable_entry(&self, m: &Meta, io: &dyn Io, bi: usize) -> Result<()> {
        let per = (self.opts.align.max(512) / 8) as usize;
        let first = bi / per * per;
        let end = (first + per).min(m.reftable.len());
        let bytes: Vec<u8> = m.reftable[first..end]
            .iter()
            .flat_map(|e| e.to_be_bytes())
            .collect();
        self.write_host(io, &bytes, m.reftable_offset + first as u64 * 8)
    }

    /// Move the refcount table to a larger one at the end of the image,
    /// with the refcount blocks that the new clusters themselves need, so
    /// that it has entry `needed`.
    fn grow_reftable(&self, m: &mut Meta, io: &dyn Io, needed: usize) -> Result<()> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let rbb = self.geo.refblock_bits;
        let per_cluster = (cs / 8) as usize;
        let old_len = m.reftable.len();
        let new_len = (needed + 1).max(old_len * 2).div_ceil(per_cluster) * per_cluster;
        if new_len as u64 * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace(
                "the refcount table would outgrow qemu's 8 MiB limit".into(),
            ));
        }
        let t = (new_len * 8) as u64 / cs;
        let known_end = self.file_end.load(std::sync::atomic::Ordering::Acquire);
        let a = known_end.max(m.fresh_from).div_ceil(cs);
        // The blocks the new clusters need, placed right after the table:
        // how many depends on how many there are.
        let mut missing: Vec<u64> = Vec::new();
        loop {
            let last = a + t + missing.len() as u64;
            let now: Vec<u64> = ((a >> rbb)..=((last - 1) >> rbb))
                .filter(|&bi| m.reftable.get(bi as usize).is_none_or(|&b| b == 0))
                .collect();
            if now.len() == missing.len() {
                break;
            }
            missing = now;
        }
        let k = missing.len() as u64;
        let area = a..a + t + k;
        let mut table = m.reftable.clone();
        table.resize(new_len, 0);
        for (j, &bi) in missing.iter().enumerate() {
            let at = (a + t + j as u64) << cb;
            table[bi as usize] = at;
            let mut data = vec![0u8; cs as usize].into_boxed_slice();
            for x in area.clone().filter(|x| x >> rbb == bi) {
                refcount::set(
                    &mut data,
                    self.geo.refcount_order,
                    (x & ((1 << rbb) - 1)) as usize,
                    1,
                );
            }
            self.write_host(io, &data, at)?;
            if m.refblocks.insert(at, data, None) {
                m.need_flush = true;
            }
        }
        // Existing blocks that cover part of the area count it too, and
        // must be durable with the rest.
        let existing: Vec<u64> = ((a >> rbb)..=((a + t + k - 1) >> rbb))
            .filter(|bi| !missing.contains(bi))
            .collect();
        for bi in existing {
            for x in area.clone().filter(|x| x >> rbb == bi) {
                self.adjust(m, io, x, true)?;
            }
            let block = m.reftable[bi as usize];
            let (gen, data) = {
                let tb = m.refblocks.get(block).expect("adjusted just now");
                (tb.dirty.expect("adjusted just now"), tb.data.clone())
            };
            self.write_host(io, &data, block)?;
            m.refblocks.written(block, gen);
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_host(io, &bytes, a << cb)?;
        io.flush()?;
        {
            let mut block = self.header_block.lock().expect("header lock");
            let f = header::field::REFCOUNT_TABLE_OFFSET;
            block[f..f + 8].copy_from_slice(&(a << cb).to_be_bytes());
            let f = header::field::REFCOUNT_TABLE_CLUSTERS;
            block[f..f + 4].copy_from_slice(&(t as u32).to_be_bytes());
            self.write_host(io, &block, 0)?;
        }
        io.flush()?;
        let (old_at, old_clusters) = (m.reftable_offset, (old_len * 8) as u64 / cs);
        m.reftable = table;
        m.reftable_offset = a << cb;
        m.fresh_from = m.fresh_from.max((a + t + k) << cb);
        // Nothing refers to the old table any more, durably.
        for c in 0..old_clusters {
            self.adjust(m, io, (old_at >> cb) + c, false)?;
        }
        Ok(())
    }

    /// Take one from the refcount of every cluster an allocation spans.
    pub(crate) fn release(&self, m: &mut Meta, io: &dyn Io, offset: u64, bytes: u64) -> Result<()> {
        let cb = self.geo.cluster_bits;
        for c in (offset >> cb)..=((offset + bytes - 1) >> cb) {
            self.adjust(m, io, c, false)?;
        }
        Ok(())
    }
}
