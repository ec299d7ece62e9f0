//! The asynchronous side of a filter's tables (ABI 1.9): the filter's
//! `async_*` callbacks, and the `next->async_*` calls it makes on the
//! layer below, behind the `struct nbdhost_next` the server gives it.
//!
//! A filter without a callback for a request passes it down unchanged, so
//! a filter that only changes what clients are told (its `can_*` answers,
//! its exports) never makes a chain synchronous. A filter with only the
//! synchronous callback runs it on the thread that starts the request (a
//! worker, as the chain is then not a non-blocking one).

use std::panic::{catch_unwind, AssertUnwindSafe};

use nbdhost_plugin_api::{abi, Error, Flags};

use super::backend::{AsyncOp, Handle};
use super::inflight::{self, Token};

/// A filter's asynchronous callbacks (ABI 1.9).
pub(super) struct AsyncCallbacks {
    pub pread: Option<abi::FilterAsyncPreadFn>,
    pub pwrite: Option<abi::FilterAsyncPwriteFn>,
    pub flush: Option<abi::FilterAsyncFlushFn>,
    pub trim: Option<abi::FilterAsyncRangeFn>,
    pub zero: Option<abi::FilterAsyncRangeFn>,
    pub cache: Option<abi::FilterAsyncRangeFn>,
    pub extents: Option<abi::FilterAsyncExtentsFn>,
}

impl AsyncCallbacks {
    /// Whether the filter starts any kind of request itself.
    pub(super) fn any(&self) -> bool {
        self.pread.is_some()
            || self.pwrite.is_some()
            || self.flush.is_some()
            || self.trim.is_some()
            || self.zero.is_some()
            || self.cache.is_some()
            || self.extents.is_some()
    }
}

/// Recover the next layer's handle from a `struct nbdhost_next`.
///
/// # Safety
/// `next` must be the `abi` table of a live `BelowHandle`.
pub(super) unsafe fn next_of<'a>(next: *const abi::Next) -> &'a dyn Handle {
    // SAFETY: guaranteed by the caller.
    unsafe { super::below::below_of(next) }.handle()
}

/// `next->async_*`: start `op` on the layer below for `req`. A panic in
/// the server's code down there answers the request (a completion that
/// already happened makes it a logged no-op) and never unwinds into the
/// filter.
///
/// # Safety
/// `next` must be the table of a live `BelowHandle`.
unsafe fn start_below(next: *const abi::Next, op: AsyncOp, req: *mut abi::Request) {
    let token = Token::from_ptr(req);
    // SAFETY: guaranteed by the caller.
    let below = unsafe { next_of(next) };
    if catch_unwind(AssertUnwindSafe(|| below.start(op, token))).is_err() {
        let e = Error::new(libc::EIO, "internal error in the layer below (panic)");
        inflight::complete(token, Err(e), "server");
    }
}

pub(super) unsafe extern "C" fn next_async_pread(
    next: *const abi::Next,
    buf: *mut std::ffi::c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut abi::Request,
) {
    let op = AsyncOp::Read {
        buf: buf.cast(),
        len: count as usize,
        offset,
        flags: Flags::from_bits_truncate(flags),
    };
    // SAFETY: filters only receive `next` from a live FilterHandle.
    unsafe { start_below(next, op, req) }
}

pub(super) unsafe extern "C" fn next_async_pwrite(
    next: *const abi::Next,
    buf: *const std::ffi::c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut abi::Request,
) {
    let op = AsyncOp::Write {
        buf: buf.cast(),
        len: count as usize,
        offset,
        flags: Flags::from_bits_truncate(flags),
    };
    // SAFETY: as above.
    unsafe { start_below(next, op, req) }
}

pub(super) unsafe extern "C" fn next_async_flush(
    next: *const abi::Next,
    flags: u32,
    req: *mut abi::Request,
) {
    let op = AsyncOp::Flush {
        flags: Flags::from_bits_truncate(flags),
    };
    // SAFETY: as above.
    unsafe { start_below(next, op, req) }
}

macro_rules! next_async_range {
    ($name:ident, $variant:ident) => {
        pub(super) unsafe extern "C" fn $name(
            next: *const abi::Next,
            count: u64,
            offset: u64,
            flags: u32,
            req: *mut abi::Request,
        ) {
            let op = AsyncOp::$variant {
                count,
                offset,
                flags: Flags::from_bits_truncate(flags),
            };
            // SAFETY: as above.
            unsafe { start_below(next, op, req) }
        }
    };
}

next_async_range!(next_async_trim, Trim);
next_async_range!(next_async_zero, Zero);
next_async_range!(next_async_cache, Cache);

pub(super) unsafe extern "C" fn next_async_extents(
    next: *const abi::Next,
    count: u64,
    offset: u64,
    flags: u32,
    extents: *mut abi::Extents,
    req: *mut abi::Request,
) {
    let op = AsyncOp::Extents {
        count,
        offset,
        flags: Flags::from_bits_truncate(flags),
        list: extents.cast(),
    };
    // SAFETY: as above; the list is the server's, from the request.
    unsafe { start_below(next, op, req) }
}
