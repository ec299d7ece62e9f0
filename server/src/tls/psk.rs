//! Pre-shared keys in psktool's file format (`username:hexkey` lines),
//! and the lookup GnuTLS calls during a PSK handshake.
//!
//! The file is read again for every lookup so that users added or removed
//! take effect on the next connection. Key material is wiped after use and
//! never appears in a message.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use zeroize::Zeroize;

use super::{ffi, TlsError};

/// The PSK file of this process. GnuTLS's lookup callback carries no user
/// pointer of ours, and a process has one TLS set-up.
static PSK_FILE: OnceLock<PathBuf> = OnceLock::new();

thread_local! {
    /// The PSK user the last lookup on this thread was for: handshakes run
    /// synchronously inside the engine's `handshake`, which collects it so
    /// a failure can say who tried.
    static PSK_USER: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// One line of a PSK file: the user and the key, or why the line is not
/// one (blank lines are skipped).
fn entries(text: &str) -> impl Iterator<Item = (usize, Option<(&str, Vec<u8>)>)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            let entry = line.split_once(':').and_then(|(user, hexkey)| {
                let key = hex::decode(hexkey.trim()).ok()?;
                (!user.is_empty() && !key.is_empty()).then_some((user, key))
            });
            (n + 1, entry)
        })
}

/// Why a PSK file's text is not one. It names a line number, never its
/// content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PskFileError {
    /// The line with this number (from 1) is not `username:hexkey`.
    BadLine(usize),
    /// No line names a user.
    NoUsers,
}

impl std::fmt::Display for PskFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PskFileError::BadLine(n) => write!(f, "line {n} is not username:hexkey"),
            PskFileError::NoUsers => f.write_str("no users"),
        }
    }
}

impl std::error::Error for PskFileError {}

/// Check a PSK file's text: at least one user, and every line well
/// formed.
pub fn validate(text: &str) -> Result<usize, PskFileError> {
    let mut users = 0;
    for (n, entry) in entries(text) {
        match entry {
            Some((_, mut key)) => {
                key.zeroize();
                users += 1;
            }
            None => return Err(PskFileError::BadLine(n)),
        }
    }
    if users == 0 {
        return Err(PskFileError::NoUsers);
    }
    Ok(users)
}

/// The key of `username` in a PSK file's text.
pub fn lookup(text: &str, username: &str) -> Option<Vec<u8>> {
    let mut found = None;
    for (_, entry) in entries(text) {
        if let Some((user, mut key)) = entry {
            if user == username && found.is_none() {
                found = Some(key);
            } else {
                key.zeroize();
            }
        }
    }
    found
}

/// The first user in a PSK file's text.
fn first_user_in(text: &str) -> Option<String> {
    entries(text).find_map(|(_, e)| {
        e.map(|(user, mut key)| {
            key.zeroize();
            user.to_owned()
        })
    })
}

/// The first user the PSK file at `file` names, for `--run`'s URI.
pub fn first_user(file: &Path) -> Option<String> {
    let mut text = std::fs::read_to_string(file).ok()?;
    let user = first_user_in(&text);
    text.zeroize();
    user
}

/// Check the PSK file at `file` and make it the one lookups read.
pub fn install(file: &Path) -> Result<(), TlsError> {
    let unreadable = |error| TlsError::File {
        path: file.to_path_buf(),
        error,
    };
    let mut text = std::fs::read_to_string(file).map_err(unreadable)?;
    let checked = validate(&text);
    text.zeroize();
    checked.map_err(|error| TlsError::PskFile {
        path: file.to_path_buf(),
        error,
    })?;
    let abs = std::path::absolute(file).map_err(unreadable)?;
    PSK_FILE.set(abs).map_err(|_| TlsError::ConfiguredTwice)
}

/// The user name the last lookup on this thread was for.
pub fn take_attempted_user() -> Option<String> {
    PSK_USER.with(|u| u.borrow_mut().take())
}

fn lookup_file(username: &str) -> Option<Vec<u8>> {
    let mut text = std::fs::read_to_string(PSK_FILE.get()?).ok()?;
    let key = lookup(&text, username);
    text.zeroize();
    key
}

/// GnuTLS's server-side PSK lookup.
///
/// # Safety
/// GnuTLS calls it with a NUL-terminated user name and a datum to fill.
pub(super) unsafe extern "C" fn callback(
    _session: ffi::Session,
    username: *const c_char,
    key: *mut ffi::Datum,
) -> c_int {
    let found = std::panic::catch_unwind(|| {
        // SAFETY: GnuTLS passes the client's user name as a C string.
        let user = unsafe { CStr::from_ptr(username) }.to_str().ok()?;
        PSK_USER.with(|u| *u.borrow_mut() = Some(user.to_string()));
        lookup_file(user)
    });
    let Ok(Some(mut k)) = found else { return -1 };
    // SAFETY: GnuTLS frees the key with gnutls_free, so it must come from
    // gnutls_malloc; `key` is the datum GnuTLS gave us to fill.
    unsafe {
        let p = ffi::gnutls_malloc(k.len()).cast::<u8>();
        if p.is_null() {
            k.zeroize();
            return -1;
        }
        std::ptr::copy_nonoverlapping(k.as_ptr(), p, k.len());
        (*key).data = p;
        (*key).size = k.len() as c_uint;
    }
    k.zeroize();
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_user_is_the_first_well_formed_line() {
        assert_eq!(
            first_user_in("\nbroken\nalice:0a0b\nbob:0c0d\n").as_deref(),
            Some("alice")
        );
        assert_eq!(first_user_in("broken\n"), None);
    }

    #[test]
    fn users_and_keys_are_found_by_name() {
        let text = "alice:00112233\n\nbob:ffee\n";
        assert_eq!(validate(text), Ok(2));
        assert_eq!(lookup(text, "bob"), Some(vec![0xff, 0xee]));
        assert_eq!(lookup(text, "carol"), None);
    }

    #[test]
    fn a_bad_line_is_named_by_number_only() {
        let e = validate("alice:0011\nsecretstuff\n").unwrap_err();
        assert_eq!(e.to_string(), "line 2 is not username:hexkey");
        assert!(validate("alice:zz").is_err());
        assert!(validate(":0011").is_err());
        assert_eq!(validate("\n\n"), Err(PskFileError::NoUsers));
        assert_eq!(PskFileError::NoUsers.to_string(), "no users");
    }
}
