//! The blocksize filter: let clients send requests of any alignment and
//! size, and hand the layer below only requests aligned to `minblock`,
//! no larger than `maxdata` (with data) or `maxlen` (without).

use std::ffi::CStr;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nbdhost_plugin_api::{
    host, nbdhost_filter, BlockSize, Error, ExtentList, Filter, FilterHandle, Flags, Next,
    NextOpener, Result, Support,
};

/// Largest `minblock`: the NBD protocol's largest minimum block size.
const MIN_LIMIT: u32 = 64 * 1024;
/// Default `maxdata`.
const DEFAULT_MAXDATA: u32 = 64 * 1024 * 1024;

/// Configured limits (`None`: derived per connection from the layer
/// below) and the lock that keeps read-modify-write cycles whole.
#[derive(Default)]
pub struct Blocksize {
    minblock: Option<u32>,
    maxdata: Option<u32>,
    maxlen: Option<u32>,
    /// Held exclusively across each read-modify-write and shared by every
    /// aligned write, trim and zero, on all connections: otherwise a write
    /// landing between the read and the write-back of an RMW cycle on the
    /// same block would be undone by it.
    rmw: Arc<RwLock<()>>,
}

fn parse_limit(key: &str, value: &str) -> Result<u32> {
    let n = host::parse_size(value)?;
    if n == 0 {
        return Err(Error::new(
            libc::EINVAL,
            format!("{key}={value}: must be greater than 0"),
        ));
    }
    u32::try_from(n).map_err(|_| Error::new(libc::EINVAL, format!("{key}={value}: too large")))
}

