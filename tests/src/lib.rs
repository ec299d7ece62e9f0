//! Harness for end-to-end tests: locate the built binaries, start
//! `nbdhost` in the foreground on a private socket, run client programs,
//! and stop the server cleanly.
//!
//! The binaries come from `cargo build --workspace`, which the harness runs
//! itself the first time a test asks for one (see [`ensure_built`]), so a
//! bare `cargo test` works in a fresh clone.

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod raw;
pub mod tls;
pub mod twin;

/// Directory holding the `nbdhost` and plugin shared objects the tests
/// run: `$NBDHOST_TEST_BINDIR` if set (`make asan` points it at
/// instrumented builds, `scripts/check-installed` at an installed
/// server), otherwise the workspace's build directory, built first (see
/// [`ensure_built`]).
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NBDHOST_TEST_BINDIR") {
        return PathBuf::from(d);
    }
    ensure_built();
    build_dir()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, or `target/` at the
/// root of the tree.
fn cargo_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The name of the directory, under cargo's target directory, of the
/// profile this test binary was built with: the one holding the `deps/`
/// that holds the running executable (`debug` for `cargo test`, `release`
/// for `cargo test --release`, a custom profile's name), or else `debug`
/// or `release` as debug assertions say.
fn profile_dir() -> String {
    let exe = std::env::current_exe().ok();
    let deps = exe.as_deref().and_then(Path::parent);
    if let Some(deps) = deps.filter(|d| d.file_name().is_some_and(|n| n == "deps")) {
        if let Some(name) = deps.parent().and_then(Path::file_name) {
            return name.to_string_lossy().into_owned();
        }
    }
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
    .to_owned()
}

/// Where `cargo build --workspace`, in this test binary's profile, puts
/// the server, plugins and filters.
fn build_dir() -> PathBuf {
    cargo_target_dir().join(profile_dir())
}

/// Run `cargo build --workspace` (with `$CARGO`, in this test binary's
/// profile, into [`cargo_target_dir`]) once per test process, before the
/// first test that needs something from the build directory; cargo decides
/// what is stale, so when everything is fresh this costs a tenth of a
/// second. Test binaries running at once (`cargo nextest`, two `cargo
/// test`s) take turns through an `flock` on
/// `nbdhost-tests-build.lock` in the target directory, each building after
/// the other has finished. A failed build fails every test that needed
/// it, with cargo's output.
///
/// Not run when nothing comes from the build directory: with
/// `$NBDHOST_TEST_BINDIR` ([`target_dir`]), or for a plugin or filter
/// found in `$NBDHOST_TEST_PLUGINDIR` / `…FILTERDIR` (`layer_path`). Not
/// run either when `$NBDHOST_TEST_PREBUILT` is set to anything but `0`:
/// the artifacts are taken as they are, for a harness that built them
/// with flags of its own and must not have them rebuilt, or a machine
/// that runs the tests without a toolchain.
pub fn ensure_built() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(build_workspace) {
        panic!("{e}");
    }
}

