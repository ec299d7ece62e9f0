//! Asynchronous requests (since ABI 1.9): a request is started by a
//! callback that returns at once, and answered later, from any thread,
//! through its [`Completion`].
//!
//! The types own what the server lent for the request: a read's buffer, a
//! write's data, an extents list. They are usable until the request is
//! completed, which consumes them, so a buffer can never be touched after
//! the server has taken it back. A request dropped without an answer is
//! answered with `EIO`: none is ever lost, and none is answered twice.

use std::ffi::{c_int, c_void};

use crate::abi;
use crate::data::{ExtentList, Flags};
use crate::host;
use crate::{Error, Result};

/// The answer of one asynchronous request, to give exactly once.
pub struct Completion {
    req: *mut abi::Request,
}

// SAFETY: the server's token may be completed from any thread (ABI 1.9).
unsafe impl Send for Completion {}

impl Completion {
    pub(crate) fn from_raw(req: *mut abi::Request) -> Completion {
        Completion { req }
    }

    pub(crate) fn into_raw(self) -> *mut abi::Request {
        let req = self.req;
        std::mem::forget(self);
        req
    }

    /// A completion that, instead of answering anyone, runs `then` with
    /// the result on one of the server's worker threads, as a callback
    /// made for the current connection: for a filter that acts on what the
    /// layer below answered. Only inside a filter's callback made for a
    /// connection.
    pub fn then(then: impl FnOnce(Result<()>) + Send + 'static) -> Result<Completion> {
        type Then = Box<dyn FnOnce(Result<()>) + Send>;
        unsafe extern "C" fn run(data: *mut c_void, errnum: c_int) {
            // SAFETY: `data` is the box made below, given back exactly once.
            let then = unsafe { Box::from_raw(data.cast::<Then>()) };
            let r = if errnum == 0 {
                Ok(())
            } else {
                Err(Error::from_next(errnum))
            };
            crate::boundary::guard((), || {
                then(r);
                Ok(())
            });
        }
        let data: Box<Then> = Box::new(Box::new(then));
        let data = Box::into_raw(data).cast::<c_void>();
        match host::request_then(run, data) {
            Ok(req) => Ok(Completion { req }),
            Err(e) => {
                // SAFETY: the server did not take `data`: free it here.
                drop(unsafe { Box::from_raw(data.cast::<Then>()) });
                Err(e)
            }
        }
    }

    /// Answer the request.
    pub fn complete(self, r: Result<()>) {
        host::complete(self.into_raw(), r);
    }

    /// This completion with `f` in front: once the request is answered
    /// below, `f` runs on a worker thread with the result, and what it
    /// returns answers the request. `None` when no continuation could be
    /// made: the request has then been answered with the error.
    fn wrapped(self, f: impl FnOnce(Result<()>) -> Result<()> + Send + 'static) -> Option<Self> {
        Completion::then(move |r| self.complete(f(r))).ok()
    }
}

/// `then` for each request type: the request with a continuation in front
/// of its answer, for a filter that acts on the result (counts it, times
/// it) without touching the data.
macro_rules! then {
    ($t:ident { $($field:ident),* }) => {
        impl $t {
            /// Once the layer below answers this request, run `f` on a
            /// worker thread with the result; what `f` returns answers the
            /// request. `None` when no continuation could be made: the
            /// request has then been answered with the error.
            pub fn then(
                self,
                f: impl FnOnce(Result<()>) -> Result<()> + Send + 'static,
            ) -> Option<Self> {
                let $t { done, $($field),* } = self;
                let done = done.wrapped(f)?;
                Some($t { done, $($field),* })
            }
        }
    };
}

then!(ReadRequest {
    buf,
    len,
    offset,
    flags
});
then!(WriteRequest {
    buf,
    len,
    offset,
    flags
});
then!(RangeRequest {
    count,
    offset,
    flags
});
then!(ExtentsRequest {
    count,
    offset,
    flags,
    list
});

impl Drop for Completion {
    fn drop(&mut self) {
        host::complete(
            self.req,
            Err(Error::new(libc::EIO, "request dropped without an answer")),
        );
    }
}

/// An asynchronous read: fill [`ReadRequest::buf`], then complete it.
pub struct ReadRequest {
    buf: *mut u8,
    len: usize,
    offset: u64,
    flags: Flags,
    done: Completion,
}

// SAFETY: the buffer is the request's alone until it completes, and the
// server does not touch it meanwhile.
unsafe impl Send for ReadRequest {}

impl ReadRequest {
    pub(crate) fn new(
        buf: *mut c_void,
        len: usize,
        offset: u64,
        flags: Flags,
        req: *mut abi::Request,
    ) -> ReadRequest {
        ReadRequest {
            buf: buf.cast(),
            len,
            offset,
            flags,
            done: Completion::from_raw(req),
        }
    }

