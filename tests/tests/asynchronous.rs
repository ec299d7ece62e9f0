//! Asynchronous requests through the ABI (1.9), with the `async` C test
//! plugin (`tests/c/async.c`): a RAM disk with no synchronous read or
//! write at all, whose requests complete on threads of its own, out of
//! order, inside the call that started them, twice, after the client has
//! gone, or while the server shuts down. qemu and libnbd judge the data.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbdhost_tests::{
    build_c, convert_and_compare, filter_arg, luks2_encrypted_in_place, missing, nbdsh, pattern,
    qemu_io, root, Server, TempDir,
};

/// The `async` plugin, built in `dir`.
fn async_plugin(dir: &TempDir) -> PathBuf {
    build_c(dir, "asyncplugin", &root().join("tests/c/async.c"), &[])
}

/// A server of the `async` plugin with `params`, and `args` before them.
fn serve(dir: &TempDir, args: &[&str], params: &[&str]) -> Server {
    let so = async_plugin(dir);
    let mut all: Vec<&str> = args.to_vec();
    all.push(so.to_str().unwrap());
    all.extend_from_slice(params);
    Server::start(&all)
}

#[test]
fn completions_from_the_plugin_s_threads_in_any_order_serve_qemu() {
    if missing("", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("async-threads");
    let s = serve(&dir, &[], &["hold_ms=3"]);
    let src = dir.path("src.img");
    std::fs::write(&src, pattern(8 << 20, 7)).unwrap();
    let uri = s.uri();
    convert_and_compare(&src, &uri);
    // FUA, which the plugin leaves to the server: a flush after the write.
    qemu_io(&uri, &["write -f -P 0x44 9M 64k", "read -P 0x44 9M 64k"]);
    assert!(s.stop().success());
}

#[test]
fn completions_inside_the_starting_call_are_answered() {
    if missing("", &["qemu-io"]) {
        return;
    }
    let dir = TempDir::new("async-inline");
    let s = serve(&dir, &[], &["mode=inline"]);
    qemu_io(
        &s.uri(),
        &["aio_write -P 0x5a 0 1M", "aio_flush", "read -P 0x5a 0 1M"],
    );
    assert!(s.stop().success());
}

#[test]
fn a_second_completion_is_logged_and_ignored() {
    if missing("", &["qemu-io"]) {
        return;
    }
    let dir = TempDir::new("async-twice");
    let s = serve(&dir, &[], &["mode=twice"]);
    qemu_io(&s.uri(), &["write -P 0x21 64k 64k", "read -P 0x21 64k 64k"]);
    let (seen, log) = s.wait_log("completed twice", Duration::from_secs(5));
    assert!(seen, "{log}");
    assert!(s.stop().success());
}

#[test]
fn requests_in_flight_do_not_wait_for_worker_threads() {
    // 32 reads each held up to 300 ms by the plugin, through one worker
    // thread: waited for one after another they would take seconds.
    let dir = TempDir::new("async-depth");
    let s = serve(&dir, &["-t", "1"], &["hold_ms=300"]);
    let script = "\
import time
t = time.monotonic()
for i in range(32):
    h.aio_pread(nbd.Buffer(4096), i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(time.monotonic() - t)
";
    let started = Instant::now();
    let took: f64 = nbdsh(&s.uri(), script).trim().parse().unwrap();
    assert!(
        took < 2.0,
        "32 requests held 300 ms took {took} s ({:?} in all)",
        started.elapsed()
    );
    assert!(s.stop().success());
}

#[test]
fn a_client_that_goes_away_leaves_its_requests_to_complete() {
    if missing("", &["qemu-io"]) {
        return;
    }
    let dir = TempDir::new("async-gone");
    let s = serve(&dir, &[], &["hold_ms=400"]);
    // Start reads and writes, and leave without waiting for any.
    nbdsh(
        &s.uri(),
        "\
import os
for i in range(16):
    h.aio_pread(nbd.Buffer(65536), i * 65536)
    h.aio_pwrite(b'x' * 65536, (i + 64) * 65536)
os._exit(0)
",
    );
    // The plugin completes them into buffers nobody waits for; the
    // server stays up and serves the next client.
    std::thread::sleep(Duration::from_millis(600));
    qemu_io(&s.uri(), &["write -P 0x77 0 64k", "read -P 0x77 0 64k"]);
    let (status, log) = s.stop_with_log();
    assert!(status.success(), "{log}");
    assert!(!log.contains("error"), "{log}");
}

#[test]
fn shutdown_waits_for_requests_in_flight() {
    let dir = TempDir::new("async-shutdown");
    let s = serve(&dir, &[], &["hold_ms=800"]);
    // The client says when its reads are on their way; the server is told
    // to stop while the plugin still holds them.
    let mut reader = Command::new("/usr/bin/python3")
        .args(["-c", SHUTDOWN_READER, &s.uri()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(reader.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "sent");
    s.sigterm();
    assert_eq!(lines.next().unwrap().unwrap(), "answered 8");
    assert!(reader.wait().unwrap().success());
    let (status, log) = s.stop_with_log();
    assert!(status.success(), "{log}");
}

/// Eight reads, "sent" once they are, then "answered N" with how many
/// completed without error.
const SHUTDOWN_READER: &str = "\
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
cookies = [h.aio_pread(nbd.Buffer(4096), i * 4096) for i in range(8)]
time.sleep(0.1)
print('sent', flush=True)
while h.aio_in_flight() > 0:
    h.poll(-1)
ok = 0
for c in cookies:
    try:
        ok += h.aio_command_completed(c)
    except nbd.Error:
        pass
print('answered', ok, flush=True)
";

#[test]
fn a_synchronous_filter_above_an_asynchronous_plugin_still_serves() {
    if missing("", &["qemu-io"]) {
        return;
    }
    let dir = TempDir::new("async-syncfilter");
    let filter = build_c(&dir, "invertfilter", &root().join("tests/c/invert.c"), &[]);
    let filter = format!("--filter={}", filter.display());
    let s = serve(&dir, &[&filter], &["hold_ms=3"]);
    qemu_io(
        &s.uri(),
        &["write -P 0x0f 0 256k", "aio_flush", "read -P 0x0f 0 256k"],
    );
    assert!(s.stop().success());
}

#[test]
fn luks_over_offset_over_an_asynchronous_plugin_stays_asynchronous_end_to_end() {
    if missing("", &["cryptsetup", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("async-luks");
    let pw = dir.path("pw");
    std::fs::write(&pw, "async chain").unwrap();
    let data = pattern(4 << 20, 19);
    let luks = dir.path("luks.img");
    luks2_encrypted_in_place(&luks, &data, &pw, &[]);
    // The volume starts 1 MiB into the disk, behind the offset filter.
    let img = dir.path("disk.img");
    let mut bytes = vec![0xeeu8; 1 << 20];
    bytes.extend(std::fs::read(&luks).unwrap());
    std::fs::write(&img, bytes).unwrap();
    let so = async_plugin(&dir);
    let s = Server::start(&[
        "-t",
        "1",
        &filter_arg("luks"),
        &filter_arg("offset"),
        so.to_str().unwrap(),
        &format!("passphrase=+{}", pw.display()),
        "offset=1M",
        &format!("file={}", img.display()),
        "hold_ms=300",
    ]);
    // 32 reads each held up to 300 ms, decrypted as they come back, with
    // one worker thread: nothing in the chain waits for the plugin.
    let reads: Vec<(u64, usize)> = (0..32).map(|i| (i * 65536, 4096)).collect();
    let (took, got) = held_reads(&s.uri(), &reads);
    assert!(took < 2.0, "32 reads held 300 ms took {took} s");
    let want: String = (0..32).map(|i| hex(&data[i * 65536..][..4096])).collect();
    assert!(got == want, "decrypted data differs");
    // Writes, aligned (encrypted and passed down asynchronously) and not
    // (a read-modify-write), read back.
    qemu_io(
        &s.uri(),
        &[
            "aio_write -P 0x61 0 64k",
            "aio_write -P 0x62 100000 3000",
            "aio_flush",
            "read -P 0x61 0 64k",
            "read -P 0x62 100000 3000",
        ],
    );
    assert!(s.stop().success());
}

#[test]
fn blocksize_joins_the_pieces_of_a_read_as_they_come_back() {
    let dir = TempDir::new("async-blocksize");
    let data = pattern(4 << 20, 23);
    let img = dir.path("disk.img");
    std::fs::write(&img, &data).unwrap();
    let so = async_plugin(&dir);
    let s = Server::start(&[
        "-t",
        "1",
        &filter_arg("blocksize"),
        so.to_str().unwrap(),
        "minblock=4096",
        "maxdata=16384",
        &format!("file={}", img.display()),
        "hold_ms=200",
    ]);
    // Unaligned reads cut into a partial head, whole runs of at most 16
    // KiB and a partial tail, all held by the plugin in random order.
    let reads: Vec<(u64, usize)> = (0..8).map(|i| (1000 + i * 70001, 50000)).collect();
    let (took, got) = held_reads(&s.uri(), &reads);
    assert!(took < 2.0, "8 reads of 5 pieces held 200 ms took {took} s");
    let want: String = (0..8)
        .map(|i| hex(&data[1000 + i * 70001..][..50000]))
        .collect();
    assert!(got == want, "joined data differs");
    assert!(s.stop().success());
}

#[test]
fn truncate_over_an_asynchronous_plugin_stays_asynchronous_and_zeroes_past_the_end() {
    let dir = TempDir::new("async-truncate");
    let data = pattern(1 << 20, 29);
    let img = dir.path("disk.img");
    std::fs::write(&img, &data).unwrap();
    let so = async_plugin(&dir);
    let s = Server::start(&[
        "-t",
        "1",
        &filter_arg("truncate"),
        so.to_str().unwrap(),
        "truncate=2M",
        &format!("file={}", img.display()),
        "hold_ms=300",
    ]);
    // 63 reads held up to 300 ms through one worker thread, some across
    // the real end (1 MiB) and some wholly past it: none waits for
    // another, and the part past the end reads as zeroes.
    let reads: Vec<(u64, usize)> = (1..64).map(|i| (i * 32768 - 2048, 4096)).collect();
    let (took, got) = held_reads(&s.uri(), &reads);
    assert!(took < 2.0, "63 reads held 300 ms took {took} s");
    let mut disk = data.clone();
    disk.resize(2 << 20, 0);
    let want: String = (1..64)
        .map(|i| hex(&disk[i * 32768 - 2048..][..4096]))
        .collect();
    assert!(got == want, "data past the real end is not zero");
    // Zeroes may be written past the end, nothing else; a write across
    // the end changes the real part.
    qemu_io(
        &s.uri(),
        &[
            "aio_write -z 1536k 4k",
            "aio_write -P 0x5a 1044480 4096",
            "aio_flush",
            "read -P 0x5a 1044480 4096",
        ],
    );
    assert!(
        nbdsh(
            &s.uri(),
            "try:\n    h.pwrite(b'x' * 512, 1 << 20)\n    print('written')\nexcept nbd.Error as e:\n    print(e.errno)"
        )
        .trim()
            == "ENOSPC"
    );
    assert!(s.stop().success());
}

#[test]
fn delay_over_an_asynchronous_plugin_waits_on_timers_not_threads() {
    // 32 reads each delayed 300 ms by the filter, with one worker thread:
    // held on timers, they wait together.
    let dir = TempDir::new("async-delay");
    let s = serve(
        &dir,
        &["-t", "1", &filter_arg("delay")],
        &["rdelay=300ms", "hold_ms=0"],
    );
    let reads: Vec<(u64, usize)> = (0..32).map(|i| (i * 65536, 4096)).collect();
    let (took, _) = held_reads(&s.uri(), &reads);
    assert!(
        (0.3..2.0).contains(&took),
        "32 reads delayed 300 ms took {took} s"
    );
    assert!(s.stop().success());
}

#[test]
fn error_over_an_asynchronous_plugin_fails_or_passes_requests_without_waiting() {
    // Writes fail as injected; 32 reads held up to 300 ms by the plugin
    // pass through the filter with one worker thread, all at once.
    let dir = TempDir::new("async-error");
    let s = serve(
        &dir,
        &["-t", "1", &filter_arg("error")],
        &["error-pwrite=ENOSPC", "error-pwrite-rate=1", "hold_ms=300"],
    );
    let reads: Vec<(u64, usize)> = (0..32).map(|i| (i * 65536, 4096)).collect();
    let (took, _) = held_reads(&s.uri(), &reads);
    assert!(took < 2.0, "32 reads held 300 ms took {took} s");
    let write = "try:\n    h.pwrite(b'x' * 512, 0)\n    print('written')\nexcept nbd.Error as e:\n    print(e.errno)";
    assert_eq!(nbdsh(&s.uri(), write).trim(), "ENOSPC");
    assert!(s.stop().success());
}

#[test]
fn rate_over_an_asynchronous_plugin_holds_no_thread_while_reads_wait() {
    // 32 reads of 64 KiB at 4 Mbit/s wait about 4 s in all on the read
    // bucket; a write, from its own bucket, meanwhile passes at once even
    // with one worker thread, which no waiting read holds.
    let dir = TempDir::new("async-rate");
    let s = serve(
        &dir,
        &["-t", "1", &filter_arg("rate")],
        &["rate=4M", "burstiness=0.1", "hold_ms=0"],
    );
    let script = "\
import time
for i in range(32):
    h.aio_pread(nbd.Buffer(65536), i * 65536)
time.sleep(0.2)
t = time.monotonic()
h.pwrite(b'w' * 512, 0)
print(time.monotonic() - t)
while h.aio_in_flight() > 0:
    h.poll(-1)
";
    let took: f64 = nbdsh(&s.uri(), script).trim().parse().unwrap();
    assert!(
        took < 1.0,
        "a write behind rate-limited reads took {took} s"
    );
    assert!(s.stop().success());
}

#[test]
fn log_over_an_asynchronous_plugin_logs_each_end_as_it_comes_back() {
    // 32 reads held up to 300 ms by the plugin, with one worker thread:
    // logged as they start and as they end, none waiting for another.
    let dir = TempDir::new("async-log");
    let log = dir.path("requests.log");
    let s = serve(
        &dir,
        &["-t", "1", &filter_arg("log")],
        &[&format!("logfile={}", log.display()), "hold_ms=300"],
    );
    let reads: Vec<(u64, usize)> = (0..32).map(|i| (i * 65536, 4096)).collect();
    let (took, _) = held_reads(&s.uri(), &reads);
    assert!(took < 2.0, "32 reads held 300 ms took {took} s");
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let starts = text.lines().filter(|l| l.contains(" Read id=")).count();
    let ends = text
        .lines()
        .filter(|l| l.contains(" ...Read id=") && l.ends_with("return=0"))
        .count();
    assert_eq!((starts, ends), (32, 32), "{text}");
}

/// Start `reads` (offset, length) at once with libnbd, wait for all:
/// how many seconds that took, and the data read, in hex.
fn held_reads(uri: &str, reads: &[(u64, usize)]) -> (f64, String) {
    let list: Vec<String> = reads.iter().map(|(o, n)| format!("({o}, {n})")).collect();
    let script = format!(
        "\
import time
reads = [{}]
bufs = [nbd.Buffer(n) for _, n in reads]
t = time.monotonic()
for (off, n), b in zip(reads, bufs):
    h.aio_pread(b, off)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(time.monotonic() - t)
print(''.join(b.to_bytearray().hex() for b in bufs))
",
        list.join(", ")
    );
    let out = nbdsh(uri, &script);
    let mut lines = out.lines();
    let took = lines.next().unwrap().parse().unwrap();
    (took, lines.next().unwrap_or_default().to_owned())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The export description of the `either` plugin serving at `uri`: how
/// many synchronous and asynchronous calls it has had.
fn calls(uri: &str) -> String {
    nbdsh(uri, "print(h.get_export_description())")
        .trim()
        .to_string()
}

#[test]
fn a_plugin_that_says_synchronous_is_called_synchronously_only() {
    if missing("", &["qemu-io"]) {
        return;
    }
    let dir = TempDir::new("async-either");
    let so = build_c(&dir, "eitherplugin", &root().join("tests/c/either.c"), &[]);
    for (sync, want) in [("1", "sync 2 async 0"), ("0", "sync 0 async 2")] {
        let s = Server::start(&[so.to_str().unwrap(), &format!("sync={sync}")]);
        qemu_io(&s.uri(), &["write -P 0x3c 0 4k", "read -P 0x3c 0 4k"]);
        assert_eq!(calls(&s.uri()), want, "sync={sync}");
        assert!(s.stop().success());
    }
}