fn build_workspace() -> Result<(), String> {
    if prebuilt() {
        return Ok(());
    }
    let target = cargo_target_dir();
    std::fs::create_dir_all(&target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    let lock_path = target.join("nbdhost-tests-build.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    if !flock(&lock, libc::LOCK_EX | libc::LOCK_NB)? {
        note(&format!(
            "waiting for another test process's build ({})",
            lock_path.display()
        ));
        flock(&lock, libc::LOCK_EX)?;
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let profile = match profile_dir().as_str() {
        "debug" => "dev".to_owned(),
        p => p.to_owned(),
    };
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--workspace", "--profile", &profile])
        .current_dir(root())
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!(
        "{} build --workspace --profile {profile} (CARGO_TARGET_DIR={})",
        Path::new(&cargo).display(),
        target.display()
    );
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "cannot run {shown}: {e}\n\
             (the end-to-end tests build the workspace first; build it yourself \
             and set NBDHOST_TEST_PREBUILT=1 to skip that)"
        )
    })?;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    // A fresh tree builds in a fraction of a second, silently; a build
    // that takes longer says what the tests are waiting for.
    let start = Instant::now();
    let mut told = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
        if !told && start.elapsed() > Duration::from_secs(5) {
            note(&format!("building the workspace first: {shown}"));
            told = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    if told {
        note(&format!("built in {:.0?}", start.elapsed()));
    }
    if !status.success() {
        return Err(format!(
            "{shown} failed ({status}); the end-to-end tests need what it builds:\n{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        ));
    }
    // Dropping `lock` closes it, which releases the lock.
    Ok(())
}

/// Whether `$NBDHOST_TEST_PREBUILT` says not to build (see [`ensure_built`]).
fn prebuilt() -> bool {
    std::env::var_os("NBDHOST_TEST_PREBUILT").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Take an `flock` on `file`; false if `LOCK_NB` was given and another
/// process holds it.
///
/// `libc`, already a dependency, rather than a locking crate: one call,
/// with exactly cargo's own semantics (released when the file is closed,
/// or when the process dies). `File::lock` is newer than our minimum Rust.
fn flock(file: &std::fs::File, op: libc::c_int) -> Result<bool, String> {
    loop {
        // SAFETY: flock on a descriptor that `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if op & libc::LOCK_NB != 0 => return Ok(false),
            _ => return Err(format!("flock on the build lock: {e}")),
        }
    }
}

/// A line on the terminal even while the test harness captures output
/// (`eprintln!` would be held back until a test fails).
fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "nbdhost-tests: {msg}");
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The root of the source tree.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Compile C `source` into `dir/lib<name>.so` against the plugin headers,
/// with warnings as errors and `extra` compiler arguments (such as `-D`
/// definitions), plus `$NBDHOST_TEST_CFLAGS` (`make asan` sets
/// `-fsanitize=address`).
///
/// Compiling and linking are separate steps so that sanitizer flags reach
/// the code but not the link: an instrumented plugin then takes its
/// sanitizer runtime from the (instrumented) server that loads it rather
/// than bringing the C compiler's own.
pub fn build_c(dir: &TempDir, name: &str, source: &Path, extra: &[&str]) -> PathBuf {
    let obj = dir.path(&format!("{name}.o"));
    let out = dir.path(&format!("lib{name}.so"));
    let env_flags = std::env::var("NBDHOST_TEST_CFLAGS").unwrap_or_default();
    run_ok(
        Command::new("cc")
            .args(env_flags.split_whitespace())
            .args(extra)
            .args([
                "-c",
                "-fPIC",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wno-unused-parameter",
                "-o",
            ])
            .arg(&obj)
            .arg("-I")
            .arg(root().join("plugin-api/include"))
            .arg(source),
    );
    run_ok(
        Command::new("cc")
            .arg("-shared")
            .arg("-o")
            .arg(&out)
            .arg(&obj),
    );
    out
}

/// The serial C test plugin (`tests/c/serial.c`), which catches calls that
/// overlap, built with thread model `NBDHOST_THREAD_MODEL_<model>`.
pub fn serial_plugin(dir: &TempDir, model: &str) -> PathBuf {
    build_c(
        dir,
        &format!("serial{}plugin", model.to_lowercase().replace('_', "")),
        &root().join("tests/c/serial.c"),
        &[&format!("-DMODEL=NBDHOST_THREAD_MODEL_{model}")],
    )
}

/// A sparse file of `len` bytes at `path`, as a disk image to serve.
pub fn sparse_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// qemu-io on `uri` with these commands; a pattern mismatch fails the
/// test whatever qemu-io's exit status says.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = client("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    out
}

/// `path`, which must exist; the panic says why it might not.
fn existing(path: PathBuf) -> PathBuf {
    if !path.exists() {
        let why = if prebuilt() {
            "NBDHOST_TEST_PREBUILT is set, so the tests did not run `cargo build --workspace`"
        } else {
            "NBDHOST_TEST_BINDIR, …PLUGINDIR and …FILTERDIR say where the tests look, \
             and the build directory otherwise"
        };
        panic!("{} missing ({why})", path.display());
    }
    path
}

/// Path of the `nbdhost` binary, built first if need be.
pub fn nbdhost_bin() -> PathBuf {
    existing(target_dir().join("nbdhost"))
}

/// Path of the `nbdhost-keys` binary (tools/keys), built first if need be.
pub fn keys_bin() -> PathBuf {
    existing(target_dir().join("nbdhost-keys"))
}

