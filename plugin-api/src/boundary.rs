//! The C boundary of a layer's callbacks: an error becomes the error the
//! server reads back, and a panic never unwinds into the server's frames
//! (it is reported, with where it happened, as the call's failure).

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::host;
use crate::{Error, Result};

thread_local! {
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Replace this plugin's panic hook (a cdylib has its own copy of std, so
/// the server's is untouched): instead of printing a backtrace, remember
/// where the panic happened for the one log line the server writes.
pub(crate) fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            PANIC_AT.with(|p| *p.borrow_mut() = at);
        }));
    });
}

/// Run `f`, turning an error or a panic into a recorded host error and
/// `failed`. Panics must not unwind into the server's C frames.
pub(crate) fn guard<T>(failed: T, f: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            host::report(&e);
            failed
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let at = PANIC_AT
                .with(|p| p.borrow_mut().take())
                .map_or(String::new(), |l| format!(" at {l}"));
            host::report(&Error::new(
                libc::EIO,
                format!("plugin panicked{at}: {what}"),
            ));
            failed
        }
    }
}

/// Run `start`, which hands its request on; a panic before it did is
/// answered as the request's failure by the request's own drop, and
/// never crosses into the server.
pub(crate) fn starting(start: impl FnOnce()) {
    guard((), || {
        start();
        Ok(())
    });
}
