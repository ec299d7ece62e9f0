//! The asynchronous example plugins for third-party authors serve real
//! clients: `casync` (plugin-api/examples/cplugin-async.c), built with
//! `cc` against the headers alone, and `rustasync`
//! (plugin-api/examples/rustasync.rs), built with cargo as the example
//! target it is. Their requests complete on threads of their own, which
//! each example's trace (`-v -D NAME.trace=1`) shows, with the
//! connection it saved in `open`; qemu-io and qemu-img judge the data,
//! with the chain asynchronous from end to end and under a synchronous
//! filter that waits for the plugin's asynchronous requests. The C filter
//! that nbdhost-filter(3) prints (`retry`, continuations that start the
//! next attempt) is built from the page and stacked on `casync`.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbdhost_tests::{
    build_c, convert_and_compare, filter_arg, missing, pattern, qemu_io, root, run_ok, Server,
    TempDir,
};

/// `casync`, built in `dir` as its header comment says.
fn c_example(dir: &TempDir) -> PathBuf {
    build_c(
        dir,
        "casyncplugin",
        &root().join("plugin-api/examples/cplugin-async.c"),
        &["-pthread"],
    )
}

/// `rustasync`, built by `cargo build -p nbdhost-plugin-api --example
/// rustasync`; `None` (the test skipped) with `$NBDHOST_TEST_PREBUILT`,
/// which promises that nothing is built.
fn rust_example() -> Option<PathBuf> {
    if std::env::var_os("NBDHOST_TEST_PREBUILT").is_some_and(|v| v != "0") {
        eprintln!("SKIP: NBDHOST_TEST_PREBUILT is set, and the example must be built");
        return None;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = run_ok(
        Command::new(cargo)
            .args([
                "build",
                "-p",
                "nbdhost-plugin-api",
                "--example",
                "rustasync",
            ])
            .arg("--message-format=json-render-diagnostics")
            .current_dir(root()),
    );
    let so = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "rustasync")
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "so"));
    Some(so.unwrap_or_else(|| panic!("cargo built no librustasync.so:\n{out}")))
}

/// Serve `so` (a 16 MiB disk) with the example's trace on, `args` before
/// it and `params` after, and hold it to its data with qemu-io and
/// qemu-img; returns the log.
fn serve_and_check(dir: &TempDir, so: &Path, name: &str, args: &[&str], params: &[&str]) -> String {
    let trace = format!("{name}.trace=1");
    let mut all = vec!["-v", "-D", &trace];
    all.extend_from_slice(args);
    all.extend_from_slice(&[so.to_str().unwrap(), "size=16M"]);
    all.extend_from_slice(params);
    let s = Server::start(&all);
    let uri = s.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 1M",
            "read -P 0x5a 0 1M",
            "read -P 0 1M 64k",
            // Zeroes go to an asynchronous callback of their own.
            "write -z 64k 64k",
            "read -P 0 64k 64k",
            "read -P 0x5a 128k 64k",
            // Several in flight at once, then read back.
            "aio_write -P 0x31 2M 64k",
            "aio_write -P 0x32 3M 64k",
            "aio_write -P 0x33 4M 64k",
            "aio_flush",
            "read -P 0x31 2M 64k",
            "read -P 0x32 3M 64k",
            "read -P 0x33 4M 64k",
        ],
    );
    // Many requests of many sizes: a whole image through, and compared.
    let src = dir.path("src.img");
    std::fs::write(&src, pattern(8 << 20, 19)).unwrap();
    convert_and_compare(&src, &uri);
    let (status, log) = s.stop_with_log();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("completed twice"), "{log}");
    log
}