    /// The buffer to fill.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the server lends `len` writable bytes until completion,
        // which consumes `self`.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.len) }
    }

    /// Where the buffer stays until completion, for I/O the kernel or a
    /// library performs into it (io_uring, librbd): keep the request
    /// until that I/O has finished.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Read elsewhere: a filter mapping the request onto the layer below.
    pub fn set_offset(&mut self, offset: u64) {
        self.offset = offset;
    }

    /// Keep only the first `len` bytes (no more than [`ReadRequest::len`]):
    /// the layer below reads no further. The filter fills the rest first
    /// (zeroes past a disk's end, say): it is out of reach afterwards.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// Answer the read: the buffer goes back to the server.
    pub fn complete(self, r: Result<()>) {
        self.done.complete(r);
    }

    /// The raw parts, for passing the request down: buffer, length,
    /// offset, flags and the server's token.
    pub(crate) fn into_raw(self) -> (*mut c_void, u64, u64, u32, *mut abi::Request) {
        (
            self.buf.cast(),
            self.len as u64,
            self.offset,
            self.flags.bits(),
            self.done.into_raw(),
        )
    }
}

/// An asynchronous write: write [`WriteRequest::buf`], then complete it.
pub struct WriteRequest {
    buf: *const u8,
    len: usize,
    offset: u64,
    flags: Flags,
    done: Completion,
}

// SAFETY: as for ReadRequest.
unsafe impl Send for WriteRequest {}

impl WriteRequest {
    pub(crate) fn new(
        buf: *const c_void,
        len: usize,
        offset: u64,
        flags: Flags,
        req: *mut abi::Request,
    ) -> WriteRequest {
        WriteRequest {
            buf: buf.cast(),
            len,
            offset,
            flags,
            done: Completion::from_raw(req),
        }
    }

    /// The data to write.
    pub fn buf(&self) -> &[u8] {
        // SAFETY: the server lends `len` readable bytes until completion,
        // which consumes `self`.
        unsafe { std::slice::from_raw_parts(self.buf, self.len) }
    }

    /// Where the data stays until completion (see
    /// [`ReadRequest::as_mut_ptr`]).
    pub fn as_ptr(&self) -> *const u8 {
        self.buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Write elsewhere: a filter mapping the request onto the layer below.
    pub fn set_offset(&mut self, offset: u64) {
        self.offset = offset;
    }

    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// Keep only the first `len` bytes (no more than
    /// [`WriteRequest::len`]): the layer below writes no further.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Change the flags passed down (a filter dropping FUA it handles).
    pub fn set_flags(&mut self, flags: Flags) {
        self.flags = flags;
    }

    /// Answer the write.
    pub fn complete(self, r: Result<()>) {
        self.done.complete(r);
    }

    pub(crate) fn into_raw(self) -> (*const c_void, u64, u64, u32, *mut abi::Request) {
        (
            self.buf.cast(),
            self.len as u64,
            self.offset,
            self.flags.bits(),
            self.done.into_raw(),
        )
    }
}

/// An asynchronous flush, trim, zero or cache: a range (empty for a
/// flush) and flags.
pub struct RangeRequest {
    count: u64,
    offset: u64,
    flags: Flags,
    done: Completion,
}

impl RangeRequest {
    pub(crate) fn new(count: u64, offset: u64, flags: Flags, req: *mut abi::Request) -> Self {
        RangeRequest {
            count,
            offset,
            flags,
            done: Completion::from_raw(req),
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Act elsewhere: a filter mapping the request onto the layer below.
    pub fn set_offset(&mut self, offset: u64) {
        self.offset = offset;
    }

    /// Keep only the first `count` bytes of the range (no more than
    /// [`RangeRequest::count`]): the layer below acts no further.
    pub fn truncate(&mut self, count: u64) {
        self.count = self.count.min(count);
    }

    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// Change the flags passed down (a filter adding or dropping FUA, or
    /// dropping `MAY_TRIM` from a zero).
    pub fn set_flags(&mut self, flags: Flags) {
        self.flags = flags;
    }

    /// Answer the request.
    pub fn complete(self, r: Result<()>) {
        self.done.complete(r);
    }

    pub(crate) fn into_raw(self) -> (u64, u64, u32, *mut abi::Request) {
        (
            self.count,
            self.offset,
            self.flags.bits(),
            self.done.into_raw(),
        )
    }
}

/// An asynchronous extents request: fill [`ExtentsRequest::list`], then
/// complete it.
pub struct ExtentsRequest {
    count: u64,
    offset: u64,
    flags: Flags,
    list: ExtentList,
    done: Completion,
}

// SAFETY: the list is the request's alone until it completes.
unsafe impl Send for ExtentsRequest {}

impl ExtentsRequest {
    pub(crate) fn new(
        count: u64,
        offset: u64,
        flags: Flags,
        list: *mut abi::Extents,
        req: *mut abi::Request,
    ) -> Self {
        ExtentsRequest {
            count,
            offset,
            flags,
            list: ExtentList::from_raw(list),
            done: Completion::from_raw(req),
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn set_offset(&mut self, offset: u64) {
        self.offset = offset;
    }

    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// The list to add extents to.
    pub fn list(&mut self) -> &mut ExtentList {
        &mut self.list
    }

    /// Answer the request.
    pub fn complete(self, r: Result<()>) {
        self.done.complete(r);
    }

    pub(crate) fn into_raw(mut self) -> (u64, u64, u32, *mut abi::Extents, *mut abi::Request) {
        (
            self.count,
            self.offset,
            self.flags.bits(),
            self.list.raw(),
            self.done.into_raw(),
        )
    }
}
