//! The fua filter: change how Forced Unit Access and flush requests are
//! advertised and served, to test clients' fallbacks or trade safety for
//! speed (nbdkit's fua filter, `fuamode=`).

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener, RangeRequest,
    Result, Support, WriteRequest,
};

/// `fuamode=`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum FuaMode {
    /// FUA not advertised; flush passed down.
    #[default]
    None,
    /// FUA advertised and done with a flush after the request.
    Emulate,
    /// FUA advertised as native and passed down.
    Native,
    /// FUA added to every write-type request; flush does nothing.
    Force,
    /// Everything passed down unchanged.
    Pass,
    /// FUA and flush accepted and dropped (unsafe).
    Discard,
}

impl FuaMode {
    fn name(self) -> &'static str {
        match self {
            FuaMode::None => "none",
            FuaMode::Emulate => "emulate",
            FuaMode::Native => "native",
            FuaMode::Force => "force",
            FuaMode::Pass => "pass",
            FuaMode::Discard => "discard",
        }
    }

    /// The flags a write, trim or zero goes down with, and whether a flush
    /// must follow it.
    fn passed(self, flags: Flags) -> (Flags, bool) {
        match self {
            FuaMode::None | FuaMode::Native | FuaMode::Pass => (flags, false),
            FuaMode::Emulate => (flags - Flags::FUA, flags.contains(Flags::FUA)),
            FuaMode::Force => (flags | Flags::FUA, false),
            FuaMode::Discard => (flags - Flags::FUA, false),
        }
    }

    /// Whether flush requests are answered here, without the layer below:
    /// every write already went down with FUA, or flushes are dropped.
    fn swallows_flush(self) -> bool {
        matches!(self, FuaMode::Force | FuaMode::Discard)
    }
}

/// The configured mode.
#[derive(Default)]
pub struct Fua {
    mode: FuaMode,
}

#[callbacks]
impl Filter for Fua {
    const NAME: &'static str = "fua";
    const DESCRIPTION: &'static str = "change how FUA and flush are handled";
    const CONFIG_HELP: &'static str =
        "fuamode=<MODE>       One of 'none' (default), 'emulate', 'native',
                       'force', 'pass', 'discard'.";
    type Handle = FuaHandle;

    // Emulating waits for the flush that follows a request; the other
    // modes only change flags and answers.
    fn nonblocking(&self) -> bool {
        self.mode != FuaMode::Emulate
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "fuamode" {
            return Ok(false);
        }
        self.mode = match value {
            "none" => FuaMode::None,
            "emulate" => FuaMode::Emulate,
            "native" => FuaMode::Native,
            "force" => FuaMode::Force,
            "pass" => FuaMode::Pass,
            "discard" => FuaMode::Discard,
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("unknown fuamode '{value}'"),
                ))
            }
        };
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<FuaHandle> {
        next.open(readonly, export_name)?;
        Ok(FuaHandle { mode: self.mode })
    }
}

/// One connection, served under the configured mode.
pub struct FuaHandle {
    mode: FuaMode,
}

impl FuaHandle {
    /// Run a write-type request with the mode's flags, then the flush an
    /// emulated FUA needs.
    fn write_like(
        &self,
        next: &Next,
        flags: Flags,
        f: impl FnOnce(Flags) -> Result<()>,
    ) -> Result<()> {
        let (flags, flush) = self.mode.passed(flags);
        f(flags)?;
        if flush {
            next.flush(Flags::empty())?;
        }
        Ok(())
    }

    /// Pass an asynchronous trim or zero down with the mode's flags; one
    /// that needs a flush after it is served here (only in emulate mode,
    /// where the chain is not a non-blocking one).
    fn range_async(
        &self,
        next: &Next,
        mut req: RangeRequest,
        sync: impl FnOnce(u64, u64, Flags) -> Result<()>,
        down: impl FnOnce(RangeRequest),
    ) {
        match self.mode.passed(req.flags()) {
            (flags, false) => {
                req.set_flags(flags);
                down(req)
            }
            (_, true) => {
                let r = self.write_like(next, req.flags(), |f| sync(req.count(), req.offset(), f));
                req.complete(r)
            }
        }
    }
}

#[callbacks]
impl FilterHandle for FuaHandle {
    fn prepare(&self, next: &Next, readonly: bool) -> Result<()> {
        if readonly {
            return Ok(());
        }
        let ok = match self.mode {
            FuaMode::None | FuaMode::Pass | FuaMode::Discard => true,
            FuaMode::Emulate => next.can_flush()?,
            FuaMode::Native | FuaMode::Force => next.can_fua()? != Support::None,
        };
        if ok {
            return Ok(());
        }
        let needs = if self.mode == FuaMode::Emulate {
            "flush"
        } else {
            "fua"
        };
        Err(Error::new(
            libc::EINVAL,
            format!(
                "fuamode '{}' requires plugin {needs} support",
                self.mode.name()
            ),
        ))
    }

    fn can_flush(&self, next: &Next) -> Result<bool> {
        if self.mode.swallows_flush() {
            return Ok(true);
        }
        next.can_flush()
    }

    fn can_fua(&self, next: &Next) -> Result<Support> {
        Ok(match self.mode {
            FuaMode::None => Support::None,
            FuaMode::Emulate => Support::Emulate,
            FuaMode::Native | FuaMode::Force | FuaMode::Discard => Support::Native,
            FuaMode::Pass => return next.can_fua(),
        })
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.write_like(next, flags, |f| next.pwrite(buf, offset, f))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.write_like(next, flags, |f| next.trim(count, offset, f))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.write_like(next, flags, |f| next.zero(count, offset, f))
    }

    fn flush(&self, next: &Next, flags: Flags) -> Result<()> {
        if self.mode.swallows_flush() {
            return Ok(());
        }
        next.flush(flags)
    }

    fn async_pwrite(&self, next: &Next, mut req: WriteRequest) {
        match self.mode.passed(req.flags()) {
            (flags, false) => {
                req.set_flags(flags);
                next.async_pwrite(req)
            }
            (_, true) => {
                let r = self.pwrite(next, req.buf(), req.offset(), req.flags());
                req.complete(r)
            }
        }
    }

    fn async_trim(&self, next: &Next, req: RangeRequest) {
        self.range_async(
            next,
            req,
            |c, o, f| next.trim(c, o, f),
            |r| next.async_trim(r),
        )
    }

    fn async_zero(&self, next: &Next, req: RangeRequest) {
        self.range_async(
            next,
            req,
            |c, o, f| next.zero(c, o, f),
            |r| next.async_zero(r),
        )
    }

    fn async_flush(&self, next: &Next, req: RangeRequest) {
        if self.mode.swallows_flush() {
            return req.complete(Ok(()));
        }
        next.async_flush(req)
    }
}

nbdhost_filter!(Fua);
