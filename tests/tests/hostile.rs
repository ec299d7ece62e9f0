//! Hostile clients cost only themselves: connections over the limit are
//! refused, a write that never arrives and 10,000 malformed handshakes and
//! requests leave the server serving everyone else, and names clients
//! choose cannot forge log lines. (Clients that leave large replies unread
//! are in lifecycle.rs.) Figures are printed with `--nocapture`.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nbdhost_tests::raw::*;
use nbdhost_tests::{client, export_size, run_ok, Server, TempDir};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A good client's work on a disk only it writes: qemu-io writes 16 MiB
/// and reads them back.
const WRITE_AND_READ: &[&str] = &["write -P 0x3c 16M 16M", "read -P 0x3c 16M 16M"];

/// A good client's work on a disk others may write: qemu-io reads the
/// 16 MiB `read_only_disk` filled and checks every byte.
const READ: &[&str] = &["read -P 0x3c 16M 16M"];

/// Runs a good client's qemu-io commands; returns how long they took.
fn good_client(s: &Server, commands: &[&str]) -> Duration {
    let t = Instant::now();
    let mut qemu_io = client("qemu-io");
    qemu_io.args(["-f", "raw"]);
    if commands.iter().all(|c| c.starts_with("read")) {
        qemu_io.arg("-r");
    }
    for c in commands {
        qemu_io.args(["-c", c]);
    }
    let out = run_ok(qemu_io.arg(s.uri()));
    assert!(out.contains("read 16777216/16777216"), "{out}");
    t.elapsed()
}

#[test]
fn connections_over_the_limit_are_refused_and_logged() {
    let s = Server::start(&["--max-connections=3", "memory", "1M"]);
    let held: Vec<RawClient> = (0..3)
        .map(|_| {
            let mut c = RawClient::connect(&s.socket);
            c.go();
            c
        })
        .collect();
    let mut extra = RawClient::connect_only(&s.socket);
    assert!(
        extra.wait_closed().is_empty(),
        "no greeting beyond the limit"
    );
    let (found, log) = s.wait_log("refused 1 connection(s)", Duration::from_secs(5));
    assert!(found && log.contains("--max-connections"), "{log}");
    drop(held);
    // Room again once the others have gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = RawClient::connect_only(&s.socket);
        c.s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut greeting = [0u8; 18];
        if c.s.read_exact(&mut greeting).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.stop().success());
}

#[test]
fn a_write_that_never_arrives_costs_only_its_connection() {
    let s = Server::start(&["memory", "size=64M"]);
    let pid = s.child.as_ref().unwrap().id();
    let solo = good_client(&s, WRITE_AND_READ);
    let before = rss_kib(pid);
    // Announce 32 MiB and send 1,000 bytes of it.
    let mut stuck = RawClient::connect(&s.socket);
    stuck.go();
    stuck.send(&request_bytes(0, CMD_WRITE, 1, 0, 32 << 20, &[7u8; 1000]));
    let beside = good_client(&s, WRITE_AND_READ);
    let grown = rss_kib(pid).saturating_sub(before);
    eprintln!(
        "a stalled 32 MiB write: good client {solo:?} alone, {beside:?} beside it; RSS grew {grown} KiB"
    );
    assert!(grown < 96 * 1024, "RSS grew {grown} KiB");
    let t = Instant::now();
    let (st, log) = s.stop_with_log();
    assert!(
        st.success() && t.elapsed() < Duration::from_secs(10),
        "{log}"
    );
    drop(stuck);
}

/// xorshift64: deterministic, so a failure can be replayed.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// What a well-behaved client sends: flags, options, then requests.
fn valid_session(x: &mut u64) -> Vec<u8> {
    let mut b = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let extended = next(x) % 3 == 0;
    if extended {
        b.extend(option_bytes(OPT_EXTENDED_HEADERS, &[]));
    } else if next(x) % 2 == 0 {
        b.extend(option_bytes(OPT_STRUCTURED_REPLY, &[]));
    }
    if next(x) % 2 == 0 {
        b.extend(option_bytes(
            OPT_SET_META_CONTEXT,
            &meta_request("", &["base:allocation"]),
        ));
    }
    b.extend(option_bytes(OPT_LIST, &[]));
    b.extend(option_bytes(OPT_GO, &info_request("", &[INFO_BLOCK_SIZE])));
    for i in 0..(next(x) % 6) {
        let cmd = [
            CMD_READ,
            CMD_WRITE,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_WRITE_ZEROES,
            CMD_BLOCK_STATUS,
        ][(next(x) % 6) as usize];
        let off = (next(x) % 256) * 4096;
        let payload = if cmd == CMD_WRITE {
            vec![0x42; 4096]
        } else {
            Vec::new()
        };
        let len = if cmd == CMD_FLUSH { 0 } else { 4096 };
        if extended {
            b.extend(ext_request_bytes(0, cmd, i, off, len, &payload));
        } else {
            b.extend(request_bytes(0, cmd, i, off, len as u32, &payload));
        }
    }
    b.extend(request_bytes(0, CMD_DISC, 99, 0, 0, &[]));
    b
}

