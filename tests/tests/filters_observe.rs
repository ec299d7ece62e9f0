//! The filters that watch or disturb traffic — log, stats, error, delay
//! and rate — driven by real clients (qemu-io, nbdcopy, nbdinfo, nbdsh)
//! and judged by what those clients see and what the filters write.
//!
//! Timing checks are lower bounds only: a loaded machine can make
//! anything slower, never faster.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nbdhost_tests::{
    client, export_size, filter_arg, nbdsh, pattern, run, run_ok, Server, TempDir,
};

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = client("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(c.arg(uri))
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let out = qemu_io(uri, cmds);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io {cmds:?} failed:\n{text}");
    text
}

/// Whether `line` starts with an nbdkit-style `YYYY-MM-DD HH:MM:SS.uuuuuu `
/// timestamp.
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 27
        && b.iter().take(26).enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b' ',
            13 | 16 => c == b':',
            19 => c == b'.',
            _ => c.is_ascii_digit(),
        })
        && b[26] == b' '
}

/// The log's lines without their timestamps.
fn log_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|l| {
            assert!(has_timestamp(l), "line without a timestamp: {l:?}\n{text}");
            l[27..].to_string()
        })
        .collect()
}

/// The first request line (one ending in `...`) containing all of
/// `parts`, and the line with its result.
fn request<'a>(lines: &'a [String], parts: &[&str]) -> (&'a str, &'a str) {
    let start = lines
        .iter()
        .find(|l| l.ends_with(" ...") && parts.iter().all(|p| l.contains(p)))
        .unwrap_or_else(|| panic!("no request with {parts:?} in:\n{}", lines.join("\n")));
    // "connection=N Act id=M ..." → the matching "connection=N ...Act id=M ".
    let mut w = start.split(' ');
    let (conn, act, id) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
    let want = format!("{conn} ...{act} {id} ");
    let end = lines
        .iter()
        .find(|l| l.starts_with(&want))
        .unwrap_or_else(|| panic!("no result for {start:?} in:\n{}", lines.join("\n")));
    (start.as_str(), end.as_str())
}

