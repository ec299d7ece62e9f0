//! The filters that change the shape of a disk (offset, partition,
//! truncate, blocksize) or make it writable (cow), driven by qemu-io,
//! qemu-img, nbdinfo and nbdsh, with every byte checked against a
//! reference: in the file below the filter as well as through it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbdhost_tests::{
    client, filter_arg, nbdhost_bin, nbdsh, pattern, plugin, run, run_ok, Server, TempDir,
};

const K: usize = 1024;
const M: usize = 1024 * 1024;

/// `--filter=NAME ... file file=IMG` for the given filters, then `extra`.
fn file_args(filters: &[&str], img: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = filters.iter().map(|f| filter_arg(f)).collect();
    v.push(plugin("file").display().to_string());
    v.push(format!("file={}", img.display()));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn start(args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

fn write_file(dir: &TempDir, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Run qemu-io with these commands; every `read -P` must verify.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = client("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri));
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "{out}"
    );
    out
}

/// Run one qemu-io command that must fail; returns what it printed.
fn qemu_io_fails(uri: &str, cmd: &str) -> String {
    let out = run(client("qemu-io").args(["-f", "raw", "-c", cmd]).arg(uri));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("failed") || !out.status.success(),
        "{cmd} should have failed: {text}"
    );
    text
}

/// The whole export, read with nbdcopy (qemu-img would round the size
/// up to whole sectors).
fn read_all(uri: &str, dir: &TempDir) -> Vec<u8> {
    let out = dir.path("export.img");
    let _ = std::fs::remove_file(&out);
    run_ok(client("nbdcopy").arg(uri).arg(&out));
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// A number from `nbdinfo --json` output.
fn json_num(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\": ");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pat.len();
    json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

fn json_bool(json: &str, key: &str) -> bool {
    let pat = format!("\"{key}\": ");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pat.len();
    json[at..].starts_with("true")
}

fn nbdinfo_json(uri: &str) -> String {
    run_ok(client("nbdinfo").arg("--json").arg(uri))
}

/// `nbdinfo --map` as (offset, length, type) rows.
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    run_ok(client("nbdinfo").arg("--map").arg(uri))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// Where the first difference between two equal-length buffers is.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: first difference at byte {i}: got {:#x}, want {:#x}",
            got[i], want[i]
        );
    }
}

#[test]
fn offset_window_lands_at_the_right_place_of_the_file() {
    let dir = TempDir::new("offset");
    let orig = pattern(8 * M, 11);
    let img = write_file(&dir, "disk.img", &orig);
    let s = start(&file_args(&["offset"], &img, &["offset=1M", "range=2M"]));
    let uri = s.uri();
    assert_eq!(json_num(&nbdinfo_json(&uri), "export-size"), 2 * M as u64);
    // The window reads as the file's bytes 1M..3M.
    assert_same("window", &read_all(&uri, &dir), &orig[M..3 * M]);
    qemu_io(
        &uri,
        &[
            "write -P 0x33 0 4k",
            "write -P 0x44 2044k 4k",
            "write -P 0x55 12345 999",
            "read -P 0x55 12345 999",
        ],
    );
    // Nothing past the window can be reached.
    qemu_io_fails(&uri, "write -P 0x66 2047k 2k");
    assert!(s.stop().success());

    let mut want = orig.clone();
    want[M..M + 4 * K].fill(0x33);
    want[3 * M - 4 * K..3 * M].fill(0x44);
    want[M + 12345..M + 12345 + 999].fill(0x55);
    assert_same("file after writes", &std::fs::read(&img).unwrap(), &want);

    // Without range, the window runs to the end of the file.
    let s = start(&file_args(&["offset"], &img, &["offset=5M"]));
    assert_same("tail window", &read_all(&s.uri(), &dir), &want[5 * M..]);
    assert!(s.stop().success());
}

/// A server started by hand, for an environment `Server::start` cannot
/// give; killed on drop.
struct EnvServer {
    child: Child,
    socket: PathBuf,
}

