//! The stats filter: count requests, bytes and time per command across
//! all connections and print a summary when the server exits, in the
//! format of nbdkit's stats filter, plus a latency histogram per command.
//!
//! The request path only increments atomic counters (no lock is shared
//! between connections); the summary is computed once, at unload.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, ExtentList, Filter, FilterHandle, Flags, Next,
    NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// Commands in the order they are printed (nbdkit's order).
#[derive(Clone, Copy)]
enum Cmd {
    Read,
    Write,
    Trim,
    Zero,
    Extents,
    Cache,
    Flush,
}

const NAMES: [&str; 7] = ["read", "write", "trim", "zero", "extents", "cache", "flush"];

/// Buckets of the power-of-two histograms: index `64 - leading_zeros(x)`,
/// so 0 holds 0, 1 holds 1, and `k` holds `[2^(k-1), 2^k)`.
const BUCKETS: usize = 65;

fn bucket(x: u64) -> usize {
    (64 - x.leading_zeros()) as usize
}

/// Request sizes by bit length, and within each size the offsets by how
/// many low bits are zero, as nbdkit's size and alignment breakdown.
struct SizeHist {
    /// `[size bits][alignment bits]`; size bits are `floor(log2(count))`
    /// (0..64), alignment is trailing zeros of the offset (64 for 0).
    reqs: Box<[[AtomicU64; BUCKETS]; 64]>,
    bytes: [AtomicU64; 64],
}

impl SizeHist {
    fn new() -> SizeHist {
        SizeHist {
            reqs: Box::new([const { [const { AtomicU64::new(0) }; BUCKETS] }; 64]),
            bytes: [const { AtomicU64::new(0) }; 64],
        }
    }

    fn record(&self, count: u64, offset: u64) {
        if count == 0 {
            return;
        }
        let size = 63 - count.leading_zeros() as usize;
        let align = offset.trailing_zeros() as usize;
        self.reqs[size][align].fetch_add(1, Relaxed);
        self.bytes[size].fetch_add(count, Relaxed);
    }
}

/// Counters of one command.
struct Counters {
    ops: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
    errors: AtomicU64,
    /// Latency of successful requests in microseconds, by [`bucket`].
    latency: [AtomicU64; BUCKETS],
    sizes: Option<SizeHist>,
}

impl Counters {
    fn new(sizes: bool) -> Counters {
        Counters {
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: [const { AtomicU64::new(0) }; BUCKETS],
            sizes: sizes.then(SizeHist::new),
        }
    }
}

/// Everything counted, shared by all connections.
struct Stats {
    start: Instant,
    threshold: u32,
    cmds: [Counters; 7],
}

impl Stats {
    fn new(threshold: u32) -> Stats {
        // nbdkit breaks down the sizes of the commands that move or
        // change data, and only when a threshold is set.
        let hist = |c: Cmd| threshold > 0 && (c as usize) < Cmd::Extents as usize;
        Stats {
            start: Instant::now(),
            threshold,
            cmds: [
                Cmd::Read,
                Cmd::Write,
                Cmd::Trim,
                Cmd::Zero,
                Cmd::Extents,
                Cmd::Cache,
                Cmd::Flush,
            ]
            .map(|c| Counters::new(hist(c))),
        }
    }

    /// Time `f` and count it under `cmd`; `count` bytes at `offset`.
    fn measure<T>(
        &self,
        cmd: Cmd,
        count: u64,
        offset: u64,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let t = Instant::now();
        let r = f();
        self.count(cmd, count, offset, t, r.is_ok());
        r
    }

    /// Count a request started at `t` that has just ended, under `cmd`.
    fn count(&self, cmd: Cmd, count: u64, offset: u64, t: Instant, ok: bool) {
        let elapsed = t.elapsed();
        let c = &self.cmds[cmd as usize];
        if !ok {
            // Failed requests are kept apart, as nbdkit does not count them.
            c.errors.fetch_add(1, Relaxed);
            return;
        }
        c.ops.fetch_add(1, Relaxed);
        c.bytes.fetch_add(count, Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        c.nanos.fetch_add(nanos, Relaxed);
        c.latency[bucket(nanos / 1000)].fetch_add(1, Relaxed);
        if let Some(h) = &c.sizes {
            h.record(count, offset);
        }
    }

    /// A continuation that counts an asynchronous request started now
    /// when its answer comes back, and passes the answer on.
    fn counting(
        self: &Arc<Self>,
        cmd: Cmd,
        count: u64,
        offset: u64,
    ) -> impl FnOnce(Result<()>) -> Result<()> + Send + 'static {
        let (stats, t) = (self.clone(), Instant::now());
        move |r| {
            stats.count(cmd, count, offset, t, r.is_ok());
            r
        }
    }

