//! Asynchronous requests through a filter (ABI 1.9): starting them with
//! the filter's `async_*` callbacks, and the `next->async_*` calls a
//! filter makes on the layer below.
//!
//! A filter without a callback for a request passes it down unchanged, so
//! a filter that only changes what clients are told (its `can_*` answers,
//! its exports) never makes a chain synchronous. A filter with only the
//! synchronous callback runs it on the thread that starts the request (a
//! worker, as the chain is then not a non-blocking one).

use std::panic::{catch_unwind, AssertUnwindSafe};

use nbdhost_plugin_api::{abi, Error, Flags};

use super::backend::{run_sync, AsyncOp};
use super::filter::{next_of, FilterHandle};
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
    fn any(&self) -> bool {
        self.pread.is_some()
            || self.pwrite.is_some()
            || self.flush.is_some()
            || self.trim.is_some()
            || self.zero.is_some()
            || self.cache.is_some()
            || self.extents.is_some()
    }
}

impl FilterHandle {
    /// Whether requests through this handle can be started without
    /// waiting: the filter starts some itself, or passes them to a layer
    /// that does.
    pub(super) fn has_async(&self) -> bool {
        self.async_callbacks().any() || self.below().is_async()
    }

    /// Start `op` for `token`: with the filter's asynchronous callback,
    /// else its synchronous one here, else down unchanged.
    pub(super) fn start_async(&self, op: AsyncOp, token: Token) {
        let t = self.async_callbacks();
        let (next, h, req) = (self.next_table(), self.raw_handle(), token.as_ptr());
        // SAFETY (each call): the filter's callback with our next table and
        // its handle; the buffers and list stay valid, and the handle open,
        // until `token` completes.
        let started = match op {
            AsyncOp::Read {
                buf,
                len,
                offset,
                flags,
            } => t.pread.map(|f| {
                self.call(|| unsafe {
                    f(next, h, buf.cast(), len as u64, offset, flags.bits(), req)
                })
            }),
            AsyncOp::Write {
                buf,
                len,
                offset,
                flags,
            } => t.pwrite.map(|f| {
                self.call(|| unsafe {
                    f(next, h, buf.cast(), len as u64, offset, flags.bits(), req)
                })
            }),
            AsyncOp::Flush { flags } => t
                .flush
                .map(|f| self.call(|| unsafe { f(next, h, flags.bits(), req) })),
            AsyncOp::Trim {
                count,
                offset,
                flags,
            }
            | AsyncOp::Zero {
                count,
                offset,
                flags,
            }
            | AsyncOp::Cache {
                count,
                offset,
                flags,
            } => {
                let f = match op {
                    AsyncOp::Trim { .. } => t.trim,
                    AsyncOp::Zero { .. } => t.zero,
                    _ => t.cache,
                };
                f.map(|f| self.call(|| unsafe { f(next, h, count, offset, flags.bits(), req) }))
            }
            AsyncOp::Extents {
                count,
                offset,
                flags,
                list,
            } => t.extents.map(|f| {
                let list = list.cast::<abi::Extents>();
                self.call(|| unsafe { f(next, h, count, offset, flags.bits(), list, req) })
            }),
        };
        if started.is_some() {
            return;
        }
        if self.has_sync(&op) {
            let r = run_sync(self, &op);
            inflight::complete(token, r, self.lib_name());
        } else {
            self.below().start(op, token);
        }
    }
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
