//! The log filter: record every connection and every request in a file,
//! in the line format of nbdkit's log filter so that the scripts people
//! already run over those logs keep working, or hand each entry to a shell
//! script (`logscript=`) as nbdkit's does.
//!
//! A request is logged twice: when it starts (the line ends in `...`)
//! and when it ends (the action starts with `...` and the line carries the
//! result). A request that never returns is thus still visible, and the
//! `id=` field pairs the two lines when parallel requests interleave.
//! Each line is formatted first and then written with one call under a
//! lock, so lines never mix. Data and secrets are never logged.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use nbdhost_plugin_api::{
    abi, callbacks, host, nbdhost_filter, Error, ExtentList, Filter, FilterHandle, Flags, InFlight,
    Next, NextOpener, RangeRequest, ReadRequest, Result, Support, WriteRequest,
};

/// Connections numbered in the order they first ask for the export size,
/// shared by all connections like nbdkit's counter.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Preconnect calls are numbered on their own, as in nbdkit.
static PRECONNECTS: AtomicU64 = AtomicU64::new(0);

/// The configured filter.
#[derive(Default)]
pub struct Log {
    path: Option<PathBuf>,
    script: Option<String>,
    append: bool,
    sink: OnceLock<Arc<Sink>>,
}

/// Which half of an entry: a request starting or ending, or a lone event.
#[derive(Clone, Copy)]
enum Kind {
    Enter,
    Leave,
    Print,
}

/// One log entry: who, what and its `key=value` arguments.
struct Entry<'a> {
    conn: Option<u64>,
    kind: Kind,
    act: &'a str,
    id: Option<u64>,
    args: &'a str,
}

/// Where entries go: the log file, the log script, both or neither.
struct Sink {
    file: Option<Mutex<File>>,
    script: Option<String>,
    /// The pid at `get_ready`, to tell whether the server forked since.
    pid: u32,
}

impl Sink {
    fn log(&self, e: &Entry) {
        if let Some(f) = &self.file {
            let mut s = String::with_capacity(64 + e.args.len());
            timestamp(&mut s, SystemTime::now());
            if let Some(c) = e.conn {
                let _ = write!(s, " connection={c}");
            }
            let leave = if matches!(e.kind, Kind::Leave) {
                "..."
            } else {
                ""
            };
            let _ = write!(s, " {leave}{}", e.act);
            if let Some(id) = e.id {
                let _ = write!(s, " id={id}");
            }
            if !e.args.is_empty() {
                s.push(' ');
                s.push_str(e.args);
            }
            if matches!(e.kind, Kind::Enter) {
                s.push_str(" ...");
            }
            s.push('\n');
            // Formatted first and written with one call under the lock,
            // so lines never mix. Logging is best effort: a full disk must
            // not fail the request.
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(s.as_bytes());
        }
        if let Some(script) = &self.script {
            run_script(script, e);
        }
    }

    fn print(&self, conn: Option<u64>, act: &str, args: &str) {
        self.log(&Entry {
            conn,
            kind: Kind::Print,
            act,
            id: None,
            args,
        });
    }
}

/// Run the log script with bash, as nbdkit does (an Extents entry sets a
/// bash array, which a POSIX sh such as dash refuses), with the entry as
/// shell variables before it: `act`, `connection`, `type`, `id`, then the entry's own
/// `key=value` arguments (already shell-quoted). Its status is ignored:
/// a script cannot change or stop a request.
fn run_script(script: &str, e: &Entry) {
    let mut text = format!("act={}\n", e.act);
    if let Some(c) = e.conn {
        let _ = writeln!(text, "connection={c}");
    }
    let kind = match e.kind {
        Kind::Enter => "ENTER",
        Kind::Leave => "LEAVE",
        Kind::Print => "PRINT",
    };
    let _ = writeln!(text, "type={kind}");
    if let Some(id) = e.id {
        let _ = writeln!(text, "id={id}");
    }
    let _ = writeln!(text, "{}", e.args);
    text.push_str(script);
    match Command::new("/bin/bash").arg("-c").arg(&text).status() {
        Ok(st) if st.success() => {}
        Ok(st) => host::debug(&format!("logscript: {st}")),
        Err(err) => host::debug(&format!("logscript: cannot run /bin/bash: {err}")),
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

/// The errno as nbdkit's log names it: the NBD error the client will
/// see, with anything the protocol has no code for shown as EINVAL.
fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EROFS | libc::EPERM => "EPERM",
        libc::EIO => "EIO",
        libc::ENOMEM => "ENOMEM",
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => "ENOSPC",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ENOTSUP => "ENOTSUP",
        libc::EOVERFLOW => "EOVERFLOW",
        _ => "EINVAL",
    }
}

