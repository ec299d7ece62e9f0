//! The retry-request filter: a request that fails is tried again, up to
//! `retry-request-retries` times, `retry-request-delay` apart, on the
//! same handle of the layer below (nbdkit's retry-request filter). Opening
//! the layer below is retried the same way unless
//! `retry-request-open=false`.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use nbdhost_plugin_api::{callbacks, host, nbdhost_filter, Filter, NextOpener, Result};
use retry_common::{parse_delay, parse_retries, Backoff, Retrying, Strategy};

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
    type Handle = Retrying;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "retry-request-retries" => self.backoff.retries = parse_retries(key, value)?,
            "retry-request-delay" => self.backoff.delay = parse_delay(key, value)?,
            "retry-request-open" => self.retry_open = host::parse_bool(key, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Retrying> {
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
        Ok(Retrying::new(self.backoff, Arc::new(SameHandle)))
    }
}

nbdhost_filter!(RetryRequest);
