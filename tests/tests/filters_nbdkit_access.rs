//! The access filters nbdkit users stack on a public port (issue 21):
//! limit, driven by real clients from loopback addresses and Unix
//! sockets only, and compared with nbdkit's own filters on the command
//! lines of their man pages.

use std::time::{Duration, Instant};

use nbdhost_tests::{client, run, run_ok, twin::same_as_nbdkit, Server};

/// Open `n` connections to `uri` at once from one nbdsh and say, in
/// order, which were served (`ok`) and which refused (`refused`); all
/// stay open until every one has been tried.
fn connect_many(uri: &str, n: usize) -> String {
    let script = format!(
        "hs = []\n\
         for i in range({n}):\n    \
             h = nbd.NBD()\n    \
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
