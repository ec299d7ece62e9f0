//! The nocache filter: hide, emulate or ignore clients' cache requests,
//! to measure what they are worth (nbdkit's nocache filter,
//! `cachemode=`).

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener, RangeRequest,
    Result, Support,
};

/// `cachemode=`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum CacheMode {
    /// Cache requests are not advertised.
    #[default]
    None,
    /// Served by reading the range and dropping the data.
    Emulate,
    /// Accepted and ignored.
    Nop,
}

/// The configured mode.
#[derive(Default)]
pub struct NoCache {
    mode: CacheMode,
}

/// Emulated caching reads this many bytes at a time.
const CHUNK: u64 = 1 << 20;

#[callbacks]
impl Filter for NoCache {
    const NAME: &'static str = "nocache";
    const DESCRIPTION: &'static str = "hide, emulate or ignore cache requests";
    const CONFIG_HELP: &'static str =
        "cachemode=<MODE>     Either 'none' (default), 'emulate', or 'nop'.";
    type Handle = NoCacheHandle;

    // Emulating reads on the thread that serves the request.
    fn nonblocking(&self) -> bool {
        self.mode != CacheMode::Emulate
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "cachemode" {
            return Ok(false);
        }
        self.mode = match value {
            "none" => CacheMode::None,
            "emulate" => CacheMode::Emulate,
            "nop" | "no-op" => CacheMode::Nop,
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("unknown cachemode '{value}'"),
                ))
            }
        };
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<NoCacheHandle> {
        next.open(readonly, export_name)?;
        Ok(NoCacheHandle { mode: self.mode })
    }
}

/// One connection, served under the configured mode.
pub struct NoCacheHandle {
    mode: CacheMode,
}

impl NoCacheHandle {
    fn serve(&self, next: &Next, count: u64, offset: u64) -> Result<()> {
        match self.mode {
            // Only a filter above, told there is no caching, asks.
            CacheMode::None => Err(Error::new(
                libc::EINVAL,
                "cache requests are not offered (cachemode=none)",
            )),
            CacheMode::Nop => Ok(()),
            CacheMode::Emulate => {
                let mut buf = vec![0u8; count.min(CHUNK) as usize];
                let mut done = 0;
                while done < count {
                    let n = (count - done).min(CHUNK) as usize;
                    next.pread(&mut buf[..n], offset + done, Flags::empty())?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}

#[callbacks]
impl FilterHandle for NoCacheHandle {
    fn can_cache(&self, _next: &Next) -> Result<Support> {
        Ok(match self.mode {
            CacheMode::None => Support::None,
            CacheMode::Emulate => Support::Emulate,
            CacheMode::Nop => Support::Native,
        })
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.serve(next, count, offset)
    }

    // Only emulation waits, and the chain is then not a non-blocking one,
    // so this runs on a worker.
    fn async_cache(&self, next: &Next, req: RangeRequest) {
        let r = self.serve(next, req.count(), req.offset());
        req.complete(r)
    }
}

nbdhost_filter!(NoCache);
