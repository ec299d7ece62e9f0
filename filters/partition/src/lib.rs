//! The partition filter: serve one partition of an MBR or GPT
//! partitioned disk, as if it were the whole disk (like `qemu-nbd -P`).

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, ExtentList, Filter, FilterHandle, Flags, Next,
    NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

pub mod table;

use table::{Disk, Partition};

/// The configured partition number.
#[derive(Default)]
pub struct PartitionFilter {
    number: Option<u32>,
}

#[callbacks]
impl Filter for PartitionFilter {
    const NAME: &'static str = "partition";
    const DESCRIPTION: &'static str = "serve one partition of an MBR or GPT disk";
    const CONFIG_HELP: &'static str =
        "partition=<N>  (required) The partition to serve, counting from 1
               (MBR: 1-4 primary, 5 and up logical; GPT: 1-128).";
    type Handle = Part;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "partition" {
            return Ok(false);
        }
        match value.parse::<u32>() {
            Ok(n) if n > 0 => self.number = Some(n),
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("partition={value}: expected a partition number, counting from 1"),
                ))
            }
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.number.is_none() {
            return Err(Error::new(
                libc::EINVAL,
                "the partition parameter is required (partition=N)",
            ));
        }
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Part> {
        next.open(readonly, export_name)?;
        Ok(Part {
            number: self.number.unwrap_or(1),
            found: OnceLock::new(),
        })
    }
}

/// One connection. The table is read once per connection, on the first
/// call that needs it (the server asks the size before any request), so
/// a repartitioned disk is seen by the next connection.
pub struct Part {
    number: u32,
    found: OnceLock<Partition>,
}

struct NextDisk<'a>(&'a Next);

impl Disk for NextDisk<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0
            .pread(buf, offset, Flags::empty())
            .map_err(std::io::Error::other)
    }
}

impl Part {
    fn get(&self, next: &Next) -> Result<Partition> {
        if let Some(p) = self.found.get() {
            return Ok(*p);
        }
        let size = next.get_size()?;
        let p = table::find(&NextDisk(next), size, self.number)
            .map_err(|e| Error::new(libc::EINVAL, e.to_string()))?;
        host::debug(&format!(
            "{} partition {} at offset {} length {}",
            p.scheme, self.number, p.offset, p.length
        ));
        Ok(*self.found.get_or_init(|| p))
    }

    fn offset(&self, next: &Next) -> Result<u64> {
        Ok(self.get(next)?.offset)
    }

    /// Pass a range request down, moved to the partition.
    fn moved(&self, next: &Next, mut req: RangeRequest, down: fn(&Next, RangeRequest)) {
        match self.offset(next) {
            Ok(o) => {
                req.set_offset(req.offset() + o);
                down(next, req)
            }
            Err(e) => req.complete(Err(e)),
        }
    }
}

#[callbacks]
impl FilterHandle for Part {
    fn get_size(&self, next: &Next) -> Result<u64> {
        Ok(self.get(next)?.length)
    }
    fn export_description(&self, next: &Next) -> Result<Option<String>> {
        let p = self.get(next)?;
        let this = format!("partition {} of {} disk", self.number, p.scheme);
        Ok(Some(match next.export_description()? {
            Some(base) => format!("{this}: {base}"),
            None => this,
        }))
    }
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        next.pread(buf, offset + self.offset(next)?, flags)
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        next.pwrite(buf, offset + self.offset(next)?, flags)
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.trim(count, offset + self.offset(next)?, flags)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.zero(count, offset + self.offset(next)?, flags)
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.cache(count, offset + self.offset(next)?, flags)
    }
    // On an asynchronous chain requests only move, and go down as they
    // are: nothing waits here. The table was read when the handle was
    // prepared. (Extents, whose answer must be moved back, stay
    // synchronous.)
    fn async_pread(&self, next: &Next, mut req: ReadRequest) {
        match self.offset(next) {
            Ok(o) => {
                req.set_offset(req.offset() + o);
                next.async_pread(req)
            }
            Err(e) => req.complete(Err(e)),
        }
    }
    fn async_pwrite(&self, next: &Next, mut req: WriteRequest) {
        match self.offset(next) {
            Ok(o) => {
                req.set_offset(req.offset() + o);
                next.async_pwrite(req)
            }
            Err(e) => req.complete(Err(e)),
        }
    }
    fn async_trim(&self, next: &Next, req: RangeRequest) {
        self.moved(next, req, Next::async_trim)
    }
    fn async_zero(&self, next: &Next, req: RangeRequest) {
        self.moved(next, req, Next::async_zero)
    }
    fn async_cache(&self, next: &Next, req: RangeRequest) {
        self.moved(next, req, Next::async_cache)
    }
    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        let p = self.get(next)?;
        let end = p.offset + p.length;
        for (o, len, typ) in next.extents(count, offset + p.offset, flags)? {
            // Nothing of the neighbouring partitions may show through.
            let (start, stop) = (o.max(p.offset), (o + len).min(end));
            if stop > start {
                list.add(start - p.offset, stop - start, typ)?;
            }
        }
        Ok(())
    }
}

nbdhost_filter!(PartitionFilter);
