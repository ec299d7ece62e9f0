//! The luks filter against the tools that make and read LUKS disks: images
//! from `qemu-img create -f luks` and `cryptsetup luksFormat` /
//! `cryptsetup reencrypt`. The format is proven against references
//! nbdhost did not make: qemu's own luks driver (LUKS1), content that
//! cryptsetup encrypted, and the volume key cryptsetup reports (LUKS2).
//! The remaining tests (defaults, detached headers, passphrase sources,
//! stacks) build on that and round-trip through nbdhost.
//!
//! Key derivation is set cheap with each tool's iteration-time knob, except
//! in the one test that keeps cryptsetup's defaults.

use std::path::{Path, PathBuf};

use nbdhost_tests::{
    client, export_size, filter_arg, luks2_encrypted_in_place, nbdhost_bin, pattern, plugin,
    qemu_io, run, run_ok, sparse_file, Server, TempDir,
};

const PASS: &str = "correct horse battery";

/// A directory with the passphrase in a private file.
fn setup(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let pw = dir.path("pw");
    std::fs::write(&pw, PASS).unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (dir, pw)
}

fn luks_args(img: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        plugin("file").display().to_string(),
        format!("file={}", img.display()),
        filter_arg("luks"),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Serve `img` decrypted with the passphrase file `pw`.
fn serve(img: &Path, pw: &Path, extra: &[&str]) -> Server {
    let mut args = luks_args(img, extra);
    args.push(format!("passphrase=+{}", pw.display()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// Run nbdhost on `img` expecting it to refuse to start; returns its log.
fn refuses(img: &Path, extra: &[&str]) -> String {
    let dir = TempDir::new("refuse");
    let out = run(client(nbdhost_bin().to_str().unwrap())
        .args(["-f", "-v", "-U"])
        .arg(dir.path("s"))
        .args(luks_args(img, extra)));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "nbdhost started:\n{log}");
    assert!(
        !log.contains(PASS),
        "the passphrase reached the log:\n{log}"
    );
    log
}

/// A LUKS1 image made by qemu-img, with cheap key derivation.
fn qemu_luks_create(img: &Path, pw: &Path, size: &str) {
    run_ok(client("qemu-img").args([
        "create",
        "-f",
        "luks",
        "--object",
        &format!("secret,id=s0,file={}", pw.display()),
        "-o",
        "key-secret=s0,iter-time=10",
        img.to_str().unwrap(),
        size,
    ]));
}

/// qemu-io through qemu's own luks driver on the image file.
fn qemu_luks_io(img: &Path, pw: &Path, cmds: &[&str]) -> String {
    let mut c = client("qemu-io");
    c.args([
        "--object",
        &format!("secret,id=s0,file={}", pw.display()),
        "--image-opts",
    ]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(format!(
        "driver=luks,key-secret=s0,file.filename={}",
        img.display()
    )));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    out
}

fn cryptsetup(args: &[&str]) -> String {
    run_ok(client("cryptsetup").arg("-q").args(args))
}

/// LUKS2 with 4096-byte sectors and key derivation made cheap.
const CHEAP_LUKS2: &[&str] = &[
    "--type",
    "luks2",
    "--sector-size",
    "4096",
    "--pbkdf",
    "pbkdf2",
    "--iter-time",
    "10",
];

/// `cryptsetup luksFormat OPTS` of `img` with the passphrase file `pw`.
fn luks_format(img: &Path, pw: &Path, opts: &[&str]) {
    let mut args = vec!["luksFormat"];
    args.extend(opts);
    args.extend(["--key-file", pw.to_str().unwrap(), img.to_str().unwrap()]);
    cryptsetup(&args);
}

/// Writes at unaligned places through nbdhost, read back by qemu's luks
/// driver; then qemu writes and nbdhost reads.
fn interoperate_with_qemu(img: &Path, pw: &Path) {
    let s = serve(img, pw, &[]);
    qemu_io(
        &s.uri(),
        &[
            "write -P 0x22 1000 5000",
            "write -P 0x33 1M 1M",
            "write -P 0x44 3000001 3",
            // Zeroing writes encrypted zeroes, unaligned ends included.
            "write -z 1100000 70000",
        ],
    );
    assert!(s.stop().success());
    qemu_luks_io(
        img,
        pw,
        &[
            "read -P 0x22 1000 5000",
            "read -P 0x33 1M 51424",
            "read -P 0 1100000 70000",
            "read -P 0x33 1170000 927152",
            "read -P 0x44 3000001 3",
            "write -P 0x55 2M 65536",
            "write -P 0x66 777 223",
        ],
    );
    let s = serve(img, pw, &[]);
    qemu_io(
        &s.uri(),
        &[
            "read -P 0x55 2M 65536",
            "read -P 0x66 777 223",
            "read -P 0x22 1000 5000",
        ],
    );
    assert!(s.stop().success());
}

#[test]
fn luks1_from_qemu_img_round_trips_with_qemus_own_driver() {
    let (dir, pw) = setup("luks-qemu");
    let img = dir.path("q.img");
    qemu_luks_create(&img, &pw, "8M");
    interoperate_with_qemu(&img, &pw);
    // The whole disk, as qemu decrypts it and as nbdhost does.
    let by_qemu = dir.path("by-qemu.raw");
    run_ok(client("qemu-img").args([
        "convert",
        "--object",
        &format!("secret,id=s0,file={}", pw.display()),
        "--image-opts",
        &format!("driver=luks,key-secret=s0,file.filename={}", img.display()),
        "-O",
        "raw",
        by_qemu.to_str().unwrap(),
    ]));
    let s = serve(&img, &pw, &[]);
    let by_us = dir.path("by-nbdhost.raw");
    run_ok(client("nbdcopy").arg(s.uri()).arg(&by_us));
    assert!(
        std::fs::read(&by_qemu).unwrap() == std::fs::read(&by_us).unwrap(),
        "qemu-img convert and nbdhost decrypt the disk differently"
    );
    let out = run_ok(client("qemu-img").args([
        "compare",
        "--object",
        &format!("secret,id=s0,file={}", pw.display()),
        "--image-opts",
        &format!("driver=luks,key-secret=s0,file.filename={}", img.display()),
        &format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={}",
            s.socket.display()
        ),
    ]));
    assert!(out.contains("Images are identical"), "{out}");
    assert!(s.stop().success());
}

#[test]
fn cryptsetup_luks1_ciphers_and_hashes_interoperate_with_qemu() {
    for (cipher, bits, hash) in [
        ("aes-xts-plain64", "256", "sha256"),
        ("aes-xts-plain64", "512", "sha1"),
        ("aes-xts-plain", "512", "sha256"),
        ("aes-cbc-essiv:sha256", "256", "sha512"),
        ("aes-cbc-plain64", "128", "sha256"),
    ] {
        let (dir, pw) = setup("luks1-cs");
        let img = dir.path("c.img");
        sparse_file(&img, 8 << 20);
        luks_format(
            &img,
            &pw,
            &[
                "--type",
                "luks1",
                "--cipher",
                cipher,
                "--key-size",
                bits,
                "--hash",
                hash,
                "--iter-time",
                "10",
            ],
        );
        interoperate_with_qemu(&img, &pw);
    }
}

/// A file of known content, encrypted in place by cryptsetup.
fn reencrypted(dir: &TempDir, pw: &Path, sector: &str) -> (PathBuf, Vec<u8>) {
    let data = pattern(8 << 20, 42);
    let img = dir.path("r.img");
    luks2_encrypted_in_place(&img, &data, pw, &["--sector-size", sector]);
    (img, data)
}

#[test]
fn luks2_reencrypted_file_serves_exactly_its_old_content() {
    for sector in ["512", "2048", "4096"] {
        let (dir, pw) = setup("luks2-re");
        let (img, data) = reencrypted(&dir, &pw, sector);
        let s = serve(&img, &pw, &[]);
        let out = dir.path("out.img");
        run_ok(client("nbdcopy").arg(s.uri()).arg(&out));
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), 16 << 20);
        assert!(
            got[..data.len()] == data[..],
            "{sector}-byte sectors: content differs"
        );
        assert!(s.stop().success());
    }
}

