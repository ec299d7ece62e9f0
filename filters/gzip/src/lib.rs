//! The gzip filter: serve the uncompressed disk of a gzip file,
//! read-only. gzip has no index to seek by, so the first connection
//! decompresses the whole file, once, into an unlinked temporary file
//! that every connection then reads.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use archive::{plugin_error, read_only, NextReader};
use flate2::read::GzDecoder;
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener, Result,
    Support,
};

/// Compressed bytes asked of the layer below at a time.
const READ_SIZE: usize = 1024 * 1024;

/// The decompressed disk, shared by every connection once made.
struct Disk {
    file: File,
    size: u64,
}

/// Decompress the gzip file below into a new unlinked file in `$TMPDIR`
/// or `/var/tmp` (the disk may be larger than a memory-backed /tmp).
/// Only the first gzip member is read, and anything after it ignored, as
/// nbdkit does.
fn decompress(next: &Next) -> Result<Disk> {
    let (file, _) = block_cache::scratch_file_or_error("gzip", "decompressed copy")?;
    let compressed = BufReader::with_capacity(READ_SIZE, NextReader::new(next)?);
    let mut decoder = GzDecoder::new(compressed);
    let mut out = BufWriter::with_capacity(READ_SIZE, &file);
    let size = io::copy(&mut decoder, &mut out)
        .and_then(|n| out.flush().map(|()| n))
        .map_err(|e| plugin_error("gzip: decompressing", e))?;
    drop(out);
    host::debug(&format!("gzip: {size} bytes uncompressed"));
    Ok(Disk { file, size })
}

/// The disk, made by the first connection to need it.
#[derive(Default)]
pub struct Gzip {
    disk: Arc<Mutex<Option<Arc<Disk>>>>,
}

#[callbacks]
impl Filter for Gzip {
    const NAME: &'static str = "gzip";
    const DESCRIPTION: &'static str = "serve the uncompressed disk of a gzip file";
    type Handle = Uncompressed;

    fn open(&self, next: &NextOpener, _readonly: bool, export_name: &str) -> Result<Uncompressed> {
        next.open(true, export_name)?;
        Ok(Uncompressed {
            shared: Arc::clone(&self.disk),
            disk: OnceLock::new(),
        })
    }
}

/// One connection's view of the shared disk.
pub struct Uncompressed {
    shared: Arc<Mutex<Option<Arc<Disk>>>>,
    disk: OnceLock<Arc<Disk>>,
}

impl Uncompressed {
    fn disk(&self) -> Result<&Disk> {
        self.disk
            .get()
            .map(Arc::as_ref)
            .ok_or_else(|| Error::new(libc::EIO, "gzip: not decompressed"))
    }
}

#[callbacks]
impl FilterHandle for Uncompressed {
    // Connections that arrive while the first decompresses wait for it
    // on the lock rather than decompressing again.
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let disk = match shared.as_ref() {
            Some(d) => Arc::clone(d),
            None => Arc::clone(shared.insert(Arc::new(decompress(next)?))),
        };
        let _ = self.disk.set(disk);
        Ok(())
    }
    fn get_size(&self, _next: &Next) -> Result<u64> {
        Ok(self.disk()?.size)
    }
    fn can_write(&self, _next: &Next) -> Result<bool> {
        read_only::can_write()
    }
    fn can_extents(&self, _next: &Next) -> Result<bool> {
        read_only::can_extents()
    }
    fn can_cache(&self, _next: &Next) -> Result<Support> {
        read_only::can_cache()
    }
    fn local_file(&self, _next: &Next) -> Result<Option<PathBuf>> {
        Ok(None)
    }
    // Defined so that a cache request never reaches the layer below,
    // whose offsets are the compressed file's; the whole disk is already
    // in the local copy.
    fn cache(&self, _next: &Next, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        self.disk().map(drop)
    }
    fn pread(&self, _next: &Next, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.disk()?
            .file
            .read_exact_at(buf, offset)
            .map_err(|e| plugin_error("gzip: reading the decompressed copy", e))
    }
}

nbdhost_filter!(Gzip);
