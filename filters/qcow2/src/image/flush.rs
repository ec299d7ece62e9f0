//! The flush sequence: write back the dirty metadata in the order that
//! keeps the image consistent at every moment, then make it durable.
//!
//! 1. dirty refcount blocks; flush below (refcounts, and the data written
//!    before this sequence began, are durable before what points at them);
//! 2. dirty L2 tables; flush below;
//! 3. dirty pieces of the L1 table; flush below;
//! 4. the frees whose references are now durably gone: refcounts drop
//!    in memory ([`Image::flush`] then runs a second sequence to write
//!    them; lost in a crash, they leak, as qemu allows).
//!
//! Everything is copied at one instant, under the metadata lock, so an
//! L2 entry in step 2 never points at a cluster whose refcount change
//! came after step 1's copy. What changes meanwhile stays dirty for the
//! next sequence.

use std::sync::atomic::Ordering;

use crate::error::Result;
use crate::io::Io;

use super::Image;

/// What one sequence writes: `(offset, change count, bytes)`.
struct Snapshot {
    refblocks: Vec<(u64, u64, Box<[u8]>)>,
    l2: Vec<(u64, u64, Box<[u8]>)>,
    l1: Vec<(usize, u64, Vec<u8>)>,
    frees: Vec<(u64, u64)>,
    epoch: usize,
}

impl Image {
    /// Run the flush sequence over `io`.
    pub(crate) fn flush_metadata(&self, io: &dyn Io) -> Result<()> {
        let _one = self.flushing.lock().expect("flush lock poisoned");
        let snap = self.snapshot();
        if let Err(e) = self.write_snapshot(io, &snap) {
            // Nothing was marked clean; the frees wait for the next try.
            self.lock().frees.extend(snap.frees);
            return Err(e);
        }
        if !snap.frees.is_empty() {
            self.drain(snap.epoch);
            let mut m = self.lock();
            for &(offset, bytes) in &snap.frees {
                self.release(&mut m, io, offset, bytes)?;
            }
        }
        Ok(())
    }

    /// Copy what is dirty, and start a new epoch for the frees.
    fn snapshot(&self) -> Snapshot {
        let mut m = self.lock();
        let per_block = (self.opts.align.max(512) / 8) as usize;
        let l1 = m
            .l1_dirty
            .iter()
            .map(|(&block, &gen)| {
                let first = block * per_block;
                let end = (first + per_block).min(m.l1.len());
                let bytes = m.l1[first..end]
                    .iter()
                    .flat_map(|e| e.to_be_bytes())
                    .collect();
                (block, gen, bytes)
            })
            .collect();
        let frees = std::mem::take(&mut m.frees);
        let epoch = m.epoch;
        if !frees.is_empty() {
            m.epoch ^= 1;
        }
        Snapshot {
            refblocks: m.refblocks.dirty(),
            l2: m.l2.dirty(),
            l1,
            frees,
            epoch,
        }
    }

    fn write_snapshot(&self, io: &dyn Io, s: &Snapshot) -> Result<()> {
        let later = !s.l2.is_empty() || !s.l1.is_empty() || !s.frees.is_empty();
        for (offset, _, data) in &s.refblocks {
            self.write_host(io, data, *offset)?;
        }
        if !s.refblocks.is_empty() || later {
            io.flush()?;
        }
        for (offset, _, data) in &s.l2 {
            self.write_host(io, data, *offset)?;
        }
        if !s.l2.is_empty() {
            io.flush()?;
        }
        let per_block = self.opts.align.max(512);
        for (block, _, bytes) in &s.l1 {
            self.write_host(
                io,
                bytes,
                self.header.l1_table_offset + *block as u64 * per_block,
            )?;
        }
        if !s.l1.is_empty() {
            io.flush()?;
        }
        if s.refblocks.is_empty() && !later {
            // Nothing of ours was dirty: the client's flush still is one.
            io.flush()?;
        }
        let mut m = self.lock();
        for (offset, gen, _) in &s.refblocks {
            m.refblocks.written(*offset, *gen);
        }
        for (offset, gen, _) in &s.l2 {
            m.l2.written(*offset, *gen);
        }
        for (block, gen, _) in &s.l1 {
            if m.l1_dirty.get(block) == Some(gen) {
                m.l1_dirty.remove(block);
            }
        }
        Ok(())
    }

    /// Wait until no request counted in `epoch` is still doing I/O.
    fn drain(&self, epoch: usize) {
        let mut spins = 0u32;
        while self.passes[epoch].load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }
}
