//! A fresh directory only this process's user can enter, under `$TMPDIR`
//! (else `/tmp`), removed with what it holds when dropped: where `-U -`
//! and `--run` put their socket and `--run` its one-time PSK.

use std::io;
use std::path::{Path, PathBuf};

/// A private directory, removed when dropped.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

/// Why a private directory could not be made in `base`.
#[derive(Debug)]
pub struct PrivateDirError {
    pub base: PathBuf,
    /// `None` when every name tried was taken.
    pub source: Option<io::Error>,
}

impl std::fmt::Display for PrivateDirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(e) => write!(
                f,
                "cannot create a private directory in {}: {e}",
                self.base.display()
            ),
            None => write!(
                f,
                "cannot create a private directory in {}: every name is taken",
                self.base.display()
            ),
        }
    }
}

impl std::error::Error for PrivateDirError {}

impl PrivateDir {
    /// Make `$TMPDIR/nbdhost{pid}-{n}{suffix}`, mode 0700.
    pub fn new(suffix: &str) -> Result<PrivateDir, PrivateDirError> {
        let base = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        for n in 0..100u32 {
            let path = base.join(format!("nbdhost{}-{n}{suffix}", std::process::id()));
            let mut b = std::fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            match b.create(&path) {
                Ok(()) => return Ok(PrivateDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(PrivateDirError {
                        base,
                        source: Some(e),
                    })
                }
            }
        }
        Err(PrivateDirError { base, source: None })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hand the directory and what it holds now to `uid`: the user `-u`
    /// makes the server run as, who uses them from then on (and the
    /// `--run` command, which runs as that user too).
    pub fn give_to(&self, uid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(&self.path, Some(uid), None)?;
        for entry in std::fs::read_dir(&self.path)? {
            std::os::unix::fs::chown(entry?.path(), Some(uid), None)?;
        }
        Ok(())
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
