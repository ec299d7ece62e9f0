//! The command lines printed after each step: the server's, and the
//! clients' (qemu, libnbd's tools, libvirt) that use what was made,
//! with absolute paths, quoted for a POSIX shell.

use std::fmt::Write;
use std::net::Ipv6Addr;
use std::path::Path;

use time::OffsetDateTime;

use crate::crl::Revoked;
use crate::issue::Issued;

/// NBD's registered port, which clients assume.
pub const DEFAULT_PORT: u16 = 10809;

/// Where clients connect.
pub struct Target {
    pub host: String,
    pub port: u16,
}

/// After `psk add`: serve with the file, and connect as `user`.
pub fn psk_added(file: &Path, dir: &Path, user: &str, replaced: bool, t: &Target) -> String {
    let f = file.display().to_string();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} key for user {user} in {f} (256 bits; keys are never printed).",
        if replaced { "Replaced the" } else { "Added a" }
    );
    let _ = writeln!(s, "\nServe with it:");
    let _ = writeln!(
        s,
        "  nbdhost --tls=require --tls-psk={} PLUGIN [PARAMS...]",
        sh(&f)
    );
    let _ = writeln!(
        s,
        "\nConnect (a client needs a copy of the file, or of this user's line, mode 0600):"
    );
    if file.file_name().is_some_and(|n| n == crate::psk::FILE_NAME) {
        let object = format!(
            "tls-creds-psk,id=tls0,endpoint=client,dir={},username={}",
            qemu(&dir.display().to_string()),
            qemu(user)
        );
        qemu_lines(&mut s, &object, t);
    } else {
        let _ = writeln!(
            s,
            "  (qemu reads only a file named {} in the directory given as dir=)",
            crate::psk::FILE_NAME
        );
    }
    let uri = format!(
        "nbds://{}@{}/?tls-psk-file={}",
        pct(user, ""),
        authority(t),
        pct(&f, "/")
    );
    libnbd_lines(&mut s, &uri);
    s
}

/// After `psk remove`.
pub fn psk_removed(file: &Path, user: &str) -> String {
    format!(
        "Removed user {user} from {}.\n\
         nbdhost reads the file for every connection: {user}'s next connection is refused.\n",
        file.display()
    )
}

/// After `ca`.
pub fn ca_made(root: &Path, name: &str, not_after: OffsetDateTime, encrypted: bool) -> String {
    let r = sh(&root.display().to_string());
    format!(
        "Made the CA {name:?} in {} (valid until {}); its key {}is {}.\n\
         No server or client needs the CA's key: keep it where it is.\n\
         \n\
         Next, the server's certificate, for the names clients connect to:\n  \
         nbdhost-keys server {r} --dns HOST [--ip ADDRESS]\n\
         and one for each client:\n  \
         nbdhost-keys client {r} --name NAME\n",
        root.display(),
        not_after.date(),
        if encrypted {
            "(encrypted under the passphrase) "
        } else {
            ""
        },
        root.join(crate::layout::CA_KEY).display()
    )
}

/// After `server`.
pub fn server_issued(root: &Path, issued: &Issued, files: &[&str]) -> String {
    let d = sh(&issued.dir.display().to_string());
    format!(
        "{}\
         \n\
         Serve with it (--tls-verify-peer: only clients with a certificate from this CA):\n  \
         nbdhost --tls=require --tls-certificates={d} --tls-verify-peer PLUGIN [PARAMS...]\n\
         \n\
         Issue a certificate for each client:\n  \
         nbdhost-keys client {} --name NAME\n",
        issued_line("Server certificate", issued, files),
        sh(&root.display().to_string())
    )
}

