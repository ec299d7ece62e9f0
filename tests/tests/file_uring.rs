//! The file plugin over both of its paths, `aio=io_uring` (requests
//! started on the event loops, answered from the ring's thread) and
//! `aio=threads` (synchronous calls on the worker pool), with and without
//! `cache=none`, judged by qemu-img, qemu-io, nbdinfo and libnbd: data,
//! holes, FUA (no dirty page left once a FUA write or a flush is
//! answered, as `cachestat` sees it), unaligned `O_DIRECT` writes from
//! several connections racing for the same blocks, the fallback when the
//! kernel refuses io_uring (a seccomp filter in front of
//! `io_uring_setup`), and which path each setting takes.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbdhost_tests::{
    client, export_size, missing, nbdhost_bin, nbdsh, pattern, qemu_io, run, run_ok, Server,
    TempDir,
};

const PATHS: [&str; 2] = ["aio=io_uring", "aio=threads"];

/// A directory under /var/tmp, on a disk file system (O_DIRECT fails on
/// tmpfs), removed on drop.
struct DiskDir(PathBuf);

impl DiskDir {
    /// `None`, with the reason printed, where /var/tmp is not on a file
    /// system that takes `O_DIRECT`.
    fn new(tag: &str) -> Option<DiskDir> {
        let d = Path::new("/var/tmp").join(format!("nbdhost-uring-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let d = DiskDir(d);
        let probe = d.path("probe");
        std::fs::write(&probe, [0u8; 4096]).unwrap();
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe);
        if let Err(e) = direct {
            eprintln!(
                "SKIP: /var/tmp does not take O_DIRECT ({e}): no disk file system to test on"
            );
            return None;
        }
        Some(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for DiskDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn file_arg(img: &Path) -> String {
    format!("file={}", img.display())
}

/// The names of the server's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/task");
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_owned())
        .collect()
}

fn has_ring(s: &Server) -> bool {
    // The ring's thread starts in after_fork, which may still run while
    // the socket already accepts: once a client has been served it has.
    export_size(&s.uri());
    let pid = s.child.as_ref().unwrap().id();
    thread_names(pid).iter().any(|n| n == "file-uring")
}

/// qemu-img convert into the export with parallel writes, compare, and
/// copy back out with nbdcopy.
fn round_trip(uri: &str, src: &Path, back: &Path) {
    run_ok(
        client("qemu-img")
            .args(["convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"])
            .arg(src)
            .arg(uri),
    );
    let out = run_ok(
        client("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(src)
            .arg(uri),
    );
    assert!(out.contains("Images are identical"), "{out}");
    let _ = std::fs::remove_file(back);
    run_ok(client("nbdcopy").arg(uri).arg(back));
    assert!(
        std::fs::read(back).unwrap() == std::fs::read(src).unwrap(),
        "nbdcopy read back other data"
    );
}

#[test]
fn each_path_serves_and_changes_the_file() {
    if missing("", &["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let Some(dir) = DiskDir::new("serve") else {
        return;
    };
    let src = dir.path("src.img");
    std::fs::write(&src, pattern(16 << 20, 3)).unwrap();
    for aio in PATHS {
        for cache in ["cache=default", "cache=none"] {
            let img = dir.path("disk.img");
            std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
            let s = Server::start(&["file", &file_arg(&img), aio, cache]);
            assert_eq!(has_ring(&s), aio == "aio=io_uring", "{aio} {cache}");
            round_trip(&s.uri(), &src, &dir.path("back.img"));
            qemu_io(
                &s.uri(),
                &[
                    "write -P 0x77 64k 64k",
                    "discard 8M 1M",
                    "write -z 10M 1M",
                    "write -P 0x55 12345 6789",
                    "read -P 0x55 12345 6789",
                    "flush",
                ],
            );
            let now = std::fs::read(&img).unwrap();
            let was = std::fs::read(&src).unwrap();
            let what = format!("{aio} {cache}");
            assert!(now[65536..131072].iter().all(|&b| b == 0x77), "{what}");
            assert!(now[8 << 20..9 << 20].iter().all(|&b| b == 0), "{what}");
            assert!(now[10 << 20..11 << 20].iter().all(|&b| b == 0), "{what}");
            assert!(
                now[12345..12345 + 6789].iter().all(|&b| b == 0x55),
                "{what}"
            );
            assert_eq!(now[..12345], was[..12345], "{what}");
            assert_eq!(now[12345 + 6789..65536], was[12345 + 6789..65536], "{what}");
            assert_eq!(now[11 << 20..], was[11 << 20..], "{what}");
            let map = run_ok(client("nbdinfo").arg("--map").arg(s.uri()));
            assert!(
                map.contains(" 8388608     1048576    3"),
                "{what}: hole visible in the map: {map}"
            );
            assert!(s.stop().success(), "{what}");
        }
    }
}

#[test]
fn each_path_serves_read_only_and_directories() {
    if missing("", &["qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("uring-ro");
    let img = dir.path("disk.img");
    std::fs::write(&img, pattern(1 << 20, 4)).unwrap();
    let served = dir.path("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::write(served.join("a.img"), pattern(1 << 20, 5)).unwrap();
    std::fs::write(served.join("b.img"), vec![0u8; 2 << 20]).unwrap();
    for aio in PATHS {
        let s = Server::start(&["-r", "file", &file_arg(&img), aio]);
        let out = run(client("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512"])
            .arg(s.uri()));
        let msg = nbdhost_tests::output_text(&out);
        assert!(
            msg.contains("write failed") || msg.contains("Permission denied"),
            "{aio}: write on -r must fail: {msg}"
        );
        run_ok(
            client("qemu-io")
                .args(["-r", "-f", "raw", "-c", "read 0 4k"])
                .arg(s.uri()),
        );
        drop(s);

        let s = Server::start(&["file", &format!("dir={}", served.display()), aio]);
        let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", s.socket.display());
        qemu_io(&uri("b.img"), &["write -P 7 1M 4k", "read -P 7 1M 4k"]);
        assert!(
            std::fs::read(served.join("b.img")).unwrap()[1 << 20..(1 << 20) + 4096]
                .iter()
                .all(|&b| b == 7),
            "{aio}"
        );
        assert_eq!(
            run_ok(client("nbdinfo").arg("--size").arg(uri("a.img"))).trim(),
            "1048576"
        );
        assert!(s.stop().success());
    }
}

#[test]
fn qemu_img_convert_and_compare_through_io_uring_on_a_disk_file_system() {
    if missing("", &["qemu-img", "nbdcopy"]) {
        return;
    }
    let Some(dir) = DiskDir::new("convert") else {
        return;
    };
    let src = dir.path("src.img");
    // Random data with zero runs, so that qemu-img writes zeroes too.
    let mut data = pattern(64 << 20, 9);
    data[3 << 20..7 << 20].fill(0);
    data[40 << 20..(40 << 20) + 12345].fill(0);
    std::fs::write(&src, &data).unwrap();
    for cache in ["cache=default", "cache=none"] {
        let img = dir.path("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(64 << 20).unwrap();
        let s = Server::start(&["file", &file_arg(&img), "aio=io_uring", cache]);
        round_trip(&s.uri(), &src, &dir.path("back.img"));
        assert!(s.stop().success());
        assert!(std::fs::read(&img).unwrap() == data, "{cache}");
    }
}

/// Connections each write their own 1,000-byte pieces of one region at
/// unaligned offsets, interleaved with the others', so that every block
/// is shared by several pieces of several connections, in rounds with
/// other data, up to 16 requests in flight each.
const RACE: &str = r#"
import sys, threading, nbd
uri = sys.argv[1]
conns, rounds, base, chunk, n = map(int, sys.argv[2:7])
errors = []
def writer(t):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        for r in range(rounds):
            pending = []
            for k in range(t, n, conns):
                while len(pending) >= 16:
                    h.poll(-1)
                    pending = [p for p in pending if not h.aio_command_completed(p[0])]
                buf = nbd.Buffer.from_bytearray(bytearray([(t * 37 + r * 11 + k) % 251]) * chunk)
                pending.append((h.aio_pwrite(buf, base + k * chunk), buf))
            while pending:
                h.poll(-1)
                pending = [p for p in pending if not h.aio_command_completed(p[0])]
        h.flush()
        h.shutdown()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=writer, args=(t,)) for t in range(conns)]
for th in threads: th.start()
for th in threads: th.join()
if errors:
    sys.exit("; ".join(errors))
"#;

#[test]
fn overlapping_unaligned_direct_writes_from_several_connections_lose_no_update() {
    if missing("", &["nbdsh"]) {
        return;
    }
    let Some(dir) = DiskDir::new("race") else {
        return;
    };
    let (conns, rounds, base, chunk, n) = (4u64, 3u64, 7u64, 1000u64, 3000u64);
    let size = 4 << 20;
    for aio in PATHS {
        let img = dir.path("disk.img");
        let before = pattern(size, 11);
        std::fs::write(&img, &before).unwrap();
        let s = Server::start(&["file", &file_arg(&img), aio, "cache=none"]);
        let args: Vec<String> = [conns, rounds, base, chunk, n]
            .iter()
            .map(u64::to_string)
            .collect();
        run_ok(client("python3").args(["-c", RACE, &s.uri()]).args(&args));
        assert!(s.stop().success());
        let mut model = before;
        for k in 0..n {
            let t = k % conns;
            let fill = ((t * 37 + (rounds - 1) * 11 + k) % 251) as u8;
            let at = (base + k * chunk) as usize;
            model[at..at + chunk as usize].fill(fill);
        }
        let now = std::fs::read(&img).unwrap();
        if let Some(i) = (0..size).find(|&i| now[i] != model[i]) {
            panic!(
                "{aio}: byte {i} is {:#x}, expected {:#x}: an update was lost",
                now[i], model[i]
            );
        }
    }
}

#[test]
fn cache_none_serves_a_file_whose_last_block_is_partial() {
    if missing("", &["qemu-io"]) {
        return;
    }
    let Some(dir) = DiskDir::new("tail") else {
        return;
    };
    // 1 MiB and 1,000 bytes: O_DIRECT cannot write the last block
    // without growing the file.
    let size = (1 << 20) + 1000;
    let before = pattern(size, 13);
    for aio in PATHS {
        let img = dir.path("disk.img");
        std::fs::write(&img, &before).unwrap();
        let s = Server::start(&["file", &file_arg(&img), aio, "cache=none"]);
        let end = size as u64;
        qemu_io(
            &s.uri(),
            &[
                &format!("write -P 0x21 {} 1500", end - 1500),
                &format!("read -P 0x21 {} 1500", end - 1500),
                &format!("write -P 0x22 {} 10", end - 10),
                &format!("read -P 0x22 {} 10", end - 10),
                &format!("write -P 0x23 {} 5000", end - 5500),
                &format!("read -P 0x23 {} 5000", end - 5500),
            ],
        );
        assert!(s.stop().success());
        let now = std::fs::read(&img).unwrap();
        assert_eq!(now.len(), size, "{aio}: the file changed size");
        let mut model = before.clone();
        model[size - 1500..].fill(0x21);
        model[size - 10..].fill(0x22);
        model[size - 5500..size - 500].fill(0x23);
        assert!(now == model, "{aio}: other data than written");
    }
}

#[test]
fn reads_partly_in_the_page_cache_are_whole() {
    // A read first takes what the page cache holds where it starts, and
    // the ring reads the rest: every second 16 KiB of the file is evicted,
    // so that the reads below start in the cache and go on outside it, or
    // the other way round.
    let Some(dir) = DiskDir::new("cached") else {
        return;
    };
    let data = pattern(4 << 20, 31);
    let img = dir.path("disk.img");
    std::fs::write(&img, &data).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    f.sync_all().unwrap();
    for chunk in (16 << 10..4 << 20).step_by(32 << 10) {
        // SAFETY: advice on our own descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), chunk, 16 << 10, libc::POSIX_FADV_DONTNEED) };
    }
    let s = Server::start(&["-r", "file", &file_arg(&img), "aio=io_uring"]);
    let got = dir.path("got");
    let script = format!(
        "with open('{}', 'wb') as out:\n    for i in range(160):\n        out.write(h.pread(40000, i * 24576 + 1000))",
        got.display()
    );
    nbdsh(&s.uri(), &script);
    let want: Vec<u8> = (0..160)
        .flat_map(|i| &data[i * 24576 + 1000..][..40000])
        .copied()
        .collect();
    assert!(
        std::fs::read(&got).unwrap() == want,
        "reads differ from the file"
    );
    assert!(has_ring(&s));
    assert!(s.stop().success());
}

/// `cachestat(2)` (Linux 6.5): dirty and under-writeback pages of a
/// range of `file`, or `None` where the kernel lacks it.
fn dirty_pages(file: &std::fs::File, offset: u64, len: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: offset, len };
    let mut st = Stat::default();
    // SAFETY: cachestat reads `range` and writes `st`, both live and of
    // the layout linux/mman.h gives them.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0,
        )
    };
    (r == 0).then_some(st.nr_dirty + st.nr_writeback)
}

#[test]
fn fua_writes_and_flushes_leave_no_dirty_page_when_answered() {
    if missing("", &["nbdsh"]) {
        return;
    }
    let Some(dir) = DiskDir::new("fua") else {
        return;
    };
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![1u8; 4 << 20]).unwrap();
    let probe = std::fs::File::open(&img).unwrap();
    if dirty_pages(&probe, 0, 0).is_none() {
        eprintln!("SKIP: no cachestat(2) in this kernel to see dirty pages with");
        return;
    }
    // Written back now, so that only what the server writes is dirty.
    probe.sync_all().unwrap();
    for aio in PATHS {
        let s = Server::start(&["file", &file_arg(&img), aio]);
        let dirty = |offset, len| dirty_pages(&probe, offset, len).unwrap();
        // Each plain write stays dirty (background writeback waits 30 s by
        // default), which shows the check sees dirty pages at all; then a
        // FUA write, and a flush, leave none where they wrote. (ext4 may
        // write back the plain write with the FUA one: it syncs the
        // inode.)
        nbdsh(&s.uri(), "h.pwrite(b'A' * 65536, 0)");
        assert!(
            dirty(0, 65536) > 0,
            "{aio}: a plain write left no dirty page to see"
        );
        nbdsh(
            &s.uri(),
            "h.pwrite(b'B' * 65536, 1048576, nbd.CMD_FLAG_FUA)",
        );
        assert_eq!(
            dirty(1 << 20, 65536),
            0,
            "{aio}: FUA write answered before written back"
        );
        nbdsh(&s.uri(), "h.pwrite(b'C' * 65536, 2097152)");
        assert!(dirty(2 << 20, 65536) > 0, "{aio}");
        nbdsh(
            &s.uri(),
            "h.zero(65536, 3145728, nbd.CMD_FLAG_FUA)\n\
             h.pwrite(b'D' * 4096, 3145728 + 65536)\n\
             h.flush()",
        );
        assert_eq!(
            dirty(0, 0),
            0,
            "{aio}: flush answered before all was written back"
        );
        assert!(s.stop().success());
        let now = std::fs::read(&img).unwrap();
        assert!(now[..65536].iter().all(|&b| b == b'A'));
        assert!(now[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == b'B'));
        assert!(now[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == b'C'));
        assert!(now[3 << 20..(3 << 20) + 65536].iter().all(|&b| b == 0));
        assert!(now[(3 << 20) + 65536..(3 << 20) + 69632]
            .iter()
            .all(|&b| b == b'D'));
    }
    // With cache=none FUA is a write with RWF_DSYNC (or an fdatasync):
    // the data must be there, aligned or not.
    for aio in PATHS {
        let s = Server::start(&["file", &file_arg(&img), aio, "cache=none"]);
        nbdsh(
            &s.uri(),
            "h.pwrite(b'D' * 4096, 8192, nbd.CMD_FLAG_FUA)\n\
             h.pwrite(b'E' * 1000, 20000, nbd.CMD_FLAG_FUA)\n\
             h.trim(4096, 65536, nbd.CMD_FLAG_FUA)\n\
             assert h.pread(4096, 8192) == b'D' * 4096\n\
             assert h.pread(1000, 20000) == b'E' * 1000",
        );
        assert!(s.stop().success(), "{aio}");
    }
}

/// A server running under a seccomp filter that fails `io_uring_setup`
/// with `errno`, as a kernel without io_uring (`ENOSYS`), with
/// `kernel.io_uring_disabled=2` (`EPERM`) or a container's policy does.
struct Refused {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Refused {
    /// Start it; `Err` with its log if it exits instead of listening.
    fn start(errno: i32, args: &[&str]) -> Result<Refused, String> {
        let dir = TempDir::new("refused");
        let socket = dir.path("nbd.sock");
        let log = dir.path("server.log");
        let mut cmd = Command::new(nbdhost_bin());
        cmd.args(["-f", "-v", "-U"])
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // SAFETY: only async-signal-safe calls (prctl) between fork and
        // exec, on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || refuse_io_uring(errno));
        }
        let mut child = cmd.spawn().expect("start nbdhost");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Refused {
            child,
            socket,
            log,
            _dir: dir,
        })
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Stop it; returns its log.
    fn stop(mut self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        assert!(st.success(), "{st}");
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Refused {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Install a seccomp filter failing `io_uring_setup` (425 on every
/// architecture) with `errno`, letting every other call through.
fn refuse_io_uring(errno: i32) -> std::io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const IO_URING_SETUP: u32 = 425;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        // seccomp_data.nr
        insn(LD_W_ABS, 0, 0, 0),
        insn(JEQ_K, 0, 1, IO_URING_SETUP),
        insn(RET_K, 0, 0, RET_ERRNO | errno as u32),
        insn(RET_K, 0, 0, RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with integer arguments, then with a filter program
    // that lives across the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const libc::sock_fprog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn without_io_uring_auto_falls_back_to_threads_and_says_so_once() {
    if missing("", &["qemu-img", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new("uring-refused");
    let src = dir.path("src.img");
    std::fs::write(&src, pattern(8 << 20, 12)).unwrap();
    for errno in [libc::EPERM, libc::ENOSYS] {
        let img = dir.path("disk.img");
        std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
        let s = Refused::start(errno, &["file", &file_arg(&img)]).expect("the server starts");
        let threads = thread_names(s.child.id());
        assert!(
            !threads.iter().any(|n| n == "file-uring"),
            "a ring thread without io_uring: {threads:?}"
        );
        round_trip(&s.uri(), &src, &dir.path("back.img"));
        // A second connection says nothing more.
        round_trip(&s.uri(), &src, &dir.path("back.img"));
        let log = s.stop();
        let said = log.matches("io_uring is not available").count();
        assert_eq!(said, 1, "errno {errno}: said {said} times:\n{log}");
        assert!(log.contains("requests run on the worker pool"), "{log}");

        // Asked for by name, it is an error at start-up, with the reason.
        let err = Refused::start(errno, &["file", &file_arg(&img), "aio=io_uring"])
            .err()
            .expect("aio=io_uring without io_uring must not start");
        assert!(err.contains("aio=io_uring: io_uring_setup"), "{err}");
    }
}

#[test]
fn each_setting_takes_its_path() {
    let shm = Path::new("/dev/shm");
    let dir = TempDir::new("uring-which");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let on_loops = "requests run on the event loops";
    let cases: &[(&str, bool)] = &[
        ("aio=auto", true),
        ("aio=io_uring", true),
        ("aio=threads", false),
    ];
    for &(aio, ring) in cases {
        let s = Server::start(&["-v", "file", &file_arg(&img), aio]);
        let (_, log) = s.wait_log("event loop(s)", Duration::from_secs(5));
        assert_eq!(has_ring(&s), ring, "{aio}");
        assert_eq!(log.contains(on_loops), ring, "{aio}: {log}");
        assert!(s.stop().success());
    }
    // A file in memory is a copy on the event loop, faster than a round
    // trip through the ring, unless the ring is asked for.
    if !shm.is_dir() {
        eprintln!("SKIP (tmpfs part): no /dev/shm");
        return;
    }
    let mem = shm.join(format!("nbdhost-uring-{}", std::process::id()));
    std::fs::write(&mem, vec![0u8; 1 << 20]).unwrap();
    for (aio, ring) in [("aio=auto", false), ("aio=io_uring", true)] {
        let s = Server::start(&["-v", "file", &file_arg(&mem), aio]);
        let (_, log) = s.wait_log("event loop(s)", Duration::from_secs(5));
        assert_eq!(has_ring(&s), ring, "tmpfs {aio}");
        assert!(log.contains(on_loops), "tmpfs {aio}: {log}");
        // tmpfs cannot zero a range: the plugin says ENOTSUP and the
        // server writes the zeroes through it.
        qemu_io(
            &s.uri(),
            &[
                "write -P 3 4k 4k",
                "write -z 5k 2k",
                "read -P 3 4k 1k",
                "read -P 0 5k 2k",
                "read -P 3 7k 1k",
            ],
        );
        assert!(s.stop().success());
    }
    let _ = std::fs::remove_file(&mem);
    let bad = run(Command::new(nbdhost_bin()).args([
        "-f",
        "-U",
        "-",
        "file",
        &file_arg(&img),
        "aio=posix",
    ]));
    let msg = nbdhost_tests::output_text(&bad);
    assert!(!bad.status.success(), "{msg}");
    assert!(
        msg.contains("aio=posix: expected auto, io_uring or threads"),
        "{msg}"
    );
}
