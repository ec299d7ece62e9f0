//! Every way to reach the server and every way to run it: TCP over IPv4
//! and IPv6, Unix sockets (named and private), systemd socket activation,
//! stdin/stdout, captive `--run`, oldstyle, and the background daemon with
//! a pid file; and the command line's own answers.

use std::process::Command;
use std::time::{Duration, Instant};

use nbdhost_tests::{
    client, export_size, free_port, nbdhost_bin, nbdsh, plugin, run, run_ok, Server, TempDir,
};

#[test]
fn tcp_ipv4_and_ipv6() {
    let port = free_port().to_string();
    let uri = format!("nbd://127.0.0.1:{port}/");
    let s = Server::start_tcp(
        &["-p", &port, "-i", "127.0.0.1", "memory", "3M"],
        port.parse().unwrap(),
    );
    assert_eq!(nbdsh(&uri, "print(h.get_size())").trim(), "3145728");
    assert!(s.stop().success());

    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping the IPv6 half");
        return;
    }
    let port = free_port().to_string();
    let uri = format!("nbd://[::1]:{port}/");
    let s = Server::start_tcp(
        &["-p", &port, "-i", "::1", "memory", "5M"],
        port.parse().unwrap(),
    );
    assert_eq!(nbdsh(&uri, "print(h.get_size())").trim(), "5242880");
    assert!(s.stop().success());
}

#[test]
fn run_with_private_socket_sets_variables_and_exit_status() {
    let out = run_ok(Command::new(nbdhost_bin()).args([
        "-U",
        "-",
        "-e",
        "disk",
        "memory",
        "1M",
        "--run",
        "echo \"uri=$uri\"; echo \"nbd=$nbd\"; echo \"sock=$unixsocket\"; echo \"name=$exportname\"; nbdinfo --size \"nbd+unix:///?socket=$unixsocket\"",
    ]).env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap())));
    let get = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    };
    let sock = get("sock");
    assert!(sock.ends_with("/socket"), "{out}");
    assert_eq!(get("uri"), format!("nbd+unix:///disk?socket={sock}"));
    assert_eq!(get("nbd"), get("uri"), "both name the URI, as nbdkit's do");
    assert_eq!(get("name"), "disk");
    assert!(out.lines().any(|l| l == "1048576"), "{out}");
    assert!(
        !std::path::Path::new(&sock).parent().unwrap().exists(),
        "private directory removed"
    );

    let st = run(Command::new(nbdhost_bin()).args(["memory", "1M", "--run", "exit 3"]));
    assert_eq!(st.status.code(), Some(3));
}

#[test]
fn single_connection_on_stdin_stdout() {
    let bin = nbdhost_bin();
    let script = format!(
        "h.connect_command(['{}', '-s', 'memory', '1M'])\nh.pwrite(b'z' * 4096, 4096)\nprint(h.pread(4096, 4096) == b'z' * 4096, h.get_size())",
        bin.display()
    );
    let out = run_ok(client("nbdsh").arg("-c").arg(script));
    assert_eq!(out.trim(), "True 1048576");
}

