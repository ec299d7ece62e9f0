//! Several instances of one layer in one process. The ABI's callbacks are
//! global, so a plugin keeps its configuration in statics; two exports of
//! the same plugin with different parameters therefore each need their
//! own copy of those statics. The first load of a shared object is the
//! file itself; every further load while it is loaded is a private copy
//! (an anonymous memory file with the same bytes), which the dynamic
//! linker treats as a different object with statics of its own.
//!
//! Libraries the layer links against (libpython, librbd, ...) are shared
//! by all copies, as they would be in any process; a layer whose state
//! lives there cannot have two instances, and the nbdkit adapter's
//! foreign plugin is one: [`claim_only`] refuses a second.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use super::load_error::LoadError;

/// Live loads of each file, by device and inode.
static LOADED: Mutex<BTreeMap<(u64, u64), usize>> = Mutex::new(BTreeMap::new());

/// One live load of a file, counted until dropped.
pub struct Claim {
    id: (u64, u64),
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = loaded.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                loaded.remove(&self.id);
            }
        }
    }
}

fn identity(path: &Path, kind: &'static str) -> Result<(u64, u64), LoadError> {
    let md = std::fs::metadata(path).map_err(|error| LoadError::Unreadable {
        kind,
        path: path.to_path_buf(),
        error,
    })?;
    Ok((md.dev(), md.ino()))
}

/// Count one more load of `path`; returns the claim and whether it is the
/// only one.
fn claim(path: &Path, kind: &'static str) -> Result<(Claim, bool), LoadError> {
    let id = identity(path, kind)?;
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let n = loaded.entry(id).or_insert(0);
    *n += 1;
    Ok((Claim { id }, *n == 1))
}

/// Claim `path` for a layer that cannot have two instances, or say why
/// not.
pub fn claim_only(path: &Path, kind: &'static str) -> Result<Claim, LoadError> {
    let (c, first) = claim(path, kind)?;
    if first {
        Ok(c)
    } else {
        Err(LoadError::AlreadyLoaded {
            kind,
            path: path.to_path_buf(),
        })
    }
}

/// A loaded shared object, and the claim that counts it.
pub struct Loaded {
    pub lib: libloading::Library,
    /// Dropped after the library: the count falls once it is closed.
    claims: Vec<Claim>,
    /// A private copy's file, open as long as the library is loaded: the
    /// dynamic linker knows objects by name first, so the copy's name
    /// (`/proc/self/fd/N`) must not be reused by a later copy meanwhile.
    _copy: Option<File>,
}

impl Loaded {
    /// Keep `c` for as long as this object is loaded.
    pub fn hold(&mut self, c: Claim) {
        self.claims.push(c);
    }
}

/// Load the shared object at `path`: the file itself, or a private copy
/// of it when it is loaded already.
pub fn open(path: &Path, kind: &'static str) -> Result<Loaded, LoadError> {
    let (c, first) = claim(path, kind)?;
    let failed = |error| LoadError::Dlopen {
        kind,
        path: path.to_path_buf(),
        error,
    };
    let (lib, copy) = if first {
        // SAFETY: loading a layer runs its initialisers; that is the point
        // of it, and the user named this file.
        let lib = unsafe { libloading::Library::new(path) }.map_err(failed)?;
        (lib, None)
    } else {
        let copy = private_copy(path).map_err(|error| LoadError::PrivateCopy {
            kind,
            path: path.to_path_buf(),
            error,
        })?;
        log::debug!(
            "{kind} {} is loaded already: this instance is a private copy",
            path.display()
        );
        let name = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&copy));
        // SAFETY: as above; the copy has the file's bytes.
        let lib = unsafe { libloading::Library::new(name) }.map_err(failed)?;
        (lib, Some(copy))
    };
    Ok(Loaded {
        lib,
        claims: vec![c],
        _copy: copy,
    })
}

/// An anonymous memory file holding the bytes of `path`.
fn private_copy(path: &Path) -> std::io::Result<File> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = CString::new(name).unwrap_or_default();
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let mut copy = unsafe { File::from_raw_fd(fd) };
    std::io::copy(&mut File::open(path)?, &mut copy)?;
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_of_a_file_is_not_the_only_one_until_the_first_drops() {
        let path = std::env::current_exe().unwrap();
        let (a, first) = claim(&path, "test").unwrap();
        assert!(first);
        let (b, second) = claim(&path, "test").unwrap();
        assert!(!second);
        assert!(claim_only(&path, "test").is_err());
        drop((a, b));
        assert!(claim_only(&path, "test").is_ok());
    }
}
