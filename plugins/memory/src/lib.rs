//! The memory plugin: a sparse RAM disk.
//!
//! Data lives in fixed-size pages allocated on first write. Pages are spread
//! over independently locked shards by page number, so parallel writers to
//! different pages rarely contend and a read never waits for a writer
//! elsewhere on the disk. Unwritten pages cost nothing, which makes a 1 TiB
//! disk free until it is used, and trim or zero gives whole pages back.
//!
//! `allocator=malloc` (nbdkit's name) presents the disk as allocated
//! throughout, as nbdkit's malloc allocator does: block status reports
//! data everywhere and trim or zero clears pages in place. Pages are still
//! allocated on first write, since the kernel would do the same to one
//! large allocation.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_plugin, Error, ExtentList, Flags, Handle, Plugin, Result, Support,
};

const PAGE: usize = 64 * 1024;
const SHARDS: usize = 64;

type Page = Box<[u8]>;

/// The disk shared by every connection.
struct Store {
    size: u64,
    /// `allocator=malloc`: never a hole, and pages are never given back.
    dense: bool,
    shards: Vec<RwLock<BTreeMap<u64, Page>>>,
}

/// One page-sized step of a request: which page, where in it, how much.
struct Piece {
    page: u64,
    start: usize,
    len: usize,
}

/// Split `[offset, offset+count)` into per-page pieces.
fn pieces(offset: u64, count: u64) -> impl Iterator<Item = Piece> {
    let end = offset + count;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let page = pos / PAGE as u64;
        let start = (pos % PAGE as u64) as usize;
        let len = (PAGE - start).min((end - pos) as usize);
        pos += len as u64;
        Some(Piece { page, start, len })
    })
}

impl Store {
    fn new(size: u64, dense: bool) -> Self {
        Store {
            size,
            dense,
            shards: (0..SHARDS).map(|_| RwLock::new(BTreeMap::new())).collect(),
        }
    }

    fn shard(&self, page: u64) -> &RwLock<BTreeMap<u64, Page>> {
        &self.shards[(page % SHARDS as u64) as usize]
    }

    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0;
        for p in pieces(offset, buf.len() as u64) {
            let dst = &mut buf[done..done + p.len];
            let shard = self.shard(p.page).read().unwrap_or_else(|e| e.into_inner());
            match shard.get(&p.page) {
                Some(page) => dst.copy_from_slice(&page[p.start..p.start + p.len]),
                None => dst.fill(0),
            }
            done += p.len;
        }
    }

    fn write(&self, buf: &[u8], offset: u64) {
        let mut done = 0;
        for p in pieces(offset, buf.len() as u64) {
            let src = &buf[done..done + p.len];
            let mut shard = self
                .shard(p.page)
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let page = shard
                .entry(p.page)
                .or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
            page[p.start..p.start + p.len].copy_from_slice(src);
            done += p.len;
        }
    }

    /// Zero a range: whole pages are freed, partial ones cleared in place.
    fn zero(&self, count: u64, offset: u64) {
        for p in pieces(offset, count) {
            let mut shard = self
                .shard(p.page)
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if p.len == PAGE && !self.dense {
                shard.remove(&p.page);
            } else if let Some(page) = shard.get_mut(&p.page) {
                page[p.start..p.start + p.len].fill(0);
            }
        }
    }

    fn is_allocated(&self, page: u64) -> bool {
        let shard = self.shard(page).read().unwrap_or_else(|e| e.into_inner());
        shard.contains_key(&page)
    }

    /// First allocated page at or after `page`, if any.
    fn next_allocated(&self, page: u64) -> Option<u64> {
        self.shards
            .iter()
            .filter_map(|s| {
                let s = s.read().unwrap_or_else(|e| e.into_inner());
                s.range(page..).next().map(|(k, _)| *k)
            })
            .min()
    }
}

/// Plugin state: the configured size, then the store once configured.
#[derive(Default)]
pub struct Memory {
    size: Option<u64>,
    dense: bool,
    store: Option<Arc<Store>>,
}

/// nbdkit's `allocator=` values: whether the store is dense.
fn allocator(value: &str) -> Result<bool> {
    let (name, options) = value.split_once(',').unwrap_or((value, ""));
    let dense = match name {
        "sparse" => false,
        "malloc" => true,
        "zstd" => return Err(Error::new(
            libc::ENOTSUP,
            "allocator=zstd is not supported here (nbdkit's memory plugin, given by path, has it)",
        )),
        _ => {
            return Err(Error::new(
                libc::EINVAL,
                format!("unknown allocator '{name}' (sparse or malloc)"),
            ))
        }
    };
    for o in options.split(',').filter(|o| !o.is_empty()) {
        match o {
            "mlock=false" => {}
            "mlock=true" => {
                return Err(Error::new(
                    libc::ENOTSUP,
                    "allocator=malloc,mlock=true is not supported here",
                ))
            }
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("unknown allocator option '{o}'"),
                ))
            }
        }
    }
    Ok(dense)
}