/// `-s` with a recorded session in a file on stdin and the replies going
/// to a file: epoll cannot watch regular files, which are always ready.
#[test]
fn single_connection_from_and_to_regular_files() {
    use nbdhost_tests::raw::*;
    let dir = TempDir::new("stdio-files");
    let mut session = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    session.extend(option_bytes(OPT_GO, &info_request("", &[])));
    session.extend(request_bytes(0, CMD_WRITE, 1, 0, 4, b"abcd"));
    session.extend(request_bytes(0, CMD_READ, 2, 0, 4, &[]));
    session.extend(request_bytes(0, CMD_DISC, 3, 0, 0, &[]));
    let (input, output) = (dir.path("in"), dir.path("out"));
    std::fs::write(&input, &session).unwrap();
    let st = Command::new(nbdhost_bin())
        .args(["-s", "memory", "1M"])
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(std::fs::File::create(&output).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let out = std::fs::read(&output).unwrap();
    assert!(out.starts_with(&NBDMAGIC.to_be_bytes()));
    // The write's reply, then the read's: a simple reply and the data.
    let mut tail = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    tail.extend(0u32.to_be_bytes());
    tail.extend(2u64.to_be_bytes());
    tail.extend(b"abcd");
    assert!(out.ends_with(&tail), "{out:02x?}");

    // /dev/null on stdin is a client that leaves at once.
    let st = Command::new(nbdhost_bin())
        .args(["-s", "memory", "1M"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn systemd_socket_activation() {
    let out = run_ok(
        client("nbdinfo")
            .args(["--size", "--", "["])
            .arg(nbdhost_bin())
            .args(["memory", "7M", "]"]),
    );
    assert_eq!(out.trim(), "7340032");
}

#[test]
fn oldstyle_handshake() {
    let s = Server::start(&["-o", "memory", "2M"]);
    let info = run_ok(client("nbdinfo").arg(s.uri()));
    assert!(info.contains("protocol: oldstyle"), "{info}");
    let out = nbdsh(
        &s.uri(),
        "h.pwrite(b'o' * 512, 0); print(h.pread(512, 0) == b'o' * 512)",
    );
    assert_eq!(out.trim(), "True");
    assert!(s.stop().success());
}

#[test]
fn background_daemon_with_pidfile() {
    let dir = TempDir::new("daemon");
    let sock = dir.path("d.sock");
    let pidfile = dir.path("nbdhost.pid");
    let started = Instant::now();
    let st = run(Command::new(nbdhost_bin())
        .arg("-P")
        .arg(&pidfile)
        .arg("-U")
        .arg(&sock)
        .args(["memory", "1M"]));
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the parent returns at once"
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    assert_eq!(export_size(&uri), "1048576");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signalling the daemon we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sock.exists() || pidfile.exists() {
        assert!(Instant::now() < deadline, "daemon did not clean up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn command_line_answers() {
    let bin = nbdhost_bin();
    let cfg = run_ok(Command::new(&bin).arg("--dump-config"));
    assert!(
        cfg.contains(&format!("version={}", env!("CARGO_PKG_VERSION"))),
        "{cfg}"
    );
    assert!(cfg.lines().any(|l| l.starts_with("plugindir=")), "{cfg}");
    let dump = run_ok(Command::new(&bin).args(["--dump-plugin", "memory"]));
    assert!(
        dump.contains("name=memory") && dump.contains("thread_model=parallel"),
        "{dump}"
    );
    assert!(run_ok(Command::new(&bin).arg("--version")).contains(env!("CARGO_PKG_VERSION")));
    assert!(run_ok(Command::new(&bin).arg("--help")).contains("--filter"));

    let bad = run(Command::new(&bin).args(["-f", "nosuchplugin"]));
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("plugin 'nosuchplugin' not found"));
    let bad = run(Command::new(&bin).args(["-f", "memory", "size=abc"]));
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("could not parse size 'abc'"),
        "{bad:?}"
    );
    let bad = run(Command::new(&bin).args(["-f", "memory", "1M", "colour=blue"]));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unknown parameter 'colour'"),
        "{bad:?}"
    );

    // A plugin by path works like one by name.
    let s = Server::start(&[plugin("memory").to_str().unwrap(), "size=2M"]);
    assert_eq!(nbdsh(&s.uri(), "print(h.get_size())").trim(), "2097152");
    assert!(s.stop().success());
}

#[test]
fn dump_plugin_lists_the_memory_plugins_allocators_after_the_servers_lines() {
    // Scripts written for nbdkit probe for these (nbdkit's own tests
    // skip what the memory plugin lacks), and a piped stdout keeps the
    // plugin's lines after the server's.
    let dump = run_ok(Command::new(nbdhost_bin()).args(["--dump-plugin", "memory"]));
    let lines: Vec<&str> = dump.lines().collect();
    let at = |l: &str| lines.iter().position(|x| *x == l);
    let name = at("name=memory").expect("name line");
    assert!(at("mlock=yes").is_some_and(|i| i > name), "{dump}");
    assert!(at("zstd=yes").is_some_and(|i| i > name), "{dump}");
}

#[test]
fn version_with_a_plugin_loads_it_and_its_filters() {
    let bin = nbdhost_bin();
    let v = env!("CARGO_PKG_VERSION");
    let out = run_ok(Command::new(&bin).args(["--filter=cow", "memory", "1M", "--version"]));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("nbdhost {v}"),
            format!("cow {v}"),
            format!("memory {v}")
        ],
        "{out}"
    );
    // The nbdkit idiom for probing: a missing layer fails.
    let bad = run(Command::new(&bin).args(["nosuchplugin", "--version"]));
    assert_eq!(bad.status.code(), Some(1));
    let bad = run(Command::new(&bin).args(["--filter=nosuchfilter", "memory", "1M", "--version"]));
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn help_with_a_plugin_describes_it_and_its_filters() {
    let out = run_ok(Command::new(nbdhost_bin()).args(["--filter=cow", "memory", "--help"]));
    let filter = out.find("\nfilter: cow (").expect("the filter's section");
    let plugin = out
        .find("\nplugin: memory (")
        .expect("the plugin's section");
    assert!(filter < plugin, "{out}");
    assert!(
        out[plugin..].contains("libmemoryplugin.so)\nsize="),
        "{out}"
    );
    assert!(out[filter..plugin].contains("cow-block-size="), "{out}");
}

#[test]
fn dump_config_has_the_keys_nbdkit_scripts_read() {
    let cfg = run_ok(Command::new(nbdhost_bin()).arg("--dump-config"));
    let keys: Vec<&str> = cfg.lines().filter_map(|l| l.split('=').next()).collect();
    for k in [
        "bindir",
        "filterdir",
        "libdir",
        "mandir",
        "name",
        "plugindir",
        "sbindir",
        "sysconfdir",
        "tls",
        "version",
        "version_major",
        "version_minor",
    ] {
        assert!(keys.contains(&k), "no {k}= in\n{cfg}");
    }
    assert!(cfg.lines().any(|l| l == "tls=yes"), "{cfg}");
}

#[test]
fn option_lists_name_every_option() {
    let bin = nbdhost_bin();
    let short = run_ok(Command::new(&bin).arg("--short-options"));
    let long = run_ok(Command::new(&bin).arg("--long-options"));
    for o in ["-r", "-U", "-V", "-h", "-s"] {
        assert!(short.lines().any(|l| l == o), "{o} missing from\n{short}");
    }
    for o in [
        "--filter",
        "--tls-psk",
        "--run",
        "--short-options",
        "--long-options",
    ] {
        assert!(long.lines().any(|l| l == o), "{o} missing from\n{long}");
    }
}

#[test]
fn clients_in_parallel_see_one_disk() {
    let s = Server::start(&["memory", "8M"]);
    let uri = s.uri();
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let cmd = format!("write -P {} {}M 1M", i + 1, i * 2);
                run_ok(client("qemu-io").args(["-f", "raw", "-c", &cmd]).arg(&uri))
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut cmds = vec!["-f".to_string(), "raw".to_string()];
    for i in 0..4 {
        cmds.push("-c".into());
        cmds.push(format!("read -P {} {}M 1M", i + 1, i * 2));
    }
    let out = run_ok(client("qemu-io").args(&cmds).arg(&uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(s.stop().success());
}

#[test]
fn sigterm_during_a_large_copy_exits_cleanly() {
    let dir = TempDir::new("sigterm");
    let src = dir.path("big.img");
    std::fs::write(&src, nbdhost_tests::pattern(256 << 20, 9)).unwrap();
    let s = Server::start(&["memory", "256M"]);
    let mut copy = client("nbdcopy")
        .arg(&src)
        .arg(s.uri())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    assert!(s.stop().success());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t.elapsed()
    );
    let _ = copy.wait();
}

/// `--exit-with-parent`: when the program that started nbdhost goes away,
/// so does nbdhost, cleanly (its socket is removed).
#[test]
fn exit_with_parent_follows_the_parent() {
    let dir = TempDir::new("ewp");
    let sock = dir.path("s.sock");
    let script = format!(
        "\"$0\" -f --exit-with-parent -U {} memory 1M & echo $!; sleep 1",
        sock.display()
    );
    let out = run_ok(
        Command::new("/bin/sh")
            .args(["-c", &script])
            .arg(nbdhost_bin()),
    );
    let pid: i32 = out.trim().parse().unwrap();
    // The shell, nbdhost's parent, has exited; nbdhost must follow.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let gone = state.is_empty() || state.split(' ').nth(2) == Some("Z");
        if gone && !sock.exists() {
            break;
        }
        assert!(Instant::now() < deadline, "nbdhost outlived its parent");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `-D PLUGIN.FLAG=N` reaches the plugin through `host->debug_flag`.
#[test]
fn debug_flags_reach_the_plugin() {
    let p = plugin("test");
    let s = Server::start(&["-v", "-D", "test.open=3", p.to_str().unwrap(), "size=1M"]);
    export_size(&s.uri());
    let (st, log) = s.stop_with_log();
    assert!(st.success());
    assert!(log.contains("debug flag open=3"), "{log}");
    // Without the flag the plugin stays quiet.
    let s = Server::start(&["-v", p.to_str().unwrap(), "size=1M"]);
    export_size(&s.uri());
    let (_, log) = s.stop_with_log();
    assert!(!log.contains("debug flag"), "{log}");
}

/// `--mask-handshake` limits the global flags of the greeting, as
/// nbdkit's does; clients fall back (libnbd without NO_ZEROES).
#[test]
fn mask_handshake_limits_the_greeting_flags() {
    use nbdhost_tests::raw::RawClient;
    let s = Server::start(&["memory", "1M"]);
    assert_eq!(RawClient::greeted(&s.socket).server_flags, 3);
    assert!(s.stop().success());
    let s = Server::start(&["--mask-handshake=1", "memory", "1M"]);
    assert_eq!(RawClient::greeted(&s.socket).server_flags, 1);
    assert_eq!(export_size(&s.uri()), "1048576");
    assert!(s.stop().success());
}

#[test]
fn user_and_group_change_before_anything_is_served() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: -u and -g need root");
        return;
    }
    let s = Server::start(&["-u", "nobody", "-g", "nogroup", "memory", "1M"]);
    // The socket accepts (into its backlog) as soon as it is bound, before
    // the change; a client served proves the server is past it.
    assert_eq!(export_size(&s.uri()), "1048576");
    let pid = s.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    // Real, effective, saved and file-system ids alike; no root groups.
    assert_eq!(ids("Uid:"), ["65534"; 4], "{status}");
    assert_eq!(ids("Gid:"), ["65534"; 4], "{status}");
    assert_eq!(ids("Groups:"), ["65534"], "{status}");
    assert!(s.stop().success());
}

#[test]
fn print_uri_names_the_export_before_serving() {
    let dir = TempDir::new("print-uri");
    let sock = dir.path("s.sock");
    let pidfile = dir.path("pid");
    // In the background: the parent prints the URI and returns.
    let out = run_ok(
        Command::new(nbdhost_bin())
            .arg("--print-uri")
            .arg("-U")
            .arg(&sock)
            .arg("-P")
            .arg(&pidfile)
            .args(["-e", "disk", "memory", "2M"]),
    );
    let uri = out.trim();
    assert_eq!(uri, format!("nbd+unix:///disk?socket={}", sock.display()));
    assert_eq!(export_size(uri), "2097152");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "no pid file");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    run_ok(Command::new("kill").arg(pid.trim()));
}

/// The keepalive timer of established connections to `port`, from the
/// kernel's table (`tr` is 2 for a keepalive timer).
fn keepalive_timers(port: u16) -> Vec<bool> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Established (01), on the server's side of the connection.
            (f[1].ends_with(&local) && f[3] == "01").then(|| f[5].starts_with("02:"))
        })
        .collect()
}

