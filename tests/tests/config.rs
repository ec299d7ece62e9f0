//! `nbdhost --config FILE`: several exports from one TOML file, each with
//! its own chain, TLS policy and users, served over TCP and a Unix socket
//! at once; reloaded on SIGHUP; and every mistake in the file reported
//! with its file, line and key. Clients: nbdinfo, qemu-img, qemu-io,
//! cryptsetup for the LUKS volume and psktool for the keys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nbdhost_tests::tls::{psk_file, Pki};
use nbdhost_tests::{
    client, free_port, nbdhost_bin, pattern, qemu_io, run, run_ok, Server, TempDir,
};

/// A file of `len` bytes of a pattern seeded with `seed`.
fn image(dir: &TempDir, name: &str, len: usize, seed: u64) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, pattern(len, seed)).unwrap();
    p
}

/// Write `text` as the configuration file.
fn config(dir: &TempDir, text: &str) -> PathBuf {
    let p = dir.path("nbdhost.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

fn psk_uri(socket: &Path, export: &str, user: &str, keys: &Path) -> String {
    format!(
        "nbds+unix://{user}@/{export}?socket={}&tls-psk-file={}",
        socket.display(),
        keys.display()
    )
}

/// The export names `nbdinfo --list` shows at `uri`.
fn listed(uri: &str) -> Vec<String> {
    let out = run_ok(client("nbdinfo").args(["--list", uri]));
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("export=\""))
        .map(|n| n.trim_end_matches("\":").to_string())
        .collect();
    names.sort();
    names
}

fn size(uri: &str) -> String {
    run_ok(client("nbdinfo").args(["--size", uri]))
        .trim()
        .to_string()
}

/// What nbdinfo says when it cannot open `uri`.
fn refusal(uri: &str) -> String {
    let out = run(client("nbdinfo").args(["--size", uri]));
    assert!(!out.status.success(), "{uri} opened");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A LUKS2 volume of `len` bytes made by cryptsetup (with cheap key
/// derivation), and the file holding its passphrase.
fn luks_volume(dir: &TempDir, len: usize, passphrase: &str) -> (PathBuf, PathBuf) {
    let luks = dir.path("secret.img");
    std::fs::write(&luks, vec![0u8; len]).unwrap();
    let pw = dir.path("pw");
    std::fs::write(&pw, passphrase).unwrap();
    run_ok(client("cryptsetup").arg("-q").args([
        "luksFormat",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--iter-time",
        "10",
        "--key-file",
        pw.to_str().unwrap(),
        luks.to_str().unwrap(),
    ]));
    (luks, pw)
}

/// `nbdhost --config FILE --check`: its exit status and what it printed.
fn check(file: &Path) -> (bool, String) {
    let out = run(Command::new(nbdhost_bin())
        .arg("--config")
        .arg(file)
        .arg("--check"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A configuration error: `--check` fails and names the file and the
/// place; returns the message.
fn error_at(dir: &TempDir, text: &str, line: usize) -> String {
    let file = config(dir, text);
    let (ok, out) = check(&file);
    assert!(!ok, "accepted: {out}");
    let place = format!("{}:{line}:", file.display());
    assert!(out.contains(&place), "no {place} in: {out}");
    out
}

#[test]
fn three_exports_are_served_over_tcp_and_a_unix_socket_at_once() {
    let dir = TempDir::new("config");
    let disk = image(&dir, "disk.img", 3 << 20, 1);
    let (luks, pw) = luks_volume(&dir, 32 << 20, "correct horse");
    let socket = dir.path("nbd.sock");
    let port = free_port();
    let file = config(
        &dir,
        &format!(
            r#"
[server]
listen = ["127.0.0.1:{port}", "{socket}"]
threads = 4

[[export]]
name = "disk"
description = "a file"
plugin = "file"
params = {{ file = "{disk}" }}

[[export]]
name = "scratch"
plugin = "memory"
params = {{ size = "5M" }}

[[export]]
name = "secret"
plugin = "file"
params = {{ file = "{luks}" }}
filters = [ {{ filter = "luks", params = {{ passphrase = "+{pw}" }} }} ]
"#,
            socket = socket.display(),
            disk = disk.display(),
            luks = luks.display(),
            pw = pw.display(),
        ),
    );
    let s = Server::start_config(&file, &[], &socket);
    let tcp = format!("nbd://127.0.0.1:{port}/");
    assert_eq!(
        listed(&unix_uri(&socket, "")),
        ["disk", "scratch", "secret"]
    );
    assert_eq!(listed(&tcp), ["disk", "scratch", "secret"]);
    for (export, bytes) in [("disk", "3 MiB"), ("scratch", "5 MiB")] {
        for uri in [unix_uri(&socket, export), format!("{tcp}{export}")] {
            let info = run_ok(client("qemu-img").args(["info", "-f", "raw", &uri]));
            assert!(info.contains(bytes), "{uri}: {info}");
        }
    }
    let info = run_ok(client("nbdinfo").arg(unix_uri(&socket, "disk")));
    assert!(info.contains("description: a file"), "{info}");
    // What is served is the payload after the LUKS2 header.
    let payload: u64 = size(&format!("{tcp}secret")).parse().unwrap();
    assert!(payload > 0 && payload < 32 << 20, "{payload}");
    qemu_io(
        &unix_uri(&socket, "secret"),
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    );
    // Through the filter the bytes are encrypted on disk.
    let raw = std::fs::read(&luks).unwrap();
    assert!(!raw.windows(4096).any(|w| w.iter().all(|&b| b == 0x5a)));
    assert!(s.stop().success());
}

#[test]
fn two_exports_of_one_plugin_keep_their_files_and_data_apart() {
    let dir = TempDir::new("config");
    let a = image(&dir, "a.img", 1 << 20, 11);
    let b = image(&dir, "b.img", 2 << 20, 22);
    let socket = dir.path("nbd.sock");
    let file = config(
        &dir,
        &format!(
            r#"
[server]
listen = ["{socket}"]

[[export]]
name = "a"
plugin = "file"
params = {{ file = "{a}" }}

[[export]]
name = "b"
plugin = "file"
params = {{ file = "{b}" }}

[[export]]
name = "m1"
plugin = "memory"
params = {{ size = "1M" }}

[[export]]
name = "m2"
plugin = "memory"
params = {{ size = "1M" }}
"#,
            socket = socket.display(),
            a = a.display(),
            b = b.display(),
        ),
    );
    let s = Server::start_config(&file, &[], &socket);
    assert_eq!(size(&unix_uri(&socket, "a")), "1048576");
    assert_eq!(size(&unix_uri(&socket, "b")), "2097152");
    let copy = dir.path("b.copy");
    run_ok(
        client("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(unix_uri(&socket, "b"))
            .arg(&copy),
    );
    assert!(std::fs::read(&copy).unwrap() == pattern(2 << 20, 22));
    // Two memory disks from one plugin: each instance has its own pages.
    qemu_io(&unix_uri(&socket, "m1"), &["write -P 0x11 0 4k"]);
    // m2 must not see m1's write.
    qemu_io(&unix_uri(&socket, "m2"), &["read -P 0 0 4k"]);
    qemu_io(&unix_uri(&socket, "m1"), &["read -P 0x11 0 4k"]);
    assert!(s.stop().success());
}

/// Two PSK users, each with an export of their own, a shared TLS export
/// and a plain one.
fn psk_host(dir: &TempDir, socket: &Path, keys: &Path) -> PathBuf {
    config(
        dir,
        &format!(
            r#"
[server]
listen = ["{socket}"]
tls-psk = "{keys}"

[[export]]
name = "alice-disk"
plugin = "memory"
params = {{ size = "1M" }}
allow-psk = ["alice"]

[[export]]
name = "bob-disk"
plugin = "memory"
params = {{ size = "2M" }}
allow-psk = ["bob"]

[[export]]
name = "shared"
plugin = "memory"
params = {{ size = "3M" }}

[[export]]
name = "public"
plugin = "memory"
params = {{ size = "4M" }}
tls = false
"#,
            socket = socket.display(),
            keys = keys.display(),
        ),
    )
}

#[test]
fn each_psk_user_lists_and_opens_only_its_own_exports() {
    let dir = TempDir::new("config");
    let keys = psk_file(&dir, &["alice", "bob"]);
    let socket = dir.path("nbd.sock");
    let s = Server::start_config(&psk_host(&dir, &socket, &keys), &[], &socket);
    assert_eq!(
        listed(&psk_uri(&socket, "", "alice", &keys)),
        ["alice-disk", "public", "shared"]
    );
    assert_eq!(
        listed(&psk_uri(&socket, "", "bob", &keys)),
        ["bob-disk", "public", "shared"]
    );
    assert_eq!(
        size(&psk_uri(&socket, "alice-disk", "alice", &keys)),
        "1048576"
    );
    assert_eq!(size(&psk_uri(&socket, "bob-disk", "bob", &keys)), "2097152");
    // Another user's export answers as a name that does not exist.
    let other = refusal(&psk_uri(&socket, "bob-disk", "alice", &keys));
    let missing = refusal(&psk_uri(&socket, "no-such-disk", "alice", &keys));
    assert!(other.contains("no export named"), "{other}");
    assert_eq!(
        other.replace("bob-disk", "X"),
        missing.replace("no-such-disk", "X"),
        "a hidden export must look missing"
    );
    assert!(s.stop().success());
}

#[test]
fn a_plain_client_sees_only_the_export_that_does_not_need_tls() {
    let dir = TempDir::new("config");
    let keys = psk_file(&dir, &["alice"]);
    let socket = dir.path("nbd.sock");
    let s = Server::start_config(&psk_host(&dir, &socket, &keys), &[], &socket);
    assert_eq!(listed(&unix_uri(&socket, "")), ["public"]);
    assert_eq!(size(&unix_uri(&socket, "public")), "4194304");
    let why = refusal(&unix_uri(&socket, "shared"));
    assert!(why.contains("requires TLS"), "{why}");
    // An export kept for some users is not even confirmed to exist.
    let why = refusal(&unix_uri(&socket, "alice-disk"));
    assert!(why.contains("no export named"), "{why}");
    // With TLS, the same client reaches the TLS export too.
    assert_eq!(size(&psk_uri(&socket, "shared", "alice", &keys)), "3145728");
    assert!(s.stop().success());
}

#[test]
fn the_default_export_is_what_the_empty_name_opens() {
    let dir = TempDir::new("config");
    let socket = dir.path("nbd.sock");
    let file = config(
        &dir,
        &format!(
            r#"
[server]
listen = ["{}"]
default-export = "big"

[[export]]
name = "small"
plugin = "memory"
params = {{ size = "1M" }}

[[export]]
name = "big"
plugin = "memory"
params = {{ size = "7M" }}
"#,
            socket.display()
        ),
    );
    let s = Server::start_config(&file, &[], &socket);
    assert_eq!(size(&unix_uri(&socket, "")), "7340032");
    let info = run_ok(client("qemu-img").args(["info", "-f", "raw", &unix_uri(&socket, "")]));
    assert!(info.contains("7 MiB"), "{info}");
    assert!(s.stop().success());
}

/// A file of one memory export per (name, size).
fn memory_exports(socket: &Path, exports: &[(&str, &str)]) -> String {
    let mut text = format!("[server]\nlisten = [\"{}\"]\n", socket.display());
    for (name, size) in exports {
        text += &format!(
            "\n[[export]]\nname = \"{name}\"\nplugin = \"memory\"\nparams = {{ size = \"{size}\" }}\n"
        );
    }
    text
}

/// Send SIGHUP and wait for the server to report the reload's outcome.
fn reload(s: &Server, dir: &TempDir, text: &str, expect: &str) {
    let before = s.log_text().matches(expect).count();
    config(dir, text);
    s.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.log_text().matches(expect).count() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no '{expect}' after SIGHUP: {}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_adds_changes_and_removes_exports_while_a_client_keeps_reading() {
    let dir = TempDir::new("config");
    let socket = dir.path("nbd.sock");
    let first = memory_exports(
        &socket,
        &[("steady", "64M"), ("changing", "1M"), ("leaving", "1M")],
    );
    let file = config(&dir, &first);
    // -v: the reload is reported at the info level.
    let s = Server::start_config(&file, &["-v"], &socket);
    // A client reading the whole time through every reload.
    let reader = {
        let uri = unix_uri(&socket, "steady");
        std::thread::spawn(move || {
            for _ in 0..8 {
                let out = run(client("qemu-io").args([
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x33 0 32M",
                    "-c",
                    "read -P 0x33 0 32M",
                    &uri,
                ]));
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if !out.status.success() || text.contains("failed") {
                    return Err(text + &String::from_utf8_lossy(&out.stderr));
                }
            }
            Ok(())
        })
    };
    // A connection that stays open on the export about to be removed.
    let held = Command::new("nbdsh")
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap()),
        )
        .args([
            "-u",
            &unix_uri(&socket, "leaving"),
            "-c",
            "import time\ntime.sleep(3)\nprint(h.get_size())\nprint(len(h.pread(4096, 0)))",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let second = memory_exports(
        &socket,
        &[("steady", "64M"), ("changing", "2M"), ("arriving", "3M")],
    );
    reload(&s, &dir, &second, "configuration reloaded");
    assert_eq!(
        listed(&unix_uri(&socket, "")),
        ["arriving", "changing", "steady"]
    );
    assert_eq!(size(&unix_uri(&socket, "changing")), "2097152");
    assert_eq!(size(&unix_uri(&socket, "arriving")), "3145728");
    let gone = refusal(&unix_uri(&socket, "leaving"));
    assert!(gone.contains("no export named"), "{gone}");
    // The connection opened before the reload is still served.
    let out = held.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1048576\n4096\n");
    reader
        .join()
        .unwrap()
        .expect("the reading client saw an error");
    // The unchanged export kept its chain: a new connection sees the data
    // written before the reload.
    qemu_io(&unix_uri(&socket, "steady"), &["read -P 0x33 0 32M"]);
    assert!(s.stop().success());
}

#[test]
fn a_broken_file_on_reload_is_refused_and_the_old_exports_stay() {
    let dir = TempDir::new("config");
    let socket = dir.path("nbd.sock");
    let good = memory_exports(&socket, &[("disk", "1M")]);
    let file = config(&dir, &good);
    let s = Server::start_config(&file, &[], &socket);
    let broken = good.clone() + "\n[[export]]\nname = \"disk\"\nplugin = \"memory\"\n";
    reload(&s, &dir, &broken, "reload refused");
    let log = s.log_text();
    assert!(log.contains(&format!("{}:", file.display())), "{log}");
    assert!(log.contains("export 'disk' is defined twice"), "{log}");
    assert_eq!(size(&unix_uri(&socket, "disk")), "1048576");
    reload(&s, &dir, "[server\n", "reload refused");
    // A descriptor given at start-up is gone by the time of a reload.
    let fd = good.clone()
        + "\n[[export]]\nname = \"late\"\nplugin = \"memory\"\nparams = { size = \"-5\" }\n";
    reload(&s, &dir, &fd, "reads a descriptor");
    assert_eq!(listed(&unix_uri(&socket, "")), ["disk"]);
    assert!(s.stop().success());
}

#[test]
fn check_prints_the_resolved_configuration_with_secrets_masked() {
    let dir = TempDir::new("config");
    let (luks, _) = luks_volume(&dir, 4 << 20, "hunter2-passphrase");
    let file = config(
        &dir,
        &format!(
            r#"
[[export]]
name = "secret"
plugin = "file"
params = {{ file = "{}" }}
filters = [ {{ filter = "luks", params = {{ passphrase = "hunter2-passphrase" }} }} ]
"#,
            luks.display()
        ),
    );
    let (ok, out) = check(&file);
    assert!(ok, "{out}");
    assert!(out.contains("name = \"secret\""), "{out}");
    assert!(out.contains("\"passphrase\" = \"(secret)\""), "{out}");
    assert!(!out.contains("hunter2"), "the passphrase leaked: {out}");
}

#[test]
fn an_unknown_key_is_reported_with_its_file_line_and_name() {
    let dir = TempDir::new("config");
    let out = error_at(
        &dir,
        "[[export]]\nname = \"a\"\nplugin = \"memory\"\nreadnoly = true\n",
        4,
    );
    assert!(out.contains("unknown field 'readnoly'"), "{out}");
    let out = error_at(&dir, "[server]\nthreds = 4\n", 2);
    assert!(out.contains("unknown key 'threds'"), "{out}");
}

#[test]
fn an_option_refused_in_the_file_is_refused_under_its_aliases_too() {
    let dir = TempDir::new("config");
    let out = error_at(&dir, "[server]\nip-addr = \"127.0.0.1\"\n", 2);
    assert!(out.contains("'ip-addr' cannot be set in [server]"), "{out}");
}

#[test]
fn a_bad_listen_address_is_reported_by_check() {
    let dir = TempDir::new("config");
    let out = error_at(
        &dir,
        "[server]\nlisten = [\"nowhere\"]\n\n[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = { size = \"1M\" }\n",
        2,
    );
    assert!(out.contains("listen: 'nowhere' is not HOST:PORT"), "{out}");
}

#[test]
fn a_file_without_exports_is_refused() {
    let dir = TempDir::new("config");
    let file = config(&dir, "[server]\nthreads = 4\n");
    let (ok, out) = check(&file);
    assert!(!ok && out.contains("no [[export]] table"), "{out}");
}

#[test]
fn allow_lists_that_no_client_could_match_are_refused() {
    let dir = TempDir::new("config");
    let keys = psk_file(&dir, &["alice"]);
    let out = error_at(
        &dir,
        &format!("[server]\ntls-psk = \"{}\"\n\n[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = {{ size = \"1M\" }}\nallow-dn = [\"CN=x\"]\n", keys.display()),
        5,
    );
    assert!(out.contains("without tls-verify-peer"), "{out}");
}

#[test]
fn a_bad_server_option_value_is_reported_where_it_is() {
    let dir = TempDir::new("config");
    let out = error_at(&dir, "[server]\n\nthreads = 0\n", 3);
    assert!(out.contains("'threads'"), "{out}");
}

#[test]
fn a_missing_plugin_is_reported_at_its_name() {
    let dir = TempDir::new("config");
    let out = error_at(
        &dir,
        "[[export]]\nname = \"a\"\n\nplugin = \"no-such-plugin\"\n",
        4,
    );
    assert!(out.contains("plugin 'no-such-plugin' not found"), "{out}");
}

#[test]
fn a_duplicate_export_name_is_reported_at_the_second() {
    let dir = TempDir::new("config");
    let text = "[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = { size = \"1M\" }\n\n[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = { size = \"1M\" }\n";
    let out = error_at(&dir, text, 7);
    assert!(
        out.contains("export 'a' is defined twice (first at line 2)"),
        "{out}"
    );
}

#[test]
fn a_parameter_the_filter_rejects_is_reported_at_its_key() {
    let dir = TempDir::new("config");
    let text = "[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = { size = \"1M\" }\nfilters = [\n  { filter = \"offset\", params = { ofset = \"1M\" } },\n]\n";
    let out = error_at(&dir, text, 6);
    assert!(out.contains("offset takes no parameter 'ofset'"), "{out}");
    let text = "[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = { size = \"1M\" }\nfilters = [\n  { filter = \"offset\", params = { offset = \"lots\" } },\n]\n";
    let out = error_at(&dir, text, 6);
    assert!(out.contains("offset"), "{out}");
}

#[test]
fn a_plugin_parameter_the_plugin_rejects_is_reported_at_its_key() {
    let dir = TempDir::new("config");
    let out = error_at(
        &dir,
        "[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = { sise = \"1M\" }\n",
        4,
    );
    assert!(out.contains("sise"), "{out}");
}

#[test]
fn a_tls_export_without_credentials_is_refused() {
    let dir = TempDir::new("config");
    let out = error_at(
        &dir,
        "[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = { size = \"1M\" }\ntls = true\n",
        5,
    );
    assert!(out.contains("the server has no TLS"), "{out}");
}

#[test]
fn the_command_line_overrides_the_files_server_options() {
    let dir = TempDir::new("config");
    let socket = dir.path("nbd.sock");
    let file = config(
        &dir,
        &format!(
            "[server]\nlisten = [\"{}\"]\nreadonly = false\nthreads = 2\n\n[[export]]\nname = \"d\"\nplugin = \"memory\"\nparams = {{ size = \"1M\" }}\n",
            dir.path("unused.sock").display()
        ),
    );
    // -U on the command line replaces the file's listen; -r makes every
    // export read-only.
    let s = Server::start_config(&file, &["-U", socket.to_str().unwrap(), "-r"], &socket);
    let out = run_ok(client("nbdinfo").arg(unix_uri(&socket, "d")));
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(!dir.path("unused.sock").exists());
    assert!(s.stop().success());
}

#[test]
fn certificate_subjects_decide_who_opens_the_read_only_exports() {
    let dir = TempDir::new("config");
    let ca = Pki::ca(&dir.path("ca"), "nbdhost test CA");
    let server = dir.path("server");
    ca.issue(&server, "server", "localhost", false);
    let (backup, guest) = (dir.path("backup"), dir.path("guest"));
    ca.issue(&backup, "client", "backup", true);
    ca.issue(&guest, "client", "guest", true);
    let port = free_port();
    let socket = dir.path("nbd.sock");
    let file = config(
        &dir,
        &format!(
            r#"
[server]
listen = ["127.0.0.1:{port}", "{socket}"]
tls-certificates = "{server}"
tls-verify-peer = true

[[export]]
name = "archive"
plugin = "memory"
params = {{ size = "2M" }}
readonly = true
allow-dn = ["CN=backup,O=nbdhost tests"]

[[export]]
name = "scratch"
plugin = "memory"
params = {{ size = "1M" }}
"#,
            socket = socket.display(),
            server = server.display(),
        ),
    );
    let s = Server::start_config(&file, &["-v"], &socket);
    let uri = |export: &str, creds: &Path| {
        format!(
            "nbds://localhost:{port}/{export}?tls-certificates={}",
            creds.display()
        )
    };
    assert_eq!(listed(&uri("", &backup)), ["archive", "scratch"]);
    assert_eq!(listed(&uri("", &guest)), ["scratch"]);
    let info = run_ok(client("nbdinfo").arg(uri("archive", &backup)));
    assert!(info.contains("is_read_only: true"), "{info}");
    let why = refusal(&uri("archive", &guest));
    assert!(why.contains("no export named"), "{why}");
    assert!(s.stop().success());
}
