//! Hostile clients cost only themselves: connections over the limit are
//! refused, a flood of stalled handshakes locks out no established client
//! and only delays new ones, a handshake carries a bounded number of
//! options, a client without fixed newstyle gets what the protocol
//! prescribes, a write that never arrives and 10,000 malformed handshakes
//! and requests leave the server serving everyone else, and names clients
//! choose cannot forge log lines. (Clients that leave large replies unread
//! are in lifecycle.rs.) Figures are printed with `--nocapture`.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nbdhost_tests::raw::*;
use nbdhost_tests::tls::psk_file;
use nbdhost_tests::{client, export_size, run, run_ok, Server, TempDir};

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

/// Options a handshake may carry by default (nbdkit's bound too).
const MAX_OPTIONS: usize = 32;

/// The option reply types in `bytes`, which must hold whole replies.
fn reply_types(mut bytes: &[u8]) -> Vec<u32> {
    let mut types = Vec::new();
    while bytes.len() >= 20 {
        assert_eq!(bytes[..8], REPLY_MAGIC_OPT.to_be_bytes());
        types.push(u32::from_be_bytes(bytes[12..16].try_into().unwrap()));
        let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
        bytes = &bytes[20 + len..];
    }
    assert!(bytes.is_empty(), "whole replies only");
    types
}

#[test]
fn one_option_beyond_the_bound_closes_the_connection() {
    let s = Server::start(&["memory", "1M"]);
    let mut c = RawClient::connect(&s.socket);
    for _ in 0..MAX_OPTIONS {
        c.expect_opt(99, &[], REP_ERR_UNSUP);
    }
    c.option(99, &[]);
    assert!(c.wait_closed().is_empty(), "no reply beyond the bound");
    let (found, log) = s.wait_log(
        &format!("more than {MAX_OPTIONS} options"),
        Duration::from_secs(5),
    );
    assert!(found, "{log}");
    assert_eq!(export_size(&s.uri()), "1048576");
    assert!(s.stop().success());
}

#[test]
fn options_pipelined_before_starttls_are_cut_off_at_the_bound() {
    let dir = TempDir::new("bound");
    let keys = psk_file(&dir, &["rich"]);
    let s = Server::start(&["--tls-psk", keys.to_str().unwrap(), "memory", "1M"]);
    let mut c = RawClient::connect(&s.socket);
    let flood: Vec<u8> = std::iter::repeat_n(option_bytes(OPT_LIST, &[]), 400)
        .chain([option_bytes(OPT_STARTTLS, &[])])
        .flatten()
        .collect();
    let _ = c.s.write_all(&flood);
    assert_eq!(
        reply_types(&c.wait_closed()),
        [REP_ERR_TLS_REQD; MAX_OPTIONS],
        "the options within the bound are answered, the rest never read"
    );
    let uri = format!(
        "nbds+unix://rich@/?socket={}&tls-psk-file={}",
        s.socket.display(),
        keys.display()
    );
    assert_eq!(export_size(&uri), "1048576");
    assert!(s.stop().success());
}

#[test]
fn starttls_from_a_client_without_fixed_newstyle_is_invalid() {
    let dir = TempDir::new("nonfixed");
    let keys = psk_file(&dir, &["rich"]);
    let s = Server::start(&["--tls-psk", keys.to_str().unwrap(), "memory", "1M"]);
    let mut c = RawClient::greeted(&s.socket);
    c.send(&0u32.to_be_bytes());
    c.expect_opt(OPT_STARTTLS, &[], REP_ERR_INVALID);
    // Still in clear: TLS needs fixed newstyle.
    c.expect_opt(OPT_ABORT, &[], REP_ACK);
    assert!(s.stop().success());
}

#[test]
fn a_client_without_fixed_newstyle_is_served_by_export_name() {
    let s = Server::start(&["memory", "1M"]);
    // libnbd without NBD_FLAG_C_FIXED_NEWSTYLE sends only
    // NBD_OPT_EXPORT_NAME.
    let script = format!(
        "h.set_handshake_flags(0)\n\
         h.connect_uri({:?})\n\
         print(h.get_protocol(), h.get_size())",
        s.uri()
    );
    let out = run_ok(client("nbdsh").args(["-c", &script]));
    assert_eq!(out.trim(), "newstyle 1048576");
    assert!(s.stop().success());
}

