//! One io_uring and the thread that drives it.
//!
//! Requests are started on whichever thread the server calls from (an
//! event loop or a worker), and none of those may wait. So they do not
//! touch the ring: they append the prepared entry and its [`Pending`]
//! state to a queue behind a mutex held for a push, and wake the ring
//! thread with an eventfd only when it sleeps. The ring thread is the
//! ring's only submitter (`IORING_SETUP_SINGLE_ISSUER`, and
//! `DEFER_TASKRUN` where the kernel has it, so completion work runs in its
//! own wait instead of interrupting the event loops that started the I/O):
//! it moves queued entries into the submission queue, submits them in one
//! `io_uring_enter` with its wait for completions, and gives each
//! completion to its request, which answers the client or goes on with a
//! further entry.
//!
//! At most [`Ring::IN_FLIGHT`] entries are in the kernel at once, fewer
//! than the submission queue holds, so pushing never finds it full and the
//! completion queue never overflows; what is queued beyond waits in order.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types, IoUring, Probe};

/// The state of a request whose entry is in the ring.
pub trait Pending: Send + Sized + 'static {
    /// The entry finished with `res` (a count, or `-errno`): answer the
    /// request, or go on with another entry through `ring`.
    fn complete(self, res: i32, ring: &Submitter<Self>);
}

/// Why there is no ring.
#[derive(Debug)]
pub enum RingError {
    /// `io_uring_setup` failed: an old kernel (`ENOSYS`),
    /// `kernel.io_uring_disabled` (`EPERM`), a seccomp policy, or limits.
    Setup(io::Error),
    /// The kernel would not say which operations it has.
    Probe(io::Error),
    /// The kernel lacks an operation this plugin uses.
    Unsupported(&'static str),
    /// The eventfd or the thread could not be made.
    Start(io::Error),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::Setup(e) => write!(f, "io_uring_setup: {e}"),
            RingError::Probe(e) => write!(f, "probing io_uring operations: {e}"),
            RingError::Unsupported(op) => write!(f, "the kernel's io_uring has no {op}"),
            RingError::Start(e) => write!(f, "starting the io_uring thread: {e}"),
        }
    }
}

impl std::error::Error for RingError {}

