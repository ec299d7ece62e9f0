//! The cache itself: whole blocks of the disk below kept in an unlinked
//! scratch file, each either absent, clean (the same as below) or dirty
//! (newer than below), with least-recently-used eviction when the cache
//! has a size limit.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use nbdhost_plugin_api::{Error, Result};

/// The layer below, as the cache uses it.
pub trait Below {
    /// Read `buf.len()` bytes at `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write `buf` at `offset`, with FUA if `fua`.
    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;
}

/// Where a block's current contents are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Only below.
    Absent = 0,
    /// In the cache, and the same below.
    Clean = 1,
    /// In the cache only: below is older.
    Dirty = 2,
}

/// How a write reaches the layer below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Not now: the block becomes dirty until the next flush.
    Back,
    /// At once (with FUA if set): the block stays clean.
    Through { fua: bool },
}

/// `cache-max-size` and its thresholds, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Reclaiming starts when the cache would grow past this.
    pub high: u64,
    /// ... and goes on until the cache is below this.
    pub low: u64,
}

/// Blocks in least-recently-used order: each cached block's last use,
/// and the blocks by last use.
#[derive(Default)]
struct Lru {
    tick: u64,
    by_use: BTreeMap<u64, u64>,
    last_use: HashMap<u64, u64>,
}

impl Lru {
    fn touch(&mut self, b: u64) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(b, self.tick) {
            self.by_use.remove(&old);
        }
        self.by_use.insert(self.tick, b);
    }

    fn forget(&mut self, b: u64) {
        if let Some(old) = self.last_use.remove(&b) {
            self.by_use.remove(&old);
        }
    }

    fn oldest(&self) -> Option<u64> {
        self.by_use.values().next().copied()
    }
}

struct Blocks {
    size: u64,
    states: Vec<State>,
    cached: u64,
    /// Kept only with a [`Limit`]: without one nothing is evicted.
    lru: Option<Lru>,
}

/// The cache shared by every connection. One lock is held across each
/// block's whole change, I/O below included, so a read-modify-write of a
/// block cannot interleave with another change to it, and a flush sees
/// every block in one state.
pub struct Store {
    file: File,
    block: u64,
    limit: Option<Limit>,
    blocks: Mutex<Blocks>,
}

/// The cache locked for one operation.
pub struct Locked<'a> {
    store: &'a Store,
    blocks: MutexGuard<'a, Blocks>,
}

impl Store {
    /// An empty cache of `block`-byte blocks in `file`, an empty scratch
    /// file.
    pub fn new(file: File, block: u64, limit: Option<Limit>) -> Store {
        Store {
            file,
            block,
            limit,
            blocks: Mutex::new(Blocks {
                size: 0,
                states: Vec::new(),
                cached: 0,
                lru: limit.map(|_| Lru::default()),
            }),
        }
    }

    /// The block size.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Lock the cache for one operation.
    pub fn lock(&self) -> Locked<'_> {
        Locked {
            store: self,
            // A panic cannot leave a half-made change in the states (each
            // is set after its I/O), so poisoning is moot.
            blocks: self.blocks.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl Locked<'_> {
    /// Size the cache for a disk of `size` bytes.
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        let bs = self.store.block;
        let n = size.div_ceil(bs);
        if self.blocks.size != size {
            // Whole blocks in the file, so every block is read and written
            // in full even at an unaligned end of the disk.
            self.store.file.set_len(n * bs)?;
            self.blocks.states.resize(n as usize, State::Absent);
            self.blocks.size = size;
        }
        Ok(())
    }

    /// The states of `n` blocks from `first`.
    pub fn states(&self, first: u64, n: u64) -> Vec<State> {
        (first..first + n).map(|b| self.state(b)).collect()
    }

    fn state(&self, b: u64) -> State {
        self.blocks
            .states
            .get(b as usize)
            .copied()
            .unwrap_or(State::Absent)
    }

    fn set(&mut self, b: u64, st: State) {
        let Some(s) = self.blocks.states.get_mut(b as usize) else {
            return;
        };
        let was = std::mem::replace(s, st);
        match (was == State::Absent, st == State::Absent) {
            (true, false) => self.blocks.cached += 1,
            (false, true) => self.blocks.cached -= 1,
            _ => {}
        }
        if let Some(lru) = self.blocks.lru.as_mut() {
            if st == State::Absent {
                lru.forget(b);
            } else {
                lru.touch(b);
            }
        }
    }