/// `n` connections that read the greeting, so the server has taken them
/// on, and then say nothing.
fn stalled(s: &Server, n: usize) -> Vec<RawClient> {
    (0..n).map(|_| RawClient::greeted(&s.socket)).collect()
}

/// Whether a new connection is closed without a greeting.
fn refused(s: &Server) -> bool {
    RawClient::connect_only(&s.socket).wait_closed().is_empty()
}

#[test]
fn stalled_handshakes_at_the_cap_leave_established_clients_served() {
    let s = Server::start(&["--max-handshakes=4", "memory", "1M"]);
    // More established clients than the cap: they count only against
    // --max-connections.
    let mut established: Vec<RawClient> = (0..6)
        .map(|_| {
            let mut c = RawClient::connect(&s.socket);
            c.go();
            c
        })
        .collect();
    let _stalled = stalled(&s, 4);
    assert!(refused(&s), "the cap is full");
    for (i, c) in established.iter_mut().enumerate() {
        let data = vec![i as u8 + 1; 4096];
        let at = 4096 * i as u64;
        c.write(1, at, &data);
        assert_eq!(c.simple(), (0, 1));
        assert_eq!(c.read_ok(2, at, 4096), data);
    }
    assert!(s.stop().success());
}

#[test]
fn a_client_refused_at_the_handshake_cap_is_admitted_once_stalled_ones_close() {
    let s = Server::start(&["--max-handshakes=4", "memory", "1M"]);
    let stalled = stalled(&s, 4);
    let out = run(client("nbdinfo").arg("--size").arg(s.uri()));
    assert!(!out.status.success(), "nbdinfo served at the cap");
    let (found, log) = s.wait_log("(--max-handshakes)", Duration::from_secs(5));
    assert!(found, "{log}");
    let t = Instant::now();
    drop(stalled);
    // Well within the 10 s timeout: the closes freed the cap.
    while !run(client("nbdinfo").arg("--size").arg(s.uri()))
        .status
        .success()
    {
        assert!(t.elapsed() < Duration::from_secs(5), "still refused");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.stop().success());
}

#[test]
fn a_client_refused_at_the_handshake_cap_is_admitted_once_stalled_ones_time_out() {
    let s = Server::start(&["--max-handshakes=4", "--timeout=2s", "memory", "1M"]);
    let mut stalled = stalled(&s, 4);
    assert!(!run(client("nbdinfo").arg("--size").arg(s.uri()))
        .status
        .success());
    for c in &mut stalled {
        assert!(c.wait_closed().is_empty(), "dropped without a word");
    }
    assert_eq!(export_size(&s.uri()), "1048576");
    assert!(s.stop().success());
}

#[test]
fn refusals_at_the_handshake_cap_are_logged_once_a_second_with_a_count() {
    let s = Server::start(&["--max-handshakes=2", "memory", "1M"]);
    let _stalled = stalled(&s, 2);
    for _ in 0..50 {
        assert!(refused(&s));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    let counts: Vec<usize> = log
        .lines()
        .filter(|l| l.contains("(--max-handshakes)"))
        .map(|l| {
            let n = l.split("refused ").nth(1).unwrap();
            n.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(
        (1..=4).contains(&counts.len()) && counts.iter().sum::<usize>() == 50,
        "{log}"
    );
}

#[test]
fn nbdinfo_lists_a_hundred_exports() {
    let dir = TempDir::new("exports");
    let socket = dir.path("nbd.sock");
    let mut text = format!("[server]\nlisten = [{:?}]\n", socket.display().to_string());
    for i in 0..100 {
        text += &format!(
            "\n[[export]]\nname = \"disk{i:03}\"\nplugin = \"memory\"\nparams = {{ size = \"1M\" }}\n"
        );
    }
    let file = dir.path("nbdhost.toml");
    std::fs::write(&file, text).unwrap();
    let s = Server::start_config(&file, &[], &socket);
    // One connection: NBD_OPT_LIST, then NBD_OPT_INFO and
    // NBD_OPT_LIST_META_CONTEXT for every export.
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let out = run_ok(client("nbdinfo").args(["--list", &uri]));
    let listed = out.lines().filter(|l| l.starts_with("export=")).count();
    assert_eq!(listed, 100, "{out}");
    assert!(s.stop().success());
}
