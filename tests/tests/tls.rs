//! TLS with real clients: PSK (psktool keys) and X.509 (certtool
//! certificates), with qemu-img/qemu-io, nbdinfo, nbdcopy and nbdsh; and
//! the failures that must be clean: plain clients against a TLS-only
//! server, wrong keys, unknown users, foreign and revoked certificates.
//! After each failure the server goes on serving good clients, and no key
//! ever reaches its log.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use nbdhost_tests::tls::{psk_file, Pki};
use nbdhost_tests::{
    client, export_size, free_port, nbdhost_bin, pattern, run, run_ok, Server, TempDir,
};

fn psk_uri(s: &Server, user: &str, file: &Path) -> String {
    format!(
        "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
        s.socket.display(),
        file.display()
    )
}

#[test]
fn psk_with_qemu_nbdinfo_nbdcopy_and_nbdsh() {
    let dir = TempDir::new("psk");
    let keys = psk_file(&dir, &["rich", "qemu"]);
    let s = Server::start(&["--tls-psk", keys.to_str().unwrap(), "memory", "8M"]);
    let keydir = keys.parent().unwrap().to_str().unwrap().to_string();

    // The issue's own example: a named user.
    let info = run_ok(client("qemu-img").args([
        "info",
        "--object",
        &format!("tls-creds-psk,id=tls0,endpoint=client,username=rich,dir={keydir}"),
        "--image-opts",
        &format!(
            "file.driver=nbd,file.path={},file.tls-creds=tls0",
            s.socket.display()
        ),
    ]));
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    // qemu's default user is "qemu".
    run_ok(client("qemu-io").args([
        "--object",
        &format!("tls-creds-psk,id=tls0,endpoint=client,dir={keydir}"),
        "--image-opts",
        "-c",
        "write -P 0x3c 1M 2M",
        "-c",
        "read -P 0x3c 1M 2M",
        &format!("driver=nbd,path={},tls-creds=tls0", s.socket.display()),
    ]));
    let uri = psk_uri(&s, "rich", &keys);
    let info = run_ok(client("nbdinfo").arg(&uri));
    assert!(info.contains("with TLS"), "{info}");
    let src = dir.path("src.img");
    let data = pattern(8 << 20, 5);
    std::fs::write(&src, &data).unwrap();
    run_ok(client("nbdcopy").arg(&src).arg(&uri));
    let back = dir.path("back.img");
    run_ok(client("nbdcopy").arg(&uri).arg(&back));
    assert!(std::fs::read(&back).unwrap() == data);
    let out = run_ok(
        client("nbdsh").args(
            [
                "-c",
                "h.set_uri_allow_local_file(True)",
                "-u",
                &uri,
                "-c",
                "print(h.get_tls_negotiated(), h.pread(4, 0) == bytes(%r)[:4])",
            ]
            .map(|a| a.replace("%r", &format!("{:?}", &data[..4]))),
        ),
    );
    assert_eq!(out.trim(), "True True");
    assert!(s.stop().success());
}

#[test]
fn plain_clients_see_nothing_when_tls_is_required() {
    let dir = TempDir::new("reqd");
    let keys = psk_file(&dir, &["rich"]);
    let s = Server::start(&[
        "-e",
        "secret-name",
        "--tls-psk",
        keys.to_str().unwrap(),
        "memory",
        "8M",
    ]);
    let plain = s.uri();
    let out = run(client("nbdinfo").arg(&plain));
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("8388608") && !text.contains("8M"),
        "size leaked: {text}"
    );
    let out = run(client("nbdinfo").arg("--list").arg(&plain));
    assert!(!out.status.success());
    // With --tls=on the same plain client is served.
    drop(s);
    let s = Server::start(&[
        "--tls=on",
        "--tls-psk",
        keys.to_str().unwrap(),
        "memory",
        "8M",
    ]);
    assert_eq!(export_size(&s.uri()), "8388608");
    assert_eq!(export_size(&psk_uri(&s, "rich", &keys)), "8388608");
    assert!(s.stop().success());
}

