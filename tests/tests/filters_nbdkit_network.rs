//! nbdkit's filters for unreliable sources, native: retry (reopen the
//! layer below and retry), retry-request (retry on the same handle) and
//! pause (hold requests while a control socket says so). The layer below
//! is an nbdkit `eval` plugin, through nbdhost's adapter, that fails on
//! purpose and counts what it is asked in files, as nbdkit's own
//! test-retry*.sh do; delays are a tenth of a second, except where the
//! same command line is served by nbdkit too, which takes whole seconds.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbdhost_tests::twin::same_as_nbdkit;
use nbdhost_tests::{client, nbdsh, pattern, run, run_ok, Server, TempDir};

/// An `eval` plugin of 64 KiB whose reads fail while fewer than `fails`
/// have been made in all, and whose writes fail the first `write_fails`
/// times; opens are logged with their read-only flag in `opens`, reads
/// counted in `reads`, writes kept in `disk`. `open_fails` lists which
/// opens (counting from 1) fail.
struct Flaky {
    dir: TempDir,
    args: Vec<String>,
}

impl Flaky {
    fn new(tag: &str, fails: u32, write_fails: u32, open_fails: &[u32]) -> Flaky {
        let dir = TempDir::new(tag);
        let d = dir.0.display().to_string();
        std::fs::write(dir.path("disk"), vec![0u8; 65536]).unwrap();
        let fail_opens = open_fails
            .iter()
            .map(|n| {
                format!("[ $n -eq {n} ] && {{ echo 'EIO open {n} fails on purpose' >&2; exit 1; }}")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let open = format!("echo $2 >> {d}/opens\nn=$(wc -l < {d}/opens)\n{fail_opens}\nexit 0");
        let pread = format!(
            "n=$(cat {d}/reads 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/reads\n\
             if [ $n -le {fails} ]; then echo \"EIO read $n fails on purpose\" >&2; exit 1; fi\n\
             dd if={d}/disk skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"
        );
        let pwrite = format!(
            "n=$(cat {d}/writes 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/writes\n\
             if [ $n -le {write_fails} ]; then cat >/dev/null; echo \"EIO write $n fails on purpose\" >&2; exit 1; fi\n\
             dd of={d}/disk seek=$4 oflag=seek_bytes conv=notrunc status=none"
        );
        let args = vec![
            "eval".to_string(),
            "get_size=echo 65536".to_string(),
            format!("open={open}"),
            format!("pread={pread}"),
            format!("pwrite={pwrite}"),
            "flush=exit 0".to_string(),
        ];
        Flaky { dir, args }
    }

    /// The command line: the options among `filter_args`, the plugin and
    /// its parameters, then the filters' parameters.
    fn command_line<'a>(&'a self, filter_args: &[&'a str]) -> Vec<&'a str> {
        let (options, params): (Vec<&str>, Vec<&str>) =
            filter_args.iter().partition(|a| a.starts_with('-'));
        let mut args = options;
        args.extend(self.args.iter().map(String::as_str));
        args.extend(params);
        args
    }

    fn serve(&self, filter_args: &[&str]) -> Server {
        Server::start(&self.command_line(filter_args))
    }

    fn count(&self, what: &str) -> u32 {
        std::fs::read_to_string(self.dir.path(what))
            .map(|s| s.trim().parse().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The read-only flag of each open, in order.
    fn opens(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path("opens"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// The outcome of `statement` in nbdsh against `uri`: `ok` or the errno's
/// name, and the seconds it took.
fn timed(uri: &str, statement: &str) -> (String, f64) {
    let script = format!(
        "import time\n\
         t = time.monotonic()\n\
         try:\n    {statement}\n    r = 'ok'\n\
         except nbd.Error as e:\n    r = e.errno\n\
         print(r, time.monotonic() - t)\n"
    );
    let out = nbdsh(uri, &script);
    let (r, t) = out.trim().split_once(' ').unwrap();
    (r.to_owned(), t.parse().unwrap())
}

// ---- retry ----

#[test]
fn retry_reopens_the_layer_below_and_a_read_then_succeeds() {
    let p = Flaky::new("retry-ok", 2, 0, &[]);
    let s = p.serve(&["--filter=retry", "retries=2", "retry-delay=0.1"]);
    let (r, _) = timed(&s.uri(), "h.pread(512, 0)");
    assert_eq!(r, "ok");
    assert_eq!(p.count("reads"), 3);
    // The client's open, then one reopen after each failure.
    assert_eq!(p.opens(), ["false", "false", "false"]);
    assert!(s.stop().success());
}

#[test]
fn retry_gives_up_after_retries_with_the_layer_below_s_error() {
    let p = Flaky::new("retry-fail", 3, 0, &[]);
    let s = p.serve(&["--filter=retry", "retries=2", "retry-delay=0.1"]);
    let (r, _) = timed(&s.uri(), "h.pread(512, 0)");
    assert_eq!(r, "EIO");
    assert_eq!(p.count("reads"), 3);
    assert!(s.stop().success());
}

#[test]
fn retry_doubles_the_delay_unless_retry_exponential_is_no() {
    let p = Flaky::new("retry-exp", 3, 0, &[]);
    let s = p.serve(&["--filter=retry", "retries=3", "retry-delay=0.2"]);
    // 0.2 + 0.4 + 0.8 seconds.
    let (r, t) = timed(&s.uri(), "h.pread(512, 0)");
    assert_eq!(r, "ok");
    assert!((1.4..3.0).contains(&t), "exponential waits took {t} s");
    assert!(s.stop().success());

    let p = Flaky::new("retry-flat", 3, 0, &[]);
    let s = p.serve(&[
        "--filter=retry",
        "retries=3",
        "retry-delay=0.2",
        "retry-exponential=no",
    ]);
    let (r, t) = timed(&s.uri(), "h.pread(512, 0)");
    assert_eq!(r, "ok");
    assert!((0.6..1.3).contains(&t), "equal waits took {t} s");
    assert!(s.stop().success());
}

#[test]
fn retry_readonly_reopens_read_only_and_then_refuses_writes() {
    let p = Flaky::new("retry-ro", 1, 0, &[]);
    let s = p.serve(&["--filter=retry", "retry-delay=0.1", "retry-readonly=yes"]);
    let script = "
h.pread(512, 0)
try:
    h.pwrite(b'x' * 512, 0)
    print('written')
except nbd.Error as e:
    print(e.errno)
";
    // EROFS travels as NBD's EPERM.
    assert_eq!(nbdsh(&s.uri(), script).trim(), "EPERM");
    assert_eq!(p.opens(), ["false", "true"]);
    assert_eq!(p.count("writes"), 0);
    assert!(s.stop().success());
}

#[test]
fn retry_retries_a_failed_write_after_reopening() {
    let p = Flaky::new("retry-write", 0, 1, &[]);
    let s = p.serve(&["--filter=retry", "retry-delay=0.1"]);
    let data = "b'retried' * 64";
    let script = format!("h.pwrite({data}, 4096)\nprint(h.pread(448, 4096) == {data})");
    assert_eq!(nbdsh(&s.uri(), &script).trim(), "True");
    assert_eq!(p.count("writes"), 2);
    assert_eq!(p.opens().len(), 2);
    assert!(s.stop().success());
}

#[test]
fn retry_keeps_trying_when_a_reopen_fails() {
    // The first reopen (the second open) fails: the next one serves.
    let p = Flaky::new("retry-reopen", 1, 0, &[2]);
    let s = p.serve(&["--filter=retry", "retry-delay=0.1"]);
    let (r, _) = timed(&s.uri(), "h.pread(512, 0)");
    assert_eq!(r, "ok");
    assert_eq!(p.opens().len(), 3);
    assert_eq!(p.count("reads"), 2);
    assert!(s.stop().success());
}

#[test]
fn retry_waits_hold_no_worker_thread() {
    // Every read fails once; eight of them wait their half second
    // together with a single worker thread.
    let dir = TempDir::new("retry-threads");
    let d = dir.0.display().to_string();
    let pread = format!(
        "f={d}/seen-$4\n\
         if [ ! -e $f ]; then : > $f; echo 'EIO first read fails' >&2; exit 1; fi\n\
         head -c $3 /dev/zero"
    );
    let pread = format!("pread={pread}");
    let s = Server::start(&[
        "-t",
        "1",
        "--filter=retry",
        "eval",
        "get_size=echo 65536",
        &pread,
        "retry-delay=0.5",
    ]);
    let script = "
import time
t = time.monotonic()
bufs = [nbd.Buffer(512) for _ in range(8)]
for i, b in enumerate(bufs):
    h.aio_pread(b, i * 512)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(round(time.monotonic() - t, 2))
";
    let t: f64 = nbdsh(&s.uri(), script).trim().parse().unwrap();
    assert!((0.5..2.0).contains(&t), "8 retried reads took {t} s");
    assert!(s.stop().success());
}

#[test]
fn retry_extents_are_retried_too() {
    let dir = TempDir::new("retry-extents");
    let d = dir.0.display().to_string();
    let extents = format!(
        "n=$(cat {d}/n 2>/dev/null || echo 0); echo $((n+1)) > {d}/n\n\
         if [ $n -eq 0 ]; then echo 'EIO extents fail once' >&2; exit 1; fi\n\
         echo 0 32768 hole,zero; echo 32768 32768 0"
    );
    let extents = format!("extents={extents}");
    let s = Server::start(&[
        "--filter=retry",
        "eval",
        "get_size=echo 65536",
        "pread=head -c $3 /dev/zero",
        "can_extents=exit 0",
        &extents,
        "retry-delay=0.1",
    ]);
    let map = run_ok(client("nbdinfo").arg("--map").arg(s.uri()));
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["0", "32768", "3"], "{map}");
    assert_eq!(lines[1][..3], ["32768", "32768", "0"], "{map}");
    assert!(s.stop().success());
}

#[test]
fn retry_shutdown_ends_a_long_retry_delay_at_once() {
    let p = Flaky::new("retry-shutdown", 1, 0, &[]);
    let s = p.serve(&["--filter=retry", "retry-delay=60"]);
    let mut reader = client("nbdsh")
        .args(["-u", &s.uri(), "-c", "h.pread(512, 0)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert!(s.stop().success());
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown waited");
    assert!(!reader.wait().unwrap().success());
}

/// nbdkit's SYNOPSIS, every parameter given, over a disk that does not
/// fail: the client sees the same disk.
#[test]
fn retry_synopsis_is_served_as_nbdkit_serves_it() {
    let dir = TempDir::new("retry-synopsis");
    let img = dir.path("disk.img");
    std::fs::write(&img, pattern(1 << 20, 3)).unwrap();
    let img = img.display().to_string();
    let args = [
        "--filter=retry",
        "file",
        &img,
        "retries=2",
        "retry-delay=1",
        "retry-exponential=no",
        "retry-readonly=yes",
    ];
    let script = "import hashlib\n\
                  print(h.get_size(), h.is_read_only(), hashlib.sha256(h.pread(1 << 20, 0)).hexdigest())";
    same_as_nbdkit(&args, |uri| nbdsh(uri, script));
}

/// nbdkit's EXAMPLE copies a remote ISO with qemu-img through the ssh
/// plugin; here a local file stands in for the remote one (no ssh
/// server), and the copy must hold the same bytes from both servers.
#[test]
fn retry_example_qemu_img_convert_is_the_same_as_nbdkit() {
    let dir = TempDir::new("retry-example");
    let iso = dir.path("test.iso");
    std::fs::write(&iso, pattern(2 << 20, 5)).unwrap();
    let iso_s = iso.display().to_string();
    let out = dir.path("test.qcow2");
    let args = ["file", &iso_s, "--filter=retry"];
    same_as_nbdkit(&args, |uri| {
        let _ = std::fs::remove_file(&out);
        run_ok(
            client("qemu-img")
                .args(["convert", "-f", "raw", uri, "-O", "qcow2"])
                .arg(&out),
        );
        let cmp = run(client("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&iso)
            .arg(&out));
        String::from_utf8_lossy(&cmp.stdout).into_owned()
    });
}

/// One read failing once, with nbdkit's smallest delay: both servers
/// reopen once and answer the read.
#[test]
fn retry_recovers_from_one_failure_as_nbdkit_does() {
    let seen = one_failure_beside_nbdkit("retry-twin", &["--filter=retry", "retry-delay=1"]);
    assert!(seen.is_none_or(|s| s == "ok reads=2 opens=2"));
}

/// One read failing once through `filter_args`, served by nbdkit and
/// nbdhost: what the client got, and how many reads and opens the plugin
/// saw (the same from both, or `None` without nbdkit).
fn one_failure_beside_nbdkit(tag: &str, filter_args: &[&str]) -> Option<String> {
    let p = Flaky::new(tag, 1, 0, &[]);
    let args = p.command_line(filter_args);
    same_as_nbdkit(&args, |uri| {
        for f in ["reads", "opens"] {
            let _ = std::fs::remove_file(p.dir.path(f));
        }
        let (r, _) = timed(uri, "h.pread(512, 0)");
        format!("{r} reads={} opens={}", p.count("reads"), p.opens().len())
    })
}

// ---- retry-request ----

#[test]
fn retry_request_retries_a_read_on_the_same_handle() {
    let p = Flaky::new("rr-ok", 2, 0, &[]);
    let s = p.serve(&[
        "--filter=retry-request",
        "retry-request-retries=2",
        "retry-request-delay=0.1",
    ]);
    let (r, t) = timed(&s.uri(), "h.pread(512, 0)");
    assert_eq!(r, "ok");
    assert!(t >= 0.2, "two delays of 0.1 s, not {t}");
    assert_eq!(p.count("reads"), 3);
    assert_eq!(p.opens().len(), 1, "no reopen");
    assert!(s.stop().success());
}

#[test]
fn retry_request_gives_up_after_its_retries() {
    let p = Flaky::new("rr-fail", 3, 0, &[]);
    let s = p.serve(&[
        "--filter=retry-request",
        "retry-request-retries=2",
        "retry-request-delay=0.1",
    ]);
    assert_eq!(timed(&s.uri(), "h.pread(512, 0)").0, "EIO");
    assert_eq!(p.count("reads"), 3);
    assert!(s.stop().success());

    let p = Flaky::new("rr-none", 1, 0, &[]);
    let s = p.serve(&["--filter=retry-request", "retry-request-retries=0"]);
    assert_eq!(timed(&s.uri(), "h.pread(512, 0)").0, "EIO");
    assert_eq!(p.count("reads"), 1);
    assert!(s.stop().success());
}

#[test]
fn retry_request_retries_a_write() {
    let p = Flaky::new("rr-write", 0, 2, &[]);
    let s = p.serve(&["--filter=retry-request", "retry-request-delay=0.1"]);
    let script = "h.pwrite(b'again' * 100, 1000)\nprint(h.pread(500, 1000) == b'again' * 100)";
    assert_eq!(nbdsh(&s.uri(), script).trim(), "True");
    assert_eq!(p.count("writes"), 3);
    assert!(s.stop().success());
}

#[test]
fn retry_request_retries_the_open_unless_retry_request_open_is_false() {
    let p = Flaky::new("rr-open", 0, 0, &[1]);
    let s = p.serve(&["--filter=retry-request", "retry-request-delay=0.1"]);
    assert_eq!(timed(&s.uri(), "h.pread(512, 0)").0, "ok");
    assert_eq!(p.opens().len(), 2);
    assert!(s.stop().success());

    let p = Flaky::new("rr-noopen", 0, 0, &[1]);
    let s = p.serve(&[
        "--filter=retry-request",
        "retry-request-delay=0.1",
        "retry-request-open=false",
    ]);
    let out = run(client("nbdsh").args(["-u", &s.uri(), "-c", "h.pread(512, 0)"]));
    assert!(!out.status.success(), "the open failed");
    assert_eq!(p.opens(), ["false"]);
    assert!(s.stop().success());
}

/// nbdkit's SYNOPSIS with every parameter, over a disk that does not
/// fail.
#[test]
fn retry_request_synopsis_is_served_as_nbdkit_serves_it() {
    let args = [
        "--filter=retry-request",
        "pattern",
        "1M",
        "retry-request-retries=2",
        "retry-request-delay=1",
        "retry-request-open=false",
    ];
    let script = "import hashlib\n\
                  print(h.get_size(), hashlib.sha256(h.pread(1 << 20, 0)).hexdigest())";
    same_as_nbdkit(&args, |uri| nbdsh(uri, script));
}

#[test]
fn retry_request_recovers_from_one_failure_as_nbdkit_does() {
    let args = ["--filter=retry-request", "retry-request-delay=1"];
    let seen = one_failure_beside_nbdkit("rr-twin", &args);
    assert!(seen.is_none_or(|s| s == "ok reads=2 opens=1"));
}

// ---- pause ----

/// Send `commands` on the pause control socket at `ctl` and read one
/// answer byte for each command that is not white space.
fn control(ctl: &Path, commands: &str) -> String {
    let mut s = UnixStream::connect(ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(commands.as_bytes()).unwrap();
    let want = commands.chars().filter(|c| !c.is_whitespace()).count();
    let mut answer = vec![0u8; want];
    s.read_exact(&mut answer).unwrap();
    String::from_utf8(answer).unwrap()
}

/// Start an nbdsh script in the background.
fn background_nbdsh(uri: &str, script: &str) -> std::process::Child {
    client("nbdsh")
        .args(["-u", uri, "-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn output(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn pause_server(dir: &TempDir, extra: &[&str]) -> (Server, PathBuf) {
    let ctl = dir.path("ctl");
    let arg = format!("pause-control={}", ctl.display());
    let mut args = vec!["--filter=pause"];
    args.extend_from_slice(extra);
    args.push(&arg);
    (Server::start(&args), ctl)
}

#[test]
fn pause_holds_requests_until_resumed() {
    let dir = TempDir::new("pause-hold");
    let (s, ctl) = pause_server(&dir, &["memory", "1M"]);
    assert_eq!(control(&ctl, "p"), "P");
    let reader = background_nbdsh(
        &s.uri(),
        "import time\nt = time.monotonic()\nh.pread(512, 0)\nprint(time.monotonic() - t)",
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(control(&ctl, "r"), "R");
    let waited: f64 = output(reader).parse().unwrap();
    assert!(waited >= 0.5, "the read went through after {waited} s");
    assert!(s.stop().success());
}

#[test]
fn pause_answers_once_the_running_requests_are_answered() {
    let dir = TempDir::new("pause-drain");
    let (s, ctl) = pause_server(&dir, &["--filter=delay", "memory", "1M", "rdelay=800ms"]);
    let reader = background_nbdsh(&s.uri(), "h.pread(512, 0)\nprint('read')");
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    assert_eq!(control(&ctl, "p"), "P");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "P came before the running read was answered"
    );
    assert_eq!(output(reader), "read");
    assert_eq!(control(&ctl, "r"), "R");
    assert!(s.stop().success());
}

#[test]
fn pause_control_ignores_white_space_and_answers_x_to_the_unknown() {
    let dir = TempDir::new("pause-protocol");
    let (s, ctl) = pause_server(&dir, &["memory", "1M"]);
    assert_eq!(control(&ctl, "p\n"), "P");
    assert_eq!(control(&ctl, "rzr pp?r"), "RXRPPXR");
    assert!(s.stop().success());
}

#[test]
fn pause_held_requests_hold_no_thread_and_leave_queries_alone() {
    let dir = TempDir::new("pause-threads");
    // A plugin that blocks, so requests reach the filter on the pool's
    // one worker thread.
    let (s, ctl) = pause_server(
        &dir,
        &[
            "-t",
            "1",
            "eval",
            "get_size=echo 1048576",
            "pread=head -c $3 /dev/zero",
        ],
    );
    assert_eq!(control(&ctl, "p"), "P");
    let script = "
bufs = [nbd.Buffer(512) for _ in range(8)]
for i, b in enumerate(bufs):
    h.aio_pread(b, i * 512)
while h.aio_in_flight() > 0:
    h.poll(-1)
print('all read')
";
    let readers = background_nbdsh(&s.uri(), script);
    std::thread::sleep(Duration::from_millis(300));
    // With the one worker's requests held, a new client still connects
    // and is told the size.
    assert_eq!(nbdhost_tests::export_size(&s.uri()), "1048576");
    assert_eq!(control(&ctl, "r"), "R");
    assert_eq!(output(readers), "all read");
    assert!(s.stop().success());
}

#[test]
fn pause_without_a_control_socket_is_refused() {
    let out = run(
        std::process::Command::new(nbdhost_tests::nbdhost_bin()).args([
            "-U",
            "-",
            "--filter=pause",
            "memory",
            "1M",
            "--run",
            "true",
        ]),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pause-control socket was not set"), "{err}");
}

#[test]
fn pause_shutdown_lets_held_requests_go_and_removes_the_socket() {
    let dir = TempDir::new("pause-shutdown");
    let (s, ctl) = pause_server(&dir, &["memory", "1M"]);
    assert_eq!(control(&ctl, "p"), "P");
    let reader = background_nbdsh(&s.uri(), "h.pread(512, 0)");
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    assert!(s.stop().success());
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown waited");
    let _ = reader.wait_with_output();
    assert!(!ctl.exists(), "the control socket was removed");
}

/// nbdkit's SYNOPSIS, with the memory plugin as PLUGIN: the same answers
/// on the control socket and the same disk.
#[test]
fn pause_synopsis_is_served_as_nbdkit_serves_it() {
    let dir = TempDir::new("pause-synopsis");
    let ctl = dir.path("ctl");
    let arg = format!("pause-control={}", ctl.display());
    let args = ["--filter=pause", "memory", "1M", &arg];
    same_as_nbdkit(&args, |uri| {
        let answers = control(&ctl, "p\nr x");
        let size = nbdhost_tests::export_size(uri);
        format!("{answers} {size}")
    });
}

/// nbdkit's EXAMPLE: a copy through pause and rate is paused and resumed
/// with `echo p` and `echo r` on the socket (here from the test, and a
/// local 4 MiB file for BIG_FILE.ISO), and completes with every byte.
#[test]
fn pause_example_copy_paused_and_resumed_is_the_same_as_nbdkit() {
    let dir = TempDir::new("pause-example");
    let iso = dir.path("big.iso");
    std::fs::write(&iso, pattern(4 << 20, 9)).unwrap();
    let iso_s = iso.display().to_string();
    let ctl = dir.path("sock");
    let arg = format!("pause-control={}", ctl.display());
    let out = dir.path("out");
    let args = [
        "--filter=pause",
        "--filter=rate",
        "file",
        &iso_s,
        "rate=10M",
        &arg,
    ];
    same_as_nbdkit(&args, |uri| {
        let _ = std::fs::remove_file(&out);
        let copy = client("qemu-img")
            .args(["convert", "-f", "raw", uri, "-O", "raw"])
            .arg(&out)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut answers = control(&ctl, "p\n");
        std::thread::sleep(Duration::from_millis(300));
        answers += &control(&ctl, "r\n");
        let copy = copy.wait_with_output().unwrap();
        assert!(copy.status.success());
        let same = std::fs::read(&out).unwrap() == std::fs::read(&iso).unwrap();
        format!("{answers} copied intact: {same}")
    });
}
