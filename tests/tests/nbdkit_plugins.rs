//! nbdkit's own plugins, unmodified, served through nbdhost's adapter
//! (`plugins/nbdkit`) and through nbdkit itself with the same parameters,
//! and what a client sees compared: the export's size and flags
//! (`nbdinfo --json`), its whole content (`nbdcopy`), its allocation map
//! (`nbdinfo --map`) and, for an export that takes writes, the same
//! `qemu-io` writes through both followed by the content and map again.
//!
//! Every plugin in nbdkit's plugin directory is either compared here or
//! named in [`NOT_RUN`] with the reason; a plugin that appears in neither
//! fails [`every_installed_nbdkit_plugin_is_compared_or_named`].
//!
//! nbdhost has its own `file` and `memory` plugins, so nbdkit's are given
//! by path; every other name is looked up in nbdkit's plugin directory by
//! nbdhost because it has no plugin of that name.

use std::io::{Read, Seek, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nbdhost_tests::{client, free_port, have, missing, pattern, run, run_ok, Server, TempDir};

/// Plugins of Debian's nbdkit packages that this file does not run, and
/// why. Printed when the coverage test runs, so a skip is never silent.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "S3",
        "a Python script (run as `python PATH`, see the short-name test) that needs boto3 and an S3 server; Debian packages no S3 server to run on loopback",
    ),
    (
        "cdi",
        "pulls a container image with podman from a registry on the network",
    ),
    (
        "torrent",
        "downloads from a BitTorrent swarm (trackers and peers on the network)",
    ),
    (
        "vddk",
        "needs VMware's proprietary VDDK library; Debian does not build it",
    ),
    (
        "guestfs",
        "package nbdkit-plugin-guestfs (needs a libguestfs appliance); not installed by install-deps",
    ),
    (
        "libvirt",
        "package nbdkit-plugin-libvirt (needs a running libvirtd); not installed by install-deps",
    ),
    (
        "lua",
        "package nbdkit-plugin-lua; not installed by install-deps",
    ),
    (
        "ruby",
        "package nbdkit-plugin-ruby; not installed by install-deps",
    ),
    (
        "tcl",
        "package nbdkit-plugin-tcl; not installed by install-deps",
    ),
];

/// Plugins compared below (each by at least one case of the named test).
const COMPARED: &[&str] = &[
    // generated_content_matches_nbdkit
    "pattern",
    "data",
    "null",
    "full",
    "random",
    "sparse-random",
    "zero",
    "example1",
    "example3",
    "memory",
    "info",
    // file_backed_content_matches_nbdkit
    "file",
    "example2",
    "split",
    "partitioning",
    "floppy",
    "ondemand",
    // script_plugins_match_nbdkit
    "eval",
    "sh",
    "python",
    "perl",
    "cc",
    "example4",
    // generated_filesystems_match_nbdkit_in_structure
    "linuxdisk",
    "tmpdisk",
    "iso",
    // nbd_plugin_matches_nbdkit, curl_plugin_..., ssh_plugin_...
    "nbd",
    "curl",
    "ssh",
];

// ---------------------------------------------------------------------------
// Where nbdkit is

/// nbdkit's plugin directory (from `nbdkit --dump-config`), or `None`
/// (with the reason printed) when nbdkit is not installed.
fn plugindir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let out = Command::new("nbdkit").arg("--dump-config").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("plugindir="))
            .map(PathBuf::from)
    });
    if dir.is_none() {
        eprintln!("SKIP: nbdkit is not installed (scripts/install-deps installs it)");
    }
    dir.clone()
}

