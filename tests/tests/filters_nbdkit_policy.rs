//! The shaping and testing filters nbdkit users stack on a plugin (issue
//! 21): protect, blocksize-policy, extentlist, ddrescue, exitlast and
//! exitwhen, driven by real clients and compared with nbdkit's own
//! filters on the command lines of their man pages.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nbdhost_tests::{
    client, export_size, nbdsh, pattern, run, run_ok, twin::same_as_nbdkit, Server, TempDir,
};

const K: usize = 1024;

fn write_file(dir: &TempDir, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn serve(args: &[&str]) -> Server {
    Server::start(args)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Python for nbdsh: `attempt(what, f, *args)` runs `h.f(*args)` and
/// prints `what: ok` or `what: ERRNO`.
const ATTEMPT: &str = "
def attempt(what, f, *args):
    try:
        f(*args)
        print(what + ': ok')
    except nbd.Error as e:
        print(what + ': ' + (e.errno or 'error'))
";

/// Run `script` after [`ATTEMPT`] against `uri`.
fn attempts(uri: &str, script: &str) -> String {
    nbdsh(uri, &format!("{ATTEMPT}\n{script}"))
}

/// Start nbdhost with `args`, a command line it must refuse, saying
/// `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = run(client(nbdhost_tests::nbdhost_bin().to_str().unwrap())
        .args(args)
        .args(["--run", "true"]));
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(said.contains(needle), "{args:?}: {said}");
}

// ---- protect ----

/// What writes to a disk protected by `protect=0-0x1bd` give: inside,
/// changing and unchanged; the partition table after it; zeroes.
const BOOT_SECTOR_WRITES: &str = "
b = h.pread(1024, 0)
attempt('change boot code', h.pwrite, b'x' * 16, 0)
attempt('rewrite boot code as it is', h.pwrite, b[:0x1be], 0)
attempt('change partition table', h.pwrite, b'y' * 16, 0x1be)
attempt('change across both', h.pwrite, b'z' * 16, 0x1b0)
attempt('zero after them', h.zero, 512, 512)
attempt('zero boot code', h.zero, 512, 0)
attempt('trim boot code', h.trim, 16, 0x100)
print(h.pread(0x1be, 0) == b[:0x1be])
";

#[test]
fn protect_refuses_changes_to_a_range_with_eperm_and_allows_the_rest() {
    let dir = TempDir::new("protect");
    let img = write_file(&dir, "disk.img", &pattern(64 * K, 1));
    for plugin in [&["file", path(&img)][..], &["memory", "64K"]] {
        let mut args = vec!["--filter=protect"];
        args.extend(plugin);
        args.push("protect=0-0x1bd");
        let s = serve(&args);
        let seen = attempts(&s.uri(), BOOT_SECTOR_WRITES);
        if plugin[0] == "memory" {
            // Zeroes in a protected range of zeroes change nothing.
            assert!(seen.contains("zero boot code: ok"), "{seen}");
            continue;
        }
        assert_eq!(
            seen,
            "change boot code: EPERM\n\
             rewrite boot code as it is: ok\n\
             change partition table: ok\n\
             change across both: EPERM\n\
             zero after them: ok\n\
             zero boot code: EPERM\n\
             trim boot code: EPERM\n\
             True\n"
        );
    }
}

#[test]
fn protect_a_refused_write_changes_nothing_even_outside_the_range() {
    let dir = TempDir::new("protect");
    let orig = pattern(64 * K, 2);
    let img = write_file(&dir, "disk.img", &orig);
    let s = serve(&["--filter=protect", "file", path(&img), "protect=4096-8191"]);
    let seen = attempts(&s.uri(), "attempt('w', h.pwrite, b'q' * 8192, 0)");
    assert_eq!(seen, "w: EPERM\n");
    drop(s);
    assert_eq!(std::fs::read(&img).unwrap(), orig);
}

