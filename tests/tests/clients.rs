//! The server as its users drive it: qemu-img, qemu-io (which negotiates
//! extended headers), nbdinfo and nbdcopy, against the memory and file
//! plugins, with the data checked byte for byte.

use nbdhost_tests::{client, pattern, run_ok, Server, TempDir};

fn write_file(dir: &TempDir, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn qemu_img_info_convert_compare() {
    let dir = TempDir::new("qimg");
    let data = pattern(32 << 20, 1);
    let src = write_file(&dir, "src.img", &data);
    let s = Server::start(&["memory", "32M"]);
    let info = run_ok(
        client("qemu-img")
            .args(["info", "--output=json"])
            .arg(s.uri()),
    );
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
    run_ok(
        client("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(s.uri()),
    );
    let out = run_ok(
        client("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(s.uri()),
    );
    assert!(out.contains("Images are identical"), "{out}");
    // A changed byte must be noticed, or the comparison proves nothing.
    run_ok(
        client("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0 12345 1"])
            .arg(s.uri()),
    );
    let out = nbdhost_tests::run(
        client("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(s.uri()),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare should see the difference"
    );
    assert!(s.stop().success());
}

#[test]
fn qemu_io_patterns_discard_and_zero() {
    let s = Server::start(&["memory", "16M"]);
    let out = run_ok(
        client("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 4M",
                "-c",
                "read -P 0x5a 0 4M",
                "-c",
                "discard 1M 1M",
                "-c",
                "read -P 0 1M 1M",
                "-c",
                "write -z 2M 512k",
                "-c",
                "read -P 0 2M 512k",
                "-c",
                "write -z -u 3M 64k",
                "-c",
                "read -P 0 3M 64k",
                "-c",
                "read -P 0x5a 3136k 64k",
                "-c",
                "write -P 0xa5 -f 5M 4k",
                "-c",
                "flush",
                "-c",
                "read -P 0xa5 5M 4k",
                "-c",
                "read -P 0 6M 1M",
            ])
            .arg(s.uri()),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 7, "{out}");
    assert!(s.stop().success());
}

#[test]
fn nbdinfo_list_map_and_json() {
    let s = Server::start(&["memory", "8M"]);
    run_ok(
        client("qemu-io")
            .args(["-f", "raw", "-c", "write -P 1 1M 1M"])
            .arg(s.uri()),
    );
    let list = run_ok(client("nbdinfo").arg("--list").arg(s.uri()));
    assert!(list.contains("export=\"\""), "{list}");
    let map = run_ok(client("nbdinfo").arg("--map").arg(s.uri()));
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["0", "1048576", "3"], "{map}");
    assert_eq!(lines[1][..3], ["1048576", "1048576", "0"], "{map}");
    assert_eq!(lines[2][..3], ["2097152", "6291456", "3"], "{map}");
    let json = run_ok(client("nbdinfo").arg("--json").arg(s.uri()));
    assert!(json.contains("\"export-size\": 8388608"), "{json}");
    assert!(json.contains("\"can_multi_conn\": true"), "{json}");
    assert!(s.stop().success());
}

#[test]
fn nbdcopy_both_ways() {
    let dir = TempDir::new("nbdcopy");
    let data = pattern(24 << 20, 2);
    let src = write_file(&dir, "src.img", &data);
    let s = Server::start(&["memory", "24M"]);
    run_ok(client("nbdcopy").arg(&src).arg(s.uri()));
    let back = dir.path("back.img");
    run_ok(client("nbdcopy").arg(s.uri()).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "data differs after two copies"
    );
    assert!(s.stop().success());
}

#[test]
fn file_plugin_serves_and_changes_the_file() {
    let dir = TempDir::new("file");
    let data = pattern(16 << 20, 3);
    let img = write_file(&dir, "disk.img", &data);
    let s = Server::start(&["file", img.to_str().unwrap()]);
    let out = run_ok(
        client("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&img)
            .arg(s.uri()),
    );
    assert!(out.contains("Images are identical"), "{out}");
    run_ok(
        client("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x77 64k 64k",
                "-c",
                "discard 8M 1M",
            ])
            .arg(s.uri()),
    );
    let now = std::fs::read(&img).unwrap();
    assert!(now[65536..131072].iter().all(|&b| b == 0x77));
    assert!(
        now[8 << 20..9 << 20].iter().all(|&b| b == 0),
        "discard punched a hole"
    );
    assert_eq!(now[..65536], data[..65536]);
    let map = run_ok(client("nbdinfo").arg("--map").arg(s.uri()));
    assert!(
        map.contains(" 8388608     1048576    3"),
        "hole visible in the map: {map}"
    );
    assert!(s.stop().success());
}

#[test]
fn file_plugin_read_only_and_cache_none() {
    let dir = TempDir::new("fileopts");
    // O_DIRECT needs a real file system; the test directory is usually on one.
    let img = write_file(&dir, "disk.img", &pattern(1 << 20, 4));
    let s = Server::start(&["-r", "file", &format!("file={}", img.display())]);
    let out = nbdhost_tests::run(
        client("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512"])
            .arg(s.uri()),
    );
    let msg =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("write failed") || msg.contains("Permission denied"),
        "write on -r must fail: {msg}"
    );
    let info = run_ok(client("nbdinfo").arg(s.uri()));
    assert!(info.contains("is_read_only: true"), "{info}");
    drop(s);
    let s = Server::start(&["file", img.to_str().unwrap(), "cache=none"]);
    let info = run_ok(client("nbdinfo").arg(s.uri()));
    if info.contains("block_size_minimum: 4096") {
        run_ok(
            client("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "write -P 9 4k 8k",
                    "-c",
                    "read -P 9 4k 8k",
                ])
                .arg(s.uri()),
        );
        assert!(std::fs::read(&img).unwrap()[4096..12288]
            .iter()
            .all(|&b| b == 9));
    }
    assert!(s.stop().success());
}

#[test]
fn file_plugin_dir_serves_each_file_under_its_name() {
    let dir = TempDir::new("filedir");
    let served = dir.path("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::write(served.join("a.img"), pattern(1 << 20, 5)).unwrap();
    std::fs::write(served.join("b.img"), vec![0u8; 2 << 20]).unwrap();
    std::os::unix::fs::symlink("a.img", served.join("link")).unwrap();
    std::fs::create_dir(served.join("subdir")).unwrap();
    let s = Server::start(&["file", &format!("dir={}", served.display())]);
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", s.socket.display());

    // NBD_OPT_LIST: the regular files, and links to them; not the directory.
    let list = run_ok(client("nbdinfo").args(["--list", "--json"]).arg(s.uri()));
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"export-name\": \""))
        .map(|l| l.trim_end_matches("\","))
        .collect();
    assert_eq!(names, ["a.img", "b.img", "link"], "{list}");

    run_ok(
        client("qemu-io")
            .args(["-f", "raw", "-c", "write -P 7 1M 4k"])
            .arg(uri("b.img")),
    );
    assert!(
        std::fs::read(served.join("b.img")).unwrap()[1 << 20..(1 << 20) + 4096]
            .iter()
            .all(|&b| b == 7)
    );
    assert_eq!(
        run_ok(client("nbdinfo").arg("--size").arg(uri("link"))).trim(),
        "1048576"
    );
    // The default export, a directory and a path are no export.
    for name in ["", "subdir", "..%2Fserved%2Fa.img"] {
        let out = nbdhost_tests::run(client("nbdinfo").arg("--size").arg(uri(name)));
        assert!(!out.status.success(), "export {name:?} was served");
    }
    assert!(s.stop().success());
}
