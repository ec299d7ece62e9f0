//! The qcow2 filter against qemu's own tools, which decide what is
//! correct. For each kind of image `qemu-img` 10 makes (and for backing
//! chains and encrypted images):
//!
//! - the whole export read through nbdhost with nbdcopy equals
//!   `qemu-img convert -O raw` of the image;
//! - every extent nbdhost reports as zero reads as zeroes, and everything
//!   `qemu-img map` reports as zero or unallocated is reported as zero;
//! - one qemu-io script of writes, zero writes, partial-cluster writes and
//!   discards, run through nbdhost and on a raw mirror, leaves (after a
//!   clean shutdown) an image that `qemu-img check` passes and `qemu-img
//!   compare` finds equal to the mirror.
//!
//! Then what images must not be able to do (name local files through
//! `json:`, pass a raw file off as qcow2, reach outside a backing
//! directory), the feature bits, qemu's image locks, and several
//! connections writing at once. Crashes are in `qcow2_crash.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbdhost_tests::{
    client, filter_arg, nbdhost_bin, plugin, qemu_io, run, run_ok, Server, TempDir,
};

const PASS: &str = "qcow2 secret";

/// What the images hold before nbdhost sees them: data, a zeroed range,
/// and the clusters the script's discard will free.
const SEED: &[&str] = &[
    "write -P 0x11 0 1M",
    "write -P 0x22 5M 100k",
    "write -z 10M 1M",
    "write -P 0x23 33M 3k",
    "write -P 0x24 8M 2M",
];

/// The script run through nbdhost and on the mirror: partial and
/// unaligned writes over data and over nothing, zero writes with and
/// without unmap, a discard of whole clusters at every cluster size, and
/// writes across cluster (and 2 MiB) boundaries.
const SCRIPT: &[&str] = &[
    "write -P 0x33 512 1000",
    "write -P 0x44 3M 70k",
    "write -z 100k 200k",
    "write -P 0x55 50M 1M",
    "write -z -u 0 64k",
    "discard 8M 2M",
    "write -P 0x66 20M 4k",
    "write -z 33M 4k",
    "write -P 0x77 32767k 3k",
    "write -P 0x88 5M 64k",
];

fn qemu_img(args: &[&str]) -> String {
    run_ok(client("qemu-img").args(args))
}

/// An image under test, and how qemu's tools open it.
struct Image {
    path: PathBuf,
    encrypted: bool,
}

