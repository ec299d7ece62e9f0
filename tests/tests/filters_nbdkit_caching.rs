//! The caching filters nbdkit users stack on slow sources: `cache`, and
//! (with the filter ABI's background service) `readahead` and `scan`.
//! What reaches the plugin is seen through an nbdkit `eval` plugin (run by
//! nbdhost's adapter) over a file, which logs every request it gets.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbdhost_tests::{
    client, nbdhost_bin, nbdsh, pattern, qemu_io, run_ok, twin::same_as_nbdkit, Server, TempDir,
};

const K: usize = 1024;
const M: usize = 1024 * K;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A disk file behind an nbdkit `eval` plugin that appends each request
/// it gets to a log: `pread COUNT OFFSET`, `pwrite COUNT OFFSET FLAGS`,
/// `flush`, `cache COUNT OFFSET` (if asked for).
struct Logged {
    img: PathBuf,
    log: PathBuf,
    args: Vec<String>,
}

impl Logged {
    fn new(dir: &TempDir, contents: &[u8]) -> Logged {
        let img = dir.path("disk.img");
        let log = dir.path("requests.log");
        std::fs::write(&img, contents).unwrap();
        std::fs::write(&log, b"").unwrap();
        let (i, l) = (path(&img), path(&log));
        let args = vec![
            "eval".to_string(),
            format!("get_size=stat -L -c %s {i}"),
            format!(
                "pread=echo \"pread $3 $4\" >> {l}; \
                 dd if={i} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"
            ),
            format!(
                "pwrite=echo \"pwrite $3 $4 $5\" >> {l}; \
                 dd of={i} seek=$4 oflag=seek_bytes conv=notrunc status=none"
            ),
            format!("flush=echo flush >> {l}"),
            "can_write=exit 0".to_string(),
            "can_flush=exit 0".to_string(),
            "can_fua=echo native".to_string(),
            "thread_model=echo parallel".to_string(),
        ];
        Logged { img, log, args }
    }

    /// `nbdhost --filter=F… eval … EXTRA…`.
    fn start(&self, filters: &[&str], extra: &[&str]) -> Server {
        let mut args: Vec<String> = filters.iter().map(|f| format!("--filter={f}")).collect();
        args.extend(self.args.iter().cloned());
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&args)
    }

    /// Plugin parameters that make it cache natively (`native`) or not,
    /// logging each cache request after sleeping `delay` seconds.
    fn cache(&self, native: bool, delay: &str) -> [String; 2] {
        let answer = if native { "native" } else { "none" };
        [
            format!("can_cache=echo {answer}"),
            format!(
                "cache=sleep {delay}; echo \"cache $3 $4\" >> {}",
                path(&self.log)
            ),
        ]
    }

    /// The reads logged since the last call (and the rest forgotten).
    fn take_reads(&self) -> Vec<String> {
        self.take()
            .into_iter()
            .filter(|r| r.starts_with("pread"))
            .collect()
    }

    /// The requests logged since the last call.
    fn take(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap();
        std::fs::write(&self.log, b"").unwrap();
        text.lines().map(|l| l.trim().to_string()).collect()
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.img).unwrap()
    }
}

fn cache_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["cache-min-block-size=4K"];
    v.extend_from_slice(extra);
    v
}

#[test]
fn cache_writeback_keeps_writes_until_a_flush() {
    let dir = TempDir::new("cache-wb");
    let disk = Logged::new(&dir, &[1u8; 64 * K]);
    let s = disk.start(&["cache"], &cache_args(&[]));
    let got = nbdsh(
        &s.uri(),
        "h.pwrite(b'w' * 8192, 4096)
print(h.pread(8192, 4096) == b'w' * 8192)",
    );
    assert_eq!(got.trim(), "True");
    // Nothing written below yet: the data is in the cache only.
    assert!(disk.take().iter().all(|r| !r.starts_with("pwrite")));
    assert_eq!(disk.contents(), vec![1u8; 64 * K]);
    nbdsh(&s.uri(), "h.flush()");
    let log = disk.take();
    assert_eq!(log, ["pwrite 4096 4096", "pwrite 4096 8192", "flush"]);
    assert_eq!(disk.contents()[4096..12288], vec![b'w'; 8192][..]);
}

