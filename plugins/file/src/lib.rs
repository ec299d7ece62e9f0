//! The file plugin: serve a regular file or a block device, or (`dir=`)
//! every one of them in a directory, each under its own export name.
//!
//! Every connection opens the file afresh, so `-r` and per-connection
//! read-only opens are honoured by the kernel. Flush and FUA are
//! `fdatasync`; trim punches holes; zeroing uses the file system's
//! zero-range or hole punching (or the block device's zero-out) and leaves
//! writing zeroes to the server when none is available; allocation is read
//! back with `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_plugin, BlockSize, Error, ExportList, ExtentList, Flags, Handle,
    Plugin, Result, Support,
};

/// Alignment of O_DIRECT transfers: safe for 512- and 4096-byte sectors.
const DIRECT_ALIGN: usize = 4096;
/// `BLKGETSIZE64`, `BLKDISCARD` and `BLKZEROOUT` from linux/fs.h.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// `f_type` of the file systems whose files live in memory (linux/magic.h).
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// Configuration from the command line.
#[derive(Default)]
pub struct FilePlugin {
    path: Option<PathBuf>,
    /// `dir=`: serve the files in it, chosen by export name.
    dir: Option<PathBuf>,
    direct: bool,
    advice: Option<libc::c_int>,
    /// The file is a regular file on tmpfs or ramfs: every call is a memory
    /// copy that never waits for a device.
    in_memory: bool,
}

/// Whether `path`, following symbolic links, is something to serve.
fn servable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() || m.file_type().is_block_device())
}

/// The file of `dir` that export `name` names: a name with no slash, as
/// nbdkit's `dir=` takes it. The default export ("") names none.
fn file_in(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::new(
            libc::ENOENT,
            "dir= serves no default export: ask for a file by name (NBD_OPT_LIST lists them)",
        ));
    }
    if name.contains('/') {
        return Err(Error::new(libc::EINVAL, "export name cannot contain /"));
    }
    let path = dir.join(name);
    if !servable(&path) {
        return Err(Error::new(
            libc::ENOENT,
            format!("{name}: no regular file or block device of that name in the directory"),
        ));
    }
    Ok(path)
}

/// Whether `path` is a regular file whose data lives in memory.
fn in_memory(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; all-zero is a valid value to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C path and a writable statfs buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as libc::c_long, TMPFS_MAGIC | RAMFS_MAGIC)
}

