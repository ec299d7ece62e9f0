//! The tar filter: serve one file inside an uncompressed tar archive,
//! read-write, in place. The entry is found by reading the archive's
//! headers (ustar, GNU long names and pax, through the `tar` crate, which
//! seeks over the data of the entries before it); requests then move by
//! the entry's offset, as the offset filter's do.

#![forbid(unsafe_code)]

use std::io::BufReader;
use std::sync::OnceLock;

use archive::{plugin_error, NextReader};
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, ExtentList, Filter, FilterHandle, Flags, Next,
    NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// Archive bytes asked of the layer below at a time: one header and a
/// little more, since data between headers is seeked over, not read.
const READ_SIZE: usize = 64 * 1024;

/// The entry to serve.
#[derive(Default)]
pub struct Tar {
    entry: Option<String>,
    limit: Option<u64>,
}

#[callbacks]
impl Filter for Tar {
    const NAME: &'static str = "tar";
    const DESCRIPTION: &'static str = "serve one file inside a tar archive";
    const CONFIG_HELP: &'static str =
        "tar-entry=<PATH>  (required) The path inside the tar file to serve.
tar-limit=<SIZE>  Refuse an entry whose header is not in the first SIZE bytes.
tar=<PROGRAM>     Accepted for nbdkit's command lines; no program is run.";
    type Handle = Entry;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "tar-entry" if self.entry.is_some() => {
                return Err(Error::new(
                    libc::EINVAL,
                    "only one tar-entry parameter can be given",
                ))
            }
            "tar-entry" => self.entry = Some(value.to_owned()),
            "tar-limit" => self.limit = Some(host::parse_size(value)?).filter(|&l| l > 0),
            "tar" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.entry.is_none() {
            return Err(Error::new(
                libc::EINVAL,
                "you must supply the tar-entry=<PATH> parameter",
            ));
        }
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Entry> {
        next.open(readonly, export_name)?;
        Ok(Entry {
            name: self.entry.clone().unwrap_or_default(),
            limit: self.limit,
            place: OnceLock::new(),
        })
    }
}

/// Where the entry's data lies in the archive.
#[derive(Clone, Copy)]
struct Place {
    offset: u64,
    size: u64,
}

/// One connection: the entry's name, and its place once found.
pub struct Entry {
    name: String,
    limit: Option<u64>,
    place: OnceLock<Place>,
}

impl Entry {
    fn find(&self, next: &Next) -> Result<Place> {
        let mut reader = NextReader::new(next)?;
        if let Some(limit) = self.limit {
            reader = reader.with_limit(limit);
        }
        let what = format!("tar: looking for {}", self.name);
        let mut archive = tar::Archive::new(BufReader::with_capacity(READ_SIZE, reader));
        let entries = archive
            .entries_with_seek()
            .map_err(|e| plugin_error(&what, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| plugin_error(&what, e))?;
            if *entry.path_bytes() != *self.name.as_bytes() {
                continue;
            }
            if entry.header().entry_type().is_gnu_sparse() {
                return Err(Error::new(
                    libc::EINVAL,
                    format!(
                        "tar: {} is a sparse entry, whose bytes are not stored in one piece",
                        self.name
                    ),
                ));
            }
            let place = Place {
                offset: entry.raw_file_position(),
                size: entry.size(),
            };
            host::debug(&format!(
                "tar: {} found at offset {}, size {}",
                self.name, place.offset, place.size
            ));
            return Ok(place);
        }
        Err(Error::new(
            libc::ENOENT,
            format!("tar: {} is not in the archive", self.name),
        ))
    }

    fn offset(&self) -> u64 {
        self.place.get().map_or(0, |p| p.offset)
    }
}

#[callbacks]
impl FilterHandle for Entry {
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        let place = self.find(next)?;
        let _ = self.place.set(place);
        Ok(())
    }
    fn get_size(&self, _next: &Next) -> Result<u64> {
        self.place
            .get()
            .map(|p| p.size)
            .ok_or_else(|| Error::new(libc::EIO, "tar: entry not found yet"))
    }
    fn local_file(&self, _next: &Next) -> Result<Option<std::path::PathBuf>> {
        Ok(None)
    }
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        next.pread(buf, offset + self.offset(), flags)
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        next.pwrite(buf, offset + self.offset(), flags)
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.trim(count, offset + self.offset(), flags)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.zero(count, offset + self.offset(), flags)
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.cache(count, offset + self.offset(), flags)
    }
    // Requests only move by the entry's offset, so over an asynchronous
    // chain they go down as they are and nothing waits here.
    fn async_pread(&self, next: &Next, mut req: ReadRequest) {
        req.set_offset(req.offset() + self.offset());
        next.async_pread(req)
    }
    fn async_pwrite(&self, next: &Next, mut req: WriteRequest) {
        req.set_offset(req.offset() + self.offset());
        next.async_pwrite(req)
    }
    fn async_trim(&self, next: &Next, mut req: RangeRequest) {
        req.set_offset(req.offset() + self.offset());
        next.async_trim(req)
    }
    fn async_zero(&self, next: &Next, mut req: RangeRequest) {
        req.set_offset(req.offset() + self.offset());
        next.async_zero(req)
    }
    fn async_cache(&self, next: &Next, mut req: RangeRequest) {
        req.set_offset(req.offset() + self.offset());
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
        let base = self.offset();
        for (o, len, typ) in next.extents(count, offset + base, flags)? {
            let start = o.max(base);
            let end = o + len;
            if end > start {
                list.add(start - base, end - start, typ)?;
            }
        }
        Ok(())
    }
}

nbdhost_filter!(Tar);
