//! The offset filter: serve `range` bytes of the next layer starting at
//! `offset`, as if they were the whole disk.

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, ExtentList, Filter, FilterHandle, Flags, Next,
    NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// Configured window.
#[derive(Default)]
pub struct Offset {
    offset: u64,
    range: Option<u64>,
}

#[callbacks]
impl Filter for Offset {
    const NAME: &'static str = "offset";
    const DESCRIPTION: &'static str = "serve a window of the underlying disk";
    const CONFIG_HELP: &'static str = "offset=<SIZE>  Start of the window (default 0).
range=<SIZE>   Length of the window (default: to the end).";
    type Handle = Window;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "offset" => self.offset = host::parse_size(value)?,
            "range" => self.range = Some(host::parse_size(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Window> {
        next.open(readonly, export_name)?;
        Ok(Window {
            offset: self.offset,
            range: self.range,
        })
    }
}

/// One connection's view; the window is checked against the real size in
/// `get_size`, which the server asks before serving any request.
pub struct Window {
    offset: u64,
    range: Option<u64>,
}

#[callbacks]
impl FilterHandle for Window {
    fn get_size(&self, next: &Next) -> Result<u64> {
        let size = next.get_size()?;
        let end = match self.range {
            Some(r) => self.offset.checked_add(r),
            None => Some(size),
        };
        match end {
            Some(end) if self.offset <= size && end <= size => Ok(end - self.offset),
            _ => Err(Error::new(
                libc::EINVAL,
                format!(
                    "offset {} and range {:?} do not fit in the underlying disk of {size} bytes",
                    self.offset, self.range
                ),
            )),
        }
    }
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        next.pread(buf, offset + self.offset, flags)
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        next.pwrite(buf, offset + self.offset, flags)
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.trim(count, offset + self.offset, flags)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.zero(count, offset + self.offset, flags)
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.cache(count, offset + self.offset, flags)
    }
    // On an asynchronous chain requests only move, and go down as they
    // are: nothing waits here. (Extents, whose answer must be moved back,
    // stay synchronous.)
    fn async_pread(&self, next: &Next, mut req: ReadRequest) {
        req.set_offset(req.offset() + self.offset);
        next.async_pread(req)
    }
    fn async_pwrite(&self, next: &Next, mut req: WriteRequest) {
        req.set_offset(req.offset() + self.offset);
        next.async_pwrite(req)
    }
    fn async_trim(&self, next: &Next, mut req: RangeRequest) {
        req.set_offset(req.offset() + self.offset);
        next.async_trim(req)
    }
    fn async_zero(&self, next: &Next, mut req: RangeRequest) {
        req.set_offset(req.offset() + self.offset);
        next.async_zero(req)
    }
    fn async_cache(&self, next: &Next, mut req: RangeRequest) {
        req.set_offset(req.offset() + self.offset);
        next.async_cache(req)
    }
    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        for (o, len, typ) in next.extents(count, offset + self.offset, flags)? {
            let start = o.max(self.offset);
            let end = o + len;
            if end > start {
                list.add(start - self.offset, end - start, typ)?;
            }
        }
        Ok(())
    }
}

nbdhost_filter!(Offset);
