//! Requests on the ring: each is an [`Op`] that prepares its next entry,
//! and on that entry's completion answers the client or goes on (the
//! rest of a short transfer, the blocks a read-modify-write needs, the
//! next way to zero, the `fdatasync` of FUA after `fallocate`).
//!
//! Flush and FUA are `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`,
//! except that a FUA write is one write with `RWF_DSYNC`; trim and zero
//! are `IORING_OP_FALLOCATE`, cache `IORING_OP_FADVISE`, all as the
//! synchronous path maps them. What has no operation (extents, a block
//! device's discard and zero-out) runs on the offload threads.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use nbdhost_plugin_api::{Error, ExtentsRequest, Flags, RangeRequest, ReadRequest, WriteRequest};

use crate::direct::{Bounce, Ends, Lease, Span};
use crate::file::{unsupported, Direct, FileState, Start, Waiter};
use crate::uring::{Opcodes, Pending, Submitter};

/// The operations requests use, checked when the ring is made.
pub const OPCODES: &Opcodes = &[
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::Fadvise::CODE, "FADVISE"),
];

/// The most one entry transfers or advises; a longer request goes on in
/// further entries (lengths in an entry are 32 bits).
const CHUNK: usize = 1 << 30;

/// The longest read first tried from the page cache where it starts (an
/// event loop, often): longer copies would hold the loop up, and go to
/// the ring, whose thread tries the page cache first as well.
const NOWAIT_MAX: usize = 128 << 10;

/// A request in flight on the ring, with the file it is for (kept open
/// until it completes).
pub struct Op {
    file: Arc<FileState<Op>>,
    work: Work,
}

enum Work {
    Read(Reading),
    Write(Writing),
    Range(Ranging),
}

/// A read into the request's buffer, or into an aligned bounce buffer
/// covering `span` on a `cache=none` file.
struct Reading {
    req: ReadRequest,
    bounce: Option<(Span, Bounce)>,
    done: usize,
}

