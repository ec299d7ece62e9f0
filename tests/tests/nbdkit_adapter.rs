//! The nbdkit adapter (`plugins/nbdkit`) end to end, with real clients:
//! what an nbdkit plugin declares through nbdkit's own API reaches the
//! client, the log or the plugin as it would under nbdkit.
//!
//! Most tests serve `tests/c/nbdkit-features.c`, a plugin written against
//! the installed `nbdkit-plugin.h` alone that uses one of each observable
//! feature and leaves marker files in a directory (see its comment). The
//! others serve nbdkit's own plugins: the python and sh script plugins,
//! and the file plugin behind nbdhost's luks filter over TLS-PSK.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nbdhost_tests::tls::psk_file;
use nbdhost_tests::{
    build_c, client, export_size, nbdhost_bin, nbdsh, pattern, qemu_io, root, run, run_ok, Server,
    TempDir,
};

const NBDKIT_HEADER: &str = "/usr/include/nbdkit-plugin.h";
const NBDKIT_PLUGINS: &str = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins";
const NBDKIT_FILTERS: &str = "/usr/lib/x86_64-linux-gnu/nbdkit/filters";

/// Where the features plugin fails reads (its `FAIL_OFFSET`).
const FAIL_OFFSET: u64 = 768 * 1024;

/// Whether `path` exists; says what is skipped when it does not.
fn installed(path: &str, package: &str) -> bool {
    let there = Path::new(path).exists();
    if !there {
        eprintln!("SKIP: {path} is absent (package {package}; scripts/install-deps installs it)");
    }
    there
}

/// The features plugin built with `defs`, and its marker directory.
struct Features {
    dir: TempDir,
    so: PathBuf,
    markers: PathBuf,
}

/// API 2, the full struct.
const API2: &[&str] = &["-DNBDKIT_API_VERSION=2"];

impl Features {
    /// Build it, or skip (`None`) without nbdkit's header.
    fn build(tag: &str, defs: &[&str]) -> Option<Features> {
        if !installed(NBDKIT_HEADER, "nbdkit-plugin-dev") {
            return None;
        }
        let dir = TempDir::new(tag);
        let so = build_c(
            &dir,
            "features",
            &root().join("tests/c/nbdkit-features.c"),
            defs,
        );
        let markers = dir.path("markers");
        std::fs::create_dir(&markers).unwrap();
        Some(Features { dir, so, markers })
    }

    fn so(&self) -> &str {
        self.so.to_str().unwrap()
    }

    fn markers(&self) -> &str {
        self.markers.to_str().unwrap()
    }

    /// Serve it with `opts` before the plugin and the marker directory
    /// as its bare (magic key) parameter, then `params`.
    fn serve(&self, opts: &[&str], params: &[&str]) -> Server {
        let mut args = opts.to_vec();
        args.extend([self.so(), self.markers()]);
        args.extend(params);
        Server::start(&args)
    }

    fn marker(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.markers.join(name)).ok()
    }

    fn marker_names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.markers)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn nbdinfo(args: &[&str]) -> String {
    run_ok(client("nbdinfo").args(args))
}

/// The line of `key=value` output whose key is `key`.
fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(&format!("{key}=")))
}

#[test]
fn exports_from_list_exports_reach_nbdinfo_with_their_descriptions() {
    let Some(f) = Features::build("nbdkit-list", API2) else {
        return;
    };
    let s = f.serve(&[], &[]);
    let out = nbdinfo(&["--list", &s.uri()]);
    assert!(
        out.contains("export=\"a\":\n\tdescription: the first export\n"),
        "{out}"
    );
    assert!(
        out.contains("export=\"b\":\n\tdescription: the second export\n"),
        "{out}"
    );
    assert_eq!(out.matches("export=").count(), 2, "{out}");
    assert!(s.stop().success());
}

#[test]
fn the_empty_export_name_opens_the_plugins_default_export() {
    let Some(f) = Features::build("nbdkit-default", API2) else {
        return;
    };
    let s = f.serve(&[], &[]);
    // The canonical name comes back from the server, and the plugin's
    // export_description sees the same name through nbdkit_export_name.
    let out = nbdinfo(&["--json", &s.uri()]);
    assert!(out.contains("\"export-name\": \"a\""), "{out}");
    assert!(
        out.contains("\"description\": \"export a, tls=0\""),
        "{out}"
    );
    let b = format!("nbd+unix:///b?socket={}", s.socket.display());
    let out = nbdinfo(&["--json", &b]);
    assert!(
        out.contains("\"description\": \"export b, tls=0\""),
        "{out}"
    );
    assert!(s.stop().success());
}

