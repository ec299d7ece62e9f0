//! The delay filter: hold requests (and optionally connection opens and
//! closes) for a fixed time before passing them on, to simulate a slow or
//! distant disk (nbdkit's delay filter).

#![forbid(unsafe_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, ExtentList, ExtentsRequest, Filter, FilterHandle,
    Flags, Next, NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// Delays as given: `wdelay` covers write, zero and trim unless those have
/// their own.
#[derive(Default)]
struct Given {
    read: Option<Duration>,
    write_all: Option<Duration>,
    write: Option<Duration>,
    zero: Option<Duration>,
    trim: Option<Duration>,
    extents: Option<Duration>,
    cache: Option<Duration>,
    open: Option<Duration>,
    close: Option<Duration>,
}

/// The delay of each operation.
#[derive(Debug, Default, Clone, PartialEq)]
struct Delays {
    read: Duration,
    write: Duration,
    zero: Duration,
    trim: Duration,
    extents: Duration,
    cache: Duration,
    open: Duration,
    close: Duration,
    /// Whether fast-zero requests wait like others (true) or fail at once.
    fast_zero: bool,
}

/// The configured filter.
pub struct Delay {
    given: Given,
    fast_zero: bool,
    delays: OnceLock<Arc<Delays>>,
}

impl Default for Delay {
    fn default() -> Self {
        Delay {
            given: Given::default(),
            fast_zero: true,
            delays: OnceLock::new(),
        }
    }
}

