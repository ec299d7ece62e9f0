//! What nbdhost's archive filters (`xz`, `gzip`, `tar`) have in common:
//! reading the layer below as a file ([`NextReader`]), keeping the
//! decompressed blocks a connection used last ([`BlockCache`]), and
//! serving an image that can only be read ([`read_only`]).

#![forbid(unsafe_code)]

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex, PoisonError};

use nbdhost_plugin_api::{Error, Flags, Next};

/// The layer below seen as a file, positioned like one: what the
/// decompressors and the tar reader, written for `Read + Seek`, consume.
/// Wrap it in a `BufReader` for sequential reading, since every `read`
/// is one request to the layer below.
pub struct NextReader<'a> {
    next: &'a Next,
    pos: u64,
    size: u64,
    limit: Option<u64>,
}

impl<'a> NextReader<'a> {
    /// A reader at offset 0 of the layer below, whose size it asks now.
    pub fn new(next: &'a Next) -> Result<NextReader<'a>, Error> {
        Ok(NextReader {
            next,
            pos: 0,
            size: next.get_size()?,
            limit: None,
        })
    }

    /// Fail any read that would go past the first `limit` bytes, so a
    /// hostile archive cannot make the filter read without end.
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Size of the layer below.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Read exactly `buf.len()` bytes at `offset`, without moving.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} bytes at offset {offset} lie past the end ({} bytes)",
                        buf.len(),
                        self.size
                    ),
                )
            })?;
        if let Some(limit) = self.limit.filter(|&l| end > l) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reading past the limit of {limit} bytes"),
            ));
        }
        self.next
            .pread(buf, offset, Flags::empty())
            .map_err(io::Error::other)
    }
}

impl Read for NextReader<'_> {
    // Reads stop short at the limit, so a buffered reader may ask for
    // more than the limit leaves; only a read wholly past it fails.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = self.size.min(self.limit.unwrap_or(u64::MAX));
        if self.pos >= end && self.pos < self.size && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reading past the limit of {end} bytes"),
            ));
        }
        let n = (buf.len() as u64).min(end.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for NextReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// The plugin error an I/O error stands for: the layer below's own error
/// when it came from there (its errno and its record kept), otherwise
/// `EIO` with `what` and the error as the message.
pub fn plugin_error(what: &str, e: io::Error) -> Error {
    let errno = e.raw_os_error();
    match e.into_inner().map(|inner| inner.downcast::<Error>()) {
        Some(Ok(next)) => *next,
        Some(Err(inner)) => Error::new(libc::EIO, format!("{what}: {inner}")),
        None => Error::new(
            errno.unwrap_or(libc::EIO),
            format!(
                "{what}: {}",
                io::Error::from_raw_os_error(errno.unwrap_or(libc::EIO))
            ),
        ),
    }
}

/// The last `depth` decompressed blocks one connection used, by block
/// number, most recently used first. Blocks are shared (`Arc`) so that a
/// request copies out of one while another request replaces it.
pub struct BlockCache {
    depth: usize,
    blocks: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

impl BlockCache {
    /// An empty cache holding at most `depth` blocks (at least one).
    pub fn new(depth: usize) -> BlockCache {
        BlockCache {
            depth: depth.max(1),
            blocks: Mutex::new(Vec::new()),
        }
    }

    /// Block `number`, decompressed by `load` unless it is cached. `load`
    /// runs without the cache locked, so a slow block does not hold up
    /// requests for cached ones.
    pub fn get<E>(
        &self,
        number: u64,
        load: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Arc<Vec<u8>>, E> {
        {
            let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = blocks.iter().position(|(n, _)| *n == number) {
                let hit = blocks.remove(i);
                let data = Arc::clone(&hit.1);
                blocks.insert(0, hit);
                return Ok(data);
            }
        }
        let data = Arc::new(load()?);
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        blocks.retain(|(n, _)| *n != number);
        blocks.insert(0, (number, Arc::clone(&data)));
        blocks.truncate(self.depth);
        Ok(data)
    }
}

/// Callback answers shared by the filters whose disk is derived from the
/// layer below and cannot be written (`xz`, `gzip`).
pub mod read_only {
    use nbdhost_plugin_api::{Result, Support};

    /// Never writable, whatever the layer below can do.
    pub fn can_write() -> Result<bool> {
        Ok(false)
    }

    /// The layer below's extents describe the compressed file, not the
    /// disk, so none are offered and clients see it all as data.
    pub fn can_extents() -> Result<bool> {
        Ok(false)
    }

    /// Cache requests are answered by the filter itself (it must define
    /// `cache`, or they would reach the layer below at the wrong offsets).
    pub fn can_cache() -> Result<Support> {
        Ok(Support::Emulate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keeps_the_most_recently_used_blocks() {
        let cache = BlockCache::new(2);
        let load = |n: u8| move || Ok::<_, ()>(vec![n]);
        cache.get(1, load(1)).unwrap();
        cache.get(2, load(2)).unwrap();
        cache.get(1, load(9)).unwrap();
        cache.get(3, load(3)).unwrap();
        assert_eq!(*cache.get(1, load(9)).unwrap(), vec![1], "1 was used last");
        assert_eq!(*cache.get(2, load(7)).unwrap(), vec![7], "2 was dropped");
    }

    #[test]
    fn a_failed_load_caches_nothing() {
        let cache = BlockCache::new(2);
        assert!(cache.get(1, || Err::<Vec<u8>, _>("bad")).is_err());
        assert_eq!(*cache.get(1, || Ok::<_, ()>(vec![5])).unwrap(), vec![5]);
    }
}
