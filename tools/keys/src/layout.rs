//! Where the X.509 files live. The CA's directory holds the CA's key,
//! which never leaves it; each directory below it holds exactly what one
//! party is given, under the names qemu reads (`tls-creds-x509,dir=`):
//!
//! ```text
//! DIR/ca-key.pem  ca-cert.pem  ca-crl.pem  issued.txt  crlnumber
//! DIR/server/ca-cert.pem  server-cert.pem  server-key.pem  ca-crl.pem
//! DIR/clients/NAME/ca-cert.pem  client-cert.pem  client-key.pem
//! ```

use std::path::{Path, PathBuf};

use crate::error::{io, Error};

pub const CA_KEY: &str = "ca-key.pem";
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_CRL: &str = "ca-crl.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// The paths of one CA directory.
pub struct Layout {
    /// The CA's directory, absolute.
    pub root: PathBuf,
}

impl Layout {
    /// The layout under `dir`, made absolute since its paths are printed
    /// for use from anywhere.
    pub fn new(dir: &Path) -> Result<Layout, Error> {
        Ok(Layout {
            root: std::path::absolute(dir).map_err(io(dir))?,
        })
    }

    /// A file of the CA's own directory.
    pub fn ca(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The record of every certificate issued: see `index`.
    pub fn index(&self) -> PathBuf {
        self.root.join("issued.txt")
    }

    /// The number of the last CRL written, which must only grow.
    pub fn crl_number(&self) -> PathBuf {
        self.root.join("crlnumber")
    }

    /// What `nbdhost --tls-certificates=` is given.
    pub fn server_dir(&self) -> PathBuf {
        self.root.join("server")
    }

    /// What the client `name` is given.
    pub fn client_dir(&self, name: &str) -> PathBuf {
        self.root.join("clients").join(name)
    }
}
