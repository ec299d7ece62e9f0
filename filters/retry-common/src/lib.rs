//! Retrying a failed request after a delay, shared by the retry filter
//! (which opens the layer below again between tries) and the
//! retry-request filter (which does not).
//!
//! Asynchronous requests wait out the delay on a server timer
//! ([`Next::after`]), holding no thread; the few calls that stay
//! synchronous (extents, and opening the layer below) sleep with
//! [`host::sleep`], which shutdown cuts short.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use nbdhost_plugin_api::{
    callbacks, host, Error, ExtentList, FilterHandle, Flags, Next, RangeRequest, ReadRequest,
    Result, WriteRequest,
};

/// How often and how long to wait: nbdkit's `retries`, `retry-delay` and
/// `retry-exponential`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Tries after the first.
    pub retries: u32,
    /// The wait before the first retry.
    pub delay: Duration,
    /// Double the wait before each further retry.
    pub exponential: bool,
}

impl Backoff {
    /// The wait before retry number `tried + 1`.
    pub fn delay_after(&self, tried: u32) -> Duration {
        if self.exponential {
            let factor = 1u32.checked_shl(tried.min(31)).unwrap_or(u32::MAX);
            self.delay.saturating_mul(factor)
        } else {
            self.delay
        }
    }
}

/// A number of retries, as nbdkit takes it: not negative.
pub fn parse_retries(key: &str, value: &str) -> Result<u32> {
    value.trim().parse().map_err(|_| {
        Error::new(
            libc::EINVAL,
            format!("{key}: '{value}' is not a number of retries (0 or more)"),
        )
    })
}

/// A delay: whole seconds as nbdkit 1.32 takes them, and, beyond it,
/// fractions of a second (`0.1`) or milliseconds (`100ms`). Never 0.
pub fn parse_delay(key: &str, value: &str) -> Result<Duration> {
    let v = value.trim();
    let bad = || {
        Error::new(
            libc::EINVAL,
            format!("{key}: '{value}' is not a delay (seconds, or NNms)"),
        )
    };
    let d = match v.strip_suffix("ms") {
        Some(ms) => Duration::from_millis(ms.trim().parse().map_err(|_| bad())?),
        None => {
            let secs: f64 = v.parse().map_err(|_| bad())?;
            Duration::try_from_secs_f64(secs).map_err(|_| bad())?
        }
    };
    if d.is_zero() {
        return Err(Error::new(libc::EINVAL, format!("{key} cannot be 0")));
    }
    Ok(d)
}

/// An asynchronous request that can be passed down more than once.
pub enum Req {
    Read(ReadRequest),
    Write(WriteRequest),
    Flush(RangeRequest),
    Trim(RangeRequest),
    Zero(RangeRequest),
    Cache(RangeRequest),
}

impl Req {
    /// The request's name, for debug messages.
    pub fn name(&self) -> &'static str {
        match self {
            Req::Read(_) => "pread",
            Req::Write(_) => "pwrite",
            Req::Flush(_) => "flush",
            Req::Trim(_) => "trim",
            Req::Zero(_) => "zero",
            Req::Cache(_) => "cache",
        }
    }

    /// Whether it changes the disk.
    pub fn writes(&self) -> bool {
        matches!(self, Req::Write(_) | Req::Trim(_) | Req::Zero(_))
    }

    fn complete(self, r: Result<()>) {
        match self {
            Req::Read(q) => q.complete(r),
            Req::Write(q) => q.complete(r),
            Req::Flush(q) | Req::Trim(q) | Req::Zero(q) | Req::Cache(q) => q.complete(r),
        }
    }

    /// Pass it down; `then` gets it back with the answer.
    fn pass(self, next: &Next, then: impl FnOnce(&Next, Req, Result<()>) + Send + 'static) {
        match self {
            Req::Read(q) => next.async_pread_then(q, move |n, q, r| then(n, Req::Read(q), r)),
            Req::Write(q) => next.async_pwrite_then(q, move |n, q, r| then(n, Req::Write(q), r)),
            Req::Flush(q) => next.async_flush_req_then(q, move |n, q, r| then(n, Req::Flush(q), r)),
            Req::Trim(q) => next.async_trim_then(q, move |n, q, r| then(n, Req::Trim(q), r)),
            Req::Zero(q) => next.async_zero_then(q, move |n, q, r| then(n, Req::Zero(q), r)),
            Req::Cache(q) => next.async_cache_then(q, move |n, q, r| then(n, Req::Cache(q), r)),
        }
    }
}

/// What a try may be.
pub enum Check {
    /// Go ahead, on the layer below as it is at this mark (a filter that
    /// reopens it counts its reopens).
    Go(u64),
    /// This try fails with the error, and may be retried.
    Fail(Error),
    /// The request fails with the error, without a retry.
    Refuse(Error),
}

/// What a filter does around the tries.
pub trait Strategy: Send + Sync + 'static {
    /// Before each try, the first included.
    fn check(&self, _writes: bool) -> Check {
        Check::Go(0)
    }
    /// After the delay and before the next try of a request whose try at
    /// `mark` failed: get the layer below ready again. An error is that
    /// next try's failure.
    fn recover(&self, _next: &Next, _mark: u64) -> Result<()> {
        Ok(())
    }
}

/// Run `req` through the layer below, retrying it as `backoff` says.
pub fn start(next: &Next, req: Req, backoff: Backoff, strategy: Arc<dyn Strategy>) {
    attempt(next, req, 0, backoff, strategy)
}

