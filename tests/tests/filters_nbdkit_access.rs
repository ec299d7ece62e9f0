//! The access filters nbdkit users stack on a public port (issue 21):
//! limit, ip, tls-fallback and multi-conn, driven by real clients from loopback addresses and Unix
//! sockets only, and compared with nbdkit's own filters on the command
//! lines of their man pages.

use std::time::{Duration, Instant};

use nbdhost_tests::tls::Pki;
use nbdhost_tests::{client, free_port, run, run_ok, twin::same_as_nbdkit, Server, TempDir};

/// Open `n` connections to `uri` at once from one nbdsh and say, in
/// order, which were served (`ok`) and which refused (`refused`); all
/// stay open until every one has been tried.
fn connect_many(uri: &str, n: usize) -> String {
    let script = format!(
        "hs = []\n\
         for i in range({n}):\n    \
             h = nbd.NBD()\n    \
             h.set_uri_allow_local_file(True)\n    \
             try:\n        \
                 h.connect_uri({uri:?})\n        \
                 hs.append(h)\n        \
                 print('ok')\n    \
             except nbd.Error:\n        \
                 print('refused')\n"
    );
    run_ok(client("nbdsh").arg("-c").arg(script))
}

#[test]
fn limit_refuses_the_client_beyond_n_and_serves_again_once_one_leaves() {
    let s = Server::start(&["--filter=limit", "memory", "1M", "limit=2"]);
    assert_eq!(connect_many(&s.uri(), 3), "ok\nok\nrefused\n");
    // Those connections have closed: their places are free again once
    // the server has seen them go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect_many(&s.uri(), 2) != "ok\nok\n" {
        assert!(Instant::now() < deadline, "places never given back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn limit_defaults_to_one_client() {
    let s = Server::start(&["--filter=limit", "memory", "1M"]);
    assert_eq!(connect_many(&s.uri(), 2), "ok\nrefused\n");
}

#[test]
fn limit_zero_means_no_limit() {
    let s = Server::start(&["--filter=limit", "memory", "1M", "limit=0"]);
    assert_eq!(connect_many(&s.uri(), 5), "ok\nok\nok\nok\nok\n");
}

#[test]
fn limit_refuses_a_limit_that_is_not_a_number() {
    let out = run(
        client(nbdhost_tests::nbdhost_bin().to_str().unwrap()).args([
            "--filter=limit",
            "memory",
            "1M",
            "limit=lots",
            "--run",
            "true",
        ]),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limit"));
}

#[test]
fn limit_synopsis_is_the_same_as_nbdkit() {
    same_as_nbdkit(&["--filter=limit", "memory", "1M", "limit=2"], |uri| {
        connect_many(uri, 3)
    });
}

/// What the server logs for a client the ip filter turned away.
const RESTRICTED: &str = "client not permitted to connect because of source address restriction";

/// `ok` if one client is served at `uri`, `refused` if not.
fn connect_one(uri: &str) -> String {
    connect_many(uri, 1)
}

/// nbdhost on TCP at `addr` (a loopback address) with `args`; its URI.
fn tcp_server(addr: &str, args: &[&str]) -> (Server, String) {
    let port = free_port();
    let p = port.to_string();
    let mut all = vec!["-p", &p, "-i", addr];
    all.extend_from_slice(args);
    let s = Server::start_tcp(&all, port);
    let host = if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_owned()
    };
    (s, format!("nbd://{host}:{port}/"))
}

/// Whether this machine has an IPv6 loopback to test with.
fn have_ipv6_loopback() -> bool {
    let ok = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !ok {
        eprintln!("skipped: no IPv6 loopback");
    }
    ok
}

fn id(flag: &str) -> String {
    run_ok(client("id").arg(flag)).trim().to_owned()
}

/// Whether nbdhost refuses to start with these arguments, saying
/// something that contains `needle`.
fn refuses_to_start(args: &[&str], needle: &str) -> bool {
    let mut all = args.to_vec();
    all.extend(["--run", "true"]);
    let out = run(client(nbdhost_tests::nbdhost_bin().to_str().unwrap()).args(&all));
    let err = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && err.contains(needle)
}

#[test]
fn ip_allows_a_loopback_address_and_denies_the_rest() {
    let args = ["--filter=ip", "memory", "1M", "allow=127.0.0.1", "deny=all"];
    let (_s, uri) = tcp_server("127.0.0.1", &args);
    assert_eq!(connect_one(&uri), "ok\n");
    // The same rules turn away a client on a Unix socket.
    let s = Server::start(&args);
    assert_eq!(connect_one(&s.uri()), "refused\n");
}

#[test]
fn ip_deny_of_a_network_refuses_the_clients_inside_it_only() {
    let (_s, uri) = tcp_server(
        "127.0.0.1",
        &["--filter=ip", "memory", "1M", "deny=127.0.0.0/8"],
    );
    assert_eq!(connect_one(&uri), "refused\n");
    let (_s, uri) = tcp_server(
        "127.0.0.1",
        &["--filter=ip", "memory", "1M", "deny=10.0.0.0/8"],
    );
    assert_eq!(connect_one(&uri), "ok\n");
}

#[test]
fn ip_allow_wins_over_deny_whatever_the_order() {
    let (_s, uri) = tcp_server(
        "127.0.0.1",
        &[
            "--filter=ip",
            "memory",
            "1M",
            "deny=127.0.0.1",
            "allow=127.0.0.0/24",
        ],
    );
    assert_eq!(connect_one(&uri), "ok\n");
}

#[test]
fn ip_tells_ipv4_from_ipv6_clients() {
    let args = ["--filter=ip", "memory", "1M", "allow=anyipv6", "deny=all"];
    let (_s, uri) = tcp_server("127.0.0.1", &args);
    assert_eq!(connect_one(&uri), "refused\n");
    if !have_ipv6_loopback() {
        return;
    }
    let (_s, uri) = tcp_server("::1", &args);
    assert_eq!(connect_one(&uri), "ok\n");
    let (_s, uri) = tcp_server("::1", &["--filter=ip", "memory", "1M", "deny=::1/128"]);
    assert_eq!(connect_one(&uri), "refused\n");
}

#[test]
fn ip_anyunix_matches_unix_socket_clients_only() {
    let s = Server::start(&["--filter=ip", "memory", "1M", "deny=anyunix"]);
    assert_eq!(connect_one(&s.uri()), "refused\n");
    let (_s, uri) = tcp_server(
        "127.0.0.1",
        &["--filter=ip", "memory", "1M", "deny=anyunix"],
    );
    assert_eq!(connect_one(&uri), "ok\n");
}

#[test]
fn ip_matches_the_unix_peer_user_and_group() {
    let uid = format!("allow=uid:{}", id("-u"));
    let gid = format!("allow=gid:{}", id("-g"));
    for allow in [&uid, &gid] {
        let s = Server::start(&["--filter=ip", "memory", "1M", allow, "deny=all"]);
        assert_eq!(connect_one(&s.uri()), "ok\n", "{allow}");
    }
    // Nobody's user and group are not ours (the tests run as another).
    for allow in ["allow=uid:65534", "allow=gid:65534", "allow=pid:1"] {
        let s = Server::start(&["--filter=ip", "memory", "1M", allow, "deny=all"]);
        assert_eq!(connect_one(&s.uri()), "refused\n", "{allow}");
    }
}

#[test]
fn ip_credential_rules_never_match_tcp_clients() {
    let uid = format!("allow=uid:{}", id("-u"));
    let (_s, uri) = tcp_server(
        "127.0.0.1",
        &["--filter=ip", "memory", "1M", &uid, "deny=all"],
    );
    assert_eq!(connect_one(&uri), "refused\n");
}

#[test]
fn ip_accepts_several_parameters_and_lists() {
    let s = Server::start(&[
        "--filter=ip",
        "memory",
        "1M",
        "allow=10.0.0.1",
        "allow=192.168.0.0/16,anyunix",
        "deny=all",
    ]);
    assert_eq!(connect_one(&s.uri()), "ok\n");
}

#[test]
fn ip_refuses_rules_it_cannot_parse() {
    for (rule, says) in [
        ("allow=10.0.0.0/33", "prefix is > 32"),
        ("deny=::/129", "prefix is > 128"),
        ("allow=nonsense", "don't know how to parse rule"),
        ("allow=127.0.0.1,,::1", "empty entry"),
        ("deny=uid:-1", "out of range"),
        ("deny=security:system_u:object_r:svirt_t:s0", "security:"),
    ] {
        assert!(
            refuses_to_start(&["--filter=ip", "memory", "1M", rule], says),
            "{rule}"
        );
    }
}

/// A CA, a server certificate for localhost and a client certificate
/// whose subject is `CN=<cn>,O=nbdhost tests`, in `dir`.
fn pki(dir: &TempDir, cn: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca = Pki::ca(&dir.path("ca"), "nbdhost test CA");
    let server = dir.path("server");
    ca.issue(&server, "server", "localhost", false);
    let creds = dir.path("client");
    ca.issue(&creds, "client", cn, true);
    (server, creds)
}

#[test]
fn ip_dn_rules_match_the_verified_client_certificate() {
    if nbdhost_tests::missing("(TLS)", &["certtool"]) {
        return;
    }
    let dir = TempDir::new("ipdn");
    let (server, creds) = pki(&dir, "good client");
    let certs = format!("--tls-certificates={}", server.display());
    let serve = |rules: &[&str]| {
        let mut args = vec![
            certs.as_str(),
            "--tls-verify-peer",
            "--filter=ip",
            "memory",
            "1M",
        ];
        args.extend_from_slice(rules);
        let (s, _) = tcp_server("127.0.0.1", &args);
        let uri = format!(
            "nbds://localhost:{}/?tls-certificates={}",
            s.port.unwrap(),
            creds.display()
        );
        (s, uri)
    };
    let (_s, uri) = serve(&["allow=dn:*CN=good client*", "deny=all"]);
    assert_eq!(connect_one(&uri), "ok\n");
    // The whole DN, in RFC 4514's order (most specific part first, as
    // nbdkit 1.40 writes it), without regard to case, commas and all.
    let (_s, uri) = serve(&["allow=dn:cn=good client,o=NBDHOST TESTS", "deny=all"]);
    assert_eq!(connect_one(&uri), "ok\n");
    let (_s, uri) = serve(&["allow=dn:o=NBDHOST TESTS,cn=good client", "deny=all"]);
    assert_eq!(connect_one(&uri), "refused\n");
    let (s, uri) = serve(&["allow=dn:*CN=someone else*", "deny=all"]);
    assert_eq!(connect_one(&uri), "refused\n");
    assert!(s.log_text().contains(RESTRICTED), "{}", s.log_text());
    let (_s, uri) = serve(&["allow=issuer-dn:CN=nbdhost test CA", "deny=all"]);
    assert_eq!(connect_one(&uri), "ok\n");
    let (_s, uri) = serve(&["deny=issuer-dn:*CN=nbdhost test CA*"]);
    assert_eq!(connect_one(&uri), "refused\n");
}

#[test]
fn ip_dn_rules_match_no_client_without_a_certificate() {
    let dir = TempDir::new("ipdnpsk");
    let keys = nbdhost_tests::tls::psk_file(&dir, &["alice"]);
    let (s, _) = tcp_server(
        "127.0.0.1",
        &[
            "--tls-psk",
            keys.to_str().unwrap(),
            "--filter=ip",
            "memory",
            "1M",
            "allow=dn:*",
            "deny=all",
        ],
    );
    let uri = format!(
        "nbds://alice@127.0.0.1:{}/?tls-psk-file={}",
        s.port.unwrap(),
        keys.display()
    );
    assert_eq!(connect_one(&uri), "refused\n");
    assert!(s.log_text().contains(RESTRICTED), "{}", s.log_text());
}

// The command lines of nbdkit-ip-filter(1)'s EXAMPLES (its SYNOPSIS is
// their union), each served by both on a Unix socket (the twin's
// transport), where the keyword rule turns the client away and the
// credential rules let it in.
#[test]
fn ip_examples_without_addresses_are_the_same_as_nbdkit() {
    let uid = format!("allow=uid:{}", id("-u"));
    let gid = format!("allow=gid:{}", id("-g"));
    for rules in [
        vec!["allow=anyipv6", "deny=all"],
        vec![uid.as_str(), "deny=all"],
        vec![gid.as_str(), "deny=all"],
    ] {
        let mut args = vec!["--filter=ip", "memory", "1M"];
        args.extend(rules);
        same_as_nbdkit(&args, connect_one);
    }
}

// The examples with addresses cannot be compared: the nbdkit 1.32.5
// installed here refuses every address rule ("don't know how to parse
// rule: allow=127.0.0.1"). Served by nbdhost alone, over TCP from the
// loopback address, they do what nbdkit's man page says.
#[test]
fn ip_examples_with_addresses_do_what_nbdkits_man_page_says() {
    let (_s, uri) = tcp_server(
        "127.0.0.1",
        &[
            "--filter=ip",
            "memory",
            "1M",
            "allow=127.0.0.1,::1",
            "deny=all",
        ],
    );
    assert_eq!(connect_one(&uri), "ok\n");
    let (_s, uri) = tcp_server(
        "127.0.0.1",
        &["--filter=ip", "memory", "1M", "deny=8.0.0.0/8"],
    );
    assert_eq!(connect_one(&uri), "ok\n");
    let s = Server::start(&[
        "--filter=ip",
        "memory",
        "1M",
        "allow=127.0.0.1,::1",
        "deny=all",
    ]);
    assert_eq!(connect_one(&s.uri()), "refused\n");
    assert!(s.log_text().contains(RESTRICTED), "{}", s.log_text());
}

/// The default message of tls-fallback, as a plain client reads it.
const README: &str =
    "This NBD server requires TLS authentication before it will serve useful data.\n";

/// The size, read-only flag and 512 bytes a client sees at `uri` (NULs
/// shown as `.`), or the error it gets.
fn tls_view(uri: &str) -> String {
    let script = format!(
        "h = nbd.NBD()\n\
         h.set_uri_allow_local_file(True)\n\
         h.connect_uri({uri:?})\n\
         print(h.get_size(), h.is_read_only())\n\
         print(h.pread(512, 0).decode().replace('\\0', '.'), end='')\n"
    );
    run_ok(client("nbdsh").arg("-c").arg(script))
}

/// `uri` (a twin's nbd+unix URI) with TLS as `alice` with `keys`.
fn with_psk(uri: &str, keys: &std::path::Path) -> String {
    format!(
        "{}&tls-psk-file={}",
        uri.replace("nbd+unix:///", "nbds+unix://alice@/"),
        keys.display()
    )
}

/// nbdhost with --tls=on and a PSK file for `alice`, tls-fallback over a
/// 1 MiB memory disk, and `extra`; the server, its keys.
fn fallback_server(dir: &TempDir, extra: &[&str]) -> (Server, std::path::PathBuf) {
    let keys = nbdhost_tests::tls::psk_file(dir, &["alice"]);
    let psk = format!("--tls-psk={}", keys.display());
    let mut args = vec!["--tls=on", &psk, "--filter=tls-fallback", "memory", "1M"];
    args.extend_from_slice(extra);
    (Server::start(&args), keys)
}

fn padded(text: &str) -> String {
    format!("{text}{}", ".".repeat(512 - text.len()))
}

#[test]
fn tls_fallback_serves_plain_clients_the_message_read_only() {
    let dir = TempDir::new("tlsfb");
    let (s, _) = fallback_server(&dir, &[]);
    assert_eq!(tls_view(&s.uri()), format!("512 True\n{}", padded(README)));
}

#[test]
fn tls_fallback_ignores_the_export_name_of_a_plain_client() {
    let dir = TempDir::new("tlsfb");
    let (s, _) = fallback_server(&dir, &[]);
    let uri = s.uri().replace("nbd+unix:///", "nbd+unix:///secret-disk");
    assert_eq!(tls_view(&uri), format!("512 True\n{}", padded(README)));
}

#[test]
fn tls_fallback_serves_tls_clients_the_disk_below() {
    let dir = TempDir::new("tlsfb");
    let (s, keys) = fallback_server(&dir, &[]);
    let uri = with_psk(&s.uri(), &keys);
    assert_eq!(
        tls_view(&uri),
        format!("1048576 False\n{}", ".".repeat(512))
    );
    run_ok(client("nbdsh").args([
        "-c",
        "h.set_uri_allow_local_file(True)",
        "-u",
        &uri,
        "-c",
        "h.pwrite(b'x' * 512, 0); assert h.pread(512, 0) == b'x' * 512",
    ]));
}

#[test]
fn tls_fallback_tlsreadme_is_cut_or_padded_to_512_bytes() {
    let dir = TempDir::new("tlsfb");
    let (s, _) = fallback_server(&dir, &["tlsreadme=Ask the administrator for a key."]);
    assert_eq!(
        tls_view(&s.uri()),
        format!("512 True\n{}", padded("Ask the administrator for a key."))
    );
    let long = "y".repeat(600);
    let (s, _) = fallback_server(&dir, &[&format!("tlsreadme={long}")]);
    assert_eq!(tls_view(&s.uri()), format!("512 True\n{}", &long[..512]));
}

#[test]
fn tls_fallback_lists_one_unnamed_export_to_plain_clients() {
    if nbdhost_tests::missing("(nbdkit's eval plugin)", &["nbdkit"]) {
        return;
    }
    let dir = TempDir::new("tlsfb");
    let keys = nbdhost_tests::tls::psk_file(&dir, &["alice"]);
    let psk = format!("--tls-psk={}", keys.display());
    // nbdkit's eval plugin, through the adapter, lists two exports.
    let s = Server::start(&[
        "--tls=on",
        &psk,
        "--filter=tls-fallback",
        "eval",
        "list_exports=printf 'one\\ntwo\\n'",
        "get_size=echo 1048576",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
    ]);
    let names = |uri: &str| {
        run_ok(client("nbdinfo").args(["--list", "--json", uri]))
            .lines()
            .filter(|l| l.contains("\"export-name\""))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(names(&s.uri()), r#""export-name": "","#);
    assert_eq!(
        names(&with_psk(&s.uri(), &keys)),
        "\"export-name\": \"one\",\n\"export-name\": \"two\","
    );
}

#[test]
fn tls_fallback_is_never_reached_when_tls_is_required() {
    let dir = TempDir::new("tlsfb");
    let keys = nbdhost_tests::tls::psk_file(&dir, &["alice"]);
    let psk = format!("--tls-psk={}", keys.display());
    let s = Server::start(&[&psk, "--filter=tls-fallback", "memory", "1M"]);
    let out = run(client("nbdinfo").arg("--size").arg(s.uri()));
    assert!(!out.status.success());
    assert_eq!(
        run_ok(
            client("nbdinfo")
                .arg("--size")
                .arg(with_psk(&s.uri(), &keys))
        )
        .trim(),
        "1048576"
    );
}

// nbdkit-tls-fallback-filter(1)'s SYNOPSIS, with and without tlsreadme=,
// served by both with the same PSK file, seen by a plain client and by a
// TLS one.
#[test]
fn tls_fallback_synopsis_is_the_same_as_nbdkit() {
    let dir = TempDir::new("tlsfb");
    let keys = nbdhost_tests::tls::psk_file(&dir, &["alice"]);
    let psk = format!("--tls-psk={}", keys.display());
    for extra in [None, Some("tlsreadme=Ask the administrator for a key.")] {
        let mut args = vec!["--tls=on", &psk, "--filter=tls-fallback", "memory", "1M"];
        args.extend(extra);
        same_as_nbdkit(&args, |uri| {
            format!("{}\n{}", tls_view(uri), tls_view(&with_psk(uri, &keys)))
        });
    }
}

/// nbdkit's eval plugin (through the adapter) as a layer with a cache per
/// connection: each connection's handle is a fresh name, each flush
/// appends its handle's name to `log`; multi-conn is offered only when
/// `multi_conn`.
fn per_connection_layer(log: &std::path::Path, multi_conn: bool) -> Vec<String> {
    [
        "eval",
        "open=mktemp -u conn.XXXXXX",
        "get_size=echo 1048576",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "pwrite=cat >/dev/null",
        "can_write=exit 0",
        "can_flush=exit 0",
        "can_fua=echo native",
        if multi_conn {
            "can_multi_conn=exit 0"
        } else {
            "can_multi_conn=exit 3"
        },
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("flush=echo $2 >> {}", log.display())])
    .collect()
}

/// Connections `a` and `b` to `uri` (`b` to export `b_name`), then
/// `steps` (Python with `a` and `b`); what it printed, then how many
/// flushes reached the layer below and on how many connections.
fn two_connections(uri: &str, log: &std::path::Path, b_name: &str, steps: &str) -> String {
    std::fs::write(log, "").unwrap();
    let b_uri = uri.replace("nbd+unix:///", &format!("nbd+unix:///{b_name}"));
    let script = format!(
        "a = nbd.NBD()\n\
         a.connect_uri({uri:?})\n\
         b = nbd.NBD()\n\
         b.connect_uri({b_uri:?})\n\
         {steps}\n"
    );
    let printed = run_ok(client("nbdsh").arg("-c").arg(script));
    let text = std::fs::read_to_string(log).unwrap();
    let mut conns: Vec<&str> = text.lines().collect();
    let flushes = conns.len();
    conns.sort_unstable();
    conns.dedup();
    format!("{printed}flushes: {flushes} on {}", conns.len())
}

/// Serve the per-connection layer (with or without its own multi-conn)
/// under `--filter=multi-conn` with `params`, run `steps` on two
/// connections, and say what was seen (`None` without nbdkit).
fn multi_conn(params: &[&str], layer_has_it: bool, steps: &str) -> Option<String> {
    if nbdhost_tests::missing("(nbdkit's eval plugin)", &["nbdkit"]) {
        return None;
    }
    let dir = TempDir::new("mc");
    let log = dir.path("flushes");
    let layer = per_connection_layer(&log, layer_has_it);
    let mut args = vec!["--filter=multi-conn"];
    args.extend(layer.iter().map(String::as_str));
    args.extend_from_slice(params);
    let s = Server::start(&args);
    Some(two_connections(&s.uri(), &log, "", steps))
}

/// A write and flush on `a` after a read on `b`, as a client relying on
/// multi-conn would do before reading on `b` again.
const WRITE_HERE_FLUSH_THERE: &str = "print('multi-conn', a.can_multi_conn())\n\
     b.pread(512, 0)\n\
     a.pwrite(b'x' * 512, 0)\n\
     a.flush()";

#[test]
fn multi_conn_auto_emulates_for_a_layer_without_it() {
    if let Some(out) = multi_conn(&[], false, WRITE_HERE_FLUSH_THERE) {
        assert_eq!(out, "multi-conn True\nflushes: 2 on 2");
    }
}

#[test]
fn multi_conn_auto_leaves_a_layer_with_it_alone() {
    if let Some(out) = multi_conn(&[], true, WRITE_HERE_FLUSH_THERE) {
        assert_eq!(out, "multi-conn True\nflushes: 1 on 1");
    }
}

#[test]
fn multi_conn_modes_advertise_and_flush_as_nbdkits_man_page_says() {
    for (mode, seen) in [
        ("emulate", "multi-conn True\nflushes: 2 on 2"),
        ("plugin", "multi-conn False\nflushes: 1 on 1"),
        ("disable", "multi-conn False\nflushes: 1 on 1"),
        ("unsafe", "multi-conn True\nflushes: 1 on 1"),
    ] {
        let param = format!("multi-conn-mode={mode}");
        let Some(out) = multi_conn(&[&param], false, WRITE_HERE_FLUSH_THERE) else {
            return;
        };
        assert_eq!(out, seen, "{mode}");
    }
}

#[test]
fn multi_conn_emulation_skips_connections_with_nothing_to_flush() {
    // b neither wrote nor read: only a is flushed.
    let steps = "a.pwrite(b'x' * 512, 0)\na.flush()";
    if let Some(out) = multi_conn(&["multi-conn-mode=emulate"], false, steps) {
        assert_eq!(out, "flushes: 1 on 1");
    }
    // Nothing written anywhere: no flush reaches the layer below.
    let steps = "b.pread(512, 0)\na.flush()";
    if let Some(out) = multi_conn(&["multi-conn-mode=emulate"], false, steps) {
        assert_eq!(out, "flushes: 0 on 0");
    }
}

#[test]
fn multi_conn_fast_tracking_flushes_every_connection_once_any_wrote() {
    let steps = "a.pwrite(b'x' * 512, 0)\na.flush()\nb.flush()";
    let params = ["multi-conn-mode=emulate", "multi-conn-track-dirty=fast"];
    if let Some(out) = multi_conn(&params, false, steps) {
        // The first flush covers both; the second finds nothing to do.
        assert_eq!(out, "flushes: 2 on 2");
    }
}

#[test]
fn multi_conn_tracking_off_passes_every_flush_to_every_connection() {
    let steps = "a.flush()\nb.flush()";
    let params = ["multi-conn-mode=emulate", "multi-conn-track-dirty=off"];
    if let Some(out) = multi_conn(&params, false, steps) {
        assert_eq!(out, "flushes: 4 on 2");
    }
}

#[test]
fn multi_conn_plugin_mode_skips_a_flush_when_nothing_was_written() {
    let steps = "b.pread(512, 0)\na.flush()\na.pwrite(b'x' * 512, 0)\nb.flush()";
    let params = ["multi-conn-mode=plugin"];
    if let Some(out) = multi_conn(&params, true, steps) {
        assert_eq!(out, "flushes: 1 on 1");
    }
}

#[test]
fn multi_conn_fua_writes_become_a_flush_of_every_connection() {
    let steps = "b.pread(512, 0)\na.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)";
    if let Some(out) = multi_conn(&["multi-conn-mode=emulate"], false, steps) {
        assert_eq!(out, "flushes: 2 on 2");
    }
}

#[test]
fn multi_conn_exportname_keeps_emulation_to_one_export_name() {
    if nbdhost_tests::missing("(nbdkit's eval plugin)", &["nbdkit"]) {
        return;
    }
    let dir = TempDir::new("mc");
    let log = dir.path("flushes");
    let layer = per_connection_layer(&log, false);
    for (by_name, seen) in [("true", "flushes: 1 on 1"), ("false", "flushes: 2 on 2")] {
        let param = format!("multi-conn-exportname={by_name}");
        let mut args = vec!["--filter=multi-conn"];
        args.extend(layer.iter().map(String::as_str));
        args.extend(["multi-conn-track-dirty=off", &param]);
        let s = Server::start(&args);
        assert_eq!(
            two_connections(&s.uri(), &log, "other", "a.flush()"),
            seen,
            "{by_name}"
        );
    }
}

#[test]
fn multi_conn_emulation_refuses_a_layer_that_cannot_flush() {
    if nbdhost_tests::missing("(nbdkit's eval plugin)", &["nbdkit"]) {
        return;
    }
    let s = Server::start(&[
        "--filter=multi-conn",
        "eval",
        "get_size=echo 1048576",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "can_flush=exit 3",
        "multi-conn-mode=emulate",
    ]);
    assert_eq!(connect_one(&s.uri()), "refused\n");
    assert!(
        s.log_text()
            .contains("emulating multi-conn requires working flush"),
        "{}",
        s.log_text()
    );
}

#[test]
fn multi_conn_keeps_data_consistent_for_nbdcopy_over_many_connections() {
    let dir = TempDir::new("mc");
    let src = dir.path("src.img");
    std::fs::write(&src, nbdhost_tests::pattern(4 << 20, 21)).unwrap();
    let s = Server::start(&[
        "--filter=multi-conn",
        "memory",
        "4M",
        "multi-conn-mode=emulate",
    ]);
    run_ok(
        client("nbdcopy")
            .args(["--connections=4", "--flush"])
            .arg(&src)
            .arg(s.uri()),
    );
    let back = dir.path("back.img");
    run_ok(client("nbdcopy").arg(s.uri()).arg(&back));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
}

// nbdkit-multi-conn-filter(1)'s SYNOPSIS with every parameter, and its
// first example, whose vddk plugin is not installed: the per-connection
// eval layer, which lacks multi-conn as vddk does, stands in for it.
#[test]
fn multi_conn_synopsis_and_vddk_example_are_the_same_as_nbdkit() {
    let dir = TempDir::new("mc");
    let log = dir.path("flushes");
    let layer = per_connection_layer(&log, false);
    for params in [
        vec![],
        vec![
            "multi-conn-mode=emulate",
            "multi-conn-track-dirty=fast",
            "multi-conn-exportname=true",
        ],
        vec!["multi-conn-mode=disable", "multi-conn-track-dirty=off"],
    ] {
        let mut args = vec!["--filter=multi-conn"];
        args.extend(layer.iter().map(String::as_str));
        args.extend(params);
        same_as_nbdkit(&args, |uri| {
            two_connections(uri, &log, "", WRITE_HERE_FLUSH_THERE)
        });
    }
}

// The second example, with each server's own file plugin.
#[test]
fn multi_conn_file_example_is_the_same_as_nbdkit() {
    let dir = TempDir::new("mc");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let img = disk.to_str().unwrap();
    same_as_nbdkit(
        &[
            "--filter=multi-conn",
            "file",
            "multi-conn-mode=plugin",
            "multi-conn-track-dirty=fast",
            img,
        ],
        |uri| {
            let script = format!(
                "a = nbd.NBD()\n\
                 a.connect_uri({uri:?})\n\
                 b = nbd.NBD()\n\
                 b.connect_uri({uri:?})\n\
                 print('multi-conn', a.can_multi_conn())\n\
                 a.pwrite(b'y' * 512, 4096)\n\
                 b.flush()\n\
                 print(b.pread(512, 4096) == b'y' * 512)\n"
            );
            run_ok(client("nbdsh").arg("-c").arg(script))
        },
    );
}

#[test]
fn ip_rules_debug_flag_logs_each_rule_tried() {
    let s = Server::start(&[
        "-v",
        "-D",
        "ip.rules=1",
        "--filter=ip",
        "memory",
        "1M",
        "allow=anyipv4",
        "deny=anyunix",
    ]);
    assert_eq!(connect_one(&s.uri()), "refused\n");
    let log = s.log_text();
    assert!(
        log.contains("match client with allow AnyIpv4 => no"),
        "{log}"
    );
    assert!(
        log.contains("match client with deny AnyUnix => yes"),
        "{log}"
    );
}
