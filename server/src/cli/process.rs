//! Process-level chores: going to the background, the pid file, and
//! following the parent's death.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a process-level chore failed: the call or the `-u`/`-g` value, and
/// the system's reason.
#[derive(Debug)]
pub enum ProcessError {
    /// fork(2) failed.
    Fork(std::io::Error),
    /// prctl(2) failed.
    Prctl(std::io::Error),
    /// `--exit-with-parent` after the parent has gone.
    ParentGone,
    /// The pid file could not be written.
    PidFile {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `-u` with a NUL byte.
    NotAUserName(String),
    /// `-u` with neither a user's name nor a number.
    NoSuchUser(String),
    /// `-g` with a NUL byte.
    NotAGroupName(String),
    /// `-g` with neither a group's name nor a number.
    NoSuchGroup(String),
    /// `-u` a number without a passwd entry, and no `-g`.
    NoGroupFor(libc::uid_t),
    /// setgroups(2) or setgid(2) failed.
    SetGroup {
        gid: libc::gid_t,
        error: std::io::Error,
    },
    /// setuid(2) failed.
    SetUser {
        uid: libc::uid_t,
        error: std::io::Error,
    },
}

impl std::fmt::Display for ProcessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessError::Fork(e) => write!(f, "fork: {e}"),
            ProcessError::Prctl(e) => write!(f, "prctl: {e}"),
            ProcessError::ParentGone => f.write_str("the parent has already exited"),
            ProcessError::PidFile { path, error } => {
                write!(f, "cannot write pid file {}: {error}", path.display())
            }
            ProcessError::NotAUserName(u) => write!(f, "-u {u}: not a user name"),
            ProcessError::NoSuchUser(u) => write!(f, "-u {u}: no such user"),
            ProcessError::NotAGroupName(g) => write!(f, "-g {g}: not a group name"),
            ProcessError::NoSuchGroup(g) => write!(f, "-g {g}: no such group"),
            ProcessError::NoGroupFor(uid) => write!(
                f,
                "-u {uid}: no passwd entry to take the group from; give -g as well"
            ),
            ProcessError::SetGroup { gid, error } => {
                write!(f, "cannot change to group {gid}: {error}")
            }
            ProcessError::SetUser { uid, error } => {
                write!(f, "cannot change to user {uid}: {error}")
            }
        }
    }
}

impl std::error::Error for ProcessError {}

/// Fork into the background once listening: the parent exits at once so
/// the next shell command can connect; the child continues.
pub fn daemonize() -> Result<(), ProcessError> {
    // SAFETY: called before the server starts any thread (its loops,
    // workers and signal thread start later, in `runtime::serve`), so the
    // child is a complete copy. Layers run threads of their own only
    // inside a call (the luks filter's key derivation joins its threads
    // before returning).
    match unsafe { libc::fork() } {
        -1 => Err(ProcessError::Fork(std::io::Error::last_os_error())),
        // SAFETY: _exit skips destructors that belong to the child now.
        0 => {
            // SAFETY: plain system calls on our own process and descriptors.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    // All three: a caller reading our output through a pipe
                    // must see it close when the parent exits.
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                    if null > 2 {
                        libc::close(null);
                    }
                }
            }
            Ok(())
        }
        // SAFETY: the parent leaves without running destructors, which
        // would remove the child's socket.
        _ => unsafe { libc::_exit(0) },
    }
}

/// Give SIGPIPE its default action back. Rust's runtime ignores it
/// before `main`, and what a plugin starts while it is configured
/// (nbdkit's data plugin runs `<(COMMAND)` through a shell) would inherit
/// that: a writer whose reader has gone would then never be stopped.
pub fn default_sigpipe() {
    set_sigpipe(libc::SIG_DFL);
}

/// Ignore SIGPIPE from now on, as nbdkit does once it starts serving: a
/// client that goes away must cost only its own connection (a write to
/// its socket fails with EPIPE instead).
pub fn ignore_sigpipe() {
    set_sigpipe(libc::SIG_IGN);
}

fn set_sigpipe(action: libc::sighandler_t) {
    // SAFETY: SIG_DFL and SIG_IGN are not handlers: nothing of ours runs
    // in signal context.
    unsafe { libc::signal(libc::SIGPIPE, action) };
}

