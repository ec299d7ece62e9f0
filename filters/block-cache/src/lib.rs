//! What nbdhost's block-caching filters (`cow`, `cache`) share: the
//! unlinked scratch file their blocks live in, the directory it goes in,
//! the `…-on-read=false|true|/PATH` switch, and the block size they
//! advertise.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nbdhost_plugin_api::{host, BlockSize, Error, Result};

/// The directory for scratch files: `$TMPDIR`, else `/var/tmp`, as
/// nbdkit's filters do, since /var/tmp is meant for large files and is
/// not the small RAM-backed file system /tmp often is.
pub fn scratch_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}

/// Create an unlinked file in `dir`, readable and writable by this
/// process alone: it vanishes when the server exits, however it exits.
/// `tag` names the file for the moment it has a name (on file systems
/// without `O_TMPFILE`).
pub fn scratch_file(dir: &Path, tag: &str) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).mode(0o600);
    match opts
        .clone()
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(f) => return Ok(f),
        // File systems without O_TMPFILE: create a named file and unlink
        // it at once.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {}
        Err(e) => return Err(e),
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    for i in 0u32.. {
        let path = dir.join(format!("nbdhost-{tag}-{}-{stamp}-{i}", std::process::id()));
        match opts
            .clone()
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("u32 names ran out")
}

/// A scratch file in [`scratch_dir`], or an error that says where and how
/// to choose another place.
pub fn scratch_file_or_error(tag: &str, what: &str) -> Result<(File, PathBuf)> {
    let dir = scratch_dir();
    match scratch_file(&dir, tag) {
        Ok(f) => Ok((f, dir)),
        Err(e) => Err(Error::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!(
                "cannot create the {what} in {} (set TMPDIR to change): {e}",
                dir.display()
            ),
        )),
    }
}

/// Whether reads are kept in the scratch file (`cow-on-read`,
/// `cache-on-read`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OnRead {
    /// Never (the default).
    #[default]
    Never,
    /// Always.
    Always,
    /// While this file exists, so the behaviour can be switched while
    /// the server runs.
    WhileExists(PathBuf),
}

impl OnRead {
    /// Parse the value of parameter `key`: a boolean or an absolute path.
    pub fn parse(key: &str, value: &str) -> Result<OnRead> {
        if value.starts_with('/') {
            return Ok(OnRead::WhileExists(PathBuf::from(value)));
        }
        match host::parse_bool(key, value) {
            Ok(true) => Ok(OnRead::Always),
            Ok(false) => Ok(OnRead::Never),
            Err(_) => Err(Error::new(
                libc::EINVAL,
                format!("{key}={value}: expected true, false or an absolute path"),
            )),
        }
    }

    /// Whether reads are kept now.
    pub fn now(&self) -> bool {
        match self {
            OnRead::Never => false,
            OnRead::Always => true,
            OnRead::WhileExists(p) => p.exists(),
        }
    }
}

/// The block-size constraints of a layer that keeps `block`-byte blocks
/// over a layer constrained by `below`: it prefers whole blocks wherever
/// the layer below takes requests that large, and otherwise keeps the
/// constraints below.
pub fn prefer_blocks(below: Option<BlockSize>, block: u32) -> BlockSize {
    match below {
        None => BlockSize {
            minimum: 1,
            preferred: block,
            maximum: u32::MAX,
        },
        Some(b) if b.maximum >= block => BlockSize {
            preferred: b.preferred.max(block),
            ..b
        },
        Some(b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_files_have_no_name_and_hold_data() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir();
        let f = scratch_file(&dir, "test").unwrap();
        f.write_all_at(b"kept", 10).unwrap();
        let mut back = [0u8; 4];
        f.read_exact_at(&mut back, 10).unwrap();
        assert_eq!(&back, b"kept");
        let leftover = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&format!("nbdhost-test-{}-", std::process::id()))
            });
        assert!(!leftover);
    }

    #[test]
    fn on_read_takes_booleans_and_absolute_paths_only() {
        assert_eq!(
            OnRead::parse("k", "/x/y").unwrap(),
            OnRead::WhileExists("/x/y".into())
        );
        assert!(OnRead::parse("k", "relative/path").is_err());
        assert!(!OnRead::parse("k", "/nonexistent/switch").unwrap().now());
        assert!(OnRead::parse("k", "/").unwrap().now());
    }
}
