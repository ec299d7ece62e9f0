//! The scan filter: from the moment a client connects, ask the layer
//! below to cache the whole disk, from start to end, in a background job
//! of the connection, so that a client reading it all (a copy) finds it
//! fetched. The scan skips ahead of the client's reads (`scan-ahead`) and
//! carries on where the last connection's scan got to (`scan-clock`).
//!
//! It does something only over a layer that caches natively (such as
//! the cache filter) and allows parallel calls; otherwise it says so and
//! passes reads through.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdhost_plugin_api::{
    callbacks, host, host::LogLevel, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next,
    NextOpener, ReadRequest, Result, Support,
};

/// Configuration, and the scan clock every connection shares.
pub struct Scan {
    ahead: bool,
    clock: bool,
    forever: bool,
    size: u64,
    /// How far scans have got: where the next connection's starts with
    /// `scan-clock`.
    position: Arc<AtomicU64>,
}

impl Default for Scan {
    fn default() -> Scan {
        Scan {
            ahead: true,
            clock: true,
            forever: false,
            size: 2 << 20,
            position: Arc::default(),
        }
    }
}

/// What one connection's scan needs.
#[derive(Clone)]
struct Plan {
    clock: bool,
    forever: bool,
    step: u64,
    position: Arc<AtomicU64>,
    /// The furthest end of a client read not yet seen by the scan (0 for
    /// none), with `scan-ahead`.
    reads: Arc<AtomicU64>,
}

impl Plan {
    /// Cache the disk below, `step` bytes a request, until the end (or,
    /// with `scan-forever`, until the connection closes). Errors are
    /// ignored: the scan is advice, and the client's reads meet them.
    fn run(&self, next: &Next) {
        let Ok(size) = next.get_size() else {
            return;
        };
        loop {
            let mut offset = if self.clock {
                self.position.load(Ordering::Relaxed)
            } else {
                0
            };
            while offset < size {
                if next.closing() {
                    return;
                }
                // Reads beyond the scan need no prefetching behind them.
                offset = offset.max(self.reads.swap(0, Ordering::Relaxed));
                self.position.fetch_max(offset, Ordering::Relaxed);
                if offset < size {
                    let _ = next.cache(self.step.min(size - offset), offset, Flags::empty());
                }
                offset += self.step;
            }
            if !self.forever {
                host::debug("scan: finished scanning the disk");
                return;
            }
            self.position.store(0, Ordering::Relaxed);
        }
    }
}

#[callbacks]
impl Filter for Scan {
    const NAME: &'static str = "scan";
    const DESCRIPTION: &'static str = "prefetch the whole disk in the background";
    const CONFIG_HELP: &'static str =
        "scan-ahead=false         Skip ahead when client reads faster.
scan-clock=false         Always start prefetching from beginning.
scan-forever=true        Scan in a loop while clients connected.
scan-size=NN             Set scan block size.";
    type Handle = Layer;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "scan-ahead" => self.ahead = host::parse_bool(key, value)?,
            "scan-clock" => self.clock = host::parse_bool(key, value)?,
            "scan-forever" => self.forever = host::parse_bool(key, value)?,
            "scan-size" => self.size = host::parse_size(value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if !(512..=32 << 20).contains(&self.size) || !self.size.is_power_of_two() {
            return Err(Error::new(
                libc::EINVAL,
                "scan-size must be a power of 2 from 512 to 32M",
            ));
        }
        Ok(())
    }

    fn nonblocking(&self) -> bool {
        // A read only records how far it reached; the waiting is the
        // background job's.
        true
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Layer> {
        next.open(readonly, export_name)?;
        Ok(Layer {
            default_export: export_name.is_empty(),
            ahead: self.ahead,
            plan: Plan {
                clock: self.clock,
                forever: self.forever,
                step: self.size,
                position: self.position.clone(),
                reads: Arc::default(),
            },
        })
    }
}

/// One connection and its scan.
pub struct Layer {
    default_export: bool,
    ahead: bool,
    plan: Plan,
}

impl Layer {
    fn note_read(&self, offset: u64, count: u64) {
        if self.ahead {
            self.plan.reads.fetch_max(offset + count, Ordering::Relaxed);
        }
    }
}

fn warn(msg: &str) {
    host::log(LogLevel::Warning, &format!("scan: {msg}, not scanning"));
}

#[callbacks]
impl FilterHandle for Layer {
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        // As nbdkit: one scan of the one disk a plain command line serves.
        if !self.default_export {
            warn("not the default export");
            return Ok(());
        }
        if next.can_cache()? != Support::Native {
            warn(
                "the layer below does not cache natively \
                 (try adding --filter=cache after this filter)",
            );
            return Ok(());
        }
        let plan = self.plan.clone();
        if let Err(e) = next.background(move |next| plan.run(next)) {
            warn(&format!("no background job ({e})"));
        }
        Ok(())
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.note_read(offset, buf.len() as u64);
        next.pread(buf, offset, flags)
    }

    fn async_pread(&self, next: &Next, req: ReadRequest) {
        self.note_read(req.offset(), req.len() as u64);
        next.async_pread(req)
    }
}

nbdhost_filter!(Scan);