/// Run nbdhost-keys with `args`; returns its output whatever its status.
pub fn keys(args: &[&str]) -> Output {
    run(Command::new(keys_bin()).args(args))
}

/// Run nbdhost-keys with `args`, which must succeed; returns stdout.
pub fn keys_ok(args: &[&str]) -> String {
    run_ok(Command::new(keys_bin()).args(args))
}

/// qemu-img writes `src` into the export at `uri` (`convert -n -W`, many
/// requests of many sizes in flight) and `compare` finds them identical.
pub fn convert_and_compare(src: &Path, uri: &str) {
    run_ok(
        client("qemu-img")
            .args(["convert", "-n", "-W", "-f", "raw", "-O", "raw"])
            .arg(src)
            .arg(uri),
    );
    let cmp = run_ok(
        client("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(src)
            .arg(uri),
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

/// A program's stdout and stderr together.
pub fn output_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Whether `program` can be run: a path that exists, or a name in PATH,
/// the sbin directories or /usr/bin (where [`client`] looks first).
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .any(|d| Path::new(d).join(program).is_file());
    found
}

/// Say why a test (or its case `what`) does not run, when `programs` are
/// not all installed; returns whether one is missing.
pub fn missing(what: &str, programs: &[&str]) -> bool {
    let absent: Vec<&str> = programs.iter().copied().filter(|p| !have(p)).collect();
    if absent.is_empty() {
        return false;
    }
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(" {what}")
    };
    eprintln!(
        "SKIP{what}: {} not installed (scripts/install-deps installs it as root)",
        absent.join(", ")
    );
    true
}

/// Where the tests find `file`, a plugin or filter: in
/// `$NBDHOST_TEST_PLUGINDIR` / `…FILTERDIR` (`kind` "plugin" or "filter")
/// when testing an installed server (see `scripts/check-installed`), and
/// otherwise (test plugins are not installed) in the build directory,
/// built first.
fn layer_path(kind: &str, file: &str) -> PathBuf {
    let Some(dir) = std::env::var_os(format!("NBDHOST_TEST_{}DIR", kind.to_uppercase())) else {
        return target_dir().join(file);
    };
    let installed = PathBuf::from(dir).join(file);
    if installed.exists() {
        return installed;
    }
    ensure_built();
    build_dir().join(file)
}

/// Path of an in-tree plugin (`memory` → `libmemoryplugin.so`).
pub fn plugin(name: &str) -> PathBuf {
    existing(layer_path("plugin", &format!("lib{name}plugin.so")))
}

/// Path of an in-tree filter (`offset` → `liboffsetfilter.so`,
/// `blocksize-policy` → `libblocksizepolicyfilter.so`).
pub fn filter(name: &str) -> PathBuf {
    let file = format!("lib{}filter.so", name.replace('-', ""));
    existing(layer_path("filter", &file))
}

/// The `--filter=PATH` option for an in-tree filter.
pub fn filter_arg(name: &str) -> String {
    format!("--filter={}", filter(name).display())
}

/// A fresh directory for one test, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "nbdhost-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `nbdhost -f`, stopped with SIGTERM on drop.
pub struct Server {
    pub child: Option<Child>,
    pub socket: PathBuf,
    /// The TCP port, for servers started with [`Server::start_tcp`].
    pub port: Option<u16>,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Server {
    /// Start `nbdhost -f -U <private socket> ARGS...` and wait until it
    /// accepts connections. Its stderr goes to `self.log`.
    pub fn start(args: &[&str]) -> Server {
        Server::start_program(&nbdhost_bin(), args)
    }

    /// Start `PROGRAM -f -U <private socket> ARGS...`, where PROGRAM is
    /// `nbdhost` or a server with its command line (`nbdkit`), and wait
    /// until it accepts connections.
    pub fn start_program(program: &Path, args: &[&str]) -> Server {
        let dir = TempDir::new("srv");
        let socket = dir.path("nbd.sock");
        let mut all = vec!["-U".to_string(), socket.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let mut s = Server::spawn_program(program, dir, &all, socket, None);
        s.wait_ready();
        s
    }

    /// Run `nbdhost -f ARGS...` with its stderr in `dir/server.log`.
    fn spawn(dir: TempDir, args: &[String], socket: PathBuf, port: Option<u16>) -> Server {
        Server::spawn_program(&nbdhost_bin(), dir, args, socket, port)
    }

    fn spawn_program(
        program: &Path,
        dir: TempDir,
        args: &[String],
        socket: PathBuf,
        port: Option<u16>,
    ) -> Server {
        let log = dir.path("server.log");
        let child = Command::new(program)
            .arg("-f")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Server {
            child: Some(child),
            socket,
            port,
            log,
            _dir: dir,
        }
    }

    /// Start `nbdhost -f ARGS...` where ARGS listen on TCP `port` (and
    /// wait until it accepts there, on IPv4 or IPv6 loopback).
    pub fn start_tcp(args: &[&str], port: u16) -> Server {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut s = Server::spawn(TempDir::new("srv"), &args, PathBuf::new(), Some(port));
        let deadline = Instant::now() + Duration::from_secs(10);
        let up = || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                || std::net::TcpStream::connect(("::1", port)).is_ok()
        };
        while !up() {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdhost exited early ({st}): {}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "nbdhost did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// Start `nbdhost -f --config FILE ARGS...` whose file listens, among
    /// others, on the Unix socket `socket`, and wait until it accepts
    /// there.
    pub fn start_config(config: &Path, args: &[&str], socket: &Path) -> Server {
        let mut all = vec!["--config".to_string(), config.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let mut s = Server::spawn(TempDir::new("srv"), &all, socket.to_path_buf(), None);
        s.wait_ready();
        s
    }

    /// Send the server a signal without waiting.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    fn wait_ready(&mut self) {
        // Generous: a filter may derive a key before the server listens.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited early ({st}): {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not listen within 60 s: {}", self.log_text());
    }

    /// The `nbd+unix://` URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// What the server has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send SIGTERM without waiting for the server to exit.
    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// Send SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate().expect("server already stopped")
    }

    /// Like [`Server::stop`], also returning what the server logged (the
    /// log goes with the server's directory when the `Server` is dropped).
    pub fn stop_with_log(mut self) -> (ExitStatus, String) {
        let st = self.terminate().expect("server already stopped");
        (st, self.log_text())
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        // Beyond the server's 30 s shutdown grace, so a test can watch it end.
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A client command with Debian's python first in PATH (nbdsh and
/// python3-libnbd need `/usr/bin/python3`).
pub fn client(program: &str) -> Command {
    let mut c = Command::new(program);
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:{path}"));
    c.stdin(Stdio::null());
    c
}

/// The export size at `uri`, as `nbdinfo --size` prints it (trimmed).
pub fn export_size(uri: &str) -> String {
    run_ok(client("nbdinfo").arg("--size").arg(uri))
        .trim()
        .to_owned()
}

/// Run a command to completion, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command to completion with a 120 s limit.
pub fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

/// Run an nbdsh script (Python, with `h` connected to `uri`).
pub fn nbdsh(uri: &str, script: &str) -> String {
    run_ok(client("nbdsh").arg("-u").arg(uri).arg("-c").arg(script))
}

/// Deterministic pseudo-random bytes for reference data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Server {
    /// Whether the server process is still running (has not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Wait up to `timeout` for the log to contain `needle`; returns the
    /// log either way.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> (bool, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return (true, log);
            }
            if Instant::now() > deadline {
                return (false, log);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Write `data` to `img` followed by 16 MiB of room, and have cryptsetup
/// encrypt it in place as LUKS2 (`reencrypt --encrypt`) with the
/// passphrase in `pw` and `extra` options: a volume whose plaintext is
/// known, made by cryptsetup's own code.
pub fn luks2_encrypted_in_place(img: &Path, data: &[u8], pw: &Path, extra: &[&str]) {
    std::fs::write(img, data).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .set_len(data.len() as u64 + (16 << 20))
        .unwrap();
    run_ok(
        client("cryptsetup")
            .args(["-q", "reencrypt", "--encrypt", "--type", "luks2"])
            .args(extra)
            .args(["--reduce-device-size", "16M", "--pbkdf-memory", "32768"])
            .args(["--iter-time", "100", "--key-file"])
            .arg(pw)
            .arg(img),
    );
}