/// The path of nbdkit's shared-object plugin NAME.
fn nbdkit_so(dir: &Path, name: &str) -> String {
    dir.join(format!("nbdkit-{name}-plugin.so"))
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------
// Processes the tests start: nbdkit, and the peers some plugins talk to

/// A foreground process (nbdkit, lighttpd, sshd) with its stderr in a
/// log, stopped with SIGTERM (then SIGKILL) on drop.
struct Daemon {
    what: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Spawn CMD and wait until `ready()` holds.
    fn start(what: &str, cmd: &mut Command, log: PathBuf, ready: impl Fn() -> bool) -> Daemon {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let mut d = Daemon {
            what: what.to_owned(),
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{what} exited early ({st}): {}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{what} not ready within 30 s: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                eprintln!("{} ignored SIGTERM; killing it", self.what);
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `nbdkit -f -U SOCKET ARGS...` on a socket in DIR.
fn start_nbdkit(dir: &Path, args: &[String]) -> (Daemon, String) {
    let socket = dir.join("nbdkit.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(&socket)
        .args(args);
    let s = socket.clone();
    let d = Daemon::start("nbdkit", &mut cmd, dir.join("nbdkit.log"), move || {
        std::os::unix::net::UnixStream::connect(&s).is_ok()
    });
    (d, socket.display().to_string())
}

/// `nbdhost -f -U SOCKET ARGS...` (the harness's private socket).
fn start_nbdhost(args: &[String]) -> Server {
    let mut all = vec!["--exit-with-parent"];
    all.extend(args.iter().map(String::as_str));
    Server::start(&all)
}

// ---------------------------------------------------------------------------
// The comparison

/// Which server a case's arguments are for.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Side {
    Nbdhost,
    Nbdkit,
}

/// How the bytes of the two exports are held to each other.
#[derive(Clone, Copy)]
enum Content {
    /// Byte for byte.
    Exact,
    /// The plugin generates different bytes each time (UUIDs, timestamps,
    /// clock readings): each side's bytes must pass this check instead, and
    /// the `"content"` line of `nbdinfo --json` (file(1)'s opinion of those
    /// bytes) is left out of the flags comparison.
    Structure(fn(&[u8]) -> Result<(), String>),
}

type Args = Box<dyn Fn(Side, &Path) -> Vec<String>>;

/// One plugin with one set of parameters.
struct Case {
    /// What a failure message calls it.
    name: String,
    /// The plugin and its parameters for each server, given that server's
    /// own scratch directory: a plugin that writes to a backing file gets
    /// its own copy on each side, so both start from the same bytes.
    args: Args,
    export: &'static str,
    content: Content,
    /// Also compare `nbdinfo --json --list` (every export and its
    /// description).
    list: bool,
    /// Programs the plugin runs (mke2fs, xorriso, cc, ...).
    needs: Vec<&'static str>,
}

impl Case {
    /// The same ARGS on both sides.
    fn new(name: &str, args: &[&str]) -> Case {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Case::each(name, move |_, _| args.clone())
    }

    /// Arguments made for each side by F.
    fn each(name: &str, f: impl Fn(Side, &Path) -> Vec<String> + 'static) -> Case {
        Case {
            name: name.to_owned(),
            args: Box::new(f),
            export: "",
            content: Content::Exact,
            list: false,
            needs: Vec::new(),
        }
    }

    fn export(mut self, name: &'static str) -> Case {
        self.export = name;
        self
    }

    fn structure(mut self, check: fn(&[u8]) -> Result<(), String>) -> Case {
        self.content = Content::Structure(check);
        self
    }

    fn list(mut self) -> Case {
        self.list = true;
        self
    }

    fn needs(mut self, programs: &[&'static str]) -> Case {
        self.needs.extend_from_slice(programs);
        self
    }
}

/// `diff -u` of two texts, labelled with the servers.
fn diff(a: &str, b: &str) -> String {
    let d = TempDir::new("nbdkit-diff");
    std::fs::write(d.path("a"), a).unwrap();
    std::fs::write(d.path("b"), b).unwrap();
    let out = run(Command::new("diff")
        .args(["-u", "--label", "nbdhost", "--label", "nbdkit"])
        .arg(d.path("a"))
        .arg(d.path("b")));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdinfo --json` of URI (with `--list`, of every export it lists).
fn nbdinfo_json(uri: &str, list: bool) -> String {
    let mut cmd = client("nbdinfo");
    cmd.arg("--json");
    if list {
        cmd.arg("--list");
    }
    run_ok(cmd.arg(uri))
}

/// Make the two `nbdinfo --json` outputs comparable:
///
/// - `"uri"` names each server's own socket, so it always differs.
/// - `"block_size_*"`: nbdkit 1.32 sends NBD_INFO_BLOCK_SIZE only when
///   the plugin (or a filter) has a `block_size` callback, while nbdhost
///   always advertises the limits it enforces (minimum 1, preferred 4096,
///   maximum 32 MiB). So the lines are compared when nbdkit sends them and
///   dropped from nbdhost's output only when nbdkit sends none.
/// - `"content"` only for [`Content::Structure`] cases, whose bytes differ
///   by design (file(1) prints, say, the new filesystem's UUID).
fn comparable_json(ours: &str, theirs: &str, drop_content: bool) -> (String, String) {
    let nbdkit_has_block_size = theirs.contains("\"block_size_");
    let keep = |l: &&str, ours: bool| {
        let t = l.trim_start();
        !(t.starts_with("\"uri\":")
            || (ours && !nbdkit_has_block_size && t.starts_with("\"block_size_"))
            || (drop_content && t.starts_with("\"content\":")))
    };
    let filter = |s: &str, ours: bool| {
        s.lines()
            .filter(|l| keep(l, ours))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    (filter(ours, true), filter(theirs, false))
}

/// The whole export, copied out with nbdcopy to DIR/NAME.
fn nbdcopy(uri: &str, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let _ = std::fs::remove_file(&out);
    run_ok(client("nbdcopy").arg(uri).arg(&out));
    out
}

/// How two copied images differ, or `None` when they are the same;
/// read a chunk at a time, as some exports are 100 MiB.
fn compare_files(a: &Path, b: &Path) -> Option<String> {
    let (la, lb) = (
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len(),
    );
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let fill = |f: &mut std::fs::File, buf: &mut [u8]| {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).unwrap() {
                0 => break,
                k => n += k,
            }
        }
        n
    };
    let (mut ca, mut cb) = (vec![0u8; MIB], vec![0u8; MIB]);
    let (mut offset, mut differing, mut first) = (0u64, 0usize, None);
    loop {
        let (na, nb) = (fill(&mut fa, &mut ca), fill(&mut fb, &mut cb));
        for i in 0..na.min(nb) {
            if ca[i] != cb[i] {
                differing += 1;
                first.get_or_insert((offset + i as u64, ca[i], cb[i]));
            }
        }
        if na < MIB || nb < MIB {
            break;
        }
        offset += MIB as u64;
    }
    if la == lb && differing == 0 {
        return None;
    }
    let mut s = format!("nbdhost gave {la} bytes, nbdkit {lb}");
    if let Some((i, x, y)) = first {
        s += &format!(
            "; {differing} bytes differ, the first at offset {i} (nbdhost {x:#04x}, nbdkit {y:#04x})"
        );
    }
    Some(s)
}

fn nbdinfo_map(uri: &str) -> String {
    run_ok(client("nbdinfo").arg("--map").arg(uri))
}

/// The writes both servers get, in one qemu-io session each: unaligned,
/// aligned, zeroing (with and without unmap), discard, FUA and flush; then
/// reads that check the data in the same connection (a plugin whose disk
/// lives only as long as the connection, like tmpdisk, is checked there);
/// last, a write at 1040384, which the C, Python and shell plugins below
/// refuse with ENOSPC: the client must see that error through both.
const QEMU_IO_SCRIPT: &[&str] = &[
    "write -P 0xa5 1000 5000",
    "write -P 0x5a 65536 65536",
    "write -z 131072 65536",
    "write -z -u 196608 65536",
    "discard 262144 65536",
    "write -f -P 0x3c 300000 512",
    "flush",
    "read -P 0xa5 1000 5000",
    "read -P 0x5a 65536 65536",
    "read -P 0 131072 131072",
    "read -P 0x3c 300000 512",
    // The C, Python and shell plugins below refuse writes here (ENOSPC).
    "write -P 0x11 1040384 4096",
];

/// Run [`QEMU_IO_SCRIPT`] on URI; its exit status and output with the
/// timings (which always differ) and the socket path left out.
fn qemu_io(uri: &str, socket: &str) -> String {
    let mut cmd = client("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in QEMU_IO_SCRIPT {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(uri));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| l.replace(socket, "SOCKET"))
        .collect();
    format!("status: {}\n{}\n", out.status, lines.join("\n"))
}

/// What nbdhost logged, for a failure message (nothing if it logged
/// nothing).
fn log_note(server: &Server) -> String {
    match server.log_text() {
        l if l.is_empty() => String::new(),
        l => format!("nbdhost log:\n{l}"),
    }
}

fn export_uri(socket: &str, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={socket}")
}

/// Serve CASE through both servers and compare; the differences found,
/// each naming the plugin and the aspect.
fn compare(case: &Case) -> Vec<String> {
    let mut failures = Vec::new();
    let name = &case.name;
    let dir_a = TempDir::new("nbdkit-a");
    let dir_b = TempDir::new("nbdkit-b");
    let args_a = (case.args)(Side::Nbdhost, &dir_a.0);
    let args_b = (case.args)(Side::Nbdkit, &dir_b.0);
    let mut ours = start_nbdhost(&args_a);
    let (theirs, sock_b) = start_nbdkit(&dir_b.0, &args_b);
    let sock_a = ours.socket.display().to_string();
    let (a, b) = (
        export_uri(&sock_a, case.export),
        export_uri(&sock_b, case.export),
    );
    let structure = match case.content {
        Content::Exact => None,
        Content::Structure(f) => Some(f),
    };

    let mut json_lists = vec![false];
    if case.list {
        json_lists.push(true);
    }
    let mut theirs_json = String::new();
    for list in json_lists {
        let (ja, jb) = (nbdinfo_json(&a, list), nbdinfo_json(&b, list));
        if !list {
            theirs_json = jb.clone();
        }
        let (ja, jb) = comparable_json(&ja, &jb, structure.is_some());
        if ja != jb {
            let what = if list { "json --list" } else { "json" };
            failures.push(format!(
                "{name}: {what} differs:\n{}{}",
                diff(&ja, &jb),
                log_note(&ours)
            ));
        }
    }

    let check_content = |failures: &mut Vec<String>, when: &str| {
        let (ca, cb) = (
            nbdcopy(&a, &dir_a.0, "copy.img"),
            nbdcopy(&b, &dir_b.0, "copy.img"),
        );
        match structure {
            None => {
                if let Some(d) = compare_files(&ca, &cb) {
                    failures.push(format!("{name}: content{when} differs: {d}"));
                }
            }
            Some(check) => {
                let (ca, cb) = (std::fs::read(&ca).unwrap(), std::fs::read(&cb).unwrap());
                if ca.len() != cb.len() {
                    failures.push(format!(
                        "{name}: content{when} differs in length: nbdhost gave {} bytes, nbdkit {}",
                        ca.len(),
                        cb.len()
                    ));
                }
                for (side, c) in [("nbdhost", &ca), ("nbdkit", &cb)] {
                    if let Err(e) = check(c) {
                        failures.push(format!("{name}: content{when} through {side}: {e}"));
                    }
                }
            }
        }
        let (ma, mb) = (nbdinfo_map(&a), nbdinfo_map(&b));
        if ma != mb {
            failures.push(format!("{name}: map{when} differs:\n{}", diff(&ma, &mb)));
        }
    };
    check_content(&mut failures, "");

    // Writes, where nbdkit takes them.
    if theirs_json.contains("\"is_read_only\": false") {
        let (qa, qb) = (qemu_io(&a, &sock_a), qemu_io(&b, &sock_b));
        if qa != qb {
            failures.push(format!(
                "{name}: qemu-io writes differ:\n{}{}",
                diff(&qa, &qb),
                log_note(&ours)
            ));
        }
        check_content(&mut failures, " after writes");
    }

    if !ours.is_running() {
        failures.push(format!("{name}: nbdhost died: {}", ours.log_text()));
    }
    drop(theirs);
    let (st, log) = ours.stop_with_log();
    if !st.success() {
        failures.push(format!(
            "{name}: nbdhost did not exit cleanly on SIGTERM ({st}):\n{log}"
        ));
    }
    failures
}

/// Compare every case, each on its own (a panic in one, such as a server
/// that does not start, is that case's failure), and fail with all the
/// differences at once.
fn compare_all(group: &str, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in &cases {
        if missing(&case.name, &case.needs) {
            continue;
        }
        let t = Instant::now();
        match std::panic::catch_unwind(AssertUnwindSafe(|| compare(case))) {
            Ok(f) => failures.extend(f),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {msg}", case.name));
            }
        }
        eprintln!("{group}: {} compared in {:?}", case.name, t.elapsed());
    }
    assert!(
        failures.is_empty(),
        "{group}: {} difference(s) between nbdhost and nbdkit:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------
// Checks of generated bytes

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The ext2/3/4 superblock magic of a filesystem starting at OFFSET.
fn ext_magic_at(img: &[u8], offset: usize) -> bool {
    img.get(offset + 1080..offset + 1082) == Some(&[0x53, 0xef][..])
}

fn tmpdisk_structure(img: &[u8]) -> Result<(), String> {
    if !ext_magic_at(img, 0) {
        return Err("no ext2/3/4 superblock at the start".into());
    }
    Ok(())
}

/// A file the directory-based plugins (floppy, linuxdisk, iso) put in
/// their filesystem; its bytes must be found in the image.
const NEEDLE: &[u8] = b"nbdhost serves nbdkit's plugins, byte for byte\n";

fn linuxdisk_structure(img: &[u8]) -> Result<(), String> {
    // A GPT disk (behind its protective MBR) with one partition.
    if img.get(510..512) != Some(&[0x55, 0xaa][..]) || img[446 + 4] != 0xee {
        return Err("no protective MBR".into());
    }
    if img.get(512..520) != Some(&b"EFI PART"[..]) {
        return Err("no GPT header in sector 1".into());
    }
    let entries = u64::from_le_bytes(img[512 + 72..512 + 80].try_into().unwrap()) as usize;
    let e = entries * 512;
    let first = u64::from_le_bytes(img[e + 32..e + 40].try_into().unwrap()) as usize;
    if !ext_magic_at(img, first * 512) {
        return Err(format!(
            "no ext2 superblock in partition 1 (sector {first})"
        ));
    }
    if !contains(img, NEEDLE) {
        return Err("the directory's file is not in the image".into());
    }
    Ok(())
}

fn iso_structure(img: &[u8]) -> Result<(), String> {
    // The primary volume descriptor is sector 16 (of 2048 bytes).
    let pvd = 16 * 2048;
    if img.get(pvd..pvd + 6) != Some(&b"\x01CD001"[..]) {
        return Err("no ISO 9660 primary volume descriptor".into());
    }
    if !img[pvd + 40..pvd + 72].starts_with(b"NBDTEST ") {
        return Err(format!(
            "volume id is {:?}, not NBDTEST",
            String::from_utf8_lossy(&img[pvd + 40..pvd + 72])
        ));
    }
    if !contains(img, NEEDLE) {
        return Err("the directory's file is not in the image".into());
    }
    Ok(())
}

/// info's clock modes: 12 bytes, a big-endian u64 of seconds and a u32 of
/// microseconds; returns the seconds.
fn info_clock(img: &[u8]) -> Result<u64, String> {
    if img.len() != 12 {
        return Err(format!("{} bytes, not 12", img.len()));
    }
    let secs = u64::from_be_bytes(img[..8].try_into().unwrap());
    let usecs = u32::from_be_bytes(img[8..].try_into().unwrap());
    if usecs >= 1_000_000 {
        return Err(format!("{usecs} microseconds"));
    }
    Ok(secs)
}

fn info_time(img: &[u8]) -> Result<(), String> {
    let secs = info_clock(img)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if secs.abs_diff(now) > 300 {
        return Err(format!("time {secs} is not now ({now})"));
    }
    Ok(())
}

fn info_elapsed(img: &[u8]) -> Result<(), String> {
    let secs = info_clock(img)?;
    if secs > 600 {
        return Err(format!("{secs} s elapsed: not since this test started"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Test data

const MIB: usize = 1 << 20;

fn owned(s: &str) -> String {
    s.to_owned()
}

/// A 1 MiB image with data in some 64 KiB runs and zeros elsewhere, at
/// DIR/NAME; returns the path.
fn disk_image(dir: &Path, name: &str, seed: u64) -> String {
    let mut data = vec![0u8; MIB];
    let noise = pattern(MIB, seed);
    for run in [0, 3, 4, 9, 15] {
        let r = run * 65536..(run + 1) * 65536;
        data[r.clone()].copy_from_slice(&noise[r]);
    }
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    p.display().to_string()
}

/// A sparse file: holes, with data in the same runs as [`disk_image`].
fn sparse_image(dir: &Path, name: &str, len: usize, seed: u64) -> String {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.set_len(len as u64).unwrap();
    let noise = pattern(len, seed);
    for run in [1usize, 2, 7] {
        let r = run * 65536..(run + 1) * 65536;
        if r.end <= len {
            f.seek(std::io::SeekFrom::Start(r.start as u64)).unwrap();
            f.write_all(&noise[r]).unwrap();
        }
    }
    p.display().to_string()
}

/// A directory tree shared by both servers, with fixed times: the
/// filesystems floppy, linuxdisk and iso build carry the files' times,
/// creation (ctime) and access times included.
///
/// The access times are set a day ahead: the first server to read the
/// tree (readdir at startup, file data when a client reads) would
/// otherwise move them, with relatime, from the old fixed value to now,
/// and the second server would put a different access date in its FAT.
/// A day ahead is newer than the modification and change times and not
/// a day old, so relatime leaves it alone.
fn shared_tree(tmp: &TempDir) -> String {
    let root = tmp.path("tree");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("needle.txt"), NEEDLE).unwrap();
    std::fs::write(root.join("sub/data.bin"), pattern(70000, 7)).unwrap();
    let ahead = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86400;
    for (flag, when) in [("-m", 1_600_000_000), ("-a", ahead)] {
        run_ok(
            Command::new("touch")
                .args(["-h", flag, "-d", &format!("@{when}")])
                .arg(root.join("needle.txt"))
                .arg(root.join("sub/data.bin"))
                .arg(root.join("sub"))
                .arg(&root),
        );
    }
    root.display().to_string()
}

// ---------------------------------------------------------------------------
// The tests

#[test]
fn every_installed_nbdkit_plugin_is_compared_or_named() {
    let Some(dir) = plugindir() else { return };
    let mut unaccounted = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        // nbdkit-NAME-plugin.so, or nbdkit-NAME-plugin for a script.
        let Some(name) = file
            .strip_prefix("nbdkit-")
            .and_then(|f| f.strip_suffix(".so").or(Some(f)))
            .and_then(|f| f.strip_suffix("-plugin"))
        else {
            continue;
        };
        if let Some((_, why)) = NOT_RUN.iter().find(|(n, _)| *n == name) {
            eprintln!("NOT RUN: nbdkit's {name} plugin: {why}");
        } else if !COMPARED.contains(&name) {
            unaccounted.push(file);
        }
    }
    for (name, why) in NOT_RUN {
        if !dir.join(format!("nbdkit-{name}-plugin.so")).exists()
            && !dir.join(format!("nbdkit-{name}-plugin")).exists()
        {
            eprintln!("NOT RUN (not installed): nbdkit's {name} plugin: {why}");
        }
    }
    for name in COMPARED {
        assert!(
            !NOT_RUN.iter().any(|(n, _)| n == name),
            "{name} is both compared and not run"
        );
    }
    assert!(
        unaccounted.is_empty(),
        "nbdkit plugins neither compared here nor named in NOT_RUN with a reason: {unaccounted:?}"
    );
}

#[test]
fn generated_content_matches_nbdkit() {
    let Some(pd) = plugindir() else { return };
    let memory = nbdkit_so(&pd, "memory");
    compare_all(
        "generated",
        vec![
            Case::new("pattern", &["pattern", "size=1M"]),
            Case::new(
                "data",
                &[
                    "data",
                    "data=1 2 3 @0x1000 0xff 0xfe @0x30000 ( 0x55 0xaa )*4096 @0x9ffff 7",
                    "size=1M",
                ],
            ),
            Case::new("null", &["null", "1M"]),
            Case::new("full", &["full", "1M"]),
            // Seeded, so both servers generate the same bytes.
            Case::new("random", &["random", "1M", "seed=42"]),
            Case::new(
                "sparse-random",
                &["sparse-random", "size=16M", "seed=42", "percent=20"],
            ),
            Case::new("zero", &["zero"]),
            Case::new("example1", &["example1"]),
            Case::new("example3", &["example3", "size=1M"]),
            // nbdkit's memory plugin, not nbdhost's own of the same name.
            Case::new("memory (nbdkit's, by path)", &[&memory, "size=1M"]),
            // info's deterministic modes: the export name the client asked
            // for, and the client's address (of a Unix socket: the same
            // unnamed address on both sides).
            Case::new("info mode=exportname", &["info", "mode=exportname"]).export("disk-1"),
            Case::new(
                "info mode=base64exportname",
                &["info", "mode=base64exportname"],
            )
            .export("aGVsbG8gbmJka2l0"),
            Case::new("info mode=address", &["info", "mode=address"]),
            // The clock modes read the clock, so the bytes differ by the
            // time between the reads: their shape is checked instead.
            Case::new("info mode=time", &["info", "mode=time"]).structure(info_time),
            Case::new("info mode=uptime", &["info", "mode=uptime"]).structure(info_elapsed),
            Case::new("info mode=conntime", &["info", "mode=conntime"]).structure(info_elapsed),
        ],
    );
}

#[test]
fn file_backed_content_matches_nbdkit() {
    let Some(pd) = plugindir() else { return };
    let file = nbdkit_so(&pd, "file");
    let file_dir = file.clone();
    let tmp = TempDir::new("nbdkit-files");
    let tree = shared_tree(&tmp);
    let ondemand = tmp.path("ondemand");
    std::fs::create_dir_all(&ondemand).unwrap();
    let ondemand = ondemand.display().to_string();
    compare_all(
        "file-backed",
        vec![
            // nbdkit's file plugin, not nbdhost's own: a sparse file, so
            // the map has holes to report.
            Case::each("file (nbdkit's, by path)", move |_, d| {
                vec![
                    file.clone(),
                    format!("file={}", sparse_image(d, "disk.img", 2 * MIB, 1)),
                ]
            }),
            // The file plugin's directory mode: one export per file,
            // listed, and chosen by name.
            Case::each("file dir= (nbdkit's, by path)", move |_, d| {
                let exports = d.join("exports");
                std::fs::create_dir_all(&exports).unwrap();
                disk_image(&exports, "a.img", 15);
                sparse_image(&exports, "b.img", 2 * MIB, 16);
                vec![file_dir.clone(), format!("dir={}", exports.display())]
            })
            .export("b.img")
            .list(),
            Case::each("example2", |_, d| {
                vec![
                    owned("example2"),
                    format!("file={}", disk_image(d, "disk.img", 2)),
                ]
            }),
            Case::each("split", |_, d| {
                vec![
                    owned("split"),
                    disk_image(d, "a.img", 3),
                    sparse_image(d, "b.img", 512 << 10, 4),
                    disk_image(d, "c.img", 5),
                ]
            }),
            Case::each("partitioning (MBR)", |_, d| {
                vec![
                    owned("partitioning"),
                    disk_image(d, "a.img", 6),
                    disk_image(d, "b.img", 7),
                ]
            }),
            Case::each("partitioning (GPT)", |_, d| {
                vec![
                    owned("partitioning"),
                    disk_image(d, "a.img", 8),
                    sparse_image(d, "b.img", MIB, 9),
                    owned("partition-type=gpt"),
                ]
            }),
            // One directory for both: the FAT carries the files' times.
            Case::new("floppy", &["floppy", &tree, "label=NBDTEST"]),
            // One directory for both: the first connection (to nbdhost)
            // makes the filesystem with mke2fs, whose UUID and times are
            // new each time; nbdkit then serves the same file, so the
            // bytes can be compared exactly.
            Case::new(
                "ondemand",
                &["ondemand", &format!("dir={ondemand}"), "size=1M"],
            )
            .needs(&["mke2fs"]),
        ],
    );
}

/// A C plugin for the cc plugin to compile, using much of nbdkit's API:
/// two exports with descriptions and a default, block size limits,
/// rotational, every write callback with native FUA, extents (64 KiB
/// blocks, a block never written or wholly trimmed is a hole), and cache.
const C_PLUGIN: &str = r#"
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS
#define BLOCK 65536

static int64_t size = 1048576;
static unsigned char *disk, *used;

static int t_config (const char *key, const char *value) {
  if (strcmp (key, "size") == 0) {
    size = nbdkit_parse_size (value);
    return size < 0 ? -1 : 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}
static int t_get_ready (void) {
  disk = calloc (1, size);
  used = calloc (1, size / BLOCK + 1);
  if (!disk || !used) { nbdkit_error ("calloc: %m"); return -1; }
  return 0;
}
static void t_cleanup (void) { free (disk); free (used); }
static int t_list_exports (int readonly, int is_tls, struct nbdkit_exports *e) {
  if (nbdkit_add_export (e, "alpha", "the first export") == -1) return -1;
  return nbdkit_add_export (e, "beta", NULL);
}
static const char *t_default_export (int readonly, int is_tls) { return "alpha"; }
static void *t_open (int readonly) {
  return (void *) nbdkit_strdup_intern (nbdkit_export_name ());
}
static const char *t_export_description (void *h) {
  return strcmp (h, "alpha") == 0 ? "alpha, the default" : NULL;
}
static int64_t t_get_size (void *h) { return size; }
static int t_block_size (void *h, uint32_t *min, uint32_t *pref, uint32_t *max) {
  *min = 512; *pref = 8192; *max = 1048576;
  return 0;
}
static int t_true (void *h) { return 1; }
static int t_fua (void *h) { return NBDKIT_FUA_NATIVE; }
static int t_can_cache (void *h) { return NBDKIT_CACHE_NATIVE; }
static int t_pread (void *h, void *buf, uint32_t n, uint64_t off, uint32_t f) {
  memcpy (buf, disk + off, n);
  return 0;
}
static void mark (uint32_t n, uint64_t off) {
  for (uint64_t b = off / BLOCK; b * BLOCK < off + n; b++) used[b] = 1;
}
static int t_pwrite (void *h, const void *buf, uint32_t n, uint64_t off, uint32_t f) {
  if (off < 1044480 && off + n > 1040384) {
    nbdkit_set_error (ENOSPC);
    nbdkit_error ("no writes at 1040384");
    return -1;
  }
  memcpy (disk + off, buf, n);
  mark (n, off);
  return 0;
}
static int t_flush (void *h, uint32_t f) { return 0; }
static void unmap (uint32_t n, uint64_t off) {
  memset (disk + off, 0, n);
  for (uint64_t b = (off + BLOCK - 1) / BLOCK; (b + 1) * BLOCK <= off + n; b++) used[b] = 0;
}
static int t_trim (void *h, uint32_t n, uint64_t off, uint32_t f) { unmap (n, off); return 0; }
static int t_zero (void *h, uint32_t n, uint64_t off, uint32_t f) {
  if (f & NBDKIT_FLAG_MAY_TRIM) unmap (n, off);
  else { memset (disk + off, 0, n); mark (n, off); }
  return 0;
}
static int t_extents (void *h, uint32_t n, uint64_t off, uint32_t f, struct nbdkit_extents *e) {
  for (uint64_t b = off / BLOCK; b * BLOCK < off + n && b * BLOCK < (uint64_t) size; b++) {
    uint64_t len = (b + 1) * BLOCK <= (uint64_t) size ? BLOCK : size - b * BLOCK;
    if (nbdkit_add_extent (e, b * BLOCK, len,
                           used[b] ? 0 : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) == -1)
      return -1;
  }
  return 0;
}
static int t_cache (void *h, uint32_t n, uint64_t off, uint32_t f) { return 0; }

static struct nbdkit_plugin plugin = {
  .name = "nbdhosttest",
  .config = t_config,
  .get_ready = t_get_ready,
  .cleanup = t_cleanup,
  .list_exports = t_list_exports,
  .default_export = t_default_export,
  .open = t_open,
  .export_description = t_export_description,
  .get_size = t_get_size,
  .block_size = t_block_size,
  .is_rotational = t_true,
  .can_write = t_true,
  .can_flush = t_true,
  .can_trim = t_true,
  .can_zero = t_true,
  .can_fast_zero = t_true,
  .can_fua = t_fua,
  .can_multi_conn = t_true,
  .can_extents = t_true,
  .can_cache = t_can_cache,
  .pread = t_pread,
  .pwrite = t_pwrite,
  .flush = t_flush,
  .trim = t_trim,
  .zero = t_zero,
  .extents = t_extents,
  .cache = t_cache,
};
NBDKIT_REGISTER_PLUGIN (plugin)
"#;

/// A Python plugin: an in-memory disk with the write callbacks and
/// extents (all-zero 64 KiB blocks are holes).
const PY_PLUGIN: &str = r#"
import errno
import nbdkit

API_VERSION = 2
size = 1048576
disk = None

def config(key, value):
    global size
    if key == "size":
        size = int(value)
    else:
        raise RuntimeError("unknown parameter " + key)

def get_ready():
    global disk
    disk = bytearray(size)

def open(readonly):
    return {}

def get_size(h):
    return len(disk)

def is_rotational(h): return True
def can_write(h): return True
def can_flush(h): return True
def can_trim(h): return True
def can_zero(h): return True
def can_multi_conn(h): return True
def can_extents(h): return True
def can_fua(h): return nbdkit.FUA_NATIVE

def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]

def pwrite(h, buf, offset, flags):
    if offset < 1044480 and offset + len(buf) > 1040384:
        nbdkit.set_error(errno.ENOSPC)
        raise RuntimeError("no writes at 1040384")
    disk[offset:offset + len(buf)] = buf

def flush(h, flags):
    pass

def trim(h, count, offset, flags):
    disk[offset:offset + count] = bytearray(count)

def zero(h, count, offset, flags):
    disk[offset:offset + count] = bytearray(count)

def extents(h, count, offset, flags):
    out = []
    b = offset - offset % 65536
    while b < min(offset + count, len(disk)):
        n = min(65536, len(disk) - b)
        zero = not any(disk[b:b + n])
        out.append((b, n, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO if zero else 0))
        b += n
    return out
"#;

/// A shell plugin keeping its disk in the plugin's `$tmpdir`.
const SH_PLUGIN: &str = r#"#!/bin/sh
disk="$tmpdir/disk"
case "$1" in
    get_ready) truncate -s 1048576 "$disk" ;;
    get_size) echo 1048576 ;;
    can_write|can_flush|can_trim|can_zero|is_rotational) exit 0 ;;
    can_multi_conn) exit 3 ;;
    pread) dd if="$disk" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
    pwrite)
        if [ "$4" -lt 1044480 ] && [ $(($4 + $3)) -gt 1040384 ]; then
            # Take the data first: a script that exits with it unread
            # races the server's write to its stdin (EPIPE, then EIO).
            cat >/dev/null
            echo "ENOSPC no writes at 1040384" >&2
            exit 1
        fi
        dd of="$disk" seek="$4" conv=notrunc oflag=seek_bytes status=none ;;
    flush) sync "$disk" ;;
    trim|zero) fallocate -p -o "$4" -l "$3" "$disk" ;;
    *) exit 2 ;;
esac
"#;

#[test]
fn script_plugins_match_nbdkit() {
    let Some(pd) = plugindir() else { return };
    let tmp = TempDir::new("nbdkit-scripts");
    let c = tmp.path("plugin.c");
    std::fs::write(&c, C_PLUGIN).unwrap();
    let py = tmp.path("plugin.py");
    std::fs::write(&py, PY_PLUGIN).unwrap();
    let sh = tmp.path("plugin.sh");
    std::fs::write(&sh, SH_PLUGIN).unwrap();
    run_ok(Command::new("chmod").arg("0755").arg(&sh));
    let (c, py, sh) = (
        c.display().to_string(),
        py.display().to_string(),
        sh.display().to_string(),
    );
    let example4 = pd.join("nbdkit-example4-plugin").display().to_string();

    let mut cases = vec![
        Case::new(
            "eval",
            &[
                "eval",
                "get_size=echo 1048576",
                "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none | tr '\\0' e",
                "is_rotational=exit 3",
            ],
        ),
        Case::new("sh", &["sh", &sh]),
    ];
    if pd.join("nbdkit-python-plugin.so").exists() {
        cases.push(Case::new("python", &["python", &py, "size=2097152"]));
    } else {
        eprintln!("SKIP python: package nbdkit-plugin-python is not installed");
    }
    if pd.join("nbdkit-perl-plugin.so").exists() && Path::new(&example4).exists() {
        // The Perl example, given to the perl plugin as its script.
        cases.push(Case::new(
            "perl (example4's script)",
            &["perl", &example4, "size=1048576"],
        ));
    } else {
        eprintln!("SKIP perl: package nbdkit-plugin-perl is not installed");
    }
    if Path::new("/usr/include/nbdkit-plugin.h").exists() {
        cases.push(
            Case::new("cc", &["cc", &c, "size=1M"])
                .needs(&["cc"])
                .list(),
        );
        // The other export, which has no description.
        cases.push(
            Case::new("cc (export beta)", &["cc", &c, "size=1M"])
                .needs(&["cc"])
                .export("beta"),
        );
    } else {
        eprintln!("SKIP cc: package nbdkit-plugin-dev (nbdkit-plugin.h) is not installed");
    }
    compare_all("scripts", cases);
}

/// A plugin written in a scripting language and installed in nbdkit's
/// plugin directory as `nbdkit-NAME-plugin` (no `.so`, a `#!` line naming
/// its language) is found by nbdkit under its short NAME (see "PLUGIN
/// NAME" in nbdkit-plugin(3)); Debian's example4 (Perl) is one.
///
/// KNOWN DIFFERENCE (reported, not fixed here): nbdhost looks only for
/// `nbdkit-NAME-plugin.so`, so `nbdhost example4 size=...` fails with
/// "plugin 'example4' not found" where nbdkit serves the disk.
#[test]
fn script_plugins_in_the_plugin_directory_are_found_by_short_name() {
    let Some(pd) = plugindir() else { return };
    if !pd.join("nbdkit-perl-plugin.so").exists() {
        eprintln!("SKIP: package nbdkit-plugin-perl is not installed");
        return;
    }
    compare_all(
        "short names",
        vec![Case::new("example4", &["example4", "size=1048576"])],
    );
}

#[test]
fn generated_filesystems_match_nbdkit_in_structure() {
    let Some(_) = plugindir() else { return };
    let tmp = TempDir::new("nbdkit-fs");
    let tree = shared_tree(&tmp);
    // These plugins run mke2fs or xorriso, which stamp each new
    // filesystem with a fresh UUID and the current time, so the bytes
    // differ between any two runs (of nbdkit alone, too): the size, flags
    // and map are compared, and each side's image is checked for its
    // structure and for the file it must contain.
    compare_all(
        "filesystems",
        vec![
            Case::new("linuxdisk", &["linuxdisk", &tree, "label=NBDTEST"])
                .structure(linuxdisk_structure)
                .needs(&["mke2fs"]),
            // A fresh disk for each connection, so the writes are checked
            // inside qemu-io's own connection.
            Case::new("tmpdisk", &["tmpdisk", "size=1M"])
                .structure(tmpdisk_structure)
                .needs(&["mke2fs"]),
            Case::new("iso", &["iso", &tree, "params=-V NBDTEST"])
                .structure(iso_structure)
                .needs(&["xorriso"]),
        ],
    );
}

#[test]
fn nbd_plugin_matches_nbdkit() {
    let Some(_) = plugindir() else { return };
    // Each side's nbd plugin talks to its own nbdhost (serving a file
    // with nbdhost's own file plugin), so writes through one do not show
    // through the other. The backends' block size limits come through
    // the nbd plugin, so here nbdkit reports them too and they are
    // compared.
    let tmp = TempDir::new("nbdkit-nbd");
    let backend = |side: &str| {
        let img = sparse_image(&tmp.0, &format!("{side}.img"), 4 * MIB, 11);
        start_nbdhost(&["file".into(), img])
    };
    let (ba, bb) = (backend("a"), backend("b"));
    let socket = |s: Side| match s {
        Side::Nbdhost => ba.socket.display().to_string(),
        Side::Nbdkit => bb.socket.display().to_string(),
    };
    let (sa, sb) = (socket(Side::Nbdhost), socket(Side::Nbdkit));
    let pick = move |s: Side| {
        if s == Side::Nbdhost {
            sa.clone()
        } else {
            sb.clone()
        }
    };
    let pick2 = pick.clone();
    compare_all(
        "nbd",
        vec![
            Case::each("nbd socket=", move |s, _| {
                vec!["nbd".into(), format!("socket={}", pick(s))]
            }),
            Case::each("nbd uri=", move |s, _| {
                vec![
                    "nbd".into(),
                    format!("uri=nbd+unix:///?socket={}", pick2(s)),
                ]
            }),
        ],
    );
    drop(ba);
    drop(bb);
}

/// lighttpd serving `www` on a free loopback port, checked to honour
/// Range requests for `file` (the curl plugin reads with them, and a
/// failure later would blame the wrong program).
fn serve_http(tmp: &TempDir, www: &Path, file: &str) -> (Daemon, u16) {
    let port = free_port();
    let conf = tmp.path("lighttpd.conf");
    std::fs::write(
        &conf,
        format!(
            "server.document-root = \"{}\"\nserver.bind = \"127.0.0.1\"\nserver.port = {port}\nserver.errorlog = \"{}\"\n",
            www.display(),
            tmp.path("error.log").display()
        ),
    )
    .unwrap();
    let http = Daemon::start(
        "lighttpd",
        Command::new("lighttpd").arg("-D").arg("-f").arg(&conf),
        tmp.path("lighttpd.log"),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /{file} HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 206"),
        "lighttpd ignored Range: {}",
        reply.lines().next().unwrap_or("")
    );
    (http, port)
}

#[test]
fn curl_plugin_against_local_http_server_matches_nbdkit() {
    let Some(_) = plugindir() else { return };
    if missing("curl plugin test", &["lighttpd"]) {
        return;
    }
    let tmp = TempDir::new("nbdkit-http");
    let www = tmp.path("www");
    std::fs::create_dir_all(&www).unwrap();
    disk_image(&www, "disk.img", 12);
    let (_http, port) = serve_http(&tmp, &www, "disk.img");

    let url = format!("url=http://127.0.0.1:{port}/disk.img");
    // An empty proxy= tells libcurl to use no proxy, whatever the
    // environment says: the server is on loopback.
    compare_all("curl", vec![Case::new("curl", &["curl", &url, "proxy="])]);
}

#[test]
fn ssh_plugin_against_local_sshd_matches_nbdkit() {
    let Some(_) = plugindir() else { return };
    if missing("ssh plugin test", &["sshd", "ssh-keygen"]) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // sshd running as root insists on its privilege separation directory,
    // which systemd (not the package) makes at boot.
    if root && !Path::new("/run/sshd").exists() {
        if let Err(e) = std::fs::create_dir_all("/run/sshd") {
            eprintln!("SKIP ssh plugin test: cannot make /run/sshd: {e}");
            return;
        }
    }
    let tmp = TempDir::new("nbdkit-ssh");
    let key = |name: &str| {
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", ""])
                .arg("-f")
                .arg(tmp.path(name)),
        );
        std::fs::read_to_string(tmp.path(&format!("{name}.pub"))).unwrap()
    };
    let host_pub = key("host_key");
    let client_pub = key("client_key");
    std::fs::write(tmp.path("authorized_keys"), client_pub).unwrap();
    let port = free_port();
    std::fs::write(
        tmp.path("known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}"),
    )
    .unwrap();
    let user = run_ok(Command::new("id").arg("-un")).trim().to_owned();
    let config = tmp.path("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             AllowUsers {user}\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
            tmp.path("host_key").display(),
            tmp.path("authorized_keys").display()
        ),
    )
    .unwrap();
    let sshd = if Path::new("/usr/sbin/sshd").exists() {
        "/usr/sbin/sshd"
    } else {
        "sshd"
    };
    let _sshd = Daemon::start(
        "sshd",
        Command::new(sshd).args(["-D", "-e", "-f"]).arg(&config),
        tmp.path("sshd.log"),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let identity = tmp.path("client_key").display().to_string();
    let known = tmp.path("known_hosts").display().to_string();
    compare_all(
        "ssh",
        vec![Case::each("ssh", move |_, d| {
            vec![
                "ssh".into(),
                "host=127.0.0.1".into(),
                format!("port={port}"),
                format!("user={user}"),
                format!("identity={identity}"),
                format!("known-hosts={known}"),
                format!("path={}", disk_image(d, "disk.img", 13)),
            ]
        })],
    );
}

/// `PROGRAM -U - ARGS... --run CMD`: whether it succeeded, and what it
/// printed (CMD's output, then the server's errors).
fn run_captive(program: &str, args: &[String], cmd: &str) -> (bool, String, String) {
    let mut c = client(program);
    c.args(["-U", "-"]).args(args).args(["--run", cmd]);
    let out = run(&mut c);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// nbdkit's complaint in STDERR: the first line that says `error:`, less
/// nbdkit's own `nbdkit: error: ` prefix (nbdhost puts its own,
/// `nbdhost: error: PLUGIN: `, in front of the same text).
fn complaint(stderr: &str) -> Option<&str> {
    let line = stderr.lines().find(|l| l.contains("error:"))?;
    Some(line.strip_prefix("nbdkit: error: ").unwrap_or(line).trim())
}

/// Serve ARGS with both servers and compare: whether each starts, the
/// size a client sees, and, when nbdkit refuses, that nbdhost refuses
/// with the plugin's same words.
fn compare_parameters(args: &[String]) -> Option<String> {
    let cmd = "nbdinfo --size \"$uri\"";
    let (ok_a, out_a, err_a) =
        run_captive(nbdhost_tests::nbdhost_bin().to_str().unwrap(), args, cmd);
    let (ok_b, out_b, err_b) = run_captive("nbdkit", args, cmd);
    let what = args.join(" ");
    if ok_a != ok_b || out_a != out_b {
        return Some(format!(
            "{what}: nbdhost {} ({}{}), nbdkit {} ({}{})",
            if ok_a { "serves it" } else { "refuses it" },
            out_a.trim(),
            err_a.trim(),
            if ok_b { "serves it" } else { "refuses it" },
            out_b.trim(),
            err_b.trim()
        ));
    }
    if !ok_b {
        let theirs = complaint(&err_b).unwrap_or("");
        if !err_a.contains(theirs) {
            return Some(format!(
                "{what}: both refuse, but nbdhost says {:?} where nbdkit says {theirs:?}",
                err_a.trim()
            ));
        }
    }
    None
}

/// Parameters a plugin refuses stop nbdhost as they stop nbdkit, with the
/// plugin's own message; nbdkit is the oracle, so a case where it serves
/// is held to that too.
#[test]
fn bad_parameters_are_refused_as_nbdkit_refuses_them() {
    let Some(pd) = plugindir() else { return };
    let tmp = TempDir::new("nbdkit-bad");
    let bad_c = tmp.path("bad.c");
    std::fs::write(&bad_c, "int x = ;\n").unwrap();
    let img = disk_image(&tmp.0, "disk.img", 14);
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (file, memory) = (nbdkit_so(&pd, "file"), nbdkit_so(&pd, "memory"));
    let mut cases = vec![
        s(&["pattern", "size=lots"]),
        s(&["pattern", "size=1M", "nosuchkey=1"]),
        s(&["data"]),
        s(&["data", "data=1", "size=bogus"]),
        s(&[&file]),
        s(&[&file, &img, "cache=bogus"]),
        s(&[&file, &img, "fadvise=bogus"]),
        s(&[&memory, "size=1M", "allocator=bogus"]),
        s(&["example2"]),
        s(&["random", "1M", "seed=x"]),
        s(&["random", "1M", "seed=-1"]),
        s(&["random", "1M", "seed=99999999999"]),
        s(&["random", "1M", "seed=1k"]),
        s(&["sparse-random", "size=1M", "percent=200"]),
        s(&["sparse-random", "size=1M", "runlength=-5"]),
        s(&["sh", "/nonexistent"]),
        s(&["split", "/nonexistent"]),
        s(&["partitioning"]),
        s(&["partitioning", &img, "alignment=3"]),
        s(&["floppy", "/nonexistent"]),
        s(&["info", "mode=bogus"]),
        s(&["nbd", "socket=/nonexistent", "shared=maybe"]),
        s(&["nbd", "socket=/nonexistent", "retry=4294967296"]),
    ];
    if pd.join("nbdkit-python-plugin.so").exists() {
        cases.push(s(&["python", "/nonexistent.py"]));
    }
    if have("cc") && Path::new("/usr/include/nbdkit-plugin.h").exists() {
        cases.push(s(&["cc", bad_c.to_str().unwrap()]));
    }
    let failures: Vec<String> = cases.iter().filter_map(|a| compare_parameters(a)).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Sizes given to a plugin are parsed by nbdkit_parse_size(3) as nbdkit
/// parses them: a number with an optional one-letter suffix (b, k, M, G,
/// T, P, E in any case), what strtoimax(3) takes as a number; nothing
/// else, and nothing negative or too large, each refused with nbdkit's
/// message. The null plugin hands its size= straight to
/// nbdkit_parse_size.
///
/// KNOWN DIFFERENCES (reported, not fixed here): the adapter's
/// nbdkit_parse_size accepts "1.5M", "1MB" and "1MiB", which nbdkit 1.32
/// refuses ("unknown suffix"); it refuses "+5", which nbdkit takes as 5;
/// and where both refuse, it says "could not parse size
/// string (X)" where nbdkit says "size cannot be negative (-1)",
/// "overflow computing size (9E)", "size (...) exceeds maximum value"
/// or "could not parse size: unknown suffix 'x'".
#[test]
fn sizes_are_parsed_as_nbdkit_parses_them() {
    let Some(_) = plugindir() else { return };
    let sizes = [
        "0",
        "512",
        "1b",
        "1B",
        "1k",
        "1K",
        "1m",
        "1M",
        "2G",
        "1T",
        "1P",
        "1E",
        "7E",
        "010",
        "+5",
        " 5",
        "1.5M",
        "1MB",
        "1MiB",
        "1Mi",
        "1x",
        "1 M",
        "1e3",
        "0x100000",
        "",
        "-1",
        "8E",
        "9E",
        "99999999999999999999",
    ];
    let failures: Vec<String> = sizes
        .iter()
        .filter_map(|size| compare_parameters(&["null".to_string(), format!("size={size}")]))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} sizes parsed differently:\n{}",
        failures.len(),
        sizes.len(),
        failures.join("\n")
    );
}

#[test]
fn qcow2_image_over_http_reads_as_qemu() {
    // The cloud-image case: a compressed qcow2 on a web server, served
    // read-only through the qcow2 filter over nbdkit's curl plugin.
    let Some(_) = plugindir() else { return };
    if missing("qcow2 over curl test", &["lighttpd", "qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = TempDir::new("qcow2-http");
    let www = tmp.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let plain = tmp.path("plain.qcow2");
    let plain_s = plain.to_str().unwrap();
    run_ok(client("qemu-img").args(["create", "-q", "-f", "qcow2", plain_s, "32M"]));
    run_ok(client("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 0 3M",
        "-c",
        "write -P 0x22 20M 100k",
        plain_s,
    ]));
    let image = www.join("cloud.qcow2");
    run_ok(client("qemu-img").args([
        "convert",
        "-c",
        "-O",
        "qcow2",
        plain_s,
        image.to_str().unwrap(),
    ]));
    let expected = tmp.path("expected.raw");
    run_ok(client("qemu-img").args(["convert", "-O", "raw", plain_s, expected.to_str().unwrap()]));
    let (_http, port) = serve_http(&tmp, &www, "cloud.qcow2");
    let filter = nbdhost_tests::filter_arg("qcow2");
    let url = format!("url=http://127.0.0.1:{port}/cloud.qcow2");
    let s = start_nbdhost(&["-r".into(), filter, "curl".into(), url, "proxy=".into()]);
    let got = tmp.path("got.raw");
    run_ok(client("nbdcopy").arg(s.uri()).arg(&got));
    assert!(
        std::fs::read(&got).unwrap() == std::fs::read(&expected).unwrap(),
        "nbdcopy through nbdhost differs from qemu-img convert"
    );
    let map = nbdinfo_map(&s.uri());
    assert!(map.contains("hole"), "no holes reported:\n{map}");
}