impl EnvServer {
    fn start(dir: &TempDir, env: &[(&str, &Path)], args: &[String]) -> EnvServer {
        let socket = dir.path("env.sock");
        let mut cmd = Command::new(nbdhost_bin());
        cmd.arg("-f").arg("-U").arg(&socket).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "nbdhost exited early");
            assert!(Instant::now() < deadline, "nbdhost did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        EnvServer { child, socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for EnvServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open files of process `pid` whose target starts with `prefix`.
fn open_files(pid: u32, prefix: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with(prefix))
        .collect()
}

const COW_BLOCK: usize = 64 * K;

#[test]
fn cow_keeps_writes_in_a_temporary_overlay() {
    let dir = TempDir::new("cow");
    // Not a whole number of blocks, so the last block is partial.
    let size = 4 * M + 3 * K;
    let orig = pattern(size, 21);
    let img = write_file(&dir, "base.img", &orig);
    let s = start(&file_args(&["cow"], &img, &[]));
    let uri = s.uri();

    let json = nbdinfo_json(&uri);
    assert!(!json_bool(&json, "is_read_only"), "{json}");
    assert!(json_bool(&json, "can_multi_conn"), "{json}");
    assert!(
        json_bool(&json, "can_trim") && json_bool(&json, "can_zero"),
        "{json}"
    );
    assert_eq!(json_num(&json, "export-size"), size as u64);
    assert_eq!(json_num(&json, "block_size_preferred"), COW_BLOCK as u64);

    qemu_io(
        &uri,
        &[
            // Partial blocks at both ends, then whole blocks.
            "write -P 0x11 1000 70000",
            "write -P 0x22 1M 128k",
            "write -P 0x33 2000000 1",
            // Zero and trim, with unaligned edges.
            "write -z 200000 300000",
            "discard 2M 1M",
            "write -P 0x44 2M 100",
            // The partial last block.
            "write -P 0x55 4195000 2000",
            "read -P 0x11 1000 70000",
            "read -P 0 200000 300000",
        ],
    );
    let mut want = orig.clone();
    want[1000..71000].fill(0x11);
    want[M..M + 128 * K].fill(0x22);
    want[2000000] = 0x33;
    want[200000..500000].fill(0);
    want[2 * M..3 * M].fill(0);
    want[2 * M..2 * M + 100].fill(0x44);
    want[4195000..4197000].fill(0x55);
    assert_same("through cow", &read_all(&uri, &dir), &want);

    // Every connection shares the one overlay.
    qemu_io(&uri, &["read -P 0x22 1M 128k", "read -P 0x55 4195000 2000"]);

    // Block status: written blocks are data, trimmed ones holes.
    let m = map(&uri);
    let at = |off: u64| m.iter().find(|e| e.0 <= off && off < e.0 + e.1).unwrap().2;
    assert_eq!(at(M as u64 + 1), 0, "{m:?}");
    assert_eq!(at(2 * M as u64 + 2 * COW_BLOCK as u64), 3, "{m:?}");
    // Blocks wholly inside the zeroed range read as zeroes.
    assert_eq!(at(4 * COW_BLOCK as u64) & 2, 2, "{m:?}");

    // The overlay is an unlinked file in /var/tmp, and the base file is
    // untouched.
    let pid = s.child.as_ref().unwrap().id();
    let overlay = open_files(pid, "/var/tmp/");
    assert!(
        overlay.len() == 1 && overlay[0].ends_with("(deleted)"),
        "{overlay:?}"
    );
    assert_same("base file", &std::fs::read(&img).unwrap(), &orig);
    assert!(s.stop().success());

    // Changes do not outlive the server.
    let s = start(&file_args(&["cow"], &img, &[]));
    assert_same("after restart", &read_all(&s.uri(), &dir), &orig);
    assert!(s.stop().success());
}

/// A change made to the base behind the server's back shows which reads
/// came from the overlay: a kept block no longer follows the base.
#[test]
fn cow_on_read_keeps_what_was_read_and_follows_its_switch_file() {
    let dir = TempDir::new("cowread");
    let img = write_file(&dir, "disk.img", &[1u8; 64 * K]);
    let switch = dir.path("switch");
    let on_read = format!("cow-on-read={}", switch.display());
    let s = start(&file_args(&["cow"], &img, &["cow-block-size=4K", &on_read]));
    let uri = s.uri();
    // The switch file is absent: reads pass through, nothing is kept.
    qemu_io(&uri, &["read -P 1 0 4k"]);
    std::fs::write(&img, [2u8; 64 * K]).unwrap();
    qemu_io(&uri, &["read -P 2 0 4k"]);
    // Present: the blocks read are kept, so later base changes are hidden.
    std::fs::write(&switch, b"").unwrap();
    qemu_io(&uri, &["read -P 2 0 8k"]);
    std::fs::write(&img, [3u8; 64 * K]).unwrap();
    qemu_io(&uri, &["read -P 2 0 8k", "read -P 3 8k 4k"]);
    assert!(s.stop().success());

    // cow-on-cache: NBD_CMD_CACHE keeps blocks the same way.
    let s = start(&file_args(
        &["cow"],
        &img,
        &["cow-block-size=4K", "cow-on-cache=true"],
    ));
    nbdsh(&s.uri(), "h.cache(4096, 0)");
    std::fs::write(&img, [4u8; 64 * K]).unwrap();
    qemu_io(&s.uri(), &["read -P 3 0 4k", "read -P 4 4k 4k"]);
    assert!(s.stop().success());
}

#[test]
fn cow_overlay_follows_tmpdir_and_serves_parallel_writes() {
    let dir = TempDir::new("cowtmp");
    let tmp = dir.path("overlay-dir");
    std::fs::create_dir(&tmp).unwrap();
    let orig = pattern(2 * M, 22);
    let img = write_file(&dir, "base.img", &orig);
    let s = EnvServer::start(
        &dir,
        &[("TMPDIR", &tmp)],
        &file_args(&["cow"], &img, &["cow-block-size=4K"]),
    );
    let overlay = open_files(s.child.id(), &tmp.display().to_string());
    assert!(
        overlay.len() == 1 && overlay[0].ends_with("(deleted)"),
        "{overlay:?}"
    );
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);

