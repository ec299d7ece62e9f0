//! Where the server finds its TLS credentials and how it follows them
//! while it runs: a PSK directory, systemd's credentials directory,
//! certificates replaced, revoked, broken or out of date, the ownership
//! rule for key files, and `--run`'s one-time key. Every key and
//! certificate is made by nbdhost-keys; real clients judge the result.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use nbdhost_tests::{
    client, free_port, keys_ok, missing, nbdhost_bin, output_text, plugin, run, run_ok, Server,
    TempDir,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A CA, and a server certificate for localhost and 127.0.0.1.
fn pki(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.path(name);
    keys_ok(&["ca", s(&p)]);
    keys_ok(&["server", s(&p), "--dns", "localhost", "--ip", "127.0.0.1"]);
    p
}

/// `nbdhost ARGS` on 127.0.0.1 at a free port.
fn tcp_server(args: &[&str]) -> Server {
    let port = free_port().to_string();
    let mut all = vec!["-p", &port, "-i", "127.0.0.1"];
    all.extend_from_slice(args);
    Server::start_tcp(&all, port.parse().unwrap())
}

fn port(server: &Server) -> u16 {
    server.port.unwrap()
}

/// The URI of a TCP server's default export for the client certificate
/// directory `certs`, checked against the name localhost.
fn x509_uri(server: &Server, certs: &Path) -> String {
    format!(
        "nbds://localhost:{}/?tls-certificates={}",
        port(server),
        s(certs)
    )
}

/// Whether nbdinfo reads the export at `uri`.
fn connects(uri: &str) -> bool {
    run(client("nbdinfo").arg("--size").arg(uri))
        .status
        .success()
}

/// The SHA-256 of the certificate a server presents after STARTTLS on a
/// TCP port, from a client that trusts anything (the fingerprint is what
/// is compared).
fn served_fingerprint(port: u16) -> String {
    const SCRIPT: &str = r#"
import hashlib, socket, ssl, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def take(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("closed")
        b += c
    return b
assert take(18)[:16] == b"NBDMAGICIHAVEOPT"
s.sendall(struct.pack(">I", 1))
s.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0))
_, _, kind, length = struct.unpack(">QIII", take(20))
take(length)
assert kind == 1, kind
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s)
print(hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest())
"#;
    run_ok(
        Command::new("/usr/bin/python3")
            .args(["-c", SCRIPT])
            .arg(port.to_string()),
    )
    .trim()
    .to_string()
}

/// The SHA-256 of a PEM certificate file, as `served_fingerprint` gives
/// it.
fn file_fingerprint(pem: &Path) -> String {
    run_ok(client("certtool").args(["--fingerprint", "--hash=sha256", "--infile", s(pem)]))
        .trim()
        .replace(':', "")
        .to_lowercase()
}

/// A libnbd client that stays connected, reading on request, so that a
/// test can change the server's credentials under an open connection.
struct HeldClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HeldClient {
    fn connect(uri: &str) -> HeldClient {
        const SCRIPT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
print("connected", flush=True)
for line in sys.stdin:
    print(len(h.pread(4096, 0)), flush=True)
"#;
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", SCRIPT, uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "connected");
        HeldClient {
            child,
            stdin,
            stdout,
        }
    }

