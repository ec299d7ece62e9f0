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
//! large allocation, except with `mlock=true`, which allocates every page
//! at start and locks it in RAM. `allocator=zstd` is the sparse store
//! with each page compressed by zstd.

// The one exception is mlock(2), at the edge with the kernel.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_plugin, Error, ExtentList, Flags, Handle, Plugin, Result, Support,
};

const PAGE: usize = 64 * 1024;
const SHARDS: usize = 64;

type Page = Box<[u8]>;

/// nbdkit's `allocator=` values: how pages are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Allocator {
    /// Holes where unwritten; whole pages are given back.
    #[default]
    Sparse,
    /// Never a hole, and pages are never given back; with `mlock`, all
    /// allocated at start and locked in RAM.
    Malloc { mlock: bool },
    /// As sparse, with each page kept compressed by zstd.
    Zstd,
}

/// The disk shared by every connection.
struct Store {
    size: u64,
    /// `allocator=malloc`: never a hole, and pages are never given back.
    dense: bool,
    /// `allocator=zstd`: a page holds its contents compressed.
    compressed: bool,
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

/// Lock `page` in RAM, so that it is never swapped out.
#[allow(unsafe_code)]
fn lock_in_ram(page: &[u8]) -> std::io::Result<()> {
    // SAFETY: mlock only reads the address range, which `page` owns for
    // the duration of the call; the lock ends when the memory is freed.
    match unsafe { libc::mlock(page.as_ptr().cast(), page.len()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn zstd_error(e: std::io::Error) -> Error {
    Error::new(libc::EIO, format!("zstd: {e}"))
}

impl Store {
    fn new(size: u64, allocator: Allocator) -> Result<Self> {
        let mut store = Store {
            size,
            dense: matches!(allocator, Allocator::Malloc { .. }),
            compressed: allocator == Allocator::Zstd,
            shards: (0..SHARDS).map(|_| RwLock::new(BTreeMap::new())).collect(),
        };
        if allocator == (Allocator::Malloc { mlock: true }) {
            // As nbdkit: the whole disk, allocated now and locked in RAM.
            for page in 0..size.div_ceil(PAGE as u64) {
                let p = vec![0u8; PAGE].into_boxed_slice();
                lock_in_ram(&p).map_err(|e| {
                    Error::new(
                        e.raw_os_error().unwrap_or(libc::ENOMEM),
                        format!("allocator=malloc,mlock=true: mlock: {e} (see ulimit -l)"),
                    )
                })?;
                store.shards[(page % SHARDS as u64) as usize]
                    .get_mut()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(page, p);
            }
        }
        Ok(store)
    }

    /// The contents of a compressed page.
    fn load(&self, page: &Page, out: &mut [u8; PAGE]) -> Result<()> {
        let n = zstd::bulk::decompress_to_buffer(page, &mut out[..]).map_err(zstd_error)?;
        out[n..].fill(0);
        Ok(())
    }

    /// `data` as a compressed page.
    fn keep(&self, data: &[u8; PAGE]) -> Result<Page> {
        Ok(zstd::bulk::compress(&data[..], 0)
            .map_err(zstd_error)?
            .into_boxed_slice())
    }

    /// Change part of a compressed page: decompress it (or start from
    /// zeroes), let `f` change it, and store it compressed again.
    fn rewrite(
        &self,
        shard: &mut BTreeMap<u64, Page>,
        page: u64,
        f: impl FnOnce(&mut [u8; PAGE]),
    ) -> Result<()> {
        let mut buf = Box::new([0u8; PAGE]);
        if let Some(old) = shard.get(&page) {
            self.load(old, &mut buf)?;
        }
        f(&mut buf);
        shard.insert(page, self.keep(&buf)?);
        Ok(())
    }

    fn shard(&self, page: u64) -> &RwLock<BTreeMap<u64, Page>> {
        &self.shards[(page % SHARDS as u64) as usize]
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        let mut plain = self.compressed.then(|| Box::new([0u8; PAGE]));
        for p in pieces(offset, buf.len() as u64) {
            let dst = &mut buf[done..done + p.len];
            let shard = self.shard(p.page).read().unwrap_or_else(|e| e.into_inner());
            match (shard.get(&p.page), plain.as_mut()) {
                (Some(page), Some(plain)) => {
                    self.load(page, plain)?;
                    dst.copy_from_slice(&plain[p.start..p.start + p.len]);
                }
                (Some(page), None) => dst.copy_from_slice(&page[p.start..p.start + p.len]),
                (None, _) => dst.fill(0),
            }
            done += p.len;
        }
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0;
        for p in pieces(offset, buf.len() as u64) {
            let src = &buf[done..done + p.len];
            let mut shard = self
                .shard(p.page)
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if self.compressed {
                self.rewrite(&mut shard, p.page, |page| {
                    page[p.start..p.start + p.len].copy_from_slice(src);
                })?;
            } else {
                let page = shard
                    .entry(p.page)
                    .or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
                page[p.start..p.start + p.len].copy_from_slice(src);
            }
            done += p.len;
        }
        Ok(())
    }

    /// Zero a range: whole pages are freed, partial ones cleared in place.
    fn zero(&self, count: u64, offset: u64) -> Result<()> {
        for p in pieces(offset, count) {
            let mut shard = self
                .shard(p.page)
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if p.len == PAGE && !self.dense {
                shard.remove(&p.page);
            } else if self.compressed {
                if shard.contains_key(&p.page) {
                    self.rewrite(&mut shard, p.page, |page| {
                        page[p.start..p.start + p.len].fill(0);
                    })?;
                }
            } else if let Some(page) = shard.get_mut(&p.page) {
                page[p.start..p.start + p.len].fill(0);
            }
        }
        Ok(())
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
    allocator: Allocator,
    store: Option<Arc<Store>>,
}

/// nbdkit's `allocator=` values, with their options (`mlock=` for
/// malloc, as nbdkit takes it).
fn allocator(value: &str) -> Result<Allocator> {
    let (name, options) = value.split_once(',').unwrap_or((value, ""));
    let mut chosen = match name {
        "sparse" => Allocator::Sparse,
        "malloc" => Allocator::Malloc { mlock: false },
        "zstd" => Allocator::Zstd,
        _ => {
            return Err(Error::new(
                libc::EINVAL,
                format!("unknown allocator '{name}' (sparse, malloc or zstd)"),
            ))
        }
    };
    for o in options.split(',').filter(|o| !o.is_empty()) {
        match (o.split_once('='), &mut chosen) {
            (Some(("mlock", v)), Allocator::Malloc { mlock }) => {
                *mlock = host::parse_bool("mlock", v)?;
            }
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("allocator={name}: unknown option '{o}'"),
                ))
            }
        }
    }
    Ok(chosen)
}

#[callbacks]
impl Plugin for Memory {
    const NAME: &'static str = "memory";
    const DESCRIPTION: &'static str = "sparse RAM disk shared by all connections";
    const CONFIG_HELP: &'static str = "size=<SIZE>  (required) Size of the disk, e.g. 1G.\n\
allocator=sparse|malloc[,mlock=true]|zstd  Holes where unwritten (the default),
                     allocated throughout (and locked in RAM), or compressed.";
    const MAGIC_CONFIG_KEY: Option<&'static str> = Some("size");
    type Handle = MemoryHandle;

    /// Every call is a memory copy under a shard lock held only for it.
    fn nonblocking(&self) -> bool {
        true
    }

    /// The allocators beyond the default, as nbdkit's memory plugin
    /// lists them, so that scripts probing for them find them.
    fn dump_plugin(&self) -> Vec<(String, String)> {
        vec![
            ("mlock".into(), "yes".into()),
            ("zstd".into(), "yes".into()),
        ]
    }

    fn config(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "size" => {
                self.size = Some(host::parse_size(value)?);
                Ok(())
            }
            "allocator" => {
                self.allocator = allocator(value)?;
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
        self.store = Some(Arc::new(Store::new(size, self.allocator)?));
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
        self.store.read(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.store.write(buf, offset)
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.store.zero(count, offset)
    }
    fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.store.zero(count, offset)
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
        for a in [Allocator::Sparse, Allocator::Zstd] {
            let s = Store::new(1 << 30, a).unwrap();
            let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
            s.write(&data, 12345).unwrap();
            let mut back = vec![0u8; data.len()];
            s.read(&mut back, 12345).unwrap();
            assert_eq!(back, data, "{a:?}");
            s.zero(PAGE as u64 * 2, PAGE as u64).unwrap();
            assert!(!s.is_allocated(1) && !s.is_allocated(2));
            s.read(&mut back, 12345).unwrap();
            assert!(back[(PAGE - 12345)..(3 * PAGE - 12345)]
                .iter()
                .all(|&b| b == 0));
            assert_eq!(s.next_allocated(1), Some(3));
        }
    }

    #[test]
    fn a_zstd_page_is_kept_compressed() {
        let s = Store::new(1 << 20, Allocator::Zstd).unwrap();
        s.write(&[7; PAGE], 0).unwrap();
        s.zero(100, 10).unwrap();
        let shard = s.shard(0).read().unwrap();
        assert!(shard[&0].len() < PAGE / 100, "{} bytes", shard[&0].len());
        drop(shard);
        let mut back = vec![1u8; PAGE];
        s.read(&mut back, 0).unwrap();
        assert!(back[10..110].iter().all(|&b| b == 0));
        assert!(back[..10].iter().chain(&back[110..]).all(|&b| b == 7));
    }

    #[test]
    fn a_dense_store_keeps_zeroed_pages() {
        let s = Store::new(1 << 20, Allocator::Malloc { mlock: false }).unwrap();
        s.write(&[1; PAGE], 0).unwrap();
        s.zero(PAGE as u64, 0).unwrap();
        assert!(s.is_allocated(0));
        let mut back = vec![1u8; PAGE];
        s.read(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn allocators_take_nbdkit_names_and_options() {
        assert_eq!(allocator("sparse").unwrap(), Allocator::Sparse);
        assert_eq!(allocator("zstd").unwrap(), Allocator::Zstd);
        assert_eq!(
            allocator("malloc").unwrap(),
            Allocator::Malloc { mlock: false }
        );
        assert_eq!(
            allocator("malloc,mlock=false").unwrap(),
            Allocator::Malloc { mlock: false }
        );
        assert_eq!(
            allocator("malloc,mlock=true").unwrap(),
            Allocator::Malloc { mlock: true }
        );
        assert_eq!(
            allocator("zstd,mlock=true").unwrap_err().raw_errno(),
            libc::EINVAL
        );
        assert_eq!(allocator("slab").unwrap_err().raw_errno(), libc::EINVAL);
    }
}
