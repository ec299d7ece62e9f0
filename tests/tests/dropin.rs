//! What a user who replaces nbdkit with nbdhost runs into (issue 21's
//! "defects a drop-in user hits"): signals and `--run`, SIGPIPE for what
//! plugins start while configured, over-size writes, export descriptions,
//! `-D` flags, and finding nbdkit's plugins when nbdhost is installed as
//! `nbdkit`. Each test is one behaviour, checked with a real client where
//! a client shows it.

use std::process::{Command, Output};

use nbdhost_tests::{
    build_c, client, filter_arg, missing, nbdhost_bin, qemu_io, root, run, run_ok, twin, Server,
    TempDir,
};

/// `nbdhost ARGS... --run SCRIPT` under `timeout SECS`, so that a server
/// that hangs fails the test instead of stalling it.
fn run_within(secs: u32, args: &[&str], script: &str) -> Output {
    let mut c = client("timeout");
    c.arg(secs.to_string())
        .arg(nbdhost_bin())
        .args(["-U", "-"])
        .args(args)
        .arg("--run")
        .arg(script);
    run(&mut c)
}

#[test]
fn a_command_nbdkits_data_plugin_starts_while_configured_stops_on_sigpipe() {
    if missing("nbdkit's data plugin", &["nbdkit", "nbdinfo"]) {
        return;
    }
    // The data plugin reads ten bytes and closes the pipe: the writer
    // must be stopped by SIGPIPE, or the plugin waits for it for ever.
    let out = run_within(
        30,
        &["data", "<(while :; do printf x; done)[:10]"],
        "nbdinfo --size \"$uri\"",
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10");
}

#[test]
fn the_server_still_ignores_sigpipe_once_serving() {
    let dir = TempDir::new("sigpipe");
    let pidfile = dir.path("server.pid");
    let out = run(Command::new(nbdhost_bin())
        .args(["-U", "-", "-P"])
        .arg(&pidfile)
        .args(["null", "--run"])
        .arg(format!(
            "grep SigIgn /proc/$(cat {})/status",
            pidfile.display()
        )));
    let text = String::from_utf8_lossy(&out.stdout);
    let mask = u64::from_str_radix(text.trim().trim_start_matches("SigIgn:").trim(), 16)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert_ne!(mask & (1 << (libc::SIGPIPE - 1)), 0, "{text}");
}

#[test]
fn log_script_reads_the_extents_of_a_block_status_reply_as_a_bash_array() {
    let dir = TempDir::new("logscript-extents");
    let out = dir.path("extents");
    // nbdkit's log filter sets `extents=(offset length "type" ...)`.
    let script = format!(
        "if [ \"$act\" = Extents ] && [ \"$type\" = LEAVE ]; then echo \"${{#extents[@]}}\" >> {}; fi",
        out.display()
    );
    let s = Server::start(&[
        &filter_arg("log"),
        "memory",
        "1M",
        &format!("logscript={script}"),
    ]);
    qemu_io(&s.uri(), &["write 0 64k", "map"]);
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    // Three words (offset, length, type) per extent.
    let counts: Vec<usize> = text.lines().filter_map(|l| l.parse().ok()).collect();
    assert!(
        !counts.is_empty() && counts.iter().all(|n| n % 3 == 0 && *n > 0),
        "no extents seen by the script: {text:?}"
    );
}

#[test]
fn a_debug_flag_without_a_layer_name_a_flag_name_or_a_value_is_refused_in_nbdkits_words() {
    for flag in [".x=1", "p.=1", "p.x=", "=", "."] {
        let out =
            run(Command::new(nbdhost_bin()).args(["-U", "-", "-D", flag, "null", "--run", "true"]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "-D {flag}: {err}");
        assert!(
            err.contains("must have the format NAME.FLAG=N"),
            "-D {flag}: {err}"
        );
    }
}

#[test]
fn a_debug_flag_naming_no_loaded_layer_is_warned_about() {
    let out = run(Command::new(nbdhost_bin()).args([
        "-U",
        "-",
        "-D",
        "nosuch.flag=1",
        "-D",
        "null.flag=1",
        "null",
        "--run",
        "true",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("-D nosuch.flag was not used"), "{err}");
    assert!(!err.contains("-D null.flag was not used"), "{err}");
}

#[test]
fn an_unused_debug_flag_is_warned_about_as_nbdkit_does_before_the_configuration_fails() {
    // nbdkit warns once the layers are loaded, before their parameters
    // are checked, with its word "warning" (its test-debug-flags.sh greps
    // for both).
    let out = run(Command::new(nbdhost_bin()).args([
        "-U",
        "-",
        "-D",
        "nosuch.flag=1",
        "file",
        "--run",
        "true",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("warning: debug flag -D nosuch.flag was not used"),
        "{err}"
    );
}

/// A script for nbdkit's sh plugin (through the adapter) that serves a
/// 1 KiB disk and answers the extra methods in `extra`, a `case` arm
/// list; every other method is "missing".
fn sh_plugin(dir: &TempDir, extra: &str) -> String {
    let path = dir.path("plugin.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/bash\ncase \"$1\" in\n{extra}\n  get_size) echo 1024 ;;\n  pread) head -c \"$3\" /dev/zero ;;\n  open) echo \"$3\" ;;\n  *) exit 2 ;;\nesac\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// What `nbdinfo --list` prints (or fails with) for a server of `args`.
fn listing(s: &Server) -> (bool, String) {
    let out = run(client("nbdinfo").arg("--list").arg(s.uri()));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn an_export_description_longer_than_4096_bytes_fails_the_listing_cleanly() {
    let long = format!("exportdesc=fixed:{}", "d".repeat(5000));
    let s = Server::start(&[&filter_arg("exportname"), "memory", "1M", &long]);
    let (ok, text) = listing(&s);
    // As nbdkit: the layer's list is refused, and the client gets an
    // error reply, not a description libnbd cannot parse.
    assert!(!ok, "{text}");
    assert!(text.contains("server replied with error"), "{text}");
    let (_, log) = s.stop_with_log();
    assert!(log.contains("cannot list exports"), "{log}");
}

#[test]
fn an_export_description_longer_than_4096_bytes_is_not_advertised_at_go() {
    if missing("nbdkit's sh plugin", &["nbdkit", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("longdesc");
    let script = sh_plugin(
        &dir,
        "  export_description) head -c 5000 /dev/zero | tr '\\0' e ;;",
    );
    let s = Server::start(&["sh", &script]);
    let script = format!(
        "h.set_full_info(True)\n\
         h.connect_uri({:?})\n\
         try:\n    print(len(h.get_export_description()))\n\
         except nbd.Error:\n    print('none')",
        s.uri()
    );
    let out = run_ok(client("nbdsh").arg("-c").arg(script));
    assert_eq!(out.trim(), "none");
}

#[test]
fn a_failing_default_export_without_list_exports_lists_nothing_and_logs_why() {
    if missing("nbdkit's sh plugin", &["nbdkit", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("nodefault");
    let script = sh_plugin(
        &dir,
        "  default_export) echo 'no default here' >&2; exit 1 ;;",
    );
    let s = Server::start(&["sh", &script]);
    let (ok, text) = listing(&s);
    assert!(ok, "{text}");
    assert!(!text.contains("export="), "{text}");
    let (_, log) = s.stop_with_log();
    assert!(log.contains("no default here"), "{log}");
}

#[test]
fn a_write_beyond_the_maximum_from_libnbd_is_refused_and_the_connection_goes_on() {
    let s = Server::start(&["memory", "1M"]);
    // libnbd checks the size only in strict mode; with it off it sends
    // the 33 MiB payload and waits for the reply after sending it all.
    let script = format!(
        "import errno\n\
         h.set_strict_mode(0)\n\
         h.connect_uri({:?})\n\
         try:\n    h.pwrite(b'x' * (33 << 20), 0)\n    print('written')\n\
         except nbd.Error as e:\n    print(errno.errorcode.get(e.errno, e.errno))\n\
         print(bytes(h.pread(4, 0)))",
        s.uri()
    );
    let out = run_ok(client("nbdsh").arg("-c").arg(script));
    assert_eq!(out, "EOVERFLOW\nb'\\x00\\x00\\x00\\x00'\n");
}

/// What a client opening `name` at `uri` is told (canonical name and
/// description), or why it was refused.
fn opened_as(uri: &str, name: &str) -> String {
    let script = format!(
        "h.set_full_info(True)\n\
         h.set_export_name({name:?})\n\
         try:\n    h.connect_uri({uri:?})\n    \
         try:\n        d = h.get_export_description()\n    except nbd.Error:\n        d = None\n    \
         print('open', repr(h.get_canonical_export_name()), d)\n\
         except nbd.Error as e:\n    print('refused', e.errno)"
    );
    run_ok(client("nbdsh").arg("-c").arg(script))
}

/// A script for nbdkit's sh plugin whose exports describe themselves.
fn described_exports(dir: &TempDir) -> String {
    sh_plugin(
        dir,
        "  default_export) echo a ;;\n  export_description) echo \"below-$3\" ;;",
    )
}

#[test]
fn exportname_exportdesc_is_the_description_a_connecting_client_gets() {
    let dir = TempDir::new("exportdesc");
    let script = described_exports(&dir);
    for desc in ["exportdesc=fixed:hello", "exportdesc=script:echo hi-$name"] {
        let args = ["--filter=exportname", "sh", &script, "exportname=a", desc];
        let seen = twin::same_as_nbdkit(&args, |uri| opened_as(uri, "a"));
        if let Some(seen) = seen {
            assert!(!seen.contains("below"), "{desc}: {seen}");
        }
    }
}

#[test]
fn exportname_strict_refuses_the_empty_name_unless_it_is_listed() {
    let dir = TempDir::new("exportstrict");
    let script = described_exports(&dir);
    for (extra, want) in [
        (None, "refused"),
        (Some("exportname="), "open ''"),
        (Some("default-export=a"), "refused"),
    ] {
        let mut args = vec![
            "--filter=exportname",
            "sh",
            &script,
            "exportname-strict=true",
            "exportname=a",
        ];
        args.extend(extra);
        let seen = twin::same_as_nbdkit(&args, |uri| opened_as(uri, ""));
        if let Some(seen) = seen {
            assert!(seen.starts_with(want), "{extra:?}: {seen}");
        }
    }
}

#[test]
fn blocksize_combines_extents_shorter_than_a_block_from_below() {
    if missing("nbdkit's eval plugin", &["nbdkit", "nbdinfo"]) {
        return;
    }
    // Each answer from below is one 512-byte hole, an eighth of a block.
    let args = [
        "--filter=blocksize",
        "eval",
        "get_size=echo 16384",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "can_extents=exit 0",
        "extents=echo $4 512 hole,zero",
        "minblock=4K",
    ];
    let map = twin::same_as_nbdkit(&args, |uri| run_ok(client("nbdinfo").arg("--map").arg(uri)));
    if let Some(map) = map {
        assert!(map.contains("hole,zero") && !map.contains("data"), "{map}");
    }
}

#[test]
fn memory_allocator_zstd_and_malloc_mlock_serve_as_nbdkits_do() {
    if missing("qemu-io", &["qemu-io", "nbdsh"]) {
        return;
    }
    for allocator in ["allocator=zstd", "allocator=malloc,mlock=true"] {
        let args = ["memory", "1M", allocator];
        twin::same_as_nbdkit(&args, |uri| {
            let writes = qemu_io(
                uri,
                &[
                    "write -P 0x33 0 64k",
                    "write -P 0x44 100k 1000",
                    "write -z 16k 4k",
                    "read -P 0x33 0 16k",
                    "read -P 0 16k 4k",
                    "read -P 0x44 100k 1000",
                ],
            );
            assert!(!writes.contains("fail"), "{allocator}: {writes}");
            // The content, not the map: nbdkit's pages are smaller.
            run_ok(
                client("nbdsh").arg("-u").arg(uri).arg("-c").arg(
                    "import hashlib; print(hashlib.sha256(h.pread(h.get_size(), 0)).hexdigest())",
                ),
            )
        });
    }
}

#[test]
fn installed_as_nbdkit_nbdhost_still_finds_nbdkits_plugins() {
    if missing("nbdkit's plugins", &["nbdkit", "nbdinfo"]) {
        return;
    }
    // A drop-in install: nbdhost under the name nbdkit, first in PATH.
    let dir = TempDir::new("as-nbdkit");
    let nbdkit = dir.path("nbdkit");
    std::os::unix::fs::symlink(nbdhost_bin(), &nbdkit).unwrap();
    let path = format!(
        "{}:/usr/bin:{}",
        dir.0.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (args, size) in [
        (&["data", "raw=hello"][..], "5"),
        (
            &["eval", "get_size=echo 12345", "pread=exit 1"][..],
            "12345",
        ),
    ] {
        let out = run(Command::new(&nbdkit)
            .env("PATH", &path)
            .env_remove("NBDHOST_NBDKIT_PLUGINDIR")
            .env_remove("NBDHOST_NBDKIT_FILTERDIR")
            .args(["-U", "-"])
            .args(args)
            .args(["--run", "nbdinfo --size \"$uri\""]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            size,
            "{args:?}"
        );
    }
    // And the server that answered was nbdhost.
    let version = run(Command::new(&nbdkit).env("PATH", &path).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).contains("nbdhost"));
}

/// `nbdhost -U - memory 1M --run SCRIPT` started in the background, with
/// its stderr in `dir/server.log`.
fn run_in_background(dir: &TempDir, script: &str) -> std::process::Child {
    Command::new(nbdhost_bin())
        .args(["-U", "-", "-P"])
        .arg(dir.path("server.pid"))
        .args(["memory", "1M", "--run", script])
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path("server.log")).unwrap())
        .spawn()
        .unwrap()
}

/// The command for [`run_in_background`]: after a second, record the
/// export's size as a client sees it in `dir/size`, and any SIGTERM it
/// gets in `dir/term`; exit with status 7.
fn slow_command(dir: &TempDir) -> String {
    format!(
        "trap 'echo got >> {term}' TERM; sleep 1; nbdinfo --size \"$uri\" > {size}; exit 7",
        term = dir.path("term").display(),
        size = dir.path("size").display()
    )
}

/// Wait up to ten seconds for `f` to hold.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

#[test]
fn on_sigterm_run_waits_for_the_command_leaves_it_alone_and_exits_with_its_status() {
    if missing("--run with a client", &["nbdinfo"]) {
        return;
    }
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let dir = TempDir::new("run-term");
        let mut server = run_in_background(&dir, &slow_command(&dir));
        assert!(eventually(|| dir.path("server.pid").exists()));
        // SAFETY: signalling the process we started.
        unsafe { libc::kill(server.id() as i32, signal) };
        let status = server.wait().unwrap();
        let log = std::fs::read_to_string(dir.path("server.log")).unwrap_or_default();
        assert_eq!(status.code(), Some(7), "signal {signal}: {log}");
        let size = std::fs::read_to_string(dir.path("size")).unwrap_or_default();
        assert_eq!(size.trim(), "1048576", "signal {signal}: still served");
        assert!(
            !dir.path("term").exists(),
            "signal {signal}: command signalled"
        );
    }
}

#[test]
fn on_sigusr1_run_exits_at_once_and_the_command_keeps_its_server_until_it_ends() {
    if missing("--run with a client", &["nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("run-usr1");
    let mut server = run_in_background(&dir, &slow_command(&dir));
    assert!(eventually(|| dir.path("server.pid").exists()));
    // The serving process's: it removes the file when it exits.
    let mut pid = 0;
    assert!(eventually(|| {
        let text = std::fs::read_to_string(dir.path("server.pid")).unwrap_or_default();
        text.trim().parse().map(|p| pid = p).is_ok()
    }));
    // SAFETY: signalling the process we started.
    unsafe { libc::kill(server.id() as i32, libc::SIGUSR1) };
    let status = server.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGUSR1), "as nbdkit's");
    // The command, left running, is still served, and the server it is
    // served by goes when it does.
    assert!(eventually(
        || std::fs::read_to_string(dir.path("size")).is_ok_and(|s| s.trim() == "1048576")
    ));
    // Gone, or a zombie its new parent has not reaped yet.
    assert!(eventually(|| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
            st.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }));
}

#[test]
fn a_debug_flag_naming_no_layer_of_a_configuration_file_is_warned_about() {
    let dir = TempDir::new("dflags-config");
    let socket = dir.path("nbd.sock");
    let file = dir.path("nbdhost.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = [\"{}\"]\n\n[[export]]\nname = \"disk\"\nplugin = \"memory\"\nparams = {{ size = \"1M\" }}\n",
            socket.display()
        ),
    )
    .unwrap();
    let s = Server::start_config(
        &file,
        &["-D", "nosuch.flag=1", "-D", "memory.flag=1"],
        &socket,
    );
    let (_, log) = s.stop_with_log();
    assert!(log.contains("-D nosuch.flag was not used"), "{log}");
    assert!(!log.contains("-D memory.flag was not used"), "{log}");
}

#[test]
fn a_native_plugin_without_list_exports_whose_default_export_fails_lists_nothing() {
    let dir = TempDir::new("nodefault-native");
    let so = build_c(&dir, "nodefault", &root().join("tests/c/nodefault.c"), &[]);
    let s = Server::start(&[so.to_str().unwrap()]);
    let (ok, text) = listing(&s);
    assert!(ok, "{text}");
    assert!(!text.contains("export="), "{text}");
    let (_, log) = s.stop_with_log();
    assert!(log.contains("no default export here"), "{log}");
}

#[test]
fn run_exits_with_128_plus_the_signal_that_killed_its_server() {
    let dir = TempDir::new("run-server-killed");
    let pidfile = dir.path("server.pid");
    // The pid file holds the serving process's pid, as nbdkit's does: the
    // command kills its server and ends well, and the exit status still
    // says the server died (as nbdkit's test-captive.sh expects).
    let script = format!(
        "until test -s {p}; do sleep 0.1; done; kill -USR1 $(cat {p}); sleep 1",
        p = pidfile.display()
    );
    let out = run_within(30, &["-P", pidfile.to_str().unwrap(), "null"], &script);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGUSR1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dump_plugin_with_single_is_refused_without_writing_to_stdout() {
    // With -s, standard output is the client's: nbdkit refuses the two
    // together rather than print the plugin's details there.
    let out = run(Command::new(nbdhost_bin()).args(["--dump-plugin", "-s", "null"]));
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dump-plugin"));
}

#[test]
fn a_stdin_client_on_a_socket_pair_has_its_credentials_for_the_ip_filter() {
    if missing("nbdsh", &["nbdsh"]) {
        return;
    }
    // libnbd's connect_command serves over a socket pair, whose peer is
    // nbdsh itself: as with nbdkit -s, pid: rules see it (nbdkit's
    // test-ip-filter-pid.sh).
    let script = format!(
        "import os\n\
         h.connect_command([{bin:?}, '-s', '{ip}', 'null', 'size=512',\n\
         \x20   'allow=pid:' + str(os.getpid()), 'deny=all'])\n\
         print(h.get_size())",
        bin = nbdhost_bin().display().to_string(),
        ip = filter_arg("ip"),
    );
    let out = run_ok(client("nbdsh").arg("-c").arg(script));
    assert_eq!(out.trim(), "512");
}

#[test]
fn an_nbdkit_plugins_refused_password_fd_is_reported_in_nbdkits_words() {
    if missing("nbdkit's curl plugin", &["nbdkit"]) {
        return;
    }
    // The curl plugin fails its configuration when nbdkit_read_password
    // does: the reason the server recorded is kept, not replaced by the
    // plugin's errno (nbdkit's test-read-password.sh greps for it).
    let out = run_within(
        30,
        &["curl", "url=http://127.0.0.1:1/", "password=-1"],
        "true",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot use password -FD for stdin, stdout or stderr"),
        "{err}"
    );
}
