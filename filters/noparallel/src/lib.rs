//! The noparallel filter: serve requests one at a time per connection,
//! one at a time in all, or one connection at a time (nbdkit's
//! noparallel filter, `serialize=`).
//!
//! The server's thread models already keep calls apart; the filter asks
//! for the one its parameter names. A thread model orders the calls that
//! start requests, not the time a layer below takes to answer them
//! asynchronously, so the filter also serves every request synchronously:
//! each is finished before the next one starts.

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, Error, ExtentList, Filter, FilterHandle, Flags, Next, NextOpener,
    Result, ThreadModel,
};

/// The configured serialisation.
pub struct NoParallel {
    model: ThreadModel,
}

impl Default for NoParallel {
    fn default() -> Self {
        NoParallel {
            model: ThreadModel::SerializeRequests,
        }
    }
}

#[callbacks]
impl Filter for NoParallel {
    const NAME: &'static str = "noparallel";
    const DESCRIPTION: &'static str = "serialise requests or connections";
    const CONFIG_HELP: &'static str =
        "serialize=<MODE>      'requests' (default), 'all-requests', or 'connections'.";
    type Handle = NoParallelHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "serialize" && key != "serialise" {
            return Ok(false);
        }
        self.model = match value {
            "requests" => ThreadModel::SerializeRequests,
            "all-requests" | "all_requests" => ThreadModel::SerializeAllRequests,
            "connections" => ThreadModel::SerializeConnections,
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("unknown noparallel serialize mode '{value}'"),
                ))
            }
        };
        Ok(true)
    }

    fn thread_model(&self) -> ThreadModel {
        self.model
    }

    fn open(
        &self,
        next: &NextOpener,
        readonly: bool,
        export_name: &str,
    ) -> Result<NoParallelHandle> {
        next.open(readonly, export_name)?;
        Ok(NoParallelHandle {
            one_connection: self.model == ThreadModel::SerializeConnections,
        })
    }
}

/// One connection. Its requests are the layer below's, each waited for.
pub struct NoParallelHandle {
    one_connection: bool,
}

#[callbacks]
impl FilterHandle for NoParallelHandle {
    // A client may only rely on what another connection wrote if both are
    // open at once, which one connection at a time rules out.
    fn can_multi_conn(&self, next: &Next) -> Result<bool> {
        Ok(!self.one_connection && next.can_multi_conn()?)
    }
    // Defined although they only pass requests down: a filter with its own
    // synchronous calls and no asynchronous ones is served synchronously,
    // and only then does the thread model hold requests apart, since it
    // orders the calls that start requests, not what is in flight below.
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        next.pread(buf, offset, flags)
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        next.pwrite(buf, offset, flags)
    }
    fn flush(&self, next: &Next, flags: Flags) -> Result<()> {
        next.flush(flags)
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.trim(count, offset, flags)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.zero(count, offset, flags)
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.cache(count, offset, flags)
    }
    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        next.extents_into(count, offset, flags, list)
    }
}

nbdhost_filter!(NoParallel);