#[test]
fn cache_writeback_sends_a_fua_write_through_at_once() {
    let dir = TempDir::new("cache-fua");
    let disk = Logged::new(&dir, &[1u8; 16 * K]);
    let s = disk.start(&["cache"], &cache_args(&[]));
    nbdsh(&s.uri(), "h.pwrite(b'f' * 4096, 0, nbd.CMD_FLAG_FUA)");
    assert_eq!(disk.take(), ["pwrite 4096 0 fua"]);
    assert_eq!(disk.contents()[..4096], vec![b'f'; 4096][..]);
}

#[test]
fn cache_writethrough_writes_below_at_once() {
    let dir = TempDir::new("cache-wt");
    let disk = Logged::new(&dir, &[1u8; 16 * K]);
    let s = disk.start(&["cache"], &cache_args(&["cache=writethrough"]));
    // One byte: the block is read, changed and written whole.
    nbdsh(&s.uri(), "h.pwrite(b'x', 5000)");
    assert_eq!(disk.take(), ["pread 4096 4096", "pwrite 4096 4096"]);
    assert_eq!(disk.contents()[5000], b'x');
}

#[test]
fn cache_unsafe_ignores_flushes() {
    let dir = TempDir::new("cache-unsafe");
    let disk = Logged::new(&dir, &[1u8; 16 * K]);
    let s = disk.start(&["cache"], &cache_args(&["cache=unsafe"]));
    let got = nbdsh(
        &s.uri(),
        "h.pwrite(b'u' * 4096, 0, nbd.CMD_FLAG_FUA)
h.flush()
print(h.can_flush(), h.can_fua(), h.pread(4096, 0) == b'u' * 4096)",
    );
    assert_eq!(got.trim(), "True True True");
    assert!(disk.take().iter().all(|r| r.starts_with("pread")));
    assert_eq!(disk.contents(), vec![1u8; 16 * K]);
}

#[test]
fn cache_reads_go_below_each_time_unless_cache_on_read() {
    let dir = TempDir::new("cache-read");
    let disk = Logged::new(&dir, &pattern(64 * K, 3));
    let read_twice = "h.pread(4096, 8192)\nh.pread(4096, 8192)";
    let s = disk.start(&["cache"], &cache_args(&[]));
    nbdsh(&s.uri(), read_twice);
    assert_eq!(disk.take(), ["pread 4096 8192", "pread 4096 8192"]);
    drop(s);
    let s = disk.start(&["cache"], &cache_args(&["cache-on-read=true"]));
    nbdsh(&s.uri(), read_twice);
    assert_eq!(disk.take(), ["pread 4096 8192"]);
    // Served from the cache from now on, even if the file changes.
    std::fs::write(&disk.img, vec![0u8; 64 * K]).unwrap();
    let got = nbdsh(&s.uri(), "print(h.pread(4096, 8192) != bytearray(4096))");
    assert_eq!(got.trim(), "True");
    assert!(disk.take().is_empty());
}

#[test]
fn cache_on_read_follows_its_switch_file() {
    let dir = TempDir::new("cache-switch");
    let disk = Logged::new(&dir, &[5u8; 64 * K]);
    let switch = dir.path("switch");
    let on_read = format!("cache-on-read={}", path(&switch));
    let s = disk.start(&["cache"], &cache_args(&[&on_read]));
    let uri = s.uri();
    qemu_io(&uri, &["read -P 5 0 4k", "read -P 5 0 4k"]);
    assert_eq!(disk.take_reads(), ["pread 4096 0", "pread 4096 0"]);
    std::fs::write(&switch, b"").unwrap();
    qemu_io(&uri, &["read -P 5 0 4k", "read -P 5 0 4k"]);
    assert_eq!(disk.take_reads(), ["pread 4096 0"]);
}

