//! The error filter: make a chosen share of requests fail with a chosen
//! errno, per command, optionally only while a trigger file exists, so
//! that clients' error handling can be tested (nbdkit's error filter).

#![forbid(unsafe_code)]

use std::cell::Cell;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, ExtentList, ExtentsRequest, Filter, FilterHandle,
    Flags, InFlight, Next, NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// The commands errors can be injected into, as named in parameters.
#[derive(Clone, Copy)]
enum Cmd {
    Pread,
    Pwrite,
    Trim,
    Zero,
    Extents,
    Cache,
    Flush,
}

const CMDS: [(&str, Cmd); 7] = [
    ("pread", Cmd::Pread),
    ("pwrite", Cmd::Pwrite),
    ("trim", Cmd::Trim),
    ("zero", Cmd::Zero),
    ("extents", Cmd::Extents),
    ("cache", Cmd::Cache),
    ("flush", Cmd::Flush),
];

/// Errors a client can be sent (the NBD protocol has few codes).
const ERRNOS: [(&str, i32); 6] = [
    ("EPERM", libc::EPERM),
    ("EIO", libc::EIO),
    ("ENOMEM", libc::ENOMEM),
    ("EINVAL", libc::EINVAL),
    ("ENOSPC", libc::ENOSPC),
    ("ESHUTDOWN", libc::ESHUTDOWN),
];

/// Settings as given, for all commands or for one.
#[derive(Default, Clone)]
struct Given {
    errno: Option<i32>,
    rate: Option<f64>,
    file: Option<PathBuf>,
}

/// What to do for one command.
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    errno: i32,
    rate: f64,
    file: Option<PathBuf>,
}

/// The configured filter.
#[derive(Default)]
pub struct ErrorFilter {
    all: Given,
    per: [Given; 7],
    settings: OnceLock<Arc<[Setting; 7]>>,
}

fn invalid(msg: String) -> Error {
    Error::new(libc::EINVAL, msg)
}

fn parse_errno(key: &str, v: &str) -> Result<i32> {
    ERRNOS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(v))
        .map(|&(_, e)| e)
        .ok_or_else(|| {
            invalid(format!(
                "{key}: unknown error '{v}' (use EPERM, EIO, ENOMEM, EINVAL, ENOSPC or ESHUTDOWN)"
            ))
        })
}

/// `10%` or a probability `0.1`.
fn parse_rate(key: &str, v: &str) -> Result<f64> {
    let bad = || {
        invalid(format!(
            "{key}: '{v}' is not a percentage or a probability 0..1"
        ))
    };
    let r = match v.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
        None => v.trim().parse::<f64>().map_err(|_| bad())?,
    };
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(bad())
    }
}

fn errno_name(e: i32) -> &'static str {
    ERRNOS
        .iter()
        .find(|&&(_, n)| n == e)
        .map_or("EIO", |&(n, _)| n)
}

/// A uniform number in `[0, 1)` from a per-thread xorshift64* generator:
/// cheap, lock-free, and good enough to pick which requests fail.
fn random_unit() -> f64 {
    // Seeded from a random hash key and a counter rather than from the
    // thread's identity: `std::thread::current()` would register a
    // thread-exit destructor inside this library, which the server may
    // unload before its worker threads exit.
    static THREADS: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new()
                .hash_one(THREADS.fetch_add(1, Ordering::Relaxed))
                | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
}

impl ErrorFilter {
    fn resolve(&self) -> [Setting; 7] {
        // A command's own parameter wins over the general one, whatever
        // their order on the command line.
        self.per.clone().map(|g| Setting {
            errno: g.errno.or(self.all.errno).unwrap_or(libc::EIO),
            rate: g.rate.or(self.all.rate).unwrap_or(0.0),
            file: g.file.or_else(|| self.all.file.clone()),
        })
    }
}

