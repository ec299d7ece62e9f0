//! What `cache=none` (`O_DIRECT`) asks of a transfer, and how requests
//! that do not meet it are still served: the alignment the kernel wants,
//! aligned bounce buffers kept for reuse, and a range lock that keeps a
//! read-modify-write of a partial block from losing another write's
//! update of the same block.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

/// Alignment of bounce buffers: a page, enough for any device.
pub const BOUNCE_ALIGN: usize = 4096;

/// `BLKSSZGET` from linux/fs.h: a block device's logical block size.
const BLKSSZGET: libc::c_ulong = 0x1268;

/// The alignment `O_DIRECT` needs for one open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Of the buffer's address in memory.
    pub memory: usize,
    /// Of the file offset and the length.
    pub offset: u64,
}

impl Alignment {
    /// What the kernel says `file` needs (`statx`'s `STATX_DIOALIGN`,
    /// since Linux 6.1), or else the logical block size of a block device,
    /// or else a page for both, which suits every device.
    pub fn of(file: &File, block_device: bool) -> Alignment {
        if let Some(a) = dio_align(file) {
            return a;
        }
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int into `size`.
        let r = if block_device {
            unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size) }
        } else {
            -1
        };
        let offset = if r == 0 && size > 0 {
            size as u64
        } else {
            BOUNCE_ALIGN as u64
        };
        Alignment {
            memory: BOUNCE_ALIGN,
            offset,
        }
    }

    /// Whether a transfer of `len` bytes at `offset` from or to `addr`
    /// can go to the kernel as it is.
    pub fn fits(&self, addr: usize, offset: u64, len: usize) -> bool {
        addr % self.memory == 0 && offset % self.offset == 0 && len as u64 % self.offset == 0
    }

    /// The aligned span covering `len` bytes at `offset`.
    pub fn span(&self, offset: u64, len: usize) -> Span {
        let a = self.offset;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        Span { start, end }
    }
}

/// `statx(STATX_DIOALIGN)`, when the kernel and file system answer it.
fn dio_align(file: &File) -> Option<Alignment> {
    // SAFETY: statx is plain data; all-zero is a valid value to overwrite.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names our own descriptor;
    // `st` is a writable statx buffer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    let known = r == 0 && st.stx_mask & libc::STATX_DIOALIGN != 0;
    (known && st.stx_dio_mem_align > 0 && st.stx_dio_offset_align > 0).then(|| Alignment {
        memory: st.stx_dio_mem_align as usize,
        offset: u64::from(st.stx_dio_offset_align),
    })
}

/// An aligned range of the file, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

impl Span {
    /// Bytes in the span.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }
}

/// Which blocks at the ends of a span a write of `len` bytes at `offset`
/// covers only in part, and so must read first to keep the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    pub head: bool,
    /// The last block, when it is partial and not also the first one
    /// (already read as the head).
    pub tail: bool,
}

impl Ends {
    /// The partial ends of `span`, the aligned cover of the write.
    pub fn of(align: &Alignment, span: Span, offset: u64, len: usize) -> Ends {
        let head = offset != span.start;
        let end = offset + len as u64;
        let one_block = span.end - span.start == align.offset;
        Ends {
            head,
            tail: end != span.end && !(one_block && head),
        }
    }
}

/// A buffer whose bytes start at a [`BOUNCE_ALIGN`]-aligned address,
/// carved out of a slightly larger vector (so it needs no allocator of
/// its own). Moving it does not move its bytes, so the kernel may hold
/// their address while it is in flight.
pub struct Bounce {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Bounce {
    fn new(capacity: usize) -> Bounce {
        let buf = vec![0u8; capacity + BOUNCE_ALIGN];
        let start = (BOUNCE_ALIGN - buf.as_ptr() as usize % BOUNCE_ALIGN) % BOUNCE_ALIGN;
        Bounce {
            buf,
            start,
            len: capacity,
        }
    }

    fn capacity(&self) -> usize {
        self.buf.len() - BOUNCE_ALIGN
    }

