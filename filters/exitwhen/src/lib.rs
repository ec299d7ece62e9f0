//! The exitwhen filter: shut the server down gracefully when something
//! happens outside it (a file created or deleted, a pipe closed, a
//! process gone, a script's say-so). Once it has, new clients are
//! refused and the server exits when the last one has gone.

// The only unsafe code is the `poll` of a descriptor given by number.
#![deny(unsafe_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use host::LogLevel;
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, Filter, FilterHandle, NextOpener, Result,
};
use nix::unistd::{access, AccessFlags};

/// The exit status by which an `exit-when-script` says the event came.
const SCRIPT_EVENT: i32 = 88;

/// Something to watch for.
#[derive(Debug)]
enum Event {
    FileCreated(PathBuf),
    FileDeleted(PathBuf),
    /// The read end of a pipe, by number, inherited from whoever started
    /// the server.
    PipeClosed(i32),
    /// `/proc/PID/stat` of the process, opened at configuration, so that
    /// a new process given the same number later is not mistaken for it.
    ProcessExits(File),
    Script(String),
}

/// Whether the pipe's other end has gone. Readiness alone, no data.
#[allow(unsafe_code)]
fn pipe_closed(fd: i32) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the call; polling a descriptor
    // neither reads nor closes it, and a closed one is reported as
    // POLLNVAL rather than touched.
    match unsafe { libc::poll(&mut p, 1, 0) } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(false),
        _ if p.revents & libc::POLLNVAL != 0 => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
        _ => Ok(p.revents & libc::POLLHUP != 0),
    }
}

impl Event {
    /// Whether the event has happened. Errors are logged and count as
    /// not yet, except a pipe descriptor that is not open, which nbdkit
    /// takes as the event so that a wrong number fails early.
    fn happened(&self) -> bool {
        let error = |msg: String| host::log(LogLevel::Error, &msg);
        match self {
            Event::FileCreated(p) => {
                let yes = access(p, AccessFlags::R_OK).is_ok();
                if yes {
                    host::debug(&format!(
                        "exit-when-file-created: detected {} created",
                        p.display()
                    ));
                }
                yes
            }
            Event::FileDeleted(p) => match access(p, AccessFlags::R_OK) {
                Ok(()) => false,
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {
                    host::debug(&format!(
                        "exit-when-file-deleted: detected {} deleted",
                        p.display()
                    ));
                    true
                }
                Err(e) => {
                    error(format!(
                        "exit-when-file-deleted: access: {}: {e}",
                        p.display()
                    ));
                    false
                }
            },
            Event::PipeClosed(fd) => match pipe_closed(*fd) {
                Ok(closed) => {
                    if closed {
                        host::debug("exit-when-pipe-closed: detected pipe closed");
                    }
                    closed
                }
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
                    error(format!(
                        "exit-when-pipe-closed: invalid file descriptor {fd}"
                    ));
                    true
                }
                Err(e) => {
                    error(format!("exit-when-pipe-closed: poll: {e}"));
                    false
                }
            },
            Event::ProcessExits(stat) => {
                let mut byte = [0u8; 1];
                // The open file reads while the process exists and fails
                // with ESRCH once it has gone.
                match (&*stat)
                    .seek(SeekFrom::Start(0))
                    .and_then(|_| (&*stat).read(&mut byte))
                {
                    Ok(_) => false,
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        host::debug("exit-when-process-exits: detected process exit");
                        true
                    }
                    Err(e) => {
                        error(format!("exit-when-process-exits: read: {e}"));
                        false
                    }
                }
            }
            Event::Script(script) => {
                match std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(script)
                    .status()
                {
                    Err(e) => {
                        error(format!("exit-when-script: {e}"));
                        false
                    }
                    Ok(st) if st.code() == Some(0) => false,
                    Ok(st) if st.code() == Some(SCRIPT_EVENT) => {
                        host::debug("exit-when-script: detected scripted event");
                        true
                    }
                    Ok(st) => {
                        match (st.code(), st.signal()) {
                            (Some(c), _) => error(format!(
                                "exit-when-script: script exited with error status {c}"
                            )),
                            (None, Some(s)) => {
                                error(format!("exit-when-script: script was killed by signal {s}"))
                            }
                            (None, None) => {
                                error(format!("exit-when-script: script failed ({st})"))
                            }
                        }
                        false
                    }
                }
            }
        }
    }
}

/// What the polling thread and the connections share.
#[derive(Default)]
struct State {
    connections: usize,
    exiting: bool,
}

/// The events, and whether one has happened yet.
#[derive(Default)]
struct Watch {
    events: Vec<Event>,
    state: Mutex<State>,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Check the events unless one has already happened; whether one has.
    fn check(&self, state: &mut State) -> bool {
        if !state.exiting {
            // Every event is checked, as nbdkit does, so each is logged.
            for e in &self.events {
                state.exiting |= e.happened();
            }
        }
        state.exiting
    }
}

