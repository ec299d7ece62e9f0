//! Acknowledged means durable: a write sent with FUA and a FLUSH are
//! answered only after the data went to `fdatasync` (seen with strace), on
//! the file plugin and through the luks filter; and every write a client
//! saw acknowledged is in the file after the server is killed with SIGKILL.
//!
//! (The cow filter is not here on purpose: its overlay is thrown away when
//! the server exits, so there is nothing for a flush to make durable.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbdhost_tests::{
    client, filter_arg, nbdhost_bin, plugin, run_ok, sparse_file, Server, TempDir,
};

/// A LUKS1 image made by cryptsetup, with a cheap key derivation.
fn luks_image(dir: &TempDir, size: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = dir.path("luks.img");
    let pw = dir.path("pw");
    std::fs::write(&pw, "durable").unwrap();
    run_ok(Command::new("truncate").args(["-s", size]).arg(&img));
    run_ok(
        Command::new("cryptsetup")
            .args(["-q", "luksFormat", "--type", "luks1", "--pbkdf", "pbkdf2"])
            .args(["--iter-time", "10", "--key-file"])
            .arg(&pw)
            .arg(&img),
    );
    (img, pw)
}

/// One system call in an `strace -f` log: where it started and ended
/// (line numbers), its name and its text.
struct Call {
    start: usize,
    end: usize,
    name: String,
    text: String,
}

/// Parse `strace -f` output, joining calls that were interrupted by other
/// threads (`<unfinished ...>` / `<... NAME resumed>`).
fn calls(trace: &str) -> Vec<Call> {
    let mut out: Vec<Call> = Vec::new();
    let mut open: Vec<(String, usize)> = Vec::new();
    for (i, line) in trace.lines().enumerate() {
        let mut rest = line.trim_start();
        // "[pid  N] " or "N " prefixes.
        if let Some(p) = rest.strip_prefix("[pid") {
            rest = p.split_once(']').map_or(p, |(_, r)| r).trim_start();
        } else if let Some((pid, r)) = rest.split_once(' ') {
            if pid.chars().all(|c| c.is_ascii_digit()) {
                rest = r.trim_start();
            }
        }
        if let Some(r) = rest.strip_prefix("<... ") {
            let name = r.split(' ').next().unwrap_or_default();
            if let Some(pos) = open.iter().position(|(n, _)| n == name) {
                let (name, at) = open.remove(pos);
                let start_text = trace.lines().nth(at).unwrap_or_default().to_string();
                out.push(Call {
                    start: at,
                    end: i,
                    name,
                    text: start_text + r,
                });
            }
            continue;
        }
        let Some(paren) = rest.find('(') else {
            continue;
        };
        let name = rest[..paren].to_string();
        if rest.ends_with("<unfinished ...>") {
            open.push((name, i));
        } else {
            out.push(Call {
                start: i,
                end: i,
                name,
                text: rest.to_string(),
            });
        }
    }
    out.sort_by_key(|c| c.start);
    out
}

/// The hex strace prints (`-xx`) for a simple reply with `cookie`.
fn reply_hex(cookie: u64) -> String {
    let mut b = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0];
    b.extend_from_slice(&cookie.to_be_bytes());
    b.iter().map(|x| format!("\\x{x:02x}")).collect()
}

/// Serve `args` under strace while nbdsh writes 4 KiB with FUA (cookie 1),
/// writes without it (cookie 2) and flushes (cookie 3); then check that
/// the replies to 1 and 3 were sent only after an `fdatasync` that
/// finished after the last write before them.
fn check_fua_and_flush_order(dir: &TempDir, args: &[&str]) {
    let sock = dir.path("nbd.sock");
    let pidfile = dir.path("pid");
    let trace = dir.path("trace");
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-xx",
            "-s",
            "32",
            "-e",
            "trace=pwrite64,fdatasync,fsync,writev,sendmsg",
        ])
        .arg("-o")
        .arg(&trace)
        .arg(nbdhost_bin())
        .args(["-f", "-v", "-P"])
        .arg(&pidfile)
        .arg("-U")
        .arg(&sock)
        .args(args)
        // LeakSanitizer cannot run under ptrace; in `make asan` the rest
        // of AddressSanitizer still checks this server.
        .env("ASAN_OPTIONS", asan_options_without_leaks())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace is installed (scripts/install-deps)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(sock.exists() && pidfile.exists()) {
        assert!(
            Instant::now() < deadline,
            "nbdhost did not start under strace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    run_ok(client("nbdsh").args([
        "-u",
        &uri,
        "-c",
        "h.pwrite(b'A' * 4096, 0, nbd.CMD_FLAG_FUA)\n\
         h.pwrite(b'B' * 4096, 4096)\n\
         h.flush()",
    ]));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signalling the server we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(strace.wait().unwrap().success());
    let trace = std::fs::read_to_string(&trace).unwrap();
    for cookie in [1u64, 3] {
        if let Err(e) = synced_before_reply(&trace, cookie) {
            panic!("{e}:\n{trace}");
        }
    }
}

