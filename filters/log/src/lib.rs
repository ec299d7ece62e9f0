//! The log filter: record every connection and every request in a file,
//! in the line format of nbdkit's log filter so that the scripts people
//! already run over those logs keep working.
//!
//! A request is logged twice: when it starts (the line ends in `...`)
//! and when it ends (the action starts with `...` and the line carries the
//! result). A request that never returns is thus still visible, and the
//! `id=` field pairs the two lines when parallel requests interleave.
//! Each line is formatted first and then written with one call under a
//! lock, so lines never mix. Data and secrets are never logged.

#![forbid(unsafe_code)]

use std::ffi::CStr;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use nbdhost_plugin_api::{
    abi, host, nbdhost_filter, Error, ExtentList, Filter, FilterHandle, Flags, Next, NextOpener,
    Result, Support,
};

/// Connections numbered in the order they first ask for the export size,
/// shared by all connections like nbdkit's counter.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// The configured filter.
#[derive(Default)]
pub struct Log {
    path: Option<PathBuf>,
    append: bool,
    sink: OnceLock<Arc<Sink>>,
}

/// The open log file.
struct Sink {
    file: Mutex<File>,
}

impl Sink {
    /// Write one whole line: timestamp, optional connection, then `text`.
    fn line(&self, conn: Option<u64>, text: &str) {
        let mut s = String::with_capacity(64 + text.len());
        timestamp(&mut s, SystemTime::now());
        if let Some(c) = conn {
            let _ = write!(s, " connection={c}");
        }
        s.push(' ');
        s.push_str(text);
        s.push('\n');
        // Logging is best effort: a full disk must not fail the request.
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let _ = f.write_all(s.as_bytes());
    }
}