#[callbacks]
impl Plugin for FilePlugin {
    const NAME: &'static str = "file";
    const DESCRIPTION: &'static str = "serve a file or a block device";
    const CONFIG_HELP: &'static str = "file=<PATH>     The file or block device to serve.
dir=<DIR>       Or: serve each file in DIR under its name.
cache=default|none   none: bypass the page cache (O_DIRECT).
fadvise=normal|random|sequential   Access-pattern hint for the kernel.";
    const MAGIC_CONFIG_KEY: Option<&'static str> = Some("file");
    type Handle = FileHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "file" => {
                // Absolute now, so a later change of directory cannot
                // redirect it.
                let p = std::path::absolute(value)
                    .map_err(|e| Error::new(libc::EINVAL, format!("file={value}: {e}")))?;
                self.path = Some(p);
            }
            "dir" | "directory" => {
                let d = std::fs::canonicalize(value)
                    .map_err(|e| Error::new(libc::EINVAL, format!("dir={value}: {e}")))?;
                self.dir = Some(d);
            }
            "cache" => {
                self.direct = match value {
                    "none" => true,
                    "default" => false,
                    _ => {
                        return Err(Error::new(
                            libc::EINVAL,
                            format!("cache={value}: expected default or none"),
                        ))
                    }
                }
            }
            "fadvise" => {
                self.advice = Some(match value {
                    "normal" => libc::POSIX_FADV_NORMAL,
                    "random" => libc::POSIX_FADV_RANDOM,
                    "sequential" => libc::POSIX_FADV_SEQUENTIAL,
                    _ => {
                        return Err(Error::new(
                            libc::EINVAL,
                            format!("fadvise={value}: expected normal, random or sequential"),
                        ))
                    }
                })
            }
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("unknown parameter '{key}'"),
                ))
            }
        }
        Ok(())
    }

    fn config_complete(&mut self) -> Result<()> {
        let path = match (&self.path, &self.dir) {
            (Some(_), Some(_)) => {
                return Err(Error::new(
                    libc::EINVAL,
                    "file= and dir= cannot be used at the same time",
                ))
            }
            (None, None) => {
                return Err(Error::new(
                    libc::EINVAL,
                    "the file (or dir) parameter is required",
                ))
            }
            (None, Some(dir)) => {
                if !dir.is_dir() {
                    return Err(Error::new(
                        libc::EINVAL,
                        format!("{}: not a directory", dir.display()),
                    ));
                }
                // Each export may live on another file system.
                self.in_memory = false;
                return Ok(());
            }
            (Some(path), None) => path,
        };
        let md = std::fs::metadata(path)
            .map_err(|e| Error::new(libc::EINVAL, format!("{}: {e}", path.display())))?;
        if md.is_dir() {
            return Err(Error::new(
                libc::EINVAL,
                format!(
                    "{}: a directory; use dir= to serve the files in it",
                    path.display()
                ),
            ));
        }
        if !md.is_file() && !md.file_type().is_block_device() {
            return Err(Error::new(
                libc::EINVAL,
                format!("{}: not a regular file or block device", path.display()),
            ));
        }
        // A device node on devtmpfs is not memory: its I/O goes to the device.
        self.in_memory = md.is_file() && !self.direct && in_memory(path);
        Ok(())
    }

    fn nonblocking(&self) -> bool {
        self.in_memory
    }

    fn list_exports(&self, readonly: bool, is_tls: bool, exports: &mut ExportList) -> Result<()> {
        let Some(dir) = &self.dir else {
            return exports.add(&self.default_export(readonly, is_tls)?, None);
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::new(errno_of(&e), format!("{}: {e}", dir.display())))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| servable(&dir.join(name)))
            .collect();
        names.sort();
        for name in names {
            exports.add(&name, None)?;
        }
        Ok(())
    }

    fn open(&self, readonly: bool) -> Result<FileHandle> {
        let path = match (&self.dir, &self.path) {
            (Some(dir), _) => file_in(dir, &host::export_name().unwrap_or_default())?,
            (None, Some(path)) => path.clone(),
            (None, None) => return Err(Error::new(libc::EINVAL, "not configured")),
        };
        FileHandle::open(&path, readonly, self.direct, self.advice)
    }
}

/// One connection's open file.
pub struct FileHandle {
    file: File,
    /// Absolute: `file=` is made absolute at configuration, `dir=` is
    /// canonical.
    path: PathBuf,
    writable: bool,
    block_device: bool,
    direct: bool,
    /// Cleared once the file system says it cannot do these, so that later
    /// requests skip straight to what works.
    punch_ok: AtomicBool,
    zero_range_ok: AtomicBool,
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

impl FileHandle {
    fn open(
        path: &Path,
        readonly: bool,
        direct: bool,
        advice: Option<libc::c_int>,
    ) -> Result<FileHandle> {
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let open = |write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(flags)
                .open(path)
        };
        let (file, writable) = if readonly {
            (open(false), false)
        } else {
            match open(true) {
                Ok(f) => (Ok(f), true),
                // A file we may only read is served read-only.
                Err(e) if matches!(errno_of(&e), libc::EACCES | libc::EROFS | libc::EPERM) => {
                    (open(false), false)
                }
                Err(e) => (Err(e), true),
            }
        };
        let file = file.map_err(|e| {
            let hint = if direct && errno_of(&e) == libc::EINVAL {
                " (the file system may not support cache=none)"
            } else {
                ""
            };
            Error::new(errno_of(&e), format!("{}: {e}{hint}", path.display()))
        })?;
        let md = file
            .metadata()
            .map_err(|e| Error::new(errno_of(&e), format!("{}: {e}", path.display())))?;
        // Checked again on what was opened: a dir= entry may have changed.
        let block_device = md.file_type().is_block_device();
        if !md.is_file() && !block_device {
            return Err(Error::new(
                libc::EINVAL,
                format!("{}: not a regular file or block device", path.display()),
            ));
        }
        if let Some(a) = advice {
            // SAFETY: posix_fadvise on our own descriptor; advice only.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, a) };
        }
        Ok(FileHandle {
            file,
            path: path.to_path_buf(),
            writable,
            block_device,
            direct,
            punch_ok: AtomicBool::new(!block_device),
            zero_range_ok: AtomicBool::new(!block_device),
        })
    }

