//! The rate filter: limit the bandwidth of reads and writes, for the
//! whole server and/or per connection, with token buckets (nbdkit's rate
//! filter). Rates can be changed while the server runs through files that
//! are re-read every [`RECHECK`].

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener,
    ReadRequest, Result, WriteRequest,
};

/// How long a rate file's last reading is trusted.
pub const RECHECK: Duration = Duration::from_millis(100);

/// A token bucket counting bits.
///
/// Unlike a bucket that lets a request through only once enough tokens
/// are saved up, this one lends: a request takes all it needs at once,
/// possibly leaving the level negative, and waits until the debt is paid
/// at the configured rate. A request larger than the bucket then costs
/// exactly its size divided by the rate, and requests queued behind it on
/// a shared bucket wait their turn.
#[derive(Debug)]
struct Bucket {
    /// Bits per second; 0 means no limit.
    rate: u64,
    /// Capacity in seconds of traffic at `rate` (the burstiness).
    burst: f64,
    /// Tokens available; negative while in debt.
    level: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket: a new client may burst at once.
    fn new(rate: u64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            level: rate as f64 * burst,
            last: Instant::now(),
        }
    }

    fn capacity(&self) -> f64 {
        self.rate as f64 * self.burst
    }

    fn set_rate(&mut self, rate: u64) {
        if rate != self.rate {
            host::debug(&format!("rate adjusted from {} to {rate}", self.rate));
            let was_unlimited = self.rate == 0;
            self.rate = rate;
            // A newly imposed limit starts with a full bucket, as a new
            // connection does; a changed one keeps what is left of it.
            self.level = if was_unlimited {
                self.capacity()
            } else {
                self.level.min(self.capacity())
            };
        }
    }

    /// Take `bits` at `now` and say how long the caller must wait.
    fn take(&mut self, bits: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate as f64;
        self.level = (self.level + rate * elapsed).min(self.capacity()) - bits as f64;
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / rate)
        }
    }
}

/// A file holding a rate, read again at most every [`RECHECK`].
struct RateFile {
    path: PathBuf,
    /// The last rate read plus one (0: none read yet), so one atomic
    /// serves both the value and whether there is one.
    value: AtomicU64,
    checked: Mutex<Option<Instant>>,
}

impl RateFile {
    fn new(path: PathBuf) -> RateFile {
        RateFile {
            path,
            value: AtomicU64::new(0),
            checked: Mutex::new(None),
        }
    }

    /// The rate the file says, or the last one it said if it is gone or
    /// unreadable now, or `None` if it never said one.
    fn current(&self) -> Option<u64> {
        let now = Instant::now();
        // One request re-reads the file; the others use the last value.
        if let Ok(mut checked) = self.checked.try_lock() {
            if checked.is_none_or(|t| now.duration_since(t) >= RECHECK) {
                *checked = Some(now);
                drop(checked);
                if let Some(r) = self.read() {
                    self.value.store(r.saturating_add(1), Ordering::Relaxed);
                }
            }
        }
        self.value.load(Ordering::Relaxed).checked_sub(1)
    }

    fn read(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let line = text.lines().next()?.trim();
        match host::parse_size(line) {
            Ok(r) => Some(r),
            Err(e) => {
                host::debug(&format!("{}: {e}", self.path.display()));
                None
            }
        }
    }
}

/// State shared by all connections.
struct Shared {
    read: Mutex<Bucket>,
    write: Mutex<Bucket>,
    rate_file: Option<RateFile>,
    connection_rate: u64,
    connection_rate_file: Option<RateFile>,
    burst: f64,
}

/// The configured filter.
pub struct Rate {
    rate: u64,
    connection_rate: u64,
    rate_file: Option<PathBuf>,
    connection_rate_file: Option<PathBuf>,
    burst: f64,
    shared: OnceLock<Arc<Shared>>,
}

