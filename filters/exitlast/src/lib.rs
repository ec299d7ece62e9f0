//! The exitlast filter: shut the server down when its last client
//! disconnects (never before the first has come), for a server started
//! on demand by a superserver or for one client's use.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Filter, FilterHandle, NextOpener, Result,
};

/// The connections open through this filter.
#[derive(Default)]
pub struct ExitLast {
    open: Arc<AtomicUsize>,
}

#[callbacks]
impl Filter for ExitLast {
    const NAME: &'static str = "exitlast";
    const DESCRIPTION: &'static str = "shut the server down when the last client disconnects";
    type Handle = Connection;

    fn nonblocking(&self) -> bool {
        true
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Connection> {
        next.open(readonly, export_name)?;
        // The look a filter above takes at start-up (Filter::startup) is
        // made for no client, and is not one.
        let client = host::connection_id().is_some();
        if client {
            self.open.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Connection {
            open: client.then(|| self.open.clone()),
        })
    }
}

/// One open connection, counted until it closes (`None`: not a client's).
pub struct Connection {
    open: Option<Arc<AtomicUsize>>,
}

#[callbacks]
impl FilterHandle for Connection {}

impl Drop for Connection {
    fn drop(&mut self) {
        let Some(open) = &self.open else {
            return;
        };
        if open.fetch_sub(1, Ordering::AcqRel) == 1 {
            host::debug("exitlast: exiting on last client connection");
            host::shutdown();
        }
    }
}

nbdhost_filter!(ExitLast);
