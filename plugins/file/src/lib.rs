//! The file plugin: serve a regular file or a block device, or (`dir=`)
//! every one of them in a directory, each under its own export name.
//!
//! Every connection opens the file afresh, so `-r` and per-connection
//! read-only opens are honoured by the kernel. Flush and FUA are
//! `fdatasync`; trim punches holes; zeroing uses the file system's
//! zero-range or hole punching (or the block device's zero-out) and leaves
//! writing zeroes to the server when none is available; allocation is read
//! back with `SEEK_DATA`/`SEEK_HOLE`.
//!
//! Requests go through io_uring (`aio=io_uring`, [`uring`] and [`ops`])
//! where the kernel allows it, started on the server's event loops and
//! answered from the ring's thread; otherwise, or with `aio=threads`, the
//! same calls are made synchronously ([`file`]) on the server's worker
//! threads. `cache=none` serves requests of any alignment through bounce
//! buffers and read-modify-write ([`direct`]).

mod direct;
mod file;
mod offload;
mod ops;
mod uring;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use nbdhost_plugin_api::host::{self, LogLevel};
use nbdhost_plugin_api::{
    callbacks, nbdhost_plugin, BlockSize, Error, ExportList, ExtentList, ExtentsRequest, Flags,
    Handle, Plugin, RangeRequest, ReadRequest, Result, Support, WriteRequest,
};

use direct::{Alignment, BouncePool, RangeLock};
use file::{errno_of, Aio, OpenMode};
use offload::Offload;
use ops::Op;
use uring::Ring;

/// An open file and its `cache=none` state, where what waits for a lease
/// without a thread of its own is a request on the ring, an [`Op`].
type FileState = file::FileState<Op>;
type Direct = file::Direct<Op>;

/// The largest request served in one piece.
const MAX_REQUEST: u32 = 32 << 20;

/// `f_type` of the file systems whose files live in memory (linux/magic.h).
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// `aio=`: how requests reach the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AioMode {
    /// io_uring where the kernel allows it (and the file is not in
    /// memory, where a copy on the event loop is faster), else threads.
    #[default]
    Auto,
    /// io_uring, or refuse to start.
    IoUring,
    /// Synchronous calls on the server's worker threads.
    Threads,
}

/// Configuration from the command line, and once serving the ring.
#[derive(Default)]
pub struct FilePlugin {
    path: Option<PathBuf>,
    /// `dir=`: serve the files in it, chosen by export name.
    dir: Option<PathBuf>,
    direct: bool,
    advice: Option<libc::c_int>,
    aio: AioMode,
    /// The file is a regular file on tmpfs or ramfs: every call is a memory
    /// copy that never waits for a device.
    in_memory: bool,
    /// Decided in `get_ready`: requests go through io_uring.
    use_ring: AtomicBool,
    /// Made in `after_fork` when `use_ring`.
    engine: OnceLock<Engine>,
    /// What `cache=none` connections to one file share, by device and
    /// inode.
    direct_files: Mutex<HashMap<(u64, u64), Weak<Direct>>>,
}