    /// The bytes asked for (fewer than the capacity).
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// The bytes asked for, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    /// The address of the bytes, for the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }
}

/// Bounce buffers in power-of-two classes from 4 KiB to 32 MiB, kept for
/// reuse so that a steady stream of unaligned requests allocates nothing;
/// at most [`BouncePool::KEEP`] bytes of idle buffers are kept.
#[derive(Default)]
pub struct BouncePool {
    free: Mutex<Free>,
}

#[derive(Default)]
struct Free {
    classes: [Vec<Bounce>; 14],
    kept: usize,
}

impl BouncePool {
    /// Bytes of idle buffers kept at most.
    const KEEP: usize = 64 << 20;

    fn class(len: usize) -> Option<usize> {
        let bits = len.max(BOUNCE_ALIGN).next_power_of_two().trailing_zeros() as usize;
        let c = bits - 12;
        (c < 14).then_some(c)
    }

    /// A buffer of `len` bytes; its contents are whatever the last user
    /// left.
    pub fn get(&self, len: usize) -> Bounce {
        let Some(c) = Self::class(len) else {
            return Bounce::new(len);
        };
        let reused = {
            let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let b = f.classes[c].pop();
            if let Some(b) = &b {
                f.kept -= b.capacity();
            }
            b
        };
        let mut b = reused.unwrap_or_else(|| Bounce::new(1 << (c + 12)));
        b.len = len;
        b
    }

    /// Give a buffer back for reuse.
    pub fn put(&self, b: Bounce) {
        let Some(c) = Self::class(b.capacity()).filter(|&c| b.capacity() == 1 << (c + 12)) else {
            return;
        };
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if f.kept + b.capacity() <= Self::KEEP {
            f.kept += b.capacity();
            f.classes[c].push(b);
        }
    }
}

/// A byte range of the file held by one request: exclusively by a
/// read-modify-write, shared by every other write-type request (a plain
/// write, trim, zero), so that those never overlap a read-modify-write but
/// run beside each other freely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub span: Span,
    pub exclusive: bool,
}

impl Lease {
    fn conflicts(&self, other: &Lease) -> bool {
        let overlap = self.span.start < other.span.end && other.span.start < self.span.end;
        overlap && (self.exclusive || other.exclusive)
    }
}

/// Leases of one file, shared by every connection to it. A lease that
/// conflicts with one held, or with one already waiting (first come,
/// first served, so a read-modify-write is not starved), waits with its
/// waiter `W`, which is given back when the lease is granted: nothing
/// here blocks, so a request started on an event loop can wait here.
pub struct RangeLock<W> {
    table: Mutex<Table<W>>,
}

struct Table<W> {
    held: Vec<Lease>,
    waiting: VecDeque<(Lease, W)>,
}

impl<W> Default for RangeLock<W> {
    fn default() -> Self {
        RangeLock {
            table: Mutex::new(Table {
                held: Vec::new(),
                waiting: VecDeque::new(),
            }),
        }
    }
}

impl<W> RangeLock<W> {
    fn table(&self) -> std::sync::MutexGuard<'_, Table<W>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take `lease`: `Some(waiter)` back if it is granted now, else `None`
    /// and `waiter` waits, to be handed to [`RangeLock::release`]'s
    /// `granted` once it is.
    pub fn acquire(&self, lease: Lease, waiter: W) -> Option<W> {
        let mut t = self.table();
        let blocked = t.held.iter().any(|h| h.conflicts(&lease))
            || t.waiting.iter().any(|(w, _)| w.conflicts(&lease));
        if blocked {
            t.waiting.push_back((lease, waiter));
            None
        } else {
            t.held.push(lease);
            Some(waiter)
        }
    }

