//! The pause filter: requests are held while a Unix control socket says
//! so (nbdkit's pause filter). On the socket, `p` pauses and is answered
//! `P` once every request already started has been answered; `r` resumes
//! and is answered `R`; white space is ignored, anything else answered
//! `X`.
//!
//! A held request waits in a queue, not on a thread: it was admitted
//! through a continuation ([`Completion::then`]) that the resume
//! completes, so it then starts on a worker thread, as a callback of its
//! own connection.

#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Completion, Error, ExtentsRequest, Filter, FilterHandle,
    InFlight, Next, NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// How often the control thread looks at whether the server is shutting
/// down or the filter unloading, while it waits.
const TICK: Duration = Duration::from_millis(100);

/// Whether requests may go down, and those waiting until they may.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    idle: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    /// Requests passed down and not yet answered.
    running: usize,
    /// Requests held, in the order they came: completing one starts it.
    held: Vec<Completion>,
    /// The filter is unloading: the control thread ends.
    stopping: bool,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Let a request through now, or hold it until the resume. `start`
    /// runs once, here or on a worker thread then.
    fn admit<R: InFlight>(
        self: &Arc<Self>,
        next: &Next,
        req: R,
        start: impl FnOnce(&Next, R) + Send + 'static,
    ) {
        let mut s = self.lock();
        if !s.paused {
            s.running += 1;
            drop(s);
            return start(next, req);
        }
        let parked = next.park(req);
        match Completion::then(move |_| parked.resume(start)) {
            Ok(c) => s.held.push(c),
            // No continuation could be made: dropping it dropped the
            // request, answered with an error through its counting
            // continuation, which takes one off `running`.
            Err(_) => s.running += 1,
        }
    }

    /// A request passed down has been answered.
    fn finished(&self) {
        let mut s = self.lock();
        s.running -= 1;
        if s.running == 0 {
            self.idle.notify_all();
        }
    }

    /// `p`: hold new requests; return once those running are answered
    /// (or the server is stopping).
    fn pause(&self) {
        let mut s = self.lock();
        s.paused = true;
        while s.running > 0 && !s.stopping && host::sleep(Duration::ZERO).is_ok() {
            s = self
                .idle
                .wait_timeout(s, TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// `r`: let requests through again, the held ones first.
    fn resume(&self) {
        let held = {
            let mut s = self.lock();
            s.paused = false;
            s.running += s.held.len();
            std::mem::take(&mut s.held)
        };
        for c in held {
            c.complete(Ok(()));
        }
    }
}

/// The filter: the control socket, and the thread that serves it.
#[derive(Default)]
pub struct Pause {
    control: Option<PathBuf>,
    listener: Mutex<Option<UnixListener>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    gate: Arc<Gate>,
}

#[callbacks]
impl Filter for Pause {
    const NAME: &'static str = "pause";
    const DESCRIPTION: &'static str = "pause and resume requests through a control socket";
    const CONFIG_HELP: &'static str =
        "pause-control=<SOCKET>  Unix socket taking p (pause) and r (resume).";
    type Handle = Paused;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "pause-control" {
            return Ok(false);
        }
        self.control = Some(PathBuf::from(value));
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.control.is_none() {
            return Err(Error::new(libc::EINVAL, "pause-control socket was not set"));
        }
        Ok(())
    }

    fn get_ready(&self) -> Result<()> {
        let Some(path) = &self.control else {
            return Ok(());
        };
        // As nbdkit: whatever is at the path is replaced.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| {
            Error::new(libc::EIO, format!("{}: cannot listen: {e}", path.display()))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::new(libc::EIO, format!("pause-control: {e}")))?;
        *self.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(listener);
        Ok(())
    }

    fn after_fork(&self) -> Result<()> {
        let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let gate = self.gate.clone();
        let thread = std::thread::Builder::new()
            .name("pause-control".into())
            .spawn(move || control(&listener, &gate))
            .map_err(|e| Error::new(libc::EAGAIN, format!("pause-control: {e}")))?;
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Paused> {
        next.open(readonly, export_name)?;
        Ok(Paused {
            gate: self.gate.clone(),
        })
    }

    fn unload(&mut self) {
        self.gate.lock().stopping = true;
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        if let Some(path) = &self.control {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serve the control socket, one client at a time, until the filter
/// unloads or the server shuts down; then let every held request go, so
/// that none keeps the server from exiting.
fn control(listener: &UnixListener, gate: &Gate) {
    loop {
        if gate.lock().stopping {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => serve(stream, gate),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if host::sleep(TICK).is_err() {
                    break;
                }
            }
            Err(e) => {
                host::debug(&format!("pause-control: accept: {e}"));
                if host::sleep(TICK).is_err() {
                    break;
                }
            }
        }
    }
    gate.resume();
}

/// One control client: answer each command until it hangs up.
fn serve(mut stream: UnixStream, gate: &Gate) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(TICK)).is_err() {
        return;
    }
    let mut buf = [0u8; 64];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if gate.lock().stopping || host::sleep(Duration::ZERO).is_err() {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        for &c in &buf[..n] {
            let answer = match c {
                b'p' => {
                    gate.pause();
                    b'P'
                }
                b'r' => {
                    gate.resume();
                    b'R'
                }
                c if c.is_ascii_whitespace() => continue,
                _ => b'X',
            };
            if stream.write_all(&[answer]).is_err() {
                return;
            }
        }
    }
}

/// One connection: its requests go through the filter's gate.
pub struct Paused {
    gate: Arc<Gate>,
}

impl Paused {
    /// A continuation that tells the gate when the request is answered.
    fn counted(&self) -> impl FnOnce(Result<()>) -> Result<()> + Send + 'static {
        let gate = self.gate.clone();
        move |r| {
            gate.finished();
            r
        }
    }
}

#[callbacks]
impl FilterHandle for Paused {
    fn async_pread(&self, next: &Next, req: ReadRequest) {
        let Some(req) = req.then(self.counted()) else {
            return;
        };
        self.gate.admit(next, req, |n, r| n.async_pread(r))
    }
    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        let Some(req) = req.then(self.counted()) else {
            return;
        };
        self.gate.admit(next, req, |n, r| n.async_pwrite(r))
    }
    fn async_flush(&self, next: &Next, req: RangeRequest) {
        let Some(req) = req.then(self.counted()) else {
            return;
        };
        self.gate.admit(next, req, |n, r| n.async_flush(r))
    }
    fn async_trim(&self, next: &Next, req: RangeRequest) {
        let Some(req) = req.then(self.counted()) else {
            return;
        };
        self.gate.admit(next, req, |n, r| n.async_trim(r))
    }
    fn async_zero(&self, next: &Next, req: RangeRequest) {
        let Some(req) = req.then(self.counted()) else {
            return;
        };
        self.gate.admit(next, req, |n, r| n.async_zero(r))
    }
    fn async_cache(&self, next: &Next, req: RangeRequest) {
        let Some(req) = req.then(self.counted()) else {
            return;
        };
        self.gate.admit(next, req, |n, r| n.async_cache(r))
    }
    fn async_extents(&self, next: &Next, req: ExtentsRequest) {
        let Some(req) = req.then(self.counted()) else {
            return;
        };
        self.gate.admit(next, req, |n, r| n.async_extents(r))
    }
}

nbdhost_filter!(Pause);