impl Image {
    /// `qemu-img create -f qcow2 -o OPTS` of 64 MiB in `dir`.
    fn create(dir: &TempDir, name: &str, opts: &str) -> Image {
        let path = dir.path(name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let p = path.display().to_string();
        args.extend([p.as_str(), "64M"]);
        qemu_img(&args);
        Image {
            path,
            encrypted: false,
        }
    }

    /// A LUKS-encrypted qcow2 image (cheap key derivation).
    fn create_encrypted(dir: &TempDir, name: &str) -> Image {
        let path = dir.path(name);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &format!("secret,id=sec0,data={PASS}"),
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            path.to_str().unwrap(),
            "64M",
        ]);
        Image {
            path,
            encrypted: true,
        }
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// The arguments naming this image to qemu-img and qemu-io, after the
    /// subcommand; `raw` is a raw file to name beside it (compare).
    fn spec(&self, raw: Option<&Path>) -> Vec<String> {
        if !self.encrypted {
            let mut v = vec!["-f".into(), "qcow2".into()];
            if raw.is_some() {
                v.extend(["-F".into(), "raw".into()]);
            }
            v.push(self.name());
            v.extend(raw.map(|r| r.display().to_string()));
            return v;
        }
        let mut v = vec![
            "--object".into(),
            format!("secret,id=sec0,data={PASS}"),
            "--image-opts".into(),
            format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                self.name()
            ),
        ];
        v.extend(raw.map(|r| format!("driver=raw,file.filename={}", r.display())));
        v
    }

    /// qemu-io on the image itself (no server), as the seed.
    fn seed(&self, cmds: &[&str]) {
        let mut c = client("qemu-io");
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        run_ok(c.args(self.spec(None)));
    }

    /// `qemu-img convert -O raw` of the image into `out` (-U: a server
    /// may hold it).
    fn to_raw(&self, out: &Path) {
        let mut args: Vec<String> = vec!["convert".into(), "-U".into(), "-O".into(), "raw".into()];
        args.extend(self.spec(None));
        args.push(out.display().to_string());
        run_ok(client("qemu-img").args(&args));
    }

    /// `qemu-img check`, which must report nothing at all.
    fn check_clean(&self) {
        let mut args: Vec<String> = vec!["check".into()];
        args.extend(self.spec(None));
        let out = run(client("qemu-img").args(&args));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("No errors were found"),
            "qemu-img check {}:\n{text}",
            self.name()
        );
        assert!(!text.contains("leaked"), "{text}");
    }

    /// `qemu-img compare` of the image with the raw file `raw`.
    fn assert_equals(&self, raw: &Path) {
        let mut args: Vec<String> = vec!["compare".into()];
        args.extend(self.spec(Some(raw)));
        let out = run(client("qemu-img").args(&args));
        assert!(
            out.status.success(),
            "qemu-img compare {} {}: {}{}",
            self.name(),
            raw.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `qemu-img map --output=json`: (start, length, reads as zero).
    fn qemu_map(&self) -> Vec<(u64, u64, bool)> {
        let mut args: Vec<String> = vec!["map".into(), "-U".into(), "--output=json".into()];
        args.extend(self.spec(None));
        let out = run_ok(client("qemu-img").args(&args));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let zero = e["zero"].as_bool().unwrap() || !e["present"].as_bool().unwrap();
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    zero,
                )
            })
            .collect()
    }

    /// Serve the image over the file plugin with `extra` filter arguments.
    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec![
            filter_arg("qcow2"),
            plugin("file").display().to_string(),
            format!("file={}", self.name()),
        ];
        if self.encrypted {
            args.push(format!("passphrase={PASS}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&args)
    }
}

/// nbdcopy of the whole export into `out`.
fn nbdcopy_out(uri: &str, out: &Path) {
    run_ok(client("nbdcopy").arg(uri).arg(out));
}

/// The export's extents: (offset, length, zero flag).
fn nbd_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = run_ok(client("nbdinfo").args(["--map", "--json", uri]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let t = e["type"].as_u64().unwrap();
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                t & 2 != 0,
            )
        })
        .collect()
}

/// The three oracles on an image already seeded: reads, extents, and the
/// script against a raw mirror.
fn matches_qemu(img: &Image, dir: &TempDir) {
    let expected = dir.path("expected.raw");
    img.to_raw(&expected);
    let server = img.serve(&[]);
    let uri = server.uri();
    reads_as_qemu(&uri, dir, &expected);
    extents_agree_with_qemu(img, &uri, &expected);
    script_leaves_mirror(img, server, &expected);
}

/// What nbdcopy reads through nbdhost is what qemu-img converts.
fn reads_as_qemu(uri: &str, dir: &TempDir, expected: &Path) {
    let got = dir.path("got.raw");
    nbdcopy_out(uri, &got);
    assert!(
        std::fs::read(&got).unwrap() == std::fs::read(expected).unwrap(),
        "nbdcopy through nbdhost differs from qemu-img convert"
    );
}

/// Zero extents read as zeroes; qemu's zero and unallocated ranges are
/// reported as zero.
fn extents_agree_with_qemu(img: &Image, uri: &str, expected: &Path) {
    let data = std::fs::read(expected).unwrap();
    let ours = nbd_map(uri);
    for &(off, len, zero) in &ours {
        if zero {
            let range = &data[off as usize..(off + len) as usize];
            assert!(
                range.iter().all(|&b| b == 0),
                "extent {off}+{len} is reported zero but holds data"
            );
        }
    }
    for (start, len, zero) in img.qemu_map() {
        if !zero {
            continue;
        }
        for &(off, l, z) in &ours {
            if off < start + len && start < off + l {
                assert!(
                    z,
                    "qemu-img map says {start}+{len} reads as zero; nbdhost reports {off}+{l} as data"
                );
            }
        }
    }
}