#[test]
fn log_records_each_request_with_its_result() {
    let dir = TempDir::new("log");
    let logfile = dir.path("requests.log");
    let inject = dir.path("inject");
    let data = dir.path("data.img");
    std::fs::write(&data, pattern(4 << 20, 7)).unwrap();
    // The error filter below the log makes reads fail on demand, so the
    // log must show a failure it did not cause.
    let s = Server::start(&[
        &filter_arg("log"),
        &filter_arg("error"),
        "memory",
        "16M",
        &format!("logfile={}", logfile.display()),
        "error-pread-rate=1",
        &format!("error-pread-file={}", inject.display()),
    ]);
    let uri = s.uri();
    qemu_io_ok(
        &uri,
        &[
            "write -P 1 0 64k",
            "read 64k 4k",
            "discard 1M 1M",
            "write -z 2M 64k",
            "flush",
        ],
    );
    std::fs::write(&inject, "").unwrap();
    let out = qemu_io(&uri, &["read 0 512"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Input/output error"),
        "{out:?}"
    );
    std::fs::remove_file(&inject).unwrap();
    // Many requests in flight on several connections at once.
    run_ok(client("nbdcopy").arg(&data).arg(&uri));
    let map = run_ok(client("nbdinfo").arg("--map").arg(&uri));
    assert!(s.stop().success());

    let lines = log_lines(&logfile);
    assert_eq!(lines[0], "Ready", "{lines:#?}");
    // Each connection is first offered to the layers, numbered apart.
    assert_eq!(lines[1], "Preconnect id=1 readonly=0 ...", "{lines:#?}");
    assert!(lines.contains(&"...Preconnect id=1 return=0".to_string()));
    let connect = lines
        .iter()
        .find(|l| l.starts_with("connection=1 Connect "))
        .expect("a Connect line");
    assert!(
        connect.starts_with("connection=1 Connect export=\"\" tls=0 size=0x1000000 ")
            && connect.contains(" write=1 "),
        "{lines:#?}"
    );
    let (w, r) = request(
        &lines,
        &["connection=1 Write ", "offset=0x0 count=0x10000 "],
    );
    assert!(r.ends_with("return=0"), "{w} / {r}");
    let (_, r) = request(&lines, &["Read ", "offset=0x10000 count=0x1000 ..."]);
    assert!(r.ends_with("return=0"), "{r}");
    let (_, r) = request(&lines, &["Trim ", "offset=0x100000 count=0x100000 "]);
    assert!(r.ends_with("return=0"), "{r}");
    let (z, _) = request(&lines, &["Zero ", "offset=0x200000 count=0x10000 "]);
    assert!(z.contains(" trim=0 ") && z.contains(" fast=0 "), "{z}");
    request(&lines, &["connection=1 Flush "]);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("connection=1 Disconnect transactions=")),
        "{lines:#?}"
    );
    let (failed, r) = request(&lines, &["Read ", "offset=0x0 count=0x200 ..."]);
    assert!(failed.starts_with("connection=2 "), "{failed}");
    assert!(r.ends_with("return=-1 error=EIO"), "{r}");
    // nbdinfo's map is logged with the extents it was given.
    let (_, ex) = request(&lines, &["Extents ", "offset=0x0 count=0x1000000 "]);
    assert!(
        ex.contains("extents=(0x0 ") && ex.ends_with(") return=0"),
        "{ex}\n{map}"
    );

    // Under parallel load every line is whole and of a known kind (so no
    // data leaks in), and every request that started also ended.
    let starts: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("connection=") && l.ends_with(" ..."))
        .collect();
    let writes = starts
        .iter()
        .filter(|l| l.contains(" Write ") && !l.starts_with("connection=1 "))
        .count();
    assert!(writes >= 16, "expected nbdcopy's writes: {lines:#?}");
    for l in &starts {
        let mut w = l.split(' ');
        let (conn, act, id) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
        let end = format!("{conn} ...{act} {id} ");
        assert_eq!(
            lines.iter().filter(|l| l.starts_with(&end)).count(),
            1,
            "{l}"
        );
    }
    for l in &lines {
        let ok = l == "Ready"
            || l.starts_with("Preconnect id=")
            || l.starts_with("...Preconnect id=")
            || (l.starts_with("connection=")
                && [" Connect ", " Disconnect ", " ..."]
                    .iter()
                    .any(|k| l.contains(k)));
        assert!(ok, "unexpected line {l:?}");
    }
}

#[test]
fn log_appends_when_asked() {
    let dir = TempDir::new("logappend");
    let logfile = dir.path("l.log");
    std::fs::write(&logfile, "earlier line\n").unwrap();
    let s = Server::start(&[
        &filter_arg("log"),
        "memory",
        "1M",
        &format!("logfile={}", logfile.display()),
        "logappend=true",
    ]);
    export_size(&s.uri());
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&logfile).unwrap();
    assert!(text.starts_with("earlier line\n"), "{text}");
    assert!(text.contains(" Ready\n"), "{text}");
    // nbdkit's numbers: 2 is a layer below that zeroes natively.
    assert!(text.contains(" zero=2 "), "{text}");
}

#[test]
fn log_notes_the_fork_to_the_background() {
    let dir = TempDir::new("logfork");
    let (logfile, pidfile) = (dir.path("l.log"), dir.path("pid"));
    run_ok(
        Command::new(nbdhost_tests::nbdhost_bin())
            .arg("-U")
            .arg(dir.path("sock"))
            .arg("-P")
            .arg(&pidfile)
            .arg(filter_arg("log"))
            .args(["memory", "1M"])
            .arg(format!("logfile={}", logfile.display())),
    );
    // The parent returns at once; the child writes both soon after.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = || {
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let log = std::fs::read_to_string(&logfile).unwrap_or_default();
        (pid.ends_with('\n') && log.contains(" Fork\n")).then_some(pid)
    };
    let pid = loop {
        if let Some(pid) = ready() {
            break pid;
        }
        assert!(Instant::now() < deadline, "no Fork line");
        std::thread::sleep(Duration::from_millis(20));
    };
    run_ok(Command::new("kill").arg(pid.trim()));
    assert_eq!(log_lines(&logfile)[..2], ["Ready", "Fork"]);
}

