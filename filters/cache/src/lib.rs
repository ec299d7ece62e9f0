//! The cache filter: keep blocks of the disk below in a temporary file,
//! so that a slow or costly layer below (a remote disk, say) is asked
//! once. Writes stay in the cache until a flush (`cache=writeback`), go
//! through at once (`cache=writethrough`) or stay until the cache must
//! make room (`cache=unsafe`, which ignores flushes). `cache-max-size`
//! bounds the file, evicting the least recently used blocks.

#![forbid(unsafe_code)]

use std::sync::{Arc, OnceLock};

use block_cache::OnRead;
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, BlockSize, Error, ExtentList, Filter, FilterHandle, Flags,
    Next, NextOpener, Result, Support,
};

mod store;

use store::{Below, Limit, State, Store, Write};

/// Default smallest block, as nbdkit's cache filter.
const DEFAULT_MIN_BLOCK: u64 = 64 * 1024;
/// Smallest `cache-max-size`, as nbdkit: less would evict constantly.
const MIN_MAX_SIZE: u64 = 1024 * 1024;

/// `cache=`: when writes reach the layer below.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Mode {
    /// At the next flush (or FUA write).
    #[default]
    Writeback,
    /// At once.
    Writethrough,
    /// Only when evicted; flushes do nothing.
    Unsafe,
}

/// Configuration and the cache every connection shares.
pub struct Cache {
    mode: Mode,
    min_block: u64,
    max_size: Option<u64>,
    high: u64,
    low: u64,
    on_read: Arc<OnRead>,
    store: OnceLock<Arc<Store>>,
}

impl Default for Cache {
    fn default() -> Cache {
        Cache {
            mode: Mode::default(),
            min_block: DEFAULT_MIN_BLOCK,
            max_size: None,
            high: 95,
            low: 80,
            on_read: Arc::default(),
            store: OnceLock::new(),
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::new(libc::EINVAL, msg)
}

fn percent(key: &str, value: &str) -> Result<u64> {
    match value.parse::<u32>() {
        Ok(0) => Err(invalid(format!("{key} must be greater than zero"))),
        Ok(n) => Ok(u64::from(n)),
        Err(_) => Err(invalid(format!("{key}={value}: not a whole number"))),
    }
}

#[callbacks]
impl Filter for Cache {
    const NAME: &'static str = "cache";
    const DESCRIPTION: &'static str = "cache the disk below in a temporary file";
    const CONFIG_HELP: &'static str =
        "cache=MODE                Set cache MODE, one of writeback (default),
                          writethrough, or unsafe.
cache-on-read=BOOL|/PATH  Set to true to cache on reads (default false).
cache-min-block-size=SIZE Smallest cache block, a power of 2 >= 4096 (default 64K).
cache-max-size=SIZE       Set maximum space used by cache.
cache-high-threshold=PCT  Percentage of max size where reclaim begins.
cache-low-threshold=PCT   Percentage of max size where reclaim ends.";
    type Handle = Layer;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "cache" => {
                self.mode = match value {
                    "writeback" => Mode::Writeback,
                    "writethrough" => Mode::Writethrough,
                    "unsafe" => Mode::Unsafe,
                    _ => {
                        return Err(invalid(format!(
                            "cache={value}: expected writeback, writethrough or unsafe"
                        )))
                    }
                }
            }
            "cache-min-block-size" => {
                let n = host::parse_size(value)?;
                if n < 4096 || !n.is_power_of_two() || n > u64::from(u32::MAX) {
                    return Err(invalid(format!(
                        "cache-min-block-size={value}: must be a power of 2, at least 4096"
                    )));
                }
                self.min_block = n;
            }
            "cache-max-size" => {
                let n = host::parse_size(value)?;
                if n < MIN_MAX_SIZE {
                    return Err(invalid(format!(
                        "cache-max-size={value}: too small (at least 1M)"
                    )));
                }
                self.max_size = Some(n);
            }
            "cache-high-threshold" => self.high = percent(key, value)?,
            "cache-low-threshold" => self.low = percent(key, value)?,
            "cache-on-read" => self.on_read = Arc::new(OnRead::parse(key, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.max_size.is_some() && self.low >= self.high {
            return Err(invalid(
                "cache-low-threshold must be less than cache-high-threshold".into(),
            ));
        }
        Ok(())
    }

    fn get_ready(&self) -> Result<()> {
        let (file, dir) = block_cache::scratch_file_or_error("cache", "cache")?;
        // Evicting punches holes, which frees space only in whole blocks of
        // the file system.
        let fs_block: u64 = nix::sys::statvfs::fstatvfs(&file)
            .map(|s| s.block_size())
            .unwrap_or(0);
        let block = self.min_block.max(fs_block);
        let limit = self.max_size.map(|max| Limit {
            high: max / 100 * self.high,
            low: max / 100 * self.low,
        });
        host::debug(&format!(
            "cache in {} with {block}-byte blocks",
            dir.display()
        ));
        let _ = self.store.set(Arc::new(Store::new(file, block, limit)));
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Layer> {
        next.open(readonly, export_name)?;
        let store = self
            .store
            .get()
            .cloned()
            .ok_or_else(|| Error::new(libc::EIO, "cache not created"))?;
        Ok(Layer {
            store,
            mode: self.mode,
            on_read: self.on_read.clone(),
        })
    }
}

/// One connection's view of the shared cache.
pub struct Layer {
    store: Arc<Store>,
    mode: Mode,
    on_read: Arc<OnRead>,
}

/// The layer below, for the cache: plain reads and writes.
struct Lower<'a>(&'a Next);

impl Below for Lower<'_> {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.pread(buf, offset, Flags::empty())
    }
    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let flags = if fua { Flags::FUA } else { Flags::empty() };
        self.0.pwrite(buf, offset, flags)
    }
}