    /// Give `lease` back, then call `granted` for each waiter that now
    /// holds its lease (after letting go of the table, so that it may
    /// come back here).
    pub fn release(&self, lease: Lease, granted: impl FnMut(W)) {
        // Empty (and so not allocated) unless someone was waiting.
        let mut now = Vec::new();
        {
            let mut t = self.table();
            // Equal leases are interchangeable: any one of them goes.
            if let Some(i) = t.held.iter().position(|h| *h == lease) {
                t.held.swap_remove(i);
            }
            let mut i = 0;
            while i < t.waiting.len() {
                let w = t.waiting[i].0;
                let blocked = t.held.iter().any(|h| h.conflicts(&w))
                    || t.waiting.iter().take(i).any(|(e, _)| e.conflicts(&w));
                if blocked {
                    i += 1;
                    continue;
                }
                let (lease, waiter) = t.waiting.remove(i).expect("index in range");
                t.held.push(lease);
                now.push(waiter);
            }
        }
        now.into_iter().for_each(granted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(start: u64, end: u64, exclusive: bool) -> Lease {
        Lease {
            span: Span { start, end },
            exclusive,
        }
    }

    #[test]
    fn spans_cover_the_request() {
        let a = Alignment {
            memory: 512,
            offset: 512,
        };
        assert_eq!(
            a.span(1000, 1000),
            Span {
                start: 512,
                end: 2048
            }
        );
        assert_eq!(
            a.span(1024, 512),
            Span {
                start: 1024,
                end: 1536
            }
        );
        assert!(a.fits(4096, 1024, 512));
        assert!(!a.fits(4097, 1024, 512));
        assert!(!a.fits(4096, 1000, 512));
        assert!(!a.fits(4096, 1024, 500));
        let ends = |offset, len| Ends::of(&a, a.span(offset, len), offset, len);
        assert_eq!(
            ends(1000, 1000),
            Ends {
                head: true,
                tail: true
            }
        );
        assert_eq!(
            ends(600, 100),
            Ends {
                head: true,
                tail: false
            }
        );
        assert_eq!(
            ends(512, 100),
            Ends {
                head: false,
                tail: true
            }
        );
        assert_eq!(
            ends(512, 1024),
            Ends {
                head: false,
                tail: false
            }
        );
    }

    #[test]
    fn bounce_buffers_are_aligned_and_reused() {
        let pool = BouncePool::default();
        let mut b = pool.get(5000);
        assert_eq!(b.as_mut_ptr() as usize % BOUNCE_ALIGN, 0);
        assert_eq!(b.as_slice().len(), 5000);
        let p = b.as_mut_ptr();
        pool.put(b);
        let mut again = pool.get(8192);
        assert_eq!(again.as_mut_ptr(), p, "the 8 KiB class was reused");
        let big = pool.get(40 << 20);
        assert_eq!(big.as_slice().len(), 40 << 20);
        pool.put(big);
    }

    #[test]
    fn shared_leases_overlap_and_exclusive_ones_wait_in_order() {
        let l: RangeLock<u32> = RangeLock::default();
        assert_eq!(l.acquire(lease(0, 4096, false), 1), Some(1));
        assert_eq!(l.acquire(lease(0, 4096, false), 2), Some(2));
        // A read-modify-write waits for both writes.
        assert_eq!(l.acquire(lease(0, 8192, true), 3), None);
        // A later shared lease over it waits behind it, first come first
        // served; one elsewhere does not.
        assert_eq!(l.acquire(lease(4096, 8192, false), 4), None);
        assert_eq!(l.acquire(lease(8192, 12288, false), 5), Some(5));
        let mut got = Vec::new();
        l.release(lease(0, 4096, false), |w| got.push(w));
        assert!(got.is_empty());
        l.release(lease(0, 4096, false), |w| got.push(w));
        assert_eq!(got, [3]);
        l.release(lease(0, 8192, true), |w| got.push(w));
        assert_eq!(got, [3, 4]);
    }

    #[test]
    fn a_granted_waiter_may_release_at_once() {
        // A request that turns out to have nothing to do gives its lease
        // back from inside the release that granted it.
        let l: std::sync::Arc<RangeLock<u32>> = Default::default();
        assert_eq!(l.acquire(lease(0, 4096, true), 1), Some(1));
        assert_eq!(l.acquire(lease(0, 4096, false), 2), None);
        let again = l.clone();
        l.release(lease(0, 4096, true), |w| {
            assert_eq!(w, 2);
            again.release(lease(0, 4096, false), |_| unreachable!());
        });
        assert_eq!(l.acquire(lease(0, 4096, true), 3), Some(3));
    }
}
