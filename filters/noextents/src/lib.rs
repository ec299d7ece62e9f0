//! The noextents filter: say the layer below has no extents, so the disk
//! looks fully allocated to a client asking for block status (nbdkit's
//! noextents filter).

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, Filter, FilterHandle, Next, NextOpener, Result,
};

/// The filter; it has no parameters.
#[derive(Default)]
pub struct NoExtents;

#[callbacks]
impl Filter for NoExtents {
    const NAME: &'static str = "noextents";
    const DESCRIPTION: &'static str = "hide the layer below's extents";
    type Handle = NoExtentsHandle;

    fn nonblocking(&self) -> bool {
        true
    }

    fn open(
        &self,
        next: &NextOpener,
        readonly: bool,
        export_name: &str,
    ) -> Result<NoExtentsHandle> {
        next.open(readonly, export_name)?;
        Ok(NoExtentsHandle)
    }
}

/// One connection; only its answer about extents differs from the layer
/// below's. Without extents the server answers block status itself, with
/// one allocated data extent.
pub struct NoExtentsHandle;

#[callbacks]
impl FilterHandle for NoExtentsHandle {
    fn can_extents(&self, _next: &Next) -> Result<bool> {
        Ok(false)
    }
}

nbdhost_filter!(NoExtents);