/// After `client`.
pub fn client_issued(name: &str, issued: &Issued, files: &[&str], t: &Target) -> String {
    let dir_s = issued.dir.display().to_string();
    let mut s = issued_line(&format!("Client certificate CN={name}"), issued, files);
    let _ = writeln!(s, "\nConnect:");
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        qemu(&dir_s)
    );
    qemu_lines(&mut s, &object, t);
    let uri = format!(
        "nbds://{}/?tls-certificates={}",
        authority(t),
        pct(&dir_s, "/")
    );
    libnbd_lines(&mut s, &uri);
    let _ = write!(
        s,
        "\nlibvirt, in /etc/libvirt/qemu.conf (the directory must be readable by the user QEMU runs as):\n  \
         nbd_tls_x509_cert_dir = \"{dir_s}\"\n  \
         nbd_tls = 1\n\
         (TLS for every NBD disk; or tls='yes' on one disk's source in the domain XML:)\n  \
         <disk type='network' device='disk'>\n    \
         <driver name='qemu' type='raw'/>\n    \
         <source protocol='nbd' tls='yes'>\n      \
         <host name='{}' port='{}'/>\n    \
         </source>\n    \
         <target dev='vdb' bus='virtio'/>\n  \
         </disk>\n\
         \n\
         To let only this client open an export, in nbdhost.toml(5):\n  \
         allow-dn = [\"CN={name}\"]\n",
        xml(&t.host),
        t.port
    );
    s
}

/// After `revoke`.
pub fn revoked(name: &str, r: &Revoked, server_dir: &Path) -> String {
    let mut s = if r.newly == 0 {
        format!("The certificates of client {name} were revoked already; the CRL is written again")
    } else {
        format!(
            "Revoked {} certificate{} of client {name}",
            r.newly,
            if r.newly == 1 { "" } else { "s" }
        )
    };
    let _ = writeln!(s, " (the CRL's next update: {}):", r.next_update.date());
    for p in &r.written {
        let _ = writeln!(s, "  {}", p.display());
    }
    if r.written.len() > 1 {
        let _ = writeln!(
            s,
            "A running nbdhost serving {} reads it again at the next connection: the revoked certificate is refused from then on.",
            server_dir.display()
        );
    } else {
        let _ = writeln!(
            s,
            "Copy {} into the server's --tls-certificates directory: a running nbdhost reads it at the next connection.",
            r.written[0].display()
        );
    }
    s
}

fn issued_line(what: &str, i: &Issued, files: &[&str]) -> String {
    format!(
        "{what} (serial {}, valid until {}) in {}:\n  {}\n",
        hex::encode(&i.serial),
        i.not_after.date(),
        i.dir.display(),
        files.join(" ")
    )
}

fn qemu_lines(s: &mut String, object: &str, t: &Target) {
    let _ = writeln!(
        s,
        "  qemu-img info --object {} --image-opts {}",
        sh(object),
        sh(&format!(
            "driver=nbd,host={},port={},tls-creds=tls0",
            qemu(&t.host),
            t.port
        ))
    );
    let _ = writeln!(
        s,
        "  qemu-nbd --list --object {} --tls-creds=tls0 --bind={} --port={}",
        sh(object),
        sh(&t.host),
        t.port
    );
}

fn libnbd_lines(s: &mut String, uri: &str) {
    let _ = writeln!(s, "  nbdinfo {}", sh(uri));
    let _ = writeln!(s, "  nbdcopy {} disk.img", sh(uri));
}

/// HOST or HOST:PORT as a URI writes it, an IPv6 address in brackets.
fn authority(t: &Target) -> String {
    let host = if t.host.parse::<Ipv6Addr>().is_ok() {
        format!("[{}]", t.host)
    } else {
        pct(&t.host, "")
    };
    if t.port == DEFAULT_PORT {
        host
    } else {
        format!("{host}:{}", t.port)
    }
}

/// `s` percent-encoded for a URI, leaving RFC 3986's unreserved
/// characters and those of `keep` as they are.
fn pct(s: &str, keep: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.as_bytes().contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `s` as one qemu option value: a comma is written twice.
fn qemu(s: &str) -> String {
    s.replace(',', ",,")
}

/// `s` for an XML attribute in single quotes.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('<', "&lt;")
}

/// `s` as one word for a POSIX shell: as it is when it needs no quotes,
/// otherwise in single quotes.
fn sh(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