#[test]
fn cache_requests_fetch_each_block_below_once() {
    let dir = TempDir::new("cache-cmd");
    let disk = Logged::new(&dir, &pattern(64 * K, 4));
    let s = disk.start(&["cache"], &cache_args(&[]));
    // An unaligned range is rounded out to whole blocks; cached blocks
    // are not fetched again, and reads of them stay in the cache.
    let got = nbdsh(
        &s.uri(),
        "print(h.can_cache())
h.cache(5000, 1000)
h.cache(16384, 0)
print(len(h.pread(16384, 0)))",
    );
    assert_eq!(
        got.split_whitespace().collect::<Vec<_>>(),
        ["True", "16384"]
    );
    assert_eq!(disk.take(), ["pread 8192 0", "pread 8192 8192"]);
}

#[test]
fn cache_refuses_fast_zeroes_and_writes_slow_ones_as_data() {
    let dir = TempDir::new("cache-zero");
    let disk = Logged::new(&dir, &[7u8; 16 * K]);
    let s = disk.start(&["cache"], &cache_args(&["cache=writethrough"]));
    let got = nbdsh(
        &s.uri(),
        "print(h.can_fast_zero())
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    print('fast zero accepted')
except nbd.Error as e:
    print(e.errno)
h.zero(4096, 0)",
    );
    assert_eq!(
        got.split_whitespace().collect::<Vec<_>>(),
        ["True", "ENOTSUP"]
    );
    assert_eq!(disk.take(), ["pwrite 4096 0"]);
    assert_eq!(disk.contents()[..4096], [0u8; 4096]);
}

#[test]
fn cache_serves_a_disk_of_unaligned_size() {
    // As nbdkit's test-cache-unaligned.sh, with its 130000-byte file.
    let dir = TempDir::new("cache-unaligned");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 130000]).unwrap();
    let s = Server::start(&["--filter=cache", "file", path(&img)]);
    let got = nbdsh(
        &s.uri(),
        "buf = b'abcdefghijklm' * 10000
h.pwrite(buf, 0)
print(h.pread(130000, 0) == buf)
h.flush()",
    );
    assert_eq!(got.trim(), "True");
    let want: Vec<u8> = b"abcdefghijklm".repeat(10000);
    assert!(std::fs::read(&img).unwrap() == want);
}

#[test]
fn cache_block_size_is_the_preferred_size_and_the_unit_read_below() {
    // As nbdkit's test-cache-block-size.sh: 128K blocks, so a 64K read
    // brings in (and caches) the next 64K too.
    let dir = TempDir::new("cache-bs");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 256 * K]).unwrap();
    let s = Server::start(&[
        "--filter=cache",
        "file",
        path(&img),
        "cache-min-block-size=128K",
        "cache-on-read=true",
    ]);
    let got = nbdsh(
        &s.uri(),
        "print(h.get_block_size(nbd.SIZE_PREFERRED))
print(h.pread(65536, 0) == bytearray(65536))",
    );
    assert_eq!(
        got.split_whitespace().collect::<Vec<_>>(),
        ["131072", "True"]
    );
    let mut changed = vec![0u8; 256 * K];
    changed[64 * K..192 * K].copy_from_slice(&b"abcd".repeat(32 * K));
    std::fs::write(&img, &changed).unwrap();
    let got = nbdsh(
        &s.uri(),
        "print(h.pread(65536, 65536) == bytearray(65536))
print(h.pread(65536, 131072) == b'abcd' * 16384)",
    );
    assert_eq!(got.split_whitespace().collect::<Vec<_>>(), ["True", "True"]);
}

#[test]
fn cache_reports_dirty_blocks_as_data_in_block_status() {
    let dir = TempDir::new("cache-map");
    let img = dir.path("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(M as u64).unwrap();
    let s = Server::start(&["--filter=cache", "file", path(&img)]);
    let uri = s.uri();
    // Written to the cache only: the file below still has a hole there.
    nbdsh(&uri, "h.pwrite(b'd' * 65536, 512 * 1024)");
    let copy = dir.path("copy.img");
    run_ok(client("nbdcopy").arg(&uri).arg(path(&copy)));
    let got = std::fs::read(&copy).unwrap();
    assert_eq!(got[512 * K..576 * K], vec![b'd'; 64 * K][..]);
}

/// Start nbdhost with `TMPDIR` set to `tmp`.
fn start_with_tmpdir(dir: &TempDir, tmp: &Path, args: &[&str]) -> Server {
    let wrapper = dir.path("nbdhost-with-tmpdir");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nTMPDIR='{}' exec '{}' \"$@\"\n",
            path(tmp),
            path(&nbdhost_bin())
        ),
    )
    .unwrap();
    run_ok(std::process::Command::new("chmod").arg("755").arg(&wrapper));
    Server::start_program(&wrapper, args)
}