fn psk_uri(s: &Server, psk: &Path) -> String {
    format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        s.socket.display(),
        psk.display()
    )
}

#[test]
fn nbdkit_is_tls_tells_the_plugin_its_client_came_over_tls() {
    let Some(f) = Features::build("nbdkit-is-tls", API2) else {
        return;
    };
    let psk = psk_file(&f.dir, &["alice"]);
    let s = f.serve(&[&format!("--tls-psk={}", psk.display())], &[]);
    // The plugin's export_description says what nbdkit_is_tls() said.
    let out = nbdinfo(&["--json", &psk_uri(&s, &psk)]);
    assert!(out.contains("\"TLS\": true"), "{out}");
    assert!(
        out.contains("\"description\": \"export a, tls=1\""),
        "{out}"
    );
    assert!(s.stop().success());
}

#[test]
fn block_size_reaches_the_client() {
    let Some(f) = Features::build("nbdkit-bs", API2) else {
        return;
    };
    let s = f.serve(&[], &[]);
    let out = nbdinfo(&["--json", &s.uri()]);
    for want in [
        "\"block_size_minimum\": 512,",
        "\"block_size_preferred\": 4096,",
        "\"block_size_maximum\": 1048576,",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    assert!(s.stop().success());
}

#[test]
fn requests_not_aligned_to_the_plugins_minimum_block_size_are_refused() {
    let Some(f) = Features::build("nbdkit-align", API2) else {
        return;
    };
    let s = f.serve(&[], &[]);
    // As nbdhost(1) promises, though nbdkit 1.32 passes them to the
    // plugin. libnbd would refuse them itself unless told not to.
    let out = nbdsh(
        &s.uri(),
        r#"
import errno
h.set_strict_mode(0)
for (count, offset) in [(100, 0), (512, 100), (512, 512)]:
    try:
        h.pread(count, offset)
        print("ok")
    except nbd.Error as e:
        print(errno.errorcode[e.errnum])
"#,
    );
    assert_eq!(out.trim(), "EINVAL\nEINVAL\nok");
    assert!(s.stop().success());
}

#[test]
fn qemu_io_writes_read_back_through_an_api2_plugin() {
    let Some(f) = Features::build("nbdkit-api2", API2) else {
        return;
    };
    let s = f.serve(&[], &[]);
    qemu_io(
        &s.uri(),
        &[
            "write -P 0xab 64k 128k",
            "read -P 0xab 64k 128k",
            "read -P 0 0 64k",
        ],
    );
    // A new connection sees the same disk.
    qemu_io(&s.uri(), &["read -P 0xab 64k 128k", "read -P 0 192k 64k"]);
    assert!(s.stop().success());
}

#[test]
fn a_read_failing_with_preserved_errno_gives_the_client_enospc_and_the_log_its_message() {
    let Some(f) = Features::build("nbdkit-enospc", API2) else {
        return;
    };
    let s = f.serve(&[], &[]);
    let out = nbdsh(
        &s.uri(),
        &format!(
            "import errno\n\
             try:\n    h.pread(512, {FAIL_OFFSET})\n    print('read succeeded')\n\
             except nbd.Error as e:\n    print(errno.errorcode[e.errnum])\n\
             print(len(h.pread(512, 0)))"
        ),
    );
    // The connection survives the failed request.
    assert_eq!(out.trim(), "ENOSPC\n512");
    let needle = format!("features: read at {FAIL_OFFSET} failed: No space left on device");
    let (found, log) = s.wait_log(&needle, Duration::from_secs(5));
    assert!(found, "the plugin's nbdkit_error is not in the log:\n{log}");
    assert!(s.stop().success());
}

#[test]
fn an_api1_plugin_reads_and_writes() {
    let Some(f) = Features::build("nbdkit-api1", &["-DNBDKIT_API_VERSION=1"]) else {
        return;
    };
    let dump = run_ok(
        Command::new(nbdhost_bin())
            .arg("--dump-plugin")
            .args([f.so(), f.markers()]),
    );
    assert_eq!(value(&dump, "api_version"), Some("1"), "{dump}");
    let s = f.serve(&[], &[]);
    qemu_io(
        &s.uri(),
        &[
            "write -P 0x5a 4k 60k",
            "read -P 0x5a 4k 60k",
            "read -P 0 0 4k",
        ],
    );
    qemu_io(&s.uri(), &["read -P 0x5a 4k 60k"]);
    assert!(s.stop().success());
}

#[test]
fn a_shorter_struct_hides_the_fields_past_its_end() {
    let Some(f) = Features::build("nbdkit-old", &["-DNBDKIT_API_VERSION=2", "-DOLD_STRUCT"]) else {
        return;
    };
    // No magic_config_key: the bare directory arrives as script=, which
    // the plugin does not know. (With --run, a server that took it would
    // exit 0 at once rather than serve.)
    let out = run(client(nbdhost_bin().to_str().unwrap()).args([
        "-U",
        "-",
        f.so(),
        f.markers(),
        "--run",
        "exit 0",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unknown parameter 'script'"), "{err}");

    let dir = format!("dir={}", f.markers());
    let s = Server::start(&["-v", "-D", "features.answer=42", f.so(), &dir]);
    // No list_exports, default_export or export_description: the
    // server's own single export "" without a description.
    let list = nbdinfo(&["--list", &s.uri()]);
    assert_eq!(list.matches("export=").count(), 1, "{list}");
    assert!(list.contains("export=\"\":"), "{list}");
    assert!(!list.contains("description"), "{list}");
    // No block_size: the server's defaults, not the plugin's 512 .. 1M.
    let json = nbdinfo(&["--json", &s.uri()]);
    assert!(json.contains("\"export-size\": 1048576"), "{json}");
    assert!(!json.contains("\"block_size_minimum\": 512"), "{json}");
    assert!(!json.contains("\"block_size_maximum\": 1048576,"), "{json}");
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    // Nor get_ready, after_fork or cleanup.
    assert!(!log.contains("answer="), "{log}");
    assert_eq!(f.marker_names(), Vec::<String>::new());
}

/// The most preads inside plugin `f` at once while one connection had
/// eight in flight, as its cleanup recorded it.
fn max_in_flight(f: &Features, serial: &str) -> u32 {
    let s = f.serve(&[], &[&format!("serial={serial}")]);
    nbdsh(
        &s.uri(),
        "bufs = [nbd.Buffer(512) for _ in range(8)]\n\
         cookies = [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs)]\n\
         while h.aio_in_flight() > 0:\n    h.poll(-1)\n\
         for c in cookies:\n    assert h.aio_command_completed(c)",
    );
    assert!(s.stop().success());
    let n = f
        .marker("max_in_flight")
        .expect("cleanup wrote max_in_flight");
    n.trim().parse().unwrap()
}

#[test]
fn the_thread_model_callback_serializes_one_connections_requests() {
    // Built PARALLEL; serial=true makes thread_model() answer
    // SERIALIZE_REQUESTS. serial=false shows the reads do overlap when
    // nothing forbids it, so 1 is not an accident of timing.
    let Some(f) = Features::build("nbdkit-serial", API2) else {
        return;
    };
    assert_eq!(max_in_flight(&f, "true"), 1);
    let parallel = max_in_flight(&f, "false");
    assert!(parallel > 1, "parallel reads never overlapped: {parallel}");
}

/// Wait up to 10 s for `f`'s marker `name`.
fn wait_marker(f: &Features, name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f.marker(name).is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn after_fork_runs_when_serving_and_cleanup_when_stopped() {
    let Some(f) = Features::build("nbdkit-lifecycle", API2) else {
        return;
    };
    let s = f.serve(&[], &[]);
    assert!(wait_marker(&f, "after_fork"), "after_fork did not run");
    let server = s.child.as_ref().unwrap().id().to_string();
    assert_eq!(f.marker("after_fork").unwrap().trim(), server);
    assert_eq!(f.marker("cleanup"), None, "cleanup ran while serving");
    assert!(s.stop().success());
    assert!(f.marker("cleanup").is_some(), "cleanup did not run");
}

/// SIGTERM to a daemon we started, when dropped.
struct Daemon(i32);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
    }
}

#[test]
fn after_fork_runs_in_the_daemon_not_in_the_process_that_started_it() {
    let Some(f) = Features::build("nbdkit-daemon", API2) else {
        return;
    };
    let pidfile = f.dir.path("nbdhost.pid");
    let started = run(Command::new(nbdhost_bin())
        .arg("-P")
        .arg(&pidfile)
        .arg("-U")
        .arg(f.dir.path("d.sock"))
        .args([f.so(), f.markers()]));
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    // The parent returns at once; the daemon writes the pid file soon after.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid: i32 = loop {
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        if let Some(pid) = text.strip_suffix('\n').and_then(|t| t.parse().ok()) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no pid file");
        std::thread::sleep(Duration::from_millis(20));
    };
    let daemon = Daemon(pid);
    // Where nbdkit plugins start their threads: only a process that
    // forked already keeps them.
    assert!(wait_marker(&f, "after_fork"), "after_fork did not run");
    assert_eq!(f.marker("after_fork").unwrap().trim(), pid.to_string());
    drop(daemon);
    assert!(
        wait_marker(&f, "cleanup"),
        "cleanup did not run in the daemon"
    );
}

#[test]
fn a_debug_flag_sets_the_plugins_variable() {
    let Some(f) = Features::build("nbdkit-debug", API2) else {
        return;
    };
    let s = f.serve(&["-v", "-D", "features.answer=42"], &[]);
    let (found, log) = s.wait_log("answer=42", Duration::from_secs(5));
    assert!(found, "{log}");
    assert!(s.stop().success());
    // Without the flag the variable keeps its zero.
    let s = f.serve(&["-v"], &[]);
    let (found, log) = s.wait_log("answer=0", Duration::from_secs(5));
    assert!(found, "{log}");
    assert!(s.stop().success());
}

#[test]
fn a_debug_flag_value_is_read_as_nbdkit_reads_it() {
    let Some(f) = Features::build("nbdkit-debug-c", API2) else {
        return;
    };
    // nbdkit parses N with nbdkit_parse_int, so C's hexadecimal and octal
    // forms work; an nbdkit command line must mean the same here.
    for n in ["0x2a", "052"] {
        let flag = format!("features.answer={n}");
        let s = f.serve(&["-v", "-D", &flag], &[]);
        let (found, log) = s.wait_log("answer=42", Duration::from_secs(5));
        assert!(found, "-D {flag}:\n{log}");
        assert!(s.stop().success());
    }
}

#[test]
fn help_and_dump_plugin_show_the_plugins_own_text() {
    let Some(f) = Features::build("nbdkit-help", API2) else {
        return;
    };
    let help = run_ok(Command::new(nbdhost_bin()).args(["--help", f.so()]));
    for line in [
        "dir=<DIR>          (required) Directory for the marker files.",
        "serial=true|false  Serialize each connection's requests.",
    ] {
        assert!(help.lines().any(|l| l == line), "{line:?} missing:\n{help}");
    }
    let dump = run_ok(Command::new(nbdhost_bin()).args(["--dump-plugin", f.so(), f.markers()]));
    assert!(dump.lines().any(|l| l == "features_dump=yes"), "{dump}");
    assert_eq!(value(&dump, "name"), Some("features"), "{dump}");
    assert_eq!(value(&dump, "version"), Some("1.2.3"), "{dump}");
    // Neither served, so neither ran the plugin's after_fork or cleanup.
    assert_eq!(f.marker_names(), Vec::<String>::new());
}

#[test]
fn a_python_script_plugin_is_served_to_qemu_img() {
    if !installed(
        &format!("{NBDKIT_PLUGINS}/nbdkit-python-plugin.so"),
        "nbdkit-plugin-python",
    ) {
        return;
    }
    let dir = TempDir::new("nbdkit-python");
    let script = dir.path("disk.py");
    std::fs::write(
        &script,
        "import nbdkit\n\
         \n\
         API_VERSION = 2\n\
         \n\
         disk = bytearray(1024 * 1024)\n\
         \n\
         def open(readonly):\n    return 1\n\
         \n\
         def get_size(h):\n    return len(disk)\n\
         \n\
         def pread(h, buf, offset, flags):\n    buf[:] = disk[offset:offset + len(buf)]\n\
         \n\
         def pwrite(h, buf, offset, flags):\n    disk[offset:offset + len(buf)] = buf\n",
    )
    .unwrap();
    let s = Server::start(&["python", script.to_str().unwrap()]);
    round_trip_with_qemu_img(&dir, &s.uri(), None);
    assert!(s.stop().success());
}

#[test]
fn an_sh_script_plugin_is_served_to_qemu_img() {
    if !installed(&format!("{NBDKIT_PLUGINS}/nbdkit-sh-plugin.so"), "nbdkit") {
        return;
    }
    let dir = TempDir::new("nbdkit-sh");
    let backing = dir.path("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let script = dir.path("disk.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
f={}
case "$1" in
  get_size) stat -L -c %s "$f" ;;
  can_write) exit 0 ;;
  pread) dd if="$f" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  pwrite) dd of="$f" seek="$4" conv=notrunc oflag=seek_bytes status=none ;;
  *) exit 2 ;;
