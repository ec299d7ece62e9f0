//! The retry-request filter: a request that fails is tried again, up to
//! `retry-request-retries` times, `retry-request-delay` apart, on the
//! same handle of the layer below (nbdkit's retry-request filter). Opening
//! the layer below is retried the same way unless
//! `retry-request-open=false`.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, ExtentList, Filter, FilterHandle, Flags, Next, NextOpener,
    RangeRequest, ReadRequest, Result, WriteRequest,
};
use retry_common::{parse_delay, parse_retries, run_sync, start, Backoff, Req, Strategy};

/// The parameters.
pub struct RetryRequest {
    backoff: Backoff,
    retry_open: bool,
}

impl Default for RetryRequest {
    fn default() -> RetryRequest {
        RetryRequest {
            backoff: Backoff {
                retries: 2,
                delay: Duration::from_secs(2),
                exponential: false,
            },
            retry_open: true,
        }
    }
}

/// Nothing to do between tries: the same handle is asked again.
struct SameHandle;

impl Strategy for SameHandle {}

#[callbacks]
impl Filter for RetryRequest {
    const NAME: &'static str = "retry-request";
    const DESCRIPTION: &'static str = "retry requests that fail, after a delay";
    const CONFIG_HELP: &'static str =
        "retry-request-retries=<N>   Retries of a failed request (default 2).
retry-request-delay=<SECS>  Seconds between tries (default 2; 0.1 or 100ms too).
retry-request-open=<BOOL>   Retry opening the layer below too (default true).";
    type Handle = Tries;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "retry-request-retries" => self.backoff.retries = parse_retries(key, value)?,
            "retry-request-delay" => self.backoff.delay = parse_delay(key, value)?,
            "retry-request-open" => self.retry_open = host::parse_bool(key, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Tries> {
        let mut tried = 0;
        loop {
            match next.open(readonly, export_name) {
                Ok(()) => break,
                Err(e) if self.retry_open && tried < self.backoff.retries => {
                    host::debug(&format!("open failed ({e}); retry {}", tried + 1));
                    if host::sleep(self.backoff.delay).is_err() {
                        return Err(e);
                    }
                    tried += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Tries {
            backoff: self.backoff,
            strategy: Arc::new(SameHandle),
        })
    }
}

/// One connection's tries.
pub struct Tries {
    backoff: Backoff,
    strategy: Arc<SameHandle>,
}

impl Tries {
    fn start(&self, next: &Next, req: Req) {
        start(next, req, self.backoff, self.strategy.clone())
    }
}

#[callbacks]
impl FilterHandle for Tries {
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
    // failed try leaves nothing half-added: this one stays synchronous.
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

nbdhost_filter!(RetryRequest);