/// How a call ended, as the arguments of its `Leave` entry.
fn outcome<T>(r: &Result<T>) -> String {
    match r {
        Ok(_) => "return=0".into(),
        Err(e) => format!("return=-1 error={}", errno_name(e.raw_errno())),
    }
}

#[callbacks]
impl Filter for Log {
    const NAME: &'static str = "log";
    const DESCRIPTION: &'static str = "log every connection and request to a file";
    const CONFIG_HELP: &'static str = "logfile=<FILE>      The file to write the log to.
logappend=<BOOL>    True to append to the log (default false).
logscript=<SCRIPT>  Shell script to run for every entry.";
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
            "logscript" => self.script = Some(value.to_string()),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// With neither a file nor a script the filter is inactive, as
    /// nbdkit's is.
    fn get_ready(&self) -> Result<()> {
        let file = match &self.path {
            None => None,
            Some(path) => {
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
                Some(Mutex::new(f))
            }
        };
        let sink = Arc::new(Sink {
            file,
            script: self.script.clone(),
            pid: std::process::id(),
        });
        sink.print(None, "Ready", "");
        let _ = self.sink.set(sink);
        Ok(())
    }

    fn after_fork(&self) -> Result<()> {
        if let Some(sink) = self.sink.get() {
            if sink.pid != std::process::id() {
                sink.print(None, "Fork", "");
            }
        }
        Ok(())
    }

    fn preconnect(&self, readonly: bool) -> Result<()> {
        if let Some(sink) = self.sink.get() {
            let id = Some(PRECONNECTS.fetch_add(1, Ordering::Relaxed) + 1);
            let args = format!("readonly={}", i32::from(readonly));
            let act = "Preconnect";
            sink.log(&Entry {
                conn: None,
                kind: Kind::Enter,
                act,
                id,
                args: &args,
            });
            // The layers below are asked by the server after this returns.
            sink.log(&Entry {
                conn: None,
                kind: Kind::Leave,
                act,
                id,
                args: "return=0",
            });
        }
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
            ids: AtomicU64::new(0),
        })
    }
}

/// One connection's log state.
pub struct LogHandle {
    sink: Arc<Sink>,
    export: String,
    tls: bool,
    /// Numbered when first logged.
    conn: OnceLock<u64>,
    ids: AtomicU64,
}

/// Render a capability answer as nbdkit does, `-1` when it failed.
fn cap<T>(r: Result<T>, f: impl FnOnce(T) -> i32) -> i32 {
    r.map(f).unwrap_or(-1)
}

/// `zero=` as nbdkit writes it: 2 when the layer below zeroes natively,
/// 1 when the server will emulate it with writes, 0 when it cannot write.
fn zero(next: &Next) -> i32 {
    match (next.can_zero(), next.can_write()) {
        (Ok(true), _) => 2,
        (Ok(false), Ok(true)) => 1,
        (Ok(false), Ok(false)) => 0,
        (Err(_), _) | (_, Err(_)) => -1,
    }
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

    /// Log the `Connect` line, as nbdkit's log filter does when the
    /// handle is prepared: the layer below is complete by then and can be
    /// asked everything the line shows.
    fn connect(&self, next: &Next, size: u64) {
        let conn = self.conn();
        let bs = next.block_size().ok().flatten();
        let (min, pref, max) = bs.map_or((0, 0, 0), |b| (b.minimum, b.preferred, b.maximum));
        let b = |r: Result<bool>| cap(r, i32::from);
        let mut s = String::from("export=");
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
            zero(next),
            cap(next.can_fua(), support),
            b(next.can_extents()),
            cap(next.can_cache(), support),
            b(next.can_fast_zero()),
        );
        self.sink.print(Some(conn), "Connect", &s);
    }

    /// Log the start of a request and return its id.
    fn enter(&self, act: &str, args: &str) -> u64 {
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        self.sink.log(&Entry {
            conn: Some(self.conn()),
            kind: Kind::Enter,
            act,
            id: Some(id),
            args,
        });
        id
    }

    /// Log how a request ended.
    fn leave(&self, act: &str, id: u64, args: &str) {
        self.sink.log(&Entry {
            conn: Some(self.conn()),
            kind: Kind::Leave,
            act,
            id: Some(id),
            args,
        });
    }

    /// What logs the end of request `id` once the layer below answers it
    /// asynchronously, for the request's `then`: it runs on a worker
    /// thread and passes the answer on unchanged.
    fn ending(
        &self,
        act: &'static str,
        id: u64,
    ) -> impl FnOnce(Result<()>) -> Result<()> + Send + 'static {
        let (sink, conn) = (self.sink.clone(), self.conn());
        move |r| {
            sink.log(&Entry {
                conn: Some(conn),
                kind: Kind::Leave,
                act,
                id: Some(id),
                args: &outcome(&r),
            });
            r
        }
    }

    /// Log a request around `f`.
    fn logged<T>(&self, act: &str, args: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let id = self.enter(act, args);
        let r = f();
        self.leave(act, id, &outcome(&r));
        r
    }

    /// Log an asynchronous request as it starts and pass it down with
    /// `start`; its end is logged by a continuation when the layer below
    /// answers. When no continuation can be made the request has been
    /// answered with the error, and no end is logged.
    fn logged_async<R: InFlight>(
        &self,
        next: &Next,
        act: &'static str,
        args: &str,
        req: R,
        start: fn(&Next, R),
    ) {
        let id = self.enter(act, args);
        if let Some(req) = req.then(self.ending(act, id)) {
            start(next, req)
        }
    }
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        // A handle whose prepare failed was never announced, nor closed.
        if let Some(&c) = self.conn.get() {
            let n = self.ids.load(Ordering::Relaxed);
            self.sink
                .print(Some(c), "Disconnect", &format!("transactions={n}"));
        }
    }
}

