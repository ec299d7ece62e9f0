//! The blocksize filter: let clients send requests of any alignment and
//! size, and hand the layer below only requests aligned to `minblock`,
//! no larger than `maxdata` (with data) or `maxlen` (without).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, BlockSize, Error, ExtentList, Filter, FilterHandle, Flags,
    Next, NextOpener, ReadRequest, Result, Support,
};

pub mod split;

use split::{align, pieces, Limits, Piece};

/// Largest `minblock`: the NBD protocol's largest minimum block size.
const MIN_LIMIT: u32 = 64 * 1024;

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

#[callbacks]
impl Filter for Blocksize {
    const NAME: &'static str = "blocksize";
    const DESCRIPTION: &'static str = "adapt requests to the block size limits below";
    const CONFIG_HELP: &'static str =
        "minblock=<SIZE>  Alignment of requests passed down, a power of 2 <= 64K.
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

/// The pieces of one asynchronous read, joined: the last to come back
/// answers the request.
struct Join {
    left: AtomicUsize,
    /// The request until it is answered, and the first failure.
    state: Mutex<(Option<ReadRequest>, Result<()>)>,
}

impl Join {
    /// One piece came back: its bytes and where they go, or its failure.
    fn piece(&self, r: Result<(&[u8], usize)>) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let (req, failed) = &mut *state;
            match r {
                Ok((bytes, at)) => {
                    if let Some(req) = req {
                        req.buf()[at..][..bytes.len()].copy_from_slice(bytes);
                    }
                }
                Err(e) => {
                    if failed.is_ok() {
                        *failed = Err(e);
                    }
                }
            }
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let result = std::mem::replace(&mut state.1, Ok(()));
            if let Some(req) = state.0.take() {
                req.complete(result);
            }
        }
    }
}

#[callbacks]
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
        for p in pieces(&l, offset, buf.len() as u64, l.maxdata) {
            match p {
                Piece::Whole { offset: o, len } => {
                    let at = (o - offset) as usize;
                    next.pread(&mut buf[at..at + len as usize], o, flags)?;
                }
                Piece::Partial { offset: o, len } => {
                    let start = l.down(o);
                    let mut block = vec![0u8; l.minblock as usize];
                    next.pread(&mut block, start, flags)?;
                    let (at, from) = ((o - offset) as usize, (o - start) as usize);
                    buf[at..at + len as usize].copy_from_slice(&block[from..from + len as usize]);
                }
            }
        }
        Ok(())
    }

    // On an asynchronous chain a read is cut into its pieces, all started
    // at once, each into a buffer of its own; the last piece to come back
    // answers the read, in a continuation, whatever order they came in.
    // (Writes, whose partial blocks take a read-modify-write under a lock,
    // stay synchronous.)
    fn async_pread(&self, next: &Next, req: ReadRequest) {
        let l = match self.limits(next) {
            Ok(l) => l,
            Err(e) => return req.complete(Err(e)),
        };
        let (offset, flags) = (req.offset(), req.flags());
        let cut: Vec<Piece> = pieces(&l, offset, req.len() as u64, l.maxdata).collect();
        if cut.is_empty() {
            return req.complete(Ok(()));
        }
        let join = Arc::new(Join {
            left: AtomicUsize::new(cut.len()),
            state: Mutex::new((Some(req), Ok(()))),
        });
        for p in cut {
            // Where the piece is read below, how much of it, and where it
            // goes in the request's buffer.
            let (below, size, from, len) = match p {
                Piece::Whole { offset: o, len } => (o, len, 0, len),
                Piece::Partial { offset: o, len } => (l.down(o), l.minblock, o - l.down(o), len),
            };
            let at = (below + from - offset) as usize;
            let join = join.clone();
            let data = vec![0u8; size as usize];
            next.async_pread_owned(data, below, flags, move |_, data, r| {
                join.piece(r.map(|()| (&data[from as usize..][..len as usize], at)));
            });
        }
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let l = self.limits(next)?;
        let (flags, flush) = self.fua_once(next, flags)?;
        // Held across the runs of whole blocks, and let go before a
        // read-modify-write, which takes the lock exclusively.
        let mut shared = None;
        for p in pieces(&l, offset, buf.len() as u64, l.maxdata) {
            match p {
                Piece::Whole { offset: o, len } => {
                    shared.get_or_insert_with(|| self.shared());
                    let at = (o - offset) as usize;
                    next.pwrite(&buf[at..at + len as usize], o, flags)?;
                }
                Piece::Partial { offset: o, len } => {
                    shared = None;
                    let at = (o - offset) as usize;
                    let data = &buf[at..at + len as usize];
                    self.modify(next, &l, o, len as usize, Some(data), flags)?;
                }
            }
        }
        drop(shared);
        if flush {
            next.flush(Flags::empty())?;
        }
        Ok(())
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let l = self.limits(next)?;
        let (flags, flush) = self.fua_once(next, flags)?;
        // Trim is advisory: the unaligned head and tail are simply left.
        let mut shared = None;
        for p in pieces(&l, offset, count, l.maxlen) {
            if let Piece::Whole { offset: o, len } = p {
                shared.get_or_insert_with(|| self.shared());
                next.trim(len, o, flags)?;
            }
        }
        drop(shared);
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
        let mut shared = None;
        for p in pieces(&l, offset, count, l.maxlen) {
            match p {
                Piece::Whole { offset: o, len } => {
                    shared.get_or_insert_with(|| self.shared());
                    next.zero(len, o, flags)?;
                }
                Piece::Partial { offset: o, len } => {
                    shared = None;
                    self.modify(next, &l, o, len as usize, None, write_flags)?;
                }
            }
        }
        drop(shared);
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
        let mut below = next.extents(len, start, flags)?;
        // A layer below may answer with less than one block: ask for the
        // rest of the first block, as nbdkit does, so that its type is
        // what all of it shares rather than a guess of data.
        let block_end = start + l.minblock;
        while let Some(end) = below.last().map(|&(o, n, _)| o + n) {
            if end >= block_end {
                break;
            }
            let more = next.extents(block_end - end, end, flags)?;
            if more.is_empty() {
                break;
            }
            below.extend(more);
        }
        for (o, n, t) in align(&below, l.minblock) {
            list.add(o, n, t)?;
        }
        Ok(())
    }
}

nbdhost_filter!(Blocksize);
