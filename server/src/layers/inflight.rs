//! Requests in flight on the asynchronous path (ABI 1.9).
//!
//! Each has a [`Token`], which the C ABI hands out as a
//! `struct nbdhost_request *`, and a waiter that runs once when the token
//! is completed: the client's request answered, a filter's continuation,
//! or a synchronous caller woken. A token is an index and a generation,
//! never an address the server reads through, so a second completion (or
//! one with a made-up pointer) finds no waiter: it is logged and ignored,
//! and cannot touch freed memory.
//!
//! Waiters run on the thread that completes, outside the registry's lock.
//! Work that may be long (a filter's continuation) is handed to the
//! [`Executor`] the runtime installs: a client library's callback thread
//! (librbd's) only ever moves results along.

use std::sync::{Mutex, OnceLock};

use nbdhost_plugin_api::{abi, Error, Result};

/// What runs when a request completes.
pub type Waiter = Box<dyn FnOnce(Result<()>) + Send>;

/// Work for the worker pool.
pub type Task = Box<dyn FnOnce() + Send>;

/// Runs tasks on the worker pool.
pub type Executor = Box<dyn Fn(Task) + Send + Sync>;

/// One request in flight, as the C ABI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(u64);

impl Token {
    /// The token as `struct nbdhost_request *`.
    pub fn as_ptr(self) -> *mut abi::Request {
        self.0 as usize as *mut abi::Request
    }

    /// The token a layer passed back.
    pub fn from_ptr(p: *mut abi::Request) -> Token {
        Token(p as usize as u64)
    }

    fn new(index: u32, generation: u32) -> Token {
        Token(u64::from(generation) << 32 | u64::from(index))
    }

    fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

struct Slot {
    /// Never 0, so no token is a null pointer.
    generation: u32,
    waiter: Option<Waiter>,
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

static SLOTS: Mutex<Slots> = Mutex::new(Slots {
    slots: Vec::new(),
    free: Vec::new(),
    live: 0,
});

static EXECUTOR: OnceLock<Executor> = OnceLock::new();

fn slots() -> std::sync::MutexGuard<'static, Slots> {
    SLOTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A token whose completion runs `waiter`.
pub fn register(waiter: Waiter) -> Token {
    let mut s = slots();
    s.live += 1;
    match s.free.pop() {
        Some(i) => {
            let slot = &mut s.slots[i as usize];
            slot.generation = slot.generation.checked_add(1).unwrap_or(1);
            slot.waiter = Some(waiter);
            Token::new(i, slot.generation)
        }
        None => {
            let i = s.slots.len() as u32;
            s.slots.push(Slot {
                generation: 1,
                waiter: Some(waiter),
            });
            Token::new(i, 1)
        }
    }
}

/// Complete `token` with `r`: run its waiter here. A token already
/// completed, or never given out, is reported by `who` and ignored.
pub fn complete(token: Token, r: Result<()>, who: &str) {
    let waiter = {
        let mut s = slots();
        let i = token.index();
        match s.slots.get_mut(i) {
            Some(slot) if slot.generation == token.generation() && slot.waiter.is_some() => {
                let w = slot.waiter.take();
                s.free.push(i as u32);
                s.live -= 1;
                w
            }
            _ => None,
        }
    };
    match waiter {
        Some(w) => w(r),
        None => log::error!(
            "{who}: a request was completed that is not in flight (completed twice?); ignored"
        ),
    }
}

/// How many requests are in flight, for shutdown to wait on and report.
pub fn in_flight() -> usize {
    slots().live
}

/// Install the pool that runs continuations; the first one stays.
pub fn set_executor(e: Executor) {
    let _ = EXECUTOR.set(e);
}

/// Run `task` on the worker pool (here, before the runtime has one:
/// start-up and tests).
pub fn execute(task: Task) {
    match EXECUTOR.get() {
        Some(e) => e(task),
        None => task(),
    }
}

/// Run an asynchronous request synchronously: `start` it with a token
/// whose completion this thread waits for. For a synchronous caller (a
/// filter without an asynchronous path) of a layer that has only one.
pub fn wait(start: impl FnOnce(Token)) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let token = register(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    start(token);
    rx.recv()
        .unwrap_or_else(|_| Err(Error::new(libc::EIO, "internal error: request lost")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_token_runs_its_waiter_once_and_a_second_completion_is_ignored() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let t = register(Box::new(move |res| {
            assert!(res.is_ok());
            r.fetch_add(1, Ordering::SeqCst);
        }));
        complete(t, Ok(()), "test");
        complete(t, Ok(()), "test");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_reused_slot_does_not_answer_an_old_token() {
        let old = register(Box::new(|_| {}));
        complete(old, Ok(()), "test");
        let hit = Arc::new(AtomicUsize::new(0));
        let h = hit.clone();
        let new = register(Box::new(move |_| {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        complete(old, Ok(()), "test");
        assert_eq!(hit.load(Ordering::SeqCst), 0);
        complete(new, Ok(()), "test");
        assert_eq!(hit.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_token_is_never_null() {
        let t = register(Box::new(|_| {}));
        assert!(!t.as_ptr().is_null());
        complete(t, Ok(()), "test");
    }

    #[test]
    fn wait_returns_a_completion_from_another_thread() {
        let r = wait(|t| {
            std::thread::spawn(move || complete(t, Err(Error::errno(libc::ENOSPC)), "test"));
        });
        assert_eq!(r.unwrap_err().raw_errno(), libc::ENOSPC);
    }
}
