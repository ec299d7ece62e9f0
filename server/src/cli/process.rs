//! Process-level chores: going to the background, the pid file, and
//! following the parent's death.

use std::io::Write;
use std::path::Path;

/// Fork into the background once listening: the parent exits at once so
/// the next shell command can connect; the child continues.
pub fn daemonize() -> Result<(), String> {
    // SAFETY: called before the server starts any thread (its loops,
    // workers and signal thread start later, in `runtime::serve`), so the
    // child is a complete copy. Layers run threads of their own only
    // inside a call (the luks filter's key derivation joins its threads
    // before returning).
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
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

/// Ask the kernel to send SIGTERM when the parent exits.
pub fn exit_with_parent() -> Result<(), String> {
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
        return Err(format!("prctl: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } == 1 {
        return Err("the parent has already exited".into());
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
pub fn write_pidfile(path: &Path) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{}", std::process::id())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("cannot write pid file {}: {e}", path.display()))
}