#[test]
fn protect_complement_leaves_only_the_range_writable() {
    let dir = TempDir::new("protect");
    let img = write_file(&dir, "disk.img", &pattern(64 * K, 3));
    let s = serve(&[
        "--filter=protect",
        "file",
        path(&img),
        "protect=~0x1000-0x1fff",
    ]);
    let seen = attempts(
        &s.uri(),
        "attempt('before', h.pwrite, b'a', 0xfff)\n\
         attempt('first', h.pwrite, b'a', 0x1000)\n\
         attempt('last', h.pwrite, b'a' * 4096, 0x1000)\n\
         attempt('after', h.pwrite, b'a', 0x2000)\n",
    );
    assert_eq!(seen, "before: EPERM\nfirst: ok\nlast: ok\nafter: EPERM\n");
}

#[test]
fn protect_several_ranges_and_open_ends() {
    let s = serve(&[
        "--filter=protect",
        "memory",
        "1M",
        "protect=-0x0ff",
        "protect=0x300-0x3ff",
        "protect=0xf0000-",
    ]);
    let seen = attempts(
        &s.uri(),
        "attempt('start', h.pwrite, b'a', 0)\n\
         attempt('between', h.pwrite, b'a' * 0x200, 0x100)\n\
         attempt('second', h.pwrite, b'a', 0x3ff)\n\
         attempt('tail', h.pwrite, b'a', 0xfffff)\n\
         attempt('tail zeroes', h.pwrite, bytes(16), 0xf0000)\n",
    );
    assert_eq!(
        seen,
        "start: EPERM\nbetween: ok\nsecond: EPERM\ntail: EPERM\ntail zeroes: ok\n"
    );
}

#[test]
fn protect_refuses_a_range_it_cannot_parse() {
    for bad in ["protect=100", "protect=20-10", "protect=1K-2K"] {
        refused(&["--filter=protect", "memory", "1M", bad], "protect");
    }
}

#[test]
fn protect_copies_in_and_out_around_the_protected_range() {
    // qemu-img and nbdcopy write whole buffers: a copy of the disk onto
    // itself passes, a copy of other data is refused.
    let dir = TempDir::new("protect");
    let orig = pattern(256 * K, 4);
    let img = write_file(&dir, "disk.img", &orig);
    let same = write_file(&dir, "same.img", &orig);
    let other = write_file(&dir, "other.img", &pattern(256 * K, 5));
    let s = serve(&["--filter=protect", "file", path(&img), "protect=0-511"]);
    run_ok(client("nbdcopy").arg(&same).arg(s.uri()));
    let out = run(client("qemu-img")
        .args(["convert", "-n", "-O", "raw"])
        .arg(&other)
        .arg(s.uri()));
    assert!(
        !out.status.success(),
        "the copy over the boot sector passed"
    );
    assert_eq!(std::fs::read(&img).unwrap()[..512], orig[..512]);
}

#[test]
fn protect_synopsis_and_examples_are_the_same_as_nbdkit() {
    let dir = TempDir::new("protect");
    let orig = pattern(64 * K, 6);
    let lines: [&[&str]; 3] = [
        &[
            "--filter=protect",
            "memory",
            "64K",
            "protect=0x100-0x1ff",
            "protect=0x400-0x7ff",
        ],
        &["--filter=protect", "file", "disk.img", "protect=0-0x1bd"],
        // The partition of the example is 2048-4095 sectors of 512 bytes
        // on a 4 MiB disk.
        &[
            "--filter=protect",
            "file",
            "disk.img",
            "protect=~1048576-2097151",
        ],
    ];
    let script = "
attempt('boot code', h.pwrite, b'x' * 16, 0)
attempt('table', h.pwrite, b'y' * 16, 0x1be)
attempt('window', h.pwrite, b'w' * 16, 0x300)
attempt('partition', h.pwrite, b'p' * 512, 1048576)
attempt('partition end', h.pwrite, b'p' * 512, 2097152 - 512)
attempt('past partition', h.pwrite, b'p' * 512, 2097152)
";
    for args in lines {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("disk.img", path(&dir.path("disk.img"))))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let size = if args[1] == "file" { 4 << 20 } else { 64 * K };
        same_as_nbdkit(&args, |uri| {
            let mut disk = orig.clone();
            disk.resize(size, 0);
            std::fs::write(dir.path("disk.img"), &disk).unwrap();
            let seen = attempts(uri, script.trim_start());
            seen + &format!("{:?}", std::fs::read(dir.path("disk.img")).unwrap() == disk)
        });
    }
}