/// The bytes allocated to the files under `tmp` that process `pid` holds
/// open (the cache file is unlinked, so only /proc/PID/fd reaches it).
fn allocated_under(pid: u32, tmp: &Path) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(tmp)))
        .map(|e| std::fs::metadata(e.path()).unwrap().blocks() * 512)
        .collect()
}

#[test]
fn cache_file_is_unlinked_in_tmpdir_and_bounded_by_cache_max_size() {
    // As nbdkit's test-cache-max-size.sh, made small: 4M written and 6M read
    // through a cache of at most 1M, in writeback, so evicted blocks are
    // dirty and must reach the file before they go.
    let dir = TempDir::new("cache-max");
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let img = dir.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 * M as u64)
        .unwrap();
    let s = start_with_tmpdir(
        &dir,
        &tmp,
        &[
            "--filter=cache",
            "file",
            path(&img),
            "cache-max-size=1M",
            "cache-on-read=true",
        ],
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "cache file has a name"
    );
    let pid = s.child.as_ref().unwrap().id();
    let uri = s.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x55 0 2M",
            "write -P 0x66 3M 2M",
            "read -P 0x66 3M 2M",
            "read -P 0 6M 2M",
            "read -P 0x55 0 2M",
        ],
    );
    let sizes = allocated_under(pid, &tmp);
    assert_eq!(sizes.len(), 1, "{sizes:?}");
    assert!(
        sizes[0] <= M as u64 + 64 * K as u64,
        "cache holds {} bytes",
        sizes[0]
    );
    let file = std::fs::read(&img).unwrap();
    assert!(file[..2 * M].iter().all(|&b| b == 0x55));
    assert!(file[3 * M..5 * M].iter().all(|&b| b == 0x66));
}

#[test]
fn cache_refuses_thresholds_out_of_order() {
    let out = nbdhost_tests::run(
        std::process::Command::new(nbdhost_bin())
            .args(["--filter=cache", "memory", "1M"])
            .args(["cache-max-size=1M", "cache-low-threshold=90"])
            .args(["cache-high-threshold=80", "--run", "true"]),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache-low-threshold"), "{err}");
}

/// What a client sees of a cache export: its flags and preferred block
/// size, and that data written reads back (and survives a flush).
fn cache_view(uri: &str) -> String {
    nbdsh(
        uri,
        "print(h.get_size(), h.can_cache(), h.can_flush(), h.can_fua(),
      h.can_multi_conn(), h.can_fast_zero(), h.can_zero(),
      h.get_block_size(nbd.SIZE_PREFERRED))
h.pwrite(b'synopsis' * 1000, 12345)
h.flush()
h.cache(65536, 0)
print(h.pread(8000, 12345) == b'synopsis' * 1000, h.pread(100, 0) == bytearray(100))",
    )
}

#[test]
fn cache_synopsis_and_examples_are_the_same_as_nbdkit() {
    let dir = TempDir::new("cache-twin");
    let switch = dir.path("switch");
    std::fs::write(&switch, b"").unwrap();
    let on_path = format!("cache-on-read={}", path(&switch));
    // The SYNOPSIS's plugin is the memory plugin here.
    let lines: [&[&str]; 6] = [
        &["--filter=cache", "memory", "1M"],
        &[
            "--filter=cache",
            "memory",
            "1M",
            "cache=writethrough",
            "cache-min-block-size=128K",
        ],
        &[
            "--filter=cache",
            "memory",
            "1M",
            "cache=unsafe",
            "cache-on-read=true",
        ],
        &[
            "--filter=cache",
            "memory",
            "1M",
            "cache=writeback",
            &on_path,
        ],
        // CACHE MAXIMUM SIZE's examples.
        &["--filter=cache", "memory", "1M", "cache-max-size=1G"],
        &[
            "--filter=cache",
            "memory",
            "1M",
            "cache-max-size=1G",
            "cache-high-threshold=95",
            "cache-low-threshold=80",
        ],
    ];
    for args in lines {
        same_as_nbdkit(args, cache_view);
    }
}