#[test]
fn keepalive_arms_the_timer_of_tcp_connections() {
    for (flag, want) in [(None, false), (Some("--keepalive"), true)] {
        let port = free_port();
        let p = port.to_string();
        let mut args = vec!["-4", "-i", "127.0.0.1", "-p", &p];
        args.extend(flag);
        args.extend(["memory", "1M"]);
        let s = Server::start_tcp(&args, port);
        let held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let timers = keepalive_timers(port);
        assert!(!timers.is_empty(), "no established connection seen");
        assert!(timers.iter().all(|&t| t == want), "{flag:?}: {timers:?}");
        drop(held);
        assert!(s.stop().success());
    }
}

#[test]
fn ipv4_only_leaves_ipv6_alone() {
    let port = free_port();
    let p = port.to_string();
    let s = Server::start_tcp(&["-4", "-p", &p, "memory", "1M"], port);
    assert_eq!(export_size(&format!("nbd://127.0.0.1:{port}/")), "1048576");
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        assert!(std::net::TcpStream::connect(("::1", port)).is_err());
    }
    assert!(s.stop().success());
}

#[test]
fn timeout_drops_a_client_that_does_not_negotiate() {
    let s = Server::start(&["--timeout=300ms", "memory", "1M"]);
    let mut c = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    // The greeting, then end of file once the timeout passes.
    std::io::Read::read_to_end(&mut c, &mut buf).unwrap();
    assert!(buf.starts_with(b"NBDMAGIC"));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(s.stop().success());
}