/// A write, and on a `cache=none` file the lease it holds and, unless
/// it is aligned, the bounce buffer it goes through.
struct Writing {
    req: WriteRequest,
    lease: Option<Lease>,
    bounce: Option<(Span, Bounce)>,
    stage: WriteStage,
    /// To the tail file (see [`FileState::tail`]).
    tail: bool,
    done: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteStage {
    /// Reading the partial first block of a read-modify-write.
    Head,
    /// Reading the partial last block.
    Tail,
    Data,
}

/// Flush, trim, zero or cache.
struct Ranging {
    req: RangeRequest,
    /// A zero request, rather than a trim (for which a file system that
    /// cannot punch holes does nothing).
    zero: bool,
    lease: Option<Lease>,
    stage: RangeStage,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RangeStage {
    /// `fallocate` punching a hole.
    Punch,
    /// `fallocate` zeroing a range.
    ZeroRange,
    /// The storage can zero by no faster means than writing zeroes.
    NoZero,
    /// `fdatasync`, of a flush or after a FUA trim or zero.
    Sync,
    /// `POSIX_FADV_WILLNEED` over the range from `done` on.
    Advise {
        done: u64,
    },
    Done,
}

fn errno_error(errno: i32, what: std::fmt::Arguments) -> Error {
    Error::new(
        errno,
        format!("{what}: {}", io::Error::from_raw_os_error(errno)),
    )
}

/// Start a read.
pub fn read(file: &Arc<FileState<Op>>, mut req: ReadRequest) {
    let (addr, offset, len) = (req.as_mut_ptr() as usize, req.offset(), req.len());
    let bounce = file.direct.as_deref().and_then(|d| {
        (!d.align.fits(addr, offset, len)).then(|| {
            let span = d.align.span(offset, len);
            (span, d.pool.get(span.len()))
        })
    });
    let mut done = 0;
    if bounce.is_none() && len <= NOWAIT_MAX {
        match file.read_cached(req.buf(), offset) {
            Some(n) if n == len => return req.complete(Ok(())),
            Some(n) => done = n,
            None => {}
        }
    }
    let r = Reading { req, bounce, done };
    Op::new(file, Work::Read(r)).start();
}

/// Start a write.
pub fn write(file: &Arc<FileState<Op>>, req: WriteRequest) {
    let (offset, len) = (req.offset(), req.len());
    let mut w = Writing {
        lease: None,
        bounce: None,
        stage: WriteStage::Data,
        tail: false,
        done: 0,
        req,
    };
    let Some(d) = file.direct.as_deref() else {
        return Op::new(file, Work::Write(w)).start();
    };
    let rmw = !d.align.fits(0, offset, len);
    let lease = file.lease(d, offset, len as u64, rmw);
    w.lease = Some(lease);
    if file.reaches_tail(lease.span) {
        w.tail = true;
    } else if !d.align.fits(w.req.as_ptr() as usize, offset, len) {
        let ends = Ends::of(&d.align, lease.span, offset, len);
        w.stage = if ends.head {
            WriteStage::Head
        } else if ends.tail {
            WriteStage::Tail
        } else {
            WriteStage::Data
        };
        w.bounce = Some((lease.span, d.pool.get(lease.span.len())));
        if w.stage == WriteStage::Data {
            w.fill_bounce();
        }
    }
    Op::new(file, Work::Write(w)).leased(d, lease);
}

/// Start a flush.
pub fn flush(file: &Arc<FileState<Op>>, req: RangeRequest) {
    let r = Ranging {
        req,
        zero: false,
        lease: None,
        stage: RangeStage::Sync,
    };
    Op::new(file, Work::Range(r)).start();
}

/// Start a trim or zero of a regular file (a block device's go to the
/// offload threads).
pub fn trim_or_zero(file: &Arc<FileState<Op>>, req: RangeRequest, zero: bool) {
    let punch = file.punch_ok.load(Ordering::Relaxed);
    let stage = if !zero {
        if punch {
            RangeStage::Punch
        } else {
            fua_or_done(req.flags())
        }
    } else if punch && req.flags().contains(Flags::MAY_TRIM) {
        RangeStage::Punch
    } else if file.zero_range_ok.load(Ordering::Relaxed) {
        RangeStage::ZeroRange
    } else {
        RangeStage::NoZero
    };
    let mut r = Ranging {
        zero,
        lease: None,
        stage,
        req,
    };
    let Some(d) = file.direct.as_deref() else {
        return Op::new(file, Work::Range(r)).start();
    };
    let lease = file.lease(d, r.req.offset(), r.req.count(), false);
    r.lease = Some(lease);
    Op::new(file, Work::Range(r)).leased(d, lease);
}

/// Start a cache request.
pub fn cache(file: &Arc<FileState<Op>>, req: RangeRequest) {
    let r = Ranging {
        req,
        zero: false,
        lease: None,
        stage: RangeStage::Advise { done: 0 },
    };
    Op::new(file, Work::Range(r)).start();
}

/// Run an extents request on the offload threads.
pub fn extents(file: &Arc<FileState<Op>>, mut req: ExtentsRequest) {
    let Some(aio) = &file.aio else {
        return req.complete(Err(Error::errno(libc::EIO)));
    };
    let file = file.clone();
    aio.offload.run(move || {
        let (count, offset, flags) = (req.count(), req.offset(), req.flags());
        let r = file.extents(count, offset, flags, req.list());
        req.complete(r);
    });
}

/// Run a block device's trim or zero on the offload threads.
pub fn offloaded(file: &Arc<FileState<Op>>, req: RangeRequest, zero: bool) {
    let Some(aio) = &file.aio else {
        return req.complete(Err(Error::errno(libc::EIO)));
    };
    let file = file.clone();
    aio.offload.run(move || {
        let (count, offset, flags) = (req.count(), req.offset(), req.flags());
        let r = if zero {
            file.zero(count, offset, flags)
        } else {
            file.trim(count, offset, flags)
        };
        req.complete(r);
    });
}

fn fua_or_done(flags: Flags) -> RangeStage {
    if flags.contains(Flags::FUA) {
        RangeStage::Sync
    } else {
        RangeStage::Done
    }
}

impl Writing {
    /// Put the request's data into the bounce buffer, over the blocks
    /// read for a read-modify-write.
    fn fill_bounce(&mut self) {
        if let Some((span, b)) = &mut self.bounce {
            let skip = (self.req.offset() - span.start) as usize;
            let data = self.req.buf();
            b.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data);
        }
    }
}

impl Op {
    fn new(file: &Arc<FileState<Op>>, work: Work) -> Op {
        Op {
            file: file.clone(),
            work,
        }
    }

    /// Start once `lease` is granted: now, or when the write holding it
    /// up completes.
    fn leased(self, d: &Direct<Op>, lease: Lease) {
        if let Some(Waiter::Op(op)) = d.locks.acquire(lease, Waiter::Op(self)) {
            op.start();
        }
    }

    /// Submit the entry for the current stage, or answer.
    fn proceed(mut self, ring: &Submitter<Op>) {
        match self.entry() {
            Some(e) => ring.submit(e, self),
            None => {
                let r = match &self.work {
                    Work::Range(r) if r.stage == RangeStage::NoZero => {
                        Err(Error::errno(libc::ENOTSUP))
                    }
                    _ => Ok(()),
                };
                self.end(r);
            }
        }
    }

