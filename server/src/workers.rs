//! The worker pool that runs backend calls, which may block, off the event
//! loop, and the channel that brings their results back to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

/// A unit of work for a worker thread.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads taking jobs from one queue.
pub struct Pool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Start `n` workers.
    pub fn new(n: usize) -> std::io::Result<Pool> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let threads = (0..n.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("worker{i}"))
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Pool {
            tx: Some(tx),
            threads,
        })
    }

    /// Queue a job.
    pub fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // Workers only stop when the pool is dropped, so this cannot fail.
            let _ = tx.send(job);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
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
