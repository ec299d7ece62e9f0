//! Timers for layers (`next->after`, ABI 1.10): deadlines kept by one
//! thread for the whole server, so that a filter waiting between two
//! tries of a request holds no thread of its own. Shutdown fires every
//! pending timer at once, as it cuts short `host->nanosleep`.
//!
//! What a timer runs must be short (hand work to the pool): it runs on
//! the timer thread, or on the thread that begins the shutdown.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// What runs when a timer fires; `true` when shutdown fired it early.
pub type Fire = Box<dyn FnOnce(bool) + Send>;

struct Pending {
    at: Instant,
    /// Orders timers with the same deadline by when they were set.
    seq: u64,
    fire: Fire,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Pending) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Pending) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Pending) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct State {
    heap: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    /// The timer thread has been started (on the first timer, so never
    /// before the server forks).
    started: bool,
    /// Shutdown has begun: timers fire as soon as they are set.
    down: bool,
}

/// A set of timers and the thread that fires them.
pub struct Timers {
    state: Mutex<State>,
    wake: Condvar,
}

/// The server's timers.
static TIMERS: Timers = Timers::new();

/// Run `fire(false)` at `at`, or `fire(true)` as soon as shutdown begins.
/// An error only if the timer thread cannot be started; `fire` is then
/// dropped without running.
pub fn at(at: Instant, fire: Fire) -> std::io::Result<()> {
    TIMERS.at(at, fire)
}

/// Shutdown has begun: fire every pending timer now, and every later one
/// as it is set.
pub fn fire_all_early() {
    TIMERS.fire_all_early()
}

impl Timers {
    const fn new() -> Timers {
        Timers {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                seq: 0,
                started: false,
                down: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn at(&'static self, at: Instant, fire: Fire) -> std::io::Result<()> {
        let mut s = self.state();
        if s.down {
            drop(s);
            fire(true);
            return Ok(());
        }
        if !s.started {
            std::thread::Builder::new()
                .name("nbdhost-timers".into())
                .spawn(move || self.run())?;
            s.started = true;
        }
        s.seq += 1;
        let seq = s.seq;
        s.heap.push(Reverse(Pending { at, seq, fire }));
        self.wake.notify_one();
        Ok(())
    }

    fn fire_all_early(&self) {
        let pending = {
            let mut s = self.state();
            s.down = true;
            std::mem::take(&mut s.heap)
        };
        self.wake.notify_one();
        for Reverse(p) in pending.into_sorted_vec().into_iter().rev() {
            (p.fire)(true);
        }
    }

    /// The timer thread: fire what is due, outside the lock, then sleep
    /// until the next deadline or a new earlier timer.
    fn run(&self) {
        let mut s = self.state();
        loop {
            if s.down {
                return;
            }
            let now = Instant::now();
            match s.heap.peek() {
                Some(Reverse(p)) if p.at <= now => {
                    let Some(Reverse(p)) = s.heap.pop() else {
                        continue;
                    };
                    drop(s);
                    (p.fire)(false);
                    s = self.state();
                }
                Some(Reverse(p)) => {
                    let wait = p.at - now;
                    s = self
                        .wake
                        .wait_timeout(s, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                None => s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// One test: shutdown is process-wide and for good.
    #[test]
    fn timers_fire_in_deadline_order_and_all_at_once_at_shutdown() {
        // A set of its own: the server's is shut down by other tests. In a
        // static, so that it outlives the test without being leaked.
        static TIMERS: std::sync::OnceLock<Timers> = std::sync::OnceLock::new();
        let timers: &'static Timers = TIMERS.get_or_init(Timers::new);
        let at = |when, fire| timers.at(when, fire);
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        for (name, ms) in [("late", 60u64), ("early", 20)] {
            let tx = tx.clone();
            let fire: Fire = Box::new(move |early| tx.send((name, early)).unwrap());
            at(start + Duration::from_millis(ms), fire).unwrap();
        }
        assert_eq!(rx.recv().unwrap(), ("early", false));
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert_eq!(rx.recv().unwrap(), ("late", false));

        let tx2 = tx.clone();
        let far = start + Duration::from_secs(3600);
        at(
            far,
            Box::new(move |early| tx2.send(("far", early)).unwrap()),
        )
        .unwrap();
        timers.fire_all_early();
        assert_eq!(rx.recv().unwrap(), ("far", true));
        at(
            far,
            Box::new(move |early| tx.send(("after", early)).unwrap()),
        )
        .unwrap();
        assert_eq!(rx.recv().unwrap(), ("after", true));
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
