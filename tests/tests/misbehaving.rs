//! Misbehaving plugins cost only what they touch: a call that never
//! returns stalls its own request and, at shutdown, only delays the exit
//! by the grace period; a failure that records no error still reaches the
//! client as EIO. (Panics are in robustness.rs; structs that are too short,
//! too long or of another ABI version in abi.rs.)

use std::time::{Duration, Instant};

use nbdhost_tests::raw::*;
use nbdhost_tests::{build_c, client, nbdsh, plugin, root, run_ok, Server, TempDir};

#[test]
fn a_call_that_never_returns_stalls_only_its_own_request() {
    let p = plugin("test");
    // A read of the first byte sleeps (without the host's interruptible
    // sleep) for ever, as far as the test is concerned.
    let s = Server::start(&[
        p.to_str().unwrap(),
        "size=64M",
        "delay-at=0",
        "delay-ms=100000000",
    ]);
    let mut c = RawClient::connect(&s.socket);
    c.go();
    c.request(0, CMD_READ, 1, 0, 512);
    c.request(0, CMD_READ, 2, 8192, 512);
    assert_eq!(
        c.simple(),
        (0, 2),
        "the other request of that connection is answered"
    );
    c.read_data(512);
    let out = run_ok(client("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 1M 1M",
        "-c",
        "read -P 0x11 1M 1M",
        &s.uri(),
    ]));
    assert!(out.contains("read 1048576/1048576"), "{out}");
    // The stuck call holds the plugin open: after the grace period the
    // server gives up on it and exits without closing the plugin.
    let t = Instant::now();
    let (st, log) = s.stop_with_log();
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(
        t.elapsed() >= Duration::from_secs(25),
        "gave up after {:?}",
        t.elapsed()
    );
    assert!(log.contains("requests still running"), "{log}");
}

#[test]
fn a_failure_without_an_errno_is_eio() {
    let dir = TempDir::new("silent");
    let so = build_c(&dir, "silentplugin", &root().join("tests/c/silent.c"), &[]);
    let s = Server::start(&[so.to_str().unwrap()]);
    let out = nbdsh(
        &s.uri(),
        "try:\n    h.pread(512, 0)\nexcept nbd.Error as e:\n    print('errno', e.errno)",
    );
    assert_eq!(out.trim(), "errno EIO");
    let (st, log) = s.stop_with_log();
    assert!(st.success() && log.contains("pread failed"), "{log}");
}
