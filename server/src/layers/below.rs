//! The layer below a filter's handle, as the filter's `struct
//! nbdhost_next` reaches it, and what ABI 1.10 lets a filter do with it
//! outside a plain call: open it again (`reopen`), wait without a thread
//! (`after`), and use it from a thread of its own (`background`).
//!
//! Who owns what, and why each is safe against the handle's close:
//!
//! - The handle calls go to is swapped by `reopen`; the one it replaces
//!   is finalized at once but closed only with the filter's handle,
//!   because a request started on it may still be in flight (the server
//!   does not count a filter's requests below it, so as not to tax every
//!   request for the rare reopen). A call reads the current handle with
//!   one atomic load.
//! - Timers and background jobs are counted here. The filter's close
//!   first marks the layer closing (no new ones), runs every timer not
//!   yet due with `ECANCELED` on its own thread, and waits for
//!   continuations and jobs already running to return. A timer set for a
//!   request in flight never meets that close: the request keeps the
//!   handle open until it completes.
//! - Shutdown fires timers early (`ESHUTDOWN`) and makes `closing` say 1,
//!   so neither holds the exit up.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nbdhost_plugin_api::{abi, Error, Result};

use super::backend::{Backend, Handle};
use super::connection::Connection;
use super::host::{call, context, shutdown, timer};
use super::inflight;

/// How to open the layer below again: what opened it first.
pub(super) struct Opener {
    pub backend: Arc<dyn Backend>,
    /// The connection the layer below was opened for (under the export
    /// name the filter chose).
    pub conn: Arc<Connection>,
}

/// What a filter's `struct nbdhost_next` points at.
pub(super) struct Below {
    /// The handle calls go to, from `Box::into_raw`; owned here.
    current: AtomicPtr<Box<dyn Handle>>,
    /// Handles `reopen` replaced, finalized, to close when this is
    /// dropped; the lock also keeps two reopens from overlapping.
    retired: Mutex<Vec<Box<dyn Handle>>>,
    opener: Opener,
    /// Every layer below allows calls to overlap, so a background job may
    /// run beside the connection's requests.
    parallel: bool,
    /// Timers and jobs, shared with the timer thread and the pool, which
    /// may still hold it after the close.
    work: Arc<Work>,
}

/// A timer's or job's continuation, with the call it runs for.
struct Pending {
    done: abi::ContinuationFn,
    data: *mut c_void,
    conn: Arc<Connection>,
    layer: &'static str,
}

// SAFETY: the filter hands `data` to the server for the continuation,
// which runs it once, on whichever thread fires it.
unsafe impl Send for Pending {}

impl Pending {
    fn run(self, errnum: c_int) {
        context::with_connection(Some(&self.conn), || {
            call::call_layer(self.layer, || {
                // SAFETY: the filter's continuation with its own data, run
                // once, as `after` promised.
                unsafe { (self.done)(self.data, errnum) }
            })
        });
    }
}

#[derive(Default)]
struct WorkState {
    closing: bool,
    /// Continuations and jobs running now.
    running: usize,
    /// Timers not yet fired, by number.
    timers: HashMap<u64, Pending>,
    next_timer: u64,
}

#[derive(Default)]
struct Work {
    state: Mutex<WorkState>,
    idle: Condvar,
}

impl Work {
    fn lock(&self) -> MutexGuard<'_, WorkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn finished_one(&self) {
        self.lock().running -= 1;
        self.idle.notify_all();
    }

    /// Timer `id` fired (`early`: at shutdown): run its continuation on
    /// the pool, unless the close cancelled it first.
    fn fire(self: Arc<Work>, id: u64, early: bool) {
        inflight::execute(Box::new(move || {
            let pending = {
                let mut s = self.lock();
                let p = s.timers.remove(&id);
                if p.is_some() {
                    s.running += 1;
                }
                p
            };
            if let Some(p) = pending {
                p.run(if early { libc::ESHUTDOWN } else { 0 });
                self.finished_one();
            }
        }));
    }
}

impl Below {
    pub(super) fn new(handle: Box<dyn Handle>, opener: Opener) -> Below {
        let parallel = opener.backend.thread_model() == nbdhost_plugin_api::ThreadModel::Parallel;
        Below {
            current: AtomicPtr::new(Box::into_raw(Box::new(handle))),
            retired: Mutex::new(Vec::new()),
            opener,
            parallel,
            work: Arc::default(),
        }
    }

    /// The handle calls go to now.
    pub(super) fn handle(&self) -> &dyn Handle {
        // SAFETY: `current` always holds a live box from `into_raw`, and
        // a replaced one stays alive in `retired` until `self` is dropped.
        unsafe { &**self.current.load(Ordering::Acquire) }
    }

    /// `next->reopen`: finalize the current handle, open a new one, and
    /// send later calls to it.
    fn reopen(&self, readonly: bool) -> Result<()> {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        self.handle().finalize()?;
        let conn = self.opener.conn.clone();
        let new = self.opener.backend.open(conn, readonly)?;
        let old = self
            .current
            .swap(Box::into_raw(Box::new(new)), Ordering::AcqRel);
        // SAFETY: `old` came from `Box::into_raw` and is no longer in
        // `current`; it is kept, not freed, until `self` is dropped.
        retired.push(*unsafe { Box::from_raw(old) });
        Ok(())
    }

    /// Whether the filter's handle is closing or the server shutting down.
    fn closing(&self) -> bool {
        self.work.lock().closing || shutdown::shutting_down()
    }

