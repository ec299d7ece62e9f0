//! TLS credentials for tests: PSK files made with psktool, and a CA with
//! certificates made with certtool.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{client, run_ok, TempDir};

/// A PSK file in `dir/keys` (a directory only we may enter) with a key
/// for each user.
pub fn psk_file(dir: &TempDir, users: &[&str]) -> PathBuf {
    let keys = dir.path("keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    let file = keys.join("keys.psk");
    for u in users {
        run_ok(client("psktool").args(["-u", u, "-p"]).arg(&file));
    }
    file
}

fn certtool(args: &[&str], template: Option<(&Path, &str)>) {
    let mut c = client("certtool");
    c.args(args);
    if let Some((path, text)) = template {
        std::fs::write(path, text).unwrap();
        c.arg("--template").arg(path);
    }
    run_ok(&mut c);
}

/// A CA and a certificate signed by it, as certtool's tutorial does.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let key = dir.join("ca-key.pem");
        certtool(
            &["--generate-privkey", "--outfile", key.to_str().unwrap()],
            None,
        );
        certtool(
            &[
                "--generate-self-signed",
                "--load-privkey",
                key.to_str().unwrap(),
                "--outfile",
                dir.join("ca-cert.pem").to_str().unwrap(),
            ],
            Some((
                &dir.join("ca.info"),
                &format!(
                    "cn = {name}\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 30\n"
                ),
            )),
        );
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// Issue a certificate; `client` selects the TLS usage.
    pub fn issue(&self, out: &Path, prefix: &str, cn: &str, client: bool) {
        std::fs::create_dir_all(out).unwrap();
        let key = out.join(format!("{prefix}-key.pem"));
        certtool(
            &["--generate-privkey", "--outfile", key.to_str().unwrap()],
            None,
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let usage = if client {
            "tls_www_client"
        } else {
            "tls_www_server\ndns_name = localhost\nip_address = 127.0.0.1"
        };
        certtool(
            &[
                "--generate-certificate",
                "--load-privkey", key.to_str().unwrap(),
                "--load-ca-certificate", self.dir.join("ca-cert.pem").to_str().unwrap(),
                "--load-ca-privkey", self.dir.join("ca-key.pem").to_str().unwrap(),
                "--outfile", out.join(format!("{prefix}-cert.pem")).to_str().unwrap(),
            ],
            Some((&out.join(format!("{prefix}.info")), &format!("cn = {cn}\norganization = nbdhost tests\n{usage}\nencryption_key\nsigning_key\nexpiration_days = 30\n"))),
        );
        std::fs::copy(self.dir.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
    }

    /// Revoke `cert` in a CRL written to `out/ca-crl.pem`.
    pub fn revoke(&self, cert: &Path, out: &Path) {
        certtool(
            &[
                "--generate-crl",
                "--load-ca-privkey",
                self.dir.join("ca-key.pem").to_str().unwrap(),
                "--load-ca-certificate",
                self.dir.join("ca-cert.pem").to_str().unwrap(),
                "--load-certificate",
                cert.to_str().unwrap(),
                "--outfile",
                out.join("ca-crl.pem").to_str().unwrap(),
            ],
            Some((
                &self.dir.join("crl.info"),
                "crl_next_update = 30\ncrl_number = 1\n",
            )),
        );
    }
}