/// Run SCRIPT through nbdhost and on a copy of `expected`; after a clean
/// shutdown the image checks clean and equals the copy.
fn script_leaves_mirror(img: &Image, server: Server, expected: &Path) {
    let mirror = expected.with_extension("mirror");
    std::fs::copy(expected, &mirror).unwrap();
    qemu_io(&server.uri(), SCRIPT);
    let mut c = client("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in SCRIPT {
        c.args(["-c", cmd]);
    }
    run_ok(c.arg(&mirror));
    let (st, log) = server.stop_with_log();
    assert!(st.success(), "nbdhost exited {st}:\n{log}");
    img.check_clean();
    img.assert_equals(&mirror);
}

/// Seed an image made with OPTS and run the oracles on it.
fn kind(opts: &str) {
    let dir = TempDir::new("qcow2");
    let img = Image::create(&dir, "disk.qcow2", opts);
    img.seed(SEED);
    matches_qemu(&img, &dir);
}

/// Read the big-endian u64 at `at` in a file's first cluster.
fn header_u64(path: &Path, at: usize) -> u64 {
    let b = std::fs::read(path).unwrap();
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Overwrite bytes at `at` in a file.
fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Run nbdhost on ARGS expecting it to refuse to start; returns its log.
fn refuses(args: &[String]) -> String {
    let dir = TempDir::new("refuse");
    let out = run(client(nbdhost_bin().to_str().unwrap())
        .args(["-f", "-U"])
        .arg(dir.path("s"))
        .args(args));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "nbdhost started:\n{log}");
    log
}

fn file_args(img: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        filter_arg("qcow2"),
        plugin("file").display().to_string(),
        format!("file={}", img.display()),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

// ---------------------------------------------------------------------------
// Every kind of image qemu-img makes

#[test]
fn version_2_image_matches_qemu() {
    kind("compat=0.10");
}

#[test]
fn version_3_image_matches_qemu() {
    kind("compat=1.1");
}

#[test]
fn smallest_clusters_match_qemu() {
    kind("cluster_size=512");
}

#[test]
fn largest_clusters_match_qemu() {
    kind("cluster_size=2M");
}

#[test]
fn one_bit_refcounts_match_qemu() {
    kind("refcount_bits=1");
}

#[test]
fn sixty_four_bit_refcounts_match_qemu() {
    kind("refcount_bits=64");
}

#[test]
fn extended_l2_subclusters_match_qemu() {
    kind("extended_l2=on");
}

#[test]
fn extended_l2_with_large_clusters_matches_qemu() {
    kind("extended_l2=on,cluster_size=2M");
}

#[test]
fn metadata_preallocation_matches_qemu() {
    kind("preallocation=metadata");
}

#[test]
fn lazy_refcounts_match_qemu() {
    kind("lazy_refcounts=on");
}

#[test]
fn writes_that_grow_the_refcount_table_match_qemu() {
    // 512-byte clusters of 64-bit refcounts: one refcount block covers 32
    // KiB and the first table 2 MiB, so the script outgrows both.
    let dir = TempDir::new("qcow2-grow");
    let img = Image::create(&dir, "disk.qcow2", "cluster_size=512,refcount_bits=64");
    img.seed(SEED);
    let table_before = header_u64(&img.path, 48);
    matches_qemu(&img, &dir);
    assert_ne!(
        header_u64(&img.path, 48),
        table_before,
        "the refcount table did not move"
    );
}

/// An image whose data clusters qemu-img compressed with `kind`.
fn compressed(kind: &str) {
    let dir = TempDir::new("qcow2-z");
    let plain = Image::create(&dir, "plain.qcow2", "");
    plain.seed(SEED);
    let path = dir.path("disk.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type={kind}"),
        &plain.name(),
        path.to_str().unwrap(),
    ]);
    let map = run_ok(client("qemu-img").args(["map", "--output=json", path.to_str().unwrap()]));
    assert!(
        map.contains("\"compressed\": true"),
        "nothing compressed:\n{map}"
    );
    let img = Image {
        path,
        encrypted: false,
    };
    matches_qemu(&img, &dir);
}

