//! rustasync: a RAM disk whose reads, writes and zeroes complete on a
//! thread of its own, with the SDK's asynchronous requests (ABI 1.9).
//!
//! `Handle::async_pread`, `async_pwrite` and `async_zero` only start a
//! request: each sends its [`ReadRequest`], [`WriteRequest`] or
//! [`RangeRequest`] to the plugin's thread and returns. That thread does
//! the copy and answers with `complete`, which consumes the request, so
//! the buffer the server lent cannot be touched afterwards; a request
//! dropped without an answer (the thread gone) is answered with `EIO`.
//! The synchronous `pread` and `pwrite` stay: the SDK requires `pread`,
//! and both serve filters that call the layer below synchronously, and
//! servers older than ABI 1.9, which ignore the asynchronous methods.
//! See ASYNCHRONOUS REQUESTS in nbdhost-plugin(3).
//!
//! What the plugin's thread needs to know about a connection (its
//! number, its export name, a debug flag) is saved in `open`: the `host`
//! functions that answer for a connection answer only inside a callback.
//!
//! Build and run, from the top of the source tree (`-v -D
//! rustasync.trace=1` logs each request from the plugin's thread):
//!
//! ```text
//! cargo build -p nbdhost-plugin-api --example rustasync
//! nbdhost ./target/debug/examples/librustasync.so size=64M
//! ```
//!
//! Outside this tree the same file is the `src/lib.rs` of a crate with
//! `crate-type = ["cdylib"]` that depends on `nbdhost-plugin-api`.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread::JoinHandle;

use nbdhost_plugin_api::host::{self, LogLevel};
use nbdhost_plugin_api::{
    callbacks, errno, nbdhost_plugin, Error, Flags, Handle, Plugin, RangeRequest, ReadRequest,
    Result, WriteRequest,
};

/// The disk's bytes, shared by the plugin's thread and the synchronous
/// callbacks.
type Disk = Arc<RwLock<Vec<u8>>>;

/// What a connection's requests need on the plugin's thread, saved in
/// `open`.
struct Who {
    connection: u64,
    export_name: String,
    trace: bool,
}

/// One request on its way to the plugin's thread.
enum Job {
    Read(ReadRequest, Arc<Who>),
    Write(WriteRequest, Arc<Who>),
    Zero(RangeRequest, Arc<Who>),
}

#[derive(Default)]
struct RustAsync {
    size: Option<u64>,
    disk: Disk,
    /// Where requests go once the thread runs (after the fork).
    queue: OnceLock<Sender<Job>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct DiskHandle {
    disk: Disk,
    /// `None` for a handle opened before the thread started (a filter's
    /// look at the disk at start-up): its requests are answered in the
    /// call that starts them, which the ABI allows.
    queue: Option<Sender<Job>>,
    who: Arc<Who>,
}

/// `[offset, offset + len)` as a range of the disk, if it lies inside.
fn range(disk: &[u8], offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= disk.len()).then_some(start..end)
}

fn out_of_range(what: &str, len: u64, offset: u64) -> Error {
    Error::new(
        errno::EINVAL,
        format!("{what} of {len} bytes at {offset}: out of range"),
    )
}

/// Do one request and answer it: on the plugin's thread, or in the
/// starting call before that thread runs.
fn run(disk: &Disk, job: Job) {
    let (what, len, offset, who) = match &job {
        Job::Read(r, w) => ("read", r.len() as u64, r.offset(), w.clone()),
        Job::Write(r, w) => ("write", r.len() as u64, r.offset(), w.clone()),
        Job::Zero(r, w) => ("zero", r.count(), r.offset(), w.clone()),
    };
    if who.trace {
        host::log(
            LogLevel::Debug,
            &format!(
                "rustasync: connection {} (export \"{}\"): {what} of {len} bytes at {offset} on thread '{}'",
                who.connection,
                who.export_name,
                std::thread::current().name().unwrap_or("?"),
            ),
        );
    }
    // The server never sends a request past the end; were it to, the
    // request fails with this error, carried by `complete`.
    match job {
        Job::Read(mut req, _) => {
            let d = disk.read().unwrap_or_else(PoisonError::into_inner);
            let r = match range(&d, offset, len) {
                Some(at) => {
                    req.buf().copy_from_slice(&d[at]);
                    Ok(())
                }
                None => Err(out_of_range(what, len, offset)),
            };
            drop(d);
            req.complete(r);
        }
        Job::Write(req, _) => {
            let mut d = disk.write().unwrap_or_else(PoisonError::into_inner);
            let r = match range(&d, offset, len) {
                Some(at) => {
                    d[at].copy_from_slice(req.buf());
                    Ok(())
                }
                None => Err(out_of_range(what, len, offset)),
            };
            drop(d);
            req.complete(r);
        }
        Job::Zero(req, _) => {
            let mut d = disk.write().unwrap_or_else(PoisonError::into_inner);
            let r = match range(&d, offset, len) {
                Some(at) => {
                    d[at].fill(0);
                    Ok(())
                }
                None => Err(out_of_range(what, len, offset)),
            };
            drop(d);
            req.complete(r);
        }
    }
}

