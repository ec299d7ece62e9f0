//! qemu's image locks, so that nbdhost and qemu (and two exports of one
//! nbdhost, or an export's old and new chains across a reload) never
//! write one image at once. qemu's file driver keeps one byte lock per
//! permission: a shared lock on byte 100 + n while it holds permission n,
//! and on byte 200 + n while it will not let others take it. Open file
//! description locks make two opens in one process conflict as two
//! processes do.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg};

use crate::error::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// qemu's permissions (`BLK_PERM_*`), by bit number.
const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const WRITE_UNCHANGED: u32 = 2;
const RESIZE: u32 = 3;

fn name(perm: u32) -> &'static str {
    match perm {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

/// What the holder does with the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads it, and lets no one else write it meanwhile.
    Read,
    /// Reads, writes and grows it, and lets others only read.
    Write,
}

impl Access {
    fn perms(self) -> &'static [u32] {
        match self {
            Access::Read => &[CONSISTENT_READ],
            Access::Write => &[CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE],
        }
    }
}

/// Permissions nobody else may have while the lock is held.
const UNSHARED: [u32; 2] = [WRITE, RESIZE];

/// The locks on one image file, held until dropped.
pub struct ImageLock {
    file: File,
    path: PathBuf,
    access: Access,
}

fn flock(typ: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

impl ImageLock {
    /// Lock `path` for `access`, or say who is in the way.
    pub fn take(path: &Path, access: Access) -> Result<ImageLock> {
        let file = File::open(path)
            .map_err(|e| Error::Invalid(format!("{}: cannot open to lock: {e}", path.display())))?;
        let lock = ImageLock {
            file,
            path: path.to_path_buf(),
            access,
        };
        lock.apply(access)?;
        Ok(lock)
    }

    /// Move to `access`: from reading to writing, when a writer connects
    /// to an image so far only read.
    pub fn set(&mut self, access: Access) -> Result<()> {
        if access == self.access {
            return Ok(());
        }
        if let Err(e) = self.apply(access) {
            // Give back what was taken for the new access only.
            for p in access
                .perms()
                .iter()
                .filter(|p| !self.access.perms().contains(p))
            {
                let byte = PERM_BASE + i64::from(*p);
                let _ = fcntl(
                    &self.file,
                    FcntlArg::F_OFD_SETLK(&flock(libc::F_UNLCK, byte)),
                );
            }
            return Err(e);
        }
        self.access = access;
        Ok(())
    }

    fn apply(&self, access: Access) -> Result<()> {
        let bytes = access
            .perms()
            .iter()
            .map(|&p| PERM_BASE + i64::from(p))
            .chain(UNSHARED.iter().map(|&p| SHARED_BASE + i64::from(p)));
        for byte in bytes {
            fcntl(
                &self.file,
                FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, byte)),
            )
            .map_err(|e| {
                Error::Invalid(format!(
                    "{}: cannot lock byte {byte}: {e}",
                    self.path.display()
                ))
            })?;
        }
        // As qemu does: take ours, then look for anyone in the way.
        for &p in access.perms() {
            if self.taken(SHARED_BASE + i64::from(p))? {
                return Err(self.busy(format!(
                    "\"{}\" permission, which someone will not share",
                    name(p)
                )));
            }
        }
        for &p in &UNSHARED {
            if self.taken(PERM_BASE + i64::from(p))? {
                return Err(self.busy(format!("shared \"{}\" lock", name(p))));
            }
        }
        Ok(())
    }

    /// Whether another open file holds a lock on `byte`.
    fn taken(&self, byte: i64) -> Result<bool> {
        let mut probe = flock(libc::F_WRLCK, byte);
        fcntl(&self.file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| {
            Error::Invalid(format!(
                "{}: cannot test byte {byte}: {e}",
                self.path.display()
            ))
        })?;
        Ok(i32::from(probe.l_type) != libc::F_UNLCK)
    }

    fn busy(&self, what: String) -> Error {
        Error::ReadOnly(format!(
            "{}: cannot get the {what}: is another process (qemu, or another export \
             of this server) using the image?",
            self.path.display()
        ))
    }
}
