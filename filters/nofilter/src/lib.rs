//! The nofilter filter: every call passes to the layer below unchanged.
//! It exists to test the server's handling of a filter in the chain
//! (nbdkit's nofilter filter).

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{callbacks, nbdhost_filter, Filter, FilterHandle, NextOpener, Result};

/// The filter; it has no parameters.
#[derive(Default)]
pub struct NoFilter;

#[callbacks]
impl Filter for NoFilter {
    const NAME: &'static str = "nofilter";
    const DESCRIPTION: &'static str = "pass every request through unchanged";
    type Handle = NoFilterHandle;

    fn nonblocking(&self) -> bool {
        true
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<NoFilterHandle> {
        next.open(readonly, export_name)?;
        Ok(NoFilterHandle)
    }
}

/// One connection: it defines no callback, so the server sends every
/// call straight to the layer below, asynchronous ones included.
pub struct NoFilterHandle;

#[callbacks]
impl FilterHandle for NoFilterHandle {}

nbdhost_filter!(NoFilter);
