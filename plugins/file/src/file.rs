//! One open file or block device and its synchronous operations: the
//! path of `aio=threads` (on the server's worker pool), of files in
//! memory, of calls io_uring has no operation for, and of filters that
//! call the plugin synchronously.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::Thread;

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{Error, ExtentList, Flags, Result};

use crate::direct::{Alignment, BouncePool, Ends, Lease, RangeLock, Span};
use crate::offload::Runner;
use crate::uring::Submitter;

/// `BLKDISCARD` and `BLKZEROOUT` from linux/fs.h.
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// The errno of `e`, `EIO` if it has none.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// Errors that say the file system or device cannot do an operation.
pub fn unsupported(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
}

/// A request that waits for a lease without holding up a thread, and
/// starts when it is granted: on the ring, `ops::Op`.
///
/// The types here are generic over it rather than naming `ops::Op`,
/// which is built on them: so `ops` imports this module and not the
/// other way round.
pub trait Start {
    /// Go on now that the lease is granted.
    fn start(self);
}

/// What `cache=none` shares between every connection to one file: its
/// alignment, the leases of its writes, and bounce buffers.
pub struct Direct<O> {
    pub align: Alignment,
    pub locks: RangeLock<Waiter<O>>,
    pub pool: BouncePool,
}

/// Who waits for a lease of a [`Direct`] file.
pub enum Waiter<O> {
    /// A thread in a synchronous call, parked until `granted`.
    Thread(Arc<Parked>),
    /// A request started on the ring, started for real when granted.
    Op(O),
}

impl<O: Start> Waiter<O> {
    /// The lease is granted: go on.
    pub fn go(self) {
        match self {
            Waiter::Thread(p) => {
                p.granted.store(true, Ordering::Release);
                p.thread.unpark();
            }
            Waiter::Op(op) => op.start(),
        }
    }
}

/// A thread waiting in [`FileState::pwrite`] (and the others) for a
/// lease.
pub struct Parked {
    thread: Thread,
    granted: AtomicBool,
}

/// The ring and threads a file's asynchronous requests use.
pub struct Aio<O> {
    pub ring: Submitter<O>,
    pub offload: Runner,
}

/// An open file, shared by its handle and the requests in flight on it.
pub struct FileState<O> {
    pub file: File,
    /// `cache=none` on a file whose size is not a multiple of its
    /// alignment: the same file without `O_DIRECT`, for writes that reach
    /// into its partial last block, which `O_DIRECT` could only write
    /// whole, growing the file.
    pub tail: Option<File>,
    /// The size when opened.
    pub size: u64,
    pub block_device: bool,
    pub direct: Option<Arc<Direct<O>>>,
    pub aio: Option<Aio<O>>,
    /// Cleared once the file system says it cannot do these, so that later
    /// requests skip straight to what works.
    pub punch_ok: AtomicBool,
    pub zero_range_ok: AtomicBool,
    /// Reads through the page cache may first try `RWF_NOWAIT` where they
    /// start (see [`FileState::read_cached`]); cleared once the file
    /// system refuses the flag.
    pub nowait_ok: AtomicBool,
}

/// How a file is to be opened.
pub struct OpenMode {
    pub readonly: bool,
    pub direct: bool,
    pub advice: Option<libc::c_int>,
}