    /// The report printed at exit.
    fn report(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let mut out = String::new();
        let get = |c: &Counters| (c.ops.load(Relaxed), c.bytes.load(Relaxed));
        let ops: u64 = self.cmds.iter().map(|c| get(c).0).sum();
        // Like nbdkit: bytes of extents and cache requests were not moved.
        let bytes: u64 = self.cmds[..Cmd::Extents as usize]
            .iter()
            .map(|c| get(c).1)
            .sum();
        let _ = writeln!(
            out,
            "total: {ops} ops, {secs:.6} s, {}, {}/s",
            human(bytes as f64),
            rate(bytes, secs)
        );
        for (name, c) in NAMES.iter().zip(&self.cmds) {
            let (ops, bytes) = get(c);
            let errors = c.errors.load(Relaxed);
            if ops == 0 && errors == 0 {
                continue;
            }
            let busy = c.nanos.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "{name}: {ops} ops, {busy:.6} s, {}, {}/s op, {}/s total",
                human(bytes as f64),
                rate(bytes, busy),
                rate(bytes, secs)
            );
            if errors > 0 {
                let _ = writeln!(out, "  errors: {errors}");
            }
            if let Some(h) = &c.sizes {
                breakdown(&mut out, h, ops, self.threshold);
            }
            latency(&mut out, &c.latency);
            out.push('\n');
        }
        out
    }
}

fn human(b: f64) -> String {
    const KIB: f64 = 1024.0;
    if b < KIB {
        format!("{b:.0} bytes")
    } else if b < KIB * KIB {
        format!("{:.2} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.2} MiB", b / (KIB * KIB))
    } else {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    }
}