#[test]
fn zlib_compressed_image_matches_qemu() {
    compressed("zlib");
}

#[test]
fn zstd_compressed_image_matches_qemu() {
    compressed("zstd");
}

#[test]
fn encrypted_image_matches_qemu() {
    let dir = TempDir::new("qcow2-luks");
    let img = Image::create_encrypted(&dir, "disk.qcow2");
    img.seed(SEED);
    matches_qemu(&img, &dir);
}

#[test]
fn internal_snapshot_is_unchanged_by_writes() {
    let dir = TempDir::new("qcow2-snap");
    let img = Image::create(&dir, "disk.qcow2", "");
    img.seed(SEED);
    qemu_img(&["snapshot", "-c", "before", &img.name()]);
    let snap = |out: &Path| {
        qemu_img(&[
            "convert",
            "-U",
            "-l",
            "snapshot.name=before",
            "-O",
            "raw",
            &img.name(),
            out.to_str().unwrap(),
        ])
    };
    let before = dir.path("snap-before.raw");
    snap(&before);
    matches_qemu(&img, &dir);
    let after = dir.path("snap-after.raw");
    snap(&after);
    assert!(
        std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap(),
        "writes to the active layer changed the snapshot"
    );
}

// ---------------------------------------------------------------------------
// Backing files

/// A chain of `depth` images in `dir` (relative backing names), each
/// writing its own 1 MiB, the base holding the seed; returns the top.
fn chain(dir: &TempDir, depth: usize, base_fmt: &str) -> Image {
    let base = dir.path(&format!("l0.{base_fmt}"));
    if base_fmt == "raw" {
        std::fs::File::create(&base)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mut c = client("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in SEED {
            c.args(["-c", cmd]);
        }
        run_ok(c.arg(&base));
    } else {
        Image::create(dir, "l0.qcow2", "").seed(SEED);
    }
    let mut below = format!("l0.{base_fmt}");
    let mut fmt = base_fmt.to_string();
    for level in 1..depth {
        let name = format!("l{level}.qcow2");
        let path = dir.path(&name);
        // Relative to the image, from another working directory.
        run_ok(client("qemu-img").current_dir("/").args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &below,
            "-F",
            &fmt,
            path.to_str().unwrap(),
        ]));
        let img = Image {
            path,
            encrypted: false,
        };
        img.seed(&[&format!("write -P {} {}M 1M", 0x40 + level, 40 + level)]);
        below = name;
        fmt = "qcow2".into();
    }
    Image {
        path: dir.path(&below),
        encrypted: false,
    }
}

#[test]
fn backing_chain_of_three_matches_qemu() {
    let dir = TempDir::new("qcow2-chain");
    let top = chain(&dir, 3, "qcow2");
    matches_qemu(&top, &dir);
}

#[test]
fn backing_chain_of_nine_matches_qemu() {
    let dir = TempDir::new("qcow2-chain9");
    let top = chain(&dir, 9, "qcow2");
    matches_qemu(&top, &dir);
}

#[test]
fn raw_backing_file_matches_qemu() {
    let dir = TempDir::new("qcow2-rawback");
    let top = chain(&dir, 2, "raw");
    matches_qemu(&top, &dir);
}

#[test]
fn version_2_overlay_zeroes_over_backing_data() {
    // v2 has no zero flag: a zero write over backing data must allocate
    // zeroed clusters rather than let the backing file show through.
    let dir = TempDir::new("qcow2-v2z");
    Image::create(&dir, "base.qcow2", "").seed(SEED);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let img = Image {
        path: top,
        encrypted: false,
    };
    let server = img.serve(&[]);
    qemu_io(&server.uri(), &["write -z 0 1M", "write -z -u 5M 64k"]);
    qemu_io(&server.uri(), &["read -P 0 0 1M", "read -P 0 5M 64k"]);
    drop(server);
    img.check_clean();
    run_ok(client("qemu-io").args(["-f", "qcow2", "-c", "read -P 0 0 1M", &img.name()]));
}