fn bit(flags: Flags, f: Flags) -> i32 {
    i32::from(flags.contains(f))
}

// What each kind of request logs, the same on both paths.

/// A read or cache request's arguments.
fn range_args(offset: u64, count: u64) -> String {
    format!("offset={offset:#x} count={count:#x}")
}

/// A write's or trim's arguments.
fn fua_args(offset: u64, count: u64, flags: Flags) -> String {
    format!(
        "offset={offset:#x} count={count:#x} fua={}",
        bit(flags, Flags::FUA)
    )
}

/// A zero request's arguments.
fn zero_args(offset: u64, count: u64, flags: Flags) -> String {
    format!(
        "offset={offset:#x} count={count:#x} trim={} fua={} fast={}",
        bit(flags, Flags::MAY_TRIM),
        bit(flags, Flags::FUA),
        bit(flags, Flags::FAST_ZERO)
    )
}

#[callbacks]
impl FilterHandle for LogHandle {
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        self.connect(next, next.get_size()?);
        Ok(())
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let args = range_args(offset, buf.len() as u64);
        self.logged("Read", &args, || next.pread(buf, offset, flags))
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let args = fua_args(offset, buf.len() as u64, flags);
        self.logged("Write", &args, || next.pwrite(buf, offset, flags))
    }

    fn flush(&self, next: &Next, flags: Flags) -> Result<()> {
        self.logged("Flush", "", || next.flush(flags))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let args = fua_args(offset, count, flags);
        self.logged("Trim", &args, || next.trim(count, offset, flags))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let args = zero_args(offset, count, flags);
        self.logged("Zero", &args, || next.zero(count, offset, flags))
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let args = range_args(offset, count);
        self.logged("Cache", &args, || next.cache(count, offset, flags))
    }

    // On an asynchronous chain a request is logged as it starts and goes
    // down as it is; its end is logged when the layer below answers.
    // (Block status, whose answer is logged in full, waits on a worker
    // thread.)

    fn async_pread(&self, next: &Next, req: ReadRequest) {
        let args = range_args(req.offset(), req.len() as u64);
        self.logged_async(next, "Read", &args, req, Next::async_pread)
    }

    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        let args = fua_args(req.offset(), req.len() as u64, req.flags());
        self.logged_async(next, "Write", &args, req, Next::async_pwrite)
    }

    fn async_flush(&self, next: &Next, req: RangeRequest) {
        self.logged_async(next, "Flush", "", req, Next::async_flush)
    }

    fn async_trim(&self, next: &Next, req: RangeRequest) {
        let args = fua_args(req.offset(), req.count(), req.flags());
        self.logged_async(next, "Trim", &args, req, Next::async_trim)
    }

    fn async_zero(&self, next: &Next, req: RangeRequest) {
        let args = zero_args(req.offset(), req.count(), req.flags());
        self.logged_async(next, "Zero", &args, req, Next::async_zero)
    }

    fn async_cache(&self, next: &Next, req: RangeRequest) {
        let args = range_args(req.offset(), req.count());
        self.logged_async(next, "Cache", &args, req, Next::async_cache)
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
            &format!(
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
                let mut s = String::from("extents=(");
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
                self.leave("Extents", id, &s);
            }
            Err(_) => self.leave("Extents", id, &outcome(&r)),
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