#[test]
fn wrong_key_and_unknown_user_fail_cleanly_and_keys_stay_secret() {
    let dir = TempDir::new("badpsk");
    let keys = psk_file(&dir, &["rich"]);
    let s = Server::start(&["--tls-psk", keys.to_str().unwrap(), "memory", "1M"]);
    let other = TempDir::new("badpsk2");
    let wrong = psk_file(&other, &["rich", "eve"]);
    assert!(!run(client("nbdinfo").arg(psk_uri(&s, "rich", &wrong)))
        .status
        .success());
    assert!(!run(client("nbdinfo").arg(psk_uri(&s, "eve", &wrong)))
        .status
        .success());
    // The server goes on.
    assert_eq!(export_size(&psk_uri(&s, "rich", &keys)), "1048576");
    let log = s.log_text();
    assert!(
        log.contains("TLS handshake") && log.contains("failed"),
        "{log}"
    );
    for f in [&keys, &wrong] {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let key = line.split(':').nth(1).unwrap();
            assert!(!log.contains(key), "a key reached the log");
        }
    }
    // A user added to the file works at once, without a restart.
    run_ok(client("psktool").args(["-u", "newbie", "-p"]).arg(&keys));
    assert_eq!(export_size(&psk_uri(&s, "newbie", &keys)), "1048576");
    assert!(s.stop().success());
}

#[test]
fn the_oldstyle_protocol_is_refused_when_tls_is_required() {
    let dir = TempDir::new("oldtls");
    let keys = psk_file(&dir, &["rich"]);
    let out = run(Command::new(nbdhost_bin()).args([
        "-f",
        "-o",
        "--tls-psk",
        keys.to_str().unwrap(),
        "memory",
        "1M",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("oldstyle") && err.contains("TLS"), "{err}");
}

/// After `-u` the PSK file is read as that user, for every handshake:
/// while it may read the file, PSK clients are served; once it may not,
/// they are refused (nbdhost(1) says so under `-u`).
#[test]
fn the_psk_file_is_read_again_as_the_user_dash_u_names() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: -u needs root");
        return;
    }
    let dir = TempDir::new("psk-user");
    let keys = psk_file(&dir, &["alice"]);
    let nobody = |p: &Path| std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    nobody(keys.parent().unwrap());
    nobody(&keys);
    let s = Server::start(&[
        "-u",
        "nobody",
        "-g",
        "nogroup",
        "--tls-psk",
        keys.to_str().unwrap(),
        "memory",
        "1M",
    ]);
    let uri = psk_uri(&s, "alice", &keys);
    assert_eq!(
        run_ok(client("nbdinfo").arg("--size").arg(&uri)).trim(),
        "1048576"
    );
    std::os::unix::fs::chown(&keys, Some(0), Some(0)).unwrap();
    assert!(!run(client("nbdinfo").arg("--size").arg(&uri))
        .status
        .success());
    nobody(&keys);
    assert_eq!(
        run_ok(client("nbdinfo").arg("--size").arg(&uri)).trim(),
        "1048576"
    );
    assert!(s.stop().success());
}

