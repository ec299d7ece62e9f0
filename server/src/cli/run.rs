//! `--run`: start a command with the connection details in its
//! environment (`$uri`, `$nbd`, `$unixsocket`, `$port`, `$exportname`),
//! as nbdkit does.

use std::path::PathBuf;

/// Where clients reach us, for `--run` and the log.
pub enum Address {
    Unix(PathBuf),
    Tcp(u16),
    /// Listeners passed in by systemd socket activation.
    Activated,
    /// `-s`: stdin and stdout.
    Stdio,
}

/// Start the `--run` command with the connection details in its
/// environment, as nbdkit does.
pub fn spawn(cmd: &str, address: &Address, export: &str) -> Result<std::process::Child, String> {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    let enc = percent_encode(export);
    match address {
        Address::Unix(p) => {
            let p = p.display().to_string();
            c.env(
                "uri",
                format!("nbd+unix:///{enc}?socket={}", percent_encode(&p)),
            );
            c.env("nbd", format!("nbd:unix:{p}"));
            c.env("unixsocket", &p);
            c.env("port", "");
        }
        Address::Tcp(port) => {
            c.env("uri", format!("nbd://localhost:{port}/{enc}"));
            c.env("nbd", format!("nbd:localhost:{port}"));
            c.env("unixsocket", "");
            c.env("port", port.to_string());
        }
        Address::Activated | Address::Stdio => {}
    }
    c.env("exportname", export);
    c.spawn()
        .map_err(|e| format!("--run: cannot start /bin/sh: {e}"))
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
