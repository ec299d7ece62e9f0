//! The limit filter: refuse clients beyond `limit=N` connected at once.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, Error, Filter, FilterHandle, NextOpener, Result,
};

/// The limit and the clients counted against it.
pub struct Limit {
    /// 0 means no limit.
    limit: u64,
    /// Connections whose open succeeded and whose handle is not yet
    /// closed. Shared with the handles, which give their place back when
    /// dropped.
    connected: Arc<AtomicU64>,
}

impl Default for Limit {
    fn default() -> Limit {
        Limit {
            limit: 1,
            connected: Arc::default(),
        }
    }
}

impl Limit {
    fn full(&self) -> bool {
        self.limit > 0 && self.connected.load(Ordering::Acquire) >= self.limit
    }
}

fn too_many() -> Error {
    Error::new(
        libc::EPERM,
        "limit: too many clients connected, connection rejected",
    )
}

#[callbacks]
impl Filter for Limit {
    const NAME: &'static str = "limit";
    const DESCRIPTION: &'static str = "limit the number of clients connected at once";
    const CONFIG_HELP: &'static str =
        "limit=<N>  Clients allowed at once (default 1, 0 for no limit).";
    type Handle = Place;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "limit" {
            return Ok(false);
        }
        self.limit = value.parse().map_err(|_| {
            Error::new(
                libc::EINVAL,
                format!("limit: could not parse '{value}' as a number of clients"),
            )
        })?;
        Ok(true)
    }

    // Refused before the handshake costs anything (TLS included); the
    // count itself is taken in `open`, since a client may leave between
    // the two.
    fn preconnect(&self, _readonly: bool) -> Result<()> {
        if self.full() {
            return Err(too_many());
        }
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Place> {
        // Checked again: a client that lingers in the handshake would
        // otherwise slip past the count preconnect saw.
        let taken = self
            .connected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (self.limit == 0 || n < self.limit).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(too_many());
        }
        let place = Place {
            connected: self.connected.clone(),
        };
        next.open(readonly, export_name)?;
        Ok(place)
    }
}

/// One connected client's place in the count, given back when its
/// connection closes (or when its open fails).
pub struct Place {
    connected: Arc<AtomicU64>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.connected.fetch_sub(1, Ordering::AcqRel);
    }
}

#[callbacks]
impl FilterHandle for Place {}

nbdhost_filter!(Limit);