    // Many one-byte writes into the same few blocks, all in flight at
    // once: each is a read-modify-write of its block, and none may undo
    // another.
    let script = r#"
base = h.pread(h.get_size(), 0)
ref = bytearray(base)
cookies = []
for i in range(256):
    off = 5000 + i * 37
    buf = nbd.Buffer.from_bytearray(bytearray([i % 251 + 1]))
    cookies.append((h.aio_pwrite(buf, off), buf))
    ref[off] = i % 251 + 1
pending = [c for c, _ in cookies]
while pending:
    h.poll(-1)
    pending = [c for c in pending if not h.aio_command_completed(c)]
got = h.pread(h.get_size(), 0)
bad = [i for i in range(len(ref)) if got[i] != ref[i]]
assert not bad, "bytes lost at %s" % bad[:10]
assert h.can_multi_conn()
print("ok")
"#;
    assert_eq!(nbdsh(&s.uri(), script).trim(), "ok");
    assert_same("base file", &std::fs::read(&img).unwrap(), &orig);
}

/// Put one 16-byte partition entry into the sector at `sector_at`.
fn put_entry(disk: &mut [u8], sector_at: usize, i: usize, kind: u8, start: usize, len: usize) {
    let at = sector_at + 446 + 16 * i;
    disk[at..at + 16].fill(0);
    disk[at + 4] = kind;
    disk[at + 8..at + 12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
    disk[at + 12..at + 16].copy_from_slice(&((len / 512) as u32).to_le_bytes());
}

fn boot_sector(disk: &mut [u8], at: usize) {
    disk[at..at + 512].fill(0);
    disk[at + 510] = 0x55;
    disk[at + 511] = 0xaa;
}

/// A 16 MiB MBR disk: primaries 1 (1M at 1M) and 2 (3M at 3M), an
/// extended partition 3 (8M at 8M) holding logical 5 (2M at 9M) and
/// 6 (3M at 13M). Everything else is patterned data.
fn mbr_disk() -> Vec<u8> {
    let mut d = pattern(16 * M, 31);
    boot_sector(&mut d, 0);
    put_entry(&mut d, 0, 0, 0x83, M, M);
    put_entry(&mut d, 0, 1, 0x83, 3 * M, 3 * M);
    put_entry(&mut d, 0, 2, 0x05, 8 * M, 8 * M);
    // First EBR at the start of the extended partition; its logical
    // partition starts relative to the EBR, its link relative to the
    // extended partition.
    boot_sector(&mut d, 8 * M);
    put_entry(&mut d, 8 * M, 0, 0x83, M, 2 * M);
    put_entry(&mut d, 8 * M, 1, 0x05, 4 * M, 4 * M);
    boot_sector(&mut d, 12 * M);
    put_entry(&mut d, 12 * M, 0, 0x83, M, 3 * M);
    d
}

/// An 8 MiB GPT disk with entries 1 (1M at 1M) and 3 (4M at 2M); entry 2
/// is unused.
fn gpt_disk() -> Vec<u8> {
    let mut d = pattern(8 * M, 32);
    d[..34 * 512].fill(0);
    boot_sector(&mut d, 0);
    put_entry(&mut d, 0, 0, 0xee, 512, 8 * M - 512);
    let h = 512;
    d[h..h + 8].copy_from_slice(b"EFI PART");
    d[h + 8..h + 12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    d[h + 12..h + 16].copy_from_slice(&92u32.to_le_bytes());
    d[h + 24..h + 32].copy_from_slice(&1u64.to_le_bytes());
    d[h + 32..h + 40].copy_from_slice(&((8 * M / 512 - 1) as u64).to_le_bytes());
    d[h + 40..h + 48].copy_from_slice(&34u64.to_le_bytes());
    d[h + 48..h + 56].copy_from_slice(&((8 * M / 512 - 34) as u64).to_le_bytes());
    d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
    d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
    d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
    for (entry, start, len) in [(1, M, M), (3, 2 * M, 4 * M)] {
        let at = 2 * 512 + 128 * (entry - 1);
        // The Linux filesystem data type GUID, as stored on disk.
        d[at..at + 16].copy_from_slice(&[
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ]);
        d[at + 16..at + 32].fill(entry as u8);
        d[at + 32..at + 40].copy_from_slice(&((start / 512) as u64).to_le_bytes());
        d[at + 40..at + 48].copy_from_slice(&(((start + len) / 512 - 1) as u64).to_le_bytes());
    }
    d
}

/// Open the export with qemu-img and return what it said on failure.
fn open_error(args: &[String]) -> String {
    let out = run(Command::new(nbdhost_bin())
        .args(["-U", "-"])
        .args(args)
        .args(["--run", "qemu-img info \"$uri\""])
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdin(Stdio::null()));
    assert!(!out.status.success(), "opening should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn partition_writes_land_inside_their_mbr_partition() {
    let dir = TempDir::new("mbr");
    let orig = mbr_disk();
    let img = write_file(&dir, "disk.img", &orig);

    let s = start(&file_args(&["partition"], &img, &["partition=2"]));
    let uri = s.uri();
    let json = nbdinfo_json(&uri);
    assert_eq!(json_num(&json, "export-size"), 3 * M as u64);
    assert!(json.contains("partition 2 of MBR disk"), "{json}");
    assert_same("partition 2", &read_all(&uri, &dir), &orig[3 * M..6 * M]);
    qemu_io(
        &uri,
        &[
            "write -P 0xa1 0 4k",
            "write -P 0xa2 12345 999",
            "write -P 0xa3 3071k 1k",
            "write -z 1M 100000",
        ],
    );
    qemu_io_fails(&uri, "write -P 0xa4 3071k 2k");
    assert!(s.stop().success());
    let mut want = orig.clone();
    let p2 = 3 * M;
    want[p2..p2 + 4 * K].fill(0xa1);
    want[p2 + 12345..p2 + 12345 + 999].fill(0xa2);
    want[p2 + 3071 * K..p2 + 3 * M].fill(0xa3);
    want[p2 + M..p2 + M + 100000].fill(0);
    // Partition 1, the tables and everything else are untouched.
    assert_same("disk after writes", &std::fs::read(&img).unwrap(), &want);

    // Logical partitions too, checked against the file and, like a
    // primary one, against nbdkit's own partition filter on the same disk.
    for (n, at, len) in [(1, M, M), (5, 9 * M, 2 * M), (6, 13 * M, 3 * M)] {
        let mut args = vec!["-r".to_string()];
        args.extend(file_args(
            &["partition"],
            &img,
            &[&format!("partition={n}")],
        ));
        let s = start(&args);
        assert_same(
            &format!("partition {n}"),
            &read_all(&s.uri(), &dir),
            &want[at..at + len],
        );
        compare_with_nbdkit(&img, n, &s.uri());
        assert!(s.stop().success());
    }

    let e = open_error(&file_args(&["partition"], &img, &["partition=4"]));
    assert!(e.contains("MBR partition 4 not found"), "{e}");
    let e = open_error(&file_args(&["partition"], &img, &["partition=7"]));
    assert!(e.contains("MBR partition 7 not found"), "{e}");
    let blank = write_file(&dir, "blank.img", &vec![0u8; M]);
    let e = open_error(&file_args(&["partition"], &blank, &["partition=1"]));
    assert!(e.contains("not a partitioned disk"), "{e}");
}

/// Compare our export with nbdkit's partition filter on the same file.
fn compare_with_nbdkit(img: &Path, n: u32, ours: &str) {
    let out = run_ok(
        client("nbdkit")
            .args(["-r", "-U", "-", "--filter=partition", "file"])
            .arg(img)
            .arg(format!("partition={n}"))
            .arg("--run")
            .arg(format!("qemu-img compare -f raw -F raw \"$uri\" '{ours}'")),
    );
    assert!(out.contains("Images are identical"), "partition {n}: {out}");
}

#[test]
fn partition_serves_a_gpt_entry() {
    let dir = TempDir::new("gpt");
    let orig = gpt_disk();
    let img = write_file(&dir, "disk.img", &orig);
    let s = start(&file_args(&["partition"], &img, &["partition=3"]));
    let uri = s.uri();
    let json = nbdinfo_json(&uri);
    assert_eq!(json_num(&json, "export-size"), 4 * M as u64);
    assert!(json.contains("partition 3 of GPT disk"), "{json}");
    compare_with_nbdkit(&img, 3, &uri);
    qemu_io(
        &uri,
        &[
            "write -P 0xb1 0 512",
            "write -P 0xb2 4194303 1",
            "discard 1M 64k",
        ],
    );
    let json = nbdinfo_json(&uri);
    assert!(!json_bool(&json, "is_read_only"), "{json}");
    assert!(s.stop().success());
    let disk = std::fs::read(&img).unwrap();
    let mut want = orig.clone();
    want[2 * M..2 * M + 512].fill(0xb1);
    want[6 * M - 1] = 0xb2;
    // A discard may deallocate or not; only the bytes around it are fixed.
    want[3 * M..3 * M + 64 * K].copy_from_slice(&disk[3 * M..3 * M + 64 * K]);
    assert_same("disk after writes", &disk, &want);

    let e = open_error(&file_args(&["partition"], &img, &["partition=2"]));
    assert!(e.contains("GPT partition 2 not found"), "{e}");
}

#[test]
fn truncate_resizes_and_guards_the_end() {
    let dir = TempDir::new("truncate");
    // An odd size, rounded up to a whole number of 4K blocks.
    let orig = pattern(10_000, 41);
    let img = write_file(&dir, "odd.img", &orig);
    let s = start(&file_args(&["truncate"], &img, &["round-up=4K"]));
    let uri = s.uri();
    assert_eq!(json_num(&nbdinfo_json(&uri), "export-size"), 12288);
    let mut want = orig.clone();
    want.resize(12288, 0);
    assert_same("rounded up", &read_all(&uri, &dir), &want);
    qemu_io(
        &uri,
        &[
            // Across the real end: zeroes past it are accepted.
            "write -P 0 9000 3000",
            "write -P 0xc1 9001 999",
            "read -P 0xc1 9001 999",
            "read -P 0 10000 2288",
            // Zero and trim past the end are ignored.
            "write -z 9990 2298",
            "discard 10000 2288",
            "read -P 0 9990 2298",
        ],
    );
    // Data past the real end cannot be stored.
    let text = qemu_io_fails(&uri, "write -P 0xc2 9900 200");
    assert!(text.contains("No space left on device"), "{text}");
    let m = map(&uri);
    assert_eq!(m.last().unwrap(), &(10000, 2288, 3), "{m:?}");
    assert!(s.stop().success());
    let mut file_want = orig.clone();
    file_want[9000..9001].fill(0);
    file_want[9001..10000].fill(0xc1);
    file_want[9990..10000].fill(0);
    // The refused write changed nothing, and the file kept its size.
    assert_same("file", &std::fs::read(&img).unwrap(), &file_want);

    // Smaller: the tail cannot be reached and is left alone.
    let s = start(&file_args(&["truncate"], &img, &["truncate=5000"]));
    let uri = s.uri();
    assert_eq!(json_num(&nbdinfo_json(&uri), "export-size"), 5000);
    qemu_io(&uri, &["write -P 0xc3 4000 1000"]);
    assert_same("truncated", &read_all(&uri, &dir), &{
        let mut w = file_want[..5000].to_vec();
        w[4000..].fill(0xc3);
        w
    });
    assert!(s.stop().success());
    file_want[4000..5000].fill(0xc3);
    assert_same("file", &std::fs::read(&img).unwrap(), &file_want);

    let s = start(&file_args(&["truncate"], &img, &["round-down=4K"]));
    assert_eq!(json_num(&nbdinfo_json(&s.uri()), "export-size"), 8192);
    assert!(s.stop().success());
}

/// (action, offset, count) of each request the log filter saw start.
fn logged_requests(log: &Path) -> Vec<(String, u64, u64)> {
    let hex = |line: &str, key: &str| {
        let at = line.find(key).unwrap() + key.len();
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        u64::from_str_radix(&digits, 16).unwrap()
    };
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.ends_with("..."))
        .filter_map(|l| {
            let act = ["Read", "Write", "Trim", "Zero", "Extents"]
                .into_iter()
                .find(|a| l.contains(&format!(" {a} id=")))?;
            Some((act.to_string(), hex(l, "offset=0x"), hex(l, "count=0x")))
        })
        .collect()
}

#[test]
fn blocksize_aligns_and_splits_what_reaches_the_plugin() {
    let dir = TempDir::new("blocksize");
    let orig = pattern(4 * M + 700, 51);
    let img = write_file(&dir, "disk.img", &orig);
    let log = dir.path("requests.log");
    let s = start(&file_args(
        &["blocksize", "log"],
        &img,
        &[
            "minblock=512",
            "maxdata=64k",
            "maxlen=256k",
            &format!("logfile={}", log.display()),
        ],
    ));
    let uri = s.uri();
    let json = nbdinfo_json(&uri);
    // Rounded down to whole blocks; clients may send anything.
    let size = 4 * M + 512;
    assert_eq!(json_num(&json, "export-size"), size as u64);
    assert_eq!(json_num(&json, "block_size_minimum"), 1);
    qemu_io(
        &uri,
        &[
            "write -P 0xd1 1 1",
            "write -P 0xd2 1000 300000",
            "write -P 0xd3 700000 511",
            "write -z 1000001 777777",
            "discard 2000001 600000",
            "read -P 0xd2 1000 300000",
            "read -P 0 1000001 777777",
        ],
    );
    let mut want = orig[..size].to_vec();
    want[1] = 0xd1;
    want[1000..301000].fill(0xd2);
    want[700000..700511].fill(0xd3);
    want[1000001..1777778].fill(0);
    let got = read_all(&uri, &dir);
    // A trim leaves unaligned edges alone and the rest undefined: take
    // the file's word for the aligned middle, and check the edges.
    let (t0, t1) = (2000001usize.next_multiple_of(512), (2600001 / 512) * 512);
    want[t0..t1].copy_from_slice(&got[t0..t1]);
    assert_same("through blocksize", &got, &want);

    // Unaligned reads, answered from whole blocks.
    nbdsh(
        &uri,
        r#"
import random
rnd = random.Random(5)
whole = h.pread(h.get_size(), 0)
for _ in range(50):
    off = rnd.randrange(0, len(whole) - 9000)
    n = rnd.randrange(1, 9000)
    assert h.pread(n, off) == whole[off:off+n], (off, n)
"#,
    );
    assert!(s.stop().success());
    want.extend_from_slice(&orig[size..]);
    assert_same("file", &std::fs::read(&img).unwrap(), &want);

    let reqs = logged_requests(&log);
    assert!(reqs.len() > 20, "too few requests logged: {reqs:?}");
    for (act, off, n) in &reqs {
        assert!(off % 512 == 0 && n % 512 == 0, "unaligned {act} {off}+{n}");
        let max = if act == "Read" || act == "Write" {
            64 * K
        } else {
            256 * K
        };
        assert!(*n as usize <= max, "{act} of {n} bytes exceeds {max}");
    }
    // The 300000-byte write was split into several.
    let writes = reqs.iter().filter(|r| r.0 == "Write").count();
    assert!(writes >= 6, "{reqs:?}");
}

#[test]
fn blocksize_serves_unaligned_clients_over_o_direct() {
    // With cache=none the file plugin demands 4K-aligned requests (the
    // kernel refuses others); the filter takes that minimum from it and
    // accepts anything from clients.
    let dir = TempDir::new("bsdirect");
    let orig = pattern(2 * M, 52);
    let img = write_file(&dir, "disk.img", &orig);
    let s = start(&file_args(&["blocksize"], &img, &["cache=none"]));
    let uri = s.uri();
    assert_eq!(json_num(&nbdinfo_json(&uri), "block_size_minimum"), 1);
    // Concurrent one-byte writes, each a read-modify-write of a shared
    // block: none may undo another.
    let out = nbdsh(
        &uri,
        r#"
ref = bytearray(h.pread(h.get_size(), 0))
pending = []
bufs = []
for i in range(200):
    off = 3 + i * 41
    b = nbd.Buffer.from_bytearray(bytearray([i + 1]))
    bufs.append(b)
    pending.append(h.aio_pwrite(b, off))
    ref[off] = i + 1
while pending:
    h.poll(-1)
    pending = [c for c in pending if not h.aio_command_completed(c)]
h.pwrite(b"\xee" * 5000, 4095)
ref[4095:9095] = b"\xee" * 5000
h.zero(7000, 100001)
ref[100001:107001] = bytes(7000)
assert h.pread(len(ref), 0) == ref
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    assert!(s.stop().success());
    // The same changes, made directly.
    let mut want = orig.clone();
    for i in 0..200 {
        want[3 + i * 41] = i as u8 + 1;
    }
    want[4095..9095].fill(0xee);
    want[100001..107001].fill(0);
    assert_same("file", &std::fs::read(&img).unwrap(), &want);
}