/// `SECS` (fractions allowed, e.g. `1.5`) or a number with a unit: `s`,
/// `ms`, `us` or `ns`.
fn parse_delay(key: &str, v: &str) -> Result<Duration> {
    let t = v.trim();
    let (num, scale) = [("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("s", 1.0)]
        .iter()
        .find_map(|&(suffix, scale)| t.strip_suffix(suffix).map(|n| (n, scale)))
        .unwrap_or((t, 1.0));
    let bad = || {
        Error::new(
            libc::EINVAL,
            format!("{key}: '{v}' is not a delay (SECS, or NNms)"),
        )
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(n * scale).map_err(|_| bad())
}

impl Delay {
    fn resolve(&self) -> Delays {
        let g = &self.given;
        let w = |own: Option<Duration>| own.or(g.write_all).unwrap_or_default();
        Delays {
            read: g.read.unwrap_or_default(),
            write: w(g.write),
            zero: w(g.zero),
            trim: w(g.trim),
            extents: g.extents.unwrap_or_default(),
            cache: g.cache.unwrap_or_default(),
            open: g.open.unwrap_or_default(),
            close: g.close.unwrap_or_default(),
            fast_zero: self.fast_zero,
        }
    }
}

#[callbacks]
impl Filter for Delay {
    const NAME: &'static str = "delay";
    const DESCRIPTION: &'static str = "delay requests, to simulate a slow disk";
    const CONFIG_HELP: &'static str = "rdelay=<SECS>|<NN>ms        Read delay (also delay-read=).
wdelay=<SECS>|<NN>ms        Write, zero and trim delay.
delay-write=, delay-zero=, delay-trim=, delay-extents=, delay-cache=,
delay-open=, delay-close=   Delay of one operation.
delay-fast-zero=<BOOL>      Delay fast zero requests (default true) or fail them at once.";
    type Handle = DelayHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        let g = &mut self.given;
        let slot = match key {
            "rdelay" | "delay-read" | "delay-reads" => &mut g.read,
            "wdelay" => &mut g.write_all,
            "delay-write" | "delay-writes" => &mut g.write,
            "delay-zero" | "delay-zeroes" => &mut g.zero,
            "delay-trim" | "delay-trims" | "delay-discard" | "delay-discards" => &mut g.trim,
            "delay-extents" => &mut g.extents,
            "delay-cache" => &mut g.cache,
            "delay-open" => &mut g.open,
            "delay-close" => &mut g.close,
            "delay-fast-zero" => {
                self.fast_zero = host::parse_bool(key, value)?;
                return Ok(true);
            }
            _ => return Ok(false),
        };
        *slot = Some(parse_delay(key, value)?);
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        let _ = self.delays.set(Arc::new(self.resolve()));
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<DelayHandle> {
        let delays = self
            .delays
            .get()
            .cloned()
            .unwrap_or_else(|| Arc::new(self.resolve()));
        sleep(delays.open)?;
        next.open(readonly, export_name)?;
        Ok(DelayHandle { delays })
    }
}

/// Wait `d`; at shutdown the wait ends and the request fails with
/// `ESHUTDOWN`, as nbdkit's delay filter does.
fn sleep(d: Duration) -> Result<()> {
    if d.is_zero() {
        return Ok(());
    }
    host::sleep(d)
}

/// One connection: a reference to the delays.
pub struct DelayHandle {
    delays: Arc<Delays>,
}

impl Drop for DelayHandle {
    fn drop(&mut self) {
        // The SDK has no hook for a graceful disconnect alone (nbdkit's
        // finalize), so every close is delayed, abrupt ones included.
        // At shutdown the wait just ends; the handle closes either way.
        let _ = sleep(self.delays.close);
    }
}

#[callbacks]
impl FilterHandle for DelayHandle {
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        sleep(self.delays.read)?;
        next.pread(buf, offset, flags)
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        sleep(self.delays.write)?;
        next.pwrite(buf, offset, flags)
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        sleep(self.delays.trim)?;
        next.trim(count, offset, flags)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FAST_ZERO) && !self.delays.fast_zero {
            // A fast zero asks for a quick answer; "not supported" is one.
            return Err(Error::errno(libc::ENOTSUP));
        }
        sleep(self.delays.zero)?;
        next.zero(count, offset, flags)
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        sleep(self.delays.cache)?;
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
        sleep(self.delays.extents)?;
        next.extents_into(count, offset, flags, list)
    }

    fn async_pread(&self, next: &Next, req: ReadRequest) {
        next.start_after(self.delays.read, req, Next::async_pread)
    }
    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        next.start_after(self.delays.write, req, Next::async_pwrite)
    }
    fn async_trim(&self, next: &Next, req: RangeRequest) {
        next.start_after(self.delays.trim, req, Next::async_trim)
    }
    fn async_zero(&self, next: &Next, req: RangeRequest) {
        if req.flags().contains(Flags::FAST_ZERO) && !self.delays.fast_zero {
            return req.complete(Err(Error::errno(libc::ENOTSUP)));
        }
        next.start_after(self.delays.zero, req, Next::async_zero)
    }
    fn async_cache(&self, next: &Next, req: RangeRequest) {
        next.start_after(self.delays.cache, req, Next::async_cache)
    }
    fn async_extents(&self, next: &Next, req: ExtentsRequest) {
        next.start_after(self.delays.extents, req, Next::async_extents)
    }
}

nbdhost_filter!(Delay);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse_like_nbdkit() {
        let ms = Duration::from_millis;
        assert_eq!(parse_delay("k", "1").unwrap(), ms(1000));
        assert_eq!(parse_delay("k", "1.5").unwrap(), ms(1500));
        assert_eq!(parse_delay("k", "100ms").unwrap(), ms(100));
        assert_eq!(parse_delay("k", "2s").unwrap(), ms(2000));
        assert_eq!(
            parse_delay("k", "250us").unwrap(),
            Duration::from_micros(250)
        );
        assert!(parse_delay("k", "-1").is_err());
        assert!(parse_delay("k", "soon").is_err());
        assert!(parse_delay("k", "").is_err());
    }

    #[test]
    fn wdelay_covers_what_has_no_delay_of_its_own() {
        let mut f = Delay::default();
        for (k, v) in [("delay-zero", "1"), ("wdelay", "2"), ("rdelay", "10ms")] {
            assert!(f.config(k, v).unwrap());
        }
        let d = f.resolve();
        assert_eq!(d.zero, Duration::from_secs(1));
        assert_eq!(d.write, Duration::from_secs(2));
        assert_eq!(d.trim, Duration::from_secs(2));
        assert_eq!(d.read, Duration::from_millis(10));
        assert_eq!(d.extents, Duration::ZERO);
        assert!(!f.config("delay", "1").unwrap());
    }
}