#[test]
fn readable_key_files_are_refused() {
    let dir = TempDir::new("perm");
    let keys = psk_file(&dir, &["rich"]);
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(Command::new(nbdhost_bin()).args([
        "-f",
        "--tls-psk",
        keys.to_str().unwrap(),
        "memory",
        "1M",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by other users") && err.contains("keys.psk"),
        "{err}"
    );
    let key = std::fs::read_to_string(&keys).unwrap();
    assert!(!err.contains(key.split(':').nth(1).unwrap().trim()));
}

#[test]
fn x509_with_and_without_client_verification() {
    let dir = TempDir::new("x509");
    let ca = Pki::ca(&dir.path("ca"), "nbdhost test CA");
    let server = dir.path("server");
    ca.issue(&server, "server", "localhost", false);
    let good = dir.path("client");
    ca.issue(&good, "client", "good client", true);
    let foreign_ca = Pki::ca(&dir.path("ca2"), "someone else");
    let foreign = dir.path("foreign");
    foreign_ca.issue(&foreign, "client", "intruder", true);
    // Clients trust our CA even when their own certificate is foreign.
    std::fs::copy(ca.dir.join("ca-cert.pem"), foreign.join("ca-cert.pem")).unwrap();

    let qemu = |s: &Server, creds: &Path| {
        run(client("qemu-io").args([
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                creds.display()
            ),
            "--image-opts",
            "-c",
            "write -P 7 0 64k",
            "-c",
            "read -P 7 0 64k",
            &format!(
                "driver=nbd,host=localhost,port={},tls-creds=tls0",
                s_port(s)
            ),
        ]))
    };

    // Without verification: any client that trusts the server.
    let port = free_port();
    let s = Server::start_tcp(
        &[
            "-p",
            &port.to_string(),
            "-i",
            "127.0.0.1",
            "--tls-certificates",
            server.to_str().unwrap(),
            "memory",
            "4M",
        ],
        port,
    );
    let out = qemu(&s, &good);
    assert!(out.status.success(), "{out:?}");
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        good.display()
    );
    assert!(run_ok(client("nbdinfo").arg(&uri)).contains("with TLS"));
    drop(s);

    // With verification: our client passes, a foreign one does not.
    let port = free_port();
    let s = Server::start_tcp(
        &[
            "-p",
            &port.to_string(),
            "-i",
            "127.0.0.1",
            "--tls-certificates",
            server.to_str().unwrap(),
            "--tls-verify-peer",
            "memory",
            "4M",
        ],
        port,
    );
    let out = qemu(&s, &good);
    assert!(out.status.success(), "{out:?}");
    // qemu will not even load a certificate its CA file did not sign, so
    // the intruder uses libnbd, which lets the server decide.
    let intruder = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        foreign.display()
    );
    assert!(!run(client("nbdinfo").arg(&intruder)).status.success());
    let log = s.log_text();
    assert!(
        log.contains("issuer unknown") || log.contains("Certificate is required"),
        "{log}"
    );
    let out = qemu(&s, &good);
    assert!(
        out.status.success(),
        "the server goes on after a rejected client"
    );
    drop(s);

    // A revoked client certificate is refused once the CRL is in place.
    ca.revoke(&good.join("client-cert.pem"), &server);
    let port = free_port();
    let s = Server::start_tcp(
        &[
            "-p",
            &port.to_string(),
            "-i",
            "127.0.0.1",
            "--tls-certificates",
            server.to_str().unwrap(),
            "--tls-verify-peer",
            "memory",
            "4M",
        ],
        port,
    );
    let revoked = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        good.display()
    );
    assert!(!run(client("nbdinfo").arg(&revoked)).status.success());
    assert!(s.log_text().contains("revoked"), "{}", s.log_text());
    assert!(s.stop().success());
}

fn s_port(s: &Server) -> u16 {
    s.port.expect("a TCP server")
}