    fn fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }

    /// `fallocate` with `mode` over a range.
    fn fallocate(&self, mode: libc::c_int, offset: u64, count: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own descriptor with integer arguments.
        let r = unsafe {
            libc::fallocate(self.fd(), mode, offset as libc::off_t, count as libc::off_t)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(last_error())
        }
    }

    /// A block-device range ioctl (`BLKDISCARD`, `BLKZEROOUT`).
    fn range_ioctl(&self, request: libc::c_ulong, offset: u64, count: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, count];
        // SAFETY: these ioctls read a u64[2] range, which `range` is.
        let r = unsafe { libc::ioctl(self.fd(), request, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(last_error())
        }
    }

    fn fua(&self, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FUA) {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        // SAFETY: lseek on our own descriptor. Data transfers use positioned
        // I/O, so moving the file offset disturbs no other request.
        let r = unsafe { libc::lseek(self.fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(last_error())
        } else {
            Ok(r as u64)
        }
    }
}

/// A buffer whose `len` bytes start at a `DIRECT_ALIGN`-aligned address,
/// as O_DIRECT requires, carved out of a slightly larger vector.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + DIRECT_ALIGN];
        let start = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        Aligned { buf, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[callbacks]
impl Handle for FileHandle {
    fn get_size(&self) -> Result<u64> {
        if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
            if unsafe { libc::ioctl(self.fd(), BLKGETSIZE64, &mut size) } != 0 {
                return Err(last_error().into());
            }
            Ok(size)
        } else {
            Ok(self.file.metadata()?.size())
        }
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        // With O_DIRECT every transfer must be sector-aligned in offset and
        // length. Requiring 4 KiB requests of clients (the server enforces
        // it) avoids read-modify-write here, which would race between
        // concurrent writes to one block.
        Ok(self.direct.then_some(BlockSize {
            minimum: DIRECT_ALIGN as u32,
            preferred: DIRECT_ALIGN as u32,
            maximum: 32 << 20,
        }))
    }

    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        // Fast methods are tried first; without one we fail at once with
        // ENOTSUP, as the flag asks.
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        // Every connection writes the same file, and fdatasync covers them all.
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(!self.block_device)
    }

    fn is_rotational(&self) -> Result<bool> {
        if !self.block_device {
            return Ok(false);
        }
        let rdev = self.file.metadata()?.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let p = format!("/sys/dev/block/{major}:{minor}/queue/rotational");
        Ok(std::fs::read_to_string(p).is_ok_and(|s| s.trim() == "1"))
    }

    fn local_file(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let eof = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::new(
                    libc::EIO,
                    format!("read at {offset}: unexpected end of file"),
                )
            } else {
                e.into()
            }
        };
        if self.direct {
            // O_DIRECT also needs an aligned buffer in memory.
            let mut b = Aligned::new(buf.len());
            self.file.read_exact_at(b.as_mut(), offset).map_err(eof)?;
            buf.copy_from_slice(b.as_mut());
            Ok(())
        } else {
            self.file.read_exact_at(buf, offset).map_err(eof)
        }
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        if self.direct {
            let mut b = Aligned::new(buf.len());
            b.as_mut().copy_from_slice(buf);
            self.file.write_all_at(b.as_mut(), offset)?;
        } else {
            self.file.write_all_at(buf, offset)?;
        }
        self.fua(flags)
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.file.sync_data()?;
        Ok(())
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // Trim is advisory: where the storage cannot discard, do nothing.
        let r = if self.block_device {
            self.range_ioctl(BLKDISCARD, offset, count)
        } else if self.punch_ok.load(Ordering::Relaxed) {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                count,
            )
        } else {
            Ok(())
        };
        match r {
            Ok(()) => {}
            Err(e) if matches!(errno_of(&e), libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL) => {
                self.punch_ok.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err(e.into()),
        }
        self.fua(flags)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let unsupported =
            |e: &io::Error| matches!(errno_of(e), libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL);
        if self.block_device {
            return match self.range_ioctl(BLKZEROOUT, offset, count) {
                Ok(()) => self.fua(flags),
                Err(e) if unsupported(&e) => Err(Error::errno(libc::ENOTSUP)),
                Err(e) => Err(e.into()),
            };
        }
        if flags.contains(Flags::MAY_TRIM) && self.punch_ok.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                count,
            ) {
                Ok(()) => return self.fua(flags),
                Err(e) if unsupported(&e) => self.punch_ok.store(false, Ordering::Relaxed),
                Err(e) => return Err(e.into()),
            }
        }
        if self.zero_range_ok.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                count,
            ) {
                Ok(()) => return self.fua(flags),
                Err(e) if unsupported(&e) => self.zero_range_ok.store(false, Ordering::Relaxed),
                Err(e) => return Err(e.into()),
            }
        }
        // The server writes zeroes itself, or fails a fast-zero request.
        Err(Error::errno(libc::ENOTSUP))
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, list: &mut ExtentList) -> Result<()> {
        let end = offset + count;
        let mut pos = offset;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d,
                // No data from here to the end of the file.
                Err(e) if errno_of(&e) == libc::ENXIO => end,
                // No SEEK_DATA support: report data.
                Err(e) if errno_of(&e) == libc::EINVAL => return list.add(pos, end - pos, 0),
                Err(e) => return Err(e.into()),
            };
            let (run_end, typ) = if data > pos {
                (data.min(end), EXTENT_HOLE | EXTENT_ZERO)
            } else {
                (self.seek(pos, libc::SEEK_HOLE)?.min(end), 0)
            };
            list.add(pos, run_end - pos, typ)?;
            if flags.contains(Flags::REQ_ONE) {
                break;
            }
            pos = run_end;
        }
        Ok(())
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        // SAFETY: posix_fadvise on our own descriptor; advice only.
        let r = unsafe {
            libc::posix_fadvise(
                self.fd(),
                offset as libc::off_t,
                count as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if r != 0 {
            return Err(Error::new(
                r,
                format!("fadvise: {}", io::Error::from_raw_os_error(r)),
            ));
        }
        Ok(())
    }
}