fn rate(bytes: u64, secs: f64) -> String {
    if secs > 0.0 {
        human(bytes as f64 / secs)
    } else {
        "(n/a)".into()
    }
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

/// nbdkit's size and alignment breakdown: the most common sizes until
/// `threshold` percent of requests are shown, the rest as "other sizes";
/// under each size, the share of requests aligned to at least N bits,
/// until fewer than `100 - threshold` percent remain.
fn breakdown(out: &mut String, h: &SizeHist, ops: u64, threshold: u32) {
    if ops == 0 {
        return;
    }
    let _ = writeln!(out, "  Request size and alignment breakdown:");
    let mut sizes: Vec<(usize, u64)> = (0..64)
        .map(|s| (s, h.reqs[s].iter().map(|a| a.load(Relaxed)).sum()))
        .filter(|&(_, n)| n > 0)
        .collect();
    sizes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: u64 = sizes.iter().map(|s| s.1).sum();
    let mut shown = 0;
    for (i, &(s, n)) in sizes.iter().enumerate() {
        if pct(shown, total) >= f64::from(threshold) {
            let rest: u64 = sizes[i..].iter().map(|s| s.1).sum();
            let rest_bytes: u64 = sizes[i..].iter().map(|s| h.bytes[s.0].load(Relaxed)).sum();
            let _ = writeln!(
                out,
                "    other sizes: {:5.1}% ({rest} reqs, {} total)",
                pct(rest, total),
                human(rest_bytes as f64)
            );
            break;
        }
        shown += n;
        let _ = writeln!(
            out,
            "    {s:2} bits: {:5.1}% ({n} reqs, {} total)",
            pct(n, total),
            human(h.bytes[s].load(Relaxed) as f64)
        );
        let row: Vec<u64> = h.reqs[s].iter().map(|a| a.load(Relaxed)).collect();
        let floor = 100.0 - f64::from(threshold);
        // Offset 0 (alignment 64) is aligned to every level, so it counts
        // in every line but gets none of its own.
        let first = row.iter().position(|&c| c > 0).unwrap_or(64);
        let mut last = 0;
        for a in first..64 {
            let at_least: u64 = row[a..].iter().sum();
            if at_least == 0 {
                break;
            }
            if at_least == last {
                continue;
            }
            last = at_least;
            let p = pct(at_least, n);
            if a > first && p < floor {
                let _ = writeln!(out, "         {a:2}+ bit-aligned: {p:5.1}% ({at_least})");
                break;
            }
            let _ = writeln!(out, "         {a:2} bit aligned: {p:5.1}% ({at_least})");
        }
    }
}

/// Latency histogram: one line per power-of-two range of microseconds,
/// from the fastest to the slowest bucket seen.
fn latency(out: &mut String, buckets: &[AtomicU64; BUCKETS]) {
    let v: Vec<u64> = buckets.iter().map(|a| a.load(Relaxed)).collect();
    let total: u64 = v.iter().sum();
    let (Some(lo), Some(hi)) = (
        v.iter().position(|&n| n > 0),
        v.iter().rposition(|&n| n > 0),
    ) else {
        return;
    };
    let _ = writeln!(out, "  Latency histogram:");
    for (b, &n) in v.iter().enumerate().take(hi + 1).skip(lo) {
        let range = match b {
            0 => "0".to_string(),
            1 => "1".to_string(),
            _ => format!("{}-{}", 1u64 << (b - 1), (1u64 << b) - 1),
        };
        let _ = writeln!(out, "    {range:>13} us: {:5.1}% ({n})", pct(n, total));
    }
}

/// The configured filter.
pub struct StatsFilter {
    path: Option<PathBuf>,
    append: bool,
    threshold: u32,
    out: Mutex<Option<File>>,
    stats: OnceLock<Arc<Stats>>,
}

impl Default for StatsFilter {
    fn default() -> Self {
        StatsFilter {
            path: None,
            append: false,
            threshold: 95,
            out: Mutex::new(None),
            stats: OnceLock::new(),
        }
    }
}

#[callbacks]
impl Filter for StatsFilter {
    const NAME: &'static str = "stats";
    const DESCRIPTION: &'static str = "print request statistics when the server exits";
    const CONFIG_HELP: &'static str =
        "statsfile=<FILE>       The file to write the statistics to (default: stderr).
statsappend=<BOOL>     True to append to the file (default false).
statsthreshold=<PCT>   Share of requests the size breakdown covers (default 95, 0 = off).";
    type Handle = StatsHandle;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "statsfile" => {
                let p = std::path::absolute(value)
                    .map_err(|e| Error::new(libc::EINVAL, format!("statsfile: {value}: {e}")))?;
                self.path = Some(p);
            }
            "statsappend" => self.append = host::parse_bool(key, value)?,
            "statsthreshold" => {
                self.threshold = value
                    .trim_end_matches('%')
                    .parse()
                    .ok()
                    .filter(|&t| t <= 100)
                    .ok_or_else(|| {
                        Error::new(
                            libc::EINVAL,
                            format!(
                                "statsthreshold must be a percentage from 0 to 100, not '{value}'"
                            ),
                        )
                    })?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn get_ready(&self) -> Result<()> {
        // Opened now, as nbdkit does, so a bad path stops the server at
        // start-up rather than losing the statistics at exit.
        if let Some(path) = &self.path {
            let mut o = OpenOptions::new();
            o.create(true);
            if self.append {
                o.append(true);
            } else {
                o.write(true).truncate(true);
            }
            let f = o
                .open(path)
                .map_err(|e| Error::new(libc::EIO, format!("open: {}: {e}", path.display())))?;
            *self.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        }
        let _ = self.stats.set(Arc::new(Stats::new(self.threshold)));
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<StatsHandle> {
        let stats = self
            .stats
            .get()
            .cloned()
            .ok_or_else(|| Error::new(libc::EIO, "stats filter is not ready"))?;
        next.open(readonly, export_name)?;
        Ok(StatsHandle { stats })
    }

    fn unload(&mut self) {
        let Some(stats) = self.stats.get() else {
            return;
        };
        let report = stats.report();
        match self.out.get_mut().unwrap_or_else(|e| e.into_inner()) {
            Some(f) => {
                let _ = f.write_all(report.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(report.as_bytes());
            }
        }
    }
}

/// One connection: a reference to the shared counters.
pub struct StatsHandle {
    stats: Arc<Stats>,
}

#[callbacks]
impl FilterHandle for StatsHandle {
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let n = buf.len() as u64;
        self.stats
            .measure(Cmd::Read, n, offset, || next.pread(buf, offset, flags))
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.stats
            .measure(Cmd::Write, buf.len() as u64, offset, || {
                next.pwrite(buf, offset, flags)
            })
    }
    fn flush(&self, next: &Next, flags: Flags) -> Result<()> {
        self.stats.measure(Cmd::Flush, 0, 0, || next.flush(flags))
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.stats
            .measure(Cmd::Trim, count, offset, || next.trim(count, offset, flags))
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.stats
            .measure(Cmd::Zero, count, offset, || next.zero(count, offset, flags))
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.stats.measure(Cmd::Cache, count, offset, || {
            next.cache(count, offset, flags)
        })
    }
    // On an asynchronous chain each request goes down at once and is
    // counted when its answer comes back, on a worker thread: nothing
    // waits here. (Extents stay synchronous.)
    fn async_pread(&self, next: &Next, req: ReadRequest) {
        let counting = self
            .stats
            .counting(Cmd::Read, req.len() as u64, req.offset());
        if let Some(req) = req.then(counting) {
            next.async_pread(req)
        }
    }
    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        let counting = self
            .stats
            .counting(Cmd::Write, req.len() as u64, req.offset());
        if let Some(req) = req.then(counting) {
            next.async_pwrite(req)
        }
    }
    fn async_flush(&self, next: &Next, req: RangeRequest) {
        if let Some(req) = req.then(self.stats.counting(Cmd::Flush, 0, 0)) {
            next.async_flush(req)
        }
    }
    fn async_trim(&self, next: &Next, req: RangeRequest) {
        let counting = self.stats.counting(Cmd::Trim, req.count(), req.offset());
        if let Some(req) = req.then(counting) {
            next.async_trim(req)
        }
    }
    fn async_zero(&self, next: &Next, req: RangeRequest) {
        let counting = self.stats.counting(Cmd::Zero, req.count(), req.offset());
        if let Some(req) = req.then(counting) {
            next.async_zero(req)
        }
    }
    fn async_cache(&self, next: &Next, req: RangeRequest) {
        let counting = self.stats.counting(Cmd::Cache, req.count(), req.offset());
        if let Some(req) = req.then(counting) {
            next.async_cache(req)
        }
    }
    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        self.stats.measure(Cmd::Extents, count, offset, || {
            next.extents_into(count, offset, flags, list)
        })
    }
}

nbdhost_filter!(StatsFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_sizes_and_latency() {
        let s = Stats::new(95);
        for i in 0..3 {
            s.measure(Cmd::Write, 65536, i * 65536, || Ok(())).unwrap();
        }
        let _ = s.measure(Cmd::Read, 512, 0, || Err::<(), _>(Error::errno(libc::EIO)));
        let r = s.report();
        assert!(r.starts_with("total: 3 ops, "), "{r}");
        assert!(r.contains("write: 3 ops, "), "{r}");
        assert!(r.contains("192.00 KiB"), "{r}");
        assert!(
            r.contains("read: 0 ops, ") && r.contains("  errors: 1"),
            "{r}"
        );
        assert!(
            r.contains("16 bits: 100.0% (3 reqs, 192.00 KiB total)"),
            "{r}"
        );
        assert!(r.contains("16 bit aligned: 100.0% (3)"), "{r}");
        assert!(r.contains("17 bit aligned:  66.7% (2)"), "{r}");
        assert!(r.contains("18 bit aligned:  33.3% (1)"), "{r}");
        assert!(!r.contains("19 bit"), "{r}");
        assert!(r.contains("Latency histogram"), "{r}");
    }

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(2), 2);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(4), 3);
        assert_eq!(bucket(u64::MAX), 64);
    }
}