#[test]
fn log_with_neither_file_nor_script_is_inactive() {
    let s = Server::start(&[&filter_arg("log"), "memory", "1M"]);
    assert_eq!(export_size(&s.uri()), "1048576");
    assert!(s.stop().success());
}

#[test]
fn log_script_gets_each_entry_as_shell_variables() {
    let dir = TempDir::new("logscript");
    let out = dir.path("entries");
    let script = format!(
        "echo \"$type $act id=$id conn=$connection offset=$offset return=$return error=$error\" >> {}",
        out.display()
    );
    let s = Server::start(&[
        &filter_arg("log"),
        &filter_arg("error"),
        "memory",
        "1M",
        &format!("logscript={script}"),
        "error-pwrite-rate=1",
    ]);
    qemu_io(&s.uri(), &["read 4k 512", "write 0 512"]);
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "PRINT Ready id= conn= offset= return= error=",
        "ENTER Read id=1 conn=1 offset=0x1000 return= error=",
        "LEAVE Read id=1 conn=1 offset= return=0 error=",
        "ENTER Write id=2 conn=1 offset=0x0 return= error=",
        "LEAVE Write id=2 conn=1 offset= return=-1 error=EIO",
    ] {
        assert!(lines.contains(&want), "no {want:?} in\n{text}");
    }
}

#[test]
fn stats_are_printed_at_exit() {
    let dir = TempDir::new("stats");
    let statsfile = dir.path("stats.txt");
    let s = Server::start(&[
        &filter_arg("stats"),
        "memory",
        "16M",
        &format!("statsfile={}", statsfile.display()),
    ]);
    qemu_io_ok(
        &s.uri(),
        &[
            "write -P 7 0 64k",
            "write -P 7 64k 64k",
            "write -P 7 128k 64k",
            "read -P 7 0 192k",
            "discard 1M 1M",
        ],
    );
    // Nothing is printed before the server exits.
    assert_eq!(std::fs::read_to_string(&statsfile).unwrap(), "");
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&statsfile).unwrap();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
    };
    assert!(line("total: ").contains(" ops, "), "{text}");
    let w = line("write: 3 ops, ");
    assert!(w.contains(" 192.00 KiB, "), "{text}");
    let r = line("read: 1 ops, ");
    assert!(r.contains(" 192.00 KiB, "), "{text}");
    assert!(line("trim: 1 ops, ").contains(" 1.00 MiB, "), "{text}");
    assert!(
        text.contains("16 bits: 100.0% (3 reqs, 192.00 KiB total)"),
        "{text}"
    );
    assert!(text.matches("  Latency histogram:").count() >= 3, "{text}");
    assert!(text.contains(" us: "), "{text}");
}

#[test]
fn stats_go_to_stderr_and_count_failures() {
    let s = Server::start(&[
        &filter_arg("stats"),
        &filter_arg("error"),
        "memory",
        "1M",
        "error-pread-rate=1",
        "statsthreshold=0",
    ]);
    let out = qemu_io(&s.uri(), &["write 0 4k", "read 0 4k", "read 4k 4k"]);
    assert!(!out.status.success(), "reads should have failed");
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{st}: {log}");
    assert!(
        log.contains("\nwrite: 1 ops, ") || log.starts_with("write: 1 ops, "),
        "{log}"
    );
    assert!(
        log.contains("read: 0 ops, ") && log.contains("  errors: 2"),
        "{log}"
    );
    assert!(!log.contains("alignment breakdown"), "threshold 0: {log}");
}

