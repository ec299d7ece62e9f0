//! nbdhost-keys (tools/keys) makes every key and certificate here; the
//! peers judge them: the server, qemu, libnbd's tools and certtool. The
//! command lines the tool prints are run as printed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use nbdhost_tests::{
    client, free_port, keys, keys_ok, missing, output_text, run, run_ok, Server, TempDir,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The client command lines (qemu-img, qemu-nbd, nbdinfo, nbdcopy) that
/// nbdhost-keys printed.
fn printed_clients(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| {
            ["qemu-img ", "qemu-nbd ", "nbdinfo ", "nbdcopy "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(str::to_owned)
        .collect()
}

/// Run a printed command line as a shell would, in `cwd`.
fn sh(line: &str, cwd: &Path) -> Output {
    run(client("sh").arg("-c").arg(line).current_dir(cwd))
}

/// `nbdhost ARGS` listening on 127.0.0.1 at a free port.
fn tcp_server(args: &[&str]) -> Server {
    let port = free_port();
    let p = port.to_string();
    let mut all = vec!["-p", &p, "-i", "127.0.0.1"];
    all.extend_from_slice(args);
    Server::start_tcp(&all, port)
}

/// A TCP server of a 1 MiB memory disk over TLS with the certificates of
/// the PKI at `p`, requiring and verifying client certificates.
fn verifying_server(p: &Path) -> Server {
    tcp_server(&[
        "--tls=require",
        &format!("--tls-certificates={}", s(&p.join("server"))),
        "--tls-verify-peer",
        "memory",
        "1M",
    ])
}

fn port(s: &Server) -> String {
    s.port.unwrap().to_string()
}

/// The hex keys of a psktool-format file.
fn psk_keys(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| l.split_once(':').unwrap().1.to_owned())
        .collect()
}

// --- PSK ---------------------------------------------------------------

#[test]
fn psk_add_makes_a_psktool_file_that_qemu_nbdinfo_and_nbdcopy_use_as_printed() {
    if missing("", &["qemu-img", "qemu-nbd", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new("keys-psk");
    let kdir = dir.path("keys");
    keys_ok(&["psk", "add", s(&kdir)]);
    let file = kdir.join("keys.psk");
    let server = tcp_server(&[
        "--tls=require",
        &format!("--tls-psk={}", s(&file)),
        "memory",
        "1M",
    ]);
    let out = keys_ok(&[
        "psk",
        "add",
        "--user",
        "rich",
        "--port",
        &port(&server),
        s(&kdir),
    ]);

    // psktool's format: one user:hexkey line each, 256-bit keys.
    let lines = std::fs::read_to_string(&file).unwrap();
    let users: Vec<&str> = lines
        .lines()
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(users, ["qemu", "rich"]);
    for k in psk_keys(&file) {
        assert!(
            k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()),
            "{k}"
        );
    }

    let lines = printed_clients(&out);
    assert_eq!(lines.len(), 4, "{out}");
    for line in &lines {
        let o = sh(line, &dir.0);
        assert!(o.status.success(), "{line}:\n{}", output_text(&o));
    }
    assert_eq!(
        std::fs::metadata(dir.path("disk.img")).unwrap().len(),
        1 << 20
    );
    // And qemu's default user, with no username= at all.
    let info = run_ok(client("qemu-img").args([
        "info",
        "--object",
        &format!("tls-creds-psk,id=tls0,endpoint=client,dir={}", s(&kdir)),
        "--image-opts",
        &format!(
            "driver=nbd,host=localhost,port={},tls-creds=tls0",
            port(&server)
        ),
    ]));
    assert!(info.contains("virtual size: 1 MiB"), "{info}");
    assert!(server.stop().success());
}

#[test]
fn printed_lines_quote_paths_and_user_names_for_the_shell_qemu_and_uris() {
    if missing("", &["qemu-img", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("keys-quote");
    // A space, a comma (qemu's separator), a quote (the shell's) and a
    // percent sign (the URI's escape).
    let kdir = dir.path("a b,c'd%");
    let file = kdir.join("keys.psk");
    keys_ok(&["psk", "add", s(&kdir)]);
    let server = tcp_server(&[
        "--tls=require",
        &format!("--tls-psk={}", s(&file)),
        "memory",
        "1M",
    ]);
    let out = keys_ok(&[
        "psk",
        "add",
        "--user",
        "back up%",
        "--port",
        &port(&server),
        s(&kdir),
    ]);
    let lines = printed_clients(&out);
    let wanted = ["qemu-img ", "nbdinfo "];
    let lines: Vec<&String> = lines
        .iter()
        .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    for line in lines {
        let o = sh(line, &dir.0);
        assert!(o.status.success(), "{line}:\n{}", output_text(&o));
    }
    assert!(server.stop().success());
}

#[test]
fn psk_list_prints_the_user_names_only() {
    let dir = TempDir::new("keys-list");
    let k = dir.path("k");
    for u in ["alice", "bob"] {
        keys_ok(&["psk", "add", "--user", u, s(&k)]);
    }
    assert_eq!(keys_ok(&["psk", "list", s(&k)]), "alice\nbob\n");
    // The file may be named instead of its directory.
    let f = k.join("keys.psk");
    assert_eq!(keys_ok(&["psk", "list", s(&f)]), "alice\nbob\n");
}

#[test]
fn a_removed_psk_user_is_refused_at_the_next_connection() {
    if missing("", &["nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("keys-rm");
    let k = dir.path("k");
    for u in ["alice", "bob"] {
        keys_ok(&["psk", "add", "--user", u, s(&k)]);
    }
    let file = k.join("keys.psk");
    // The clients' own copy, which keeps alice's key.
    let copy = dir.path("client.psk");
    std::fs::copy(&file, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = Server::start(&["--tls=require", "--tls-psk", s(&file), "memory", "1M"]);
    let uri = |user: &str| {
        format!(
            "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
            s(&server.socket),
            s(&copy)
        )
    };
    assert!(run(client("nbdinfo").arg(uri("alice"))).status.success());

    let out = keys_ok(&["psk", "remove", "--user", "alice", s(&k)]);
    assert!(out.contains("alice"), "{out}");
    assert!(!run(client("nbdinfo").arg(uri("alice"))).status.success());
    assert!(run(client("nbdinfo").arg(uri("bob"))).status.success());
    assert_eq!(keys_ok(&["psk", "list", s(&k)]), "bob\n");
    let gone = keys(&["psk", "remove", "--user", "alice", s(&k)]);
    assert!(!gone.status.success() && output_text(&gone).contains("no user \"alice\""));
    assert!(server.stop().success());
}

#[test]
fn psk_user_names_with_a_colon_or_a_line_break_are_refused() {
    let dir = TempDir::new("keys-names");
    let k = dir.path("k");
    for bad in ["a:b", "a\nb", ""] {
        let out = keys(&["psk", "add", "--user", bad, s(&k)]);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            output_text(&out).contains("user name"),
            "{}",
            output_text(&out)
        );
    }
    assert!(!k.join("keys.psk").exists());
}

// --- Safety of what is written ------------------------------------------

/// A CA with a server and a client certificate, all by the tool.
fn pki(dir: &TempDir) -> PathBuf {
    let p = dir.path("pki");
    keys_ok(&["ca", s(&p)]);
    keys_ok(&["server", s(&p), "--dns", "localhost", "--ip", "127.0.0.1"]);
    keys_ok(&["client", s(&p), "--name", "backup"]);
    p
}

#[test]
fn existing_files_and_users_are_kept_without_force() {
    let dir = TempDir::new("keys-force");
    let k = dir.path("k");
    keys_ok(&["psk", "add", s(&k)]);
    let file = k.join("keys.psk");
    let before = std::fs::read(&file).unwrap();
    let out = keys(&["psk", "add", s(&k)]);
    assert!(
        !out.status.success() && output_text(&out).contains("--force"),
        "{}",
        output_text(&out)
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
    keys_ok(&["psk", "add", "--force", s(&k)]);
    assert_ne!(
        std::fs::read(&file).unwrap(),
        before,
        "--force makes a new key"
    );

    let p = pki(&dir);
    let files = [
        p.join("ca-key.pem"),
        p.join("ca-cert.pem"),
        p.join("server/server-key.pem"),
        p.join("server/server-cert.pem"),
        p.join("clients/backup/client-key.pem"),
        p.join("clients/backup/client-cert.pem"),
    ];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for args in [
        vec!["ca", s(&p)],
        vec!["server", s(&p), "--dns", "localhost"],
        vec!["client", s(&p), "--name", "backup"],
    ] {
        let out = keys(&args);
        assert!(!out.status.success(), "{args:?} replaced files");
        assert!(
            output_text(&out).contains("already exist") && output_text(&out).contains("--force")
        );
    }
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(before == after, "a file changed without --force");
    keys_ok(&["client", s(&p), "--name", "backup", "--force"]);
    assert_ne!(std::fs::read(&files[4]).unwrap(), before[4]);
}

#[test]
fn keys_are_0600_and_directories_0700() {
    let dir = TempDir::new("keys-modes");
    let k = dir.path("k");
    keys_ok(&["psk", "add", s(&k)]);
    assert_eq!(mode(&k), 0o700);
    assert_eq!(mode(&k.join("keys.psk")), 0o600);
    let p = pki(&dir);
    for d in [p.clone(), p.join("server"), p.join("clients/backup")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for key in [
        "ca-key.pem",
        "server/server-key.pem",
        "clients/backup/client-key.pem",
    ] {
        assert_eq!(mode(&p.join(key)), 0o600, "{key}");
    }
    for cert in [
        "ca-cert.pem",
        "server/server-cert.pem",
        "clients/backup/client-cert.pem",
    ] {
        assert_eq!(mode(&p.join(cert)), 0o644, "{cert}");
    }
    // Nothing but the CA's own directory holds the CA's key.
    assert!(!p.join("server/ca-key.pem").exists() && !p.join("clients/backup/ca-key.pem").exists());
    // And the server's directory holds only what the server needs.
    let mut server: Vec<String> = std::fs::read_dir(p.join("server"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    server.sort();
    assert_eq!(server, ["ca-cert.pem", "server-cert.pem", "server-key.pem"]);
}

#[test]
fn keys_are_never_printed() {
    let dir = TempDir::new("keys-secret");
    let k = dir.path("k");
    let pw = dir.path("pw");
    std::fs::write(&pw, "a passphrase\n").unwrap();
    let p = dir.path("pki");
    let mut outputs = Vec::new();
    let runs: Vec<Vec<&str>> = vec![
        vec!["psk", "add", s(&k)],
        vec!["psk", "add", "--user", "rich", s(&k)],
        vec!["psk", "add", s(&k)],
        vec!["psk", "add", "--force", s(&k)],
        vec!["psk", "list", s(&k)],
        vec!["psk", "remove", "--user", "rich", s(&k)],
        vec!["ca", s(&p), "--passphrase-file", s(&pw)],
        vec!["server", s(&p), "--dns", "localhost"],
        vec![
            "server",
            s(&p),
            "--dns",
            "localhost",
            "--passphrase-file",
            s(&pw),
        ],
        vec!["client", s(&p), "--name", "c", "--passphrase-file", s(&pw)],
        vec!["revoke", s(&p), "--name", "c", "--passphrase-file", s(&pw)],
    ];
    for args in &runs {
        outputs.push(output_text(&keys(args)));
    }
    let all = outputs.join("\n");
    let mut secrets = psk_keys(&k.join("keys.psk"));
    secrets.push("a passphrase".into());
    for key in [
        "ca-key.pem",
        "server/server-key.pem",
        "clients/c/client-key.pem",
    ] {
        let pem = std::fs::read_to_string(p.join(key)).unwrap();
        secrets.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned),
        );
    }
    assert!(secrets.len() > 6);
    for secret in secrets {
        assert!(!all.contains(&secret), "a key was printed:\n{all}");
    }
}

// --- X.509 ----------------------------------------------------------------

#[test]
fn certtool_verifies_the_server_and_client_chains() {
    if missing("", &["certtool"]) {
        return;
    }
    let dir = TempDir::new("keys-chain");
    let p = pki(&dir);
    for (cert, host) in [
        ("server/server-cert.pem", Some("localhost")),
        ("server/server-cert.pem", Some("127.0.0.1")),
        ("clients/backup/client-cert.pem", None),
    ] {
        let mut c = client("certtool");
        c.args([
            "--verify",
            "--load-ca-certificate",
            s(&p.join("ca-cert.pem")),
        ]);
        c.args(["--infile", s(&p.join(cert))]);
        if let Some(h) = host {
            c.arg(format!("--verify-hostname={h}"));
        }
        let o = run(&mut c);
        assert!(
            o.status.success() && output_text(&o).contains("Verified"),
            "{cert}: {}",
            output_text(&o)
        );
    }
    // The copies of the CA certificate are the CA certificate.
    let ca = std::fs::read(p.join("ca-cert.pem")).unwrap();
    for copy in ["server/ca-cert.pem", "clients/backup/ca-cert.pem"] {
        assert!(std::fs::read(p.join(copy)).unwrap() == ca, "{copy}");
    }
    let info = run_ok(client("certtool").args([
        "-i",
        "--infile",
        s(&p.join("clients/backup/client-cert.pem")),
    ]));
    assert!(
        info.contains("Subject: CN=backup") && info.contains("TLS WWW Client"),
        "{info}"
    );
    let info = run_ok(client("certtool").args(["-i", "--infile", s(&p.join("ca-cert.pem"))]));
    assert!(
        info.contains("Certificate Authority (CA): TRUE") && info.contains("CRL signing"),
        "{info}"
    );
}

#[test]
fn qemu_checks_the_server_by_its_dns_name_and_ip_and_reads_the_export() {
    if missing("", &["qemu-img"]) {
        return;
    }
    let dir = TempDir::new("keys-qemu");
    let p = pki(&dir);
    let server = verifying_server(&p);
    let qemu = |host: &str, extra: &str| {
        run(client("qemu-img").args([
            "info",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=client,verify-peer=on,dir={}",
                s(&p.join("clients/backup"))
            ),
            "--image-opts",
            &format!(
                "driver=nbd,host={host},port={},tls-creds=tls0{extra}",
                port(&server)
            ),
        ]))
    };
    for host in ["localhost", "127.0.0.1"] {
        let o = qemu(host, "");
        assert!(
            o.status.success() && output_text(&o).contains("virtual size: 1 MiB"),
            "{host}: {}",
            output_text(&o)
        );
    }
    // A name the certificate does not carry is refused: the name is checked.
    let o = qemu("127.0.0.1", ",tls-hostname=elsewhere.example");
    assert!(
        !o.status.success() && output_text(&o).contains("does not match the hostname"),
        "{}",
        output_text(&o)
    );
    assert!(server.stop().success());
}

#[test]
fn printed_x509_client_lines_work_as_printed() {
    if missing("", &["qemu-img", "qemu-nbd", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new("keys-x509-lines");
    let p = dir.path("pki");
    keys_ok(&["ca", s(&p)]);
    let out = keys_ok(&["server", s(&p), "--dns", "localhost"]);
    assert!(
        out.contains(&format!("--tls-certificates={}", s(&p.join("server")))),
        "{out}"
    );
    let server = verifying_server(&p);
    // The host comes from the server certificate's name.
    let out = keys_ok(&[
        "client",
        s(&p),
        "--name",
        "backup",
        "--port",
        &port(&server),
    ]);
    assert!(
        out.contains("nbd_tls_x509_cert_dir") && out.contains("allow-dn = [\"CN=backup\"]"),
        "{out}"
    );
    let lines = printed_clients(&out);
    assert_eq!(lines.len(), 4, "{out}");
    for line in &lines {
        assert!(line.contains("localhost"), "{line}");
        let o = sh(line, &dir.0);
        assert!(o.status.success(), "{line}:\n{}", output_text(&o));
    }
    assert_eq!(
        std::fs::metadata(dir.path("disk.img")).unwrap().len(),
        1 << 20
    );
    assert!(server.stop().success());
}

#[test]
fn with_verify_peer_a_client_without_a_certificate_is_refused() {
    if missing("", &["nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("keys-nocert");
    let p = pki(&dir);
    let server = verifying_server(&p);
    // Trusts the server, but has no certificate of its own.
    let anon = dir.path("anon");
    std::fs::create_dir(&anon).unwrap();
    std::fs::copy(p.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    let uri = |d: &Path| {
        format!(
            "nbds://localhost:{}/?tls-certificates={}",
            port(&server),
            s(d)
        )
    };
    assert!(!run(client("nbdinfo").arg(uri(&anon))).status.success());
    let (seen, log) = server.wait_log("Certificate is required", std::time::Duration::from_secs(5));
    assert!(seen, "{log}");
    assert!(run(client("nbdinfo").arg(uri(&p.join("clients/backup"))))
        .status
        .success());
    assert!(server.stop().success());
}

#[test]
fn an_encrypted_ca_key_signs_with_its_passphrase_and_fails_clearly_without() {
    if missing("", &["certtool"]) {
        return;
    }
    let dir = TempDir::new("keys-pass");
    let p = dir.path("pki");
    let pw = dir.path("pw");
    std::fs::write(&pw, "correct horse\n").unwrap();
    keys_ok(&["ca", s(&p), "--passphrase-file", s(&pw)]);
    let key = p.join("ca-key.pem");
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    // GnuTLS reads it with the passphrase, and not without.
    let k =
        |pass: &str| run(client("certtool").args(["-k", "--infile", s(&key), "--password", pass]));
    assert!(
        k("correct horse").status.success(),
        "{}",
        output_text(&k("correct horse"))
    );
    assert!(!k("wrong").status.success());

    let out = keys(&["client", s(&p), "--name", "c"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("is encrypted: give its passphrase with --passphrase-file"),
        "{}",
        output_text(&out)
    );
    let bad = dir.path("bad");
    std::fs::write(&bad, "correct horse battery").unwrap();
    let out = keys(&["client", s(&p), "--name", "c", "--passphrase-file", s(&bad)]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("cannot decrypt"),
        "{}",
        output_text(&out)
    );
    assert!(
        !p.join("clients/c").exists(),
        "nothing issued without the key"
    );

    keys_ok(&["client", s(&p), "--name", "c", "--passphrase-file", s(&pw)]);
    let o = run(client("certtool").args([
        "--verify",
        "--load-ca-certificate",
        s(&p.join("ca-cert.pem")),
        "--infile",
        s(&p.join("clients/c/client-cert.pem")),
    ]));
    assert!(o.status.success(), "{}", output_text(&o));
}

/// The serial number certtool reads from a certificate, in its hex.
fn serial_of(cert: &Path) -> String {
    let info = run_ok(client("certtool").args(["-i", "--infile", s(cert)]));
    info.lines()
        .find_map(|l| l.trim().strip_prefix("Serial Number (hex): "))
        .expect("a serial number")
        .to_owned()
}

#[test]
fn revoke_writes_a_crl_that_certtool_reads_and_that_lists_the_serial() {
    if missing("", &["certtool"]) {
        return;
    }
    let dir = TempDir::new("keys-crl");
    let p = pki(&dir);
    keys_ok(&["client", s(&p), "--name", "other"]);
    let cert = p.join("clients/backup/client-cert.pem");
    let serial = serial_of(&cert);
    assert!(serial.len() >= 16, "at least 64 bits: {serial}");
    let out = keys_ok(&["revoke", s(&p), "--name", "backup"]);
    assert!(
        out.contains("Revoked 1 certificate of client backup"),
        "{out}"
    );

    let crl = p.join("ca-crl.pem");
    let info = run_ok(client("certtool").args(["--crl-info", "--infile", s(&crl)]));
    assert!(
        info.contains(&format!("Serial Number (hex): {serial}")),
        "{info}"
    );
    assert!(!info.contains(&serial_of(&p.join("clients/other/client-cert.pem"))));
    assert!(std::fs::read(&crl).unwrap() == std::fs::read(p.join("server/ca-crl.pem")).unwrap());
    let o = run(client("certtool").args([
        "--verify-crl",
        "--load-ca-certificate",
        s(&p.join("ca-cert.pem")),
        "--infile",
        s(&crl),
    ]));
    assert!(
        o.status.success(),
        "the CA's signature: {}",
        output_text(&o)
    );

    let verify = |c: &Path| {
        output_text(&run(client("certtool").args([
            "--verify",
            "--load-ca-certificate",
            s(&p.join("ca-cert.pem")),
            "--load-crl",
            s(&crl),
            "--infile",
            s(c),
        ])))
    };
    assert!(verify(&cert).contains("revoked"), "{}", verify(&cert));
    let other = verify(&p.join("clients/other/client-cert.pem"));
    assert!(
        other.contains("Verified") && !other.contains("revoked"),
        "{other}"
    );

    // Revoked twice: the CRL is only written again.
    let again = keys_ok(&["revoke", s(&p), "--name", "backup"]);
    assert!(again.contains("revoked already"), "{again}");
    let none = keys(&["revoke", s(&p), "--name", "stranger"]);
    assert!(!none.status.success() && output_text(&none).contains("no client certificate named"));
}

/// The CRL `revoke` writes into the server's directory is the one a
/// server started afterwards checks clients against (a running server
/// takes it at the next connection: tls_credentials.rs).
#[test]
fn a_server_started_after_revoke_refuses_the_revoked_client() {
    if missing("", &["nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("keys-revoked");
    let p = pki(&dir);
    keys_ok(&["client", s(&p), "--name", "other"]);
    keys_ok(&["revoke", s(&p), "--name", "backup"]);
    let server = verifying_server(&p);
    let uri = |name: &str| {
        format!(
            "nbds://localhost:{}/?tls-certificates={}",
            port(&server),
            s(&p.join("clients").join(name))
        )
    };
    assert!(!run(client("nbdinfo").arg(uri("backup"))).status.success());
    let (seen, log) = server.wait_log("revoked", std::time::Duration::from_secs(5));
    assert!(seen, "{log}");
    assert!(run(client("nbdinfo").arg(uri("other"))).status.success());
    assert!(server.stop().success());
}
