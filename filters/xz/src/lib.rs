//! The xz filter: serve the uncompressed disk of an xz file, read-only.
//! The file's block index gives random access: a read decompresses only
//! the blocks it covers, and each connection keeps the last few it
//! decompressed.

#![forbid(unsafe_code)]

mod index;

use std::sync::OnceLock;

use archive::{plugin_error, read_only, BlockCache, NextReader};
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener, Result,
    Support,
};

use index::{Index, IndexError};

/// Configured limits.
#[derive(Clone, Copy)]
pub struct Xz {
    max_block: u64,
    max_depth: usize,
}

impl Default for Xz {
    fn default() -> Self {
        Xz {
            max_block: 512 * 1024 * 1024,
            max_depth: 8,
        }
    }
}

fn xz_error(e: IndexError) -> Error {
    match e {
        IndexError::Io(io) => plugin_error("xz", io),
        other => Error::new(libc::EIO, format!("xz: {other}")),
    }
}

#[callbacks]
impl Filter for Xz {
    const NAME: &'static str = "xz";
    const DESCRIPTION: &'static str = "serve the uncompressed disk of an xz file";
    const CONFIG_HELP: &'static str =
        "xz-max-block=<SIZE>  Refuse files with a larger block (default 512M).
xz-max-depth=<N>     Decompressed blocks kept per connection (default 8).";
    type Handle = Uncompressed;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "xz-max-block" => self.max_block = host::parse_size(value)?,
            "xz-max-depth" => {
                self.max_depth = value.parse().ok().filter(|&d| d >= 1).ok_or_else(|| {
                    Error::new(
                        libc::EINVAL,
                        format!("xz-max-depth={value}: must be a number >= 1"),
                    )
                })?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self, next: &NextOpener, _readonly: bool, export_name: &str) -> Result<Uncompressed> {
        next.open(true, export_name)?;
        Ok(Uncompressed {
            max_block: self.max_block,
            index: OnceLock::new(),
            cache: BlockCache::new(self.max_depth),
        })
    }
}

/// One connection: the file's index, read when it is prepared, and the
/// blocks it decompressed last.
pub struct Uncompressed {
    max_block: u64,
    index: OnceLock<Index>,
    cache: BlockCache,
}

impl Uncompressed {
    /// Decompress (or find cached) each block holding the `count` bytes
    /// at `offset`, in order, handing `each` the block and where in it the
    /// range starts; `each` says how many of the range's bytes it used.
    fn each_block(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        mut each: impl FnMut(&[u8], usize) -> u64,
    ) -> Result<()> {
        let index = self.index()?;
        let reader = NextReader::new(next)?;
        let mut done = 0;
        while done < count {
            let at = offset + done;
            let number = index
                .block_at(at)
                .ok_or_else(|| Error::new(libc::EIO, format!("xz: offset {at} is past the end")))?;
            let data = self
                .cache
                .get(number as u64, || index::decompress(&reader, index, number))
                .map_err(xz_error)?;
            done += each(&data, (at - index.blocks[number].offset) as usize);
        }
        Ok(())
    }

    fn index(&self) -> Result<&Index> {
        self.index
            .get()
            .ok_or_else(|| Error::new(libc::EIO, "xz: index not read"))
    }
}

#[callbacks]
impl FilterHandle for Uncompressed {
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        let index = index::read(&NextReader::new(next)?).map_err(xz_error)?;
        let largest = index.largest_block();
        if largest > self.max_block {
            return Err(Error::new(
                libc::EINVAL,
                format!(
                    "xz: the file's largest block ({largest} bytes uncompressed) is larger \
                     than xz-max-block ({} bytes): compress it with smaller blocks \
                     (xz --block-size) or raise xz-max-block",
                    self.max_block
                ),
            ));
        }
        host::debug(&format!(
            "xz: {} blocks, {} bytes uncompressed",
            index.blocks.len(),
            index.size
        ));
        let _ = self.index.set(index);
        Ok(())
    }
    fn get_size(&self, _next: &Next) -> Result<u64> {
        Ok(self.index()?.size)
    }
    fn can_write(&self, _next: &Next) -> Result<bool> {
        read_only::can_write()
    }
    fn can_extents(&self, _next: &Next) -> Result<bool> {
        read_only::can_extents()
    }
    fn can_cache(&self, _next: &Next) -> Result<Support> {
        read_only::can_cache()
    }
    fn local_file(&self, _next: &Next) -> Result<Option<std::path::PathBuf>> {
        Ok(None)
    }
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let mut done = 0;
        self.each_block(next, buf.len() as u64, offset, |data, start| {
            let n = (data.len() - start).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[start..start + n]);
            done += n;
            n as u64
        })
    }
    // Defined so that a cache request never reaches the layer below,
    // whose offsets are the compressed file's: it decompresses the blocks
    // into the connection's cache instead.
    fn cache(&self, next: &Next, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.each_block(next, count, offset, |data, start| {
            (data.len() - start) as u64
        })
    }
}

nbdhost_filter!(Xz);
