//! The nozero filter: hide or weaken the layer below's support for
//! zeroing, to time clients without it or test their fallbacks
//! (nbdkit's nozero filter, with its parameters).

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener, RangeRequest,
    Result,
};

/// How zero requests are advertised and served (`zeromode=`).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ZeroMode {
    /// Not advertised.
    #[default]
    None,
    /// Advertised, and served by writing zeroes.
    Emulate,
    /// Passed down without `MAY_TRIM`.
    NoTrim,
    /// Passed down unchanged.
    Plugin,
}

/// How fast zero requests are advertised and served (`fastzeromode=`).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum FastZeroMode {
    /// Fails them with emulated zeroing, leaves them to the layer below
    /// otherwise.
    #[default]
    Default,
    /// Not advertised.
    None,
    /// Advertised, and every one fails at once.
    Slow,
    /// Advertised, and served as ordinary zeroes (unsafe).
    Ignore,
}

/// Both modes, copied into each connection.
#[derive(Clone, Copy, Default)]
struct Modes {
    zero: ZeroMode,
    fast: FastZeroMode,
}

/// The configured modes.
#[derive(Default)]
pub struct NoZero {
    modes: Modes,
}

/// Zeroes are written from a buffer of at most this many bytes at a time.
const CHUNK: u64 = 1 << 20;

#[callbacks]
impl Filter for NoZero {
    const NAME: &'static str = "nozero";
    const DESCRIPTION: &'static str = "hide or weaken the layer below's zeroing";
    const CONFIG_HELP: &'static str =
        "zeromode=<MODE>      One of 'none' (default), 'emulate', 'notrim', 'plugin'.
fastzeromode=<MODE>  One of 'default', 'none', 'slow', 'ignore'.";
    type Handle = NoZeroHandle;

    // Emulating writes the zeroes on the thread that serves the request;
    // the other modes only change flags and answers.
    fn nonblocking(&self) -> bool {
        self.modes.zero != ZeroMode::Emulate
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "zeromode" => {
                self.modes.zero = match value {
                    "none" => ZeroMode::None,
                    "emulate" => ZeroMode::Emulate,
                    "notrim" => ZeroMode::NoTrim,
                    "plugin" => ZeroMode::Plugin,
                    _ => return Err(unknown(key, value)),
                }
            }
            "fastzeromode" => {
                self.modes.fast = match value {
                    "default" => FastZeroMode::Default,
                    "none" => FastZeroMode::None,
                    "slow" => FastZeroMode::Slow,
                    "ignore" => FastZeroMode::Ignore,
                    _ => return Err(unknown(key, value)),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<NoZeroHandle> {
        next.open(readonly, export_name)?;
        Ok(NoZeroHandle { modes: self.modes })
    }
}

fn unknown(key: &str, value: &str) -> Error {
    Error::new(libc::EINVAL, format!("unknown {key} '{value}'"))
}

/// One connection, with the modes it is served under.
pub struct NoZeroHandle {
    modes: Modes,
}

impl NoZeroHandle {
    /// The flags a passed-down zero gets, or the error a fast zero gets.
    fn passed_flags(&self, mut flags: Flags) -> Result<Flags> {
        if flags.contains(Flags::FAST_ZERO) {
            match self.modes.fast {
                FastZeroMode::Slow => return Err(Error::errno(libc::ENOTSUP)),
                FastZeroMode::Ignore => flags.remove(Flags::FAST_ZERO),
                FastZeroMode::Default | FastZeroMode::None => {}
            }
        }
        if self.modes.zero == ZeroMode::NoTrim {
            flags.remove(Flags::MAY_TRIM);
        }
        Ok(flags)
    }
}

/// Zero a range with writes, as a server emulating zeroes does: a fast
/// zero cannot be done this way, so it fails at once.
fn write_zeroes(next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
    if flags.contains(Flags::FAST_ZERO) {
        return Err(Error::errno(libc::ENOTSUP));
    }
    let zeroes = vec![0u8; count.min(CHUNK) as usize];
    let mut done = 0;
    while done < count {
        let n = (count - done).min(CHUNK) as usize;
        next.pwrite(&zeroes[..n], offset + done, flags & Flags::FUA)?;
        done += n as u64;
    }
    Ok(())
}

#[callbacks]
impl FilterHandle for NoZeroHandle {
    fn prepare(&self, next: &Next, readonly: bool) -> Result<()> {
        let name = match self.modes.zero {
            ZeroMode::NoTrim => "notrim",
            ZeroMode::Plugin => "plugin",
            ZeroMode::None | ZeroMode::Emulate => return Ok(()),
        };
        if !readonly && !next.can_zero()? {
            return Err(Error::new(
                libc::EINVAL,
                format!("zeromode '{name}' requires plugin zero support"),
            ));
        }
        Ok(())
    }

    fn can_zero(&self, next: &Next) -> Result<bool> {
        match self.modes.zero {
            ZeroMode::None => Ok(false),
            ZeroMode::Emulate => Ok(true),
            ZeroMode::NoTrim | ZeroMode::Plugin => next.can_zero(),
        }
    }

    fn can_fast_zero(&self, next: &Next) -> Result<bool> {
        match (self.modes.zero, self.modes.fast) {
            (ZeroMode::None, _) => Ok(false),
            (ZeroMode::NoTrim | ZeroMode::Plugin, FastZeroMode::Default) => next.can_fast_zero(),
            (_, fast) => Ok(fast != FastZeroMode::None),
        }
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.modes.zero {
            ZeroMode::None => Err(not_offered()),
            ZeroMode::Emulate => write_zeroes(next, count, offset, flags),
            ZeroMode::NoTrim | ZeroMode::Plugin => {
                next.zero(count, offset, self.passed_flags(flags)?)
            }
        }
    }

    fn async_zero(&self, next: &Next, mut req: RangeRequest) {
        match self.modes.zero {
            ZeroMode::None => req.complete(Err(not_offered())),
            // Not a non-blocking chain in this mode: this runs on a worker.
            ZeroMode::Emulate => {
                let r = write_zeroes(next, req.count(), req.offset(), req.flags());
                req.complete(r)
            }
            ZeroMode::NoTrim | ZeroMode::Plugin => match self.passed_flags(req.flags()) {
                Ok(flags) => {
                    req.set_flags(flags);
                    next.async_zero(req)
                }
                Err(e) => req.complete(Err(e)),
            },
        }
    }
}

/// A zero from a filter above, which was told there is no zeroing.
fn not_offered() -> Error {
    Error::new(libc::EINVAL, "zeroing is not offered (zeromode=none)")
}

nbdhost_filter!(NoZero);