// ---------------------------------------------------------------------------
// readahead

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn of_kind<'a>(log: &'a [String], kind: &str) -> Vec<&'a str> {
    log.iter()
        .filter(|l| l.starts_with(kind))
        .map(String::as_str)
        .collect()
}

#[test]
fn readahead_prefetches_the_window_after_each_read() {
    // As nbdkit's test-readahead.sh: ten 512-byte reads in a row, each
    // followed by a 32K prefetch of what comes after it.
    let dir = TempDir::new("ra");
    let disk = Logged::new(&dir, &[0u8; M]);
    let cache = disk.cache(true, "0");
    let s = disk.start(&["readahead"], &strs(&cache));
    let reads = "for i in range(0, 512 * 10, 512):\n    h.pread(512, i)\n";
    nbdsh(
        &s.uri(),
        &(reads.to_owned() + &hold_until(&disk.log, "cache", 10)),
    );
    let log = disk.take();
    let mut offsets = cache_offsets(&log);
    offsets.sort();
    assert_eq!(offsets, (1..=10).map(|i| i * 512).collect::<Vec<u64>>());
    assert!(of_kind(&log, "cache")
        .iter()
        .all(|l| l.starts_with("cache 32768 ")));
    assert_eq!(of_kind(&log, "pread").len(), 10);
}

#[test]
fn readahead_warns_and_does_nothing_over_a_layer_that_does_not_cache() {
    let dir = TempDir::new("ra-none");
    let disk = Logged::new(&dir, &pattern(256 * K, 8));
    let cache = disk.cache(false, "0");
    let s = disk.start(&["readahead"], &strs(&cache));
    let got = nbdsh(
        &s.uri(),
        "print(h.pread(4096, 0) == h.pread(8192, 0)[:4096])",
    );
    assert_eq!(got.trim(), "True");
    std::thread::sleep(Duration::from_millis(300));
    assert!(of_kind(&disk.take(), "cache").is_empty());
    let (_, log) = s.stop_with_log();
    assert!(log.contains("try adding --filter=cache"), "{log}");
}

#[test]
fn readahead_warns_and_does_nothing_over_a_plugin_that_serializes_requests() {
    let dir = TempDir::new("ra-serial");
    let disk = Logged::new(&dir, &[0u8; 256 * K]);
    let mut args = vec!["--filter=readahead".to_string()];
    args.extend(
        disk.args
            .iter()
            .filter(|a| !a.starts_with("thread_model="))
            .cloned(),
    );
    args.extend(disk.cache(true, "0"));
    args.push("thread_model=echo serialize_requests".to_string());
    let s = Server::start(&strs(&args));
    nbdsh(&s.uri(), "h.pread(4096, 0)\nh.pread(4096, 4096)");
    std::thread::sleep(Duration::from_millis(300));
    assert!(of_kind(&disk.take(), "cache").is_empty());
    let (_, log) = s.stop_with_log();
    assert!(
        log.contains("readahead: no background prefetching"),
        "{log}"
    );
}

