//! `--run`: start a command with the connection details in its
//! environment (`$uri`, `$nbd`, `$unixsocket`, `$port`, `$exportname`,
//! `$tls`, `$tls_certificates`, `$tls_psk`), as nbdkit does.

use std::path::{Path, PathBuf};

use crate::protocol::handshake::TlsMode;
use crate::tls::psk;

/// Where clients reach us, for `--run` and the log.
pub enum Address {
    Unix(PathBuf),
    Tcp(u16),
    /// `--vsock`: this AF_VSOCK port, for any context id.
    Vsock(u32),
    /// Listeners passed in by systemd socket activation.
    Activated,
    /// `-s`: stdin and stdout.
    Stdio,
}

/// The TLS settings the `--run` command is told about.
pub struct Tls<'a> {
    pub mode: TlsMode,
    pub certificates: Option<&'a Path>,
    pub psk: Option<&'a Path>,
}

/// Why the `--run` command could not be started: the shell could not be.
#[derive(Debug)]
pub struct SpawnError(pub std::io::Error);

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--run: cannot start /bin/sh: {}", self.0)
    }
}

impl std::error::Error for SpawnError {}

/// Start the `--run` command with the connection details in its
/// environment, as nbdkit does.
pub fn spawn(
    cmd: &str,
    address: &Address,
    export: &str,
    tls: &Tls,
) -> Result<std::process::Child, SpawnError> {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    let (unixsocket, port) = match address {
        Address::Unix(p) => (p.display().to_string(), String::new()),
        Address::Tcp(port) => (String::new(), port.to_string()),
        Address::Vsock(port) => (String::new(), port.to_string()),
        Address::Activated | Address::Stdio => (String::new(), String::new()),
    };
    if let Some(uri) = uri(address, export, tls) {
        // nbdkit since 1.24: both name the same URI.
        c.env("uri", &uri).env("nbd", &uri);
    }
    c.env("unixsocket", unixsocket)
        .env("port", port)
        .env("exportname", export);
    match tls.mode {
        TlsMode::Off => {}
        TlsMode::On => {
            c.env("tls", "1");
        }
        TlsMode::Require => {
            c.env("tls", "2");
        }
    }
    if let Some(d) = tls.certificates {
        c.env("tls_certificates", d);
    }
    if let Some(f) = tls.psk {
        c.env("tls_psk", f);
    }
    c.spawn().map_err(SpawnError)
}

/// The NBD URI of `export` at `address`. When TLS is required it says so
/// in the scheme and names the credentials, as nbdkit's does; for a PSK
/// file it also names the file's first user (as the URI's user), since
/// libnbd otherwise offers the login name, which the file rarely holds.
pub fn uri(address: &Address, export: &str, tls: &Tls) -> Option<String> {
    let required = tls.mode == TlsMode::Require;
    let mut query = Vec::new();
    let mut user = String::new();
    if required {
        if let Some(d) = tls.certificates {
            query.push(format!(
                "tls-certificates={}",
                percent_encode(&d.display().to_string())
            ));
        } else if let Some(f) = tls.psk {
            query.push(format!(
                "tls-psk-file={}",
                percent_encode(&f.display().to_string())
            ));
            if let Some(u) = psk::first_user(f) {
                user = format!("{}@", percent_encode(&u));
            }
        }
    }
    let s = if required { "s" } else { "" };
    let export = percent_encode(export);
    let mut uri = match address {
        Address::Unix(p) => {
            let socket = format!("socket={}", percent_encode(&p.display().to_string()));
            query.insert(0, socket);
            format!("nbd{s}+unix://{user}/{export}")
        }
        Address::Tcp(port) => format!("nbd{s}://{user}localhost:{port}/{export}"),
        // CID 1 is this host itself, as a local --run command reaches it.
        Address::Vsock(port) => format!("nbd{s}+vsock://{user}1:{port}/{export}"),
        Address::Activated | Address::Stdio => return None,
    };
    if !query.is_empty() {
        uri.push('?');
        uri.push_str(&query.join("&"));
    }
    Some(uri)
}

/// Percent-encode everything but unreserved URI characters and '/'.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Tls = Tls {
        mode: TlsMode::Off,
        certificates: None,
        psk: None,
    };

    #[test]
    fn a_unix_uri_names_the_export_and_the_socket() {
        let a = Address::Unix("/tmp/a b/nbd.sock".into());
        assert_eq!(
            uri(&a, "disk 1", &PLAIN).unwrap(),
            "nbd+unix:///disk%201?socket=/tmp/a%20b/nbd.sock"
        );
    }

    #[test]
    fn a_tcp_uri_names_localhost_and_the_port() {
        assert_eq!(
            uri(&Address::Tcp(10809), "", &PLAIN).unwrap(),
            "nbd://localhost:10809/"
        );
    }

    #[test]
    fn required_tls_names_the_certificates_in_the_uri() {
        let tls = Tls {
            mode: TlsMode::Require,
            certificates: Some(Path::new("/etc/pki/nbdhost")),
            psk: None,
        };
        assert_eq!(
            uri(&Address::Tcp(10809), "", &tls).unwrap(),
            "nbds://localhost:10809/?tls-certificates=/etc/pki/nbdhost"
        );
    }

    #[test]
    fn optional_tls_leaves_the_uri_plain() {
        let tls = Tls {
            mode: TlsMode::On,
            certificates: Some(Path::new("/etc/pki/nbdhost")),
            psk: None,
        };
        assert_eq!(
            uri(&Address::Tcp(10809), "", &tls).unwrap(),
            "nbd://localhost:10809/"
        );
    }

    #[test]
    fn stdio_and_socket_activation_have_no_uri() {
        assert!(uri(&Address::Stdio, "", &PLAIN).is_none());
        assert_eq!(
            uri(&Address::Vsock(10809), "disk", &PLAIN).unwrap(),
            "nbd+vsock://1:10809/disk"
        );
        assert!(uri(&Address::Activated, "", &PLAIN).is_none());
    }
}