    /// Read 4 KiB; true if the connection still serves.
    fn reads(&mut self) -> bool {
        writeln!(self.stdin, "read").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap_or(0) > 0 && line.trim() == "4096"
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- Where the keys are -----------------------------------------------------

#[test]
fn the_server_given_a_psk_directory_reads_keys_psk_there() {
    if missing("", &["qemu-img", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("cred-pskdir");
    let k = dir.path("keys");
    keys_ok(&["psk", "add", s(&k)]);
    let server = Server::start(&["--tls-psk", s(&k), "memory", "1M"]);
    let info = run_ok(client("qemu-img").args([
        "info",
        "--object",
        &format!("tls-creds-psk,id=tls0,endpoint=client,dir={}", s(&k)),
        "--image-opts",
        &format!("driver=nbd,path={},tls-creds=tls0", s(&server.socket)),
    ]));
    assert!(info.contains("virtual size: 1 MiB"), "{info}");
    let uri = format!(
        "nbds+unix://qemu@/?socket={}&tls-psk-file={}",
        s(&server.socket),
        s(&k.join("keys.psk"))
    );
    assert!(connects(&uri));
    assert!(server.stop().success());
}

#[test]
fn systemd_credentials_owned_by_the_service_user_at_0400_serve_psk_and_x509() {
    if !is_root() {
        eprintln!("SKIP: -u and files of another user need root");
        return;
    }
    if missing("", &["nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("cred-systemd");
    let k = dir.path("keys");
    keys_ok(&["psk", "add", s(&k)]);
    let p = pki(&dir, "pki");
    keys_ok(&["client", s(&p), "--name", "backup"]);
    // As systemd lays out LoadCredential= for a service whose user is
    // nobody: a directory of files owned by that user, mode 0400.
    let creds = dir.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    for (from, name) in [
        (k.join("keys.psk"), "keys.psk"),
        (p.join("server/server-cert.pem"), "server-cert.pem"),
        (p.join("server/server-key.pem"), "server-key.pem"),
        (p.join("server/ca-cert.pem"), "ca-cert.pem"),
    ] {
        let to = creds.join(name);
        std::fs::copy(from, &to).unwrap();
        std::os::unix::fs::chown(&to, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    std::os::unix::fs::chown(&creds, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o500)).unwrap();
    // The test's files must be reachable by nobody.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();

    let port = free_port();
    let mut server = Command::new(nbdhost_bin());
    server
        .env("CREDENTIALS_DIRECTORY", &creds)
        .args(["-f", "-u", "nobody", "-g", "nogroup", "-i", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .arg(plugin("memory"))
        .arg("1M")
        .stderr(Stdio::piped());
    let child = server.spawn().unwrap();
    let up = (0..250).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "nbdhost did not listen");
    let psk = format!(
        "nbds://qemu@localhost:{port}/?tls-psk-file={}",
        s(&k.join("keys.psk"))
    );
    let x509 = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        s(&p.join("clients/backup"))
    );
    let plain = format!("nbd://localhost:{port}/");
    let served = [connects(&psk), connects(&x509), connects(&plain)];
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(served, [true, true, false], "{log}");
}

// --- The ownership rule -----------------------------------------------------

#[test]
fn a_key_file_of_another_user_stops_the_server_naming_it() {
    if !is_root() {
        eprintln!("SKIP: a file of another user needs root to make");
        return;
    }
    let dir = TempDir::new("cred-owner");
    let k = dir.path("keys");
    keys_ok(&["psk", "add", s(&k)]);
    let file = k.join("keys.psk");
    std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
    let out = run(Command::new(nbdhost_bin()).args([
        "-f",
        "-U",
        s(&dir.path("sock")),
        "--tls-psk",
        s(&file),
        s(&plugin("memory")),
        "1M",
    ]));
    let text = output_text(&out);
    assert!(!out.status.success());
    assert!(
        text.contains(s(&file)) && text.contains("owned by uid 65534"),
        "{text}"
    );
}

#[test]
fn a_key_file_open_to_other_users_stops_the_server() {
    let dir = TempDir::new("cred-others");
    let p = pki(&dir, "pki");
    let key = p.join("server/server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o602)).unwrap();
    let out = run(Command::new(nbdhost_bin()).args([
        "-f",
        "-U",
        s(&dir.path("sock")),
        "--tls-certificates",
        s(&p.join("server")),
        s(&plugin("memory")),
        "1M",
    ]));
    let text = output_text(&out);
    assert!(!out.status.success());
    assert!(
        text.contains("server-key.pem") && text.contains("chmod o-rwx"),
        "{text}"
    );
}

// --- Certificates that change -----------------------------------------------

#[test]
fn a_revoked_client_is_refused_at_its_next_connection_while_others_read_on() {
    if missing("", &["nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("cred-revoke");
    let p = pki(&dir, "pki");
    for name in ["alice", "bob"] {
        keys_ok(&["client", s(&p), "--name", name]);
    }
    let server = tcp_server(&[
        "-v",
        "--tls-certificates",
        s(&p.join("server")),
        "--tls-verify-peer",
        "memory",
        "1M",
    ]);
    let alice = x509_uri(&server, &p.join("clients/alice"));
    let bob = x509_uri(&server, &p.join("clients/bob"));
    assert!(connects(&alice) && connects(&bob));
    let mut held = HeldClient::connect(&alice);

    keys_ok(&["revoke", s(&p), "--name", "alice"]);
    assert!(!connects(&alice), "{}", server.log_text());
    assert!(connects(&bob));
    // The connection alice opened before is not cut.
    assert!(held.reads());
    let taken = "the certificates changed; new connections use them";
    assert!(server.wait_log(taken, Duration::from_secs(5)).0);
    assert!(server.stop().success());
}

#[test]
fn a_replaced_server_certificate_reaches_new_connections_and_spares_open_ones() {
    if missing("", &["certtool", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("cred-replace");
    let p = pki(&dir, "pki");
    keys_ok(&["client", s(&p), "--name", "backup"]);
    let cert = p.join("server/server-cert.pem");
    let server = tcp_server(&["--tls-certificates", s(&p.join("server")), "memory", "1M"]);
    let uri = x509_uri(&server, &p.join("clients/backup"));
    let before = file_fingerprint(&cert);
    assert_eq!(served_fingerprint(port(&server)), before);
    let mut held = HeldClient::connect(&uri);

    // A new key and certificate, each written by rename.
    keys_ok(&["server", s(&p), "--dns", "localhost", "--force"]);
    let after = file_fingerprint(&cert);
    assert_ne!(before, after);
    assert_eq!(served_fingerprint(port(&server)), after);
    assert!(connects(&uri));
    assert!(held.reads());
    assert!(server.stop().success());
}

#[test]
fn swapping_a_symlink_to_the_certificate_directory_is_noticed() {
    if missing("", &["certtool"]) {
        return;
    }
    let dir = TempDir::new("cred-symlink");
    let first = pki(&dir, "first");
    let second = pki(&dir, "second");
    let link = dir.path("current");
    std::os::unix::fs::symlink(first.join("server"), &link).unwrap();
    let server = tcp_server(&["--tls-certificates", s(&link), "memory", "1M"]);
    let fingerprint = |p: &Path| file_fingerprint(&p.join("server/server-cert.pem"));
    assert_eq!(served_fingerprint(port(&server)), fingerprint(&first));

    let next = dir.path("next");
    std::os::unix::fs::symlink(second.join("server"), &next).unwrap();
    std::fs::rename(&next, &link).unwrap();
    assert_eq!(served_fingerprint(port(&server)), fingerprint(&second));
    assert!(server.stop().success());
}

#[test]
fn a_broken_or_mismatched_new_certificate_keeps_the_old_one_and_says_why() {
    if missing("", &["certtool", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("cred-broken");
    let p = pki(&dir, "pki");
    let other = pki(&dir, "other");
    keys_ok(&["client", s(&p), "--name", "backup"]);
    let cert = p.join("server/server-cert.pem");
    let good = file_fingerprint(&cert);
    let server = tcp_server(&[
        "-v",
        "--tls-certificates",
        s(&p.join("server")),
        "memory",
        "1M",
    ]);
    let uri = x509_uri(&server, &p.join("clients/backup"));

    // A certificate cut short, as an editor's save gone wrong leaves it.
    let pem = std::fs::read_to_string(&cert).unwrap();
    std::fs::write(&cert, &pem[..pem.len() / 2]).unwrap();
    assert_eq!(served_fingerprint(port(&server)), good);
    assert!(connects(&uri));
    let (logged, log) =
        server.wait_log("keeping the previous certificates", Duration::from_secs(5));
    assert!(logged, "{log}");

    // A whole certificate whose key is another's.
    std::fs::copy(other.join("server/server-cert.pem"), &cert).unwrap();
    assert_eq!(served_fingerprint(port(&server)), good);
    assert!(connects(&uri));
    let refusals = server
        .log_text()
        .matches("keeping the previous certificates")
        .count();
    assert_eq!(refusals, 2, "{}", server.log_text());

    // Put right, it is taken.
    std::fs::write(&cert, &pem).unwrap();
    assert_eq!(served_fingerprint(port(&server)), good);
    let taken = "the certificates changed; new connections use them";
    let (logged, log) = server.wait_log(taken, Duration::from_secs(5));
    assert!(logged, "{log}");
    assert!(server.stop().success());
}

// --- Certificates out of date -----------------------------------------------

/// Sign the tool's server key again, with certtool and the tool's CA,
/// for the validity `from`..`until` ("YYYY-MM-DD"): nbdhost-keys itself
/// makes no certificate that is already out of date.
fn resign_server(p: &Path, from: &str, until: &str) {
    let template = p.join("template");
    std::fs::write(
        &template,
        format!(
            "cn = localhost\ndns_name = localhost\ntls_www_server\nsigning_key\nencryption_key\n\
             activation_date = \"{from} 00:00:00 UTC\"\nexpiration_date = \"{until} 00:00:00 UTC\"\n"
        ),
    )
    .unwrap();
    run_ok(client("certtool").args([
        "--generate-certificate",
        "--load-privkey",
        s(&p.join("server/server-key.pem")),
        "--load-ca-certificate",
        s(&p.join("ca-cert.pem")),
        "--load-ca-privkey",
        s(&p.join("ca-key.pem")),
        "--template",
        s(&template),
        "--outfile",
        s(&p.join("server/server-cert.pem")),
    ]));
}

/// nbdhost on a Unix socket with `certs`; its output, once it has exited.
fn refused_start(dir: &TempDir, certs: &Path) -> String {
    let out = run(Command::new(nbdhost_bin()).args([
        "-f",
        "-U",
        s(&dir.path("sock")),
        "--tls-certificates",
        s(certs),
        s(&plugin("memory")),
        "1M",
    ]));
    assert!(!out.status.success());
    output_text(&out)
}

#[test]
fn an_expired_server_certificate_stops_the_server_naming_the_file_and_date() {
    if missing("", &["certtool"]) {
        return;
    }
    let dir = TempDir::new("cred-expired");
    let p = pki(&dir, "pki");
    resign_server(&p, "2020-01-01", "2021-01-01");
    let text = refused_start(&dir, &p.join("server"));
    assert!(
        text.contains("server-cert.pem: the server certificate expired on 2021-01-01T00:00:00Z"),
        "{text}"
    );
}

#[test]
fn a_server_certificate_not_yet_valid_stops_the_server_naming_the_date() {
    if missing("", &["certtool"]) {
        return;
    }
    let dir = TempDir::new("cred-future");
    let p = pki(&dir, "pki");
    resign_server(&p, "2099-01-01", "2100-01-01");
    let text = refused_start(&dir, &p.join("server"));
    assert!(
        text.contains("the server certificate is not valid until 2099-01-01T00:00:00Z"),
        "{text}"
    );
}

#[test]
fn a_certificate_expiring_within_30_days_starts_with_a_warning() {
    let dir = TempDir::new("cred-expiring");
    let p = dir.path("pki");
    keys_ok(&["ca", s(&p)]);
    keys_ok(&["server", s(&p), "--dns", "localhost", "--days", "10"]);
    let server = Server::start(&["--tls-certificates", s(&p.join("server")), "memory", "1M"]);
    // Ten days from its making, less the seconds since. Waited for: the
    // log may reach its file a moment after the socket accepts.
    let (_, log) = server.wait_log("certificate expires on", Duration::from_secs(10));
    assert!(
        log.contains("the server certificate expires on")
            && (log.contains("in 9 day(s)") || log.contains("in 10 day(s)")),
        "{log}"
    );
    assert!(server.stop().success());
}

#[test]
fn a_crl_past_its_next_update_is_still_used_with_a_warning() {
    if missing("", &["certtool", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("cred-stale-crl");
    let p = pki(&dir, "pki");
    for name in ["alice", "bob"] {
        keys_ok(&["client", s(&p), "--name", name]);
    }
    // A CRL revoking alice whose next update was years ago, signed by
    // certtool with the tool's CA (nbdhost-keys makes no stale CRL).
    let template = dir.path("crl.template");
    std::fs::write(
        &template,
        "crl_this_update_date = \"2020-01-01 00:00:00 UTC\"\n\
         crl_next_update_date = \"2021-01-01 00:00:00 UTC\"\ncrl_number = 7\n",
    )
    .unwrap();
    run_ok(client("certtool").args([
        "--generate-crl",
        "--load-ca-privkey",
        s(&p.join("ca-key.pem")),
        "--load-ca-certificate",
        s(&p.join("ca-cert.pem")),
        "--load-certificate",
        s(&p.join("clients/alice/client-cert.pem")),
        "--template",
        s(&template),
        "--outfile",
        s(&p.join("server/ca-crl.pem")),
    ]));
    let server = tcp_server(&[
        "--tls-certificates",
        s(&p.join("server")),
        "--tls-verify-peer",
        "memory",
        "1M",
    ]);
    assert!(server
        .log_text()
        .contains("ca-crl.pem: the CRL's next update was due on 2021-01-01T00:00:00Z"));
    assert!(!connects(&x509_uri(&server, &p.join("clients/alice"))));
    assert!(connects(&x509_uri(&server, &p.join("clients/bob"))));
    assert!(server.stop().success());
}

// --- Captive mode -----------------------------------------------------------

#[test]
fn run_with_tls_required_and_no_credentials_uses_a_one_time_psk_removed_after() {
    if missing("", &["nbdinfo"]) {
        return;
    }
    let default_certs = if is_root() {
        PathBuf::from("/etc/pki/nbdhost/server-cert.pem")
    } else {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".pki/nbdhost/server-cert.pem")
    };
    if default_certs.exists() {
        eprintln!(
            "SKIP: {} exists, so --run uses it instead of a one-time key",
            default_certs.display()
        );
        return;
    }
    let dir = TempDir::new("cred-captive");
    let seen = dir.path("seen");
    // nbdinfo gets the size over TLS; the URI, the key file's path and
    // whether it exists during the run are written down.
    let cmd = format!(
        "PATH=/usr/bin:$PATH; nbdinfo --size \"$uri\" > {seen}/size && echo \"$uri\" > {seen}/uri && echo \"$tls_psk\" > {seen}/psk && test -f \"$tls_psk\" && echo yes > {seen}/existed",
        seen = s(&seen)
    );
    std::fs::create_dir(&seen).unwrap();
    let out = run(Command::new(nbdhost_bin()).args([
        "--tls=require",
        "--run",
        &cmd,
        s(&plugin("memory")),
        "1M",
    ]));
    assert!(out.status.success(), "{}", output_text(&out));
    let read = |name: &str| std::fs::read_to_string(seen.join(name)).unwrap_or_default();
    assert_eq!(read("size").trim(), "1048576");
    assert!(
        read("uri").starts_with("nbds+unix://qemu@/"),
        "{}",
        read("uri")
    );
    assert_eq!(read("existed").trim(), "yes");
    let key = PathBuf::from(read("psk").trim());
    assert!(key.ends_with("keys.psk"), "{}", key.display());
    assert!(!key.exists() && !key.parent().unwrap().exists());
}

#[test]
fn run_as_another_user_reaches_its_private_socket_and_one_time_psk() {
    if !is_root() {
        eprintln!("SKIP: -u needs root");
        return;
    }
    if missing("", &["nbdinfo"]) {
        return;
    }
    // The command runs as the -u user, as the server does once it has
    // dropped root: both the socket's directory and the key's are theirs.
    for tls in [None, Some("--tls=require")] {
        let mut args = vec!["-u", "nobody", "-g", "nogroup"];
        args.extend(tls);
        let memory = plugin("memory");
        args.extend([
            "--run",
            "PATH=/usr/bin:$PATH; nbdinfo --size \"$uri\"",
            memory.to_str().unwrap(),
            "1M",
        ]);
        let out = run(Command::new(nbdhost_bin()).args(&args).current_dir("/"));
        assert!(out.status.success(), "{tls:?}: {}", output_text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    }
}