fn attempt(next: &Next, req: Req, tried: u32, backoff: Backoff, strategy: Arc<dyn Strategy>) {
    let mark = match strategy.check(req.writes()) {
        Check::Go(mark) => mark,
        Check::Fail(e) => return failed(next, req, tried, e, mark_none(), backoff, strategy),
        Check::Refuse(e) => return req.complete(Err(e)),
    };
    req.pass(next, move |next, req, r| match r {
        Ok(()) => req.complete(Ok(())),
        Err(e) => failed(next, req, tried, e, mark, backoff, strategy),
    })
}

/// The mark of a try that never reached the layer below.
fn mark_none() -> u64 {
    u64::MAX
}

/// Try number `tried + 1` failed with `e`: wait and retry, or give up.
fn failed(
    next: &Next,
    req: Req,
    tried: u32,
    e: Error,
    mark: u64,
    backoff: Backoff,
    strategy: Arc<dyn Strategy>,
) {
    if tried >= backoff.retries {
        if backoff.retries > 0 {
            host::debug(&format!(
                "{}: could not recover after {} retries",
                req.name(),
                backoff.retries
            ));
        }
        return req.complete(Err(e));
    }
    let delay = backoff.delay_after(tried);
    host::debug(&format!(
        "{} failed ({e}); retry {} in {delay:?}",
        req.name(),
        tried + 1
    ));
    // Should the timer not be set, dropping the continuation drops
    // `req`, which answers it with an error.
    let _ = next.after(delay, move |next, waited| {
        if waited.is_err() {
            // Shutdown: the request's own error is the one to give.
            return req.complete(Err(e));
        }
        match strategy.recover(next, mark) {
            Ok(()) => attempt(next, req, tried + 1, backoff, strategy),
            Err(e) => failed(next, req, tried + 1, e, mark_none(), backoff, strategy),
        }
    });
}

/// The synchronous form, for calls that stay synchronous: `f` tried, and
/// retried after sleeping, as `backoff` says.
pub fn run_sync<T>(
    what: &str,
    next: &Next,
    backoff: Backoff,
    strategy: &dyn Strategy,
    writes: bool,
    mut f: impl FnMut(&Next) -> Result<T>,
) -> Result<T> {
    let mut tried = 0;
    loop {
        let (r, mark) = match strategy.check(writes) {
            Check::Go(mark) => (f(next), mark),
            Check::Fail(e) => (Err(e), mark_none()),
            Check::Refuse(e) => return Err(e),
        };
        let e = match r {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if tried >= backoff.retries {
            return Err(e);
        }
        let delay = backoff.delay_after(tried);
        host::debug(&format!(
            "{what} failed ({e}); retry {} in {delay:?}",
            tried + 1
        ));
        if host::sleep(delay).is_err() {
            return Err(e);
        }
        tried += 1;
        if let Err(e) = strategy.recover(next, mark) {
            host::debug(&format!("{what}: could not recover: {e}"));
        }
    }
}

/// A connection's handle of a retrying filter: every request goes
/// through [`start`] (block status through [`run_sync`]).
pub struct Retrying {
    backoff: Backoff,
    strategy: Arc<dyn Strategy>,
}

impl Retrying {
    /// Retry as `backoff` says, with `strategy` around the tries.
    pub fn new(backoff: Backoff, strategy: Arc<dyn Strategy>) -> Retrying {
        Retrying { backoff, strategy }
    }

    fn start(&self, next: &Next, req: Req) {
        start(next, req, self.backoff, self.strategy.clone())
    }
}

#[callbacks]
impl FilterHandle for Retrying {
    fn async_pread(&self, next: &Next, req: ReadRequest) {
        self.start(next, Req::Read(req))
    }
    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        self.start(next, Req::Write(req))
    }
    fn async_flush(&self, next: &Next, req: RangeRequest) {
        self.start(next, Req::Flush(req))
    }
    fn async_trim(&self, next: &Next, req: RangeRequest) {
        self.start(next, Req::Trim(req))
    }
    fn async_zero(&self, next: &Next, req: RangeRequest) {
        self.start(next, Req::Zero(req))
    }
    fn async_cache(&self, next: &Next, req: RangeRequest) {
        self.start(next, Req::Cache(req))
    }
    // An extents answer is collected whole before it is passed on, so a
    // failed try leaves nothing half-added: block status stays
    // synchronous.
    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        let extents = run_sync("extents", next, self.backoff, &*self.strategy, false, |n| {
            n.extents(count, offset, flags)
        })?;
        for (o, len, typ) in extents {
            list.add(o, len, typ)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_backoff_doubles_each_wait() {
        let b = Backoff {
            retries: 5,
            delay: Duration::from_secs(2),
            exponential: true,
        };
        let waits: Vec<u64> = (0..5).map(|t| b.delay_after(t).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32]);
        let flat = Backoff {
            exponential: false,
            ..b
        };
        assert_eq!(flat.delay_after(4), Duration::from_secs(2));
    }

    #[test]
    fn delays_are_whole_seconds_fractions_or_milliseconds_but_not_zero() {
        assert_eq!(parse_delay("d", "2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_delay("d", "0.1").unwrap(), Duration::from_millis(100));
        assert_eq!(
            parse_delay("d", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert!(parse_delay("d", "0").is_err());
        assert!(parse_delay("d", "").is_err());
        assert!(parse_delay("d", "-1").is_err());
        assert!(parse_retries("r", "-1").is_err());
        assert_eq!(parse_retries("r", "0").unwrap(), 0);
    }
}
