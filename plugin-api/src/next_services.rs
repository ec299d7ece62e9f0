//! What a filter may do with the layer below besides calling it (since
//! ABI 1.10): open it again ([`Next::reopen`]), wait without holding a
//! thread ([`Next::after`]), and use it from a thread of its own
//! ([`Next::background`], [`Next::closing`]); and the `_then` forms of
//! the asynchronous calls that give the request itself back with the
//! layer below's answer, to pass it down again (a retry); and
//! [`Parked`], a request set aside with its layer below, to start later
//! from any thread (a pause).
//!
//! All four belong to the filter's handle whose `next` they are called
//! on: from its callbacks, from the continuations of its requests or
//! timers, or from its background jobs. The server keeps that handle,
//! and the layer below, open for as long as any of those can run: a
//! timer not yet due when the handle closes runs at the close with
//! `ECANCELED`, and the close waits for running jobs. On a server older
//! than 1.10 each fails with `ENOTSUP` (and `closing` says `false`).

use std::ffi::{c_int, c_void};
use std::time::Duration;

use crate::abi;
use crate::filter::Next;
use crate::host;
use crate::requests::{Completion, ExtentsRequest, RangeRequest, ReadRequest, WriteRequest};
use crate::{Error, Result};

/// The layer below's table, carried to a timer's continuation or a job's
/// thread; see the module's text for how long the server keeps it valid.
#[derive(Clone, Copy)]
struct RawNext(*const abi::Next);

// SAFETY: the server's next table may be called from any thread it runs
// this handle's continuations and jobs on.
unsafe impl Send for RawNext {}

impl RawNext {
    fn next(self) -> Next {
        Next::from_raw(self.0)
    }
}

/// What a `_then` continuation is given: the layer below, the request
/// back, and the layer below's answer.
type Then<R> = Box<dyn FnOnce(&Next, R, Result<()>) + Send>;

macro_rules! service {
    ($next:expr, $field:ident) => {{
        let t: &abi::Next = $next;
        let end = std::mem::offset_of!(abi::Next, $field) + std::mem::size_of::<usize>();
        if t.struct_size as usize >= end {
            t.$field
        } else {
            None
        }
    }};
}

fn unsupported(what: &str) -> Error {
    Error::new(
        libc::ENOTSUP,
        format!("{what}: the server is older than ABI 1.10"),
    )
}

fn result(r: c_int) -> Result<()> {
    if r < 0 {
        Err(Error::from_next(host::last_errno()))
    } else {
        Ok(())
    }
}

impl Next {
    /// Finalize the layer below and open it again, for the same connection
    /// and export, read-only if `readonly`: what a filter does to recover
    /// from a layer whose connection broke (the retry filter). Every later
    /// call through this `Next`, on any thread, goes to the new handle.
    ///
    /// The old handle is not closed now, since a request started on it
    /// may still be in flight: the server closes it with this filter's
    /// handle. On failure the layer below stays the old handle, unless its
    /// finalize succeeded and only the open failed; reopening again is
    /// the way out either way.
    pub fn reopen(&self, readonly: bool) -> Result<()> {
        let f = service!(self.table(), reopen).ok_or_else(|| unsupported("reopen"))?;
        // SAFETY: ABI call with the server's next table.
        result(unsafe { f(self.raw(), c_int::from(readonly)) })
    }

