//! A misbehaving plugin harms one request, not the server: a panic becomes
//! an EIO reply and a log line, other requests and connections go on, and
//! a slow request does not hold up faster ones queued behind it.

use nbdhost_tests::{nbdsh, plugin, Server};

#[test]
fn plugin_panic_is_an_eio_reply_and_the_server_goes_on() {
    let p = plugin("test");
    let s = Server::start(&[p.to_str().unwrap(), "size=1M", "panic-at=4096"]);
    let out = nbdsh(
        &s.uri(),
        r#"
import errno
h.pwrite(b"\x11" * 512, 0)
try:
    h.pread(512, 4096)
    raise SystemExit("the panicking read succeeded")
except nbd.Error as e:
    assert e.errno in ("EIO", errno.EIO), e
assert h.pread(512, 0) == b"\x11" * 512
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    // A second connection is served normally.
    let out = nbdsh(&s.uri(), "print(h.pread(4, 0))");
    assert!(out.contains(r"\x11\x11\x11\x11"), "{out}");
    assert!(s.log_text().contains("panicked"), "log: {}", s.log_text());
    assert!(s.stop().success());
}

#[test]
fn replies_complete_out_of_order() {
    let p = plugin("test");
    let s = Server::start(&[
        p.to_str().unwrap(),
        "size=1M",
        "delay-at=0",
        "delay-ms=1000",
    ]);
    let out = nbdsh(
        &s.uri(),
        r#"
import time
slow = nbd.Buffer(512)
fast = nbd.Buffer(512)
order = []
h.aio_pread(slow, 0, completion=lambda err: order.append("slow") or 1)
h.aio_pread(fast, 4096, completion=lambda err: order.append("fast") or 1)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(",".join(order))
"#,
    );
    assert_eq!(out.trim(), "fast,slow");
    assert!(s.stop().success());
}

#[test]
fn sigterm_lets_an_in_flight_request_finish() {
    let p = plugin("test");
    let s = Server::start(&[
        p.to_str().unwrap(),
        "size=1M",
        "delay-at=0",
        "delay-ms=1500",
    ]);
    let uri = s.uri();
    let client = std::thread::spawn(move || nbdsh(&uri, "print(len(h.pread(512, 0)))"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = s.stop();
    assert!(status.success(), "{status}");
    assert_eq!(client.join().unwrap().trim(), "512");
}