#[test]
fn tls_1_2_and_1_3_and_captive_modes() {
    let dir = TempDir::new("vers");
    let keys = psk_file(&dir, &["rich"]);
    let k = keys.to_str().unwrap();
    for (prio, want) in [
        (
            "NORMAL:-VERS-ALL:+VERS-TLS1.2:+PSK:+ECDHE-PSK:+DHE-PSK",
            "TLS1.2",
        ),
        ("NORMAL:+PSK:+ECDHE-PSK:+DHE-PSK", "TLS1.3"),
    ] {
        let s = Server::start(&["-v", "--tls-psk", k, "--tls-priority", prio, "memory", "1M"]);
        assert_eq!(export_size(&psk_uri(&s, "rich", &keys)), "1048576");
        // "TLS1.3 AES-256-GCM established with rich": version and cipher.
        let log = s.log_text();
        let line = log.lines().find(|l| l.contains("established with rich"));
        assert!(
            line.is_some_and(|l| l.contains(&format!(": {want} "))),
            "{log}"
        );
        assert!(s.stop().success());
    }
    // --run with a private socket: $uri carries everything libnbd needs.
    let cmd = "[ \"$tls\" = 2 ] && [ \"$tls_psk\" = \"$k\" ] && nbdinfo --size \"$uri\"";
    let out = run_ok(
        Command::new(nbdhost_bin())
            .args(["--tls-psk", k, "memory", "2M", "--run", cmd])
            .env("k", k)
            .env(
                "PATH",
                format!("/usr/bin:{}", std::env::var("PATH").unwrap()),
            ),
    );
    assert_eq!(out.trim(), "2097152");
    // Socket activation by libnbd.
    let uri = format!("nbds+unix://rich@/?tls-psk-file={k}");
    let out = run(client("nbdinfo")
        .args(["--size", &uri, "--", "["])
        .arg(nbdhost_bin())
        .args(["--tls-psk", k, "memory", "3M", "]"]));
    // libnbd 1.14 may not combine a URI with a server command; if it
    // refuses the combination, the other modes above still prove TLS.
    if out.status.success() {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3145728");
    }
}

#[test]
fn plugins_see_tls_identity_and_can_refuse_by_it() {
    let dir = TempDir::new("ident");
    let keys = psk_file(&dir, &["rich", "eve"]);
    let p = nbdhost_tests::plugin("test");
    let s = Server::start(&[
        "--tls=on",
        "--tls-psk",
        keys.to_str().unwrap(),
        p.to_str().unwrap(),
        "require-user=rich",
    ]);
    assert_eq!(export_size(&psk_uri(&s, "rich", &keys)), "1048576");
    let eve = run(client("nbdinfo").arg(psk_uri(&s, "eve", &keys)));
    assert!(!eve.status.success());
    let plain = run(client("nbdinfo").arg(s.uri()));
    assert!(!plain.status.success());
    let log = s.log_text();
    assert!(
        log.contains("refusing eve (tls: true)") && log.contains("refusing anonymous (tls: false)"),
        "{log}"
    );
    assert!(s.stop().success());
}

/// A TLS client that misbehaves on purpose: GnuTLS through Python's ctypes
/// negotiates STARTTLS in clear, completes a TLS 1.2 PSK handshake, then
/// does what `argv[4]` says: `renegotiate` (a second handshake), `garbage`
/// (a forged application-data record), or `clear` (plain NBD bytes inside
/// TLS); or, for `handshake`, only tries the handshake. It prints the
/// GnuTLS result of the last step and what the server did next.
const ROGUE_TLS: &str = r#"
import ctypes, os, socket, struct, sys
path, user, key, deed = sys.argv[1:5]
g = ctypes.CDLL("libgnutls.so.30")
class Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.c_char_p), ("size", ctypes.c_uint)]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.settimeout(10)
assert len(s.recv(18)) == 18
s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 5, 0))
assert len(s.recv(20)) == 20
g.gnutls_global_init()
sess = ctypes.c_void_p()
assert g.gnutls_init(ctypes.byref(sess), 2) == 0
cred = ctypes.c_void_p()
g.gnutls_psk_allocate_client_credentials(ctypes.byref(cred))
d = Datum(key.encode(), len(key))
assert g.gnutls_psk_set_client_credentials(cred, user.encode(), ctypes.byref(d), 1) == 0
g.gnutls_credentials_set(sess, 4, cred)
err = ctypes.c_char_p()
assert g.gnutls_priority_set_direct(sess, b"NORMAL:-VERS-ALL:+VERS-TLS1.2:+PSK:+ECDHE-PSK:+DHE-PSK", ctypes.byref(err)) == 0
# GnuTLS uses the descriptor itself: blocking, not Python's timeouts.
s.settimeout(None)
g.gnutls_transport_set_int2(sess, s.fileno(), s.fileno())
r = g.gnutls_handshake(sess)
if deed == "handshake":
    pass