impl<O: Start> FileState<O> {
    /// Open `path`; `direct_for` gives the shared `cache=none` state of
    /// the file opened (by device and inode).
    pub fn open(
        path: &Path,
        mode: &OpenMode,
        direct_for: impl FnOnce(&File, bool) -> Arc<Direct<O>>,
        aio: Option<Aio<O>>,
    ) -> Result<(Self, bool)> {
        let mut flags = libc::O_CLOEXEC;
        if mode.direct {
            flags |= libc::O_DIRECT;
        }
        let open = |write: bool, flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(flags)
                .open(path)
        };
        let (file, writable) = if mode.readonly {
            (open(false, flags), false)
        } else {
            match open(true, flags) {
                Ok(f) => (Ok(f), true),
                // A file we may only read is served read-only.
                Err(e) if matches!(errno_of(&e), libc::EACCES | libc::EROFS | libc::EPERM) => {
                    (open(false, flags), false)
                }
                Err(e) => (Err(e), true),
            }
        };
        let file = file.map_err(|e| {
            let hint = if mode.direct && errno_of(&e) == libc::EINVAL {
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
        if let Some(a) = mode.advice {
            // SAFETY: posix_fadvise on our own descriptor; advice only.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, a) };
        }
        let mut state = Self {
            file,
            tail: None,
            size: 0,
            block_device,
            direct: None,
            aio,
            punch_ok: AtomicBool::new(!block_device),
            zero_range_ok: AtomicBool::new(!block_device),
            nowait_ok: AtomicBool::new(!mode.direct),
        };
        state.size = state.get_size()?;
        if mode.direct {
            let d = direct_for(&state.file, block_device);
            if state.size % d.align.offset != 0 && writable {
                let t = open(true, libc::O_CLOEXEC)
                    .map_err(|e| Error::new(errno_of(&e), format!("{}: {e}", path.display())))?;
                state.tail = Some(t);
            }
            state.direct = Some(d);
        }
        Ok((state, writable))
    }

    /// The descriptor, for io_uring entries.
    pub fn fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }

    /// The size now (a block device asks the kernel).
    pub fn get_size(&self) -> Result<u64> {
        if self.block_device {
            /// `BLKGETSIZE64` from linux/fs.h.
            const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
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

    /// The lease a write-type request of `count` bytes at `offset` takes
    /// on a `cache=none` file, exclusive when it must read-modify-write,
    /// and whether it goes to the tail file.
    pub fn lease(&self, d: &Direct<O>, offset: u64, count: u64, rmw: bool) -> Lease {
        let a = d.align.offset;
        let span = Span {
            start: offset / a * a,
            end: (offset + count).div_ceil(a) * a,
        };
        Lease {
            span,
            exclusive: rmw && !self.reaches_tail(span),
        }
    }

    /// Whether `span` runs past the end of a file whose last block is
    /// partial: such writes go to the tail file.
    pub fn reaches_tail(&self, span: Span) -> bool {
        self.tail.is_some() && span.end > self.size
    }

    /// Take `lease`, waiting here if need be.
    fn hold(&self, d: &Direct<O>, lease: Lease) {
        let me = Arc::new(Parked {
            thread: std::thread::current(),
            granted: AtomicBool::new(false),
        });
        if d.locks.acquire(lease, Waiter::Thread(me.clone())).is_none() {
            while !me.granted.load(Ordering::Acquire) {
                std::thread::park();
            }
        }
    }

    /// Read what of `buf` the page cache already holds at `offset`,
    /// without waiting for storage (`preadv2` with `RWF_NOWAIT`): how many
    /// bytes, or `None` when nothing could be read that way. Served from
    /// memory, a read needs no trip through the ring and back.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> Option<usize> {
        if !self.nowait_ok.load(Ordering::Relaxed) {
            return None;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over `buf`, writable for its length, on our
        // own descriptor.
        let n =
            unsafe { libc::preadv2(self.fd(), &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
        if n > 0 {
            return Some(n as usize);
        }
        if n < 0 && last_error().raw_os_error() != Some(libc::EAGAIN) {
            // EOPNOTSUPP or EINVAL: this file system cannot do it.
            self.nowait_ok.store(false, Ordering::Relaxed);
        }
        None
    }

    /// Read `buf.len()` bytes at `offset`, through a bounce buffer when
    /// `O_DIRECT` cannot take `buf` as it is.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(d) = self.direct.as_deref() else {
            return self.file.read_exact_at(buf, offset).map_err(eof(offset));
        };
        if d.align.fits(buf.as_ptr() as usize, offset, buf.len()) {
            return self.file.read_exact_at(buf, offset).map_err(eof(offset));
        }
        let span = d.align.span(offset, buf.len());
        let mut b = d.pool.get(span.len());
        let got = read_direct(&self.file, b.as_mut_slice(), span.start)?;
        let skip = (offset - span.start) as usize;
        if got < skip + buf.len() {
            return Err(eof(offset)(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.copy_from_slice(&b.as_slice()[skip..skip + buf.len()]);
        d.pool.put(b);
        Ok(())
    }

    /// Write `buf` at `offset` (with `cache=none`, under a lease, by
    /// read-modify-write where partial blocks need it), then FUA.
    pub fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        match self.direct.as_deref() {
            None => self.file.write_all_at(buf, offset)?,
            Some(d) => {
                let rmw = !d.align.fits(0, offset, buf.len());
                let lease = self.lease(d, offset, buf.len() as u64, rmw);
                self.hold(d, lease);
                let r = self.pwrite_direct(d, lease, buf, offset);
                d.locks.release(lease, Waiter::go);
                r?;
            }
        }
        self.fua(flags)
    }

    /// A write to a `cache=none` file, under `lease`.
    fn pwrite_direct(&self, d: &Direct<O>, lease: Lease, buf: &[u8], offset: u64) -> Result<()> {
        let span = lease.span;
        if let Some(t) = self.tail.as_ref().filter(|_| self.reaches_tail(span)) {
            return Ok(t.write_all_at(buf, offset)?);
        }
        if d.align.fits(buf.as_ptr() as usize, offset, buf.len()) {
            return Ok(self.file.write_all_at(buf, offset)?);
        }
        let mut b = d.pool.get(span.len());
        let block = d.align.offset as usize;
        let bytes = b.as_mut_slice();
        // Read-modify-write: the partial blocks at either end keep what
        // the request does not cover.
        let ends = Ends::of(&d.align, span, offset, buf.len());
        if ends.head {
            read_block(&self.file, &mut bytes[..block], span.start)?;
        }
        if ends.tail {
            let last = bytes.len() - block;
            read_block(&self.file, &mut bytes[last..], span.end - block as u64)?;
        }
        let skip = (offset - span.start) as usize;
        let end = skip + buf.len();
        bytes[skip..end].copy_from_slice(buf);
        self.file.write_all_at(b.as_slice(), span.start)?;
        d.pool.put(b);
        Ok(())
    }

    /// `fdatasync` if `flags` ask for FUA.
    pub fn fua(&self, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FUA) {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// `fdatasync`.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_data()?;
        Ok(())
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

    /// Run `f` under a shared lease of the range on a `cache=none` file,
    /// so that it does not land in the middle of a read-modify-write.
    fn leased<T>(&self, count: u64, offset: u64, f: impl FnOnce() -> T) -> T {
        let Some(d) = self.direct.as_deref() else {
            return f();
        };
        let lease = self.lease(d, offset, count, false);
        self.hold(d, lease);
        let r = f();
        d.locks.release(lease, Waiter::go);
        r
    }

    /// Punch a hole (discard on a block device), where the storage can.
    pub fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // Trim is advisory: where the storage cannot discard, do nothing.
        let r = self.leased(count, offset, || {
            if self.block_device {
                self.range_ioctl(BLKDISCARD, offset, count)
            } else if self.punch_ok.load(Ordering::Relaxed) {
                self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    count,
                )
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => {}
            Err(e) if unsupported(errno_of(&e)) => {
                self.punch_ok.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err(e.into()),
        }
        self.fua(flags)
    }

    /// Zero by a fast means, or fail with `ENOTSUP` so the server writes
    /// zeroes.
    pub fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let zeroed = self.leased(count, offset, || self.zero_range(count, offset, flags))?;
        if !zeroed {
            // The server writes zeroes itself, or fails a fast-zero request.
            return Err(Error::errno(libc::ENOTSUP));
        }
        self.fua(flags)
    }

    /// Zero by the fastest means the storage has; false if it has none.
    fn zero_range(&self, count: u64, offset: u64, flags: Flags) -> Result<bool> {
        let failed = |e: io::Error| -> Result<bool> {
            if unsupported(errno_of(&e)) {
                Ok(false)
            } else {
                Err(e.into())
            }
        };
        if self.block_device {
            return match self.range_ioctl(BLKZEROOUT, offset, count) {
                Ok(()) => Ok(true),
                Err(e) => failed(e),
            };
        }
        if flags.contains(Flags::MAY_TRIM) && self.punch_ok.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                count,
            ) {
                Ok(()) => return Ok(true),
                Err(e) if unsupported(errno_of(&e)) => {
                    self.punch_ok.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.zero_range_ok.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                count,
            ) {
                Ok(()) => return Ok(true),
                Err(e) if unsupported(errno_of(&e)) => {
                    self.zero_range_ok.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
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

    /// Allocation of the range, from `SEEK_DATA` and `SEEK_HOLE`.
    pub fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
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

    /// `POSIX_FADV_WILLNEED` over the range.
    pub fn cache(&self, count: u64, offset: u64) -> Result<()> {
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

/// The error of a read at `offset` that met the end of the file.
pub fn eof(offset: u64) -> impl Fn(io::Error) -> Error {
    move |e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::new(
                libc::EIO,
                format!("read at {offset}: unexpected end of file"),
            )
        } else {
            e.into()
        }
    }
}

/// Read into an aligned `buf` at aligned `offset` with `O_DIRECT`, up to
/// the end of the file: returns how much was read. Only the end of the
/// file makes a read of a regular file or block device short (and going
/// on from an unaligned count would fail), so a short read ends it.
fn read_direct(file: &File, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(n) => {
                done += n;
                if done < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Read one whole block of a read-modify-write.
fn read_block(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    if read_direct(file, buf, offset)? < buf.len() {
        return Err(Error::new(
            libc::EIO,
            format!("read-modify-write at {offset}: the block is past the end of the file"),
        ));
    }
    Ok(())
}