#[test]
fn missing_backing_file_stops_start_naming_it() {
    let dir = TempDir::new("qcow2-missing");
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "64M",
    ]);
    let log = refuses(&file_args(&top, &[]));
    assert!(
        log.contains(&dir.path("gone.qcow2").display().to_string()),
        "the error does not name the missing file:\n{log}"
    );
}

#[test]
fn backing_off_reads_zeroes_where_the_backing_file_would_show() {
    let dir = TempDir::new("qcow2-off");
    let top = chain(&dir, 2, "qcow2");
    let server = top.serve(&["backing=off"]);
    qemu_io(&server.uri(), &["read -P 0 0 1M", "read -P 0x41 41M 1M"]);
}

#[test]
fn backing_file_parameter_overrides_the_recorded_one() {
    let dir = TempDir::new("qcow2-override");
    let top = chain(&dir, 2, "qcow2");
    let other = Image::create(&dir, "other.qcow2", "");
    other.seed(&["write -P 0x99 0 1M"]);
    let server = top.serve(&[
        &format!("backing-file={}", other.name()),
        "backing-format=qcow2",
    ]);
    qemu_io(&server.uri(), &["read -P 0x99 0 1M", "read -P 0x41 41M 1M"]);
}

#[test]
fn backing_dir_refuses_a_backing_file_outside_it() {
    let dir = TempDir::new("qcow2-confine");
    let inside = dir.path("inside");
    std::fs::create_dir_all(&inside).unwrap();
    Image::create(&dir, "outside.qcow2", "");
    let top = inside.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../outside.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let confined = format!("backing-dir={}", inside.display());
    let log = refuses(&file_args(&top, &[&confined]));
    assert!(log.contains("outside.qcow2"), "{log}");
    // Without the confinement, qemu's rule holds and it serves.
    drop(Server::start(
        &file_args(&top, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
}

#[test]
fn json_backing_name_is_refused() {
    let dir = TempDir::new("qcow2-json");
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}"#,
        top.to_str().unwrap(),
        "64M",
    ]);
    let log = refuses(&file_args(&top, &[]));
    assert!(log.contains("json:"), "{log}");
}

#[test]
fn protocol_backing_name_is_refused() {
    let dir = TempDir::new("qcow2-proto");
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        "nbd://127.0.0.1/x",
        top.to_str().unwrap(),
        "64M",
    ]);
    let log = refuses(&file_args(&top, &[]));
    assert!(log.contains("nbd://127.0.0.1/x"), "{log}");
}

#[test]
fn image_from_a_non_file_plugin_cannot_name_etc_shadow() {
    // nbdkit's file plugin, through the adapter, keeps its file to itself:
    // the image could come from anywhere, so its backing name is not
    // followed unless the command line says where backing files live.
    let Some(nbdkit_file) = nbdkit_plugin("file") else {
        return;
    };
    let dir = TempDir::new("qcow2-shadow");
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        "/etc/shadow",
        top.to_str().unwrap(),
        "64M",
    ]);
    let log = refuses(&[
        filter_arg("qcow2"),
        nbdkit_file,
        format!("file={}", top.display()),
    ]);
    assert!(
        log.contains("/etc/shadow") && log.contains("not a local file"),
        "{log}"
    );
}

#[test]
fn recorded_raw_format_is_honoured_for_a_qcow2_file() {
    // A backing file recorded as raw is served as raw bytes even though it
    // is a qcow2 image: formats are never probed (qemu does the same).
    let dir = TempDir::new("qcow2-noprobe");
    Image::create(&dir, "base.qcow2", "").seed(SEED);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "raw",
        top.to_str().unwrap(),
        "64M",
    ]);
    let img = Image {
        path: top,
        encrypted: false,
    };
    let expected = dir.path("expected.raw");
    img.to_raw(&expected);
    assert_eq!(&std::fs::read(&expected).unwrap()[..4], b"QFI\xfb");
    let server = img.serve(&[]);
    reads_as_qemu(&server.uri(), &dir, &expected);
}

