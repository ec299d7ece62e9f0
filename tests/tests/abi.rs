//! Third-party plugins and filters written in C, built with `cc` against
//! the installed headers only, and loaded by the real server: the example
//! in nbdhost-plugin(3) as printed, a plugin from an older (shorter) ABI,
//! one from a future major ABI (refused), a shared object that is not a
//! plugin (refused), and a C filter stacked on a Rust plugin.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbdhost_tests::{client, nbdhost_bin, nbdsh, run, run_ok, Server, TempDir};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Compile C `source` into `dir/lib<name>.so`, with warnings as errors.
fn build(dir: &TempDir, name: &str, source: &Path) -> PathBuf {
    build_with(dir, name, source, &[])
}

/// As [`build`], with extra compiler arguments such as `-D` definitions.
fn build_with(dir: &TempDir, name: &str, source: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.path(&format!("lib{name}.so"));
    run_ok(
        Command::new("cc")
            .args(extra)
            .args([
                "-shared",
                "-fPIC",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wno-unused-parameter",
                "-o",
            ])
            .arg(&out)
            .arg("-I")
            .arg(root().join("plugin-api/include"))
            .arg(source),
    );
    out
}

/// The C example exactly as nbdhost-plugin(3) prints it.
fn man_page_example(dir: &TempDir) -> PathBuf {
    let page = std::fs::read_to_string(root().join("man/nbdhost-plugin.3")).unwrap();
    let start = page
        .find("#include <string.h>")
        .expect("the example in the man page");
    let end = page[start..].find(".EE").unwrap() + start;
    let code = page[start..end].replace("\\-", "-").replace("\\e", "\\");
    let src = dir.path("example.c");
    std::fs::write(&src, code).unwrap();
    src
}

#[test]
fn the_manual_example_builds_and_serves() {
    let dir = TempDir::new("cex");
    let so = build(&dir, "exampleplugin", &man_page_example(&dir));
    let s = Server::start(&[so.to_str().unwrap()]);
    let out = nbdsh(
        &s.uri(),
        "print(list(h.pread(4, 254)), h.is_read_only(), h.get_size())",
    );
    assert_eq!(out.trim(), "[254, 255, 0, 1] True 1048576");
    let dump = run_ok(Command::new(nbdhost_bin()).arg("--dump-plugin").arg(&so));
    assert!(
        dump.contains("name=example") && dump.contains("version=1.0"),
        "{dump}"
    );
    assert!(s.stop().success());
}

#[test]
fn an_older_abi_struct_still_works() {
    let dir = TempDir::new("cold");
    let so = build(&dir, "oldabiplugin", &root().join("tests/c/oldabi.c"));
    let dump = run_ok(Command::new(nbdhost_bin()).arg("--dump-plugin").arg(&so));
    let size: usize = dump
        .lines()
        .find_map(|l| l.strip_prefix("struct_size="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        size < std::mem::size_of::<nbdhost_plugin_api::abi::Plugin>(),
        "{dump}"
    );
    let s = Server::start(&[so.to_str().unwrap()]);
    let out = nbdsh(
        &s.uri(),
        "print(list(h.pread(3, 4095)), h.is_read_only(), h.can_flush())",
    );
    assert_eq!(out.trim(), "[255, 0, 1] True False");
    assert!(s.stop().success());
}

#[test]
fn other_major_abis_and_non_plugins_are_refused() {
    let dir = TempDir::new("cbad");
    let so = build(&dir, "futureplugin", &root().join("tests/c/future.c"));
    let out = run(Command::new(nbdhost_bin()).arg("-f").arg(&so));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ABI 2.0") && err.contains("supports ABI 1.x"),
        "{err}"
    );

    let so = build(&dir, "nothing", &root().join("tests/c/notaplugin.c"));
    let out = run(Command::new(nbdhost_bin()).arg("-f").arg(&so));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not an nbdhost plugin") && err.contains("nbdhost_plugin_entry"),
        "{err}"
    );
}

#[test]
fn a_c_filter_stacks_on_a_rust_plugin() {
    let dir = TempDir::new("cfilter");
    let so = build(&dir, "invertfilter", &root().join("tests/c/invert.c"));
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let filter = format!("--filter={}", so.display());
    let s = Server::start(&[&filter, "file", img.to_str().unwrap()]);
    // Through the filter: zeroes below read as 0xff.
    let out = nbdsh(&s.uri(), "print(list(h.pread(2, 0)))");
    assert_eq!(out.trim(), "[255, 255]");
    run_ok(
        client("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x0f 4k 4k",
                "-c",
                "read -P 0x0f 4k 4k",
            ])
            .arg(s.uri()),
    );
    // The filter refuses to zero; libnbd does not retry, so this proves the
    // server writes zeroes through the filter itself.
    let out = nbdsh(
        &s.uri(),
        "h.zero(4096, 8192); print(h.pread(4096, 8192) == bytes(4096))",
    );
    assert_eq!(out.trim(), "True");
    let below = std::fs::read(&img).unwrap();
    assert!(
        below[4096..8192].iter().all(|&b| b == 0xf0),
        "stored inverted"
    );
    assert!(
        below[8192..12288].iter().all(|&b| b == 0xff),
        "zeroes stored inverted"
    );
    let dump = run_ok(
        Command::new(nbdhost_bin())
            .arg(&filter)
            .args(["--dump-plugin", "memory"]),
    );
    assert!(
        dump.contains("filter:") && dump.contains("name=invert"),
        "{dump}"
    );
    assert!(s.stop().success());
}

/// Eight reads in flight on each of two connections at once.
const CONCURRENT_READS: &str = r#"
bufs = [nbd.Buffer(512) for _ in range(8)]
cookies = [h.aio_pread(b, i * 512) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    h.aio_command_completed(c)  # raises if that read failed
print("ok")
"#;

#[test]
fn thread_models_are_honoured() {
    let dir = TempDir::new("cserial");
    let so = build_with(
        &dir,
        "serialplugin",
        &root().join("tests/c/serial.c"),
        &["-DMODEL=NBDHOST_THREAD_MODEL_SERIALIZE_ALL_REQUESTS"],
    );
    let s = Server::start(&[so.to_str().unwrap()]);
    let uri = s.uri();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                run(client("nbdsh").args(["-u", &uri, "-c", CONCURRENT_READS]))
            })
        })
        .collect();
    for c in clients {
        let out = c.join().unwrap();
        assert!(
            out.status.success(),
            "a read overlapped another: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        !s.log_text().contains("two calls at once"),
        "{}",
        s.log_text()
    );
    drop(s);

    // serialize_connections: a second client waits for the first to leave.
    let so = build_with(
        &dir,
        "serialconnplugin",
        &root().join("tests/c/serial.c"),
        &["-DMODEL=NBDHOST_THREAD_MODEL_SERIALIZE_CONNECTIONS"],
    );
    let s = Server::start(&[so.to_str().unwrap()]);
    let uri = s.uri();
    let first = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            run_ok(client("nbdsh").args([
                "-u",
                &uri,
                "-c",
                "import time; h.pread(512, 0); time.sleep(1); print(time.time())",
            ]))
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second = run_ok(client("nbdsh").args([
        "-u",
        &uri,
        "-c",
        "import time; h.pread(512, 0); print(time.time())",
    ]));
    let t1: f64 = first.join().unwrap().trim().parse().unwrap();
    let t2: f64 = second.trim().parse().unwrap();
    assert!(
        t2 >= t1,
        "the second connection was served while the first was open"
    );
    assert!(s.stop().success());
}
