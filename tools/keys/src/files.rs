//! How files are written: under a lock, atomically, with the modes keys
//! need, and never over an existing file unless asked.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use zeroize::Zeroizing;

use crate::error::{io, Error};
use crate::random;

/// What a file holds, which decides who may read it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A private key or a PSK file: 0600, and never readable by others.
    Secret,
    /// A certificate, a CRL or the CA's index: 0644.
    Public,
}

impl Kind {
    fn new_mode(self) -> u32 {
        match self {
            Kind::Secret => 0o600,
            Kind::Public => 0o644,
        }
    }
}

/// An exclusive `flock` on `DIR/.lock`, held until dropped, so two runs
/// on one directory cannot interleave their read-modify-write of the
/// PSK file, the index or the CRL.
pub struct Lock {
    _held: Flock<File>,
}

/// Take the lock of `dir`, waiting (and saying so) while another process
/// holds it.
pub fn lock(dir: &Path) -> Result<Lock, Error> {
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => return Ok(Lock { _held: held }),
        Err((file, Errno::EWOULDBLOCK)) => {
            eprintln!(
                "nbdhost-keys: waiting for another nbdhost-keys working in {}",
                dir.display()
            );
            file
        }
        Err((_, errno)) => return Err(Error::Lock { path, errno }),
    };
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(held) => return Ok(Lock { _held: held }),
            Err((again, Errno::EINTR)) => file = again,
            Err((_, errno)) => return Err(Error::Lock { path, errno }),
        }
    }
}

/// Create `dir` and any missing parents, 0700; a directory that exists
/// is left as it is.
pub fn private_dir(dir: &Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    // The new entry must survive a crash as well as the files put in it.
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Fail with every path of `paths` that exists, unless `force`.
pub fn refuse_existing(paths: &[PathBuf], force: bool) -> Result<(), Error> {
    if force {
        return Ok(());
    }
    let existing: Vec<PathBuf> = paths.iter().filter(|p| p.exists()).cloned().collect();
    if existing.is_empty() {
        Ok(())
    } else {
        Err(Error::Exists(existing))
    }
}

/// The contents of `path`, or `None` if there is no such file; kept in
/// memory that is wiped when dropped, since it may hold keys.
pub fn read_optional(path: &Path) -> Result<Option<Zeroizing<String>>, Error> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(Zeroizing::new(s))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Replace `path` with `contents` so that a reader (nbdhost reads the
/// PSK file for every connection) and a crash see the old file or the
/// new one, never a mix: a temporary file in the same directory is
/// written, flushed to disk and renamed over `path`, and the directory
/// is flushed too.
///
/// A new file gets `kind`'s mode. A file that is replaced keeps its
/// owner, group and mode (the server may read it as another user), but
/// a secret never keeps a permission for others.
pub fn write_atomic(path: &Path, contents: &[u8], kind: Kind) -> Result<(), Error> {
    let dir = parent(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.{}.tmp",
        hex::encode(random::bytes::<6>()?)
    ));
    let result = write_new(&tmp, path, contents, kind).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(io(path))?;
        sync_dir(&dir)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_new(tmp: &Path, target: &Path, contents: &[u8], kind: Kind) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io(tmp))?;
    let mode = match std::fs::metadata(target) {
        Ok(old) => {
            // Only root may give a file away; anyone else keeps it.
            let _ = std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()));
            match kind {
                Kind::Secret => old.mode() & 0o770,
                Kind::Public => old.mode() & 0o777,
            }
        }
        Err(_) => kind.new_mode(),
    };
    // Set after creation, so the umask does not decide a certificate's mode.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(io(tmp))?;
    file.write_all(contents).map_err(io(tmp))?;
    file.sync_all().map_err(io(tmp))
}

/// Remove `path` if it exists, durably.
pub fn remove(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(&parent(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}
