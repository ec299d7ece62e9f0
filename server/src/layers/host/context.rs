//! Which connection the call running on this thread is made for.
//!
//! Inside the server a call carries its connection as a value, but the C
//! host functions (`export_name`, `peer_name`, `is_tls`, ...) take no
//! argument: so around each call into a layer the connection is put in a
//! thread-local, by a guard that takes it out again on every exit, panics
//! included. The thread-local holds a raw pointer because the connection
//! is borrowed for the call, not owned by it; this module's `unsafe` is
//! reading through that pointer.

use std::cell::Cell;
use std::ffi::CString;

use super::connection::ConnContext;
use super::restore::Restore;

thread_local! {
    /// The connection of the call running on this thread; null outside
    /// one.
    static CONTEXT: Cell<*const ConnContext> = const { Cell::new(std::ptr::null()) };
}

/// Run `f` on behalf of a connection, so that `export_name` and
/// `peer_name` answer for it.
pub fn with_context<T>(ctx: &ConnContext, f: impl FnOnce() -> T) -> T {
    let _restore = Restore::set(&CONTEXT, ctx);
    f()
}

/// Run `f` for the current connection but under another export name, as
/// a filter opening the next layer may ask.
pub fn with_export_name<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let cur = CONTEXT.with(|c| c.get());
    // SAFETY: CONTEXT is only non-null inside `with_context`, whose guard
    // takes it out again on every exit.
    let ctx = match unsafe { cur.as_ref() } {
        Some(c) => c.renamed(name),
        None => ConnContext {
            export_name: CString::new(name).unwrap_or_default(),
            ..Default::default()
        },
    };
    with_context(&ctx, f)
}

/// `f` of the connection the current call is made for, if any. Pointers
/// into the context that `f` returns stay valid for the rest of the call:
/// the context outlives every call made within `with_context`, and
/// [`Restore`] takes it out of the thread however that call ends.
pub(super) fn current<R>(f: impl FnOnce(&ConnContext) -> R) -> Option<R> {
    let cur = CONTEXT.with(|c| c.get());
    // SAFETY: CONTEXT is only non-null inside `with_context`, whose borrow
    // outlives every call made within it and whose guard takes it out
    // again on every exit, panics included.
    unsafe { cur.as_ref() }.map(f)
}

/// The export name of the current connection ("" outside one).
pub fn export_name() -> CString {
    current(|c| c.export_name.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::super::call;
    use super::*;

    /// A filter's `next->open` runs the layer below under the name the
    /// filter asked for (`with_export_name`), inside `below`'s
    /// `catch_unwind`: a panic down there must leave this thread's
    /// connection, and the layer being called, as they were.
    #[test]
    fn a_panic_below_a_renamed_open_leaves_the_thread_context_as_it_was() {
        let outer = ConnContext {
            export_name: CString::new("outer").unwrap(),
            ..Default::default()
        };
        with_context(&outer, || {
            call::call_layer("filter", || {
                let unwound = std::panic::catch_unwind(|| {
                    with_export_name("inner", || call::call_layer("plugin", || panic!("below")))
                });
                assert!(unwound.is_err());
                assert_eq!(export_name().to_bytes(), b"outer");
                assert_eq!(call::layer(), "filter");
            });
        });
        assert_eq!(export_name().to_bytes(), b"");
        assert_eq!(call::layer(), "nbdhost");
    }
}