    fn touch(&mut self, b: u64) {
        if let Some(lru) = self.blocks.lru.as_mut() {
            lru.touch(b);
        }
    }

    /// Bytes of block `b` that lie on the disk.
    fn valid(&self, b: u64) -> usize {
        let bs = self.store.block;
        bs.min(self.blocks.size.saturating_sub(b * bs)) as usize
    }

    /// Bytes the cache holds now.
    pub fn cached_bytes(&self) -> u64 {
        self.blocks.cached * self.store.block
    }

    /// Make room for one more block: once that block would take the cache
    /// past the high threshold, evict the least recently used blocks until
    /// it is below the low one. A dirty block is written below before it
    /// goes, so eviction never loses a write.
    fn make_room(&mut self, below: &dyn Below) -> Result<()> {
        let Some(limit) = self.store.limit else {
            return Ok(());
        };
        let bs = self.store.block;
        if self.cached_bytes() + bs <= limit.high {
            return Ok(());
        }
        while self.cached_bytes() + bs > limit.low {
            let Some(victim) = self.blocks.lru.as_ref().and_then(Lru::oldest) else {
                break;
            };
            if self.state(victim) == State::Dirty {
                self.write_back(below, victim, &mut vec![0; bs as usize])?;
            }
            nix::fcntl::fallocate(
                &self.store.file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                (victim * bs) as libc::off_t,
                bs as libc::off_t,
            )
            .map_err(|e| {
                Error::new(
                    e as i32,
                    format!("cache: cannot evict block {victim} (punch hole): {e}"),
                )
            })?;
            self.set(victim, State::Absent);
        }
        Ok(())
    }

    /// Copy dirty block `b` below, through `scratch` (one block), and
    /// mark it clean.
    fn write_back(&mut self, below: &dyn Below, b: u64, scratch: &mut [u8]) -> Result<()> {
        let bs = self.store.block;
        self.store.file.read_exact_at(scratch, b * bs)?;
        below.write(&scratch[..self.valid(b)], b * bs, false)?;
        self.set(b, State::Clean);
        Ok(())
    }

    /// Store a whole block (of `block` bytes, zeroes past the end of the
    /// disk) in the file as block `b` with state `st`.
    fn store(&mut self, below: &dyn Below, b: u64, data: &[u8], st: State) -> Result<()> {
        if self.state(b) == State::Absent {
            self.make_room(below)?;
        }
        self.store.file.write_all_at(data, b * self.store.block)?;
        self.set(b, st);
        Ok(())
    }

