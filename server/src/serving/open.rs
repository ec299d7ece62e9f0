//! A connection's open export: the top handle of its chain, the
//! connection it was opened for, and the chain, which a reload does not
//! take away while the handle is open.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use super::chain::Chain;
use crate::layers::connection::Connection;
use crate::layers::Handle;

/// One connection's open export.
pub struct OpenExport {
    pub(super) handle: Box<dyn Handle>,
    /// The connection the handle was opened for; each layer's handle keeps
    /// its own too.
    pub(super) conn: Arc<Connection>,
    /// Whether block status asks the chain or reports all data.
    pub(super) can_extents: bool,
    /// Whether requests are started and answered later (ABI 1.9) rather
    /// than run to the end where they are read.
    pub(super) asynchronous: bool,
    pub chain: Arc<Chain>,
}

impl std::fmt::Debug for OpenExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenExport")
            .field("conn", &self.conn)
            .field("chain", &self.chain.name)
            .finish()
    }
}

impl OpenExport {
    /// Whether requests are started and answered later.
    pub fn asynchronous(&self) -> bool {
        self.asynchronous
    }

    /// What a layer asked with `host->disconnect` since the last look:
    /// `Some(true)` to close at once, `Some(false)` once the running
    /// requests are answered.
    pub fn take_disconnect(&self) -> Option<bool> {
        self.conn.take_disconnect()
    }

    /// Close the handle: each layer finalizes, then closes, for the
    /// connection its handle was opened for.
    pub(super) fn close(self) {
        let handle = self.handle;
        let r = catch_unwind(AssertUnwindSafe(|| {
            if let Err(e) = handle.finalize() {
                log::error!("finalize: {e}");
            }
            drop(handle)
        }));
        if r.is_err() {
            log::error!("closing a handle panicked");
        }
    }
}
