//! The `test` plugin: a small RAM disk whose reads can be made to panic or
//! to wait, so the tests can prove that a panicking plugin costs one
//! request an `EIO` and nothing more, and that replies may complete out of
//! order, and it can refuse clients by their TLS identity. With
//! `record=FILE` it writes a line for each open, close and the unload,
//! naming the thread and the export the call was made for, so tests can
//! check when and where handles are closed. Not installed; built only for
//! the test suite.

#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nbdhost_plugin_api::{callbacks, host, nbdhost_plugin, Error, Flags, Handle, Plugin, Result};

/// Configuration and the shared disk.
#[derive(Default)]
pub struct Test {
    size: u64,
    panic_at: Option<u64>,
    delay_at: Option<u64>,
    delay: Duration,
    open_delay: Duration,
    require_user: Option<String>,
    disk: Option<Arc<RwLock<Vec<u8>>>>,
    record: Option<Arc<Recorder>>,
}

/// Where lifecycle events are written, one line each.
struct Recorder(Mutex<std::fs::File>);

impl Recorder {
    /// Note `event` with the calling thread, the connection's export and
    /// its number.
    fn note(&self, event: &str) {
        // The kernel's name for the thread: this plugin's own copy of std
        // does not know the names the server gave its threads.
        let thread = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
        let line = format!(
            "{event} thread={} export={} connection={}\n",
            thread.trim(),
            host::export_name().as_deref().unwrap_or("-"),
            host::connection_id().map_or("-".into(), |id| id.to_string())
        );
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = f.write_all(line.as_bytes());
    }
}

#[callbacks]
impl Plugin for Test {
    const NAME: &'static str = "test";
    const DESCRIPTION: &'static str = "RAM disk that misbehaves on request (for tests)";
    const CONFIG_HELP: &'static str = "size=<SIZE>         Disk size (default 1M).
panic-at=<OFFSET>   A read covering this byte panics.
delay-at=<OFFSET>   A read covering this byte waits delay-ms first.
delay-ms=<MS>       How long (default 500).
open-delay-ms=<MS>  Each open waits this long (default 0).
require-user=<NAME> Refuse connections whose TLS identity is not NAME.
record=<FILE>       Append a line to FILE at each open, close and unload.";
    type Handle = TestHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<()> {
        let num = || -> Result<u64> { host::parse_size(value) };
        match key {
            "size" => self.size = num()?,
            "panic-at" => self.panic_at = Some(num()?),
            "delay-at" => self.delay_at = Some(num()?),
            "delay-ms" => self.delay = Duration::from_millis(num()?),
            "open-delay-ms" => self.open_delay = Duration::from_millis(num()?),
            "require-user" => self.require_user = Some(value.to_string()),
            "record" => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(value)?;
                self.record = Some(Arc::new(Recorder(Mutex::new(f))));
            }
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("unknown parameter '{key}'"),
                ))
            }
        }
        Ok(())
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.size == 0 {
            self.size = 1 << 20;
        }
        if self.delay.is_zero() {
            self.delay = Duration::from_millis(500);
        }
        self.disk = Some(Arc::new(RwLock::new(vec![0; self.size as usize])));
        Ok(())
    }

    fn unload(&mut self) {
        if let Some(r) = &self.record {
            r.note("unload");
        }
    }

    fn open(&self, _readonly: bool) -> Result<TestHandle> {
        // `-D test.open=N` makes each open say so, for the -D test.
        let flag = host::debug_flag("open");
        if flag != 0 {
            host::debug(&format!("debug flag open={flag}"));
        }
        if let Some(want) = &self.require_user {
            let who = host::peer_identity();
            if !host::is_tls() || who.as_deref() != Some(want) {
                return Err(Error::new(
                    libc::EACCES,
                    format!(
                        "refusing {} (tls: {})",
                        who.as_deref().unwrap_or("anonymous"),
                        host::is_tls()
                    ),
                ));
            }
        }
        std::thread::sleep(self.open_delay);
        if let Some(r) = &self.record {
            r.note("open");
        }
        Ok(TestHandle {
            record: self.record.clone(),
            disk: self.disk.clone().expect("configured"),
            panic_at: self.panic_at,
            delay_at: self.delay_at,
            delay: self.delay,
        })
    }
}

/// One connection.
pub struct TestHandle {
    record: Option<Arc<Recorder>>,
    disk: Arc<RwLock<Vec<u8>>>,
    panic_at: Option<u64>,
    delay_at: Option<u64>,
    delay: Duration,
}

impl Drop for TestHandle {
    fn drop(&mut self) {
        if let Some(r) = &self.record {
            r.note("close");
        }
    }
}

fn covers(at: Option<u64>, offset: u64, len: usize) -> bool {
    at.is_some_and(|a| a >= offset && a < offset + len as u64)
}

#[callbacks]
impl Handle for TestHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.disk.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(true)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        if covers(self.panic_at, offset, buf.len()) {
            panic!("asked to panic at offset {offset}");
        }
        if covers(self.delay_at, offset, buf.len()) {
            std::thread::sleep(self.delay);
        }
        let d = self.disk.read().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        let mut d = self.disk.write().unwrap_or_else(|e| e.into_inner());
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

nbdhost_plugin!(Test);
