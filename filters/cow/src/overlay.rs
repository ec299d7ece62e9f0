//! The overlay: a sparse temporary file holding changed blocks, and the
//! state of every block, shared by all connections.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use nbdhost_plugin_api::Result;

/// Where a block's current contents live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Unchanged: read it from the layer below.
    Base = 0,
    /// Written: the overlay file holds it.
    Data = 1,
    /// Zeroed without leave to deallocate: reads as zeroes.
    Zero = 2,
    /// Trimmed, or zeroed with leave to deallocate: reads as zeroes.
    Trimmed = 3,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Data,
            2 => State::Zero,
            3 => State::Trimmed,
            _ => State::Base,
        }
    }

    /// Whether the block reads as zeroes without any I/O.
    pub fn is_zero(self) -> bool {
        matches!(self, State::Zero | State::Trimmed)
    }
}

/// Locks that serialise changes to one block. Blocks map onto a fixed set
/// of locks; neighbours get different ones, so sequential writers rarely
/// contend while unrelated blocks are changed in parallel.
const STRIPES: usize = 64;

/// Reads `buf.len()` bytes of the layer below at an offset.
pub type BaseRead<'a> = &'a dyn Fn(&mut [u8], u64) -> Result<()>;

/// The overlay shared by every connection.
pub struct Overlay {
    file: File,
    block: u64,
    /// One [`State`] per block. Held only to look or change, never across
    /// I/O.
    states: Mutex<Vec<u8>>,
    /// Held across each change of a block, so that a read-modify-write
    /// cannot interleave with another change to the same block and undo
    /// it.
    stripes: Vec<Mutex<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave a half-made change behind in these
    // (single-byte states, or no data at all), so poisoning is moot.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Overlay {
    /// An empty overlay of `block`-byte blocks in `file`, an empty
    /// scratch file.
    pub fn new(file: File, block: u64) -> Overlay {
        Overlay {
            file,
            block,
            states: Mutex::new(Vec::new()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The block size.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Make room for a disk of `size` bytes.
    pub fn grow(&self, size: u64) -> Result<()> {
        let blocks = size.div_ceil(self.block);
        let mut s = lock(&self.states);
        if (s.len() as u64) < blocks {
            // Whole blocks in the file, so a block is always read in full
            // even at an unaligned end of the disk.
            self.file.set_len(blocks * self.block)?;
            s.resize(blocks as usize, State::Base as u8);
        }
        Ok(())
    }

    /// The states of `n` blocks from `first`.
    pub fn states(&self, first: u64, n: u64) -> Vec<State> {
        let s = lock(&self.states);
        (first..first + n)
            .map(|b| State::from_u8(s.get(b as usize).copied().unwrap_or(0)))
            .collect()
    }

    fn state(&self, b: u64) -> State {
        self.states(b, 1)[0]
    }

    fn set(&self, b: u64, st: State) {
        if let Some(v) = lock(&self.states).get_mut(b as usize) {
            *v = st as u8;
        }
    }

    fn stripe(&self, b: u64) -> MutexGuard<'_, ()> {
        lock(&self.stripes[(b % STRIPES as u64) as usize])
    }

    /// Bytes of block `b` that lie on a disk of `size` bytes.
    fn valid(&self, b: u64, size: u64) -> u64 {
        self.block.min(size - b * self.block)
    }

    /// Read all of block `b` into `buf` (one block long).
    fn read_block(&self, base: BaseRead, size: u64, b: u64, buf: &mut [u8]) -> Result<()> {
        match self.state(b) {
            State::Base => {
                let n = self.valid(b, size) as usize;
                base(&mut buf[..n], b * self.block)?;
                buf[n..].fill(0);
            }
            State::Data => self.file.read_exact_at(buf, b * self.block)?,
            State::Zero | State::Trimmed => buf.fill(0),
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`, taking each run of blocks from
    /// wherever it currently lives.
    pub fn read(&self, base: BaseRead, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = offset / self.block;
        let states = self.states(first, (end - 1) / self.block - first + 1);
        let mut i = 0;
        while i < states.len() {
            let source = |s: State| if s.is_zero() { State::Zero } else { s };
            let run = source(states[i]);
            let mut j = i + 1;
            while j < states.len() && source(states[j]) == run {
                j += 1;
            }
            let from = offset.max((first + i as u64) * self.block);
            let to = end.min((first + j as u64) * self.block);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match run {
                State::Base => base(dst, from)?,
                State::Data => self.file.read_exact_at(dst, from)?,
                _ => dst.fill(0),
            }
            i = j;
        }
        Ok(())
    }

    /// Apply `change` to `count` bytes at `offset`, block by block: whole
    /// blocks (up to the end of the disk) go to `whole`, parts of blocks
    /// are read, changed by `part` and written back. Each block's lock is
    /// held from its read to its new state.
    fn each_block(
        &self,
        base: BaseRead,
        size: u64,
        count: u64,
        offset: u64,
        mut whole: impl FnMut(u64, u64, u64) -> Result<()>,
        mut part: impl FnMut(&mut [u8], u64, usize, usize) -> Result<bool>,
    ) -> Result<()> {
        let mut scratch = Vec::new();
        let (mut off, end) = (offset, offset + count);
        while off < end {
            let b = off / self.block;
            let at = off - b * self.block;
            let n = (self.block - at).min(end - off);
            let _g = self.stripe(b);
            if at == 0 && n == self.valid(b, size) {
                whole(b, off, n)?;
            } else {
                scratch.resize(self.block as usize, 0);
                self.read_block(base, size, b, &mut scratch)?;
                if part(&mut scratch, off - offset, at as usize, n as usize)? {
                    self.file.write_all_at(&scratch, b * self.block)?;
                    self.set(b, State::Data);
                }
            }
            off += n;
        }
        Ok(())
    }

    /// Copy every block of `count` bytes at `offset` that is still
    /// unchanged into the overlay, whole, so later reads of it need not
    /// reach the layer below (`cow-on-read`, `cow-on-cache`).
    pub fn keep(&self, base: BaseRead, size: u64, count: u64, offset: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let first = offset / self.block;
        let last = (offset + count - 1) / self.block;
        let mut scratch = vec![0; self.block as usize];
        for b in first..=last {
            if self.state(b) != State::Base {
                continue;
            }
            let _g = self.stripe(b);
            // A writer may have changed it since we looked.
            if self.state(b) == State::Base {
                self.read_block(base, size, b, &mut scratch)?;
                self.file.write_all_at(&scratch, b * self.block)?;
                self.set(b, State::Data);
            }
        }
        Ok(())
    }

    /// Write `buf` at `offset` of a disk of `size` bytes.
    pub fn write(&self, base: BaseRead, size: u64, buf: &[u8], offset: u64) -> Result<()> {
        self.each_block(
            base,
            size,
            buf.len() as u64,
            offset,
            |b, off, n| {
                let src = &buf[(off - offset) as usize..][..n as usize];
                self.file.write_all_at(src, off)?;
                self.set(b, State::Data);
                Ok(())
            },
            |block, from, at, n| {
                block[at..at + n].copy_from_slice(&buf[from as usize..][..n]);
                Ok(true)
            },
        )
    }

    /// Make `count` bytes at `offset` read as zeroes; whole blocks take
    /// state `to` (`Zero` or `Trimmed`) and keep nothing in the file.
    pub fn zero(
        &self,
        base: BaseRead,
        size: u64,
        count: u64,
        offset: u64,
        to: State,
    ) -> Result<()> {
        self.each_block(
            base,
            size,
            count,
            offset,
            |b, _, _| {
                self.set(b, to);
                Ok(())
            },
            |block, _, at, n| {
                let range = &mut block[at..at + n];
                // Already zero (say, a zeroed block): nothing to write.
                if range.iter().all(|&x| x == 0) {
                    return Ok(false);
                }
                range.fill(0);
                Ok(true)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const BS: u64 = 4096;

    fn base_of(data: &[u8]) -> impl Fn(&mut [u8], u64) -> Result<()> + '_ {
        move |buf: &mut [u8], off: u64| {
            let o = off as usize;
            assert!(o + buf.len() <= data.len(), "read past the base");
            buf.copy_from_slice(&data[o..o + buf.len()]);
            Ok(())
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn overlay(size: u64) -> Overlay {
        let file = block_cache::scratch_file(&std::env::temp_dir(), "cow").unwrap();
        let o = Overlay::new(file, BS);
        o.grow(size).unwrap();
        o
    }

    #[test]
    fn kept_blocks_are_read_from_the_overlay_and_written_blocks_stay() {
        let size = 4 * BS + 10;
        let base = pattern(size as usize, 1);
        let rd = base_of(&base);
        let o = overlay(size);
        let mine = pattern(100, 9);
        o.write(&rd, size, &mine, BS).unwrap();
        // From inside block 0 to inside the partial last block.
        o.keep(&rd, size, size - 10, 5).unwrap();
        assert_eq!(
            o.states(0, 5),
            [
                State::Data,
                State::Data,
                State::Data,
                State::Data,
                State::Data
            ]
        );
        let refuse = |_: &mut [u8], _: u64| -> Result<()> { panic!("read the base") };
        let mut got = vec![0u8; size as usize];
        o.read(&refuse, &mut got, 0).unwrap();
        let mut want = base.clone();
        want[BS as usize..BS as usize + 100].copy_from_slice(&mine);
        assert!(got == want);
    }

    #[test]
    fn reads_merge_overlay_and_base() {
        // An unaligned size, so the last block is partial.
        let size = 5 * BS + 100;
        let base = pattern(size as usize, 1);
        let rd = base_of(&base);
        let o = overlay(size);
        let mut want = base.clone();
        for (off, len, seed) in [
            (10, 5, 2),
            (BS, BS, 3),
            (3 * BS - 7, 20, 4),
            (size - 50, 50, 5),
        ] {
            let len = len as usize;
            let d = pattern(len, seed);
            o.write(&rd, size, &d, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&d);
        }
        o.zero(&rd, size, 2 * BS + 100, 2 * BS - 50, State::Zero)
            .unwrap();
        want[(2 * BS - 50) as usize..(4 * BS + 50) as usize].fill(0);
        o.zero(&rd, size, 100, 5 * BS, State::Trimmed).unwrap();
        want[(5 * BS) as usize..].fill(0);
        let mut got = vec![0u8; size as usize];
        o.read(&rd, &mut got, 0).unwrap();
        assert!(got == want);
        for (off, len) in [(1, 1), (BS - 3, 9), (2 * BS + 1, 2 * BS), (size - 1, 1)] {
            let len = len as usize;
            let mut g = vec![0u8; len];
            o.read(&rd, &mut g, off).unwrap();
            assert_eq!(g, want[off as usize..off as usize + len], "{off}+{len}");
        }
        let states = o.states(0, 6);
        assert_eq!(
            states,
            [
                State::Data,
                State::Data,
                State::Zero,
                State::Zero,
                State::Data,
                State::Trimmed
            ]
        );
    }

    #[test]
    fn concurrent_partial_writes_to_one_block_keep_every_byte() {
        let size = 4 * BS;
        let base = vec![0xeeu8; size as usize];
        let o = Arc::new(overlay(size));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (o, base) = (o.clone(), base.clone());
                std::thread::spawn(move || {
                    let rd = base_of(&base);
                    // Each thread owns every 8th byte of the first blocks.
                    for round in 0..200u64 {
                        let off = (round * 8 + t) % (2 * BS);
                        o.write(&rd, size, &[t as u8 + 1], off).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let rd = base_of(&base);
        let mut got = vec![0u8; size as usize];
        o.read(&rd, &mut got, 0).unwrap();
        for round in 0..200u64 {
            for t in 0..8u64 {
                let off = ((round * 8 + t) % (2 * BS)) as usize;
                assert_eq!(got[off], t as u8 + 1, "byte {off} lost");
            }
        }
        assert!(got[(2 * BS) as usize..].iter().all(|&b| b == 0xee));
    }
}