/// nbdkit's plugin NAME, or None (saying why) without nbdkit.
fn nbdkit_plugin(name: &str) -> Option<String> {
    let out = Command::new("nbdkit").arg("--dump-config").output().ok();
    let dir = out.and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("plugindir=").map(PathBuf::from))
    });
    let Some(dir) = dir else {
        eprintln!("SKIP: nbdkit is not installed (scripts/install-deps installs it)");
        return None;
    };
    Some(
        dir.join(format!("nbdkit-{name}-plugin.so"))
            .display()
            .to_string(),
    )
}

// ---------------------------------------------------------------------------
// Feature bits

/// Set bit `bit` of the 64-bit feature field at `at` in the header.
fn set_feature(path: &Path, at: u64, bit: u32) {
    let old = header_u64(path, at as usize);
    patch(path, at, &(old | 1 << bit).to_be_bytes());
}

const INCOMPATIBLE: u64 = 72;
const AUTOCLEAR: u64 = 88;

#[test]
fn unknown_incompatible_feature_is_refused_at_start() {
    let dir = TempDir::new("qcow2-incompat");
    let img = Image::create(&dir, "disk.qcow2", "");
    set_feature(&img.path, INCOMPATIBLE, 20);
    let log = refuses(&file_args(&img.path, &[]));
    assert!(log.contains("incompatible") && log.contains("20"), "{log}");
}

#[test]
fn aes_encryption_is_refused_with_the_reason() {
    let dir = TempDir::new("qcow2-aes");
    let img = Image::create(&dir, "disk.qcow2", "");
    patch(&img.path, 32, &1u32.to_be_bytes());
    let log = refuses(&file_args(&img.path, &[]));
    assert!(log.contains("AES") || log.contains("aes"), "{log}");
}

#[test]
fn external_data_file_is_refused_with_the_reason() {
    let dir = TempDir::new("qcow2-datafile");
    let img = Image::create(
        &dir,
        "disk.qcow2",
        &format!("data_file={}", dir.path("data.raw").display()),
    );
    let log = refuses(&file_args(&img.path, &[]));
    assert!(log.contains("data file"), "{log}");
}

/// Serve `img` and show it is read-only, its data readable; returns the
/// server's log.
fn served_read_only(img: &Image) -> String {
    let server = img.serve(&[]);
    let info = run_ok(client("nbdinfo").arg(server.uri()));
    assert!(info.contains("is_read_only: true"), "{info}");
    run_ok(client("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0x11 0 1M", &server.uri()]));
    server.stop_with_log().1
}

#[test]
fn corrupt_image_is_served_read_only() {
    let dir = TempDir::new("qcow2-corrupt");
    let img = Image::create(&dir, "disk.qcow2", "");
    img.seed(&["write -P 0x11 0 1M"]);
    set_feature(&img.path, INCOMPATIBLE, 1);
    let log = served_read_only(&img);
    assert!(log.contains("corrupt"), "{log}");
}

#[test]
fn dirty_lazy_refcount_image_is_served_read_only_with_the_repair_command() {
    let dir = TempDir::new("qcow2-dirty");
    let img = Image::create(&dir, "disk.qcow2", "lazy_refcounts=on");
    img.seed(&["write -P 0x11 0 1M"]);
    set_feature(&img.path, INCOMPATIBLE, 0);
    let log = served_read_only(&img);
    assert!(log.contains("qemu-img check -r all"), "{log}");
}

#[test]
fn persistent_bitmap_is_not_left_valid_after_writes() {
    let dir = TempDir::new("qcow2-bitmap");
    let img = Image::create(&dir, "disk.qcow2", "");
    qemu_img(&["bitmap", "--add", &img.name(), "b0"]);
    assert_eq!(header_u64(&img.path, AUTOCLEAR as usize) & 1, 1);
    let server = img.serve(&[]);
    qemu_io(&server.uri(), &["write -P 0x11 0 64k"]);
    drop(server);
    assert_eq!(
        header_u64(&img.path, AUTOCLEAR as usize) & 1,
        0,
        "the bitmaps extension still looks valid"
    );
    // qemu now drops the bitmaps, whose clusters it finds leaked: the
    // cost the specification accepts for a writer that does not keep them.
    let out = run(client("qemu-img").args(["check", &img.name()]));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "not just leaks:\n{text}");
    assert!(
        text.contains("bitmaps are now considered inconsistent"),
        "{text}"
    );
    let info = qemu_img(&["info", &img.name()]);
    assert!(!info.contains("b0"), "qemu still sees the bitmap:\n{info}");
}

