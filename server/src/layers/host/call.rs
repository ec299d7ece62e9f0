//! The call into a layer running on this thread: which layer it is (for
//! its log lines and its debug flags) and the error it recorded with
//! `host->error`, which becomes the call's error when it fails.
//!
//! Per thread because a layer records its error through a C function that
//! takes no handle, on the thread that made the call.

use std::cell::{Cell, RefCell};

use nbdhost_plugin_api::Error;

use super::restore::Restore;

thread_local! {
    /// The error the layer being called recorded, if any.
    static LAST_ERROR: RefCell<Option<Error>> = const { RefCell::new(None) };
    /// The name of the layer being called; the server's own outside one.
    static LAYER: Cell<&'static str> = const { Cell::new("nbdhost") };
}

/// Record `e` as the current call's error, as `host->error` does.
pub fn record(e: Error) {
    LAST_ERROR.with(|l| *l.borrow_mut() = Some(e));
}

/// Run `f` as a call into `layer`, collecting the error it records.
pub fn call_layer<T>(layer: &'static str, f: impl FnOnce() -> T) -> T {
    let _restore = Restore::set(&LAYER, layer);
    // An error left by an earlier call must not answer for this one.
    LAST_ERROR.with(|e| e.borrow_mut().take());
    f()
}

/// The error the current callback recorded, or a generic `EIO`.
pub fn take_error(what: &str) -> Error {
    LAST_ERROR
        .with(|e| e.borrow_mut().take())
        .unwrap_or_else(|| Error::new(libc::EIO, format!("{what} failed")))
}

/// The name of the layer being called ("nbdhost" outside a call).
pub(crate) fn layer() -> &'static str {
    LAYER.with(|l| l.get())
}

/// The errno of the error recorded so far, 0 for none; the error stays
/// recorded.
pub(super) fn last_errno() -> i32 {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(0, Error::raw_errno))
}
