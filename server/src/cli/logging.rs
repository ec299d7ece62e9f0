//! Where log messages go: standard error, syslog, a file, or nowhere
//! (`--log`).
//! Levels follow `-v` and `RUST_LOG` as parsed by env_filter.
//!
//! A server that has gone to the background logs to syslog by default, as
//! nbdkit does: its standard error belongs to whoever started it, who may
//! be waiting for that pipe to close.

use std::ffi::CString;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;

/// A log destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Stderr = 0,
    Syslog = 1,
    Null = 2,
    /// The file `--log` named, opened by [`Destination::parse`].
    File = 3,
}

/// The log file of `--log=FILE`.
static FILE: std::sync::OnceLock<std::sync::Mutex<std::fs::File>> = std::sync::OnceLock::new();

/// A `--log` value that cannot be logged to.
#[derive(Debug)]
pub enum LogError {
    /// The file could not be opened for appending.
    Open {
        path: String,
        source: std::io::Error,
    },
    /// Not a destination nbdhost knows.
    Unknown(String),
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::Open { path, source } => write!(f, "--log={path}: {source}"),
            LogError::Unknown(s) => write!(
                f,
                "--log={s}: expected stderr, syslog, null, default or an absolute path"
            ),
        }
    }
}

impl std::error::Error for LogError {}

impl Destination {
    /// Parse a `--log` value: `stderr`, `syslog`, `null`, or an absolute
    /// path of a file to append to (opened now); `None` for `default`.
    pub fn parse(s: &str) -> Result<Option<Destination>, LogError> {
        match s {
            "default" => Ok(None),
            "stderr" => Ok(Some(Destination::Stderr)),
            "syslog" => Ok(Some(Destination::Syslog)),
            "null" => Ok(Some(Destination::Null)),
            path if path.starts_with('/') => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| LogError::Open {
                        path: path.to_string(),
                        source: e,
                    })?;
                let _ = FILE.set(std::sync::Mutex::new(f));
                Ok(Some(Destination::File))
            }
            _ => Err(LogError::Unknown(s.to_string())),
        }
    }
}

struct Logger {
    filter: env_filter::Filter,
    dest: AtomicU8,
}

static LOGGER: std::sync::OnceLock<Logger> = std::sync::OnceLock::new();
static OPENLOG: Once = Once::new();

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        // nbdkit's words, which scripts written for nbdkit grep for
        // ("warning", not the log crate's "warn").
        let level = match record.level() {
            log::Level::Warn => "warning".to_owned(),
            l => l.as_str().to_lowercase(),
        };
        let dest = self.dest.load(Ordering::Relaxed);
        if dest == Destination::Null as u8 {
            return;
        }
        let text = record.args().to_string();
        let msg = escape_controls(&text);
        match dest {
            0 => {
                let _ = writeln!(std::io::stderr().lock(), "nbdhost: {level}: {msg}");
            }
            1 => syslog(record.level(), &format!("{level}: {msg}")),
            _ => {
                if let Some(f) = FILE.get() {
                    let line = format!("nbdhost[{}]: {level}: {msg}\n", std::process::id());
                    let _ = f
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .write_all(line.as_bytes());
                }
            }
        }
    }

    fn flush(&self) {}
}

/// Messages carry names clients chose (exports, TLS users): a control
/// character in one must not start a forged log line or drive a terminal,
/// so control characters are shown escaped, as `\n` or `\u{1b}`.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn syslog(level: log::Level, msg: &str) {
    OPENLOG.call_once(|| {
        // SAFETY: openlog keeps the ident pointer, so it must be 'static; a
        // C string literal is.
        unsafe { libc::openlog(c"nbdhost".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    });
    let priority = match level {
        log::Level::Error => libc::LOG_ERR,
        log::Level::Warn => libc::LOG_WARNING,
        log::Level::Info => libc::LOG_INFO,
        _ => libc::LOG_DEBUG,
    };
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: a constant "%s" format with one C-string argument.
    unsafe { libc::syslog(priority, c"%s".as_ptr(), msg.as_ptr()) };
}

/// Install the logger: debug level with `-v`, warnings otherwise, unless
/// `RUST_LOG` says more precisely.
pub fn init(verbose: bool, dest: Destination) {
    let mut b = env_filter::Builder::new();
    b.filter_level(if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    });
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse(&spec);
    }
    let filter = b.build();
    let max = filter.filter();
    let logger = LOGGER.get_or_init(|| Logger {
        filter,
        dest: AtomicU8::new(dest as u8),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
    }
}

/// Change the destination, for example once the server is in the
/// background.
pub fn set_destination(dest: Destination) {
    if let Some(l) = LOGGER.get() {
        l.dest.store(dest as u8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("disk 1 \u{e9}"), "disk 1 \u{e9}");
        assert_eq!(
            escape_controls("a\nnbdhost: error: forged\u{1b}[31m"),
            "a\\nnbdhost: error: forged\\u{1b}[31m"
        );
    }
}