    /// Run `then` after `delay` without holding any thread meanwhile, on
    /// one of the server's worker threads, as a callback made for this
    /// connection: a back-off before retrying a request. `then` gets
    /// `Ok(())` when the delay has passed; an error with `ESHUTDOWN` when
    /// the server began shutting down first (at once, so a long delay
    /// never holds the exit up); or, only for a timer that was not set for
    /// a request in flight, `ECANCELED` when the handle closes first (it
    /// then runs on the closing thread and must not start requests).
    ///
    /// A request passed into `then` keeps the handle open until it is
    /// answered, so a timer set to retry it is never cancelled. When the
    /// timer cannot be set the error is returned and `then` is dropped
    /// without running (a request it owns is answered with an error by its
    /// drop).
    pub fn after(
        &self,
        delay: Duration,
        then: impl FnOnce(&Next, Result<()>) + Send + 'static,
    ) -> Result<()> {
        type Then = Box<dyn FnOnce(&Next, Result<()>) + Send>;
        unsafe extern "C" fn fire(data: *mut c_void, errnum: c_int) {
            // SAFETY: `data` is the box made below, given back exactly once.
            let (next, then) = *unsafe { Box::from_raw(data.cast::<(RawNext, Then)>()) };
            let r = if errnum == 0 {
                Ok(())
            } else {
                Err(Error::from_next(errnum))
            };
            crate::boundary::guard((), || {
                then(&Next::from_raw(next.0), r);
                Ok(())
            });
        }
        let f = service!(self.table(), after).ok_or_else(|| unsupported("after"))?;
        let nsec = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        let then: Then = Box::new(then);
        let data = Box::into_raw(Box::new((RawNext(self.raw()), then))).cast::<c_void>();
        // SAFETY: ABI call with the server's table; `fire` takes `data`
        // back exactly once if the call succeeds.
        let r = result(unsafe { f(self.raw(), nsec, fire, data) });
        if r.is_err() {
            // SAFETY: the server did not take `data`: free it here.
            drop(unsafe { Box::from_raw(data.cast::<(RawNext, Then)>()) });
        }
        r
    }

    /// Start `req` with `start` (`Next::async_pread` and the rest) once
    /// `delay` has passed, holding no thread meanwhile: a request held
    /// back on purpose (a delay, a rate limit). At shutdown the timer
    /// fires at once and the request fails with `ESHUTDOWN`; should no
    /// timer be possible, the request is answered with an error.
    pub fn start_after<R: InFlight>(&self, delay: Duration, req: R, start: fn(&Next, R)) {
        if delay.is_zero() {
            return start(self, req);
        }
        // When the timer cannot be set, the closure is dropped, and the
        // request with it, which answers it.
        let _ = self.after(delay, move |next, r| match r {
            Ok(()) => start(next, req),
            Err(e) => req.complete(Err(e)),
        });
    }

    /// Run `job` once on a thread of its own, outside any request, with
    /// the layer below open until it returns (this filter's handle is not
    /// closed while it runs): prefetching (readahead) or reading the
    /// whole disk ahead of the client (scan). The job may call every
    /// synchronous method of the `Next` it is given, beside the
    /// connection's requests; a long job checks [`Next::closing`] between
    /// calls and returns once it says `true`, since the close waits for
    /// it.
    ///
    /// Refused with `ENOTSUP` unless every layer below allows calls to
    /// overlap (thread model `Parallel`), and outside the callbacks of a
    /// client's connection (no thread may start before the server
    /// serves). When refused, `job` is dropped without running.
    pub fn background(&self, job: impl FnOnce(&Next) + Send + 'static) -> Result<()> {
        type Job = Box<dyn FnOnce(&Next) + Send>;
        unsafe extern "C" fn run(next: *const abi::Next, data: *mut c_void) {
            // SAFETY: `data` is the box made below, given back exactly once.
            let job = *unsafe { Box::from_raw(data.cast::<Job>()) };
            crate::boundary::guard((), || {
                job(&Next::from_raw(next));
                Ok(())
            });
        }
        let f = service!(self.table(), background).ok_or_else(|| unsupported("background"))?;
        let job: Job = Box::new(job);
        let data = Box::into_raw(Box::new(job)).cast::<c_void>();
        // SAFETY: ABI call with the server's table; `run` takes `data`
        // back exactly once if the call succeeds.
        let r = result(unsafe { f(self.raw(), run, data) });
        if r.is_err() {
            // SAFETY: the server did not take `data`: free it here.
            drop(unsafe { Box::from_raw(data.cast::<Job>()) });
        }
        r
    }

    /// Whether this filter's handle is closing or the server shutting
    /// down: a background job should return soon.
    pub fn closing(&self) -> bool {
        match service!(self.table(), closing) {
            // SAFETY: ABI call with the server's next table.
            Some(f) => (unsafe { f(self.raw()) }) > 0,
            None => false,
        }
    }
}

