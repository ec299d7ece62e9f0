//! Zero-set-up TLS for captive mode: `--run` with `--tls=require` and no
//! credentials gets a pre-shared key made for this run alone, in a
//! private temporary directory, named to the command in `$uri` and
//! `$tls_psk`, and removed when the server exits.
//!
//! It keeps the connection private from other users of the host and from
//! anything on the network between the command and the server (with TCP
//! or vsock): they cannot read the key, whose directory only the server's
//! user can enter. It does not protect from that user's other processes
//! or root, which can read the key while the run lasts; and a server
//! killed with SIGKILL leaves the directory behind.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroize;

use crate::config::{Settings, PSK_FILE_NAME};
use crate::private_dir::{PrivateDir, PrivateDirError};
use crate::protocol::handshake::TlsMode;
use crate::tls;

/// The user the key is for: qemu's client offers this name by default.
const USER: &str = "qemu";

/// The one-time key's directory, removed when dropped.
pub struct CaptivePsk {
    dir: PrivateDir,
}

/// Why the one-time key could not be made.
#[derive(Debug)]
pub enum CaptivePskError {
    Directory(PrivateDirError),
    Random(getrandom::Error),
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Display for CaptivePskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaptivePskError::Directory(e) => write!(f, "--run's one-time PSK: {e}"),
            CaptivePskError::Random(e) => write!(f, "--run's one-time PSK: no random bytes: {e}"),
            CaptivePskError::Write { path, source } => {
                write!(f, "--run's one-time PSK: {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for CaptivePskError {}

impl CaptivePsk {
    /// Whether `settings` ask for one: `--run` with `--tls=require` and
    /// neither a PSK file nor certificates, given or in the default
    /// certificate directory.
    pub fn wanted(settings: &Settings) -> bool {
        let t = &settings.tls;
        settings.announce.run.is_some()
            && t.setting == Some(TlsMode::Require)
            && t.psk.is_none()
            && t.certificates.is_none()
            && !tls::default_cert_dir().join("server-cert.pem").exists()
    }

    /// Make a random 256-bit key for [`USER`] in a new private directory,
    /// owned by `owner` (the `-u` user, who reads it for every handshake
    /// once the server runs as them) when given.
    pub fn create(owner: Option<u32>) -> Result<CaptivePsk, CaptivePskError> {
        let dir = PrivateDir::new("-psk").map_err(CaptivePskError::Directory)?;
        let file = dir.path().join(PSK_FILE_NAME);
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(CaptivePskError::Random)?;
        let mut line = format!("{USER}:{}\n", hex::encode(key));
        key.zeroize();
        let written = write_private(&file, line.as_bytes());
        line.zeroize();
        written
            .and_then(|()| owner.map_or(Ok(()), |uid| dir.give_to(uid)))
            .map_err(|source| CaptivePskError::Write { path: file, source })?;
        Ok(CaptivePsk { dir })
    }

    /// The key file, for `--tls-psk`.
    pub fn file(&self) -> PathBuf {
        self.dir.path().join(PSK_FILE_NAME)
    }
}

/// Write `data` to a new file only its owner can read.
fn write_private(file: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)?;
    f.write_all(data)
}
