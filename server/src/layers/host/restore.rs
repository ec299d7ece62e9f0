//! The guard that sets the host's per-thread state for the life of one
//! call, shared by the connection context and the call state.

use std::cell::Cell;
use std::thread::LocalKey;

/// Sets a thread-local cell for the life of a call and puts the previous
/// value back when dropped, on every exit: a panic unwinding out of the
/// call (caught further up, as a filter's `next` calls catch them) must
/// not leave the cell pointing into the call's dead stack.
pub(super) struct Restore<T: Copy + 'static> {
    key: &'static LocalKey<Cell<T>>,
    prev: T,
}

impl<T: Copy + 'static> Restore<T> {
    /// Put `value` in the cell `key` until the guard is dropped.
    pub(super) fn set(key: &'static LocalKey<Cell<T>>, value: T) -> Restore<T> {
        Restore {
            key,
            prev: key.with(|c| c.replace(value)),
        }
    }
}

impl<T: Copy + 'static> Drop for Restore<T> {
    fn drop(&mut self) {
        // (`try_with`: a thread being torn down has nothing to restore.)
        let _ = self.key.try_with(|c| c.set(self.prev));
    }
}