/// The plugin's thread: answers requests until every sender is gone.
fn serve(jobs: Receiver<Job>, disk: Disk) {
    for job in jobs {
        run(&disk, job);
    }
}

#[callbacks]
impl Plugin for RustAsync {
    const NAME: &'static str = "rustasync";
    const DESCRIPTION: &'static str = "RAM disk whose requests complete on a thread of its own";
    const CONFIG_HELP: &'static str = "size=<SIZE>  Size of the disk (default 1M).";
    const MAGIC_CONFIG_KEY: Option<&'static str> = Some("size");
    type Handle = DiskHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "size" => {
                self.size = Some(host::parse_size(value)?);
                Ok(())
            }
            _ => Err(Error::new(
                errno::EINVAL,
                format!("unknown parameter '{key}'"),
            )),
        }
    }

    fn config_complete(&mut self) -> Result<()> {
        let size = self.size.unwrap_or(1 << 20);
        let size = usize::try_from(size)
            .map_err(|_| Error::new(errno::EINVAL, format!("size {size} is too large")))?;
        self.disk = Arc::new(RwLock::new(vec![0; size]));
        Ok(())
    }

    /// Starting a request only sends it on a channel, which never waits.
    fn nonblocking(&self) -> bool {
        true
    }

    /// Threads start here, once the server has forked (if it does).
    fn after_fork(&self) -> Result<()> {
        let (tx, rx) = channel();
        let disk = self.disk.clone();
        let thread = std::thread::Builder::new()
            .name("rustasync".into())
            .spawn(move || serve(rx, disk))?;
        *self.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(thread);
        let _ = self.queue.set(tx);
        Ok(())
    }

    fn open(&self, _readonly: bool) -> Result<DiskHandle> {
        Ok(DiskHandle {
            disk: self.disk.clone(),
            queue: self.queue.get().cloned(),
            who: Arc::new(Who {
                connection: host::connection_id().unwrap_or(0),
                export_name: host::export_name().unwrap_or_default(),
                trace: host::debug_flag("trace") != 0,
            }),
        })
    }

    /// Every handle, and with it every other sender, is gone: dropping
    /// the last one ends the thread, which is joined before the server
    /// unloads the code it runs.
    fn unload(&mut self) {
        drop(self.queue.take());
        if let Some(t) = self.thread.get_mut().ok().and_then(Option::take) {
            let _ = t.join();
        }
    }
}

impl DiskHandle {
    fn start(&self, job: Job) {
        match &self.queue {
            // Should the thread be gone, the job comes back in the error
            // and is dropped, which answers its request with EIO.
            Some(q) => drop(q.send(job)),
            None => run(&self.disk, job),
        }
    }
}

#[callbacks]
impl Handle for DiskHandle {
    fn get_size(&self) -> Result<u64> {
        let d = self.disk.read().unwrap_or_else(PoisonError::into_inner);
        Ok(d.len() as u64)
    }

    // Synchronous: for filters that call down synchronously, and for
    // servers older than ABI 1.9.
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let d = self.disk.read().unwrap_or_else(PoisonError::into_inner);
        let len = buf.len() as u64;
        let at = range(&d, offset, len).ok_or_else(|| out_of_range("read", len, offset))?;
        buf.copy_from_slice(&d[at]);
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        let mut d = self.disk.write().unwrap_or_else(PoisonError::into_inner);
        let len = buf.len() as u64;
        let at = range(&d, offset, len).ok_or_else(|| out_of_range("write", len, offset))?;
        d[at].copy_from_slice(buf);
        Ok(())
    }

    // Asynchronous: how the server starts every read, write and zero.
    fn async_pread(&self, req: ReadRequest) {
        self.start(Job::Read(req, self.who.clone()));
    }

    fn async_pwrite(&self, req: WriteRequest) {
        self.start(Job::Write(req, self.who.clone()));
    }

    fn async_zero(&self, req: RangeRequest) {
        self.start(Job::Zero(req, self.who.clone()));
    }
}

nbdhost_plugin!(RustAsync);