elif r != 0:
    sys.exit("handshake: %d" % r)
elif deed == "renegotiate":
    r = g.gnutls_handshake(sess)
elif deed == "garbage":
    r = s.send(bytes([23, 3, 3, 0, 64]) + os.urandom(64))
else:
    r = s.send(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 3, 0))
s.settimeout(10)
try:
    rest = s.recv(4096)
    while rest:
        rest = s.recv(4096)
    after = "closed"
except socket.timeout:
    after = "still open"
except OSError as e:
    after = "reset"
print(r, after)
"#;

/// Run the rogue client, as PSK user "rich" unless `user` says otherwise,
/// against a TLS-only server; returns its output and the server's log,
/// after checking that a good client is served after it.
fn rogue(deed: &str, user: Option<&str>) -> (String, String) {
    let dir = TempDir::new("rogue");
    let keys = psk_file(&dir, &["rich"]);
    let key = std::fs::read_to_string(&keys).unwrap();
    let hex = key.trim().split_once(':').unwrap().1.to_string();
    let s = Server::start(&["--tls-psk", keys.to_str().unwrap(), "memory", "1M"]);
    let out = run(client("python3").args([
        "-c",
        ROGUE_TLS,
        s.socket.to_str().unwrap(),
        user.unwrap_or("rich"),
        &hex,
        deed,
    ]));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(export_size(&psk_uri(&s, "rich", &keys)), "1048576");
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    assert!(!log.contains(&hex), "the key reached the log");
    (said, log)
}

#[test]
fn renegotiation_inside_tls_closes_only_that_connection() {
    let (said, log) = rogue("renegotiate", None);
    assert!(said.trim_end().ends_with("closed"), "{said}");
    assert!(log.contains("TLS"), "{log}");
}

#[test]
fn a_forged_record_inside_tls_closes_only_that_connection() {
    let (said, log) = rogue("garbage", None);
    assert!(said.trim_end().ends_with("closed"), "{said}");
    assert!(log.contains("TLS"), "{log}");
}

#[test]
fn clear_text_inside_tls_closes_only_that_connection() {
    let (said, _) = rogue("clear", None);
    assert!(said.trim_end().ends_with("closed"), "{said}");
}

#[test]
fn garbage_instead_of_a_tls_handshake_closes_only_that_connection() {
    let dir = TempDir::new("tlsgarbage");
    let keys = psk_file(&dir, &["rich"]);
    let s = Server::start(&["--tls-psk", keys.to_str().unwrap(), "memory", "1M"]);
    let mut c = nbdhost_tests::raw::RawClient::connect(&s.socket);
    c.expect_opt(
        nbdhost_tests::raw::OPT_STARTTLS,
        &[],
        nbdhost_tests::raw::REP_ACK,
    );
    c.send(&pattern(300, 9));
    assert!(c.wait_closed().len() < 64, "at most an alert comes back");
    assert_eq!(export_size(&psk_uri(&s, "rich", &keys)), "1048576");
    let (st, log) = s.stop_with_log();
    assert!(st.success() && log.contains("TLS handshake"), "{log}");
}

#[test]
fn control_characters_in_a_psk_user_name_are_escaped_in_the_log() {
    // libnbd refuses a user name missing from its own key file, so the
    // rogue client sends it.
    let (said, log) = rogue("handshake", Some("bad\nnbdhost: error: forged\x1b[31m"));
    assert!(said.trim_end().ends_with("closed"), "{said}");
    assert!(
        log.contains("bad\\nnbdhost: error: forged\\u{1b}[31m"),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("nbdhost: error: forged")),
        "{log}"
    );
    assert!(!log.contains('\x1b'), "{log}");
}