esac
"#,
            backing.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let s = Server::start(&["sh", script.to_str().unwrap()]);
    round_trip_with_qemu_img(&dir, &s.uri(), Some(&backing));
    assert!(s.stop().success());
}

/// `qemu-img convert` a 1 MiB image of pattern into the export at `uri`
/// and back out; both copies must equal the source, and so must the
/// plugin's `backing` file if it has one.
fn round_trip_with_qemu_img(dir: &TempDir, uri: &str, backing: Option<&Path>) {
    let data = pattern(1 << 20, 11);
    let src = dir.path("src.raw");
    std::fs::write(&src, &data).unwrap();
    run_ok(
        client("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(uri),
    );
    if let Some(b) = backing {
        assert!(
            std::fs::read(b).unwrap() == data,
            "the script's file differs"
        );
    }
    let out = dir.path("out.raw");
    run_ok(
        client("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(&out),
    );
    assert!(std::fs::read(&out).unwrap() == data, "read back differs");
}

fn cryptsetup(args: &[&str]) -> String {
    run_ok(client("cryptsetup").arg("-q").args(args))
}

#[test]
fn nbdkits_file_plugin_behind_the_luks_filter_serves_plaintext_over_tls_psk() {
    let file_plugin = format!("{NBDKIT_PLUGINS}/nbdkit-file-plugin.so");
    if !installed(&file_plugin, "nbdkit") {
        return;
    }
    let dir = TempDir::new("nbdkit-luks");
    let pw = dir.path("pw");
    std::fs::write(&pw, "nbdkit adapter").unwrap();
    // A detached header, so that cryptsetup can decrypt the file in place
    // afterwards (LUKS2 with its header inside cannot be decrypted so).
    let img = dir.path("disk.img");
    let hdr = dir.path("disk.hdr");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    cryptsetup(&[
        "luksFormat",
        "--type",
        "luks2",
        "--sector-size",
        "4096",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        pw.to_str().unwrap(),
        "--header",
        hdr.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let psk = psk_file(&dir, &["alice"]);

    let s = Server::start(&[
        &format!("--tls-psk={}", psk.display()),
        "--filter=luks",
        &file_plugin,
        &format!("file={}", img.display()),
        &format!("header={}", hdr.display()),
        &format!("passphrase=+{}", pw.display()),
    ]);
    let tls_uri = psk_uri(&s, &psk);
    // TLS is required, so the disk is reached only through it.
    let plain = run(client("nbdinfo").arg("--size").arg(s.uri()));
    assert!(!plain.status.success(), "a client without TLS was served");

    let (off, len) = (1_000_000u64, 300_000usize);
    let data = pattern(len, 5);
    let blob = dir.path("blob");
    std::fs::write(&blob, &data).unwrap();
    // nbdsh -u connects before a -c could allow the URI's key file.
    let out = run_ok(client("nbdsh").args([
        "-c",
        "h.set_uri_allow_local_file(True)",
        "-u",
        &tls_uri,
        "-c",
        &format!(
            "data = open({blob:?}, 'rb').read()\n\
             h.pwrite(data, {off})\n\
             print(h.get_tls_negotiated(), h.pread(len(data), {off}) == data)",
            blob = blob.display().to_string()
        ),
    ]));
    assert_eq!(out.trim(), "True True");
    assert!(s.stop().success());

    let on_disk = std::fs::read(&img).unwrap();
    for at in [0, 4096, len - 64] {
        let needle = &data[at..at + 64];
        assert!(
            !on_disk.windows(64).any(|w| w == needle),
            "plaintext at +{at} of the write is in the file"
        );
    }
    cryptsetup(&[
        "reencrypt",
        "--decrypt",
        "--force-offline-reencrypt",
        "--header",
        hdr.to_str().unwrap(),
        "--key-file",
        pw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let decrypted = std::fs::read(&img).unwrap();
    assert!(
        decrypted[off as usize..][..len] == data[..],
        "cryptsetup does not decrypt what was written"
    );
}

#[test]
fn an_nbdkit_filter_is_refused_with_the_reason() {
    // nbdhost has every filter of nbdkit 1.32 by the same name but
    // cacheextents (nbdhost(1) says why), so that name finds nbdkit's.
    let cacheextents = format!("{NBDKIT_FILTERS}/nbdkit-cacheextents-filter.so");
    if !installed(&cacheextents, "nbdkit") {
        return;
    }
    let dir = TempDir::new("nbdkit-filter");
    let out = run(client(nbdhost_bin().to_str().unwrap())
        .args(["-f", "-U"])
        .arg(dir.path("s"))
        .args(["--filter=cacheextents", "memory", "1M"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{cacheextents} is an nbdkit filter: nbdhost serves nbdkit plugins but not nbdkit filters"
        )),
        "{err}"
    );
}

#[test]
fn an_nbdkit_filter_name_finds_nbdhosts_own_filter_first() {
    let s = Server::start(&["--filter=retry", "memory", "1M"]);
    assert_eq!(export_size(&s.uri()), "1048576");
    assert!(s.stop().success());
}
