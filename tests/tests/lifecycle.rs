//! When handles are closed and what a connection may hold: every close
//! runs on a worker under the thread model and in its connection's
//! context, none runs after the plugin is unloaded, and clients that leave
//! large replies unread cost the server only a bounded amount of memory.

use std::time::{Duration, Instant};

use nbdhost_tests::raw::*;
use nbdhost_tests::{client, plugin, run, run_ok, serial_plugin, Server, TempDir};

/// A server on the test plugin, recording its life in `record`, with
/// extra plugin parameters.
fn recorded_server(record: &std::path::Path, params: &[&str]) -> Server {
    let p = plugin("test");
    let rec = format!("record={}", record.display());
    let mut args = vec![p.to_str().unwrap(), "size=1M", &rec];
    args.extend_from_slice(params);
    Server::start(&args)
}

/// The kinds of the recorded events, in order.
fn kinds(record: &std::path::Path) -> Vec<String> {
    events(record)
        .iter()
        .map(|e| e.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// Send the client flags and `NBD_OPT_GO` for `name`, without waiting for
/// the answer.
fn go_without_waiting(s: &Server, name: &str) -> RawClient {
    let mut c = RawClient::connect(&s.socket);
    c.option(OPT_GO, &info_request(name, &[]));
    c
}

/// The recorded events, one per line.
fn events(record: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The recorded close: it ran on a worker, for export `name`.
fn assert_closed_on_a_worker(record: &std::path::Path, name: &str) {
    let ev = events(record);
    let close = ev
        .iter()
        .find(|e| e.starts_with("close "))
        .expect("a close");
    assert!(close.contains("thread=worker"), "{close}");
    assert!(close.contains(&format!("export={name}")), "{close}");
}

/// Wait until the handle has been closed.
fn wait_for_close(record: &std::path::Path, s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !kinds(record).contains(&"close".to_owned()) {
        assert!(Instant::now() < deadline, "never closed: {}", s.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw client in transmission on export `name`.
fn opened(s: &Server, name: &str) -> RawClient {
    let mut c = RawClient::connect(&s.socket);
    c.info(OPT_GO, name, &[]);
    c
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_request_running_at_shutdown_is_answered_before_its_handle_closes() {
    let dir = TempDir::new("lc-answer");
    let record = dir.path("record");
    let s = recorded_server(&record, &["delay-at=0", "delay-ms=1500"]);
    let mut c = opened(&s, "disk1");
    c.request(0, CMD_READ, 1, 0, 512);
    std::thread::sleep(Duration::from_millis(300));
    s.sigterm();
    assert_eq!(c.simple(), (0, 1), "the read is answered");
    assert_eq!(c.read_data(512), vec![0u8; 512]);
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    assert_eq!(kinds(&record), ["open", "close", "unload"]);
}

#[test]
fn a_vanished_client_with_a_request_running_is_closed_before_the_unload() {
    let dir = TempDir::new("lc-vanish");
    let record = dir.path("record");
    let s = recorded_server(&record, &["delay-at=0", "delay-ms=1500"]);
    let mut c = opened(&s, "disk1");
    c.request(0, CMD_READ, 1, 0, 512);
    std::thread::sleep(Duration::from_millis(300));
    // Gone while its read runs, and the server told to stop.
    drop(c);
    s.sigterm();
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    assert_eq!(kinds(&record), ["open", "close", "unload"]);
}

#[test]
fn an_open_running_at_shutdown_is_closed_before_the_unload() {
    let dir = TempDir::new("lc-open-shutdown");
    let record = dir.path("record");
    let s = recorded_server(&record, &["open-delay-ms=800"]);
    let c = go_without_waiting(&s, "disk1");
    std::thread::sleep(Duration::from_millis(200));
    // The open's result, with its handle, arrives during the shutdown,
    // for a handshake the shutdown has given up.
    s.sigterm();
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    assert_eq!(kinds(&record), ["open", "close", "unload"]);
    assert_closed_on_a_worker(&record, "disk1");
    drop(c);
}

#[test]
fn an_open_that_outlasts_the_handshake_timeout_is_closed_on_a_worker_in_its_context() {
    let dir = TempDir::new("lc-open-timeout");
    let record = dir.path("record");
    let p = plugin("test");
    let rec = format!("record={}", record.display());
    let s = Server::start(&[
        "--handshake-timeout=1",
        p.to_str().unwrap(),
        &rec,
        "open-delay-ms=2000",
    ]);
    let mut c = go_without_waiting(&s, "disk1");
    assert!(c.wait_closed().is_empty(), "given up without an answer");
    wait_for_close(&record, &s);
    assert_closed_on_a_worker(&record, "disk1");
    s.stop();
}

#[test]
fn the_handle_of_a_client_that_left_during_its_open_is_closed_on_a_worker_in_its_context() {
    let dir = TempDir::new("lc-open-vanish");
    let record = dir.path("record");
    let s = recorded_server(&record, &["open-delay-ms=300"]);
    drop(go_without_waiting(&s, "disk1"));
    wait_for_close(&record, &s);
    assert_closed_on_a_worker(&record, "disk1");
    s.stop();
}

#[test]
fn closes_of_vanished_clients_keep_the_thread_model() {
    let dir = TempDir::new("lc-serial");
    let so = serial_plugin(&dir, "SERIALIZE_ALL_REQUESTS");
    let s = Server::start(&[so.to_str().unwrap()]);
    // One client keeps the plugin busy with reads of 20 ms each...
    let uri = s.uri();
    let busy = std::thread::spawn(move || {
        let script = r#"
for _ in range(10):
    bufs = [nbd.Buffer(512) for _ in range(8)]
    cookies = [h.aio_pread(b, i * 512) for i, b in enumerate(bufs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        h.aio_command_completed(c)
print("ok")
"#;
        run(client("nbdsh").args(["-u", &uri, "-c", script]))
    });
    // ...while others leave before their open, queued behind those
    // reads, has run.
    for _ in 0..10 {
        drop(go_without_waiting(&s, ""));
        std::thread::sleep(Duration::from_millis(30));
    }
    let out = busy.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    assert!(!log.contains("close while another call"), "{log}");
    assert!(!log.contains("two calls at once"), "{log}");
}

#[test]
fn unread_large_reads_keep_the_server_small_and_others_served() {
    let s = Server::start(&["memory", "size=1G"]);
    let pid = s.child.as_ref().unwrap().id();
    let before = rss_kib(pid);
    // Four clients each queue 2,000 reads of 32 MiB (64 GiB of replies)
    // and never read one.
    let hostile: Vec<RawClient> = (0..4)
        .map(|_| {
            let mut c = opened(&s, "");
            let mut reqs = Vec::new();
            for i in 0..2000u64 {
                reqs.extend(request_bytes(0, CMD_READ, i, 0, 32 << 20, &[]));
            }
            c.send(&reqs);
            c
        })
        .collect();
    let mut peak = 0;
    let mut sample = || {
        peak = peak.max(rss_kib(pid));
    };
    for _ in 0..20 {
        sample();
        std::thread::sleep(Duration::from_millis(100));
    }
    // Meanwhile another client writes and reads back 64 MiB.
    let out = run_ok(client("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 256M 64M",
        "-c",
        "read -P 0x5a 256M 64M",
        &s.uri(),
    ]));
    assert!(out.contains("read 67108864/67108864"), "{out}");
    sample();
    // Each connection may hold 64 MiB; allow for the plugin's own pages
    // (64 MiB written) and the server's pools.
    let limit = before + 4 * 64 * 1024 + 64 * 1024 + 128 * 1024;
    eprintln!("4 clients with 64 GiB of unread replies: peak RSS {peak} KiB from {before} KiB");
    assert!(
        peak < limit,
        "peak RSS {peak} KiB, limit {limit} KiB (started at {before} KiB)"
    );
    drop(hostile);
    s.stop();
}

#[test]
fn a_handle_knows_its_connection_by_the_number_the_log_gives_it() {
    let dir = TempDir::new("connid");
    let record = dir.path("record");
    let p = plugin("test");
    let rec = format!("record={}", record.display());
    let s = Server::start(&["-v", p.to_str().unwrap(), "size=1M", &rec]);
    for _ in 0..2 {
        assert_eq!(nbdhost_tests::export_size(&s.uri()), "1048576");
    }
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    let id = |e: &str| e.rsplit_once("connection=").map(|(_, n)| n.to_owned());
    let ev = events(&record);
    let opens: Vec<String> = ev
        .iter()
        .filter(|e| e.starts_with("open "))
        .filter_map(|e| id(e))
        .collect();
    let closes: Vec<String> = ev
        .iter()
        .filter(|e| e.starts_with("close "))
        .filter_map(|e| id(e))
        .collect();
    assert_eq!(opens.len(), 2, "{ev:?}");
    assert_ne!(opens[0], opens[1], "{ev:?}");
    assert_eq!(
        opens, closes,
        "each close is for the connection its open was"
    );
    for n in &opens {
        assert!(
            log.contains(&format!("connection {n}: ")),
            "no connection {n} in the log:\n{log}"
        );
    }
}
