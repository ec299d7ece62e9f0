//! The xz, gzip and tar filters over archives made by the real tools
//! (`xz --block-size`, `gzip`, `tar`): every byte served is checked
//! against the file that was archived, and each command line of the
//! SYNOPSIS and EXAMPLES of nbdkit's man pages for these filters is
//! served by nbdkit and by nbdhost and must look the same to a client.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::Command;

use nbdhost_tests::{client, missing, nbdsh, pattern, run, run_ok, twin, Server, TempDir};

const K: usize = 1024;
const M: usize = 1024 * 1024;

/// A disk of `len` bytes that compresses (runs of a repeated pattern
/// between stretches of noise), so blocks differ in compressed length.
fn disk(dir: &TempDir, name: &str, len: usize, seed: u64) -> PathBuf {
    let noise = pattern(len, seed);
    let data: Vec<u8> = noise
        .iter()
        .enumerate()
        .map(|(i, b)| if (i / (40 * K)) % 2 == 0 { b } else { &0x5a })
        .copied()
        .collect();
    let p = dir.path(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Run a tool that makes an archive, in `dir`.
fn tool(dir: &TempDir, program: &str, args: &[&str]) {
    run_ok(Command::new(program).current_dir(&dir.0).args(args));
}

/// `xz -k` with blocks of `block_size` bytes; returns the `.xz` path.
fn xz(dir: &TempDir, file: &Path, block_size: &str) -> PathBuf {
    let name = file.file_name().unwrap().to_str().unwrap();
    tool(
        dir,
        "xz",
        &["-k", "-f", &format!("--block-size={block_size}"), name],
    );
    dir.path(&format!("{name}.xz"))
}

/// `gzip -k`; returns the `.gz` path.
fn gzip(dir: &TempDir, file: &Path) -> PathBuf {
    let name = file.file_name().unwrap().to_str().unwrap();
    tool(dir, "gzip", &["-k", "-f", name]);
    dir.path(&format!("{name}.gz"))
}

fn start(args: &[&str]) -> Server {
    Server::start(args)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-img finds the export at `uri` identical to `reference`.
fn assert_serves(uri: &str, reference: &Path) {
    let out = run_ok(
        client("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(reference)
            .arg(uri),
    );
    assert!(out.contains("Images are identical"), "{out}");
}

/// The whole export at `uri`, read by nbdcopy.
fn contents(uri: &str) -> Vec<u8> {
    let out = run(client("nbdcopy").args([uri, "-"]));
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

/// What a client sees of an export: its size, whether it is read-only,
/// and a digest of every byte (nbdcopy).
fn fingerprint(uri: &str) -> String {
    let size = run_ok(client("nbdinfo").args(["--size", uri]));
    let readonly = run(client("nbdinfo").args(["--is", "readonly", uri]))
        .status
        .success();
    let mut h = DefaultHasher::new();
    h.write(&contents(uri));
    format!(
        "size {} read-only {readonly} digest {:x}",
        size.trim(),
        h.finish()
    )
}

/// Whether nbdinfo can open the export at all: `Err` with its message
/// when the server refused it.
fn opens(uri: &str) -> Result<String, String> {
    let out = run(client("nbdinfo").args(["--size", uri]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text.trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn have_tools(tools: &[&str]) -> bool {
    !missing("", tools)
}

/// nbdsh reads `len` bytes at each offset and compares them with the
/// same bytes of `reference`.
fn reads_match(uri: &str, reference: &Path, reads: &[(usize, usize)]) {
    let script = format!(
        "ref = open({:?}, 'rb').read()\n\
         for off, n in {reads:?}:\n    assert h.pread(n, off) == ref[off:off+n], (off, n)\n",
        path(reference)
    );
    nbdsh(uri, &script);
}

// ---- xz ----

#[test]
fn xz_serves_the_uncompressed_disk_of_a_file_with_many_blocks() {
    if !have_tools(&["xz", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new("xz-blocks");
    let img = disk(&dir, "disk.img", 3 * M, 1);
    let xzf = xz(&dir, &img, "64KiB");
    let s = start(&["--filter=xz", "file", path(&xzf)]);
    assert_eq!(opens(&s.uri()).unwrap(), (3 * M).to_string());
    assert_serves(&s.uri(), &img);
}

#[test]
fn xz_reads_across_block_boundaries_at_any_offset() {
    if !have_tools(&["xz", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("xz-cross");
    let img = disk(&dir, "disk.img", M, 2);
    let xzf = xz(&dir, &img, "64KiB");
    let s = start(&["--filter=xz", "file", path(&xzf)]);
    reads_match(
        &s.uri(),
        &img,
        &[
            (64 * K - 1, 2),
            (3, 200 * K),
            (M - 7, 7),
            (0, M),
            (500 * K + 13, 64 * K),
        ],
    );
}

#[test]
fn xz_with_a_cache_of_one_block_still_reads_every_byte() {
    if !have_tools(&["xz", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("xz-depth");
    let img = disk(&dir, "disk.img", 512 * K, 3);
    let xzf = xz(&dir, &img, "32KiB");
    let s = start(&["--filter=xz", "file", path(&xzf), "xz-max-depth=1"]);
    reads_match(
        &s.uri(),
        &img,
        &[
            (0, 10),
            (300 * K, 10),
            (5, 10),
            (300 * K + 5, 40 * K),
            (0, 512 * K),
        ],
    );
}

#[test]
fn xz_serves_concatenated_streams_one_after_the_other() {
    if !have_tools(&["xz", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new("xz-streams");
    let a = disk(&dir, "a", 300 * K, 4);
    let b = disk(&dir, "b", 200 * K, 5);
    let mut joined = std::fs::read(xz(&dir, &a, "64KiB")).unwrap();
    // Stream padding between streams is allowed and skipped.
    joined.extend([0u8; 8]);
    joined.extend(std::fs::read(xz(&dir, &b, "64KiB")).unwrap());
    let both = dir.path("both.xz");
    std::fs::write(&both, joined).unwrap();
    let mut reference = std::fs::read(&a).unwrap();
    reference.extend(std::fs::read(&b).unwrap());
    let plain = dir.path("both");
    std::fs::write(&plain, reference).unwrap();
    let s = start(&["--filter=xz", "file", path(&both)]);
    assert_serves(&s.uri(), &plain);
}

#[test]
fn xz_refuses_a_file_whose_largest_block_exceeds_xz_max_block() {
    if !have_tools(&["xz"]) {
        return;
    }
    let dir = TempDir::new("xz-maxblock");
    let img = disk(&dir, "disk.img", 2 * M, 6);
    let xzf = xz(&dir, &img, "2MiB");
    let s = start(&["--filter=xz", "file", path(&xzf), "xz-max-block=1M"]);
    assert!(opens(&s.uri()).is_err());
    assert!(s.log_text().contains("xz-max-block"), "{}", s.log_text());
    let s = start(&["--filter=xz", "file", path(&xzf), "xz-max-block=2M"]);
    assert_eq!(opens(&s.uri()).unwrap(), (2 * M).to_string());
}

#[test]
fn xz_refuses_a_file_that_is_not_xz() {
    let dir = TempDir::new("xz-notxz");
    let img = disk(&dir, "disk.img", 64 * K, 7);
    let s = start(&["--filter=xz", "file", path(&img)]);
    assert!(opens(&s.uri()).is_err());
    assert!(s.log_text().contains("not an xz file"), "{}", s.log_text());
}

#[test]
fn xz_fails_the_read_of_a_corrupt_block_and_serves_the_others() {
    if !have_tools(&["xz", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("xz-corrupt");
    let img = disk(&dir, "disk.img", 256 * K, 8);
    let xzf = xz(&dir, &img, "64KiB");
    let mut bytes = std::fs::read(&xzf).unwrap();
    // The first block starts after the 12-byte stream header; its data
    // is noise that xz could not compress, so this byte is in it.
    bytes[12 + 1000] ^= 0xff;
    std::fs::write(&xzf, bytes).unwrap();
    let s = start(&["--filter=xz", "file", path(&xzf)]);
    let script = format!(
        "ref = open({:?}, 'rb').read()\n\
         try:\n    h.pread(512, 0)\n    raise SystemExit('corrupt block was served')\n\
         except nbd.Error as e:\n    print('refused', e.errno)\n\
         assert h.pread(512, 128*1024) == ref[128*1024:128*1024+512]\n",
        path(&img)
    );
    let out = nbdsh(&s.uri(), &script);
    assert!(out.contains("refused"), "{out}");
}

#[test]
fn xz_and_gzip_answer_cache_requests_past_the_compressed_size() {
    if !have_tools(&["xz", "gzip", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("xz-cache");
    // Zeroes compress to almost nothing: the disk's end lies far past
    // the end of the compressed file.
    let img = dir.path("zeroes.img");
    std::fs::write(&img, vec![0u8; 2 * M]).unwrap();
    for (filter, compressed) in [
        ("--filter=xz", xz(&dir, &img, "256KiB")),
        ("--filter=gzip", gzip(&dir, &img)),
    ] {
        let s = start(&[filter, "file", path(&compressed)]);
        let out = nbdsh(
            &s.uri(),
            "h.cache(4096, 2*1024*1024 - 4096)\nh.cache(1024*1024, 512*1024)\n\
             assert h.pread(4096, 2*1024*1024 - 4096) == bytes(4096)\nprint('ok')",
        );
        assert_eq!(out, "ok\n", "{filter}");
    }
}

#[test]
fn xz_export_is_read_only() {
    if !have_tools(&["xz", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("xz-ro");
    let img = disk(&dir, "disk.img", 128 * K, 9);
    let xzf = xz(&dir, &img, "64KiB");
    let s = start(&["--filter=xz", "file", path(&xzf)]);
    let out = nbdsh(
        &s.uri(),
        "print(h.is_read_only())\n\
         try:\n    h.pwrite(b'x' * 512, 0)\n    print('written')\n\
         except nbd.Error:\n    print('refused')\n",
    );
    assert_eq!(out, "True\nrefused\n");
}

// ---- gzip ----

#[test]
fn gzip_serves_the_uncompressed_disk() {
    if !have_tools(&["gzip", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new("gz-serve");
    let img = disk(&dir, "disk.img", 3 * M, 10);
    let gz = gzip(&dir, &img);
    let s = start(&["--filter=gzip", "file", path(&gz)]);
    assert_eq!(opens(&s.uri()).unwrap(), (3 * M).to_string());
    assert_serves(&s.uri(), &img);
    // A later connection reads the copy the first one made.
    assert_serves(&s.uri(), &img);
}

#[test]
fn gzip_reads_at_any_offset() {
    if !have_tools(&["gzip", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("gz-reads");
    let img = disk(&dir, "disk.img", M, 11);
    let gz = gzip(&dir, &img);
    let s = start(&["--filter=gzip", "file", path(&gz)]);
    reads_match(&s.uri(), &img, &[(M - 3, 3), (1, 100 * K), (777 * K, 5)]);
}

#[test]
fn gzip_refuses_a_truncated_file() {
    if !have_tools(&["gzip"]) {
        return;
    }
    let dir = TempDir::new("gz-short");
    let img = disk(&dir, "disk.img", 512 * K, 12);
    let gz = gzip(&dir, &img);
    let bytes = std::fs::read(&gz).unwrap();
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    let s = start(&["--filter=gzip", "file", path(&gz)]);
    assert!(opens(&s.uri()).is_err());
}

#[test]
fn gzip_serves_only_the_first_member_like_nbdkit() {
    if !have_tools(&["gzip"]) {
        return;
    }
    let dir = TempDir::new("gz-members");
    let a = disk(&dir, "a", 100 * K, 13);
    let b = disk(&dir, "b", 50 * K, 14);
    let mut joined = std::fs::read(gzip(&dir, &a)).unwrap();
    joined.extend(std::fs::read(gzip(&dir, &b)).unwrap());
    let both = dir.path("both.gz");
    std::fs::write(&both, joined).unwrap();
    let seen = twin::same_as_nbdkit(&["--filter=gzip", "file", path(&both)], fingerprint);
    if seen.is_none() {
        let s = start(&["--filter=gzip", "file", path(&both)]);
        assert_eq!(opens(&s.uri()).unwrap(), (100 * K).to_string());
    }
}

#[test]
fn gzip_export_is_read_only() {
    if !have_tools(&["gzip", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("gz-ro");
    let img = disk(&dir, "disk.img", 64 * K, 15);
    let gz = gzip(&dir, &img);
    let s = start(&["--filter=gzip", "file", path(&gz)]);
    let out = nbdsh(&s.uri(), "print(h.is_read_only())");
    assert_eq!(out, "True\n");
}

// ---- tar ----

/// A tar archive in `dir` holding `first` (64 KiB), then `entry`
/// (`len` bytes, returned as the reference file), then `last`, made with
/// `tar cf` in `format`.
fn tarball(dir: &TempDir, format: &str, entry: &str, len: usize) -> (PathBuf, PathBuf) {
    disk(dir, "first", 64 * K, 20);
    if let Some(parent) = Path::new(entry).parent() {
        std::fs::create_dir_all(dir.path(parent.to_str().unwrap())).unwrap();
    }
    let reference = disk(dir, entry, len, 21);
    disk(dir, "last", 3 * K + 5, 22);
    tool(
        dir,
        "tar",
        &[
            "cf",
            "archive.tar",
            &format!("--format={format}"),
            "first",
            entry,
            "last",
        ],
    );
    (dir.path("archive.tar"), reference)
}

/// The bytes of `member` that `tar xOf` extracts from `archive`.
fn extracted(archive: &Path, member: &str) -> Vec<u8> {
    let out = run(Command::new("tar").arg("xOf").arg(archive).arg(member));
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

#[test]
fn tar_serves_one_entry_of_a_ustar_archive() {
    if !have_tools(&["tar", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new("tar-ustar");
    let (archive, reference) = tarball(&dir, "ustar", "disk.img", M + 1000);
    let s = start(&["file", path(&archive), "--filter=tar", "tar-entry=disk.img"]);
    assert_eq!(opens(&s.uri()).unwrap(), (M + 1000).to_string());
    assert_serves(&s.uri(), &reference);
}

#[test]
fn tar_finds_an_entry_with_a_gnu_long_name() {
    if !have_tools(&["tar", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new("tar-gnu");
    let name = format!("{}/disk.img", "d".repeat(120));
    let (archive, reference) = tarball(&dir, "gnu", &name, 200 * K);
    let s = start(&[
        "file",
        path(&archive),
        "--filter=tar",
        &format!("tar-entry={name}"),
    ]);
    assert_serves(&s.uri(), &reference);
}

#[test]
fn tar_finds_an_entry_with_a_pax_long_name() {
    if !have_tools(&["tar", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new("tar-pax");
    let name = format!("{}/disk.img", "p".repeat(150));
    let (archive, reference) = tarball(&dir, "pax", &name, 100 * K + 1);
    let s = start(&[
        "file",
        path(&archive),
        "--filter=tar",
        &format!("tar-entry={name}"),
    ]);
    assert_serves(&s.uri(), &reference);
}

#[test]
fn tar_writes_go_to_the_entry_in_place_and_nowhere_else() {
    if !have_tools(&["tar", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("tar-write");
    let (archive, reference) = tarball(&dir, "gnu", "disk.img", 256 * K);
    let before_first = extracted(&archive, "first");
    let before_last = extracted(&archive, "last");
    let archive_len = std::fs::metadata(&archive).unwrap().len();
    {
        let s = start(&["file", path(&archive), "--filter=tar", "tar-entry=disk.img"]);
        nbdhost_tests::qemu_io(
            &s.uri(),
            &["write -P 0xab 1000 70000", "write -z 200k 4k", "flush"],
        );
    }
    let mut expected = std::fs::read(&reference).unwrap();
    expected[1000..71000].fill(0xab);
    expected[200 * K..204 * K].fill(0);
    assert!(extracted(&archive, "disk.img") == expected);
    assert!(extracted(&archive, "first") == before_first);
    assert!(extracted(&archive, "last") == before_last);
    assert_eq!(std::fs::metadata(&archive).unwrap().len(), archive_len);
}

#[test]
fn tar_export_is_read_only_with_r() {
    if !have_tools(&["tar", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new("tar-ro");
    let (archive, _) = tarball(&dir, "gnu", "disk.img", 64 * K);
    let s = start(&[
        "-r",
        "file",
        path(&archive),
        "--filter=tar",
        "tar-entry=disk.img",
    ]);
    assert_eq!(nbdsh(&s.uri(), "print(h.is_read_only())"), "True\n");
}

#[test]
fn tar_refuses_an_entry_that_is_not_in_the_archive() {
    if !have_tools(&["tar"]) {
        return;
    }
    let dir = TempDir::new("tar-missing");
    let (archive, _) = tarball(&dir, "gnu", "disk.img", 64 * K);
    let s = start(&["file", path(&archive), "--filter=tar", "tar-entry=disk.im"]);
    assert!(opens(&s.uri()).is_err());
    assert!(
        s.log_text().contains("not in the archive"),
        "{}",
        s.log_text()
    );
}

#[test]
fn tar_requires_tar_entry() {
    let out = run(Command::new(nbdhost_tests::nbdhost_bin()).args([
        "-f",
        "--filter=tar",
        "memory",
        "1M",
    ]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tar-entry"),
        "{out:?}"
    );
}

#[test]
fn tar_limit_refuses_an_entry_whose_header_lies_beyond_it() {
    if !have_tools(&["tar"]) {
        return;
    }
    let dir = TempDir::new("tar-limit");
    // "first" takes the header at 0 and 64 KiB of data: the entry's
    // header starts at 64 KiB + 512.
    let (archive, _) = tarball(&dir, "gnu", "disk.img", 64 * K);
    let far = start(&[
        "file",
        path(&archive),
        "--filter=tar",
        "tar-entry=disk.img",
        "tar-limit=64K",
    ]);
    assert!(opens(&far.uri()).is_err());
    let near = start(&[
        "file",
        path(&archive),
        "--filter=tar",
        "tar-entry=disk.img",
        "tar-limit=65K",
    ]);
    assert_eq!(opens(&near.uri()).unwrap(), (64 * K).to_string());
}

// ---- nbdkit's SYNOPSIS and EXAMPLES, served by both ----
//
// Where nbdkit's page reads from https://example.com with the curl
// plugin, the same curl plugin reads a file:// URL of a local archive.

/// Archives for the examples: `disk.img` in `name.xz`, `name.gz`, and a
/// tar holding `some/disk.img`, `disk.img` and an OVA-like set of files.
struct Examples {
    dir: TempDir,
}

impl Examples {
    fn new() -> Option<Examples> {
        if !have_tools(&["xz", "gzip", "tar", "nbdcopy", "nbdkit"]) {
            return None;
        }
        let dir = TempDir::new("archive-examples");
        let img = disk(&dir, "disk.img", 600 * K, 30);
        xz(&dir, &img, "64KiB");
        gzip(&dir, &img);
        std::fs::create_dir_all(dir.path("some")).unwrap();
        std::fs::copy(&img, dir.path("some/disk.img")).unwrap();
        tool(
            &dir,
            "tar",
            &["cf", "file.tar", "some/disk.img", "disk.img"],
        );
        tool(&dir, "xz", &["-k", "-f", "--block-size=64KiB", "file.tar"]);
        tool(&dir, "gzip", &["-k", "-f", "file.tar"]);
        std::fs::write(dir.path("rhel.ovf"), "<Envelope/>\n").unwrap();
        disk(&dir, "rhel-disk1.vmdk", 100 * K, 31);
        std::fs::write(dir.path("rhel.mf"), "SHA1(rhel.ovf)= 0\n").unwrap();
        tool(
            &dir,
            "tar",
            &["cf", "rhel.ova", "rhel.ovf", "rhel-disk1.vmdk", "rhel.mf"],
        );
        Some(Examples { dir })
    }

    fn file(&self, name: &str) -> String {
        path(&self.dir.path(name)).to_owned()
    }

    fn url(&self, name: &str) -> String {
        format!("file://{}", self.file(name))
    }

    /// Serve `args` with both servers; both see `disk.img` (or the vmdk).
    fn same(&self, args: &[&str], reference: &str) {
        let Some(seen) = twin::same_as_nbdkit(args, fingerprint) else {
            return;
        };
        let s = start(args);
        assert_eq!(seen, fingerprint(&s.uri()));
        assert!(contents(&s.uri()) == std::fs::read(self.dir.path(reference)).unwrap());
    }
}

#[test]
fn nbdkit_xz_synopsis_file() {
    let Some(e) = Examples::new() else { return };
    e.same(&["--filter=xz", "file", &e.file("disk.img.xz")], "disk.img");
}

#[test]
fn nbdkit_xz_synopsis_curl() {
    let Some(e) = Examples::new() else { return };
    e.same(&["--filter=xz", "curl", &e.url("disk.img.xz")], "disk.img");
}

#[test]
fn nbdkit_gzip_synopsis_file() {
    let Some(e) = Examples::new() else { return };
    e.same(
        &["file", "--filter=gzip", &e.file("disk.img.gz")],
        "disk.img",
    );
}

#[test]
fn nbdkit_gzip_example_curl() {
    let Some(e) = Examples::new() else { return };
    e.same(
        &["curl", "--filter=gzip", &e.url("disk.img.gz")],
        "disk.img",
    );
}

#[test]
fn nbdkit_gzip_example_tar_over_gzip_over_curl() {
    let Some(e) = Examples::new() else { return };
    e.same(
        &[
            "curl",
            "--filter=tar",
            "--filter=gzip",
            &e.url("file.tar.gz"),
            "tar-entry=disk.img",
        ],
        "disk.img",
    );
}

#[test]
fn nbdkit_tar_synopsis_and_example_file() {
    let Some(e) = Examples::new() else { return };
    e.same(
        &[
            "file",
            &e.file("file.tar"),
            "--filter=tar",
            "tar-entry=some/disk.img",
        ],
        "disk.img",
    );
}

#[test]
fn nbdkit_tar_example_ova_read_only() {
    let Some(e) = Examples::new() else { return };
    e.same(
        &[
            "-r",
            "file",
            &e.file("rhel.ova"),
            "--filter=tar",
            "tar-entry=rhel-disk1.vmdk",
        ],
        "rhel-disk1.vmdk",
    );
}

#[test]
fn nbdkit_tar_example_curl() {
    let Some(e) = Examples::new() else { return };
    e.same(
        &[
            "-r",
            "curl",
            &e.url("file.tar"),
            "--filter=tar",
            "tar-entry=disk.img",
        ],
        "disk.img",
    );
}

#[test]
fn nbdkit_tar_example_over_gzip() {
    let Some(e) = Examples::new() else { return };
    e.same(
        &[
            "file",
            &e.file("file.tar.gz"),
            "--filter=tar",
            "tar-entry=disk.img",
            "--filter=gzip",
        ],
        "disk.img",
    );
}

#[test]
fn nbdkit_tar_example_over_xz() {
    let Some(e) = Examples::new() else { return };
    e.same(
        &[
            "file",
            &e.file("file.tar.xz"),
            "--filter=tar",
            "tar-entry=disk.img",
            "--filter=xz",
        ],
        "disk.img",
    );
}

// ---- ext2 ----

/// A file system of type `fs_type` (ext2, ext3, ext4) made by `mke2fs
/// -d` from a tree holding `/disks/disk.raw` (`len` bytes, returned as the
/// reference) and `/disks/other.raw`.
fn file_system(dir: &TempDir, fs_type: &str, len: usize) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir.path("root/disks")).unwrap();
    let reference = disk(dir, "root/disks/disk.raw", len, 40);
    disk(dir, "root/disks/other.raw", 100 * K, 41);
    let img = dir.path(&format!("{fs_type}.img"));
    run_ok(
        client("mke2fs")
            .args(["-q", "-F", "-t", fs_type, "-d"])
            .arg(dir.path("root"))
            .arg(&img)
            .arg("16M"),
    );
    (img, reference)
}

/// The bytes of `path` in the file system image `img`, as debugfs dumps
/// them.
fn dumped(dir: &TempDir, img: &Path, path: &str) -> Vec<u8> {
    let out = dir.path("dumped");
    let _ = std::fs::remove_file(&out);
    run_ok(
        client("debugfs")
            .arg("-R")
            .arg(format!("dump {path} {}", out.display()))
            .arg(img),
    );
    std::fs::read(out).unwrap()
}

/// e2fsck finds nothing to fix in `img`.
fn assert_clean(img: &Path) {
    let out = run(client("e2fsck").args(["-f", "-n"]).arg(img));
    assert!(out.status.success(), "e2fsck: {out:?}");
}

/// What a client sees, read with plain reads (nbdsh): nbdkit 1.32's ext2
/// filter passes block status through to the file system image at the
/// file's offsets, so a copy that trusts it (nbdcopy, qemu-img convert)
/// would read holes that are not there.
fn read_fingerprint(uri: &str) -> String {
    nbdsh(
        uri,
        "import hashlib\n\
         size = h.get_size()\n\
         d = hashlib.sha256()\n\
         off = 0\n\
         while off < size:\n    n = min(1 << 20, size - off)\n    d.update(h.pread(n, off))\n    off += n\n\
         print(size, h.is_read_only(), d.hexdigest())",
    )
}

fn have_e2fs() -> bool {
    have_tools(&["mke2fs", "debugfs", "e2fsck", "nbdsh"])
}

#[test]
fn ext2_serves_a_file_inside_ext2_ext3_and_ext4() {
    if !have_e2fs() {
        return;
    }
    for fs_type in ["ext2", "ext3", "ext4"] {
        let dir = TempDir::new("ext2-types");
        let (img, reference) = file_system(&dir, fs_type, 2 * M + 3000);
        let s = start(&[
            "--filter=ext2",
            "file",
            path(&img),
            "ext2file=/disks/disk.raw",
        ]);
        assert_eq!(opens(&s.uri()).unwrap(), (2 * M + 3000).to_string());
        reads_match(
            &s.uri(),
            &reference,
            &[(0, 2 * M + 3000), (4095, 2), (M + 17, 300 * K)],
        );
    }
}

#[test]
fn ext2_writes_go_into_the_file_and_leave_the_file_system_consistent() {
    if !have_e2fs() || !have_tools(&["qemu-io"]) {
        return;
    }
    let dir = TempDir::new("ext2-write");
    let (img, reference) = file_system(&dir, "ext4", M);
    let other = dumped(&dir, &img, "/disks/other.raw");
    {
        let s = start(&[
            "--filter=ext2",
            "file",
            path(&img),
            "ext2file=/disks/disk.raw",
        ]);
        nbdhost_tests::qemu_io(
            &s.uri(),
            &[
                "write -P 0xcd 5000 100000",
                "write -z 600k 8k",
                "write -f -P 0x11 1040380 8196",
                "flush",
                "read -P 0xcd 5000 100000",
            ],
        );
    }
    let mut expected = std::fs::read(&reference).unwrap();
    expected[5000..105000].fill(0xcd);
    expected[600 * K..608 * K].fill(0);
    expected[1040380..].fill(0x11);
    assert!(dumped(&dir, &img, "/disks/disk.raw") == expected);
    assert!(dumped(&dir, &img, "/disks/other.raw") == other);
    assert_clean(&img);
}

#[test]
fn ext2_with_r_serves_the_file_read_only() {
    if !have_e2fs() {
        return;
    }
    let dir = TempDir::new("ext2-ro");
    let (img, _) = file_system(&dir, "ext4", 64 * K);
    let s = start(&[
        "-r",
        "--filter=ext2",
        "file",
        path(&img),
        "ext2file=/disks/disk.raw",
    ]);
    assert_eq!(nbdsh(&s.uri(), "print(h.is_read_only())"), "True\n");
}

#[test]
fn ext2_refuses_a_missing_file_and_a_directory() {
    if !have_e2fs() {
        return;
    }
    let dir = TempDir::new("ext2-missing");
    let (img, _) = file_system(&dir, "ext4", 64 * K);
    for (file, why) in [("/disks/nope", "namei"), ("/disks", "regular file")] {
        let s = start(&[
            "--filter=ext2",
            "file",
            path(&img),
            &format!("ext2file={file}"),
        ]);
        assert!(opens(&s.uri()).is_err(), "{file}");
        assert!(s.log_text().contains(why), "{file}: {}", s.log_text());
    }
}

#[test]
fn ext2file_must_be_absolute() {
    let out = run(Command::new(nbdhost_tests::nbdhost_bin()).args([
        "-f",
        "--filter=ext2",
        "memory",
        "1M",
        "ext2file=disks/disk.raw",
    ]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("absolute"),
        "{out:?}"
    );
}

#[test]
fn ext2file_exportname_serves_the_file_the_client_names_and_lists_none() {
    if !have_e2fs() {
        return;
    }
    let dir = TempDir::new("ext2-export");
    let (img, reference) = file_system(&dir, "ext4", 200 * K);
    let s = start(&["--filter=ext2", "file", path(&img), "ext2file=exportname"]);
    let named = |name: &str| {
        s.uri()
            .replacen("nbd+unix:///", &format!("nbd+unix:///{name}"), 1)
    };
    reads_match(&named("disks/disk.raw"), &reference, &[(0, 200 * K)]);
    assert_eq!(
        opens(&named("disks/other.raw")).unwrap(),
        (100 * K).to_string()
    );
    assert!(opens(&s.uri()).is_err(), "the empty name names no file");
    let list = run_ok(client("nbdinfo").args(["--list", "--json", &s.uri()]));
    assert!(
        list.contains("\"exports\": [\n  ]") || list.contains("\"exports\": []"),
        "{list}"
    );
}

/// `img` as partition 1 (from sector 2048) of a disk with an MBR
/// partition table, written by hand as the partition filter reads it.
fn partitioned(dir: &TempDir, img: &Path) -> PathBuf {
    let fs = std::fs::read(img).unwrap();
    let sectors = (fs.len() / 512) as u32;
    let mut disk = vec![0u8; 2048 * 512];
    let entry = &mut disk[446..462];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk.extend(fs);
    let p = dir.path("partitioned.img");
    std::fs::write(&p, disk).unwrap();
    p
}

/// nbdkit and nbdhost serve `args` alike (by plain reads), and what
/// nbdhost serves at `export` is `reference`.
fn same_ext2(args: &[&str], export: &str, reference: &Path) {
    let at = |uri: &str| uri.replacen("nbd+unix:///", &format!("nbd+unix:///{export}"), 1);
    if missing("(comparison with nbdkit)", &["nbdkit"]) {
        return;
    }
    twin::same_as_nbdkit(args, |uri| read_fingerprint(&at(uri)));
    let s = start(args);
    reads_match(
        &at(&s.uri()),
        reference,
        &[(0, std::fs::metadata(reference).unwrap().len() as usize)],
    );
}

#[test]
fn nbdkit_ext2_synopsis_file() {
    if !have_e2fs() {
        return;
    }
    let dir = TempDir::new("ext2-synopsis");
    let (img, reference) = file_system(&dir, "ext4", 300 * K);
    let fs = dir.path("fs.img");
    std::fs::rename(&img, &fs).unwrap();
    same_ext2(
        &[
            "--filter=ext2",
            "file",
            path(&fs),
            "ext2file=/disks/disk.raw",
        ],
        "",
        &reference,
    );
}

#[test]
fn nbdkit_ext2_synopsis_partition_exportname() {
    if !have_e2fs() {
        return;
    }
    let dir = TempDir::new("ext2-partition");
    let (img, reference) = file_system(&dir, "ext4", 300 * K);
    let fs = partitioned(&dir, &img);
    same_ext2(
        &[
            "--filter=ext2",
            "--filter=partition",
            "file",
            path(&fs),
            "partition=1",
            "ext2file=exportname",
        ],
        "disks/disk.raw",
        &reference,
    );
}

#[test]
fn nbdkit_ext2_description_partition_path() {
    if !have_e2fs() {
        return;
    }
    let dir = TempDir::new("ext2-partition-path");
    let (img, reference) = file_system(&dir, "ext4", 300 * K);
    let fs = partitioned(&dir, &img);
    same_ext2(
        &[
            "--filter=ext2",
            "--filter=partition",
            "file",
            path(&fs),
            "partition=1",
            "ext2file=/disks/disk.raw",
        ],
        "",
        &reference,
    );
}

#[test]
fn ext2_serves_one_connection_at_a_time() {
    if !have_e2fs() {
        return;
    }
    let dir = TempDir::new("ext2-serial");
    let (img, _) = file_system(&dir, "ext4", 64 * K);
    let s = start(&[
        "--filter=ext2",
        "file",
        path(&img),
        "ext2file=/disks/disk.raw",
    ]);
    // The first client says when it is connected, then holds on.
    let mut first = client("nbdsh")
        .args([
            "-u",
            &s.uri(),
            "-c",
            "import sys, time\nprint('open', flush=True)\ntime.sleep(2)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(first.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "open\n");
    let started = std::time::Instant::now();
    assert_eq!(opens(&s.uri()).unwrap(), (64 * K).to_string());
    let waited = started.elapsed();
    assert!(first.wait().unwrap().success());
    assert!(
        waited >= std::time::Duration::from_millis(1000),
        "the second connection was served after {waited:?}, while the first was open"
    );
}
