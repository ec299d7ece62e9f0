//! Why a command failed, as a type; `main` turns it into the message.

use std::fmt;
use std::path::PathBuf;

/// Everything that can stop a command. No variant carries key material,
/// so no message can show a key.
#[derive(Debug)]
pub enum Error {
    /// A system call on `path` failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds the directory's lock and waiting for it failed.
    Lock { path: PathBuf, errno: nix::Error },
    /// Files that exist and would be replaced without `--force`.
    Exists(Vec<PathBuf>),
    /// A PSK user name or certificate name that cannot be used.
    BadName { name: String, why: &'static str },
    /// `psk add` for a user the file already has, without `--force`.
    UserExists { user: String, file: PathBuf },
    /// `psk remove` for a user the file does not have.
    NoSuchUser { user: String, file: PathBuf },
    /// A line of a PSK file that is not `user:hexkey`.
    BadPskLine { file: PathBuf, line: usize },
    /// A line of the CA's index that cannot be read.
    BadIndexLine { file: PathBuf, line: usize },
    /// The directory holds no CA (no `ca-cert.pem` or `ca-key.pem`).
    NoCa(PathBuf),
    /// The CA key is encrypted and no passphrase was given.
    NeedPassphrase(PathBuf),
    /// The passphrase file is empty.
    EmptyPassphrase(PathBuf),
    /// The CA key could not be decrypted with the passphrase given.
    WrongPassphrase(PathBuf),
    /// A key or certificate file that cannot be read as one.
    BadPem { path: PathBuf, what: String },
    /// The CA's key does not belong to the CA's certificate.
    KeyMismatch { key: PathBuf, cert: PathBuf },
    /// rcgen refused to build or sign something.
    Sign { what: &'static str, why: String },
    /// A server certificate needs at least one name.
    NoServerNames,
    /// `--days 0`, or a validity that cannot be represented.
    BadDays(u32),
    /// `revoke` of a name the CA never issued a client certificate for.
    NotIssued(String),
    /// The operating system's random source failed.
    Random(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Lock { path, errno } => write!(f, "cannot lock {}: {errno}", path.display()),
            Error::Exists(paths) => {
                let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                write!(
                    f,
                    "{} already exist{}; give --force to replace {}",
                    list.join(", "),
                    if paths.len() == 1 { "s" } else { "" },
                    if paths.len() == 1 { "it" } else { "them" }
                )
            }
            Error::BadName { name, why } => write!(f, "{name:?}: {why}"),
            Error::UserExists { user, file } => write!(
                f,
                "{} already has a key for {user:?}; give --force to replace it with a new key",
                file.display()
            ),
            Error::NoSuchUser { user, file } => {
                write!(f, "{} has no user {user:?}", file.display())
            }
            Error::BadPskLine { file, line } => write!(
                f,
                "{} line {line} is not USERNAME:HEXKEY (the format psktool writes)",
                file.display()
            ),
            Error::BadIndexLine { file, line } => {
                write!(f, "{} line {line} cannot be read", file.display())
            }
            Error::NoCa(dir) => write!(
                f,
                "no CA in {}: make one first with: nbdhost-keys ca {}",
                dir.display(),
                dir.display()
            ),
            Error::NeedPassphrase(key) => write!(
                f,
                "{} is encrypted: give its passphrase with --passphrase-file",
                key.display()
            ),
            Error::EmptyPassphrase(file) => {
                write!(f, "{}: the passphrase is empty", file.display())
            }
            Error::WrongPassphrase(key) => write!(
                f,
                "cannot decrypt {} with that passphrase",
                key.display()
            ),
            Error::BadPem { path, what } => {
                write!(f, "{}: not {what}", path.display())
            }
            Error::KeyMismatch { key, cert } => write!(
                f,
                "{} is not the key of {}",
                key.display(),
                cert.display()
            ),
            Error::Sign { what, why } => write!(f, "cannot make the {what}: {why}"),
            Error::NoServerNames => write!(
                f,
                "a server certificate needs the names clients connect to: give --dns NAME or --ip ADDRESS"
            ),
            Error::BadDays(d) => write!(f, "--days {d}: not a usable number of days"),
            Error::NotIssued(name) => {
                write!(f, "this CA has issued no client certificate named {name:?}")
            }
            Error::Random(why) => write!(f, "the system's random source failed: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// Attach the path to an I/O error.
pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