/// Append `YYYY-MM-DD HH:MM:SS.uuuuuu` in UTC, as nbdkit writes it.
fn timestamp(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm), so that no date crate or libc call is needed.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Quote a string for the log as nbdkit does (shell style), and escape
/// control characters so that a client-chosen export name cannot forge
/// log lines.
fn quote(s: &str, out: &mut String) {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-+=.,:/@%".contains(c));
    if plain {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' | '$' | '`' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The errno as the client will see it, named like nbdkit's log does
/// (`EROFS=>EPERM` when the server maps one errno to another).
fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::EROFS => "EROFS=>EPERM",
        libc::EACCES => "EACCES=>EPERM",
        libc::EIO => "EIO",
        libc::ENOMEM => "ENOMEM",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EFBIG => "EFBIG=>ENOSPC",
        libc::EDQUOT => "EDQUOT=>ENOSPC",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOTSUP => "ENOTSUP",
        libc::ENOSYS => "ENOSYS=>ENOTSUP",
        libc::ESHUTDOWN => "ESHUTDOWN",
        _ => "Other=>EIO",
    }
}

impl Filter for Log {
    const NAME: &'static CStr = c"log";
    const DESCRIPTION: &'static CStr = c"log every connection and request to a file";
    const CONFIG_HELP: &'static CStr = c"logfile=<FILE>    (required) The file to write the log to.
logappend=<BOOL>  True to append to the log (default false).";
    type Handle = LogHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "logfile" => {
                // Absolute now, so a later change of directory cannot move it.
                let p = std::path::absolute(value)
                    .map_err(|e| Error::new(libc::EINVAL, format!("logfile: {value}: {e}")))?;
                self.path = Some(p);
            }
            "logappend" => self.append = host::parse_bool(key, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.path.is_none() {
            return Err(Error::new(
                libc::EINVAL,
                "missing logfile= parameter for the log filter",
            ));
        }
        Ok(())
    }

    fn get_ready(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut o = OpenOptions::new();
        o.create(true);
        if self.append {
            o.append(true);
        } else {
            o.write(true).truncate(true);
        }
        let file = o
            .open(path)
            .map_err(|e| Error::new(libc::EIO, format!("open: {}: {e}", path.display())))?;
        let sink = Arc::new(Sink {
            file: Mutex::new(file),
        });
        sink.line(None, "Ready");
        let _ = self.sink.set(sink);
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<LogHandle> {
        let sink = self
            .sink
            .get()
            .cloned()
            .ok_or_else(|| Error::new(libc::EIO, "log file is not open"))?;
        next.open(readonly, export_name)?;
        Ok(LogHandle {
            sink,
            export: export_name.to_string(),
            tls: host::is_tls(),
            conn: OnceLock::new(),
            announced: AtomicBool::new(false),
            ids: AtomicU64::new(0),
        })
    }
}

/// One connection's log state.
pub struct LogHandle {
    sink: Arc<Sink>,
    export: String,
    tls: bool,
    /// Numbered when first logged, so unused opens take no number.
    conn: OnceLock<u64>,
    announced: AtomicBool,
    ids: AtomicU64,
}

/// Render a capability answer as nbdkit does, `-1` when it failed.
fn cap<T>(r: Result<T>, f: impl FnOnce(T) -> i32) -> i32 {
    r.map(f).unwrap_or(-1)
}

fn support(s: Support) -> i32 {
    match s {
        Support::None => 0,
        Support::Emulate => 1,
        Support::Native => 2,
    }
}

impl LogHandle {
    fn conn(&self) -> u64 {
        *self
            .conn
            .get_or_init(|| CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Log the `Connect` line. The SDK has no hook between open and the
    /// first request where the layer below may be asked questions, but
    /// the server always asks the size right after opening: announcing the
    /// connection then gives the full nbdkit line, and probes that open
    /// the layer without using it stay out of the log and the numbering.
    fn connect(&self, next: &Next, size: u64) {
        if self.announced.swap(true, Ordering::Relaxed) {
            return;
        }
        let conn = self.conn();
        let bs = next.block_size().ok().flatten();
        let (min, pref, max) = bs.map_or((0, 0, 0), |b| (b.minimum, b.preferred, b.maximum));
        let b = |r: Result<bool>| cap(r, i32::from);
        let mut s = String::from("Connect export=");
        quote(&self.export, &mut s);
        let _ = write!(
            s,
            " tls={} size={size:#x} minsize={min:#x} prefsize={pref:#x} maxsize={max:#x} \
             write={} flush={} rotational={} trim={} zero={} fua={} extents={} cache={} \
             fast_zero={}",
            i32::from(self.tls),
            b(next.can_write()),
            b(next.can_flush()),
            b(next.is_rotational()),
            b(next.can_trim()),
            b(next.can_zero()),
            cap(next.can_fua(), support),
            b(next.can_extents()),
            cap(next.can_cache(), support),
            b(next.can_fast_zero()),
        );
        self.sink.line(Some(conn), &s);
    }

    /// Log the start of a request and return its id.
    fn enter(&self, act: &str, args: std::fmt::Arguments) -> u64 {
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let args = args.to_string();
        let sep = if args.is_empty() { "" } else { " " };
        self.sink
            .line(Some(self.conn()), &format!("{act} id={id}{sep}{args} ..."));
        id
    }

    /// Log how a request ended.
    fn leave<T>(&self, act: &str, id: u64, r: &Result<T>) {
        let result = match r {
            Ok(_) => "return=0 (Success)".to_string(),
            Err(e) => format!("return=-1 ({})", errno_name(e.raw_errno())),
        };
        self.sink
            .line(Some(self.conn()), &format!("...{act} id={id} {result}"));
    }

    /// Log a request around `f`.
    fn logged<T>(
        &self,
        act: &str,
        args: std::fmt::Arguments,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let id = self.enter(act, args);
        let r = f();
        self.leave(act, id, &r);
        r
    }
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        // Only connections that were announced are closed in the log.
        if let Some(&c) = self.conn.get() {
            let n = self.ids.load(Ordering::Relaxed);
            self.sink
                .line(Some(c), &format!("Disconnect transactions={n}"));
        }
    }
}

fn bit(flags: Flags, f: Flags) -> i32 {
    i32::from(flags.contains(f))
}

impl FilterHandle for LogHandle {
    fn get_size(&self, next: &Next) -> Result<u64> {
        let size = next.get_size()?;
        self.connect(next, size);
        Ok(size)
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let count = buf.len();
        self.logged(
            "Read",
            format_args!("offset={offset:#x} count={count:#x}"),
            || next.pread(buf, offset, flags),
        )
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.logged(
            "Write",
            format_args!(
                "offset={offset:#x} count={:#x} fua={}",
                buf.len(),
                bit(flags, Flags::FUA)
            ),
            || next.pwrite(buf, offset, flags),
        )
    }

    fn flush(&self, next: &Next, flags: Flags) -> Result<()> {
        self.logged("Flush", format_args!(""), || next.flush(flags))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.logged(
            "Trim",
            format_args!(
                "offset={offset:#x} count={count:#x} fua={}",
                bit(flags, Flags::FUA)
            ),
            || next.trim(count, offset, flags),
        )
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.logged(
            "Zero",
            format_args!(
                "offset={offset:#x} count={count:#x} trim={} fua={} fast={}",
                bit(flags, Flags::MAY_TRIM),
                bit(flags, Flags::FUA),
                bit(flags, Flags::FAST_ZERO)
            ),
            || next.zero(count, offset, flags),
        )
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.logged(
            "Cache",
            format_args!("offset={offset:#x} count={count:#x}"),
            || next.cache(count, offset, flags),
        )
    }

    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        let id = self.enter(
            "Extents",
            format_args!(
                "offset={offset:#x} count={count:#x} req_one={}",
                bit(flags, Flags::REQ_ONE)
            ),
        );
        // Fetched as a copy rather than passed through, to log what the
        // client is told.
        let r = next.extents(count, offset, flags).and_then(|ex| {
            for &(o, l, t) in &ex {
                list.add(o, l, t)?;
            }
            Ok(ex)
        });
        match &r {
            Ok(ex) => {
                let mut s = format!("...Extents id={id} extents=(");
                for (i, &(o, l, t)) in ex.iter().enumerate() {
                    if i > 0 {
                        s.push(' ');
                    }
                    let kinds: Vec<&str> = [(abi::EXTENT_HOLE, "hole"), (abi::EXTENT_ZERO, "zero")]
                        .iter()
                        .filter(|(b, _)| t & b != 0)
                        .map(|&(_, n)| n)
                        .collect();
                    let _ = write!(s, "{o:#x} {l:#x} \"{}\"", kinds.join(","));
                }
                s.push_str(") return=0");
                self.sink.line(Some(self.conn()), &s);
            }
            Err(_) => self.leave("Extents", id, &r),
        }
        r.map(drop)
    }
}

nbdhost_filter!(Log);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil() {
        let mut s = String::new();
        timestamp(
            &mut s,
            UNIX_EPOCH + std::time::Duration::from_micros(951_782_400_000_123),
        );
        assert_eq!(s, "2000-02-29 00:00:00.000123");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn names_cannot_break_lines() {
        let mut s = String::new();
        quote("a\nconnection=9 Read", &mut s);
        assert_eq!(s, "\"a\\x0aconnection=9 Read\"");
        let mut s = String::new();
        quote("", &mut s);
        assert_eq!(s, "\"\"");
        let mut s = String::new();
        quote("disk1", &mut s);
        assert_eq!(s, "disk1");
    }
}