impl Filter for Blocksize {
    const NAME: &'static CStr = c"blocksize";
    const DESCRIPTION: &'static CStr = c"adapt requests to the block size limits below";
    const CONFIG_HELP: &'static CStr =
        c"minblock=<SIZE>  Alignment of requests passed down, a power of 2 <= 64K.
maxdata=<SIZE>   Largest read or write passed down (default 64M).
maxlen=<SIZE>    Largest trim, zero or block status passed down (default 4G-minblock).";
    type Handle = Adapter;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "minblock" => self.minblock = Some(parse_limit(key, value)?),
            "maxdata" => self.maxdata = Some(parse_limit(key, value)?),
            "maxlen" => self.maxlen = Some(parse_limit(key, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if let Some(m) = self.minblock {
            if !m.is_power_of_two() || m > MIN_LIMIT {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("minblock={m}: must be a power of 2 no larger than {MIN_LIMIT}"),
                ));
            }
            for (key, v) in [("maxdata", self.maxdata), ("maxlen", self.maxlen)] {
                if v.is_some_and(|v| v % m != 0) {
                    return Err(Error::new(
                        libc::EINVAL,
                        format!("{key} must be a multiple of minblock ({m})"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Adapter> {
        next.open(readonly, export_name)?;
        Ok(Adapter {
            minblock: self.minblock,
            maxdata: self.maxdata,
            maxlen: self.maxlen,
            limits: OnceLock::new(),
            rmw: self.rmw.clone(),
        })
    }
}

/// The limits one connection applies, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    minblock: u64,
    maxdata: u64,
    maxlen: u64,
}

impl Limits {
    /// Combine the configuration with the constraints of the layer below,
    /// as nbdkit does: unset values follow the layer below, and the
    /// stricter of the two wins.
    fn new(
        minblock: Option<u32>,
        maxdata: Option<u32>,
        maxlen: Option<u32>,
        below: Option<BlockSize>,
    ) -> Limits {
        let (bmin, bmax) = below.map_or((1, 0), |b| (b.minimum.max(1), b.maximum));
        let minblock = minblock.unwrap_or(1).max(bmin);
        let mut maxdata =
            maxdata.unwrap_or_else(|| maxlen.map_or(DEFAULT_MAXDATA, |l| l.min(DEFAULT_MAXDATA)));
        if bmax != 0 {
            maxdata = maxdata.min(bmax);
        }
        let maxdata = (maxdata - maxdata % minblock).max(minblock);
        let maxlen = match maxlen {
            Some(l) => (l - l % minblock).max(minblock),
            None => u32::MAX - minblock + 1,
        };
        Limits {
            minblock: u64::from(minblock),
            maxdata: u64::from(maxdata),
            maxlen: u64::from(maxlen),
        }
    }

    fn down(&self, v: u64) -> u64 {
        v - v % self.minblock
    }

    fn up(&self, v: u64) -> u64 {
        v.next_multiple_of(self.minblock)
    }

    /// Bytes of a request at `offset` before the first aligned offset.
    fn head(&self, offset: u64, count: u64) -> u64 {
        match offset % self.minblock {
            0 => 0,
            r => (self.minblock - r).min(count),
        }
    }
}

/// One connection.
pub struct Adapter {
    minblock: Option<u32>,
    maxdata: Option<u32>,
    maxlen: Option<u32>,
    limits: OnceLock<Limits>,
    rmw: Arc<RwLock<()>>,
}

impl Adapter {
    fn limits(&self, next: &Next) -> Result<Limits> {
        if let Some(l) = self.limits.get() {
            return Ok(*l);
        }
        let l = Limits::new(self.minblock, self.maxdata, self.maxlen, next.block_size()?);
        host::debug(&format!(
            "minblock={} maxdata={} maxlen={}",
            l.minblock, l.maxdata, l.maxlen
        ));
        Ok(*self.limits.get_or_init(|| l))
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        // The lock guards no data, so a panic while it was held leaves
        // nothing inconsistent behind.
        self.rmw.write().unwrap_or_else(|e| e.into_inner())
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.rmw.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replace `data.len()` bytes at `offset` (inside one block) by `data`
    /// or, with `None`, by zeroes, reading and writing the whole block.
    fn modify(
        &self,
        next: &Next,
        l: &Limits,
        offset: u64,
        len: usize,
        data: Option<&[u8]>,
        flags: Flags,
    ) -> Result<()> {
        let start = l.down(offset);
        let at = (offset - start) as usize;
        let mut block = vec![0u8; l.minblock as usize];
        let _g = self.exclusive();
        next.pread(&mut block, start, Flags::empty())?;
        match data {
            Some(d) => block[at..at + len].copy_from_slice(d),
            None => block[at..at + len].fill(0),
        }
        next.pwrite(&block, start, flags)
    }

    /// Take FUA off the pieces of a split request when the layer below
    /// only emulates it, so it costs one flush at the end rather than one
    /// per piece. Returns the flags for the pieces and whether to flush.
    fn fua_once(&self, next: &Next, flags: Flags) -> Result<(Flags, bool)> {
        if flags.contains(Flags::FUA) && next.can_fua()? == Support::Emulate {
            Ok((flags - Flags::FUA, true))
        } else {
            Ok((flags, false))
        }
    }
}

impl FilterHandle for Adapter {
    fn get_size(&self, next: &Next) -> Result<u64> {
        // The unaligned tail cannot be read or written in whole blocks.
        let l = self.limits(next)?;
        Ok(l.down(next.get_size()?))
    }

    fn block_size(&self, next: &Next) -> Result<Option<BlockSize>> {
        // Clients may send anything: splitting and aligning is our job.
        let l = self.limits(next)?;
        let below = next.block_size()?.map_or(0, |b| b.preferred);
        Ok(Some(BlockSize {
            minimum: 1,
            preferred: below.max(4096).max(l.minblock as u32),
            maximum: u32::MAX,
        }))
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let l = self.limits(next)?;
        let mut off = offset;
        let mut rest: &mut [u8] = buf;
        let head = l.head(off, rest.len() as u64) as usize;
        if head > 0 {
            let start = l.down(off);
            let mut block = vec![0u8; l.minblock as usize];
            next.pread(&mut block, start, flags)?;
            let at = (off - start) as usize;
            rest[..head].copy_from_slice(&block[at..at + head]);
            rest = &mut rest[head..];
            off += head as u64;
        }
        while rest.len() as u64 >= l.minblock {
            let n = l.maxdata.min(l.down(rest.len() as u64)) as usize;
            let (piece, after) = rest.split_at_mut(n);
            next.pread(piece, off, flags)?;
            rest = after;
            off += n as u64;
        }
        if !rest.is_empty() {
            let mut block = vec![0u8; l.minblock as usize];
            next.pread(&mut block, off, flags)?;
            let n = rest.len();
            rest.copy_from_slice(&block[..n]);
        }
        Ok(())
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let l = self.limits(next)?;
        let (flags, flush) = self.fua_once(next, flags)?;
        let mut off = offset;
        let mut rest = buf;
        let head = l.head(off, rest.len() as u64) as usize;
        if head > 0 {
            self.modify(next, &l, off, head, Some(&rest[..head]), flags)?;
            rest = &rest[head..];
            off += head as u64;
        }
        if rest.len() as u64 >= l.minblock {
            let _g = self.shared();
            while rest.len() as u64 >= l.minblock {
                let n = l.maxdata.min(l.down(rest.len() as u64)) as usize;
                next.pwrite(&rest[..n], off, flags)?;
                rest = &rest[n..];
                off += n as u64;
            }
        }
        if !rest.is_empty() {
            self.modify(next, &l, off, rest.len(), Some(rest), flags)?;
        }
        if flush {
            next.flush(Flags::empty())?;
        }
        Ok(())
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let l = self.limits(next)?;
        let (flags, flush) = self.fua_once(next, flags)?;
        // Trim is advisory: the unaligned head and tail are simply left.
        let head = l.head(offset, count);
        let mut off = offset + head;
        let mut rest = l.down(count - head);
        if rest > 0 {
            let _g = self.shared();
            while rest > 0 {
                let n = l.maxlen.min(rest);
                next.trim(n, off, flags)?;
                rest -= n;
                off += n;
            }
        }
        if flush {
            next.flush(Flags::empty())?;
        }
        Ok(())
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let l = self.limits(next)?;
        // Anything needing more than one call below is not fast: a later
        // piece refusing would come only after earlier ones were done.
        if flags.contains(Flags::FAST_ZERO)
            && ((offset | count) % l.minblock != 0 || count > l.maxlen)
        {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let (flags, flush) = self.fua_once(next, flags)?;
        let write_flags = flags - Flags::MAY_TRIM - Flags::FAST_ZERO;
        let mut off = offset;
        let mut rest = count;
        let head = l.head(off, rest);
        if head > 0 {
            self.modify(next, &l, off, head as usize, None, write_flags)?;
            rest -= head;
            off += head;
        }
        if rest >= l.minblock {
            let _g = self.shared();
            while rest >= l.minblock {
                let n = l.maxlen.min(l.down(rest));
                next.zero(n, off, flags)?;
                rest -= n;
                off += n;
            }
        }
        if rest > 0 {
            self.modify(next, &l, off, rest as usize, None, write_flags)?;
        }
        if flush {
            next.flush(Flags::empty())?;
        }
        Ok(())
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let l = self.limits(next)?;
        // The exported size is aligned, so rounding out stays inside it.
        let mut off = l.down(offset);
        let end = l.up(offset + count);
        while off < end {
            let n = l.maxdata.min(end - off);
            next.cache(n, off, flags)?;
            off += n;
        }
        Ok(())
    }

    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        let l = self.limits(next)?;
        let start = l.down(offset);
        let len = (l.up(offset + count) - start).min(l.maxlen);
        let below = next.extents(len, start, flags)?;
        for (o, n, t) in align(&below, l.minblock) {
            list.add(o, n, t)?;
        }
        Ok(())
    }
}

/// Make extent boundaries multiples of `block` (the protocol asks that
/// they respect the minimum block size): a block that straddles extents
/// of different kinds gets only the properties all of them share. A
/// partial block left at the end is dropped unless it is all there is,
/// when it is reported as data, which claims nothing.
fn align(extents: &[(u64, u64, u32)], block: u64) -> Vec<(u64, u64, u32)> {
    fn push(out: &mut Vec<(u64, u64, u32)>, o: u64, n: u64, t: u32) {
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += n,
            _ => out.push((o, n, t)),
        }
    }
    let mut out = Vec::new();
    // A block only partly covered so far: its start and shared type.
    let mut pending: Option<(u64, u32)> = None;
    for &(o, n, t) in extents {
        let end = o + n;
        let mut from = o;
        if let Some((b, acc)) = pending {
            let acc = acc & t;
            if end < b + block {
                pending = Some((b, acc));
                continue;
            }
            push(&mut out, b, block, acc);
            pending = None;
            from = b + block;
        }
        let whole_end = end - end % block;
        if whole_end > from {
            push(&mut out, from, whole_end - from, t);
        }
        if end > whole_end.max(from) {
            pending = Some((whole_end.max(from), t));
        }
    }
    if let (Some((b, _)), true) = (pending, out.is_empty()) {
        out.push((b, block, 0));
    }
    out
}

nbdhost_filter!(Blocksize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_nbdkit_defaults() {
        let l = Limits::new(None, None, None, None);
        assert_eq!(
            (l.minblock, l.maxdata, l.maxlen),
            (1, 64 << 20, u32::MAX as u64)
        );
        let l = Limits::new(Some(512), None, None, None);
        assert_eq!(
            (l.minblock, l.maxdata, l.maxlen),
            (512, 64 << 20, (1 << 32) - 512)
        );
        let l = Limits::new(None, None, Some(1 << 20), None);
        assert_eq!((l.maxdata, l.maxlen), (1 << 20, 1 << 20));
        // The layer below tightens what was not configured.
        let below = BlockSize {
            minimum: 4096,
            preferred: 4096,
            maximum: 1 << 20,
        };
        let l = Limits::new(Some(512), None, None, Some(below));
        assert_eq!((l.minblock, l.maxdata), (4096, 1 << 20));
        let l = Limits::new(None, Some(1000), Some(5000), Some(below));
        assert_eq!((l.maxdata, l.maxlen), (4096, 4096));
    }

    #[test]
    fn head_is_the_unaligned_start() {
        let l = Limits::new(Some(512), None, None, None);
        assert_eq!(l.head(0, 100), 0);
        assert_eq!(l.head(500, 100), 12);
        assert_eq!(l.head(1, 5), 5);
        assert_eq!(l.head(1024, 5), 0);
    }

    #[test]
    fn align_merges_straddling_blocks() {
        // Data 0..700, zero hole 700..2048 in 512-byte blocks.
        let e = [(0, 700, 0), (700, 1348, 3)];
        assert_eq!(align(&e, 512), vec![(0, 1024, 0), (1024, 1024, 3)]);
        // Already aligned: unchanged.
        let e = [(0, 512, 3), (512, 512, 0)];
        assert_eq!(align(&e, 512), e.to_vec());
        // Three extents inside one block share only their common bits.
        let e = [(0, 100, 3), (100, 100, 2), (200, 312, 3), (512, 512, 3)];
        assert_eq!(align(&e, 512), vec![(0, 512, 2), (512, 512, 3)]);
        // A partial tail is dropped, unless it is all there is.
        let e = [(0, 1024, 3), (1024, 10, 3)];
        assert_eq!(align(&e, 512), vec![(0, 1024, 3)]);
        let e = [(0, 10, 3)];
        assert_eq!(align(&e, 512), vec![(0, 512, 0)]);
        // Block size 1 changes nothing.
        let e = [(0, 7, 0), (7, 9, 3)];
        assert_eq!(align(&e, 1), e.to_vec());
    }
}
