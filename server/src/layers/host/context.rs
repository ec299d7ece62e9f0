//! Which connection the call into a layer running on this thread is made
//! for: the C edge's copy of what the server passes explicitly.
//!
//! Inside the server a call carries its connection as a value (the
//! chain's `open` takes it, and the handle it opens keeps it), but the C
//! host functions (`export_name`, `peer_name`, `is_tls`, ...) take no
//! argument: so around each call into a plugin's or filter's callback the
//! loader puts that call's connection in a thread-local, by a guard that
//! takes it out again on every exit, panics included. Nothing else sets
//! it. The thread-local holds a raw pointer because the connection is
//! borrowed for the call, not owned by it; this module's `unsafe` is
//! reading through that pointer.

use std::cell::Cell;
use std::sync::Arc;

use super::restore::Restore;
use crate::layers::connection::Connection;

thread_local! {
    /// The connection of the callback running on this thread; null
    /// outside one, and in a callback made for no connection.
    static CONTEXT: Cell<*const Arc<Connection>> = const { Cell::new(std::ptr::null()) };
}

/// Run `f`, a call into a layer's callback, for `conn` (`None`: for no
/// connection, as configuration, start-up and unload are), so that the
/// host functions it calls answer for that connection.
pub fn with_connection<T>(conn: Option<&Arc<Connection>>, f: impl FnOnce() -> T) -> T {
    let _restore = Restore::set(&CONTEXT, conn.map_or(std::ptr::null(), std::ptr::from_ref));
    f()
}

/// `f` of the connection the current callback is made for, if any.
/// Pointers into the connection that `f` returns stay valid for the rest
/// of the callback: the connection is borrowed for the whole of
/// `with_connection`, and [`Restore`] takes it out of the thread however
/// that call ends. (A plugin keeps them longer, as the ABI allows: the
/// handle it opened holds its connection until it is closed.)
pub(super) fn current<R>(f: impl FnOnce(&Connection) -> R) -> Option<R> {
    let cur = CONTEXT.with(|c| c.get());
    // SAFETY: CONTEXT is only non-null inside `with_connection`, whose
    // borrow outlives every call made within it and whose guard takes it
    // out again on every exit, panics included.
    unsafe { cur.as_ref() }.map(|c| f(c))
}

/// The connection the current callback is made for, to keep: for a
/// continuation, which runs for it later.
pub(crate) fn current_connection() -> Option<Arc<Connection>> {
    let cur = CONTEXT.with(|c| c.get());
    // SAFETY: as in `current`.
    unsafe { cur.as_ref() }.cloned()
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::sync::Arc;

    use super::super::call;
    use super::*;

    fn export_name() -> Option<CString> {
        current(|c| c.export_name.clone())
    }

    /// A filter's `next->open` runs the layer below for a renamed copy of
    /// its connection, built for that open, inside `below`'s
    /// `catch_unwind`: a panic down there drops that copy, and must leave
    /// this thread's connection, and the layer being called, as they were
    /// (else the next `export_name` reads freed memory).
    #[test]
    fn a_panic_below_a_renamed_open_leaves_the_thread_context_as_it_was() {
        let outer = Arc::new(Connection::default()).renamed(CString::new("outer").unwrap());
        with_connection(Some(&outer), || {
            call::call_layer("filter", || {
                let unwound = std::panic::catch_unwind(|| {
                    let inner = outer.renamed(CString::new("inner").unwrap());
                    with_connection(Some(&inner), || {
                        call::call_layer("plugin", || {
                            assert_eq!(export_name().unwrap().to_bytes(), b"inner");
                            panic!("below")
                        })
                    })
                });
                assert!(unwound.is_err());
                assert_eq!(export_name().unwrap().to_bytes(), b"outer");
                assert_eq!(call::layer(), "filter");
                // A callback made for no connection sees none, and the
                // connection again after it.
                with_connection(None, || assert_eq!(export_name(), None));
                assert_eq!(export_name().unwrap().to_bytes(), b"outer");
            });
        });
        assert_eq!(export_name(), None);
        assert_eq!(call::layer(), "nbdhost");
    }
}