#[test]
fn error_filter_fails_reads_and_lets_writes_through() {
    let s = Server::start(&[&filter_arg("error"), "memory", "1M", "error-pread-rate=1"]);
    let out = qemu_io(&s.uri(), &["write -P 0x55 0 64k", "read -P 0x55 0 64k"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("wrote 65536/65536 bytes at offset 0"),
        "{text}"
    );
    assert!(text.contains("read failed: Input/output error"), "{text}");
    assert!(
        s.log_text().contains("injecting EIO error into pread"),
        "{}",
        s.log_text()
    );
    assert!(s.stop().success());
}

#[test]
fn error_file_switches_injection_on_and_off_live() {
    let dir = TempDir::new("errfile");
    let inject = dir.path("inject");
    let s = Server::start(&[
        &filter_arg("error"),
        "memory",
        "1M",
        "error=ENOSPC",
        "error-rate=100%",
        &format!("error-file={}", inject.display()),
    ]);
    // One connection throughout: the switch must act on it while open.
    let out = nbdsh(
        &s.uri(),
        &format!(
            r#"
import os
def errno(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        return e.errno
h.pwrite(b"\x42" * 4096, 0)
assert h.pread(4096, 0) == b"\x42" * 4096
open("{inject}", "w").close()
print("on", errno(lambda: h.pwrite(b"\x43" * 4096, 0)), errno(lambda: h.pread(4096, 0)), errno(lambda: h.flush()))
os.remove("{inject}")
print("off", errno(lambda: h.pread(4096, 0)))
assert h.pread(4096, 0) == b"\x42" * 4096
"#,
            inject = inject.display()
        ),
    );
    assert!(out.contains("on ENOSPC ENOSPC ENOSPC"), "{out}");
    assert!(out.contains("off ok"), "{out}");
    assert!(s.stop().success());
}

#[test]
fn error_rate_is_a_probability() {
    let s = Server::start(&[&filter_arg("error"), "memory", "1M", "error-rate=0.5"]);
    let out = nbdsh(
        &s.uri(),
        r#"
failed = 0
for i in range(400):
    try:
        h.pread(512, 0)
    except nbd.Error:
        failed += 1
print("failed", failed)
"#,
    );
    let failed: u32 = out
        .trim()
        .strip_prefix("failed ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    // Binomial(400, 0.5): 100..300 is more than ten standard deviations.
    assert!((100..300).contains(&failed), "{failed} of 400 failed");
    assert!(s.stop().success());
}

#[test]
fn delay_holds_each_kind_of_request() {
    let s = Server::start(&[
        &filter_arg("delay"),
        "memory",
        "1M",
        "rdelay=0.3",
        "wdelay=200ms",
        "delay-zero=250ms",
        "delay-fast-zero=false",
    ]);
    let out = nbdsh(
        &s.uri(),
        r#"
import time
def took(f):
    t = time.monotonic()
    f()
    return time.monotonic() - t
r = took(lambda: h.pread(4096, 0))
w = took(lambda: h.pwrite(b"x" * 4096, 0))
z = took(lambda: h.zero(4096, 0))
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    fast = "ok"
except nbd.Error as e:
    fast = e.errno
print(r, w, z, fast)
"#,
    );
    let v: Vec<&str> = out.split_whitespace().collect();
    let secs = |i: usize| -> f64 { v[i].parse().unwrap_or_else(|_| panic!("{out}")) };
    assert!(secs(0) >= 0.3, "read took {} s", secs(0));
    assert!(secs(1) >= 0.2, "write took {} s", secs(1));
    assert!(secs(2) >= 0.25, "zero took {} s", secs(2));
    assert_eq!(v[3], "ENOTSUP", "{out}");
    assert!(s.stop().success());
}

#[test]
fn delay_close_holds_a_graceful_disconnect() {
    let s = Server::start(&[&filter_arg("delay"), "memory", "1M", "delay-close=400ms"]);
    // libnbd's shutdown sends NBD_CMD_DISC and waits for the server to
    // close the connection, which it does once the handle is closed.
    let out = nbdsh(
        &s.uri(),
        "import time\nt = time.monotonic()\nh.shutdown()\nprint(time.monotonic() - t)",
    );
    let took: f64 = out.trim().parse().unwrap_or_else(|_| panic!("{out}"));
    assert!(took >= 0.4, "the disconnect took {took} s");
    assert!(s.stop().success());
}

#[test]
fn delay_open_slows_the_handshake() {
    let s = Server::start(&[&filter_arg("delay"), "memory", "1M", "delay-open=400ms"]);
    let t = Instant::now();
    export_size(&s.uri());
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert!(s.stop().success());
}

/// A request asleep in the delay or rate filter must not hold up a
/// shutdown: the host's sleep ends at once and the request fails.
#[test]
fn shutdown_cuts_long_delays_and_rate_waits_short() {
    for args in [
        &[&filter_arg("delay") as &str, "memory", "1M", "rdelay=60"][..],
        &[
            &filter_arg("rate"),
            "memory",
            "1M",
            "rate=8K",
            "burstiness=0.001",
        ][..],
    ] {
        let s = Server::start(args);
        let reader = client("qemu-io")
            .args(["-f", "raw", "-c", "read 0 64k"])
            .arg(s.uri())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let (st, log) = s.stop_with_log();
        let took = t.elapsed();
        assert!(
            st.success() && took < Duration::from_secs(5),
            "{args:?}: exit {st} after {took:?}\n{log}"
        );
        let out = reader.wait_with_output().unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("read 65536/65536"),
            "{args:?}: the read should have been cut short"
        );
    }
}

#[test]
fn rate_limits_the_whole_server() {
    let dir = TempDir::new("rate");
    let src = dir.path("src.img");
    std::fs::write(&src, pattern(1 << 20, 9)).unwrap();
    // 8 Mbit/s is 1 MiB/s; the bucket holds a quarter second of it.
    let s = Server::start(&[
        &filter_arg("rate"),
        "memory",
        "1M",
        "rate=8M",
        "burstiness=0.25",
    ]);
    let t = Instant::now();
    // nbdcopy spreads the copy over several connections; the limit is
    // for all of them together.
    run_ok(client("nbdcopy").arg(&src).arg(s.uri()));
    let took = t.elapsed();
    // 1 MiB minus the 256 KiB burst at 1 MiB/s.
    assert!(took >= Duration::from_millis(700), "copy took {took:?}");
    assert!(s.stop().success());
}

#[test]
fn rate_file_changes_the_connection_limit_live() {
    let dir = TempDir::new("ratefile");
    let file = dir.path("rate");
    let s = Server::start(&[
        &filter_arg("rate"),
        "memory",
        "1M",
        &format!("connection-rate-file={}", file.display()),
        "burstiness=0.25",
    ]);
    let out = nbdsh(
        &s.uri(),
        &format!(
            r#"
import os, time
def took(f):
    t = time.monotonic()
    f()
    return time.monotonic() - t
data = b"r" * (512 * 1024)
before = took(lambda: h.pwrite(data, 0))
# Replaced atomically, as the manual asks.
with open("{file}.new", "w") as f:
    f.write("4M\n")
os.rename("{file}.new", "{file}")
time.sleep(0.3)
after = took(lambda: h.pwrite(data, 0))
print(before, after)
"#,
            file = file.display()
        ),
    );
    let v: Vec<f64> = out
        .split_whitespace()
        .map(|x| x.parse().unwrap_or_else(|_| panic!("{out}")))
        .collect();
    // 4 Mbit of data at 4 Mbit/s, less a full bucket of 1 Mbit.
    assert!(v[1] >= 0.7, "limited write took {} s", v[1]);
    assert!(v[0] < v[1], "the write before the limit was slower: {v:?}");
    assert!(s.stop().success());
}
