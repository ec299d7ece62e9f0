//! The cow filter: make any disk writable, keeping every change in a
//! temporary overlay and never writing to the layer below, which is
//! opened read-only. Changes vanish when the server exits.
//!
//! With `cow-on-read` (and `cow-on-cache`) the blocks a client reads (or
//! asks to cache) are copied into the overlay too, so a slow layer below
//! is read once.

#![forbid(unsafe_code)]

use std::sync::{Arc, OnceLock};

use nbdhost_plugin_api::{
    abi, callbacks, host, nbdhost_filter, BlockSize, Error, ExtentList, Filter, FilterHandle,
    Flags, Next, NextOpener, Result, Support,
};

mod overlay;

use block_cache::OnRead;
use overlay::{Overlay, State};

/// Default block size, as nbdkit's cow filter.
const DEFAULT_BLOCK: u64 = 64 * 1024;
/// Most blocks one block-status request looks at; answering less than
/// asked is allowed, and it bounds the work of a huge request.
const MAX_STATUS_BLOCKS: u64 = 1 << 16;

/// Configuration and the overlay every connection shares: all clients
/// see the same changed disk, so multi-conn is safe.
#[derive(Default)]
pub struct Cow {
    block: Option<u64>,
    on_read: Arc<OnRead>,
    on_cache: bool,
    overlay: OnceLock<Arc<Overlay>>,
}

#[callbacks]
impl Filter for Cow {
    const NAME: &'static str = "cow";
    const DESCRIPTION: &'static str = "keep writes in a temporary copy-on-write overlay";
    const CONFIG_HELP: &'static str =
        "cow-block-size=<SIZE>  Overlay block size, a power of 2 from 4K to 32M (default 64K).
cow-on-read=false|true|/PATH  Copy what is read into the overlay (while PATH exists).
cow-on-cache=false|true  Copy what is cached into the overlay.";
    type Handle = Layer;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "cow-block-size" => {}
            "cow-on-read" => {
                self.on_read = Arc::new(OnRead::parse(key, value)?);
                return Ok(true);
            }
            "cow-on-cache" => {
                self.on_cache = host::parse_bool(key, value)?;
                return Ok(true);
            }
            _ => return Ok(false),
        }
        let n = host::parse_size(value)?;
        if !n.is_power_of_two() || !(4096..=32 << 20).contains(&n) {
            return Err(Error::new(
                libc::EINVAL,
                format!("cow-block-size={value}: must be a power of 2 from 4K to 32M"),
            ));
        }
        self.block = Some(n);
        Ok(true)
    }

    fn get_ready(&self) -> Result<()> {
        let (file, dir) = block_cache::scratch_file_or_error("cow", "overlay")?;
        let block = self.block.unwrap_or(DEFAULT_BLOCK);
        let ov = Overlay::new(file, block);
        host::debug(&format!(
            "overlay in {} with {block}-byte blocks",
            dir.display()
        ));
        let _ = self.overlay.set(Arc::new(ov));
        Ok(())
    }

    fn open(&self, next: &NextOpener, _readonly: bool, export_name: &str) -> Result<Layer> {
        // Nothing is ever written below, so open it read-only whatever the
        // client asked.
        next.open(true, export_name)?;
        let overlay = self
            .overlay
            .get()
            .cloned()
            .ok_or_else(|| Error::new(libc::EIO, "overlay not created"))?;
        Ok(Layer {
            overlay,
            size: OnceLock::new(),
            on_read: self.on_read.clone(),
            on_cache: self.on_cache,
        })
    }
}

/// One connection's view: the shared overlay over its read-only base.
pub struct Layer {
    overlay: Arc<Overlay>,
    size: OnceLock<u64>,
    on_read: Arc<OnRead>,
    on_cache: bool,
}

impl Layer {
    fn size(&self, next: &Next) -> Result<u64> {
        if let Some(s) = self.size.get() {
            return Ok(*s);
        }
        let s = next.get_size()?;
        self.overlay.grow(s)?;
        Ok(*self.size.get_or_init(|| s))
    }