#[test]
fn log_to_a_file_appends_there() {
    let dir = TempDir::new("log-file");
    let file = dir.path("nbdhost.log");
    std::fs::write(&file, "earlier\n").unwrap();
    let log = format!("--log={}", file.display());
    run_ok(Command::new(nbdhost_bin()).args(["-v", &log, "memory", "1M", "--run", "true"]));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("earlier\n"), "{text}");
    assert!(
        text.contains("debug: --run command exited with status 0"),
        "{text}"
    );
    let bad = run(Command::new(nbdhost_bin()).args(["--log=relative.log", "memory", "1M"]));
    assert_eq!(bad.status.code(), Some(1));
}

/// A vsock port unlikely to be taken: vsock ports are not TCP ports, so
/// the TCP trick of binding port 0 does not apply.
fn vsock_port() -> u16 {
    20000 + (std::process::id() % 20000) as u16
}

/// Why AF_VSOCK cannot be tested here, if it cannot.
fn no_vsock() -> Option<String> {
    let probe = run(Command::new("python3").args([
        "-c",
        "import socket; socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)",
    ]));
    (!probe.status.success()).then(|| {
        format!(
            "this kernel has no AF_VSOCK: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        )
    })
}

#[test]
fn vsock_listens_on_the_port_p_gives_and_run_gets_its_uri() {
    if let Some(why) = no_vsock() {
        eprintln!("skipped: {why}");
        return;
    }
    let port = vsock_port().to_string();
    // The --run command starts once the server listens: binding the same
    // vsock port must then fail, which proves the server holds it.
    let out = run_ok(Command::new(nbdhost_bin()).args([
        "--vsock",
        "-p",
        &port,
        "memory",
        "1M",
        "--run",
        "echo \"uri=$uri port=$port\"; python3 -c 'import socket, sys; s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\ntry:\n s.bind((socket.VMADDR_CID_ANY, int(sys.argv[1]))); print(\"bound\")\nexcept OSError as e: print(\"taken\", e.errno)' \"$port\"",
    ]));
    assert!(
        out.contains(&format!("uri=nbd+vsock://1:{port}/ port={port}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("taken {}", libc::EADDRINUSE)),
        "the server does not hold vsock port {port}: {out}"
    );
}

#[test]
fn a_client_over_vsock_loopback_is_served() {
    if let Some(why) = no_vsock() {
        eprintln!("skipped: {why}");
        return;
    }
    // A host reaches its own vsock listeners (CID 1) only through the
    // vsock_loopback transport; without it only a guest could connect.
    let _ = Command::new("modprobe")
        .arg("vsock_loopback")
        .stderr(std::process::Stdio::null())
        .status();
    if !std::path::Path::new("/sys/module/vsock_loopback").exists() {
        eprintln!(
            "skipped: the kernel has AF_VSOCK but no vsock_loopback module, so no client on this host can connect (a guest would)"
        );
        return;
    }
    let port = vsock_port().wrapping_add(1).to_string();
    let out = run_ok(
        Command::new(nbdhost_bin())
            .args([
                "--vsock",
                "-p",
                &port,
                "memory",
                "3M",
                "--run",
                "nbdinfo --size \"$uri\"",
            ])
            .env(
                "PATH",
                format!("/usr/bin:{}", std::env::var("PATH").unwrap()),
            ),
    );
    assert_eq!(out.trim(), "3145728");
}