/// The operations `check` makes sure of, with their names for messages.
pub type Opcodes = [(u8, &'static str)];

/// Whether a ring can be made here with `opcodes`: asked before the
/// server forks, when no thread may be left running, with a ring that is
/// closed again at once.
pub fn probe(opcodes: &Opcodes) -> Result<(), RingError> {
    let ring = build(8, false)?;
    check(&ring, opcodes)
}

/// A ring of `entries`, with the flags that make a single issuer
/// cheapest where the kernel knows them.
fn build(entries: u32, single_issuer: bool) -> Result<IoUring, RingError> {
    let mut tries: Vec<io_uring::Builder> = Vec::new();
    if single_issuer {
        // Linux 6.1: completion work runs only when the issuer waits.
        let mut b = IoUring::builder();
        b.setup_single_issuer().setup_defer_taskrun();
        tries.push(b);
    }
    // Linux 5.19: no interrupt to run completion work.
    let mut b = IoUring::builder();
    b.setup_coop_taskrun();
    tries.push(b);
    tries.push(IoUring::builder());
    let mut last = None;
    for b in tries {
        match b.build(entries) {
            Ok(r) => return Ok(r),
            // An older kernel refuses flags it does not know.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(RingError::Setup(e)),
        }
    }
    Err(RingError::Setup(last.expect("at least one try")))
}

fn check(ring: &IoUring, opcodes: &Opcodes) -> Result<(), RingError> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(RingError::Probe)?;
    // The ring thread's own wake-up is a read.
    let all = opcodes.iter().chain(&[(opcode::Read::CODE, "READ")]);
    for &(code, name) in all {
        if !probe.is_supported(code) {
            return Err(RingError::Unsupported(name));
        }
    }
    Ok(())
}

/// Starts requests on a [`Ring`] from any thread; clones share it.
pub struct Submitter<P> {
    shared: Arc<Shared<P>>,
}

impl<P> Clone for Submitter<P> {
    fn clone(&self) -> Self {
        Submitter {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<P> {
    queue: Mutex<Queue<P>>,
    /// Written to wake the ring thread from its wait.
    wake: File,
}

struct Queue<P> {
    entries: Vec<(squeue::Entry, P)>,
    /// The ring thread waits in the kernel, or is about to: a new entry
    /// must wake it.
    sleeping: bool,
    stopping: bool,
}

impl<P: Pending> Submitter<P> {
    /// Start `entry`, whose completion goes to `pending`; never waits.
    ///
    /// `pending` must own (or keep alive) every buffer `entry` names, and
    /// the file it names must stay open, until its completion.
    pub fn submit(&self, entry: squeue::Entry, pending: P) {
        let wake = {
            let mut q = self.shared.lock();
            q.entries.push((entry, pending));
            std::mem::replace(&mut q.sleeping, false)
        };
        if wake {
            self.shared.wake();
        }
    }
}

impl<P> Shared<P> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<P>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        // An eventfd write only fails on overflow of its counter, which
        // the ring thread's reads reset long before.
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }
}

/// The ring and its thread, which stop (after every request in flight
/// has completed) when this is dropped.
pub struct Ring<P> {
    submitter: Submitter<P>,
    thread: Option<JoinHandle<()>>,
}

/// `user_data` of the ring thread's own read of its eventfd.
const WAKE: u64 = u64::MAX;

impl<P: Pending> Ring<P> {
    /// Entries of the submission queue (the completion queue has twice
    /// as many).
    const ENTRIES: u32 = 1024;
    /// Entries in the kernel at once: all but the wake-up's slot.
    pub const IN_FLIGHT: usize = Self::ENTRIES as usize - 1;

    /// Start the ring thread, which makes the ring (so that it is the
    /// ring's single issuer) and checks that it has `opcodes`.
    pub fn start(opcodes: &'static Opcodes) -> Result<Ring<P>, RingError> {
        // SAFETY: eventfd takes two integers and returns a new descriptor
        // or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(RingError::Start(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just made and is owned by nothing else.
        let wake = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                entries: Vec::with_capacity(Self::IN_FLIGHT),
                sleeping: false,
                stopping: false,
            }),
            wake,
        });
        let (tx, rx) = mpsc::sync_channel(1);
        let mine = shared.clone();
        let thread = std::thread::Builder::new()
            .name("file-uring".into())
            .spawn(move || {
                let ring = build(Self::ENTRIES, true).and_then(|r| check(&r, opcodes).map(|()| r));
                match ring {
                    Ok(ring) => {
                        let _ = tx.send(Ok(()));
                        Driver::new(ring, mine).run();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(RingError::Start)?;
        match rx.recv() {
            Ok(Ok(())) => Ok(Ring {
                submitter: Submitter { shared },
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(RingError::Start(io::Error::other("the ring thread died")))
            }
        }
    }

    /// A handle that starts requests on the ring.
    pub fn submitter(&self) -> Submitter<P> {
        self.submitter.clone()
    }
}

impl<P> Drop for Ring<P> {
    fn drop(&mut self) {
        let shared = &self.submitter.shared;
        shared.lock().stopping = true;
        shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The ring thread's state.
struct Driver<P> {
    ring: IoUring,
    shared: Arc<Shared<P>>,
    submitter: Submitter<P>,
    /// Requests in the kernel, by `user_data`.
    slots: Vec<Option<P>>,
    free: Vec<usize>,
    /// Taken from the queue, not yet in the kernel.
    backlog: VecDeque<(squeue::Entry, P)>,
    /// The queue's vector, swapped with it so neither allocates.
    taken: Vec<(squeue::Entry, P)>,
    /// Where the eventfd read lands; boxed so its address stays put.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
}

impl<P: Pending> Driver<P> {
    fn new(ring: IoUring, shared: Arc<Shared<P>>) -> Driver<P> {
        let n = Ring::<P>::IN_FLIGHT;
        Driver {
            ring,
            submitter: Submitter {
                shared: shared.clone(),
            },
            shared,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            backlog: VecDeque::with_capacity(n),
            taken: Vec::with_capacity(n),
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn run(mut self) {
        loop {
            let stopping = {
                let mut q = self.shared.lock();
                std::mem::swap(&mut q.entries, &mut self.taken);
                // From here on a new entry must wake us: we are about to
                // wait, or will see it on the next round anyway.
                q.sleeping = true;
                q.stopping
            };
            self.backlog.extend(self.taken.drain(..));
            self.fill();
            if !stopping && !self.wake_armed {
                self.arm_wake();
            }
            if stopping && self.in_flight() == 0 && self.backlog.is_empty() && !self.wake_armed {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // Interrupted, or the kernel is short of memory for now:
                // what was not submitted stays queued for the next round.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    nbdhost_plugin_api::host::log(
                        nbdhost_plugin_api::host::LogLevel::Error,
                        &format!("io_uring_enter: {e}"),
                    );
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.reap();
        }
    }

    /// Move backlog entries into the submission queue while there is room
    /// in flight.
    fn fill(&mut self) {
        let mut sq = self.ring.submission();
        while let Some(slot) = self.free.last().copied() {
            let Some((entry, pending)) = self.backlog.pop_front() else {
                break;
            };
            let entry = entry.user_data(slot as u64);
            // SAFETY: `pending` owns or keeps alive the buffers and the
            // file that `entry` names (Submitter::submit's contract), and
            // stays in its slot until the entry's completion.
            if unsafe { sq.push(&entry) }.is_err() {
                // Cannot happen with fewer in flight than entries; if it
                // did, the entry waits for the next round.
                self.backlog.push_front((entry, pending));
                break;
            }
            self.free.pop();
            self.slots[slot] = Some(pending);
        }
    }

    fn arm_wake(&mut self) {
        let fd = types::Fd(self.shared.wake.as_raw_fd());
        let entry = opcode::Read::new(fd, self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE);
        let mut sq = self.ring.submission();
        // SAFETY: the buffer is boxed in `self`, which outlives the ring's
        // use of it: the thread returns only once this read has completed.
        if unsafe { sq.push(&entry) }.is_ok() {
            self.wake_armed = true;
        }
    }

    fn reap(&mut self) {
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud == WAKE {
                self.wake_armed = false;
                continue;
            }
            let slot = ud as usize;
            let Some(pending) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            // A panic must not end the thread every request depends on;
            // the request it abandons is answered with EIO when dropped.
            let submitter = &self.submitter;
            let res = cqe.result();
            let _ = catch_unwind(AssertUnwindSafe(|| pending.complete(res, submitter)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc::Sender;

    /// A read of one byte of a file into its own buffer, reporting the
    /// byte it read.
    struct ReadByte {
        buf: Box<[u8; 1]>,
        done: Sender<(i32, u8)>,
    }

    impl Pending for ReadByte {
        fn complete(self, res: i32, _ring: &Submitter<Self>) {
            let _ = self.done.send((res, self.buf[0]));
        }
    }

    #[test]
    fn reads_from_many_threads_beyond_the_ring_all_complete() {
        let path = std::env::temp_dir().join(format!("nbdhost-uring-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(&(0..=255u8).collect::<Vec<_>>()).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let ring = match Ring::<ReadByte>::start(&[]) {
            Ok(r) => r,
            Err(e) => return eprintln!("SKIP: no io_uring here: {e}"),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let per_thread = Ring::<ReadByte>::IN_FLIGHT;
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (sub, tx, file) = (ring.submitter(), tx.clone(), file.clone());
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        let mut p = ReadByte {
                            buf: Box::new([0]),
                            done: tx.clone(),
                        };
                        let at = (i % 256) as u64;
                        let fd = types::Fd(file.as_raw_fd());
                        let e = opcode::Read::new(fd, p.buf.as_mut_ptr(), 1)
                            .offset(at)
                            .build();
                        sub.submit(e, p);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        drop(tx);
        let mut n = 0;
        let mut sum = 0u64;
        for (res, byte) in rx {
            assert_eq!(res, 1);
            sum += u64::from(byte);
            n += 1;
        }
        assert_eq!(n, 3 * per_thread);
        let want: u64 = (0..per_thread as u64).map(|i| i % 256).sum::<u64>() * 3;
        assert_eq!(sum, want);
        let mut check = [0u8; 1];
        file.read_exact_at(&mut check, 7).unwrap();
        assert_eq!(check[0], 7);
        drop(ring);
    }
}
