//! Asynchronous requests through a filter (since ABI 1.9): the layer
//! below started without waiting ([`Next::async_pread`] and the rest).
//!
//! A filter that has nothing to do after the layer below answers passes
//! the request itself down, so it stays asynchronous at no cost. One that
//! must act on the answer uses a `_then` method: the request goes down
//! with a continuation, which the server runs on one of its worker
//! threads (never on a client library's callback thread), with the
//! request handed back to answer.

use crate::abi;
use crate::filter::Next;
use crate::requests::{Completion, ExtentsRequest, RangeRequest, ReadRequest, WriteRequest};
use crate::{Flags, Result};

/// The layer below's table, carried into a continuation. The server keeps
/// it as long as the filter's handle is open, and the handle stays open
/// while a request on it is in flight, as the continuation's own is.
#[derive(Clone, Copy)]
struct RawNext(*const abi::Next);

// SAFETY: see above; the server's next table may be called from any
// thread the server runs a callback of this handle on.
unsafe impl Send for RawNext {}

impl RawNext {
    fn next(self) -> Next {
        Next::from_raw(self.0)
    }
}

/// Whether the server's next table has the asynchronous field that ends
/// at `end` (an older server's does not: the synchronous call serves).
fn has(next: &abi::Next, end: usize) -> bool {
    next.struct_size as usize >= end
}

macro_rules! async_field {
    ($next:expr, $field:ident) => {{
        let t: &abi::Next = $next;
        let end = std::mem::offset_of!(abi::Next, $field) + std::mem::size_of::<usize>();
        if has(t, end) {
            t.$field
        } else {
            None
        }
    }};
}

impl Next {
    /// Pass `req` to the layer below, which answers it.
    pub fn async_pread(&self, mut req: ReadRequest) {
        match async_field!(self.table(), async_pread) {
            Some(f) => {
                let (buf, len, offset, fl, r) = req.into_raw();
                // SAFETY: the buffer and token come from the server and stay
                // valid until the token completes.
                unsafe { f(self.raw(), buf, len, offset, fl, r) }
            }
            None => {
                let (offset, fl) = (req.offset(), req.flags());
                let r = self.pread(req.buf(), offset, fl);
                req.complete(r);
            }
        }
    }

    /// Pass `req` to the layer below, which answers it.
    pub fn async_pwrite(&self, req: WriteRequest) {
        match async_field!(self.table(), async_pwrite) {
            Some(f) => {
                let (buf, len, offset, fl, r) = req.into_raw();
                // SAFETY: as for async_pread.
                unsafe { f(self.raw(), buf, len, offset, fl, r) }
            }
            None => {
                let r = self.pwrite(req.buf(), req.offset(), req.flags());
                req.complete(r);
            }
        }
    }

    /// Pass `req` (a flush) to the layer below, which answers it.
    pub fn async_flush(&self, req: RangeRequest) {
        match async_field!(self.table(), async_flush) {
            Some(f) => {
                let (_, _, fl, r) = req.into_raw();
                // SAFETY: the token comes from the server.
                unsafe { f(self.raw(), fl, r) }
            }
            None => {
                let r = self.flush(req.flags());
                req.complete(r);
            }
        }
    }

    /// Pass `req` (a trim) to the layer below, which answers it.
    pub fn async_trim(&self, req: RangeRequest) {
        match async_field!(self.table(), async_trim) {
            Some(f) => self.range(f, req),
            None => {
                let r = self.trim(req.count(), req.offset(), req.flags());
                req.complete(r);
            }
        }
    }

    /// Pass `req` (a zero) to the layer below, which answers it.
    pub fn async_zero(&self, req: RangeRequest) {
        match async_field!(self.table(), async_zero) {
            Some(f) => self.range(f, req),
            None => {
                let r = self.zero(req.count(), req.offset(), req.flags());
                req.complete(r);
            }
        }
    }

    /// Pass `req` (a cache) to the layer below, which answers it.
    pub fn async_cache(&self, req: RangeRequest) {
        match async_field!(self.table(), async_cache) {
            Some(f) => self.range(f, req),
            None => {
                let r = self.cache(req.count(), req.offset(), req.flags());
                req.complete(r);
            }
        }
    }

    fn range(&self, f: abi::NextAsyncRangeFn, req: RangeRequest) {
        let (count, offset, fl, r) = req.into_raw();
        // SAFETY: the token comes from the server.
        unsafe { f(self.raw(), count, offset, fl, r) }
    }

