//! The one rule for files that hold keys (the PSK file and
//! `server-key.pem`): owned by root or by the user the server runs as,
//! with no access at all for other users. Access for the file's group is
//! allowed: systemd grants a service its credentials with a POSIX ACL,
//! and `stat` then shows the ACL's mask in the group bits, so those bits
//! cannot tell a group from a named user the ACL admits.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::TlsError;

/// Who may own a key file: root, and the user the server runs as (after
/// `-u`, if given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOwner {
    /// The user the server serves as.
    pub uid: u32,
}

impl KeyOwner {
    /// The user the server runs as now, or `run_as` once `-u` has taken
    /// effect.
    pub fn new(run_as: Option<u32>) -> KeyOwner {
        // SAFETY: geteuid cannot fail.
        let uid = run_as.unwrap_or_else(|| unsafe { libc::geteuid() });
        KeyOwner { uid }
    }

    fn admits(self, owner: u32) -> bool {
        owner == 0 || owner == self.uid
    }
}

/// Refuse a key file that breaks the rule.
pub fn check(path: &Path, owner: KeyOwner) -> Result<(), TlsError> {
    let md = std::fs::metadata(path).map_err(|error| TlsError::File {
        path: path.to_path_buf(),
        error,
    })?;
    let mode = md.mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(TlsError::OpenToOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    if !owner.admits(md.uid()) {
        return Err(TlsError::KeyFileOwner {
            path: path.to_path_buf(),
            owner: md.uid(),
            runs_as: owner.uid,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(mode: u32) -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let p = dir.0.join("keys.psk");
        std::fs::write(&p, "alice:00\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, p)
    }

    mod tempdir {
        /// A directory removed when dropped.
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "nbdhost-key-file-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_private_file_of_the_server_s_user_is_accepted() {
        let (_d, p) = key_file(0o600);
        assert!(check(&p, KeyOwner::new(None)).is_ok());
    }

    #[test]
    fn group_access_is_allowed_because_it_may_be_an_acl_mask() {
        let (_d, p) = key_file(0o640);
        assert!(check(&p, KeyOwner::new(None)).is_ok());
    }

    #[test]
    fn any_access_for_others_is_refused() {
        for mode in [0o604, 0o602, 0o601] {
            let (_d, p) = key_file(mode);
            let e = check(&p, KeyOwner::new(None)).unwrap_err();
            assert!(matches!(e, TlsError::OpenToOthers { .. }), "{mode:o}: {e}");
        }
    }

    #[test]
    fn a_file_of_another_user_is_refused_unless_the_server_runs_as_it() {
        let (_d, p) = key_file(0o600);
        let mut owner = std::fs::metadata(&p).unwrap().uid();
        if owner == 0 {
            // Root's own files are always admitted: give it to nobody.
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            owner = 65534;
        }
        let e = check(&p, KeyOwner { uid: owner + 1 }).unwrap_err();
        assert!(matches!(e, TlsError::KeyFileOwner { .. }), "{e}");
        assert!(check(&p, KeyOwner { uid: owner }).is_ok());
    }
}
