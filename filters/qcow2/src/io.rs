//! Where an image's bytes are: the layer below for the image itself, local
//! files for its backing chain. Every read and write of the engine goes
//! through [`Io`], so the engine runs the same over a plugin, a file, or
//! memory (the fuzz targets and tests).

use std::fs::File;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::Whence;

use crate::error::{Error, Result};

/// The bytes under an image.
pub trait Io {
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write `buf` at `offset`; with `fua`, durably before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Make `len` bytes at `offset` read as zeroes.
    fn zero(&self, len: u64, offset: u64) -> Result<()>;
    /// The size in bytes.
    fn size(&self) -> Result<u64>;
    /// The parts of a range that hold nothing and read as zeroes, as
    /// `(offset, length, reads_zero)` runs covering at least its start.
    fn holes(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>>;
}

/// The disk an image's unallocated clusters read through to: its backing
/// file (`backing::Backing`). A trait here, so the engine need not know
/// how backing files are found and opened, which itself needs the engine.
pub trait Beneath: Send + Sync {
    /// Read at guest offset `offset`; past the disk's end, zeroes.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Block status at guest offset `offset` as `(length, flags)` runs
    /// covering exactly `len` bytes (flags as [`crate::image::HOLE`] and
    /// [`crate::image::ZERO`]).
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>>;
}

/// A local file opened read-only: a backing file.
pub struct FileIo {
    file: File,
    /// For messages.
    name: String,
}

impl FileIo {
    /// Wrap an open file; `name` is how messages name it.
    pub fn new(file: File, name: String) -> FileIo {
        FileIo { file, name }
    }

    /// The open file, for locking.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn error(&self, what: &str, e: std::io::Error) -> Error {
        Error::Below(nbdhost_plugin_api::Error::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{}: {what}: {e}", self.name),
        ))
    }

    fn seek(&self, offset: u64, whence: Whence) -> nix::Result<u64> {
        nix::unistd::lseek(&self.file, offset as i64, whence).map(|o| o as u64)
    }
}

impl Io for FileIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // A backing file shorter than the image reads as zeroes past its end.
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.error("read", e)),
            }
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        Err(Error::ReadOnly(format!(
            "{}: a backing file is never written",
            self.name
        )))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn zero(&self, _len: u64, _offset: u64) -> Result<()> {
        Err(Error::ReadOnly(format!(
            "{}: a backing file is never written",
            self.name
        )))
    }

    fn size(&self) -> Result<u64> {
        let md = self.file.metadata().map_err(|e| self.error("stat", e))?;
        if md.file_type().is_file() {
            return Ok(md.len());
        }
        // A block device: its size is where the end is.
        self.seek(0, Whence::SeekEnd)
            .map_err(|e| self.error("size", e.into()))
    }

    fn holes(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let end = offset + len;
        let size = self.size()?;
        if offset >= size {
            return Ok(vec![(offset, len, true)]);
        }
        let data = match self.seek(offset, Whence::SeekData) {
            Ok(d) => d.min(end),
            // Only a hole from here to the end of the file.
            Err(Errno::ENXIO) => return Ok(vec![(offset, len, true)]),
            // No SEEK_DATA here: call it data.
            Err(_) => return Ok(vec![(offset, len, false)]),
        };
        if data > offset {
            return Ok(vec![(offset, data - offset, true)]);
        }
        let hole = self.seek(offset, Whence::SeekHole).unwrap_or(end).min(end);
        Ok(vec![(offset, hole.max(offset + 1) - offset, false)])
    }
}