    /// The entry of the current stage; `None` when there is nothing left
    /// to do.
    fn entry(&mut self) -> Option<squeue::Entry> {
        let fd = types::Fd(self.file.fd());
        match &mut self.work {
            Work::Read(r) => {
                let (ptr, at, left) = match &mut r.bounce {
                    Some((span, b)) => (b.as_mut_ptr(), span.start, span.len()),
                    None => (r.req.as_mut_ptr(), r.req.offset(), r.req.len()),
                };
                let n = (left - r.done).min(CHUNK) as u32;
                // The pointer stays in the buffer: `done` < its length.
                let ptr = ptr.wrapping_add(r.done);
                Some(
                    opcode::Read::new(fd, ptr, n)
                        .offset(at + r.done as u64)
                        .build(),
                )
            }
            Work::Write(w) => {
                let block = self.file.direct.as_ref().map_or(0, |d| d.align.offset) as u32;
                match (w.stage, &mut w.bounce) {
                    (WriteStage::Head, Some((span, b))) => Some(
                        opcode::Read::new(fd, b.as_mut_ptr(), block)
                            .offset(span.start)
                            .build(),
                    ),
                    (WriteStage::Tail, Some((span, b))) => {
                        let last = span.len() - block as usize;
                        Some(
                            opcode::Read::new(fd, b.as_mut_ptr().wrapping_add(last), block)
                                .offset(span.end - u64::from(block))
                                .build(),
                        )
                    }
                    _ => {
                        let (ptr, at, len) = match &mut w.bounce {
                            Some((span, b)) => {
                                (b.as_mut_ptr().cast_const(), span.start, span.len())
                            }
                            None => (w.req.as_ptr(), w.req.offset(), w.req.len()),
                        };
                        let fd = match (&self.file.tail, w.tail) {
                            (Some(t), true) => types::Fd(std::os::fd::AsRawFd::as_raw_fd(t)),
                            _ => fd,
                        };
                        let dsync = if w.req.flags().contains(Flags::FUA) {
                            libc::RWF_DSYNC
                        } else {
                            0
                        };
                        let n = (len - w.done).min(CHUNK) as u32;
                        Some(
                            opcode::Write::new(fd, ptr.wrapping_add(w.done), n)
                                .offset(at + w.done as u64)
                                .rw_flags(dsync)
                                .build(),
                        )
                    }
                }
            }
            Work::Range(r) => {
                let (count, offset) = (r.req.count(), r.req.offset());
                let fallocate = |mode| {
                    opcode::Fallocate::new(fd, count)
                        .offset(offset)
                        .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
                        .build()
                };
                match r.stage {
                    RangeStage::Punch => Some(fallocate(libc::FALLOC_FL_PUNCH_HOLE)),
                    RangeStage::ZeroRange => Some(fallocate(libc::FALLOC_FL_ZERO_RANGE)),
                    RangeStage::Sync => Some(
                        opcode::Fsync::new(fd)
                            .flags(types::FsyncFlags::DATASYNC)
                            .build(),
                    ),
                    RangeStage::Advise { done } if done < count => {
                        let n = (count - done).min(CHUNK as u64);
                        Some(
                            opcode::Fadvise::new(fd, n as libc::off_t, libc::POSIX_FADV_WILLNEED)
                                .offset(offset + done)
                                .build(),
                        )
                    }
                    RangeStage::Advise { .. } | RangeStage::NoZero | RangeStage::Done => None,
                }
            }
        }
    }

