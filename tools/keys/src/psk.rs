//! PSK users in the file format `psktool` writes and GnuTLS, qemu,
//! libnbd and nbdhost read: one `username:hexkey` line per user.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::error::{io, Error};
use crate::files::{self, Kind};
use crate::random;

/// The file name qemu's `tls-creds-psk,dir=DIR` reads in `DIR`.
pub const FILE_NAME: &str = "keys.psk";

/// Bytes of a new key: 256 bits, what psktool makes by default.
const KEY_BYTES: usize = 32;

/// Where the PSK file named on the command line is.
pub struct Location {
    /// The directory that holds the file (and its lock).
    pub dir: PathBuf,
    /// The file itself.
    pub file: PathBuf,
}

impl Location {
    /// A path whose name ends in `.psk` is the file itself; anything else
    /// is the directory that holds `keys.psk`, as qemu's `dir=` is. Made
    /// absolute, since the paths are printed for use from anywhere.
    pub fn new(arg: &Path) -> Result<Location, Error> {
        let arg = std::path::absolute(arg).map_err(io(arg))?;
        if arg.extension().is_some_and(|e| e == "psk") {
            let dir = arg.parent().unwrap_or(Path::new("/")).to_path_buf();
            Ok(Location { dir, file: arg })
        } else {
            Ok(Location {
                file: arg.join(FILE_NAME),
                dir: arg,
            })
        }
    }
}

/// Whether `user` can be a PSK user name: GnuTLS reads the name up to
/// the first `:` of a line, so neither a colon nor a line break (nor any
/// other control character) can be part of one.
pub fn check_user(user: &str) -> Result<(), Error> {
    let why = if user.is_empty() {
        "a user name cannot be empty"
    } else if user.contains(':') {
        "a user name cannot contain ':'"
    } else if user.chars().any(char::is_control) {
        "a user name cannot contain line breaks or other control characters"
    } else {
        return Ok(());
    };
    Err(Error::BadName {
        name: user.to_owned(),
        why,
    })
}

/// One line of the file, kept as it was read so that rewriting the file
/// changes only the users a command names.
struct Entry {
    user: String,
    line: Zeroizing<String>,
}

fn load(file: &Path) -> Result<Vec<Entry>, Error> {
    let Some(text) = files::read_optional(file)? else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match line.split_once(':') {
            Some((user, key)) if !user.is_empty() && !key.is_empty() => entries.push(Entry {
                user: user.to_owned(),
                line: Zeroizing::new(line.to_owned()),
            }),
            _ => {
                return Err(Error::BadPskLine {
                    file: file.to_path_buf(),
                    line: n + 1,
                })
            }
        }
    }
    Ok(entries)
}

fn store(file: &Path, entries: &[Entry]) -> Result<(), Error> {
    let size = entries.iter().map(|e| e.line.len() + 1).sum();
    let mut text = Zeroizing::new(String::with_capacity(size));
    for e in entries {
        text.push_str(&e.line);
        text.push('\n');
    }
    files::write_atomic(file, text.as_bytes(), Kind::Secret)
}

/// Give `user` a new random key in `loc`'s file, making the directory
/// (0700) and the file (0600) if need be. A user who has a key keeps it
/// unless `force`. Returns whether a key was replaced.
pub fn add(loc: &Location, user: &str, force: bool) -> Result<bool, Error> {
    check_user(user)?;
    files::private_dir(&loc.dir)?;
    let _lock = files::lock(&loc.dir)?;
    let mut entries = load(&loc.file)?;
    let existing = entries.iter().position(|e| e.user == user);
    if existing.is_some() && !force {
        return Err(Error::UserExists {
            user: user.to_owned(),
            file: loc.file.clone(),
        });
    }
    let key = Zeroizing::new(random::bytes::<KEY_BYTES>()?);
    let hex_key = Zeroizing::new(hex::encode(key.as_slice()));
    // Sized up front: a growing buffer would leave copies of the key in
    // freed memory that nothing wipes.
    let mut line = Zeroizing::new(String::with_capacity(user.len() + 1 + hex_key.len()));
    line.push_str(user);
    line.push(':');
    line.push_str(&hex_key);
    let entry = Entry {
        user: user.to_owned(),
        line,
    };
    match existing {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
    store(&loc.file, &entries)?;
    Ok(existing.is_some())
}

/// The user names in `loc`'s file, in file order.
pub fn list(loc: &Location) -> Result<Vec<String>, Error> {
    if !loc.file.exists() {
        return Err(io(&loc.file)(std::io::ErrorKind::NotFound.into()));
    }
    Ok(load(&loc.file)?.into_iter().map(|e| e.user).collect())
}

/// Take `user` out of `loc`'s file.
pub fn remove(loc: &Location, user: &str) -> Result<(), Error> {
    if !loc.dir.is_dir() {
        return Err(io(&loc.dir)(std::io::ErrorKind::NotFound.into()));
    }
    let _lock = files::lock(&loc.dir)?;
    let mut entries = load(&loc.file)?;
    let before = entries.len();
    entries.retain(|e| e.user != user);
    if entries.len() == before {
        return Err(Error::NoSuchUser {
            user: user.to_owned(),
            file: loc.file.clone(),
        });
    }
    store(&loc.file, &entries)
}
