//! The ext2 filter: serve one regular file inside the ext2, ext3 or ext4
//! file system that the layer below holds, read-write, through
//! libext2fs (e2fsprogs): the file system's own library decides where
//! the file's blocks are and keeps its metadata consistent.

#![deny(unsafe_code)]

mod ext2fs;

use std::sync::{Mutex, MutexGuard, PoisonError};

use ext2fs::{forget_error_messages, Ext2Error, Fs};
use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, Error, ExportList, Filter, FilterHandle, Flags, Next, NextExports,
    NextOpener, Result, Support, ThreadModel,
};

/// Which file to serve.
#[derive(Clone)]
enum Target {
    /// This absolute path.
    Path(String),
    /// The path the client names as its export.
    ExportName,
}

/// The configured file.
#[derive(Default)]
pub struct Ext2 {
    target: Option<Target>,
}

fn fs_error(e: Ext2Error) -> Error {
    Error::new(e.errno(), format!("ext2: {e}"))
}

#[callbacks]
impl Filter for Ext2 {
    const NAME: &'static str = "ext2";
    const DESCRIPTION: &'static str = "serve one file inside an ext2, ext3 or ext4 file system";
    const CONFIG_HELP: &'static str =
        "ext2file=<PATH>  (required) Absolute path of the file to serve inside the
                 file system, or 'exportname' for the client's choice.";
    // Two connections writing one file system at once would corrupt it,
    // as two machines mounting it would.
    const THREAD_MODEL: ThreadModel = ThreadModel::SerializeConnections;
    type Handle = Inside;

    fn unload(&mut self) {
        forget_error_messages();
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "ext2file" {
            return Ok(false);
        }
        if self.target.is_some() {
            return Err(Error::new(
                libc::EINVAL,
                "ext2file parameter specified more than once",
            ));
        }
        self.target = Some(if value == "exportname" {
            Target::ExportName
        } else {
            Target::Path(value.to_owned())
        });
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        match &self.target {
            None => Err(Error::new(
                libc::EINVAL,
                "you must supply the ext2file=<PATH> parameter",
            )),
            Some(Target::Path(p)) if !p.starts_with('/') => Err(Error::new(
                libc::EINVAL,
                format!("ext2file={p}: must be an absolute path"),
            )),
            Some(_) => Ok(()),
        }
    }

    // With the client choosing the file, the layer below's names mean
    // nothing and listing the file system's would reveal it: none are
    // listed, and there is no default.
    fn list_exports(
        &self,
        next: &NextExports,
        readonly: bool,
        is_tls: bool,
        exports: &mut ExportList,
    ) -> Result<()> {
        match self.target {
            Some(Target::ExportName) => Ok(()),
            _ => next.list_exports_into(readonly, is_tls, exports),
        }
    }

    fn default_export(
        &self,
        _next: &NextExports,
        _readonly: bool,
        _is_tls: bool,
    ) -> Result<String> {
        match self.target {
            Some(Target::ExportName) => Err(Error::new(
                libc::ENOENT,
                "ext2file=exportname: the client must name the file it wants",
            )),
            _ => Ok(String::new()),
        }
    }

    // The layer below is opened for writing whatever the client asked,
    // since opening a file system may replay its journal.
    fn open(&self, next: &NextOpener, _readonly: bool, export_name: &str) -> Result<Inside> {
        let path = match self.target.clone() {
            Some(Target::Path(p)) => {
                next.open(false, export_name)?;
                p
            }
            _ => {
                next.open(false, "")?;
                format!("/{}", export_name.trim_start_matches('/'))
            }
        };
        Ok(Inside {
            path,
            fs: Mutex::new(None),
        })
    }
}

/// One connection's file, open once the connection is prepared.
pub struct Inside {
    path: String,
    fs: Mutex<Option<Fs>>,
}

impl Inside {
    fn fs(&self) -> Result<MutexGuard<'_, Option<Fs>>> {
        let guard = self.fs.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            return Err(Error::new(libc::EIO, "ext2: file system not open"));
        }
        Ok(guard)
    }

    fn with<T>(&self, f: impl FnOnce(&Fs) -> std::result::Result<T, Ext2Error>) -> Result<T> {
        let guard = self.fs()?;
        let fs = guard
            .as_ref()
            .ok_or_else(|| Error::new(libc::EIO, "ext2: not open"))?;
        f(fs).map_err(fs_error)
    }
}

#[callbacks]
impl FilterHandle for Inside {
    fn prepare(&self, next: &Next, readonly: bool) -> Result<()> {
        let readonly = readonly || !next.can_write()?;
        let fs = Fs::open(next, readonly, &self.path).map_err(fs_error)?;
        *self.fs.lock().unwrap_or_else(PoisonError::into_inner) = Some(fs);
        Ok(())
    }
    fn finalize(&self, next: &Next) -> Result<()> {
        let fs = self
            .fs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match fs {
            Some(fs) => fs.close(next).map_err(fs_error),
            None => Ok(()),
        }
    }
    fn get_size(&self, next: &Next) -> Result<u64> {
        self.with(|fs| fs.size(next))
    }
    // Only a layer below with a description gets one that says where
    // the disk comes from, as in nbdkit.
    fn export_description(&self, next: &Next) -> Result<Option<String>> {
        Ok(next
            .export_description()?
            .map(|d| format!("embedded '{}' from within ext2 image: {d}", self.path)))
    }
    fn can_fua(&self, _next: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_flush(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    // Every zero is written as zeroes through libext2fs.
    fn can_zero(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_fast_zero(&self, _next: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_trim(&self, _next: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_extents(&self, _next: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_cache(&self, _next: &Next) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn can_multi_conn(&self, _next: &Next) -> Result<bool> {
        Ok(false)
    }
    fn local_file(&self, _next: &Next) -> Result<Option<std::path::PathBuf>> {
        Ok(None)
    }
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.with(|fs| fs.read(next, buf, offset))
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.with(|fs| {
            fs.write(next, buf, offset)?;
            if flags.contains(Flags::FUA) {
                fs.flush(next)?;
            }
            Ok(())
        })
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FAST_ZERO) {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let zeroes = vec![0u8; count.min(1 << 20) as usize];
        self.with(|fs| {
            let mut done = 0;
            while done < count {
                let n = (count - done).min(zeroes.len() as u64) as usize;
                fs.write(next, &zeroes[..n], offset + done)?;
                done += n as u64;
            }
            if flags.contains(Flags::FUA) {
                fs.flush(next)?;
            }
            Ok(())
        })
    }
    fn trim(&self, _next: &Next, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::errno(libc::EOPNOTSUPP))
    }
    // Defined so that no request reaches the layer below at the file's
    // offsets: a cache request reads the range (into libext2fs's buffer
    // and the layer below's caches).
    fn cache(&self, next: &Next, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        let mut buf = vec![0u8; count.min(1 << 20) as usize];
        self.with(|fs| {
            let mut done = 0;
            while done < count {
                let n = (count - done).min(buf.len() as u64) as usize;
                fs.read(next, &mut buf[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        })
    }
    fn flush(&self, next: &Next, _flags: Flags) -> Result<()> {
        self.with(|fs| fs.flush(next))
    }
}

nbdhost_filter!(Ext2);