nbdhost_plugin!(FilePlugin);

#[cfg(test)]
mod tests {
    use super::*;

    struct Temp(PathBuf);
    impl Temp {
        fn new(tag: &str, len: u64) -> Temp {
            let p = std::env::temp_dir().join(format!("nbdhost-file-{tag}-{}", std::process::id()));
            let f = File::create(&p).unwrap();
            f.set_len(len).unwrap();
            Temp(p)
        }
    }
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn write_read_and_zero() {
        let t = Temp::new("rw", 1 << 20);
        let h = FileHandle::open(&t.0, false, false, None).unwrap();
        assert!(h.can_write().unwrap());
        assert_eq!(h.get_size().unwrap(), 1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        h.pwrite(&data, 4000, Flags::FUA).unwrap();
        let mut back = vec![0u8; data.len()];
        h.pread(&mut back, 4000, Flags::empty()).unwrap();
        assert_eq!(back, data);
        match h.zero(100, 4010, Flags::empty()) {
            Ok(()) => {
                h.pread(&mut back, 4000, Flags::empty()).unwrap();
                assert!(back[10..110].iter().all(|&b| b == 0));
                assert_eq!(back[110], data[110]);
            }
            Err(e) => assert_eq!(e.raw_errno(), libc::ENOTSUP),
        }
        let mut past = [0u8; 16];
        assert!(h.pread(&mut past, (1 << 20) - 8, Flags::empty()).is_err());
    }

    #[test]
    fn readonly_open_refuses_writes() {
        let t = Temp::new("ro", 4096);
        let h = FileHandle::open(&t.0, true, false, None).unwrap();
        assert!(!h.can_write().unwrap());
        assert!(h.pwrite(&[1], 0, Flags::empty()).is_err());
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        let mut a = Aligned::new(8192);
        assert_eq!(a.as_mut().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(a.as_mut().len(), 8192);
    }
}