#[test]
fn readahead_over_the_cache_filter_serves_sequential_reads_from_prefetched_blocks() {
    let dir = TempDir::new("ra-cache");
    let disk = Logged::new(&dir, &pattern(M, 9));
    let want = run_ok(std::process::Command::new("sha256sum").arg(path(&disk.img)));
    let script = "import hashlib, time
d = hashlib.sha256()
for i in range(0, 1024 * 1024, 4096):
    d.update(h.pread(4096, i))
    time.sleep(0.002)
print(d.hexdigest())";
    let mut reads = Vec::new();
    for filters in [&["cache"][..], &["readahead", "cache"][..]] {
        let s = disk.start(filters, &[]);
        let got = nbdsh(&s.uri(), script);
        assert_eq!(got.trim(), want.split_whitespace().next().unwrap());
        drop(s);
        reads.push(of_kind(&disk.take(), "pread").len());
    }
    // 256 client reads of 4K: without readahead each reaches the plugin;
    // with it, the prefetches fetch each 64K block once, ahead of them.
    assert_eq!(reads[0], 256);
    assert!(reads[1] < 64, "{} reads reached the plugin", reads[1]);
}

#[test]
fn readahead_copies_the_same_disk_as_without_it() {
    // As nbdkit's test-readahead-copy.sh, with the data plugin's sparse
    // layout made small.
    let dir = TempDir::new("ra-copy");
    let data = "1 @0x10001 2 @0x100020 3 @0x1000301 4 @0x1800000 5";
    let mut copies = Vec::new();
    for filters in [&["--filter=readahead"][..], &[][..]] {
        let mut args = filters.to_vec();
        args.extend(["data", data]);
        let s = Server::start(&args);
        let out = dir.path(&format!("copy{}.img", copies.len()));
        run_ok(client("nbdcopy").arg(s.uri()).arg(path(&out)));
        copies.push(std::fs::read(&out).unwrap());
    }
    assert!(copies[0] == copies[1]);
}

/// An nbdsh script that holds its connection until `log` holds `n`
/// requests of `kind` (or 10 s pass), so a background job can finish.
fn hold_until(log: &Path, kind: &str, n: usize) -> String {
    format!(
        "import time
t = time.time()
while open('{}').read().count('{kind}') < {n} and time.time() - t < 10:
    time.sleep(0.05)",
        path(log)
    )
}

/// Sequential reads over the whole disk, and the flags a client sees.
fn sequential_view(uri: &str) -> String {
    nbdsh(
        uri,
        "import hashlib
d = hashlib.sha256()
size = h.get_size()
for i in range(0, size, 65536):
    d.update(h.pread(min(65536, size - i), i))
print(size, h.can_cache(), h.is_read_only(), d.hexdigest())",
    )
}

#[test]
fn readahead_synopsis_is_the_same_as_nbdkit() {
    let lines: [&[&str]; 3] = [
        &["--filter=readahead", "pattern", "1M"],
        &["--filter=readahead", "--filter=cache", "pattern", "1M"],
        &[
            "--filter=readahead",
            "--filter=cow",
            "pattern",
            "1M",
            "cow-on-cache=true",
        ],
    ];
    for args in lines {
        same_as_nbdkit(args, sequential_view);
    }
}

// ---------------------------------------------------------------------------
// scan

/// Wait for the prefetch a closed connection's job had under way: the
/// client does not wait for the server's side of the close.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