impl Next {
    /// Pass `req` to the layer below, then run `then` on a worker thread
    /// with the request back and the result: to answer it, or to pass it
    /// down again. As [`Next::async_pread_then`], for writes.
    pub fn async_pwrite_then(
        &self,
        req: WriteRequest,
        then: impl FnOnce(&Next, WriteRequest, Result<()>) + Send + 'static,
    ) {
        let (buf, len, offset, fl) = (req.as_ptr(), req.len(), req.offset(), req.flags());
        let below = RawNext(self.raw());
        let then: Then<WriteRequest> = Box::new(then);
        // Should no continuation be possible, dropping it drops `req`,
        // which answers the request with an error.
        let Ok(done) = Completion::then(move |r| then(&below.next(), req, r)) else {
            return;
        };
        // The data is `req`'s, which the continuation holds until `done`
        // completes.
        self.async_pwrite(WriteRequest::new(
            buf.cast(),
            len,
            offset,
            fl,
            done.into_raw(),
        ));
    }

    /// As [`Next::async_pwrite_then`], for a flush.
    pub fn async_flush_req_then(
        &self,
        req: RangeRequest,
        then: impl FnOnce(&Next, RangeRequest, Result<()>) + Send + 'static,
    ) {
        self.range_then(req, Box::new(then), Next::async_flush)
    }

    /// As [`Next::async_pwrite_then`], for a trim.
    pub fn async_trim_then(
        &self,
        req: RangeRequest,
        then: impl FnOnce(&Next, RangeRequest, Result<()>) + Send + 'static,
    ) {
        self.range_then(req, Box::new(then), Next::async_trim)
    }

    /// As [`Next::async_pwrite_then`], for a zero.
    pub fn async_zero_then(
        &self,
        req: RangeRequest,
        then: impl FnOnce(&Next, RangeRequest, Result<()>) + Send + 'static,
    ) {
        self.range_then(req, Box::new(then), Next::async_zero)
    }

    /// As [`Next::async_pwrite_then`], for a cache request.
    pub fn async_cache_then(
        &self,
        req: RangeRequest,
        then: impl FnOnce(&Next, RangeRequest, Result<()>) + Send + 'static,
    ) {
        self.range_then(req, Box::new(then), Next::async_cache)
    }

    fn range_then(
        &self,
        req: RangeRequest,
        then: Then<RangeRequest>,
        start: fn(&Next, RangeRequest),
    ) {
        let (count, offset, fl) = (req.count(), req.offset(), req.flags());
        let below = RawNext(self.raw());
        let Ok(done) = Completion::then(move |r| then(&below.next(), req, r)) else {
            return;
        };
        start(self, RangeRequest::new(count, offset, fl, done.into_raw()));
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A client's request in flight, which keeps its handle (and so the
/// layer below it) open until it is answered.
pub trait InFlight: sealed::Sealed + Send + 'static {
    /// Answer the request (each type's own `complete`), for code that
    /// holds any of them: a filter that may fail a request it would
    /// otherwise pass down.
    fn complete(self, r: Result<()>);

    /// The request with a continuation in front of its answer (each
    /// type's own `then`).
    fn then(self, f: impl FnOnce(Result<()>) -> Result<()> + Send + 'static) -> Option<Self>
    where
        Self: Sized;
}

macro_rules! in_flight {
    ($($t:ty),*) => {
        $(
            impl sealed::Sealed for $t {}
            impl InFlight for $t {
                fn complete(self, r: Result<()>) {
                    <$t>::complete(self, r)
                }
                fn then(
                    self,
                    f: impl FnOnce(Result<()>) -> Result<()> + Send + 'static,
                ) -> Option<Self> {
                    <$t>::then(self, f)
                }
            }
        )*
    };
}

in_flight!(ReadRequest, WriteRequest, RangeRequest, ExtentsRequest);

/// A request set aside together with the layer below it is for, to be
/// started later from any thread: what the pause filter keeps while
/// requests are held. Safe because the request, not yet answered, keeps
/// the handle and its layer below open.
pub struct Parked<R: InFlight> {
    next: RawNext,
    req: R,
}

impl Next {
    /// Set `req` aside with this layer below, to start later with
    /// [`Parked::resume`].
    pub fn park<R: InFlight>(&self, req: R) -> Parked<R> {
        Parked {
            next: RawNext(self.raw()),
            req,
        }
    }
}

impl<R: InFlight> Parked<R> {
    /// Take the request back, with the layer below to pass it to.
    pub fn resume(self, f: impl FnOnce(&Next, R)) {
        f(&self.next.next(), self.req)
    }
}