impl Layer {
    /// How a write with `flags` reaches the layer below, and whether the
    /// whole cache must be flushed after it (FUA that neither the mode
    /// nor the layer below can honour for one write).
    fn write_mode(&self, next: &Next, flags: Flags) -> Result<(Write, bool)> {
        let mut fua = flags.contains(Flags::FUA);
        let mut then_flush = false;
        if fua && (self.mode == Mode::Unsafe || next.can_fua()? == Support::Emulate) {
            fua = false;
            then_flush = true;
        }
        let how = match self.mode {
            Mode::Writethrough => Write::Through { fua },
            Mode::Writeback if fua => Write::Through { fua },
            _ => Write::Back,
        };
        Ok((how, then_flush))
    }
}

#[callbacks]
impl FilterHandle for Layer {
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        self.get_size(next).map(drop)
    }

    fn get_size(&self, next: &Next) -> Result<u64> {
        let size = next.get_size()?;
        self.store.lock().set_size(size)?;
        Ok(size)
    }

    fn block_size(&self, next: &Next) -> Result<Option<BlockSize>> {
        let block = self.store.block() as u32;
        Ok(Some(block_cache::prefer_blocks(next.block_size()?, block)))
    }

    fn can_cache(&self, _next: &Next) -> Result<Support> {
        Ok(Support::Native)
    }

    fn can_fast_zero(&self, _next: &Next) -> Result<bool> {
        // Advertised so that clients ask, and are told at once that a
        // zero here is no faster than a write (see `zero`).
        Ok(true)
    }

    fn can_flush(&self, next: &Next) -> Result<bool> {
        if self.mode == Mode::Unsafe {
            return Ok(true);
        }
        next.can_flush()
    }

    fn can_fua(&self, next: &Next) -> Result<Support> {
        if self.mode == Mode::Unsafe {
            return Ok(Support::Native);
        }
        next.can_fua()
    }

    fn can_multi_conn(&self, next: &Next) -> Result<bool> {
        // Every connection shares one cache, and a flush from any writes
        // back every connection's dirty blocks; only writes that went
        // through depend on the layer below's consistency.
        if self.mode == Mode::Writethrough {
            return next.can_multi_conn();
        }
        Ok(true)
    }

    fn local_file(&self, _next: &Next) -> Result<Option<std::path::PathBuf>> {
        // The file below may be older than the cache.
        Ok(None)
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let keep = self.on_read.now();
        self.store.lock().read(&Lower(next), buf, offset, keep)
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let (how, then_flush) = self.write_mode(next, flags)?;
        self.store.lock().write(&Lower(next), buf, offset, how)?;
        if then_flush {
            self.flush(next, Flags::empty())?;
        }
        Ok(())
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // Zeroes are written as data through the cache, never as a zero
        // request below, so a zero is never faster than a write.
        if flags.contains(Flags::FAST_ZERO) {
            return Err(Error::new(libc::ENOTSUP, "cache: zeroing is not fast"));
        }
        let (how, then_flush) = self.write_mode(next, flags)?;
        self.store.lock().zero(&Lower(next), count, offset, how)?;
        if then_flush {
            self.flush(next, Flags::empty())?;
        }
        Ok(())
    }

    fn flush(&self, next: &Next, _flags: Flags) -> Result<()> {
        if self.mode == Mode::Unsafe {
            return Ok(());
        }
        // Every dirty block, whichever connection wrote it, then a flush
        // below even if a block failed, reporting the first error.
        let written = self.store.lock().write_back_all(&Lower(next));
        let flushed = next.flush(Flags::empty());
        written.and(flushed)
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.store.lock().prefetch(&Lower(next), count, offset)
    }

    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        // Below does not yet have what is dirty here: those blocks are
        // data, whatever it says, so that a client copying the disk by its
        // map copies them.
        let bs = self.store.block();
        for (o, n, t) in next.extents(count, offset, flags)? {
            if t == 0 {
                list.add(o, n, t)?;
                continue;
            }
            let (first, last) = (o / bs, (o + n).div_ceil(bs));
            let states = self.store.lock().states(first, last - first);
            let mut from = o;
            while from < o + n {
                let dirty = states[(from / bs - first) as usize] == State::Dirty;
                let mut to = ((from / bs + 1) * bs).min(o + n);
                while to < o + n && (states[(to / bs - first) as usize] == State::Dirty) == dirty {
                    to = ((to / bs + 1) * bs).min(o + n);
                }
                list.add(from, to - from, if dirty { 0 } else { t })?;
                from = to;
            }
        }
        Ok(())
    }
}

nbdhost_filter!(Cache);