    /// The connection and layer of the callback calling now, for work
    /// that runs later; refused outside a connection's callbacks (at
    /// start-up no thread may be started: the server forks after it).
    fn caller(what: &str) -> Result<(Arc<Connection>, &'static str)> {
        match context::current_connection() {
            Some(c) if c.id != 0 => Ok((c, call::layer())),
            _ => Err(Error::new(
                libc::EINVAL,
                format!("{what} outside a callback made for a client's connection"),
            )),
        }
    }

    /// `next->after`.
    fn after(&self, delay: Duration, done: abi::ContinuationFn, data: *mut c_void) -> Result<()> {
        let (conn, layer) = Self::caller("after")?;
        let id = {
            let mut s = self.work.lock();
            if s.closing {
                return Err(Error::new(libc::ECANCELED, "after: the handle is closing"));
            }
            s.next_timer += 1;
            let id = s.next_timer;
            let pending = Pending {
                done,
                data,
                conn,
                layer,
            };
            s.timers.insert(id, pending);
            id
        };
        let work = self.work.clone();
        let at = Instant::now().checked_add(delay).unwrap_or_else(|| {
            // Far enough: shutdown fires it anyway.
            Instant::now() + Duration::from_secs(u32::MAX.into())
        });
        timer::at(at, Box::new(move |early| work.fire(id, early))).map_err(|e| {
            self.work.lock().timers.remove(&id);
            Error::new(libc::EAGAIN, format!("after: cannot start the timer: {e}"))
        })
    }

    /// `next->background`.
    fn background(
        &self,
        next: *const abi::Next,
        job: abi::BackgroundFn,
        data: *mut c_void,
    ) -> Result<()> {
        let (conn, layer) = Self::caller("background")?;
        if !self.parallel {
            return Err(Error::new(
                libc::ENOTSUP,
                "background: a layer below does not allow overlapping calls (thread model)",
            ));
        }
        {
            let mut s = self.work.lock();
            if s.closing {
                return Err(Error::new(
                    libc::ECANCELED,
                    "background: the handle is closing",
                ));
            }
            s.running += 1;
        }
        let run = BackgroundRun {
            next,
            job,
            data,
            conn,
            layer,
            work: self.work.clone(),
        };
        std::thread::Builder::new()
            .name(format!("{layer}-bg"))
            .spawn(move || run.run())
            .map(drop)
            .map_err(|e| {
                self.work.finished_one();
                Error::new(
                    libc::EAGAIN,
                    format!("background: cannot start a thread: {e}"),
                )
            })
    }

    /// The filter's handle is closing: no new timers or jobs; pending
    /// timers run now with `ECANCELED`; wait for running ones.
    pub(super) fn quiesce(&self) {
        let cancelled: Vec<Pending> = {
            let mut s = self.work.lock();
            s.closing = true;
            s.timers.drain().map(|(_, p)| p).collect()
        };
        for p in cancelled {
            p.run(libc::ECANCELED);
        }
        let mut s = self.work.lock();
        while s.running > 0 {
            s = self.work.idle.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Below {
    fn drop(&mut self) {
        // SAFETY: `current` holds a box from `into_raw`, freed only here.
        drop(unsafe { Box::from_raw(*self.current.get_mut()) });
    }
}

/// A background job on its thread.
struct BackgroundRun {
    next: *const abi::Next,
    job: abi::BackgroundFn,
    data: *mut c_void,
    conn: Arc<Connection>,
    layer: &'static str,
    work: Arc<Work>,
}

// SAFETY: `next` is the table of a handle that is not closed while the
// job runs (its close waits on `work`), and `data` is the filter's, handed
// over for the job.
unsafe impl Send for BackgroundRun {}

impl BackgroundRun {
    fn run(self) {
        let (next, job, data) = (self.next, self.job, self.data);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            context::with_connection(Some(&self.conn), || {
                // SAFETY: the filter's job with its table and data, once.
                call::call_layer(self.layer, || unsafe { job(next, data) })
            })
        }));
        if r.is_err() {
            log::error!("{}: a background job panicked", self.layer);
        }
        self.work.finished_one();
    }
}

/// The `Below` behind a filter's table.
///
/// # Safety
/// `next` must be the table of a live `BelowHandle`.
pub(super) unsafe fn below_of<'a>(next: *const abi::Next) -> &'a Below {
    // SAFETY: guaranteed by the caller: `opaque` points at its `Below`.
    unsafe { &*(*next).opaque.cast::<Below>() }
}

fn report(r: Result<()>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => {
            call::record(e);
            -1
        }
    }
}

pub(super) unsafe extern "C" fn next_reopen(next: *const abi::Next, readonly: c_int) -> c_int {
    // SAFETY: filters only receive `next` from a live BelowHandle.
    let below = unsafe { below_of(next) };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| below.reopen(readonly != 0)))
        .unwrap_or_else(|_| Err(Error::new(libc::EIO, "internal error in reopen (panic)")));
    report(r)
}

pub(super) unsafe extern "C" fn next_after(
    next: *const abi::Next,
    nsec: u64,
    done: abi::ContinuationFn,
    data: *mut c_void,
) -> c_int {
    // SAFETY: filters only receive `next` from a live BelowHandle.
    let below = unsafe { below_of(next) };
    report(below.after(Duration::from_nanos(nsec), done, data))
}

pub(super) unsafe extern "C" fn next_background(
    next: *const abi::Next,
    job: abi::BackgroundFn,
    data: *mut c_void,
) -> c_int {
    // SAFETY: filters only receive `next` from a live BelowHandle.
    let below = unsafe { below_of(next) };
    report(below.background(next, job, data))
}

pub(super) unsafe extern "C" fn next_closing(next: *const abi::Next) -> c_int {
    // SAFETY: filters only receive `next` from a live BelowHandle.
    c_int::from(unsafe { below_of(next) }.closing())
}
