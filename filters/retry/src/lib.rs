//! The retry filter: when a request fails, wait, open the layer below
//! again and retry it, up to `retries` times with a delay that doubles
//! each time unless `retry-exponential=no`; with `retry-readonly=yes`
//! the layer below is opened read-only from the first failure on
//! (nbdkit's retry filter).

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbdhost_plugin_api::{
    callbacks, errno, host, nbdhost_filter, Error, Filter, Next, NextOpener, Result, ThreadModel,
};
use retry_common::{parse_delay, parse_retries, Backoff, Check, Retrying, Strategy};

/// The parameters.
pub struct Retry {
    backoff: Backoff,
    readonly_after_failure: bool,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            backoff: Backoff {
                retries: 5,
                delay: Duration::from_secs(2),
                exponential: true,
            },
            readonly_after_failure: false,
        }
    }
}

#[callbacks]
impl Filter for Retry {
    const NAME: &'static str = "retry";
    const DESCRIPTION: &'static str = "reopen the layer below and retry requests that fail";
    const CONFIG_HELP: &'static str =
        "retries=<N>               Retries of a failed request (default 5).
retry-delay=<SECS>        Seconds before the first retry (default 2; 0.1 or 100ms too).
retry-exponential=<BOOL>  Double the delay before each further retry (default yes).
retry-readonly=<BOOL>     Reopen read-only after the first failure (default no).";
    // As nbdkit's: a reopen is never made while another synchronous call
    // of the connection runs.
    const THREAD_MODEL: ThreadModel = ThreadModel::SerializeRequests;
    type Handle = Retrying;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "retries" => self.backoff.retries = parse_retries(key, value)?,
            "retry-delay" => self.backoff.delay = parse_delay(key, value)?,
            "retry-exponential" => self.backoff.exponential = host::parse_bool(key, value)?,
            "retry-readonly" => self.readonly_after_failure = host::parse_bool(key, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Retrying> {
        next.open(readonly, export_name)?;
        let below = Below {
            readonly,
            readonly_after_failure: self.readonly_after_failure,
            state: Mutex::new(State {
                generation: 0,
                open: true,
            }),
        };
        Ok(Retrying::new(self.backoff, Arc::new(below)))
    }
}

/// One connection's layer below, as the retries see it.
struct Below {
    /// The client's open was read-only.
    readonly: bool,
    readonly_after_failure: bool,
    state: Mutex<State>,
}

struct State {
    /// Reopens so far: a try that fails on an older handle than the
    /// current one is retried without another reopen, so requests that
    /// were in flight together reopen once.
    generation: u64,
    /// The last reopen succeeded.
    open: bool,
}

impl Below {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Strategy for Below {
    fn check(&self, writes: bool) -> Check {
        let s = self.state();
        if writes && self.readonly_after_failure && s.generation > 0 {
            return Check::Refuse(Error::new(
                errno::EROFS,
                "retry: the layer below was reopened read-only",
            ));
        }
        if !s.open {
            return Check::Fail(Error::new(
                errno::ESHUTDOWN,
                "retry: the layer below could not be reopened",
            ));
        }
        Check::Go(s.generation)
    }

    fn recover(&self, next: &Next, mark: u64) -> Result<()> {
        let mut s = self.state();
        if s.open && s.generation != mark {
            return Ok(());
        }
        s.generation += 1;
        let readonly = self.readonly || self.readonly_after_failure;
        host::debug(&format!(
            "reopening the layer below (reopen {})",
            s.generation
        ));
        let r = next.reopen(readonly);
        s.open = r.is_ok();
        r
    }
}

nbdhost_filter!(Retry);
