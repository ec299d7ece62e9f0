//! nbdkit's filters for unreliable sources, native: retry (reopen the
//! layer below and retry), retry-request (retry on the same handle) and
//! pause (hold requests while a control socket says so). The layer below
//! is an nbdkit `eval` plugin, through nbdhost's adapter, that fails on
//! purpose and counts what it is asked in files, as nbdkit's own
//! test-retry*.sh do; delays are a tenth of a second, except where the
//! same command line is served by nbdkit too, which takes whole seconds.

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
    let p = Flaky::new("retry-twin", 1, 0, &[]);
    let args = p.command_line(&["--filter=retry", "retry-delay=1"]);
    let seen = same_as_nbdkit(&args, |uri| {
        for f in ["reads", "opens"] {
            let _ = std::fs::remove_file(p.dir.path(f));
        }
        let (r, _) = timed(uri, "h.pread(512, 0)");
        format!("{r} reads={} opens={}", p.count("reads"), p.opens().len())
    });
    if let Some(seen) = seen {
        assert_eq!(seen, "ok reads=2 opens=2");
    }
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
    let p = Flaky::new("rr-twin", 1, 0, &[]);
    let args = p.command_line(&["--filter=retry-request", "retry-request-delay=1"]);
    let seen = same_as_nbdkit(&args, |uri| {
        for f in ["reads", "opens"] {
            let _ = std::fs::remove_file(p.dir.path(f));
        }
        let (r, _) = timed(uri, "h.pread(512, 0)");
        format!("{r} reads={} opens={}", p.count("reads"), p.opens().len())
    });
    if let Some(seen) = seen {
        assert_eq!(seen, "ok reads=2 opens=1");
    }
}