/// Ask the kernel to send SIGTERM when the parent exits.
pub fn exit_with_parent() -> Result<(), ProcessError> {
    // SAFETY: prctl with integer arguments affects only this process.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(ProcessError::Prctl(std::io::Error::last_os_error()));
    }
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } == 1 {
        return Err(ProcessError::ParentGone);
    }
    Ok(())
}

/// Raise the soft open-file limit so that `connections` clients fit (each
/// may take a socket and a file the plugin opens), as far as the hard
/// limit allows; say so if it does not.
pub fn raise_fd_limit(connections: usize) {
    let want = (connections as u64).saturating_mul(2) + 64;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write a plain struct of ours.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want.min(lim.rlim_max),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    if lim.rlim_cur < want {
        log::warn!(
            "the open-file limit ({}) allows about {} connections, fewer than --max-connections={connections}",
            lim.rlim_cur,
            lim.rlim_cur.saturating_sub(64) / 2
        );
    }
}

/// Write our pid, atomically, so a reader never sees a partial file.
pub fn write_pidfile(path: &Path) -> Result<(), ProcessError> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{}", std::process::id())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|error| ProcessError::PidFile {
        path: path.to_path_buf(),
        error,
    })
}

/// A user's id and primary group from its name or number; a number with
/// no passwd entry has no known group (`None`).
fn user_ids(user: &str) -> Result<(libc::uid_t, Option<libc::gid_t>), ProcessError> {
    let name =
        std::ffi::CString::new(user).map_err(|_| ProcessError::NotAUserName(user.to_string()))?;
    // SAFETY: getpwnam reads a NUL-terminated name; the result is null or
    // points to static storage, read at once, before any other call can
    // reuse it (the server runs no other thread yet).
    if let Some(pw) = unsafe { libc::getpwnam(name.as_ptr()).as_ref() } {
        return Ok((pw.pw_uid, Some(pw.pw_gid)));
    }
    let uid: libc::uid_t = user
        .parse()
        .map_err(|_| ProcessError::NoSuchUser(user.to_string()))?;
    // SAFETY: as for getpwnam.
    let gid = unsafe { libc::getpwuid(uid).as_ref() }.map(|pw| pw.pw_gid);
    Ok((uid, gid))
}

/// The uid `-u USER` makes the server run as.
pub fn uid_of(user: &str) -> Result<libc::uid_t, ProcessError> {
    user_ids(user).map(|(uid, _)| uid)
}

/// A group's id from its name or number.
fn group_id(group: &str) -> Result<libc::gid_t, ProcessError> {
    let name = std::ffi::CString::new(group)
        .map_err(|_| ProcessError::NotAGroupName(group.to_string()))?;
    // SAFETY: as for getpwnam in `user_ids`.
    if let Some(gr) = unsafe { libc::getgrnam(name.as_ptr()).as_ref() } {
        return Ok(gr.gr_gid);
    }
    group
        .parse()
        .map_err(|_| ProcessError::NoSuchGroup(group.to_string()))
}

/// `-u` and `-g`: become `user` and `group` once the sockets are bound
/// and the credentials read, before anything is served. The supplementary
/// groups are dropped, then the group is set, then the user, so nothing
/// of the starting identity is left; `-u` without `-g` takes the user's
/// primary group.
pub fn change_user(user: Option<&str>, group: Option<&str>) -> Result<(), ProcessError> {
    let ids = user.map(user_ids).transpose()?;
    let gid = match (group, ids) {
        (Some(g), _) => Some(group_id(g)?),
        (None, Some((_, Some(gid)))) => Some(gid),
        (None, Some((uid, None))) => return Err(ProcessError::NoGroupFor(uid)),
        (None, None) => None,
    };
    if let Some(gid) = gid {
        // SAFETY: plain system calls on this process, before any thread
        // is started; `gid` lives across the setgroups call.
        unsafe {
            if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 {
                return Err(ProcessError::SetGroup {
                    gid,
                    error: std::io::Error::last_os_error(),
                });
            }
        }
    }
    if let Some((uid, _)) = ids {
        // SAFETY: as above.
        if unsafe { libc::setuid(uid) } != 0 {
            return Err(ProcessError::SetUser {
                uid,
                error: std::io::Error::last_os_error(),
            });
        }
    }
    log::debug!("now running as uid {:?}, gid {:?}", ids.map(|i| i.0), gid);
    Ok(())
}