    /// Pass `req` to the layer below, which answers it.
    pub fn async_extents(&self, mut req: ExtentsRequest) {
        match async_field!(self.table(), async_extents) {
            Some(f) => {
                let (count, offset, fl, list, r) = req.into_raw();
                // SAFETY: the list and token come from the server and stay
                // valid until the token completes.
                unsafe { f(self.raw(), count, offset, fl, list, r) }
            }
            None => {
                let (count, offset, fl) = (req.count(), req.offset(), req.flags());
                let r = self.extents_into(count, offset, fl, req.list());
                req.complete(r);
            }
        }
    }

    /// Read from the layer below into `req`'s buffer, at `req`'s offset,
    /// then run `then` on a worker thread with the request and the result,
    /// to act on the data (decrypt it, say) and answer the request.
    pub fn async_pread_then(
        &self,
        mut req: ReadRequest,
        then: impl FnOnce(&Next, ReadRequest, Result<()>) + Send + 'static,
    ) {
        let (buf, len, offset, fl) = (req.as_mut_ptr(), req.len(), req.offset(), req.flags());
        let below = RawNext(self.raw());
        // Should no continuation be possible, dropping it drops `req`,
        // which answers the request with an error.
        let Ok(done) = Completion::then(move |r| then(&below.next(), req, r)) else {
            return;
        };
        // SAFETY: the buffer is `req`'s, which the continuation holds until
        // `done` completes.
        unsafe { self.start_read(buf, len, offset, fl, done) }
    }

    /// Read into `data`, a buffer of the filter's own (whole sectors
    /// around an unaligned request, say), from the layer below at
    /// `offset`, then run `then` on a worker thread with the buffer back
    /// and the result.
    pub fn async_pread_owned(
        &self,
        mut data: Vec<u8>,
        offset: u64,
        fl: Flags,
        then: impl FnOnce(&Next, Vec<u8>, Result<()>) + Send + 'static,
    ) {
        let (ptr, len) = (data.as_mut_ptr(), data.len());
        let below = RawNext(self.raw());
        let Ok(done) = Completion::then(move |r| then(&below.next(), data, r)) else {
            return;
        };
        // SAFETY: the buffer is `data`'s, which the continuation holds
        // until `done` completes; a Vec's heap storage does not move.
        unsafe { self.start_read(ptr, len, offset, fl, done) }
    }

    /// Write `data`, a buffer of the filter's own (encrypted data, say), to
    /// the layer below at `offset`, then run `then` on a worker thread
    /// with the buffer back and the result.
    pub fn async_pwrite_owned(
        &self,
        data: Vec<u8>,
        offset: u64,
        fl: Flags,
        then: impl FnOnce(&Next, Vec<u8>, Result<()>) + Send + 'static,
    ) {
        let (ptr, len) = (data.as_ptr(), data.len());
        let below = RawNext(self.raw());
        let Ok(done) = Completion::then(move |r| then(&below.next(), data, r)) else {
            return;
        };
        // SAFETY: the buffer is `data`'s, which the continuation holds
        // until `done` completes; a Vec's heap storage does not move.
        unsafe { self.start_write(ptr, len, offset, fl, done) }
    }

    /// Flush the layer below, then run `then` on a worker thread with the
    /// result.
    pub fn async_flush_then(
        &self,
        fl: Flags,
        then: impl FnOnce(&Next, Result<()>) + Send + 'static,
    ) {
        let below = RawNext(self.raw());
        let Ok(done) = Completion::then(move |r| then(&below.next(), r)) else {
            return;
        };
        self.async_flush(RangeRequest::new(0, 0, fl, done.into_raw()));
    }

    /// # Safety
    /// `buf` must stay writable for `len` bytes until `done` completes.
    unsafe fn start_read(
        &self,
        buf: *mut u8,
        len: usize,
        offset: u64,
        fl: Flags,
        done: Completion,
    ) {
        self.async_pread(ReadRequest::new(
            buf.cast(),
            len,
            offset,
            fl,
            done.into_raw(),
        ));
    }

    /// # Safety
    /// `buf` must stay readable for `len` bytes until `done` completes.
    unsafe fn start_write(
        &self,
        buf: *const u8,
        len: usize,
        offset: u64,
        fl: Flags,
        done: Completion,
    ) {
        self.async_pwrite(WriteRequest::new(
            buf.cast(),
            len,
            offset,
            fl,
            done.into_raw(),
        ));
    }
}