/// Decrypt `len` bytes at data offset `off` of a LUKS2 aes-xts-plain64
/// image with the volume key file, using Python's `cryptography`, and
/// return them.
fn decrypt_independently(
    img: &Path,
    key: &Path,
    data_offset: u64,
    sector: u64,
    off: u64,
    len: u64,
) -> Vec<u8> {
    let script = format!(
        r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = open({key:?}, 'rb').read()
out = b''
with open({img:?}, 'rb') as f:
    for s in range({off} // {sector}, ({off} + {len} + {sector} - 1) // {sector}):
        f.seek({data_offset} + s * {sector})
        ct = f.read({sector})
        iv = (s * {sector} // 512).to_bytes(16, 'little')
        d = Cipher(algorithms.AES(key), modes.XTS(iv)).decryptor()
        out += d.update(ct) + d.finalize()
start = {off} % {sector}
sys.stdout.buffer.write(out[start:start + {len}])
"#,
        key = key.display().to_string(),
        img = img.display().to_string(),
    );
    let out = run(client("/usr/bin/python3").args(["-c", &script]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn luks2_writes_decrypt_with_the_volume_key_cryptsetup_reports() {
    for kdf in [
        &["--pbkdf", "argon2id", "--pbkdf-memory", "32768"][..],
        &["--pbkdf", "argon2i", "--pbkdf-memory", "16384"][..],
        &["--pbkdf", "pbkdf2", "--hash", "sha512"][..],
    ] {
        let (dir, pw) = setup("luks2-vk");
        let img = dir.path("c.img");
        sparse_file(&img, 24 << 20);
        let mut opts = vec![
            "--type",
            "luks2",
            "--sector-size",
            "4096",
            "--iter-time",
            "100",
        ];
        opts.extend(kdf);
        luks_format(&img, &pw, &opts);

        let key = dir.path("vk");
        cryptsetup(&[
            "luksDump",
            "--dump-volume-key",
            "--volume-key-file",
            key.to_str().unwrap(),
            "--key-file",
            pw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        // The write covers sectors 30..=103 partially at both ends: what
        // those sectors held before must survive the read-modify-write.
        let (off, len) = (123_457u64, 300_000u64);
        let (first, end) = (off / 4096 * 4096, (off + len).div_ceil(4096) * 4096);
        let plain = |o, l| decrypt_independently(&img, &key, 16 << 20, 4096, o, l);
        let mut want = plain(first, end - first);
        let data = pattern(len as usize, 7);
        want[(off - first) as usize..][..data.len()].copy_from_slice(&data);

        let s = serve(&img, &pw, &[]);
        let blob = dir.path("blob");
        std::fs::write(&blob, &data).unwrap();
        nbdhost_tests::nbdsh(
            &s.uri(),
            &format!(
                "h.pwrite(open({:?}, 'rb').read(), {off})\nh.flush()",
                blob.display().to_string()
            ),
        );
        assert!(s.stop().success());
        assert!(
            plain(first, end - first) == want,
            "{kdf:?}: cryptsetup's volume key does not decrypt what we wrote"
        );
    }
}

#[test]
fn luks2_with_cryptsetup_defaults_is_served() {
    let (dir, pw) = setup("luks2-def");
    let img = dir.path("d.img");
    sparse_file(&img, 32 << 20);
    luks_format(&img, &pw, &["--type", "luks2"]);
    let dump = cryptsetup(&["luksDump", img.to_str().unwrap()]);
    assert!(
        dump.contains("argon2id") && dump.contains("sector: 4096"),
        "{dump}"
    );
    let s = serve(&img, &pw, &[]);
    let info = export_size(&s.uri());
    assert_eq!(info.trim(), (16u64 << 20).to_string());
    // Holes in the encrypted file are noise once decrypted, not zeroes.
    let map = run_ok(client("nbdinfo").arg("--map").arg(s.uri()));
    assert_eq!(map.trim().lines().count(), 1, "{map}");
    assert!(map.contains("0  data"), "{map}");
    qemu_io(
        &s.uri(),
        &["write -P 0x77 4095 8194", "read -P 0x77 4095 8194"],
    );
    assert!(s.stop().success());
}

#[test]
fn detached_headers_keyslots_and_key_files() {
    let (dir, pw) = setup("luks2-hdr");
    let img = dir.path("data.img");
    let hdr = dir.path("hdr.img");
    sparse_file(&img, 8 << 20);
    luks_format(
        &img,
        &pw,
        &[
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--iter-time",
            "10",
            "--header",
            hdr.to_str().unwrap(),
        ],
    );
    // A binary key file, with the bytes a text reader would mangle.
    let key = dir.path("key.bin");
    let mut k = pattern(512, 3);
    k[10] = 0;
    k[11] = b'\n';
    std::fs::write(&key, &k).unwrap();
    cryptsetup(&[
        "luksAddKey",
        "--pbkdf",
        "pbkdf2",
        "--iter-time",
        "10",
        "--key-slot",
        "3",
        "--key-file",
        pw.to_str().unwrap(),
        hdr.to_str().unwrap(),
        key.to_str().unwrap(),
    ]);
    let header = format!("header={}", hdr.display());
    let key_file = format!("key-file={}", key.display());
    let s = serve(&img, &pw, &[&header]);
    qemu_io(&s.uri(), &["write -P 0x12 0 1M"]);
    assert!(s.stop().success());
    let args = luks_args(&img, &[&header, &key_file, "keyslot=3"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::start(&args);
    qemu_io(&s.uri(), &["read -P 0x12 0 1M"]);
    assert!(s.stop().success());
    // The header is not on the data disk, so the data starts at 0.
    assert_ne!(std::fs::read(&img).unwrap()[..6], *b"LUKS\xba\xbe");

    let log = refuses(&img, &[&header, &key_file, "keyslot=0"]);
    assert!(
        log.contains("wrong passphrase") && log.contains("tried 0"),
        "{log}"
    );
    let log = refuses(&img, &[&header, &key_file, "keyslot=5"]);
    assert!(log.contains("keyslot 5 is not an active keyslot"), "{log}");
}

/// `passphrase=-FD` as a script would use it: the key arrives on an
/// inherited descriptor, and `--run` drives a client against the result.
#[test]
fn passphrase_from_a_file_descriptor() {
    let (dir, pw) = setup("luks-fd");
    let img = dir.path("c.img");
    sparse_file(&img, 24 << 20);
    luks_format(&img, &pw, CHEAP_LUKS2);
    let script = format!(
        "exec \"$0\" -U - {} passphrase=-3 --run 'qemu-io -f raw -c \"write -P 0x3d 1 4096\" -c \"read -P 0x3d 1 4096\" \"$uri\"' 3<{}",
        luks_args(&img, &[]).join(" "),
        pw.display()
    );
    let out = run_ok(client("/bin/sh").args(["-c", &script]).arg(nbdhost_bin()));
    assert!(out.contains("read 4096/4096 bytes at offset 1"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// `passphrase=-` prompts on the terminal; script(1) gives nbdhost one
/// and types the passphrase into it.
#[test]
fn passphrase_prompted_on_the_terminal() {
    let (dir, pw) = setup("luks-tty");
    let img = dir.path("c.img");
    sparse_file(&img, 24 << 20);
    luks_format(&img, &pw, CHEAP_LUKS2);
    let cmd = format!(
        "{} -U - {} passphrase=- --run 'nbdinfo --size \"$uri\"'",
        nbdhost_bin().display(),
        luks_args(&img, &[]).join(" ")
    );
    let mut script = client("script");
    script.args(["-qec", &cmd, "/dev/null"]);
    let mut child = script
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{PASS}\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("Password:"), "{out}");
    assert!(out.contains(&(8u64 << 20).to_string()), "{out}");
}

#[test]
fn start_up_refusals_name_the_problem_and_never_the_secret() {
    let (dir, pw) = setup("luks-refuse");
    let img = dir.path("c.img");
    qemu_luks_create(&img, &pw, "4M");
    let wrong = format!("passphrase={PASS} but wrong");
    let log = refuses(&img, &[&wrong]);
    assert!(log.contains("wrong passphrase"), "{log}");
    assert!(
        !log.contains("but wrong"),
        "the passphrase reached the log:\n{log}"
    );

    let log = refuses(&img, &[]);
    assert!(
        log.contains("passphrase= or key-file= is required"),
        "{log}"
    );

    let plain = dir.path("plain.img");
    sparse_file(&plain, 4 << 20);
    let log = refuses(&plain, &[&format!("passphrase={PASS}")]);
    assert!(log.contains("not a LUKS disk"), "{log}");

    // The same header naming a cipher nbdhost does not implement.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[8..40].fill(0);
    bytes[8..15].copy_from_slice(b"serpent");
    let other = dir.path("serpent.img");
    std::fs::write(&other, &bytes).unwrap();
    let log = refuses(&other, &[&format!("passphrase={PASS}")]);
    assert!(
        log.contains("cipher serpent-xts-plain64 is not supported"),
        "{log}"
    );

    // A LUKS2 reencryption that was started and not finished.
    let r = dir.path("r.img");
    sparse_file(&r, 24 << 20);
    luks_format(
        &r,
        &pw,
        &["--type", "luks2", "--pbkdf", "pbkdf2", "--iter-time", "10"],
    );
    cryptsetup(&[
        "reencrypt",
        "--init-only",
        "--pbkdf",
        "pbkdf2",
        "--iter-time",
        "10",
        "--key-file",
        pw.to_str().unwrap(),
        r.to_str().unwrap(),
    ]);
    let log = refuses(&r, &[&format!("passphrase={PASS}")]);
    assert!(log.contains("reencrypt"), "{log}");
}

/// Unaligned writes racing on shared sectors from one client with many
/// requests in flight: each must survive the others' read-modify-write.
/// The delay filter below luks holds every read, so without the lock the
/// read-modify-write cycles would overlap and undo each other.
#[test]
fn concurrent_unaligned_writes_all_land() {
    let (dir, pw) = setup("luks-race");
    let img = dir.path("c.img");
    sparse_file(&img, 24 << 20);
    luks_format(&img, &pw, CHEAP_LUKS2);
    let delay = filter_arg("delay");
    let s = serve(&img, &pw, &[&delay, "rdelay=1ms"]);
    let out = nbdhost_tests::nbdsh(
        &s.uri(),
        r#"
import random
random.seed(5)
spans = []
off = 100
while off < 2_000_000:
    n = random.randrange(1, 3000)
    spans.append((off, bytes([len(spans) % 251 + 1]) * n))
    off += n
random.shuffle(spans)
cookies = [h.aio_pwrite(data, o) for o, data in spans]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
for o, data in spans:
    assert h.pread(len(data), o) == data, o
print("ok", len(spans))
"#,
    );
    assert!(out.starts_with("ok "), "{out}");
    assert!(s.stop().success());
}

/// Build an MBR disk: partition 1 (8 MiB of `p1`) at 1 MiB, partition 2
/// (`p2`) right after it.
fn mbr_disk(path: &Path, p1: &[u8], p2: &[u8]) -> (u64, u64) {
    let (start1, start2) = (1u64 << 20, (1u64 << 20) + p1.len() as u64);
    let mut disk = vec![0u8; start2 as usize + p2.len()];
    for (i, (start, len)) in [(start1, p1.len()), (start2, p2.len())].iter().enumerate() {
        let e = 446 + 16 * i;
        disk[e + 4] = 0x83;
        disk[e + 8..e + 12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        disk[e + 12..e + 16].copy_from_slice(&((*len / 512) as u32).to_le_bytes());
    }
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk[start1 as usize..start2 as usize].copy_from_slice(p1);
    disk[start2 as usize..].copy_from_slice(p2);
    std::fs::write(path, disk).unwrap();
    (start1, start2)
}

#[test]
fn luks_over_partition_over_file() {
    let (dir, pw) = setup("luks-part");
    let inner = dir.path("p2.img");
    sparse_file(&inner, 16 << 20);
    luks_format(&inner, &pw, &["--type", "luks1", "--iter-time", "10"]);
    let p1 = pattern(8 << 20, 9);
    let disk = dir.path("disk.img");
    let (_, start2) = mbr_disk(&disk, &p1, &std::fs::read(&inner).unwrap());
    let part = filter_arg("partition");
    let s = serve(&disk, &pw, &[&part, "partition=2"]);
    let size = export_size(&s.uri());
    assert_eq!(size.trim(), ((16u64 << 20) - (2 << 20)).to_string());
    qemu_io(
        &s.uri(),
        &["write -P 0x2c 3333 70000", "write -P 0x2d 10M 1M"],
    );
    assert!(s.stop().success());

    // Partition 2, cut out of the disk, is a LUKS volume qemu decrypts.
    let bytes = std::fs::read(&disk).unwrap();
    let out = dir.path("p2-out.img");
    std::fs::write(&out, &bytes[start2 as usize..]).unwrap();
    qemu_luks_io(
        &out,
        &pw,
        &["read -P 0x2c 3333 70000", "read -P 0x2d 10M 1M"],
    );
    assert!(
        bytes[1 << 20..start2 as usize] == p1[..],
        "partition 1 changed"
    );
}

#[test]
fn cow_over_luks_keeps_the_encrypted_base_unchanged() {
    let (dir, pw) = setup("luks-cow");
    let img = dir.path("base.img");
    qemu_luks_create(&img, &pw, "8M");
    qemu_luks_io(&img, &pw, &["write -P 0x31 0 8M"]);
    let before = std::fs::read(&img).unwrap();
    let cow = filter_arg("cow");
    let mut args = vec![cow];
    args.extend(luks_args(&img, &[&format!("passphrase=+{}", pw.display())]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::start(&args);
    qemu_io(&s.uri(), &["write -P 0x32 1000 5000"]);
    // A second connection sees the change (the overlay is shared) and the
    // base's own data around it.
    qemu_io(
        &s.uri(),
        &[
            "read -P 0x32 1000 5000",
            "read -P 0x31 0 1000",
            "read -P 0x31 6000 1M",
        ],
    );
    assert!(s.stop().success());
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the base was written"
    );
}

#[test]
fn log_above_and_stats_below_luks_see_their_own_requests() {
    let (dir, pw) = setup("luks-obs");
    let img = dir.path("c.img");
    sparse_file(&img, 24 << 20);
    luks_format(&img, &pw, CHEAP_LUKS2);
    let (log, stats) = (dir.path("log"), dir.path("stats"));
    // Options may come before the plugin, parameters only after it.
    let mut args = vec![filter_arg("log")];
    args.extend(luks_args(
        &img,
        &[
            &format!("logfile={}", log.display()),
            &filter_arg("stats"),
            &format!("statsfile={}", stats.display()),
            &format!("passphrase=+{}", pw.display()),
        ],
    ));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::start(&args);
    qemu_io(
        &s.uri(),
        &["write -P 0x41 100 1000", "read -P 0x41 100 1000"],
    );
    assert!(s.stop().success());
    // The client's unaligned write, as the client sent it...
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(" Write ") && l.contains("offset=0x64 count=0x3e8")),
        "{log}"
    );
    // ...became one whole encrypted sector below luks.
    let stats = std::fs::read_to_string(&stats).unwrap();
    let write = stats
        .lines()
        .find(|l| l.starts_with("write: "))
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(
        write.starts_with("write: 1 ops, ") && write.contains(" 4.00 KiB, "),
        "{stats}"
    );
}

/// LUKS2 keeps two header copies; with the primary damaged the secondary
/// serves, for start-up and for every connection's header check.
#[test]
fn a_damaged_primary_luks2_header_falls_back_to_the_secondary() {
    let (dir, pw) = setup("luks-2nd");
    let img = dir.path("c.img");
    sparse_file(&img, 24 << 20);
    luks_format(&img, &pw, CHEAP_LUKS2);
    let s = serve(&img, &pw, &[]);
    qemu_io(&s.uri(), &["write -P 0x5e 0 64k"]);
    assert!(s.stop().success());
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[5000] ^= 0xff; // inside the primary's JSON area
    std::fs::write(&img, &bytes).unwrap();
    let s = serve(&img, &pw, &[]);
    qemu_io(&s.uri(), &["read -P 0x5e 0 64k"]);
    qemu_io(&s.uri(), &["read -P 0x5e 0 64k"]);
    assert!(s.stop().success());
}
