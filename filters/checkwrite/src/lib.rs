//! The checkwrite filter: every write-type request becomes a check that
//! the layer below already holds what it would write, failing with EIO if
//! not; the layer below is opened read-only and never written (nbdkit's
//! checkwrite filter). It tests copying tools: copy an export onto itself
//! and any byte copied wrong is an error.

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    abi, callbacks, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener,
    RangeRequest, Result, Support, WriteRequest,
};

/// The filter; it has no parameters.
#[derive(Default)]
pub struct CheckWrite;

/// Ranges that must read back as zeroes are read this many bytes at a time.
const CHUNK: u64 = 1 << 20;

#[callbacks]
impl Filter for CheckWrite {
    const NAME: &'static str = "checkwrite";
    const DESCRIPTION: &'static str = "check writes match the contents of the layer below";
    type Handle = CheckWriteHandle;

    fn open(
        &self,
        next: &NextOpener,
        _readonly: bool,
        export_name: &str,
    ) -> Result<CheckWriteHandle> {
        next.open(true, export_name)?;
        Ok(CheckWriteHandle)
    }
}

/// One connection. Whatever the layer below can do, every write-type
/// request is offered: each is only a check.
pub struct CheckWriteHandle;

fn mismatch() -> Error {
    Error::new(libc::EIO, "data written does not match expected")
}

fn compare(written: &[u8], held: &[u8]) -> Result<()> {
    if written == held {
        Ok(())
    } else {
        Err(mismatch())
    }
}

/// Check that `count` bytes at `offset` read back as zeroes, reading
/// them unless the layer below says they are zeroes. Reading is not fast,
/// so a fast zero that would need it fails with ENOTSUP.
fn check_zeroes(next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
    let fast = flags.contains(Flags::FAST_ZERO);
    let end = offset + count;
    if !next.can_extents()? {
        if fast {
            return Err(Error::errno(libc::ENOTSUP));
        }
        return read_zeroes(next, count, offset);
    }
    let mut pos = offset;
    while pos < end {
        let before = pos;
        for (o, l, t) in next.extents(end - pos, pos, Flags::empty())? {
            let stop = (o + l).min(end);
            if stop <= pos {
                continue;
            }
            if t & abi::EXTENT_ZERO == 0 {
                if fast {
                    return Err(Error::errno(libc::ENOTSUP));
                }
                read_zeroes(next, stop - pos, pos)?;
            }
            pos = stop;
        }
        if pos == before {
            return Err(Error::new(libc::EIO, "no extents from the layer below"));
        }
    }
    Ok(())
}

fn read_zeroes(next: &Next, count: u64, offset: u64) -> Result<()> {
    let mut buf = vec![0u8; count.min(CHUNK) as usize];
    let mut done = 0;
    while done < count {
        let n = (count - done).min(CHUNK) as usize;
        next.pread(&mut buf[..n], offset + done, Flags::empty())?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(mismatch());
        }
        done += n as u64;
    }
    Ok(())
}

#[callbacks]
impl FilterHandle for CheckWriteHandle {
    fn can_write(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self, _next: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_trim(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_zero(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    // Advertised even where every fast zero will fail (a layer below
    // without extents): a client that may try one is the better test.
    fn can_fast_zero(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_multi_conn(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        let mut held = vec![0u8; buf.len()];
        next.pread(&mut held, offset, Flags::empty())?;
        compare(buf, &held)
    }
    fn flush(&self, _next: &Next, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        check_zeroes(next, count, offset, flags)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        check_zeroes(next, count, offset, flags)
    }

    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        let held = vec![0u8; req.len()];
        let offset = req.offset();
        next.async_pread_owned(held, offset, Flags::empty(), move |_, held, r| {
            let r = r.and_then(|()| compare(req.buf(), &held));
            req.complete(r)
        })
    }
    fn async_flush(&self, _next: &Next, req: RangeRequest) {
        req.complete(Ok(()))
    }
}

nbdhost_filter!(CheckWrite);