    /// Answer the request with `r`, giving back what it held.
    fn end(self, r: nbdhost_plugin_api::Result<()>) {
        let Op { file, work } = self;
        let direct = file.direct.as_deref();
        let release = |lease: Option<Lease>| {
            if let (Some(d), Some(lease)) = (direct, lease) {
                d.locks.release(lease, Waiter::go);
            }
        };
        let put = |bounce: Option<(Span, Bounce)>| {
            if let (Some(d), Some((_, b))) = (direct, bounce) {
                d.pool.put(b);
            }
        };
        match work {
            Work::Read(Reading {
                mut req, bounce, ..
            }) => {
                if let (Ok(()), Some((span, b))) = (&r, &bounce) {
                    let skip = (req.offset() - span.start) as usize;
                    let n = req.len();
                    req.buf().copy_from_slice(&b.as_slice()[skip..skip + n]);
                }
                put(bounce);
                req.complete(r);
            }
            Work::Write(w) => {
                release(w.lease);
                put(w.bounce);
                w.req.complete(r);
            }
            Work::Range(g) => {
                release(g.lease);
                g.req.complete(r);
            }
        }
    }
}

impl Start for Op {
    /// Submit the first entry (or answer at once when none is needed).
    fn start(self) {
        match &self.file.aio {
            Some(aio) => {
                let ring = aio.ring.clone();
                self.proceed(&ring);
            }
            None => self.end(Err(Error::errno(libc::EIO))),
        }
    }
}

impl Pending for Op {
    fn complete(mut self, res: i32, ring: &Submitter<Op>) {
        let n = if res < 0 {
            let errno = -res;
            let e = match &self.work {
                Work::Read(r) => errno_error(errno, format_args!("read at {}", r.req.offset())),
                Work::Write(w) => errno_error(errno, format_args!("write at {}", w.req.offset())),
                Work::Range(g) => match g.stage {
                    RangeStage::Punch | RangeStage::ZeroRange if unsupported(errno) => {
                        return self.unsupported(ring);
                    }
                    RangeStage::Sync => errno_error(errno, format_args!("fdatasync")),
                    _ => errno_error(errno, format_args!("fallocate at {}", g.req.offset())),
                },
            };
            return self.end(Err(e));
        } else {
            res as usize
        };
        let block = self.file.direct.as_ref().map_or(0, |d| d.align.offset) as usize;
        match &mut self.work {
            Work::Read(r) => {
                r.done += n;
                let (total, wanted) = match &r.bounce {
                    // Bytes up to the end of the request's range will do.
                    Some((span, _)) => (
                        span.len(),
                        (r.req.offset() + r.req.len() as u64 - span.start) as usize,
                    ),
                    None => (r.req.len(), r.req.len()),
                };
                if r.done < total && n != 0 && (r.bounce.is_none() || n % block == 0) {
                    return self.proceed(ring);
                }
                // A short read ends at the end of the file.
                if r.done < wanted {
                    let at = r.req.offset();
                    let e = Error::new(libc::EIO, format!("read at {at}: unexpected end of file"));
                    return self.end(Err(e));
                }
            }
            Work::Write(w) => {
                match w.stage {
                    WriteStage::Head | WriteStage::Tail => {
                        if n < block {
                            let at = w.req.offset();
                            let e = Error::new(
                            libc::EIO,
                            format!("read-modify-write at {at}: the block is past the end of the file"),
                        );
                            return self.end(Err(e));
                        }
                        let tail_too = w.stage == WriteStage::Head
                            && w.bounce.as_ref().is_some_and(|(span, _)| {
                                let end = w.req.offset() + w.req.len() as u64;
                                end != span.end && span.len() > block
                            });
                        if tail_too {
                            w.stage = WriteStage::Tail;
                        } else {
                            w.stage = WriteStage::Data;
                            w.fill_bounce();
                        }
                        return self.proceed(ring);
                    }
                    WriteStage::Data => {
                        let total = w.bounce.as_ref().map_or(w.req.len(), |(s, _)| s.len());
                        w.done += n;
                        if n == 0 && w.done < total {
                            let at = w.req.offset();
                            let e = Error::new(libc::EIO, format!("write at {at}: no progress"));
                            return self.end(Err(e));
                        }
                        if w.done < total {
                            return self.proceed(ring);
                        }
                    }
                }
            }
            Work::Range(g) => {
                g.stage = match g.stage {
                    RangeStage::Punch | RangeStage::ZeroRange => fua_or_done(g.req.flags()),
                    RangeStage::Advise { done } => RangeStage::Advise {
                        done: done + (g.req.count() - done).min(CHUNK as u64),
                    },
                    _ => RangeStage::Done,
                };
                return self.proceed(ring);
            }
        }
        self.end(Ok(()))
    }
}

impl Op {
    /// `fallocate` said the file system cannot punch holes or zero
    /// ranges: remember it, and go on as the synchronous path does.
    fn unsupported(mut self, ring: &Submitter<Op>) {
        let file = self.file.clone();
        let Work::Range(g) = &mut self.work else {
            return self.end(Err(Error::errno(libc::EIO)));
        };
        match g.stage {
            RangeStage::Punch => {
                file.punch_ok.store(false, Ordering::Relaxed);
                g.stage = if !g.zero {
                    // Trim is advisory.
                    fua_or_done(g.req.flags())
                } else if file.zero_range_ok.load(Ordering::Relaxed) {
                    RangeStage::ZeroRange
                } else {
                    RangeStage::NoZero
                };
            }
            _ => {
                file.zero_range_ok.store(false, Ordering::Relaxed);
                g.stage = RangeStage::NoZero;
            }
        }
        self.proceed(ring)
    }
}
