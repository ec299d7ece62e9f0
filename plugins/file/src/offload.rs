//! Threads for the calls io_uring has no operation for (`SEEK_DATA` and
//! `SEEK_HOLE`, a block device's `BLKDISCARD` and `BLKZEROOUT`), which
//! may wait for the disk, so that starting a request never does even when
//! the server starts it on an event loop. They are rare next to reads and
//! writes: two threads, so that one slow call does not hold up the
//! other kind.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Task = Box<dyn FnOnce() + Send>;

/// The threads; they finish what was handed to them and stop when this
/// is dropped.
pub struct Offload {
    tx: Option<Sender<Task>>,
    threads: Vec<JoinHandle<()>>,
}

/// Hands work to the threads from anywhere; clones share them.
#[derive(Clone)]
pub struct Runner {
    tx: Sender<Task>,
}

impl Offload {
    const THREADS: usize = 2;

    /// Start the threads.
    pub fn start() -> std::io::Result<Offload> {
        let (tx, rx) = channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(Self::THREADS);
        for _ in 0..Self::THREADS {
            let rx = rx.clone();
            let t = std::thread::Builder::new()
                .name("file-offload".into())
                .spawn(move || serve(&rx))?;
            threads.push(t);
        }
        Ok(Offload {
            tx: Some(tx),
            threads,
        })
    }

    /// A handle that gives them work.
    pub fn runner(&self) -> Runner {
        Runner {
            tx: self.tx.clone().expect("running"),
        }
    }
}

fn serve(rx: &Mutex<Receiver<Task>>) {
    loop {
        // The lock is held only while waiting for the next task.
        let task = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        match task {
            Ok(task) => task(),
            Err(_) => return,
        }
    }
}

impl Runner {
    /// Run `task` on one of the threads. Once they have stopped (the
    /// plugin is being unloaded, with no request in flight) there is
    /// nothing left to run it for.
    pub fn run(&self, task: impl FnOnce() + Send + 'static) {
        let _ = self.tx.send(Box::new(task));
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        // The threads stop once every sender is gone: handles keep
        // theirs only while open.
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
