//! The qcow2 targets' layer below: an image in memory, as the engine's
//! `Io`, behaving as the file plugin over a regular file does. Reads must
//! lie inside it (the engine reads what lies past the end as zeroes
//! itself); writes grow it, up to a cap; zeroes past the end change
//! nothing.

use std::cell::{Cell, RefCell};

use qcow2filter::error::{Error, Result};
use qcow2filter::io::Io;

/// The largest image the targets let the engine grow (the model's disks
/// are 2 MiB; a parse input is at most a few MiB).
const CAP: u64 = 256 << 20;

/// An image in memory.
pub struct MemIo {
    bytes: RefCell<Vec<u8>>,
    writable: bool,
    /// Flushes asked for.
    pub flushes: Cell<u64>,
}

/// EIO, as the layer below would fail.
const EIO: i32 = 5;

fn below(msg: String) -> Error {
    Error::Below(nbdhost_plugin_api::Error::new(EIO, msg))
}

impl MemIo {
    pub fn new(bytes: Vec<u8>, writable: bool) -> MemIo {
        MemIo {
            bytes: RefCell::new(bytes),
            writable,
            flushes: Cell::new(0),
        }
    }

    /// A copy of the image as it is.
    #[allow(dead_code)] // (qcow2_parse does not need it)
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.borrow().clone()
    }

    fn range(&self, offset: u64, len: usize) -> Result<(usize, usize)> {
        let size = self.bytes.borrow().len() as u64;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok((offset as usize, end as usize)),
            _ => Err(below(format!(
                "{len} bytes at {offset} lie outside the {size}-byte image"
            ))),
        }
    }
}

impl Io for MemIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let (a, b) = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes.borrow()[a..b]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly("read-only image".into()));
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= CAP)
            .ok_or_else(|| below(format!("a write of {} bytes at {offset}", buf.len())))?;
        let mut v = self.bytes.borrow_mut();
        if end > v.len() as u64 {
            v.resize(end as usize, 0);
        }
        v[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.flushes.set(self.flushes.get() + 1);
        Ok(())
    }

    fn zero(&self, len: u64, offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly("read-only image".into()));
        }
        // As the file plugin zeroes (fallocate with KEEP_SIZE): what lies
        // past the end reads as zeroes already and stays past it. (A
        // fresh cluster whose start alone was written ends the image part
        // way through it, and version 2 zeroes such a cluster in place.)
        let mut v = self.bytes.borrow_mut();
        let size = v.len() as u64;
        let a = offset.min(size) as usize;
        let b = offset.saturating_add(len).min(size) as usize;
        v[a..b].fill(0);
        Ok(())
    }

    fn size(&self) -> Result<u64> {
        Ok(self.bytes.borrow().len() as u64)
    }

    fn holes(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        Ok(vec![(offset, len, false)])
    }
}
