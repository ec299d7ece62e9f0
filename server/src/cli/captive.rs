//! `--run` as nbdkit runs it: the process the user started forks; it
//! starts the command, waits for it and exits with its status, while the
//! child process serves. A signal sent to the server's pid therefore
//! reaches the process that waits for the command: SIGINT, SIGTERM,
//! SIGQUIT and SIGHUP end nothing (the command runs on and its status is
//! still the exit status), and an uncaught one such as SIGUSR1 ends that
//! process at once, as it ends nbdkit's, while the command keeps its
//! server until it exits. A signal that kills the serving process (the
//! pid file's pid) makes the exit status 128 plus its number once the
//! command ends, as in nbdkit.
//!
//! The two talk over a socket pair: the server says it is ready (its
//! layers' `after_fork` passed) before the command starts, and is told
//! the command's pid, which it watches through a pidfd so that it stops
//! serving when the command exits, whether or not its parent is still
//! there to tell it.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Child;

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};

use super::run::SpawnError;
use crate::runtime::RunCommand;

/// Why `--run` could not split the process.
#[derive(Debug)]
pub struct ForkError(std::io::Error);

impl std::fmt::Display for ForkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--run: cannot start the serving process: {}", self.0)
    }
}

impl std::error::Error for ForkError {}

/// The serving process's end of the pair.
pub struct Serving(UnixStream);

/// Fork. Returns only in the child, which serves; the parent runs the
/// command that `start` starts once the child is ready, waits for it and
/// exits with its status without running destructors (what it holds is
/// the child's to clean up).
///
/// Call while the process has one thread, before signals are caught.
pub fn fork(start: impl FnOnce() -> Result<Child, SpawnError>) -> Result<Serving, ForkError> {
    let (ours, theirs) = UnixStream::pair().map_err(ForkError)?;
    // SAFETY: the process has one thread here (layers start theirs in
    // after_fork, which the child calls), so the child is a whole copy.
    match unsafe { libc::fork() } {
        -1 => Err(ForkError(std::io::Error::last_os_error())),
        0 => {
            drop(ours);
            Ok(Serving(theirs))
        }
        server => {
            drop(theirs);
            let code = run_command(server, ours, start);
            // SAFETY: leaving without destructors, which would unload
            // the layers and remove the sockets the child still serves
            // (it has exited, having cleaned up itself).
            unsafe { libc::_exit(code) }
        }
    }
}

/// The parent: start the command once the server is ready, wait for it,
/// then for the server; returns the exit status.
fn run_command(
    server: libc::pid_t,
    mut link: UnixStream,
    start: impl FnOnce() -> Result<Child, SpawnError>,
) -> i32 {
    forward_hangups(server);
    let mut ready = [0u8];
    if link.read_exact(&mut ready).is_err() {
        // The server failed before it was ready, and said why.
        return wait_server(server);
    }
    let mut command = match start() {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            drop(link);
            wait_server(server);
            return 1;
        }
    };
    let _ = link.write_all(&command.id().to_le_bytes());
    let code = match command.wait() {
        Ok(st) => st.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + st.signal().unwrap_or(0)
        }),
        Err(e) => {
            log::error!("--run: cannot wait for the command: {e}");
            1
        }
    };
    // The server saw the command exit too: it finishes what is in flight
    // and cleans up. A server that died of a signal, or failed while the
    // command succeeded, gives the exit status, as in nbdkit, so that a
    // killed server is not reported as success.
    match wait_server_status(server) {
        Ended::Killed(sig) => {
            log::error!("--run: the server was killed by signal {sig}");
            128 + sig
        }
        Ended::Exited(status) if code == 0 => status,
        Ended::Exited(_) => code,
    }
}

/// Catch the signals that would end a server: here they end nothing, as
/// in nbdkit. A SIGHUP is passed on to the server, where it reloads a
/// configuration file.
fn forward_hangups(server: libc::pid_t) {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGQUIT, SIGHUP])
    else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("run-signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if s == SIGHUP {
                    // SAFETY: kill touches no memory of ours; the server
                    // is our child, not reaped while this thread runs.
                    unsafe { libc::kill(server, SIGHUP) };
                }
            }
        });
}

/// How the server process ended.
enum Ended {
    /// It exited with this status (1 where it could not be waited for).
    Exited(i32),
    /// A signal ended it.
    Killed(i32),
}

/// Wait for the server process; how it ended.
fn wait_server_status(server: libc::pid_t) -> Ended {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only to `status`, ours.
        let r = unsafe { libc::waitpid(server, &mut status, 0) };
        if r == server {
            break;
        }
        if r == -1 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Ended::Exited(1);
        }
    }
    if libc::WIFEXITED(status) {
        Ended::Exited(libc::WEXITSTATUS(status))
    } else {
        Ended::Killed(libc::WTERMSIG(status))
    }
}

/// Wait for the server process; its exit status (128 plus the signal's
/// number where a signal ended it).
fn wait_server(server: libc::pid_t) -> i32 {
    match wait_server_status(server) {
        Ended::Exited(status) => status,
        Ended::Killed(sig) => 128 + sig,
    }
}

impl Serving {
    /// Tell the parent the server is ready and learn the command's pid;
    /// returns what waits for the command's exit, or `None` when the
    /// parent could not start it (and has said why).
    pub fn ready(mut self) -> Option<RunCommand> {
        let mut pid = [0u8; 4];
        self.0.write_all(&[1]).ok()?;
        self.0.read_exact(&mut pid).ok()?;
        let pid = libc::pid_t::from_le_bytes(pid);
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let watch = i32::try_from(fd).ok().filter(|&fd| fd >= 0).map(|fd| {
            // SAFETY: a descriptor just returned to us, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        Some(Box::new(move || {
            // No pidfd: the command has exited and been reaped already.
            if let Some(fd) = watch {
                wait_readable(&fd);
            }
            0
        }))
    }
}

/// Block until `fd` (a pidfd) is readable: its process has exited.
fn wait_readable(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we pass.
    while unsafe { libc::poll(&mut p, 1, -1) } == -1
        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    {}
}