/// The configured events, the poll interval and the polling thread.
pub struct ExitWhen {
    watch: Arc<Watch>,
    poll: Duration,
    poller: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

impl Default for ExitWhen {
    fn default() -> Self {
        ExitWhen {
            watch: Arc::default(),
            poll: Duration::from_secs(60),
            poller: Mutex::new(None),
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::new(libc::EINVAL, msg)
}

fn absolute(value: &str) -> Result<PathBuf> {
    std::path::absolute(value).map_err(|e| invalid(format!("{value}: {e}")))
}

#[callbacks]
impl Filter for ExitWhen {
    const NAME: &'static str = "exitwhen";
    const DESCRIPTION: &'static str = "shut the server down gracefully when an event occurs";
    const CONFIG_HELP: &'static str =
        "exit-when-file-created=FILENAME  Exit when the file is created.
exit-when-file-deleted=FILENAME  Exit when the file is deleted.
exit-when-pipe-closed=FD         Exit when the pipe is closed.
exit-when-process-exits=PID      Exit when the process exits.
exit-when-script=SCRIPT          Exit when the script exits with status 88.
exit-when-poll=SECS              Seconds between checks when idle (default 60).";
    type Handle = Connection;

    /// Only a script takes long enough to count as waiting.
    fn nonblocking(&self) -> bool {
        !self
            .watch
            .events
            .iter()
            .any(|e| matches!(e, Event::Script(_)))
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        let event = match key {
            "exit-when-file-created" => Event::FileCreated(absolute(value)?),
            "exit-when-file-deleted" => Event::FileDeleted(absolute(value)?),
            "exit-when-pipe-closed" | "exit-when-fd-closed" => {
                Event::PipeClosed(value.parse().map_err(|_| {
                    invalid(format!(
                        "exit-when-pipe-closed: could not parse number: {value}"
                    ))
                })?)
            }
            "exit-when-process-exits" | "exit-when-pid-exits" => {
                let pid: u64 = value.parse().map_err(|_| {
                    invalid(format!(
                        "exit-when-process-exits: could not parse number: {value}"
                    ))
                })?;
                let stat = format!("/proc/{pid}/stat");
                let file = File::open(&stat).map_err(|e| {
                    Error::new(
                        e.raw_os_error().unwrap_or(libc::EIO),
                        format!("exit-when-process-exits: {stat}: {e}"),
                    )
                })?;
                Event::ProcessExits(file)
            }
            "exit-when-script" => Event::Script(value.to_owned()),
            "exit-when-poll" => {
                let secs: u32 = value.parse().map_err(|_| {
                    invalid(format!("exit-when-poll: could not parse number: {value}"))
                })?;
                self.poll = Duration::from_secs(secs.into());
                return Ok(true);
            }
            _ => return Ok(false),
        };
        Arc::get_mut(&mut self.watch)
            .expect("configured before any thread shares it")
            .events
            .push(event);
        Ok(true)
    }

    fn get_ready(&self) -> Result<()> {
        if self.watch.check(&mut self.watch.lock()) {
            // As nbdkit: the event came before serving began.
            host::log(
                LogLevel::Info,
                "exitwhen: the event has already happened: exiting",
            );
            std::process::exit(0);
        }
        Ok(())
    }

    fn after_fork(&self) -> Result<()> {
        let (stop, stopped) = mpsc::channel::<()>();
        let watch = self.watch.clone();
        let every = self.poll;
        let thread = std::thread::Builder::new()
            .name("exitwhen".into())
            .spawn(move || loop {
                {
                    let mut state = watch.lock();
                    if state.connections == 0 && watch.check(&mut state) {
                        host::debug("exitwhen: shutdown from polling thread");
                        host::shutdown();
                        return;
                    }
                }
                match stopped.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })
            .map_err(|e| {
                Error::new(
                    libc::EAGAIN,
                    format!("exitwhen: cannot start its thread: {e}"),
                )
            })?;
        *self.poller.lock().unwrap_or_else(|e| e.into_inner()) = Some((stop, thread));
        Ok(())
    }

    fn preconnect(&self, _readonly: bool) -> Result<()> {
        if self.watch.check(&mut self.watch.lock()) {
            return Err(Error::new(
                libc::ESHUTDOWN,
                "exitwhen: nbdhost is exiting: rejecting new connection",
            ));
        }
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Connection> {
        next.open(readonly, export_name)?;
        // The look a filter above takes at start-up (Filter::startup) is
        // made for no client, and is not one.
        let client = host::connection_id().is_some();
        if client {
            self.watch.lock().connections += 1;
        }
        Ok(Connection {
            watch: client.then(|| self.watch.clone()),
        })
    }

    fn unload(&mut self) {
        let poller = self
            .poller
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, thread)) = poller {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// One open connection, counted until it closes (`None`: not a client's).
pub struct Connection {
    watch: Option<Arc<Watch>>,
}

#[callbacks]
impl FilterHandle for Connection {}

impl Drop for Connection {
    fn drop(&mut self) {
        let Some(watch) = &self.watch else {
            return;
        };
        let mut state = watch.lock();
        watch.check(&mut state);
        state.connections -= 1;
        if state.connections == 0 && state.exiting {
            host::debug("exitwhen: exiting on last client connection");
            host::shutdown();
        }
    }
}

nbdhost_filter!(ExitWhen);