    /// Read blocks `first..last` from below into `buf` (whole blocks,
    /// zeroes past the end of the disk), keeping them if `keep`.
    fn fetch(
        &mut self,
        below: &dyn Below,
        first: u64,
        last: u64,
        buf: &mut [u8],
        keep: bool,
    ) -> Result<()> {
        let bs = self.store.block as usize;
        let on_disk = (self.blocks.size.saturating_sub(first * bs as u64) as usize).min(buf.len());
        below.read(&mut buf[..on_disk], first * bs as u64)?;
        buf[on_disk..].fill(0);
        if keep {
            for (i, b) in (first..last).enumerate() {
                self.store(below, b, &buf[i * bs..][..bs], State::Clean)?;
            }
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`: runs of cached blocks from the
    /// cache, runs of absent ones from below in one request each (whole
    /// blocks), kept in the cache if `keep`.
    pub fn read(
        &mut self,
        below: &dyn Below,
        buf: &mut [u8],
        offset: u64,
        keep: bool,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.store.block;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / bs, (end - 1) / bs + 1);
        let mut b = first;
        while b < last {
            let cached = self.state(b) != State::Absent;
            let mut e = b + 1;
            while e < last && (self.state(e) != State::Absent) == cached {
                e += 1;
            }
            let from = offset.max(b * bs);
            let to = end.min(e * bs);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if cached {
                self.store.file.read_exact_at(dst, from)?;
                (b..e).for_each(|x| self.touch(x));
            } else {
                let mut whole = vec![0; ((e - b) * bs) as usize];
                self.fetch(below, b, e, &mut whole, keep)?;
                dst.copy_from_slice(&whole[(from - b * bs) as usize..(to - b * bs) as usize]);
            }
            b = e;
        }
        Ok(())
    }

    /// Bring every absent block of `count` bytes at `offset` into the
    /// cache (`NBD_CMD_CACHE`), each run in one request below.
    pub fn prefetch(&mut self, below: &dyn Below, count: u64, offset: u64) -> Result<()> {
        let bs = self.store.block;
        let end = (offset + count).min(self.blocks.size);
        if end <= offset {
            return Ok(());
        }
        let (first, last) = (offset / bs, end.div_ceil(bs));
        let mut b = first;
        while b < last {
            if self.state(b) != State::Absent {
                self.touch(b);
                b += 1;
                continue;
            }
            let mut e = b + 1;
            while e < last && self.state(e) == State::Absent {
                e += 1;
            }
            let mut whole = vec![0; ((e - b) * bs) as usize];
            self.fetch(below, b, e, &mut whole, true)?;
            b = e;
        }
        Ok(())
    }

    /// Change `count` bytes at `offset` block by block: `fill(block, at,
    /// from, n)` puts the new `n` bytes at `at` of a block whose old
    /// contents it is given (read first unless the whole block changes),
    /// taking them from `from` bytes into the request.
    fn change(
        &mut self,
        below: &dyn Below,
        count: u64,
        offset: u64,
        how: Write,
        mut fill: impl FnMut(&mut [u8], usize, usize, usize),
    ) -> Result<()> {
        let bs = self.store.block;
        let mut block = vec![0; bs as usize];
        let (mut off, end) = (offset, offset + count);
        while off < end {
            let b = off / bs;
            let at = (off - b * bs) as usize;
            let n = (bs - at as u64).min(end - off) as usize;
            if n as u64 != bs {
                self.read(below, &mut block, b * bs, false)?;
            }
            fill(&mut block, at, (off - offset) as usize, n);
            self.write_block(below, b, &block, how)?;
            off += n as u64;
        }
        Ok(())
    }

    fn write_block(&mut self, below: &dyn Below, b: u64, block: &[u8], how: Write) -> Result<()> {
        match how {
            Write::Back => self.store(below, b, block, State::Dirty),
            Write::Through { fua } => {
                // Below first: if it fails, the cache still holds what
                // below has.
                below.write(&block[..self.valid(b)], b * self.store.block, fua)?;
                self.store(below, b, block, State::Clean)
            }
        }
    }

    /// Write `buf` at `offset`.
    pub fn write(&mut self, below: &dyn Below, buf: &[u8], offset: u64, how: Write) -> Result<()> {
        self.change(
            below,
            buf.len() as u64,
            offset,
            how,
            |block, at, from, n| {
                block[at..at + n].copy_from_slice(&buf[from..from + n]);
            },
        )
    }

    /// Write zeroes over `count` bytes at `offset`.
    pub fn zero(&mut self, below: &dyn Below, count: u64, offset: u64, how: Write) -> Result<()> {
        self.change(below, count, offset, how, |block, at, _, n| {
            block[at..at + n].fill(0);
        })
    }

    /// Write every dirty block below, in order; a failure does not stop
    /// the others, and the first is returned.
    pub fn write_back_all(&mut self, below: &dyn Below) -> Result<()> {
        let mut scratch = vec![0; self.store.block as usize];
        let mut first_error = None;
        for b in 0..self.blocks.states.len() as u64 {
            if self.state(b) == State::Dirty {
                if let Err(e) = self.write_back(below, b, &mut scratch) {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    const BS: u64 = 4096;

    /// A disk in memory that records the requests it gets.
    struct Disk {
        data: RefCell<Vec<u8>>,
        log: RefCell<Vec<String>>,
    }

    impl Disk {
        fn new(len: usize) -> Disk {
            Disk {
                data: RefCell::new((0..len).map(|i| (i % 251) as u8 | 1).collect()),
                log: RefCell::new(Vec::new()),
            }
        }
        fn take_log(&self) -> Vec<String> {
            std::mem::take(&mut self.log.borrow_mut())
        }
    }

    impl Below for Disk {
        fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.log
                .borrow_mut()
                .push(format!("r {offset} {}", buf.len()));
            let o = offset as usize;
            buf.copy_from_slice(&self.data.borrow()[o..o + buf.len()]);
            Ok(())
        }
        fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
            let f = if fua { " fua" } else { "" };
            self.log
                .borrow_mut()
                .push(format!("w {offset} {}{f}", buf.len()));
            let o = offset as usize;
            self.data.borrow_mut()[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    fn store(size: u64, limit: Option<Limit>) -> Store {
        let file = block_cache::scratch_file(&std::env::temp_dir(), "cache").unwrap();
        let s = Store::new(file, BS, limit);
        s.lock().set_size(size).unwrap();
        s
    }

    #[test]
    fn reads_fetch_whole_blocks_and_keep_them_only_when_asked() {
        let size = 3 * BS + 100;
        let disk = Disk::new(size as usize);
        let s = store(size, None);
        let mut buf = vec![0; 10];
        s.lock().read(&disk, &mut buf, BS + 5, false).unwrap();
        assert_eq!(disk.take_log(), ["r 4096 4096"]);
        s.lock().read(&disk, &mut buf, BS + 5, true).unwrap();
        s.lock().read(&disk, &mut buf, BS + 5, true).unwrap();
        assert_eq!(disk.take_log(), ["r 4096 4096"]);
        assert_eq!(buf, disk.data.borrow()[BS as usize + 5..][..10]);
        // The partial last block is read as far as the disk goes.
        let mut all = vec![0; size as usize];
        s.lock().read(&disk, &mut all, 0, true).unwrap();
        assert_eq!(disk.take_log(), ["r 0 4096", "r 8192 4196"]);
        assert!(all == *disk.data.borrow());
    }

    #[test]
    fn writeback_stays_in_the_cache_until_written_back() {
        let size = 4 * BS;
        let disk = Disk::new(size as usize);
        let s = store(size, None);
        let mine = vec![7u8; 100];
        s.lock().write(&disk, &mine, BS - 50, Write::Back).unwrap();
        // Read-modify-write of the two blocks it touches, nothing written.
        assert_eq!(disk.take_log(), ["r 0 4096", "r 4096 4096"]);
        let mut back = vec![0; 100];
        s.lock().read(&disk, &mut back, BS - 50, false).unwrap();
        assert_eq!(back, mine);
        assert_eq!(
            s.lock().states(0, 3),
            [State::Dirty, State::Dirty, State::Absent]
        );
        s.lock().write_back_all(&disk).unwrap();
        assert_eq!(disk.take_log(), ["w 0 4096", "w 4096 4096"]);
        assert_eq!(disk.data.borrow()[BS as usize - 50..][..100], mine[..]);
        assert_eq!(s.lock().states(0, 2), [State::Clean, State::Clean]);
    }

    #[test]
    fn writethrough_reaches_below_at_once_with_fua_passed_on() {
        let size = 2 * BS;
        let disk = Disk::new(size as usize);
        let s = store(size, None);
        s.lock()
            .zero(&disk, BS, BS, Write::Through { fua: true })
            .unwrap();
        assert_eq!(disk.take_log(), ["w 4096 4096 fua"]);
        assert!(disk.data.borrow()[BS as usize..].iter().all(|&x| x == 0));
        s.lock().write_back_all(&disk).unwrap();
        assert!(disk.take_log().is_empty());
    }

    #[test]
    fn a_size_limit_evicts_the_least_recently_used_and_writes_dirty_blocks_first() {
        let size = 16 * BS;
        let disk = Disk::new(size as usize);
        let limit = Limit {
            high: 4 * BS,
            low: 2 * BS,
        };
        let s = store(size, Some(limit));
        let mut l = s.lock();
        l.write(&disk, &vec![9u8; BS as usize], 0, Write::Back)
            .unwrap();
        l.prefetch(&disk, 3 * BS, BS).unwrap();
        assert_eq!(l.cached_bytes(), 4 * BS);
        // Use block 0 again, so block 1 is now the oldest.
        let mut one = [0u8];
        l.read(&disk, &mut one, 0, false).unwrap();
        disk.take_log();
        l.prefetch(&disk, BS, 8 * BS).unwrap();
        // Blocks 1, 2 and 3 went (clean: nothing written); 0 stayed.
        assert_eq!(disk.take_log(), ["r 32768 4096"]);
        assert_eq!(l.cached_bytes(), 2 * BS);
        assert_eq!(
            l.states(0, 4),
            [State::Dirty, State::Absent, State::Absent, State::Absent]
        );
        l.prefetch(&disk, 3 * BS, 10 * BS).unwrap();
        // Now the dirty block 0 was the oldest: written below, then gone.
        assert!(disk.take_log().contains(&"w 0 4096".to_string()));
        assert_eq!(
            disk.data.borrow()[..BS as usize],
            vec![9u8; BS as usize][..]
        );
        assert!(l.cached_bytes() <= 4 * BS);
    }
}