/// The ring and the offload threads. The ring goes first when dropped:
/// its requests in flight may still hand work to the offload threads.
struct Engine {
    ring: Ring<Op>,
    offload: Offload,
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
fadvise=normal|random|sequential   Access-pattern hint for the kernel.
aio=auto|io_uring|threads   How requests reach the kernel (default auto:
                io_uring where available, else worker threads).";
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
            "aio" => {
                self.aio = match value {
                    "auto" => AioMode::Auto,
                    "io_uring" | "io-uring" => AioMode::IoUring,
                    "threads" => AioMode::Threads,
                    _ => {
                        return Err(Error::new(
                            libc::EINVAL,
                            format!("aio={value}: expected auto, io_uring or threads"),
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

    fn get_ready(&self) -> Result<()> {
        // Asked here, before the server forks and asks `nonblocking`; the
        // ring itself is made after the fork, with its thread.
        let wanted = match self.aio {
            AioMode::Threads => false,
            AioMode::IoUring => true,
            AioMode::Auto => !self.in_memory,
        };
        if !wanted {
            return Ok(());
        }
        match uring::probe(ops::OPCODES) {
            Ok(()) => {
                self.use_ring.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if self.aio == AioMode::IoUring => {
                Err(Error::new(libc::ENOSYS, format!("aio=io_uring: {e}")))
            }
            Err(e) => {
                host::log(
                    LogLevel::Info,
                    &format!("io_uring is not available ({e}): requests run on worker threads"),
                );
                Ok(())
            }
        }
    }

    fn after_fork(&self) -> Result<()> {
        if !self.ring_wanted() {
            return Ok(());
        }
        let ring = Ring::start(ops::OPCODES)
            .map_err(|e| Error::new(libc::EIO, format!("io_uring: {e}")))?;
        let offload = Offload::start()
            .map_err(|e| Error::new(errno_of(&e), format!("offload threads: {e}")))?;
        let _ = self.engine.set(Engine { ring, offload });
        Ok(())
    }

    fn asynchronous(&self) -> bool {
        // Without the ring (aio=threads, a file in memory, or io_uring
        // refused) the asynchronous methods would only do the synchronous
        // work in the starting call: the server's synchronous path is
        // cheaper for that (its results go back in batches).
        self.ring_wanted()
    }

    fn nonblocking(&self) -> bool {
        // With the ring, starting a request only queues it (or hands a
        // call io_uring has no operation for to the offload threads), so
        // it may start on an event loop. A file in memory is a copy.
        self.in_memory || self.ring_wanted()
    }

    fn unload(&mut self) {
        // Stops the ring's and the offload threads once idle.
        drop(self.engine.take());
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
        let mode = OpenMode {
            readonly,
            direct: self.direct,
            advice: self.advice,
        };
        let aio = self.engine.get().map(|e| Aio {
            ring: e.ring.submitter(),
            offload: e.offload.runner(),
        });
        let (state, writable) =
            FileState::open(&path, &mode, |f, bdev| self.direct_state(f, bdev), aio)?;
        Ok(FileHandle {
            state: Arc::new(state),
            path,
            writable,
        })
    }
}

impl FilePlugin {
    fn ring_wanted(&self) -> bool {
        self.use_ring.load(Ordering::Relaxed)
    }

    /// The `cache=none` state of the file `f`, shared with every other
    /// connection that has it open.
    fn direct_state(&self, f: &File, block_device: bool) -> Arc<Direct> {
        let key = f.metadata().map_or((0, 0), |m| (m.dev(), m.ino()));
        let mut files = self.direct_files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = files.get(&key).and_then(Weak::upgrade) {
            return d;
        }
        files.retain(|_, w| w.strong_count() > 0);
        let d = Arc::new(Direct {
            align: Alignment::of(f, block_device),
            locks: RangeLock::default(),
            pool: BouncePool::default(),
        });
        files.insert(key, Arc::downgrade(&d));
        d
    }
}

/// One connection's open file.
pub struct FileHandle {
    state: Arc<FileState>,
    /// Absolute: `file=` is made absolute at configuration, `dir=` is
    /// canonical.
    path: PathBuf,
    writable: bool,
}

impl FileHandle {
    /// Requests go through the ring.
    fn on_ring(&self) -> bool {
        self.state.aio.is_some()
    }
}

#[callbacks]
impl Handle for FileHandle {
    fn get_size(&self) -> Result<u64> {
        self.state.get_size()
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        // With O_DIRECT any request is served (unaligned ones through a
        // bounce buffer, partial blocks by read-modify-write), but aligned
        // ones are cheaper: say which.
        Ok(self.state.direct.as_ref().map(|d| BlockSize {
            minimum: 1,
            preferred: (d.align.offset as u32).max(4096),
            maximum: MAX_REQUEST,
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
        Ok(!self.state.block_device)
    }

    fn is_rotational(&self) -> Result<bool> {
        if !self.state.block_device {
            return Ok(false);
        }
        let rdev = self.state.file.metadata()?.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let p = format!("/sys/dev/block/{major}:{minor}/queue/rotational");
        Ok(std::fs::read_to_string(p).is_ok_and(|s| s.trim() == "1"))
    }

    fn local_file(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.state.pread(buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.state.pwrite(buf, offset, flags)
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.state.flush()
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.state.trim(count, offset, flags)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.state.zero(count, offset, flags)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, list: &mut ExtentList) -> Result<()> {
        self.state.extents(count, offset, flags, list)
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.state.cache(count, offset)
    }

    // Without the ring, each asynchronous call runs its synchronous twin
    // where the server started it: a worker thread, or the event loop for
    // a file in memory.

    fn async_pread(&self, mut req: ReadRequest) {
        if self.on_ring() {
            return ops::read(&self.state, req);
        }
        let offset = req.offset();
        let r = self.state.pread(req.buf(), offset);
        req.complete(r);
    }

    fn async_pwrite(&self, req: WriteRequest) {
        if self.on_ring() {
            return ops::write(&self.state, req);
        }
        let r = self.state.pwrite(req.buf(), req.offset(), req.flags());
        req.complete(r);
    }

    fn async_flush(&self, req: RangeRequest) {
        if self.on_ring() {
            return ops::flush(&self.state, req);
        }
        req.complete(self.state.flush());
    }

    fn async_trim(&self, req: RangeRequest) {
        match (self.on_ring(), self.state.block_device) {
            (true, false) => ops::trim_or_zero(&self.state, req, false),
            (true, true) => ops::offloaded(&self.state, req, false),
            (false, _) => {
                let r = self.state.trim(req.count(), req.offset(), req.flags());
                req.complete(r);
            }
        }
    }

    fn async_zero(&self, req: RangeRequest) {
        match (self.on_ring(), self.state.block_device) {
            (true, false) => ops::trim_or_zero(&self.state, req, true),
            (true, true) => ops::offloaded(&self.state, req, true),
            (false, _) => {
                let r = self.state.zero(req.count(), req.offset(), req.flags());
                req.complete(r);
            }
        }
    }

    fn async_cache(&self, req: RangeRequest) {
        if self.on_ring() {
            return ops::cache(&self.state, req);
        }
        let r = self.state.cache(req.count(), req.offset());
        req.complete(r);
    }

    fn async_extents(&self, mut req: ExtentsRequest) {
        if self.on_ring() {
            return ops::extents(&self.state, req);
        }
        let (count, offset, flags) = (req.count(), req.offset(), req.flags());
        let r = self.state.extents(count, offset, flags, req.list());
        req.complete(r);
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

    fn open(t: &Temp, readonly: bool, direct: bool) -> FileHandle {
        let plugin = FilePlugin::default();
        let mode = OpenMode {
            readonly,
            direct,
            advice: None,
        };
        let (state, writable) =
            FileState::open(&t.0, &mode, |f, b| plugin.direct_state(f, b), None).unwrap();
        FileHandle {
            state: Arc::new(state),
            path: t.0.clone(),
            writable,
        }
    }

    #[test]
    fn write_read_and_zero() {
        let t = Temp::new("rw", 1 << 20);
        let h = open(&t, false, false);
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
        let h = open(&t, true, false);
        assert!(!h.can_write().unwrap());
        assert!(h.pwrite(&[1], 0, Flags::empty()).is_err());
    }

    #[test]
    fn unaligned_direct_writes_keep_their_neighbours() {
        // O_DIRECT needs a disk file system: skip where the temporary
        // directory has none.
        let t = Temp::new("direct", 1 << 20);
        let plugin = FilePlugin::default();
        let mode = OpenMode {
            readonly: false,
            direct: true,
            advice: None,
        };
        let Ok((state, _)) = FileState::open(&t.0, &mode, |f, b| plugin.direct_state(f, b), None)
        else {
            eprintln!("SKIP: no O_DIRECT in {}", t.0.display());
            return;
        };
        let data: Vec<u8> = (0..(1 << 20) as u32).map(|i| (i * 13 + 5) as u8).collect();
        std::fs::write(&t.0, &data).unwrap();
        let mut model = data.clone();
        for (i, (off, len)) in [
            (1000, 1000),
            (4095, 2),
            (5000, 100_000),
            (0, 1),
            (8192, 4096),
        ]
        .into_iter()
        .enumerate()
        {
            let chunk = vec![i as u8 + 1; len];
            state.pwrite(&chunk, off, Flags::empty()).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&chunk);
            let mut back = vec![0u8; len + 10];
            let at = off.saturating_sub(5);
            state.pread(&mut back, at).unwrap();
            assert_eq!(back, model[at as usize..at as usize + len + 10]);
        }
        assert_eq!(std::fs::read(&t.0).unwrap(), model);
    }
}