// ---- blocksize-policy ----

/// An eval plugin (through the nbdkit adapter) advertising `block_size`
/// (`MIN PREF MAX`, or nothing), 64 MiB of zeroes, with
/// `--filter=blocksize-policy` and `params`.
fn policy_args<'a>(block_size: Option<&'a str>, params: &[&'a str]) -> Vec<String> {
    let mut v = vec![
        "--filter=blocksize-policy".to_string(),
        "eval".into(),
        "get_size=echo 64M".into(),
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none".into(),
        "pwrite=cat >/dev/null".into(),
    ];
    if let Some(b) = block_size {
        v.push(format!("block_size=echo {b}"));
    }
    v.extend(params.iter().map(|p| p.to_string()));
    v
}

fn serve_owned(args: &[String]) -> Server {
    serve(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The three block sizes a client is told, as `MIN PREF MAX`.
fn block_sizes(uri: &str) -> String {
    nbdsh(
        uri,
        "print(h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), \
         h.get_block_size(nbd.SIZE_MAXIMUM))",
    )
    .trim()
    .to_owned()
}

/// Reads of these `(count, offset)`, with libnbd's own checks off so
/// that the requests reach the server.
fn reads(uri: &str, which: &[(u64, u64)]) -> String {
    let mut script = String::from(
        "h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN & ~nbd.STRICT_BOUNDS)\n",
    );
    for (count, offset) in which {
        script += &format!("attempt('read {count} at {offset}', h.pread, {count}, {offset})\n");
    }
    attempts(uri, &script)
}

#[test]
fn blocksize_policy_advertises_the_layer_below_when_given_nothing() {
    let s = serve_owned(&policy_args(Some("64K 128K 32M"), &[]));
    assert_eq!(block_sizes(&s.uri()), "65536 131072 33554432");
}

#[test]
fn blocksize_policy_replaces_only_the_sizes_it_is_given() {
    for (param, want) in [
        ("blocksize-minimum=1", "1 131072 33554432"),
        ("blocksize-preferred=64K", "65536 65536 33554432"),
        ("blocksize-maximum=1M", "65536 131072 1048576"),
    ] {
        let s = serve_owned(&policy_args(Some("64K 128K 32M"), &[param]));
        assert_eq!(block_sizes(&s.uri()), want, "{param}");
    }
}

#[test]
fn blocksize_policy_fills_in_defaults_over_a_layer_without_constraints() {
    // nbdkit's maximum is 4294967295 here; nbdhost's server advertises
    // no more than its largest request, 32 MiB.
    let s = serve_owned(&policy_args(None, &["blocksize-preferred=32K"]));
    assert_eq!(block_sizes(&s.uri()), "1 32768 33554432");
    let s = serve_owned(&policy_args(
        None,
        &[
            "blocksize-minimum=1",
            "blocksize-preferred=4K",
            "blocksize-maximum=1M",
        ],
    ));
    assert_eq!(block_sizes(&s.uri()), "1 4096 1048576");
}

#[test]
fn blocksize_policy_error_refuses_requests_that_break_the_constraints() {
    let s = serve_owned(&policy_args(
        Some("512 4096 1M"),
        &["blocksize-error-policy=error"],
    ));
    let seen = reads(
        &s.uri(),
        &[
            (512, 0),
            (512, 4096),
            (1 << 20, 0),
            (768, 0),
            (512, 768),
            (256, 0),
            (2 << 20, 0),
        ],
    );
    assert_eq!(
        seen,
        "read 512 at 0: ok\n\
         read 512 at 4096: ok\n\
         read 1048576 at 0: ok\n\
         read 768 at 0: EINVAL\n\
         read 512 at 768: EINVAL\n\
         read 256 at 0: EINVAL\n\
         read 2097152 at 0: EINVAL\n"
    );
    assert!(
        s.log_text().contains("is larger than maximum size"),
        "{}",
        s.log_text()
    );
}

#[test]
fn blocksize_policy_allow_passes_an_oversize_request_down() {
    let s = serve_owned(&policy_args(Some("512 4096 1M"), &[]));
    assert_eq!(reads(&s.uri(), &[(2 << 20, 0)]), "read 2097152 at 0: ok\n");
}

#[test]
fn blocksize_policy_write_disconnect_drops_a_client_writing_too_much() {
    let s = serve_owned(&policy_args(
        None,
        &["blocksize-minimum=512", "blocksize-write-disconnect=64K"],
    ));
    assert_eq!(block_sizes(&s.uri()), "512 4096 65536");
    let seen = attempts(
        &s.uri(),
        "h.set_strict_mode(0)\n\
         attempt('64K', h.pwrite, bytes(65536), 0)\n\
         attempt('128K', h.pwrite, bytes(131072), 0)\n\
         print(h.aio_is_closed() or h.aio_is_dead())\n",
    );
    // Dropped at once: the write gets no reply.
    assert_eq!(seen, "64K: ok\n128K: ENOTCONN\nTrue\n");
    assert!(s.log_text().contains("oversize write"), "{}", s.log_text());
}

#[test]
fn blocksize_policy_refuses_bad_parameters() {
    for bad in [
        "blocksize-minimum=3",
        "blocksize-minimum=128K",
        "blocksize-preferred=256",
        "blocksize-error-policy=maybe",
        "blocksize-maximum=8G",
    ] {
        refused(
            &["--filter=blocksize-policy", "memory", "1M", bad],
            "blocksize",
        );
    }
}

/// Reads as `(count, offset)`.
type Requests<'a> = &'a [(u64, u64)];

#[test]
fn blocksize_policy_synopsis_and_examples_are_the_same_as_nbdkit() {
    let aligned: Requests = &[(64 << 10, 0), (4 << 20, 0), (64 << 10, 128 << 10)];
    // The unaligned requests only with `error`: nbdhost's server refuses
    // them itself whatever the policy (see the man page).
    let unaligned: Requests = &[(512, 0), (64 << 10, 512), (8 << 20, 0)];
    let lines: [(&[&str], Requests); 4] = [
        (&["memory", "1G", "blocksize-preferred=32K"], aligned),
        (
            &[
                "memory",
                "1G",
                "blocksize-error-policy=error",
                "blocksize-minimum=64K",
                "blocksize-preferred=64K",
                "blocksize-maximum=4M",
            ],
            unaligned,
        ),
        (
            &[
                "memory",
                "1G",
                "blocksize-error-policy=allow",
                "blocksize-maximum=1M",
            ],
            aligned,
        ),
        // Beside the blocksize filter, as the man page combines them.
        (
            &[
                "--filter=blocksize",
                "memory",
                "1G",
                "blocksize-error-policy=allow",
                "blocksize-minimum=64K",
                "minblock=64K",
            ],
            aligned,
        ),
    ];
    for (rest, requests) in lines {
        let mut args = vec!["--filter=blocksize-policy"];
        args.extend(rest);
        same_as_nbdkit(&args, |uri| {
            // nbdkit advertises 4294967295 for "no limit", nbdhost's
            // server its largest request, 32 MiB: the same to a client.
            let sizes = block_sizes(uri).replace(" 4294967295", " 33554432");
            sizes + "\n" + &reads(uri, requests)
        });
    }
}

// ---- extentlist ----

/// `nbdinfo --map` and `qemu-img map` of `uri`, as one text.
fn maps(uri: &str) -> String {
    let nbdinfo = run_ok(client("nbdinfo").arg("--map").arg(uri));
    let qemu = run_ok(
        client("qemu-img")
            .args(["map", "-f", "raw", "--output=json"])
            .arg(uri),
    );
    nbdinfo + &qemu
}

/// The lists nbdkit's own test gives, and some with types and order of
/// their own, each with the disk sizes it is read over.
const EXTENT_LISTS: &[(&str, &[&str])] = &[
    ("", &["0", "1M"]),
    ("0 1M\n", &["0", "1M", "3M"]),
    ("1M 1M\n", &["1M", "3M"]),
    ("1024K 512K\n", &["1M", "2M"]),
    ("0 512K\n1M 512K\n", &["3M"]),
    ("2M 1M hole,zero\n0 1M zero\n1M\t1M 0\n", &["4M"]),
    ("0 64K 3\n64K 64K 1\n128K 64K 2\n", &["256K"]),
];

#[test]
fn extentlist_synopsis_is_the_same_as_nbdkit_for_its_lists() {
    let dir = TempDir::new("extentlist");
    let list = dir.path("extents");
    for (text, sizes) in EXTENT_LISTS {
        std::fs::write(&list, text).unwrap();
        for size in *sizes {
            let size = format!("size={size}");
            let param = format!("extentlist={}", path(&list));
            same_as_nbdkit(&["-r", "--filter=extentlist", "null", &size, &param], maps);
        }
    }
}

#[test]
fn extentlist_replaces_the_extents_of_the_layer_below_and_keeps_its_data() {
    let dir = TempDir::new("extentlist");
    let data = pattern(256 * K, 7);
    let img = write_file(&dir, "disk.img", &data);
    let list = write_file(&dir, "extents", b"64K 64K\n");
    let param = format!("extentlist={}", path(&list));
    let s = serve(&["-r", "--filter=extentlist", "file", path(&img), &param]);
    assert_eq!(
        run_ok(client("nbdinfo").arg("--map").arg(s.uri())),
        "         0       65536    3  hole,zero\n     \
         65536       65536    0  data\n    \
         131072      131072    3  hole,zero\n"
    );
    let out = dir.path("copy.img");
    run_ok(client("nbdcopy").arg(s.uri()).arg(&out));
    let copy = std::fs::read(&out).unwrap();
    // Only block status changes: reads still go down, holes included.
    assert_eq!(copy, data);
}

#[test]
fn extentlist_refuses_a_missing_or_overlapping_list() {
    let dir = TempDir::new("extentlist");
    let overlapping = write_file(&dir, "overlapping", b"0 10\n5 10\n");
    let bad = write_file(&dir, "bad", b"0\n");
    let nowhere = dir.path("nowhere");
    refused(&["--filter=extentlist", "memory", "1M"], "extentlist");
    for list in [&overlapping, &bad, &nowhere] {
        let param = format!("extentlist={}", path(list));
        refused(
            &["--filter=extentlist", "memory", "1M", &param],
            "extentlist",
        );
    }
}

// ---- ddrescue ----

/// A mapfile as GNU ddrescue writes one: comments, its state line, then
/// blocks rescued (`+`), bad (`-`) and not tried (`?`, `/`).
const MAPFILE: &str = "# Mapfile. Created by GNU ddrescue version 1.27
# Command line: ddrescue /dev/sdb disk.img disk.map
# Start time:   2026-12-07 10:00:00
# current_pos  current_status  current_pass
0x00000400     +               1
#      pos        size  status
0x00000000  0x00000200  +
0x00000200  0x00000200  -
0x00000400  0x00000200  +
0x00000600  0x0000FA00  ?
0x00010000  0x00010000  +
";

/// What reading each 512-byte sector of the first 64K, then a read
/// across two areas, and a large read give; and what a client is told
/// about writing and caching.
const DDRESCUE_READS: &str = "
for s in [0, 1, 2, 3, 127, 128, 129, 255]:
    attempt('sector %d' % s, h.pread, 512, s * 512)
attempt('across', h.pread, 1024, 0)
attempt('rescued 64K', h.pread, 65536, 65536)
print('read-only', h.is_read_only(), 'cache', h.can_cache())
";

#[test]
fn ddrescue_fails_reads_outside_the_rescued_areas_with_eio() {
    let dir = TempDir::new("ddrescue");
    let img = write_file(&dir, "disk.img", &pattern(128 * K, 8));
    let map = write_file(&dir, "disk.map", MAPFILE.as_bytes());
    let param = format!("ddrescue-mapfile={}", path(&map));
    let s = serve(&["--filter=ddrescue", "file", path(&img), &param]);
    assert_eq!(
        attempts(&s.uri(), DDRESCUE_READS),
        "sector 0: ok\nsector 1: EIO\nsector 2: ok\nsector 3: EIO\n\
         sector 127: EIO\nsector 128: ok\nsector 129: ok\nsector 255: ok\n\
         across: EIO\nrescued 64K: ok\nread-only True cache False\n"
    );
}

#[test]
fn ddrescue_reads_the_rescued_data_unchanged() {
    let dir = TempDir::new("ddrescue");
    let data = pattern(128 * K, 9);
    let img = write_file(&dir, "disk.img", &data);
    let map = write_file(&dir, "disk.map", MAPFILE.as_bytes());
    let param = format!("ddrescue-mapfile={}", path(&map));
    let s = serve(&["--filter=ddrescue", "file", path(&img), &param]);
    let out = dir.path("tail.img");
    nbdsh(
        &s.uri(),
        &format!("open({:?}, 'wb').write(h.pread(65536, 65536))", path(&out)),
    );
    assert!(
        std::fs::read(&out).unwrap() == data[64 * K..],
        "the rescued data differs"
    );
}

#[test]
fn ddrescue_refuses_a_missing_mapfile() {
    let param = "ddrescue-mapfile=/nonexistent/disk.map";
    refused(&["--filter=ddrescue", "memory", "1M", param], "disk.map");
}

#[test]
fn ddrescue_synopsis_and_example_are_the_same_as_nbdkit() {
    let dir = TempDir::new("ddrescue");
    let img = write_file(&dir, "disk.img", &pattern(128 * K, 10));
    let map = write_file(&dir, "disk.map", MAPFILE.as_bytes());
    let param = format!("ddrescue-mapfile={}", path(&map));
    let file = format!("file={}", path(&img));
    let lines: [&[&str]; 3] = [
        // nbdkit's own test: a data plugin over the first area.
        &[
            "--filter=ddrescue",
            "data",
            "size=128K",
            "@0 \"ddrescue\"*64",
            &param,
        ],
        &["--filter=ddrescue", "file", &file, &param],
        &["--filter=ddrescue", "file", path(&img), &param],
    ];
    for args in lines {
        same_as_nbdkit(args, |uri| attempts(uri, DDRESCUE_READS));
    }
}

// ---- exitlast ----

/// Wait up to `timeout` for the server to exit; its status if it did.
fn exited(s: &mut Server, timeout: Duration) -> Option<ExitStatus> {
    child_exited(s.child.as_mut().unwrap(), timeout)
}

/// Wait up to `timeout` for `child` to exit; its status if it did.
fn child_exited(child: &mut std::process::Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a client can connect to `uri` now.
fn connects(uri: &str) -> bool {
    run(client("nbdinfo").arg("--size").arg(uri))
        .status
        .success()
}

/// An nbdsh that stays connected to `uri` until its stdin is closed.
fn hold(uri: &str) -> std::process::Child {
    let mut c = client("nbdsh")
        .arg("-u")
        .arg(uri)
        .arg("-c")
        .arg("import sys; print(h.get_size(), flush=True); sys.stdin.read()")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(!line.is_empty(), "nbdsh did not connect");
    c
}

fn release(mut c: std::process::Child) {
    drop(c.stdin.take());
    c.wait().unwrap();
}

#[test]
fn exitlast_does_not_exit_before_the_first_client() {
    let mut s = serve(&["--filter=exitlast", "memory", "1M"]);
    assert_eq!(exited(&mut s, Duration::from_millis(500)), None);
    assert!(connects(&s.uri()));
}

#[test]
fn exitlast_exits_cleanly_once_the_last_client_has_gone() {
    let mut s = serve(&["--filter=exitlast", "memory", "1M"]);
    let first = hold(&s.uri());
    // A second client comes and goes: the first is still there.
    assert!(connects(&s.uri()));
    assert_eq!(exited(&mut s, Duration::from_millis(500)), None);
    release(first);
    let st = exited(&mut s, Duration::from_secs(10)).expect("the server did not exit");
    assert!(st.success(), "{st}: {}", s.log_text());
}

/// A qcow2 image for a filter that opens the layer below at start-up.
fn qcow2_image(dir: &TempDir) -> PathBuf {
    let img = dir.path("disk.qcow2");
    run_ok(
        client("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("1M"),
    );
    img
}

#[test]
fn exitlast_under_a_filter_that_looks_at_start_up_waits_for_a_real_client() {
    // qcow2 opens the layers below once at start-up, for no client.
    let dir = TempDir::new("exitlast");
    let img = qcow2_image(&dir);
    let mut s = serve(&["--filter=qcow2", "--filter=exitlast", "file", path(&img)]);
    assert_eq!(exited(&mut s, Duration::from_millis(500)), None);
    assert_eq!(export_size(&s.uri()), "1048576");
    let st = exited(&mut s, Duration::from_secs(10)).expect("the server did not exit");
    assert!(st.success(), "{st}");
}

#[test]
fn exitlast_synopsis_is_the_same_as_nbdkit() {
    same_as_nbdkit(&["--filter=exitlast", "memory", "1M"], |uri| {
        let size = export_size(uri);
        // Give the server time to go.
        let deadline = Instant::now() + Duration::from_secs(10);
        while connects(uri) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        format!("{size}, then {}", connects(uri))
    });
}

// ---- exitwhen ----

/// Serve a memory disk with the exitwhen filter and `params`, polling
/// every second when idle.
fn exitwhen(params: &[&str]) -> Server {
    let mut args = vec!["--filter=exitwhen", "memory", "1M", "exit-when-poll=1"];
    args.extend(params);
    serve(&args)
}

/// Once the event has happened while a client is connected: new clients
/// are refused, the server waits for the one connected, then exits
/// cleanly.
fn refuses_then_exits_after_the_last_client(s: &mut Server, held: std::process::Child) {
    assert!(
        !connects(&s.uri()),
        "a new client was served after the event"
    );
    assert_eq!(
        exited(s, Duration::from_millis(1500)),
        None,
        "exited with a client"
    );
    release(held);
    let st = exited(s, Duration::from_secs(10)).expect("the server did not exit");
    assert!(st.success(), "{st}: {}", s.log_text());
}

#[test]
fn exitwhen_file_created_while_idle_exits_at_the_next_poll() {
    let dir = TempDir::new("exitwhen");
    let stop = dir.path("stop");
    let mut s = exitwhen(&[&format!("exit-when-file-created={}", path(&stop))]);
    assert!(connects(&s.uri()));
    assert_eq!(exited(&mut s, Duration::from_millis(1500)), None);
    std::fs::write(&stop, "").unwrap();
    let st = exited(&mut s, Duration::from_secs(10)).expect("the server did not exit");
    assert!(st.success(), "{st}");
}

#[test]
fn exitwhen_file_created_with_a_client_waits_for_it_and_refuses_others() {
    let dir = TempDir::new("exitwhen");
    let stop = dir.path("stop");
    let mut s = exitwhen(&[&format!("exit-when-file-created={}", path(&stop))]);
    let held = hold(&s.uri());
    std::fs::write(&stop, "").unwrap();
    refuses_then_exits_after_the_last_client(&mut s, held);
}

#[test]
fn exitwhen_file_already_created_exits_before_serving() {
    let dir = TempDir::new("exitwhen");
    let stop = write_file(&dir, "stop", b"");
    let t = Instant::now();
    let out = run(
        client(nbdhost_tests::nbdhost_bin().to_str().unwrap()).args([
            "-f",
            "-U",
            path(&dir.path("sock")),
            "--filter=exitwhen",
            "memory",
            "1M",
            &format!("exit-when-file-created={}", path(&stop)),
        ]),
    );
    assert!(out.status.success(), "{:?}", out);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!dir.path("sock").exists());
}

#[test]
fn exitwhen_file_deleted_exits() {
    let dir = TempDir::new("exitwhen");
    let keep = write_file(&dir, "keep", b"");
    let mut s = exitwhen(&[&format!("exit-when-file-deleted={}", path(&keep))]);
    let held = hold(&s.uri());
    std::fs::remove_file(&keep).unwrap();
    refuses_then_exits_after_the_last_client(&mut s, held);
}

#[test]
fn exitwhen_process_exits_exits_once_the_process_has_gone() {
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let mut s = exitwhen(&[&format!("exit-when-process-exits={}", sleeper.id())]);
    assert!(connects(&s.uri()));
    assert_eq!(exited(&mut s, Duration::from_millis(1500)), None);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let st = exited(&mut s, Duration::from_secs(10)).expect("the server did not exit");
    assert!(st.success(), "{st}");
}

#[test]
fn exitwhen_script_exits_when_it_says_88_and_only_then() {
    let dir = TempDir::new("exitwhen");
    let flag = dir.path("flag");
    let script = format!(
        "exit-when-script=if test -f {0}; then exit $(cat {0}); else exit 0; fi",
        path(&flag)
    );
    let mut s = exitwhen(&[&script]);
    assert!(connects(&s.uri()));
    // Another failing status is logged and changes nothing.
    std::fs::write(&flag, "3").unwrap();
    assert!(connects(&s.uri()));
    assert_eq!(exited(&mut s, Duration::from_millis(1500)), None);
    let held = hold(&s.uri());
    std::fs::write(&flag, "88").unwrap();
    refuses_then_exits_after_the_last_client(&mut s, held);
}

#[test]
fn exitwhen_pipe_closed_exits_when_the_writer_closes_it() {
    let dir = TempDir::new("exitwhen");
    let sock = dir.path("sock");
    let (reader, writer) = std::io::pipe().unwrap();
    // The read end is the server's standard input, descriptor 0.
    let mut server = client(nbdhost_tests::nbdhost_bin().to_str().unwrap())
        .args(["-f", "-U", path(&sock), "--filter=exitwhen", "memory", "1M"])
        .args(["exit-when-pipe-closed=0", "exit-when-poll=1"])
        .stdin(reader)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", path(&sock));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !connects(&uri) {
        assert!(Instant::now() < deadline, "the server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let early = child_exited(&mut server, Duration::from_millis(1500));
    assert_eq!(early, None, "exited with the pipe open");
    drop(writer);
    let st = child_exited(&mut server, Duration::from_secs(10));
    let _ = server.kill();
    let st = st.expect("the server did not exit");
    assert!(st.success(), "{st}");
}

#[test]
fn exitwhen_refuses_a_process_that_does_not_exist() {
    let param = "exit-when-process-exits=999999999";
    refused(
        &["--filter=exitwhen", "memory", "1M", param],
        "exit-when-process-exits",
    );
}

#[test]
fn exitwhen_under_a_filter_that_looks_at_start_up_counts_only_clients() {
    let dir = TempDir::new("exitwhen");
    let img = qcow2_image(&dir);
    let stop = dir.path("stop");
    let created = format!("exit-when-file-created={}", path(&stop));
    let args = [
        "--filter=qcow2",
        "--filter=exitwhen",
        "file",
        path(&img),
        &created,
    ];
    let mut s = serve(&args);
    let held = hold(&s.uri());
    std::fs::write(&stop, "").unwrap();
    refuses_then_exits_after_the_last_client(&mut s, held);
}

#[test]
fn exitwhen_synopsis_and_examples_are_the_same_as_nbdkit() {
    let dir = TempDir::new("exitwhen");
    let stop = dir.path("stop");
    let created = format!("exit-when-file-created={}", path(&stop));
    // The first example: serve until the file is created, then refuse new
    // clients and exit once the connected one has gone.
    same_as_nbdkit(&["--filter=exitwhen", "memory", "1G", &created], |uri| {
        let size = export_size(uri);
        let held = hold(uri);
        std::fs::write(&stop, "").unwrap();
        let refused = !connects(uri);
        release(held);
        // Ready for the other server's run (that it exits is
        // exitwhen_file_created_with_a_client_waits_for_it_and_refuses_others).
        std::fs::remove_file(&stop).unwrap();
        format!("{size}, refused after the event: {refused}")
    });
    // The second: serve while the process lives (that it exits after is
    // exitwhen_process_exits_exits_once_the_process_has_gone).
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = format!("exit-when-process-exits={}", sleeper.id());
    same_as_nbdkit(&["--filter=exitwhen", "memory", "1G", &pid], |uri| {
        format!("{}, {}", export_size(uri), connects(uri))
    });
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn exitwhen_polling_thread_does_not_hold_up_a_signalled_shutdown() {
    let dir = TempDir::new("exitwhen");
    let never = format!("exit-when-file-created={}", path(&dir.path("never")));
    // The default poll: a minute between checks.
    let s = serve(&["--filter=exitwhen", "memory", "1M", &never]);
    assert!(connects(&s.uri()));
    let t = Instant::now();
    let st = s.stop();
    assert!(st.success(), "{st}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