/// A valid session, damaged: cut short, bytes changed, bytes inserted,
/// lengths made huge, or replaced by noise.
fn malformed(x: &mut u64) -> Vec<u8> {
    let mut b = valid_session(x);
    match next(x) % 6 {
        0 => b.truncate((next(x) % b.len() as u64) as usize),
        1 => {
            for _ in 0..(next(x) % 8 + 1) {
                let at = (next(x) % b.len() as u64) as usize;
                b[at] = next(x) as u8;
            }
        }
        2 => {
            let at = (next(x) % b.len() as u64) as usize;
            let junk: Vec<u8> = (0..(next(x) % 64)).map(|_| next(x) as u8).collect();
            b.splice(at..at, junk);
        }
        3 => {
            // A length field (of an option or request) set to its maximum.
            let at = (next(x) % b.len() as u64) as usize & !3;
            for k in at..(at + 4).min(b.len()) {
                b[k] = 0xff;
            }
        }
        4 => b = (0..(next(x) % 512)).map(|_| next(x) as u8).collect(),
        _ => {
            let at = (next(x) % b.len() as u64) as usize;
            b.truncate(at);
            b.extend(std::iter::repeat_n(0xffu8, 64));
        }
    }
    b
}

/// A 64 MiB image whose second 16 MiB hold the byte 0x3c.
///
/// The hostile clients' mutated requests may address any offset, and on a
/// writable disk a legitimate write could land between a good client's
/// write and its read-back; served read-only, every byte the good client
/// reads is known. (Their writes still cross the decoder, and are
/// refused with EPERM.)
fn read_only_disk(dir: &TempDir) -> String {
    let img = dir.path("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&vec![0x3c; 16 << 20], 16 << 20).unwrap();
    img.to_str().unwrap().to_owned()
}

#[test]
fn ten_thousand_malformed_handshakes_and_requests_harm_no_one() {
    const CONNECTIONS: u64 = 10_000;
    let dir = TempDir::new("hostile");
    let img = read_only_disk(&dir);
    let s = Server::start(&["--handshake-timeout=5", "--readonly", "file", &img]);
    let solo = good_client(&s, READ);
    let sock = s.socket.clone();
    let t = Instant::now();
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15 ^ (w + 1);
                for _ in 0..CONNECTIONS / 8 {
                    let bytes = malformed(&mut x);
                    let mut c = UnixStream::connect(&sock).expect("the server accepts");
                    c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                    let _ = c.write_all(&bytes);
                    let mut sink = [0u8; 4096];
                    let _ = c.read(&mut sink);
                }
            })
        })
        .collect();
    // Another client works throughout.
    let beside = good_client(&s, READ);
    for w in workers {
        w.join().unwrap();
    }
    eprintln!(
        "{CONNECTIONS} malformed connections in {:?}; good client {solo:?} alone, {beside:?} beside them",
        t.elapsed()
    );
    assert_eq!(export_size(&s.uri()), "67108864");
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    assert!(
        !log.contains("panic") && !log.contains("internal error"),
        "{log}"
    );
}

#[test]
fn control_characters_in_export_names_are_escaped_in_the_log() {
    let s = Server::start(&["-v", "memory", "1M"]);
    let mut c = RawClient::connect(&s.socket);
    c.info(OPT_GO, "evil\nnbdhost: error: forged\x1b[31m", &[]);
    drop(c);
    let (found, log) = s.wait_log("serving export", Duration::from_secs(5));
    assert!(found, "{log}");
    assert!(
        log.contains("evil\\nnbdhost: error: forged\\u{1b}[31m"),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("nbdhost: error: forged")),
        "{log}"
    );
    assert!(!log.contains('\x1b'), "{log}");
    s.stop();
}