    /// Copy the unchanged blocks of a range into the overlay.
    fn keep(&self, next: &Next, count: u64, offset: u64) -> Result<()> {
        let size = self.size(next)?;
        let base = |buf: &mut [u8], off: u64| next.pread(buf, off, Flags::empty());
        self.overlay.keep(&base, size, count, offset)
    }

    fn zero_to(&self, next: &Next, count: u64, offset: u64, to: State) -> Result<()> {
        let size = self.size(next)?;
        let base = |buf: &mut [u8], off: u64| next.pread(buf, off, Flags::empty());
        self.overlay.zero(&base, size, count, offset, to)
    }
}

#[callbacks]
impl FilterHandle for Layer {
    fn get_size(&self, next: &Next) -> Result<u64> {
        self.size(next)
    }

    fn block_size(&self, next: &Next) -> Result<Option<BlockSize>> {
        let block = self.overlay.block() as u32;
        Ok(Some(block_cache::prefer_blocks(next.block_size()?, block)))
    }

    fn can_write(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_zero(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_fast_zero(&self, _next: &Next) -> Result<bool> {
        // Whole blocks are zeroed by changing their state alone, and the
        // partial ends cost no more than writing zeroes would.
        Ok(true)
    }
    fn can_fua(&self, _next: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn local_file(&self, _next: &Next) -> Result<Option<std::path::PathBuf>> {
        // Writes stay in the overlay: the file below is not what is served.
        Ok(None)
    }
    fn can_extents(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }

    fn can_cache(&self, next: &Next) -> Result<Support> {
        if self.on_cache {
            Ok(Support::Native)
        } else {
            next.can_cache()
        }
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if self.on_cache {
            self.keep(next, count, offset)
        } else {
            next.cache(count, offset, flags)
        }
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        if self.on_read.now() {
            // Then the read below comes from the overlay: one read of the
            // layer below per block, ever.
            self.keep(next, buf.len() as u64, offset)?;
        }
        let base = |b: &mut [u8], off: u64| next.pread(b, off, flags);
        self.overlay.read(&base, buf, offset)
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        // FUA needs nothing: the overlay is thrown away on exit, so there
        // is no later reader that a crash could deprive of the data.
        let size = self.size(next)?;
        let base = |b: &mut [u8], off: u64| next.pread(b, off, Flags::empty());
        self.overlay.write(&base, size, buf, offset)
    }

    fn flush(&self, _next: &Next, _flags: Flags) -> Result<()> {
        // See pwrite: nothing outlives the process, so nothing to persist.
        Ok(())
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.zero_to(next, count, offset, State::Trimmed)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let to = if flags.contains(Flags::MAY_TRIM) {
            State::Trimmed
        } else {
            State::Zero
        };
        self.zero_to(next, count, offset, to)
    }

    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        let size = self.size(next)?;
        let bs = self.overlay.block();
        let first = offset / bs;
        let last = (offset + count)
            .min(size)
            .div_ceil(bs)
            .min(first + MAX_STATUS_BLOCKS);
        let states = self.overlay.states(first, last - first);
        let below_knows = next.can_extents()?;
        let mut i = 0;
        while i < states.len() {
            let run = states[i];
            let mut j = i + 1;
            while j < states.len() && states[j] == run {
                j += 1;
            }
            let from = offset.max((first + i as u64) * bs);
            let to = ((first + j as u64) * bs).min(size);
            match run {
                State::Base if below_knows => {
                    let mut reached = from;
                    for (o, n, t) in next.extents(to - from, from, flags)? {
                        let stop = (o + n).min(to);
                        if stop > reached {
                            list.add(o, stop - o, t)?;
                            reached = stop;
                        }
                    }
                    // The layer below answered only part: so do we.
                    if reached < to {
                        return Ok(());
                    }
                }
                State::Base | State::Data => list.add(from, to - from, 0)?,
                State::Zero => list.add(from, to - from, abi::EXTENT_ZERO)?,
                State::Trimmed => list.add(from, to - from, abi::EXTENT_HOLE | abi::EXTENT_ZERO)?,
            }
            if flags.contains(Flags::REQ_ONE) {
                break;
            }
            i = j;
        }
        Ok(())
    }
}

nbdhost_filter!(Cow);