// ---------------------------------------------------------------------------
// Two writers, and several connections

#[test]
fn qemu_cannot_write_an_image_nbdhost_is_writing() {
    let dir = TempDir::new("qcow2-lock");
    let img = Image::create(&dir, "disk.qcow2", "");
    let server = img.serve(&[]);
    // Hold a connection, so the image is open.
    let mut held = client("nbdsh")
        .args(["-u", &server.uri(), "-c", "import time; time.sleep(3)"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = run(client("qemu-io").args(["-f", "qcow2", "-c", "write 0 4k", &img.name()]));
    let _ = held.wait();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("lock"),
        "qemu-io wrote beside nbdhost:\n{text}"
    );
}

#[test]
fn nbdhost_cannot_write_an_image_qemu_is_writing() {
    let dir = TempDir::new("qcow2-lock2");
    let img = Image::create(&dir, "disk.qcow2", "");
    let mut qemu = client("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 3000", &img.name()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let server = img.serve(&[]);
    let out = run(client("nbdinfo").arg(server.uri()));
    let _ = qemu.wait();
    assert!(!out.status.success(), "nbdhost opened an image qemu holds");
    let log = server.stop_with_log().1;
    assert!(log.contains("lock"), "{log}");
}

#[test]
fn multi_conn_nbdcopy_writes_leave_a_clean_image() {
    let dir = TempDir::new("qcow2-mc");
    let img = Image::create(&dir, "disk.qcow2", "cluster_size=4096");
    let src = dir.path("src.raw");
    std::fs::write(&src, nbdhost_tests::pattern(64 << 20, 7)).unwrap();
    let server = img.serve(&[]);
    let info = run_ok(client("nbdinfo").arg(server.uri()));
    assert!(info.contains("can_multi_conn: true"), "{info}");
    run_ok(
        client("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(&src)
            .arg(server.uri()),
    );
    drop(server);
    img.check_clean();
    img.assert_equals(&src);
}

#[test]
fn two_qemu_io_connections_write_different_clusters_at_once() {
    let dir = TempDir::new("qcow2-two");
    let img = Image::create(&dir, "disk.qcow2", "cluster_size=4096");
    let server = img.serve(&[]);
    let writer = |pat: u8, base: u64| {
        let mut c = client("qemu-io");
        c.args(["-f", "raw"]);
        for i in 0..64u64 {
            // Interleaved 4 KiB clusters: the two share L2 tables.
            c.args(["-c", &format!("write -P {pat} {} 4k", base + i * 8192)]);
        }
        c.arg(server.uri())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (writer(0x5a, 0), writer(0xa5, 4096));
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    drop(server);
    img.check_clean();
    let mut c = client("qemu-io");
    c.args(["-f", "qcow2"]);
    for i in 0..64u64 {
        c.args(["-c", &format!("read -P 0x5a {} 4k", i * 8192)]);
        c.args(["-c", &format!("read -P 0xa5 {} 4k", 4096 + i * 8192)]);
    }
    let out = run_ok(c.arg(img.name()));
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn two_exports_naming_one_image_do_not_both_write() {
    let dir = TempDir::new("qcow2-twoexp");
    let img = Image::create(&dir, "disk.qcow2", "");
    let socket = dir.path("nbd.sock");
    let config = dir.path("nbdhost.toml");
    let export = |name: &str| {
        format!(
            "[[export]]\nname = \"{name}\"\nplugin = \"{}\"\nparams = {{ file = \"{}\" }}\nfilters = [ {{ filter = \"{}\" }} ]\n",
            plugin("file").display(),
            img.name(),
            nbdhost_tests::filter("qcow2").display()
        )
    };
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"{}\"]\n\n{}\n{}",
            socket.display(),
            export("a"),
            export("b")
        ),
    )
    .unwrap();
    let server = Server::start_config(&config, &[], &socket);
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", socket.display());
    let mut held = client("nbdsh")
        .args(["-u", &uri("a"), "-c", "import time; time.sleep(3)"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = run(client("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &uri("b")]));
    let _ = held.wait();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("wrote 4096"), "both exports wrote:\n{text}");
    let log = server.stop_with_log().1;
    assert!(log.contains("lock"), "{log}");
    // Once the first let go, the second may write.
    img.check_clean();
}

/// Add an extension of unknown type after the header extensions of a v3
/// image made by qemu-img; returns its bytes.
fn add_unknown_extension(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let header_len = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    let mut at = header_len;
    loop {
        let kind = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        if kind == 0 {
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let mut ext = Vec::new();
    ext.extend(0x6e62_6468u32.to_be_bytes());
    ext.extend(12u32.to_be_bytes());
    ext.extend(b"kept intact\0\0\0\0\0");
    // The end marker follows; the rest of the first cluster is free in an
    // image without a backing file.
    patch(path, at as u64, &[ext.as_slice(), &[0; 8]].concat());
    ext
}

#[test]
fn unknown_header_extension_is_kept_across_writes() {
    let dir = TempDir::new("qcow2-ext");
    let img = Image::create(&dir, "disk.qcow2", "");
    qemu_img(&["bitmap", "--add", &img.name(), "b0"]);
    let ext = add_unknown_extension(&img.path);
    let server = img.serve(&[]);
    // The first write clears the bitmaps' autoclear bit: the header is
    // written back.
    qemu_io(&server.uri(), &["write -P 0x11 0 64k"]);
    drop(server);
    assert_eq!(header_u64(&img.path, AUTOCLEAR as usize) & 1, 0);
    let b = std::fs::read(&img.path).unwrap();
    assert!(
        b[..4096].windows(ext.len()).any(|w| w == ext),
        "the unknown extension is gone"
    );
}

#[test]
fn plain_overlay_on_an_encrypted_base_uses_the_passphrase_for_the_base() {
    let dir = TempDir::new("qcow2-encbase");
    let base = Image::create_encrypted(&dir, "base.qcow2");
    base.seed(&["write -P 0x11 0 1M"]);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "64M",
    ]);
    let img = Image {
        path: top,
        encrypted: false,
    };
    let server = img.serve(&[&format!("passphrase={PASS}")]);
    qemu_io(
        &server.uri(),
        &[
            "read -P 0x11 0 1M",
            "write -P 0x22 4k 4k",
            "read -P 0x11 0 4k",
        ],
    );
    drop(server);
    let out = qemu_img(&[
        "check",
        "--object",
        &format!("secret,id=sec0,data={PASS}"),
        "--image-opts",
        &format!(
            "driver=qcow2,file.filename={},backing.encrypt.key-secret=sec0",
            img.name()
        ),
    ]);
    assert!(out.contains("No errors were found"), "{out}");
}

#[test]
fn passphrase_for_an_image_with_nothing_encrypted_is_refused() {
    let dir = TempDir::new("qcow2-nopass");
    let img = Image::create(&dir, "disk.qcow2", "");
    let log = refuses(&file_args(&img.path, &["passphrase=unused"]));
    assert!(
        log.contains("not encrypted") || log.contains("are encrypted"),
        "{log}"
    );
    assert!(
        !log.contains("unused"),
        "the passphrase reached the log:\n{log}"
    );
}

#[test]
fn clusters_trimmed_after_the_last_flush_do_not_leak_at_a_clean_close() {
    let dir = TempDir::new("qcow2-leak");
    let img = Image::create(&dir, "disk.qcow2", "cluster_size=4096");
    let server = img.serve(&[]);
    nbdhost_tests::nbdsh(
        &server.uri(),
        "h.pwrite(b'x' * 65536, 1 << 20); h.flush(); h.trim(65536, 1 << 20)",
    );
    let (st, log) = server.stop_with_log();
    assert!(st.success(), "{log}");
    img.check_clean();
}
