//! The worker pool that runs backend calls, which may block, off the event
//! loop, and the channel that brings their results back to it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

/// A unit of work for a worker thread.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads taking jobs from one queue.
///
/// Idle workers sleep on a condition variable rather than spinning: the
/// pool is usually larger than the machine (blocking plugins want many
/// threads), and spinning or yielding workers steal the CPU from the event
/// loop that feeds them. A queue behind one mutex is enough, as each job is
/// at least a plugin call.
pub struct Pool {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
}

struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// Workers waiting on `ready`: when none is, a new job needs no wake-up
    /// (a futex syscall on the loop's thread) because a busy worker will
    /// find it.
    idle: usize,
    closed: bool,
}

impl Queue {
    /// The next job, or `None` once the pool is closed and drained.
    fn take(&self) -> Option<Job> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(job) = st.jobs.pop_front() {
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle -= 1;
        }
    }
}

impl Pool {
    /// Start `n` workers.
    pub fn new(n: usize) -> std::io::Result<Pool> {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                idle: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let threads = (0..n.max(1))
            .map(|i| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("worker{i}"))
                    .spawn(move || {
                        while let Some(job) = queue.take() {
                            job();
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Pool { queue, threads })
    }

    /// Queue a job.
    pub fn submit(&self, job: Job) {
        let mut st = self.queue.state.lock().unwrap_or_else(|e| e.into_inner());
        st.jobs.push_back(job);
        let wake = st.idle > 0;
        drop(st);
        if wake {
            self.queue.ready.notify_one();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.queue
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.queue.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends results to the event loop and wakes it, once per batch: a worker
/// only pays for the wake-up syscall when the loop has drained everything.
pub struct Notifier<T> {
    tx: Sender<T>,
    waker: Arc<mio::Waker>,
    pending: Arc<AtomicBool>,
}

impl<T> Clone for Notifier<T> {
    fn clone(&self) -> Self {
        Notifier {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
            pending: self.pending.clone(),
        }
    }
}

impl<T> Notifier<T> {
    /// Deliver `item` to the loop.
    pub fn send(&self, item: T) {
        if self.tx.send(item).is_ok() && !self.pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                log::error!("cannot wake the event loop: {e}");
            }
        }
    }
}

/// The loop's end of a [`Notifier`].
pub struct Inbox<T> {
    rx: Receiver<T>,
    pending: Arc<AtomicBool>,
}

impl<T> Inbox<T> {
    /// Take everything delivered so far. The flag is cleared first so a
    /// result sent during the drain wakes the loop again.
    pub fn drain(&self) -> impl Iterator<Item = T> + '_ {
        self.pending.store(false, Ordering::Release);
        self.rx.try_iter()
    }
}

/// A connected notifier and inbox around `waker`.
pub fn channel<T>(waker: mio::Waker) -> (Notifier<T>, Inbox<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let pending = Arc::new(AtomicBool::new(false));
    (
        Notifier {
            tx,
            waker: Arc::new(waker),
            pending: pending.clone(),
        },
        Inbox { rx, pending },
    )
}
