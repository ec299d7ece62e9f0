//! The quickest proof that the server works: qemu-io writes and reads a
//! pattern on a memory disk.

use nbdhost_tests::{client, run_ok, Server};

#[test]
fn qemu_io_roundtrip_on_memory_disk() {
    let s = Server::start(&["memory", "64M"]);
    let out = run_ok(
        client("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0xab 1M 2M",
                "-c",
                "read -P 0xab 1M 2M",
                "-c",
                "read -P 0 0 1M",
            ])
            .arg(s.uri()),
    );
    assert!(out.contains("read 2097152/2097152"), "{out}");
    assert!(s.stop().success());
}