/// Check in an strace log that the reply with `cookie` was sent only after
/// an `fdatasync` (or `fsync`) that finished after the last write before
/// the reply.
fn synced_before_reply(trace: &str, cookie: u64) -> Result<(), String> {
    let calls = calls(trace);
    let hex = reply_hex(cookie);
    let reply = calls
        .iter()
        .find(|c| matches!(c.name.as_str(), "writev" | "sendmsg") && c.text.contains(&hex))
        .ok_or(format!("no reply {cookie} in the trace"))?;
    let last_write = calls
        .iter()
        .filter(|c| c.name == "pwrite64" && c.end < reply.start)
        .map(|c| c.end)
        .max()
        .ok_or(format!("no write before reply {cookie}"))?;
    let synced = calls.iter().any(|c| {
        matches!(c.name.as_str(), "fdatasync" | "fsync")
            && c.text.contains("= 0")
            && c.end > last_write
            && c.end < reply.start
    });
    if synced {
        Ok(())
    } else {
        Err(format!(
            "reply {cookie} was sent before the data was synced"
        ))
    }
}

#[test]
fn fua_writes_and_flushes_are_answered_after_fdatasync() {
    let dir = TempDir::new("dur-file");
    let img = dir.path("disk.img");
    sparse_file(&img, 1 << 20);
    let p = plugin("file");
    // strace sees the synchronous path's system calls; through io_uring
    // there are none to see (tests/file_uring.rs checks that path's
    // ordering with cachestat).
    check_fua_and_flush_order(
        &dir,
        &[p.to_str().unwrap(), img.to_str().unwrap(), "aio=threads"],
    );
}

#[test]
fn fua_writes_and_flushes_through_luks_are_answered_after_fdatasync() {
    let dir = TempDir::new("dur-luks");
    let (img, pw) = luks_image(&dir, "20M");
    let p = plugin("file");
    let pass = format!("passphrase=+{}", pw.display());
    check_fua_and_flush_order(
        &dir,
        &[
            &filter_arg("luks"),
            p.to_str().unwrap(),
            img.to_str().unwrap(),
            &pass,
            "aio=threads",
        ],
    );
}

/// Four clients (multi-conn) write 4 KiB blocks, each to its own region:
/// even blocks with FUA, odd ones followed by a flush every few writes.
/// Each acknowledged block is printed as "T I" once durable (a FUA write
/// answered, or a plain write followed by an answered flush).
const WRITERS: &str = r#"
import sys, threading, nbd
uri = sys.argv[1]
lock = threading.Lock()
def block(t, i):
    return bytes([(t * 31 + i * 7 + k) % 251 for k in range(16)]) * 256
def writer(t):
    h = nbd.NBD()
    h.connect_uri(uri)
    pending = []
    try:
        for i in range(100000):
            off = (t * 2048 + i % 2048) * 4096
            if i % 2 == 0:
                h.pwrite(block(t, i), off, nbd.CMD_FLAG_FUA)
                done = [i]
            else:
                h.pwrite(block(t, i), off)
                pending.append(i)
                done = []
                if len(pending) == 4:
                    h.flush()
                    done, pending = pending, []
            with lock:
                for d in done:
                    print(t, d, flush=True)
    except Exception:
        pass
threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
for th in threads: th.start()
for th in threads: th.join()
"#;

/// What block `i` of writer `t` holds, as WRITERS writes it.
fn block(t: u64, i: u64) -> Vec<u8> {
    (0..4096)
        .map(|k| ((t * 31 + i * 7 + k % 16) % 251) as u8)
        .collect()
}