impl Default for Rate {
    fn default() -> Self {
        Rate {
            rate: 0,
            connection_rate: 0,
            rate_file: None,
            connection_rate_file: None,
            burst: 2.0,
            shared: OnceLock::new(),
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::new(libc::EINVAL, msg)
}

/// A rate in bits per second with nbdkit's size suffixes (`1M` is 2^20).
fn parse_rate(key: &str, old: u64, v: &str) -> Result<u64> {
    if old > 0 {
        return Err(invalid(format!("{key} set twice on the command line")));
    }
    match host::parse_size(v)? {
        0 => Err(invalid(format!("{key} cannot be set to 0"))),
        r => Ok(r),
    }
}

fn lock(m: &Mutex<Bucket>) -> MutexGuard<'_, Bucket> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bring `bucket` to the rate `file` says, then take `bytes` from it:
/// how long to wait. The lock is held only for the arithmetic.
fn take(bucket: &Mutex<Bucket>, file: Option<&RateFile>, bytes: usize) -> Duration {
    let r = file.and_then(RateFile::current);
    let mut b = lock(bucket);
    if let Some(r) = r {
        b.set_rate(r);
    }
    // Counted in bits on the wire, without protocol overhead, as nbdkit.
    b.take(bytes as u64 * 8, Instant::now())
}

/// Take `bytes` from `bucket` and wait as long as it asks.
fn throttle(bucket: &Mutex<Bucket>, file: Option<&RateFile>, bytes: usize) -> Result<()> {
    let wait = take(bucket, file, bytes);
    if wait.is_zero() {
        return Ok(());
    }
    // Cut short (ESHUTDOWN) when the server shuts down.
    host::sleep(wait)
}

#[callbacks]
impl Filter for Rate {
    const NAME: &'static str = "rate";
    const DESCRIPTION: &'static str = "limit bandwidth, for the server or per connection";
    const CONFIG_HELP: &'static str = "rate=<BITSPERSEC>              Limit total bandwidth.
connection-rate=<BITSPERSEC>   Limit per-connection bandwidth.
rate-file=<FILE>               Dynamically adjust total bandwidth.
connection-rate-file=<FILE>    Dynamically adjust per-connection bandwidth.
burstiness=<SECS>              Bucket capacity in seconds at the rate (default 2.0).";
    type Handle = RateHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        let path =
            |v: &str| std::path::absolute(v).map_err(|e| invalid(format!("{key}: {v}: {e}")));
        match key {
            "rate" => self.rate = parse_rate(key, self.rate, value)?,
            "connection-rate" => {
                self.connection_rate = parse_rate(key, self.connection_rate, value)?
            }
            "rate-file" => self.rate_file = Some(path(value)?),
            "connection-rate-file" => self.connection_rate_file = Some(path(value)?),
            "burstiness" => {
                self.burst = value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|b| b.is_finite() && *b > 0.0)
                    .ok_or_else(|| {
                        invalid(format!(
                            "burstiness must be a positive number of seconds, not '{value}'"
                        ))
                    })?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn get_ready(&self) -> Result<()> {
        let _ = self.shared.set(Arc::new(Shared {
            read: Mutex::new(Bucket::new(self.rate, self.burst)),
            write: Mutex::new(Bucket::new(self.rate, self.burst)),
            rate_file: self.rate_file.clone().map(RateFile::new),
            connection_rate: self.connection_rate,
            connection_rate_file: self.connection_rate_file.clone().map(RateFile::new),
            burst: self.burst,
        }));
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<RateHandle> {
        let shared = self
            .shared
            .get()
            .cloned()
            .ok_or_else(|| Error::new(libc::EIO, "rate filter is not ready"))?;
        next.open(readonly, export_name)?;
        let bucket = || Mutex::new(Bucket::new(shared.connection_rate, shared.burst));
        Ok(RateHandle {
            read: bucket(),
            write: bucket(),
            shared,
        })
    }
}

/// One connection's buckets, and the server's.
pub struct RateHandle {
    read: Mutex<Bucket>,
    write: Mutex<Bucket>,
    shared: Arc<Shared>,
}

#[callbacks]
impl FilterHandle for RateHandle {
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let s = &*self.shared;
        throttle(&s.read, s.rate_file.as_ref(), buf.len())?;
        throttle(&self.read, s.connection_rate_file.as_ref(), buf.len())?;
        next.pread(buf, offset, flags)
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let s = &*self.shared;
        throttle(&s.write, s.rate_file.as_ref(), buf.len())?;
        throttle(&self.write, s.connection_rate_file.as_ref(), buf.len())?;
        next.pwrite(buf, offset, flags)
    }

    // On an asynchronous chain a request waits on a timer, holding no
    // thread. Both buckets are charged at once and the request waits for
    // the longer debt, where the synchronous path charges the
    // connection's after the server's wait: either way neither rate is
    // exceeded.
    fn async_pread(&self, next: &Next, req: ReadRequest) {
        let s = &*self.shared;
        let server = take(&s.read, s.rate_file.as_ref(), req.len());
        let conn = take(&self.read, s.connection_rate_file.as_ref(), req.len());
        next.start_after(server.max(conn), req, Next::async_pread)
    }

    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        let s = &*self.shared;
        let server = take(&s.write, s.rate_file.as_ref(), req.len());
        let conn = take(&self.write, s.connection_rate_file.as_ref(), req.len());
        next.start_after(server.max(conn), req, Next::async_pwrite)
    }
}

nbdhost_filter!(Rate);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_bursts_then_lends() {
        let t0 = Instant::now();
        let mut b = Bucket::new(8000, 0.5);
        // 4000 bits of burst: 500 bytes pass at once.
        assert_eq!(b.take(4000, t0), Duration::ZERO);
        // 1000 bytes more cost 8000 bits: one second of debt.
        assert_eq!(b.take(8000, t0), Duration::from_secs(1));
        // Half a second later the debt is half paid; another request
        // queues behind it.
        let w = b.take(0, t0 + Duration::from_millis(500));
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn refill_stops_at_capacity_and_zero_is_unlimited() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 2.0);
        assert_eq!(b.take(2000, t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.take(2000, later), Duration::ZERO);
        assert_eq!(b.take(1000, later), Duration::from_secs(1));
        b.set_rate(0);
        assert_eq!(b.take(1 << 40, later), Duration::ZERO);
    }
}