#[callbacks]
impl Filter for ErrorFilter {
    const NAME: &'static str = "error";
    const DESCRIPTION: &'static str = "inject errors into requests, for testing clients";
    const CONFIG_HELP: &'static str = "error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN
                           The error to inject (default EIO).
error-rate=10%|0.1         Share of requests that fail (default 0).
error-file=<FILE>          Inject only while FILE exists.
error-<CMD>=, error-<CMD>-rate=, error-<CMD>-file=
                           The same for one command: pread, pwrite, trim,
                           zero, extents, cache or flush.";
    type Handle = ErrorHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        let Some(rest) = key.strip_prefix("error") else {
            return Ok(false);
        };
        // `error`, `error-rate`, `error-file`, or the same after `-CMD`.
        let (given, what) = match rest.strip_prefix('-') {
            None if rest.is_empty() => (&mut self.all, ""),
            None => return Ok(false),
            Some(tail) => {
                let (cmd, what) = tail.split_once('-').unwrap_or((tail, ""));
                match CMDS.iter().find(|(n, _)| *n == cmd) {
                    Some(&(_, c)) => (&mut self.per[c as usize], what),
                    None => (&mut self.all, tail),
                }
            }
        };
        match what {
            "" => given.errno = Some(parse_errno(key, value)?),
            "rate" => given.rate = Some(parse_rate(key, value)?),
            "file" => {
                let p = std::path::absolute(value)
                    .map_err(|e| invalid(format!("{key}: {value}: {e}")))?;
                given.file = Some(p);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        let s = self.resolve();
        if s.iter().all(|s| s.rate == 0.0) {
            host::debug("error: no error-rate set, no errors will be injected");
        }
        let _ = self.settings.set(Arc::new(s));
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<ErrorHandle> {
        next.open(readonly, export_name)?;
        let settings = self
            .settings
            .get()
            .cloned()
            .unwrap_or_else(|| Arc::new(self.resolve()));
        Ok(ErrorHandle { settings })
    }
}

/// One connection: a reference to the settings.
pub struct ErrorHandle {
    settings: Arc<[Setting; 7]>,
}

impl ErrorHandle {
    /// Fail this request or let it through.
    fn check(&self, cmd: Cmd) -> Result<()> {
        let s = &self.settings[cmd as usize];
        if s.rate <= 0.0 {
            return Ok(());
        }
        // Checked on every request so the file can switch injection on
        // and off while clients are connected.
        if s.file.as_ref().is_some_and(|f| !f.exists()) {
            return Ok(());
        }
        if s.rate < 1.0 && random_unit() >= s.rate {
            return Ok(());
        }
        let name = CMDS[cmd as usize].0;
        Err(Error::new(
            s.errno,
            format!("injecting {} error into {name}", errno_name(s.errno)),
        ))
    }

    /// Fail `req` here, or pass it down with `start`: on an asynchronous
    /// chain the filter holds nothing up.
    fn pass<R: InFlight>(&self, cmd: Cmd, next: &Next, req: R, start: fn(&Next, R)) {
        match self.check(cmd) {
            Ok(()) => start(next, req),
            Err(e) => req.complete(Err(e)),
        }
    }
}

#[callbacks]
impl FilterHandle for ErrorHandle {
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.check(Cmd::Pread)?;
        next.pread(buf, offset, flags)
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.check(Cmd::Pwrite)?;
        next.pwrite(buf, offset, flags)
    }
    fn flush(&self, next: &Next, flags: Flags) -> Result<()> {
        self.check(Cmd::Flush)?;
        next.flush(flags)
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check(Cmd::Trim)?;
        next.trim(count, offset, flags)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check(Cmd::Zero)?;
        next.zero(count, offset, flags)
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check(Cmd::Cache)?;
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
        self.check(Cmd::Extents)?;
        next.extents_into(count, offset, flags, list)
    }

    fn async_pread(&self, next: &Next, req: ReadRequest) {
        self.pass(Cmd::Pread, next, req, Next::async_pread)
    }
    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        self.pass(Cmd::Pwrite, next, req, Next::async_pwrite)
    }
    fn async_flush(&self, next: &Next, req: RangeRequest) {
        self.pass(Cmd::Flush, next, req, Next::async_flush)
    }
    fn async_trim(&self, next: &Next, req: RangeRequest) {
        self.pass(Cmd::Trim, next, req, Next::async_trim)
    }
    fn async_zero(&self, next: &Next, req: RangeRequest) {
        self.pass(Cmd::Zero, next, req, Next::async_zero)
    }
    fn async_cache(&self, next: &Next, req: RangeRequest) {
        self.pass(Cmd::Cache, next, req, Next::async_cache)
    }
    fn async_extents(&self, next: &Next, req: ExtentsRequest) {
        self.pass(Cmd::Extents, next, req, Next::async_extents)
    }
}

nbdhost_filter!(ErrorFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn configured(params: &[(&str, &str)]) -> ErrorFilter {
        let mut f = ErrorFilter::default();
        for (k, v) in params {
            assert!(f.config(k, v).unwrap(), "{k} not taken");
        }
        f
    }

    #[test]
    fn command_settings_override_general_ones() {
        let f = configured(&[
            ("error-pread-rate", "0"),
            ("error-rate", "50%"),
            ("error", "ENOSPC"),
            ("error-pwrite", "EPERM"),
            ("error-zero-file", "/x"),
        ]);
        let s = f.resolve();
        assert_eq!(s[Cmd::Pread as usize].rate, 0.0);
        assert_eq!(s[Cmd::Trim as usize].rate, 0.5);
        assert_eq!(s[Cmd::Trim as usize].errno, libc::ENOSPC);
        assert_eq!(s[Cmd::Pwrite as usize].errno, libc::EPERM);
        assert_eq!(s[Cmd::Zero as usize].file, Some(PathBuf::from("/x")));
        assert_eq!(s[Cmd::Flush as usize].file, None);
    }

    #[test]
    fn rates_and_names_are_checked() {
        assert_eq!(parse_rate("k", "1").unwrap(), 1.0);
        assert_eq!(parse_rate("k", "25%").unwrap(), 0.25);
        assert!(parse_rate("k", "101%").is_err());
        assert!(parse_rate("k", "2").is_err());
        assert!(parse_errno("k", "EBADF").is_err());
        assert!(!ErrorFilter::default().config("errors", "1").unwrap());
        assert!(!ErrorFilter::default()
            .config("error-pread-size", "1")
            .unwrap());
    }

    #[test]
    fn rate_is_roughly_honoured() {
        let h = ErrorHandle {
            settings: Arc::new(configured(&[("error-rate", "0.3")]).resolve()),
        };
        let failed = (0..10_000).filter(|_| h.check(Cmd::Pread).is_err()).count();
        assert!((2_500..3_500).contains(&failed), "{failed}");
    }
}