/// Run the writers against `s` and kill the server with SIGKILL while they
/// run; returns the blocks they saw acknowledged, the last write to each
/// place winning.
fn write_then_kill(s: &mut Server) -> Vec<(u64, u64)> {
    let w = client("python3")
        .args(["-c", WRITERS, &s.uri()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = s.child.as_ref().unwrap().id() as i32;
    // SAFETY: killing the server we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = s.child.take().unwrap().wait();
    let out = w.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut last = std::collections::HashMap::new();
    for line in text.lines() {
        let mut it = line.split(' ').map(|v| v.parse::<u64>().unwrap());
        let (t, i) = (it.next().unwrap(), it.next().unwrap());
        // A later acknowledged write to the same place wins.
        let place = t * 2048 + i % 2048;
        let e = last.entry(place).or_insert((t, i));
        if i >= e.1 {
            *e = (t, i);
        }
    }
    let acked: Vec<(u64, u64)> = last.into_values().collect();
    assert!(
        acked.len() > 100,
        "too few writes before the kill: {}",
        acked.len()
    );
    acked
}

fn assert_all_present(disk: &[u8], acked: &[(u64, u64)]) {
    eprintln!(
        "{} acknowledged blocks (the last write to each place) checked after SIGKILL",
        acked.len()
    );
    for &(t, i) in acked {
        let off = ((t * 2048 + i % 2048) * 4096) as usize;
        // A writer that wrapped round its region may have written the
        // same place again after block i was acknowledged, and the kill
        // may have come after that write reached the file but before it
        // was answered: any later block of that place is as good.
        let found = (i..100_000)
            .step_by(2048)
            .any(|later| disk[off..off + 4096] == block(t, later)[..]);
        assert!(
            found,
            "writer {t}'s acknowledged block {i} is not in the file"
        );
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = TempDir::new("dur-kill");
    let img = dir.path("disk.img");
    sparse_file(&img, 64 << 20);
    let p = plugin("file");
    let mut s = Server::start(&[p.to_str().unwrap(), img.to_str().unwrap()]);
    let acked = write_then_kill(&mut s);
    assert_all_present(&std::fs::read(&img).unwrap(), &acked);
}

#[test]
fn acknowledged_writes_through_luks_survive_sigkill() {
    let dir = TempDir::new("dur-kill-luks");
    let (img, pw) = luks_image(&dir, "80M");
    let p = plugin("file");
    let pass = format!("passphrase=+{}", pw.display());
    let mut s = Server::start(&[
        &filter_arg("luks"),
        p.to_str().unwrap(),
        img.to_str().unwrap(),
        &pass,
    ]);
    let acked = write_then_kill(&mut s);
    // Read back by qemu's own LUKS driver, not by nbdhost.
    let plain = dir.path("plain.img");
    run_ok(client("qemu-img").args([
        "convert",
        "--object",
        &format!("secret,id=sec0,file={}", pw.display()),
        "--image-opts",
        &format!(
            "driver=luks,file.filename={},key-secret=sec0",
            img.display()
        ),
        "-O",
        "raw",
        plain.to_str().unwrap(),
    ]));
    assert_all_present(&std::fs::read(&plain).unwrap(), &acked);
}

#[test]
fn the_order_check_catches_a_reply_sent_before_the_sync() {
    let reply = reply_hex(1);
    let good = format!(
        "1  pwrite64(5, \"\", 1, 0) = 1\n1  fdatasync(5) = 0\n2  writev(7, [{{iov_base=\"{reply}\"}}], 1) = 16\n"
    );
    assert_eq!(synced_before_reply(&good, 1), Ok(()));
    let early = format!(
        "1  pwrite64(5, \"\", 1, 0) = 1\n1  fdatasync(5 <unfinished ...>\n2  writev(7, [{{iov_base=\"{reply}\"}}], 1) = 16\n1  <... fdatasync resumed>) = 0\n"
    );
    assert!(synced_before_reply(&early, 1).is_err());
}

#[test]
fn the_trace_parser_joins_interrupted_calls() {
    let trace = "10  pwrite64(5, \"\\x41\", 1, 0) = 1\n\
                 10  fdatasync(5 <unfinished ...>\n\
                 11  writev(7, [], 0) = 0\n\
                 10  <... fdatasync resumed>) = 0\n";
    let c = calls(trace);
    assert_eq!(c.len(), 3);
    let sync = c.iter().find(|c| c.name == "fdatasync").unwrap();
    assert_eq!((sync.start, sync.end), (1, 3));
    assert!(sync.text.contains("= 0"));
}

/// The inherited `ASAN_OPTIONS` with leak detection turned off, for a
/// server traced by strace.
fn asan_options_without_leaks() -> String {
    match std::env::var("ASAN_OPTIONS") {
        Ok(o) if !o.is_empty() => format!("{o}:detect_leaks=0"),
        _ => "detect_leaks=0".to_owned(),
    }
}