fn cache_offsets(log: &[String]) -> Vec<u64> {
    of_kind(log, "cache")
        .iter()
        .map(|l| l.split(' ').nth(2).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn scan_caches_the_whole_disk_in_order_from_connect() {
    let dir = TempDir::new("scan");
    let disk = Logged::new(&dir, &[0u8; M]);
    let cache = disk.cache(true, "0");
    let mut args = strs(&cache);
    args.push("scan-size=64K");
    let s = disk.start(&["scan"], &args);
    // Connected and idle: the scan alone reads the disk.
    nbdsh(&s.uri(), &hold_until(&disk.log, "cache", 16));
    let log = disk.take();
    let want: Vec<u64> = (0..16).map(|i| i * 65536).collect();
    assert_eq!(cache_offsets(&log), want);
    assert!(of_kind(&log, "cache")
        .iter()
        .all(|l| l.starts_with("cache 65536 ")));
}

#[test]
fn scan_skips_ahead_of_a_read_beyond_it_unless_told_not_to() {
    let dir = TempDir::new("scan-ahead");
    let disk = Logged::new(&dir, &[0u8; M]);
    // Each prefetch takes a while, so the client's read overtakes them.
    let cache = disk.cache(true, "0.05");
    let script = "h.pread(4096, 524288)\nimport time\ntime.sleep(1.5)";
    for (ahead, skipped) in [("true", true), ("false", false)] {
        let mut args = strs(&cache);
        args.extend(["scan-size=64K", "scan-clock=false"]);
        let a = format!("scan-ahead={ahead}");
        args.push(&a);
        let s = disk.start(&["scan"], &args);
        nbdsh(&s.uri(), script);
        drop(s);
        settle();
        let offsets = cache_offsets(&disk.take());
        let jumped = offsets.windows(2).any(|w| w[1] > w[0] + 65536);
        assert_eq!(jumped, skipped, "scan-ahead={ahead}: {offsets:?}");
        assert!(offsets.contains(&0), "{offsets:?}");
    }
}

#[test]
fn scan_resumes_where_the_last_connection_stopped_with_scan_clock() {
    let dir = TempDir::new("scan-clock");
    let disk = Logged::new(&dir, &[0u8; M]);
    let cache = disk.cache(true, "0.05");
    for (clock, resumes) in [("true", true), ("false", false)] {
        let mut args = strs(&cache);
        args.push("scan-size=64K");
        let c = format!("scan-clock={clock}");
        args.push(&c);
        let s = disk.start(&["scan"], &args);
        nbdsh(&s.uri(), "import time\ntime.sleep(0.4)");
        settle();
        let first = cache_offsets(&disk.take());
        assert!(!first.is_empty() && first.len() < 16, "{first:?}");
        nbdsh(&s.uri(), "import time\ntime.sleep(0.2)");
        settle();
        let second = cache_offsets(&disk.take());
        assert_eq!(
            second[0] > 0,
            resumes,
            "scan-clock={clock}: {first:?} then {second:?}"
        );
    }
}

#[test]
fn scan_scans_only_the_default_export() {
    let dir = TempDir::new("scan-export");
    let disk = Logged::new(&dir, &[0u8; 256 * K]);
    let cache = disk.cache(true, "0");
    let s = disk.start(&["scan"], &strs(&cache));
    let uri = format!("nbd+unix:///other?socket={}", s.socket.display());
    nbdsh(&uri, "import time\ntime.sleep(0.3)");
    assert!(cache_offsets(&disk.take()).is_empty());
    let (_, log) = s.stop_with_log();
    assert!(log.contains("not the default export"), "{log}");
}

#[test]
fn scan_refuses_a_scan_size_that_is_not_a_power_of_2_from_512_to_32m() {
    for size in ["256", "3000", "64M"] {
        let out = nbdhost_tests::run(
            std::process::Command::new(nbdhost_bin())
                .args(["--filter=scan", "memory", "1M"])
                .arg(format!("scan-size={size}"))
                .args(["--run", "true"]),
        );
        assert!(!out.status.success(), "scan-size={size} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("scan-size"));
    }
}

#[test]
fn scan_copy_and_info_as_in_nbdkit_tests() {
    // nbdkit's test-scan-copy.sh and test-scan-info.sh, made small.
    let s = Server::start(&["sparse-random", "1M", "--filter=scan"]);
    run_ok(client("nbdcopy").arg(s.uri()).arg(s.uri()));
    drop(s);
    for size in ["1", "1M", "64M"] {
        let s = Server::start(&["memory", size, "--filter=scan"]);
        run_ok(client("nbdinfo").arg(s.uri()));
    }
}

#[test]
fn scan_synopsis_is_the_same_as_nbdkit() {
    let lines: [&[&str]; 3] = [
        &[
            "--filter=scan",
            "pattern",
            "1M",
            "scan-ahead=false",
            "scan-clock=false",
            "scan-forever=true",
            "scan-size=64K",
        ],
        &["--filter=scan", "--filter=cache", "pattern", "1M"],
        &[
            "--filter=scan",
            "--filter=cow",
            "pattern",
            "1M",
            "cow-on-cache=true",
        ],
    ];
    for args in lines {
        same_as_nbdkit(args, sequential_view);
    }
}