#[callbacks]
impl Plugin for Memory {
    const NAME: &'static str = "memory";
    const DESCRIPTION: &'static str = "sparse RAM disk shared by all connections";
    const CONFIG_HELP: &'static str = "size=<SIZE>  (required) Size of the disk, e.g. 1G.\n\
allocator=sparse|malloc  Holes where unwritten (the default), or allocated throughout.";
    const MAGIC_CONFIG_KEY: Option<&'static str> = Some("size");
    type Handle = MemoryHandle;

    /// Every call is a memory copy under a shard lock held only for it.
    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "size" => {
                self.size = Some(host::parse_size(value)?);
                Ok(())
            }
            "allocator" => {
                self.dense = allocator(value)?;
                Ok(())
            }
            _ => Err(Error::new(
                libc::EINVAL,
                format!("unknown parameter '{key}'"),
            )),
        }
    }

    fn config_complete(&mut self) -> Result<()> {
        let size = self
            .size
            .ok_or_else(|| Error::new(libc::EINVAL, "size parameter is required"))?;
        i64::try_from(size).map_err(|_| Error::new(libc::EINVAL, "size is larger than 2^63-1"))?;
        self.store = Some(Arc::new(Store::new(size, self.dense)));
        Ok(())
    }

    fn open(&self, _readonly: bool) -> Result<MemoryHandle> {
        let store = self
            .store
            .clone()
            .ok_or_else(|| Error::new(libc::EINVAL, "not configured"))?;
        Ok(MemoryHandle { store })
    }
}

/// A connection: every connection shares the one store.
pub struct MemoryHandle {
    store: Arc<Store>,
}

#[callbacks]
impl Handle for MemoryHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.store.size)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.store.read(buf, offset);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.store.write(buf, offset);
        Ok(())
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.store.zero(count, offset);
        Ok(())
    }
    fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.store.zero(count, offset);
        Ok(())
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, list: &mut ExtentList) -> Result<()> {
        let end = offset + count;
        if self.store.dense {
            return list.add(offset, count, 0);
        }
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE as u64;
            let (run_end, typ) = if self.store.is_allocated(page) {
                let mut p = page + 1;
                while p * (PAGE as u64) < end && self.store.is_allocated(p) {
                    p += 1;
                }
                (p * PAGE as u64, 0)
            } else {
                let next = self
                    .store
                    .next_allocated(page)
                    .map_or(u64::MAX, |p| p * PAGE as u64);
                (next, EXTENT_HOLE | EXTENT_ZERO)
            };
            let run_end = run_end.min(end);
            list.add(pos, run_end - pos, typ)?;
            if flags.contains(Flags::REQ_ONE) {
                break;
            }
            pos = run_end;
        }
        Ok(())
    }
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

nbdhost_plugin!(Memory);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_range_exactly() {
        let v: Vec<_> = pieces(PAGE as u64 - 10, 20 + PAGE as u64).collect();
        assert_eq!(v.len(), 3);
        assert_eq!((v[0].page, v[0].start, v[0].len), (0, PAGE - 10, 10));
        assert_eq!((v[1].page, v[1].start, v[1].len), (1, 0, PAGE));
        assert_eq!((v[2].page, v[2].start, v[2].len), (2, 0, 10));
    }

    #[test]
    fn write_read_zero_roundtrip() {
        let s = Store::new(1 << 30, false);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        s.write(&data, 12345);
        let mut back = vec![0u8; data.len()];
        s.read(&mut back, 12345);
        assert_eq!(back, data);
        s.zero(PAGE as u64 * 2, PAGE as u64);
        assert!(!s.is_allocated(1) && !s.is_allocated(2));
        s.read(&mut back, 12345);
        assert!(back[(PAGE - 12345)..(3 * PAGE - 12345)]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(s.next_allocated(1), Some(3));
    }

    #[test]
    fn a_dense_store_keeps_zeroed_pages() {
        let s = Store::new(1 << 20, true);
        s.write(&[1; PAGE], 0);
        s.zero(PAGE as u64, 0);
        assert!(s.is_allocated(0));
        let mut back = vec![1u8; PAGE];
        s.read(&mut back, 0);
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn allocators_take_nbdkit_names_and_refuse_what_is_missing() {
        assert!(!allocator("sparse").unwrap());
        assert!(allocator("malloc").unwrap());
        assert!(allocator("malloc,mlock=false").unwrap());
        assert_eq!(
            allocator("malloc,mlock=true").unwrap_err().raw_errno(),
            libc::ENOTSUP
        );
        assert_eq!(allocator("zstd").unwrap_err().raw_errno(), libc::ENOTSUP);
        assert_eq!(allocator("slab").unwrap_err().raw_errno(), libc::EINVAL);
    }
}
