//! Shutdown as layers see it, both ways: a layer may ask the server to
//! shut down (`host->shutdown`), and the server's shutdown cuts short
//! every sleep a layer is in (`host->nanosleep`) and fires its timers
//! (`next->after`), so that no layer holds the exit up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use nbdhost_plugin_api::Error;

use super::call;

/// What `host->shutdown` does: set by the runtime once it serves.
static SHUTDOWN_REQUEST: Mutex<Option<Box<dyn Fn() + Send>>> = Mutex::new(None);

/// `host->shutdown` was called before the runtime was there to hear it
/// (from `get_ready` or `after_fork`, say).
static SHUTDOWN_EARLY: AtomicBool = AtomicBool::new(false);

/// Make `host->shutdown` call `f` (`None`: remember the request, as
/// before serving). A request made before `f` was set calls it at once.
pub fn on_shutdown_request(f: Option<Box<dyn Fn() + Send>>) {
    let mut slot = SHUTDOWN_REQUEST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = &f {
        if SHUTDOWN_EARLY.swap(false, Ordering::Relaxed) {
            f();
        }
    }
    *slot = f;
}

/// The layer being called asks the server to shut down: tell the runtime,
/// or remember it for when the runtime is there.
pub(super) fn request_shutdown() {
    log::info!("{} asked the server to shut down", call::layer());
    match SHUTDOWN_REQUEST
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        Some(f) => f(),
        None => SHUTDOWN_EARLY.store(true, Ordering::Relaxed),
    }
}

/// Set once the server starts shutting down; wakes `nanosleep`.
static SHUTDOWN: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// The server is shutting down: cut short every sleep in a plugin or
/// filter, and any started later.
pub fn begin_shutdown() {
    *SHUTDOWN.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    SHUTDOWN.1.notify_all();
    super::timer::fire_all_early();
}

/// Whether the server has begun shutting down.
pub fn shutting_down() -> bool {
    *SHUTDOWN.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleep `sec` seconds and `nsec` nanoseconds, or until the server begins
/// shutting down (`ESHUTDOWN`), whichever comes first.
pub(super) fn nanosleep(sec: u64, nsec: u64) -> Result<(), Error> {
    // Saturating: no input may panic here, across the C boundary.
    let until = Duration::from_secs(sec)
        .checked_add(Duration::from_nanos(nsec))
        .and_then(|d| Instant::now().checked_add(d))
        // Far enough: a sleep this long ends at shutdown anyway.
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(u32::MAX.into()));
    let mut down = SHUTDOWN.0.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if *down {
            return Err(Error::new(libc::ESHUTDOWN, "interrupted by shutdown"));
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        down = SHUTDOWN
            .1
            .wait_timeout(down, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for both cases: shutdown is process-wide and for good.
    #[test]
    fn nanosleep_sleeps_until_shutdown_cuts_it_short() {
        let t = Instant::now();
        assert_eq!(nanosleep(0, 20_000_000), Ok(()));
        assert!(t.elapsed() >= Duration::from_millis(20));
        // The largest request must not overflow.
        let forever = std::thread::spawn(|| nanosleep(u64::MAX, u64::MAX));
        std::thread::sleep(Duration::from_millis(50));
        begin_shutdown();
        let interrupted = forever.join().unwrap().map_err(|e| e.raw_errno());
        assert_eq!(interrupted, Err(libc::ESHUTDOWN));
        assert_eq!(
            nanosleep(1, 0).map_err(|e| e.raw_errno()),
            Err(libc::ESHUTDOWN),
            "sleeps after shutdown end at once"
        );
    }
}