#[test]
fn the_c_example_completes_on_its_own_thread_and_serves_qemu() {
    if missing("", &["qemu-io", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new("casync");
    let so = c_example(&dir);
    let log = serve_and_check(&dir, &so, "casync", &[], &[]);
    // Its thread knows the connection and export only from open.
    let trace = log
        .lines()
        .find(|l| l.contains("casync: connection ") && l.contains("(export \"\"): write of"))
        .unwrap_or_else(|| panic!("no trace from the plugin's thread: {log}"));
    assert!(trace.contains("done on the plugin's thread"), "{trace}");
}

#[test]
fn the_c_example_serves_a_synchronous_filter_that_waits_for_it() {
    if missing("", &["qemu-io", "qemu-img"]) {
        return;
    }
    // delay has only synchronous callbacks: its next->pread and pwrite
    // wait for the plugin's asynchronous requests on a worker thread.
    let dir = TempDir::new("casync-sync");
    let so = c_example(&dir);
    let delay = filter_arg("delay");
    let log = serve_and_check(&dir, &so, "casync", &[&delay], &["rdelay=0", "wdelay=0"]);
    assert!(log.contains("done on the plugin's thread"), "{log}");
}

#[test]
fn the_rust_example_completes_on_its_own_thread_and_serves_qemu() {
    if missing("", &["qemu-io", "qemu-img"]) {
        return;
    }
    let Some(so) = rust_example() else { return };
    let dir = TempDir::new("rustasync");
    let log = serve_and_check(&dir, &so, "rustasync", &[], &[]);
    let trace = log
        .lines()
        .find(|l| l.contains("rustasync: connection ") && l.contains("(export \"\"): read of"))
        .unwrap_or_else(|| panic!("no trace from the plugin's thread: {log}"));
    assert!(trace.contains("on thread 'rustasync'"), "{trace}");
}

#[test]
fn the_rust_example_serves_a_synchronous_filter_with_its_synchronous_callbacks() {
    if missing("", &["qemu-io", "qemu-img"]) {
        return;
    }
    let Some(so) = rust_example() else { return };
    let dir = TempDir::new("rustasync-sync");
    let delay = filter_arg("delay");
    serve_and_check(&dir, &so, "rustasync", &[&delay], &["rdelay=0", "wdelay=0"]);
}

/// The C filter printed in the EXAMPLE of nbdhost-filter(3), built in
/// `dir`.
fn man_page_filter(dir: &TempDir) -> PathBuf {
    let page = std::fs::read_to_string(root().join("man/nbdhost-filter.3")).unwrap();
    let start = page
        .find("#include <errno.h>")
        .expect("nbdhost-filter(3) prints a C filter");
    let end = start
        + page[start..]
            .find("NBDHOST_REGISTER_FILTER (filter)")
            .expect("the example registers its filter")
        + "NBDHOST_REGISTER_FILTER (filter)".len();
    let source = page[start..end].replace("\\-", "-").replace("\\e", "\\");
    let c = dir.path("retry.c");
    std::fs::write(&c, source + "\n").unwrap();
    build_c(dir, "retryfilter", &c, &[])
}

#[test]
fn the_man_page_filter_keeps_the_example_plugin_asynchronous() {
    if missing("", &["qemu-io", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new("retry");
    let so = c_example(&dir);
    let retry = format!("--filter={}", man_page_filter(&dir).display());
    let log = serve_and_check(&dir, &so, "casync", &[&retry], &[]);
    assert!(log.contains("done on the plugin's thread"), "{log}");
    assert!(!log.contains("trying again"), "{log}");
}

#[test]
fn the_man_page_filter_tries_a_failed_read_three_times_either_way() {
    if missing("", &["nbdsh"]) {
        return;
    }
    let dir = TempDir::new("retry-eio");
    let so = c_example(&dir);
    let retry = format!("--filter={}", man_page_filter(&dir).display());
    // Below retry, log writes down every attempt and error fails it.
    let (log, error, delay) = (filter_arg("log"), filter_arg("error"), filter_arg("delay"));
    let script = "\
try:
    h.pread(4096, 0)
    print('read')
except nbd.Error as e:
    print(e.errno)
";
    // Asynchronous: each attempt's continuation starts the next.
    // Synchronous: below the synchronous delay filter, retry's pread.
    for above in [None, Some(delay.as_str())] {
        let attempts = dir.path(&format!("attempts-{}.log", above.is_some()));
        let logfile = format!("logfile={}", attempts.display());
        let mut args: Vec<&str> = above.into_iter().collect();
        args.extend([retry.as_str(), log.as_str(), error.as_str()]);
        args.extend([so.to_str().unwrap(), &logfile, "error-pread-rate=1"]);
        let s = Server::start(&args);
        let out = nbdhost_tests::nbdsh(&s.uri(), script);
        assert_eq!(out.trim(), "EIO", "{above:?}");
        let (status, server_log) = s.stop_with_log();
        assert!(status.success(), "{server_log}");
        let tried = std::fs::read_to_string(&attempts).unwrap();
        let reads = tried.lines().filter(|l| l.contains(" Read id=")).count();
        assert_eq!(reads, 3, "{above:?}: {tried}");
        if above.is_none() {
            let warned = server_log.matches("failed, trying again").count();
            assert_eq!(warned, 2, "{server_log}");
        }
    }
}
