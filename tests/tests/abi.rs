//! Third-party plugins and filters written in C, built with `cc` against
//! the installed headers only, and loaded by the real server: the example
//! in nbdhost-plugin(3) as printed, the examples in plugin-api/examples/
//! built by their documented command line (the `cmem` RAM disk, the
//! shorter old-ABI `oldabi`, and `future`, a later major ABI, refused), a
//! newer minor ABI (accepted), broken plugin structs and shared objects
//! that are not plugins (refused with a reason), a C filter stacked on a
//! Rust plugin, the thread models, and which connection the host's
//! `export_name` and `peer_name` answer for in each callback.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbdhost_tests::{
    build_c, client, export_size, free_port, nbdhost_bin, nbdsh, root, run, run_ok, serial_plugin,
    Server, TempDir,
};

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
    let so = build_c(&dir, "exampleplugin", &man_page_example(&dir), &[]);
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
fn a_filter_s_prepare_sees_the_layer_below_and_can_refuse_the_open() {
    let dir = TempDir::new("prepare");
    let so = build_c(&dir, "guardfilter", &root().join("tests/c/guard.c"), &[]);
    let filter = format!("--filter={}", so.display());
    let s = Server::start(&[&filter, "memory", "4M", "guard-min=2M"]);
    assert_eq!(nbdhost_tests::export_size(&s.uri()), "4194304");
    assert!(s.stop().success());

    let s = Server::start(&[&filter, "memory", "1M", "guard-min=2M"]);
    let out = nbdhost_tests::run(client("nbdinfo").arg("--size").arg(s.uri()));
    assert!(!out.status.success(), "a 1 MiB export was served");
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");
    assert!(
        log.contains("guard: the export has 1048576 bytes, fewer than 2097152"),
        "{log}"
    );
}

#[test]
fn a_c_filter_stacks_on_a_rust_plugin() {
    let dir = TempDir::new("cfilter");
    let so = build_c(&dir, "invertfilter", &root().join("tests/c/invert.c"), &[]);
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
    let so = serial_plugin(&dir, "SERIALIZE_ALL_REQUESTS");
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
    let so = serial_plugin(&dir, "SERIALIZE_CONNECTIONS");
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

// ---------------------------------------------------------------------------
// The example plugins shipped in plugin-api/examples/, built exactly as
// their headers say a third party builds them.

/// `cc -shared -fPIC -Wall -Werror -I plugin-api/include -o lib<name>plugin.so
/// plugin-api/examples/<file>`.
fn build_example(dir: &TempDir, name: &str, file: &str) -> PathBuf {
    let src = root().join("plugin-api/examples").join(file);
    assert!(
        src.exists(),
        "{} is missing: the example plugins are part of the plugin API",
        src.display()
    );
    let out = dir.path(&format!("lib{name}plugin.so"));
    run_ok(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-Wall", "-Werror", "-I"])
            .arg(root().join("plugin-api/include"))
            .arg("-o")
            .arg(&out)
            .arg(&src),
    );
    out
}

/// Start `nbdhost` on `plugin` as a one-shot with `--run true`, so that a
/// plugin wrongly accepted makes it exit instead of serving forever.
fn try_start(dir: &TempDir, plugin: &Path) -> (Option<i32>, String) {
    let out = run(Command::new(nbdhost_bin())
        .arg("-U")
        .arg(dir.path("refused.sock"))
        .arg(plugin)
        .args(["--run", "true"]));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cmem_example_is_a_ram_disk() {
    let dir = TempDir::new("cmem");
    let so = build_example(&dir, "cmem", "cplugin.c");
    let dump = run_ok(Command::new(nbdhost_bin()).arg("--dump-plugin").arg(&so));
    assert!(dump.lines().any(|l| l == "name=cmem"), "{dump}");

    let s = Server::start(&[so.to_str().unwrap(), "size=1M"]);
    let out = run_ok(
        client("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 4k 64k",
                "-c",
                "read -P 0x5a 4k 64k",
                "-c",
                "read -P 0 0 4k",
                "-c",
                "write -P 0xa5 1020k 4k",
                "-c",
                "read -P 0xa5 1020k 4k",
            ])
            .arg(s.uri()),
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    assert!(out.contains("read 4096/4096"), "{out}");
    // One disk for every connection; trim and flush are served.
    let out = nbdsh(
        &s.uri(),
        "print(list(h.pread(2, 4095)), list(h.pread(1, 69631)), h.can_trim(), h.can_flush())\n\
         h.trim(4096, 8192); h.flush(); print(h.pread(4096, 8192) == bytes(4096))",
    );
    assert_eq!(out.trim(), "[0, 90] [90] True True\nTrue");
    let size = export_size(&s.uri());
    assert_eq!(size.trim(), "1048576");
    let info = run_ok(client("nbdinfo").arg(s.uri()));
    assert!(info.contains("export-size: 1048576"), "{info}");
    assert!(info.contains("is_read_only: false"), "{info}");
    // Past the end is refused by the server, not the plugin.
    let out = nbdsh(
        &s.uri(),
        "try:\n    h.pread(8, 1048572)\n    print('read')\nexcept nbd.Error as e:\n    print(e.errno)",
    );
    assert_eq!(out.trim(), "EINVAL");
    assert!(s.stop().success());

    // A bare size sets the magic config key.
    let out = run_ok(
        Command::new(nbdhost_bin())
            .args(["-U", "-"])
            .arg(&so)
            .args(["2M", "--run", "nbdinfo --size \"$uri\""]),
    );
    assert_eq!(out.trim(), "2097152");
}

#[test]
fn old_abi_example_serves_offsets_read_only() {
    let dir = TempDir::new("coldex");
    let so = build_example(&dir, "oldabi", "cplugin-old.c");
    let dump = run_ok(Command::new(nbdhost_bin()).arg("--dump-plugin").arg(&so));
    assert!(dump.lines().any(|l| l == "name=oldabi"), "{dump}");
    let size: usize = dump
        .lines()
        .find_map(|l| l.strip_prefix("struct_size="))
        .unwrap_or_else(|| panic!("no struct_size in {dump}"))
        .parse()
        .unwrap();
    assert!(
        size < std::mem::size_of::<nbdhost_plugin_api::abi::Plugin>(),
        "the old struct is shorter: {dump}"
    );

    let s = Server::start(&[so.to_str().unwrap()]);
    let out = nbdsh(
        &s.uri(),
        "print(list(h.pread(4, 254)), list(h.pread(3, 4095)), \
         h.pread(256, 65536 + 256) == bytes(range(256)), h.is_read_only(), h.can_flush())",
    );
    assert_eq!(out.trim(), "[254, 255, 0, 1] [255, 0, 1] True True False");
    // Every callback after pread is absent: writing is refused.
    let out = nbdsh(
        &s.uri(),
        "try:\n    h.pwrite(b'x', 0)\n    print('written')\nexcept nbd.Error as e:\n    print('refused')\nprint(list(h.pread(1, 120)))",
    );
    assert_eq!(out.trim(), "refused\n[120]", "and nothing was written");
    let out = run(client("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 512"])
        .arg(s.uri()));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("wrote 512/512"), "{text}");
    assert!(s.stop().success());
}

#[test]
fn future_abi_example_is_refused_at_start() {
    let dir = TempDir::new("cfutex");
    let so = build_example(&dir, "future", "cplugin-future.c");
    let (code, err) = try_start(&dir, &so);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("ABI 2.0") && err.contains("this nbdhost supports ABI 1.x"),
        "the message names the ABI mismatch: {err}"
    );
    assert!(
        err.contains(so.to_str().unwrap()) || err.contains("future"),
        "{err}"
    );
    assert!(!dir.path("refused.sock").exists(), "nothing was served");
}

#[test]
fn a_shared_object_without_the_entry_point_is_refused() {
    let dir = TempDir::new("cempty");
    let src = dir.path("empty.c");
    std::fs::write(&src, "").unwrap();
    let so = dir.path("libemptyplugin.so");
    run_ok(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
            .arg(&so)
            .arg(&src),
    );
    let (code, err) = try_start(&dir, &so);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not an nbdhost plugin") && err.contains("nbdhost_plugin_entry"),
        "names the missing symbol: {err}"
    );
    let out = run(Command::new(nbdhost_bin()).arg("--dump-plugin").arg(&so));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nbdhost_plugin_entry"));
}

// ---------------------------------------------------------------------------
// The edges of the contract: what the header promises about size, version
// and required fields, probed with variants of one small C plugin.

const VARIANT_C: &str = r#"
#include <stddef.h>
#include <string.h>
#include <nbdhost-plugin.h>
#ifndef ABI
#define ABI NBDHOST_ABI_VERSION
#endif
#ifndef SIZE
#define SIZE sizeof (struct nbdhost_plugin)
#endif
#ifndef NAME
#define NAME "variant"
#endif
#ifndef MODEL
#define MODEL NBDHOST_THREAD_MODEL_PARALLEL
#endif
/* Room for callbacks a newer minor ABI might append. */
struct padded { struct nbdhost_plugin p; void *future[8]; };
static void *v_open (int ro) { return (void *) 1; }
static int64_t v_get_size (void *h) { return 65536; }
static int
v_pread (void *h, void *buf, uint64_t n, uint64_t o, uint32_t f)
{
  memset (buf, 0x42, n);
  return 0;
}
static const struct padded plugin = {
  {
    .struct_size = SIZE,
    .abi_version = ABI,
    .thread_model = MODEL,
    .name = NAME,
    .open = v_open,
    .get_size = v_get_size,
    .pread = v_pread,
  },
  { 0 },
};
const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *host)
{
#ifdef RETURN_NULL
  (void) plugin;
  return NULL;
#else
  return &plugin.p;
#endif
}
"#;

fn variant(dir: &TempDir, name: &str, defines: &[&str]) -> PathBuf {
    let src = dir.path("variant.c");
    if !src.exists() {
        std::fs::write(&src, VARIANT_C).unwrap();
    }
    build_c(dir, name, &src, defines)
}

#[test]
fn a_newer_minor_abi_with_a_longer_struct_is_accepted() {
    let dir = TempDir::new("cminor");
    let so = variant(
        &dir,
        "minorplugin",
        &[
            "-DABI=((NBDHOST_ABI_MAJOR << 16) | 0xffff)",
            "-DSIZE=(sizeof (struct nbdhost_plugin) + 8 * sizeof (void *))",
        ],
    );
    let dump = run_ok(Command::new(nbdhost_bin()).arg("--dump-plugin").arg(&so));
    assert!(dump.contains("name=variant"), "{dump}");
    let s = Server::start(&[so.to_str().unwrap()]);
    let out = nbdsh(&s.uri(), "print(list(h.pread(2, 100)), h.get_size())");
    assert_eq!(out.trim(), "[66, 66] 65536");
    assert!(s.stop().success());
}

#[test]
fn broken_plugin_structs_are_refused_with_a_reason() {
    let dir = TempDir::new("cbroken");
    let cases: [(&str, &[&str], &str); 6] = [
        ("nullplugin", &["-DRETURN_NULL"], "returned NULL"),
        ("tinyplugin", &["-DSIZE=16"], "too small"),
        ("nonameplugin", &["-DNAME=NULL"], "no name"),
        ("emptynameplugin", &["-DNAME=\"\""], "no name"),
        ("modelplugin", &["-DMODEL=7"], "thread model"),
        ("abi0plugin", &["-DABI=0"], "supports ABI 1.x"),
    ];
    for (name, defines, reason) in cases {
        let so = variant(&dir, name, defines);
        let (code, err) = try_start(&dir, &so);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(err.contains(reason), "{name}: wanted {reason:?} in {err}");
    }
}

/// A plugin whose struct ends exactly where readable memory ends: any read
/// past `struct_size` faults. `-DCUT=<field>` cuts the struct after that
/// field.
const GUARDED_C: &str = r#"
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <nbdhost-plugin.h>

static void *g_open (int ro) { return (void *) 1; }
static int64_t g_get_size (void *h) { return 1 << 20; }
static int
g_pread (void *h, void *buf, uint64_t n, uint64_t o, uint32_t f)
{
  for (uint64_t i = 0; i < n; i++)
    ((unsigned char *) buf)[i] = (o + i) & 0xff;
  return 0;
}

static const struct nbdhost_plugin tmpl = {
  .abi_version = NBDHOST_ABI_VERSION,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "guarded",
  .open = g_open,
  .get_size = g_get_size,
  .pread = g_pread,
};

const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *host)
{
  size_t len = offsetof (struct nbdhost_plugin, CUT) + sizeof (void *);
  long pg = sysconf (_SC_PAGESIZE);
  unsigned char *m = mmap (NULL, 2 * pg, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED || mprotect (m + pg, pg, PROT_NONE) == -1)
    return NULL;
  unsigned char *p = m + pg - len;
  memcpy (p, &tmpl, len);
  ((struct nbdhost_plugin *) p)->struct_size = len;
  mprotect (m, pg, PROT_READ);
  return (const struct nbdhost_plugin *) p;
}
"#;

#[test]
fn nothing_past_struct_size_is_read() {
    let dir = TempDir::new("cguard");
    let src = dir.path("guarded.c");
    std::fs::write(&src, GUARDED_C).unwrap();

    // Cut after pread: a read-only disk, whatever the client asks.
    let so = build_c(&dir, "guardedplugin", &src, &["-DCUT=pread"]);
    let dump = run_ok(Command::new(nbdhost_bin()).arg("--dump-plugin").arg(&so));
    assert!(dump.contains("name=guarded"), "{dump}");
    let s = Server::start(&[so.to_str().unwrap()]);
    let out = nbdsh(
        &s.uri(),
        "print(list(h.pread(3, 4095)), h.is_read_only(), h.can_flush(), h.can_trim(),\n\
         \x20     h.can_zero(), h.can_cache(), h.can_fua(), h.can_multi_conn())\n\
         for name, call in [('pwrite', lambda: h.pwrite(b'x', 0)), ('flush', h.flush),\n\
         \x20                  ('trim', lambda: h.trim(512, 0)), ('zero', lambda: h.zero(512, 0))]:\n\
         \x20   try:\n\
         \x20       call()\n\
         \x20       print(name, 'served')\n\
         \x20   except nbd.Error:\n\
         \x20       pass\n\
         print(h.pread(8, 1000) == bytes(x & 255 for x in range(1000, 1008)))",
    );
    assert_eq!(
        out.trim(),
        "[255, 0, 1] True False False False False False False\nTrue",
        "{}",
        s.log_text()
    );
    // qemu-img probes block status and more.
    let info = run_ok(
        client("qemu-img")
            .args(["map", "--output=json"])
            .arg(s.uri()),
    );
    assert!(info.contains("\"length\": 1048576"), "{info}");
    let (st, log) = s.stop_with_log();
    assert!(st.success(), "{log}");

    // Cut at the shortest struct the server accepts (no callbacks at all):
    // it loads, and a client is refused cleanly.
    let so = build_c(&dir, "minimalplugin", &src, &["-DCUT=magic_config_key"]);
    let dump = run_ok(Command::new(nbdhost_bin()).arg("--dump-plugin").arg(&so));
    assert!(dump.contains("name=guarded"), "{dump}");
    let mut s = Server::start(&[so.to_str().unwrap()]);
    let out = run(client("nbdinfo").arg(s.uri()));
    assert!(!out.status.success());
    assert!(s.is_running(), "{}", s.log_text());
    assert!(s.stop().success());
}

/// The `where` C filter (`tests/c/where.c`), as a `--filter=` option.
fn where_filter(dir: &TempDir) -> String {
    let so = build_c(dir, "wherefilter", &root().join("tests/c/where.c"), &[]);
    format!("--filter={}", so.display())
}

/// The export description, which the `where` filter makes name the local
/// file the layer below serves.
fn description(uri: &str) -> String {
    nbdsh(uri, "print(h.get_export_description())")
        .trim()
        .to_owned()
}

#[test]
fn a_filter_learns_the_local_file_the_file_plugin_serves() {
    let dir = TempDir::new("where");
    let filter = where_filter(&dir);
    let disk = dir.path("disk.img");
    nbdhost_tests::sparse_file(&disk, 1 << 20);
    let file = nbdhost_tests::plugin("file");
    let s = Server::start(&[&filter, file.to_str().unwrap(), disk.to_str().unwrap()]);
    assert_eq!(
        description(&s.uri()),
        format!("local file: {}", disk.display())
    );
    assert!(s.stop().success());
}

#[test]
fn layers_that_serve_no_local_file_say_none() {
    let dir = TempDir::new("where-none");
    let filter = where_filter(&dir);
    let s = Server::start(&[&filter, "memory", "1M"]);
    assert_eq!(description(&s.uri()), "local file: none");
    assert!(s.stop().success());

    // The cow filter keeps writes in its overlay: the file is not what is
    // served.
    let disk = dir.path("disk.img");
    nbdhost_tests::sparse_file(&disk, 1 << 20);
    let cow = nbdhost_tests::filter_arg("cow");
    let s = Server::start(&[&filter, &cow, "file", disk.to_str().unwrap()]);
    assert_eq!(description(&s.uri()), "local file: none");
    assert!(s.stop().success());
}

#[test]
fn finalize_runs_once_per_connection_with_the_layer_below_still_open() {
    let dir = TempDir::new("finalize");
    let filter = where_filter(&dir);
    let record = dir.path("finalized");
    let arg = format!("finalized={}", record.display());
    let s = Server::start(&[&filter, "memory", "3M", &arg]);
    for _ in 0..2 {
        assert_eq!(export_size(&s.uri()), "3145728");
    }
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&record).unwrap();
    assert_eq!(text, "finalize 3145728\nfinalize 3145728\n");
}

/// The `whoami` C plugin (`tests/c/whoami.c`), whose reads say which
/// export its open and the read itself were made for, and the peer.
fn whoami_plugin(dir: &TempDir) -> PathBuf {
    build_c(dir, "whoamiplugin", &root().join("tests/c/whoami.c"), &[])
}

/// What a read of the `whoami` plugin says, through the export at `uri`.
fn whoami(uri: &str) -> String {
    nbdsh(uri, "print(h.pread(256, 0).rstrip(b'\\0').decode())")
        .trim()
        .to_owned()
}

#[test]
fn a_c_plugin_s_pread_sees_its_connection_s_export_name_and_peer() {
    let dir = TempDir::new("whoami");
    let so = whoami_plugin(&dir);

    let s = Server::start(&[so.to_str().unwrap()]);
    let named = format!("nbd+unix:///disk1?socket={}", s.socket.display());
    assert_eq!(whoami(&named), "open=disk1 pread=disk1 peer=unix");
    assert_eq!(whoami(&s.uri()), "open= pread= peer=unix");
    assert!(s.stop().success());

    let port = free_port();
    let s = Server::start_tcp(
        &[
            "-p",
            &port.to_string(),
            "-i",
            "127.0.0.1",
            so.to_str().unwrap(),
        ],
        port,
    );
    let uri = format!("nbd://127.0.0.1:{port}/disk2");
    assert_eq!(whoami(&uri), "open=disk2 pread=disk2 peer=127.0.0.1");
    assert!(s.stop().success());
}

#[test]
fn a_filter_s_renamed_next_open_shows_the_new_name_to_the_plugin_s_open_and_pread() {
    let dir = TempDir::new("rename");
    let plugin = whoami_plugin(&dir);
    let filter = build_c(&dir, "renamefilter", &root().join("tests/c/rename.c"), &[]);
    let filter = format!("--filter={}", filter.display());
    let s = Server::start(&[&filter, plugin.to_str().unwrap()]);
    let uri = format!("nbd+unix:///disk1?socket={}", s.socket.display());
    // The plugin sees the name the filter opened it under, in every
    // callback; the filter, the client's.
    assert_eq!(whoami(&uri), "open=below-disk1 pread=below-disk1 peer=unix");
    assert_eq!(
        nbdsh(&uri, "print(h.get_export_description())").trim(),
        "filter=disk1"
    );
    assert!(s.stop().success());
}

/// `--filter=` the `later` C filter (`tests/c/later.c`), which uses the
/// ABI 1.10 services of the layer below: timers, reopen, background jobs.
fn later_filter(dir: &TempDir) -> String {
    let so = build_c(dir, "laterfilter", &root().join("tests/c/later.c"), &[]);
    format!("--filter={}", so.display())
}

#[test]
fn requests_waiting_on_a_filter_s_timers_hold_no_thread() {
    let dir = TempDir::new("later-timer");
    let filter = later_filter(&dir);
    // One worker thread, eight reads each delayed 300 ms: were a thread
    // held for each wait they would take 2.4 s.
    let s = Server::start(&["-t", "1", &filter, "memory", "1M", "delay_ms=300"]);
    let script = "
import time
t = time.monotonic()
bufs = [nbd.Buffer(512) for _ in range(8)]
for i, b in enumerate(bufs):
    h.aio_pread(b, i * 512)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(round(time.monotonic() - t, 2))
";
    let elapsed: f64 = nbdsh(&s.uri(), script).trim().parse().unwrap();
    assert!(
        (0.3..1.5).contains(&elapsed),
        "8 delayed reads took {elapsed} s"
    );
    assert!(s.stop().success());
}

#[test]
fn a_filter_s_reopen_works_and_its_close_waits_for_its_job_and_cancels_its_timer() {
    let dir = TempDir::new("later-reopen");
    let filter = later_filter(&dir);
    let record = dir.path("record");
    let arg = format!("record={}", record.display());
    let s = Server::start(&[&filter, "memory", "1M", &arg]);
    let written = nbdsh(
        &s.uri(),
        "h.pwrite(b'hello background', 0); h.flush(); print(h.pread(16, 0).decode())",
    );
    // The reopened memory plugin still serves the same disk.
    assert_eq!(written.trim(), "hello background");
    // A new connection's background job read the first bytes below.
    let seen = nbdsh(&s.uri(), "print(h.get_export_description())");
    assert_eq!(seen.trim(), "hello background");
    assert!(s.stop().success());

    let events = std::fs::read_to_string(&record).unwrap();
    assert_eq!(events.matches("reopen").count(), 1, "{events}");
    // Each connection's close came after its job ended and its timer,
    // set for no request, was cancelled.
    let connections: Vec<&str> = events.split_terminator("close\n").collect();
    assert!(connections.len() >= 2, "{events}");
    for c in connections {
        assert!(c.contains("job end\n"), "{events}");
        assert!(c.contains("timer ECANCELED\n"), "{events}");
    }
}

#[test]
fn a_background_job_is_refused_over_a_layer_that_serializes_requests() {
    let dir = TempDir::new("later-serial");
    let filter = later_filter(&dir);
    let plugin = serial_plugin(&dir, "SERIALIZE_REQUESTS");
    let s = Server::start(&[&filter, plugin.to_str().unwrap()]);
    let out = Command::new("nbdinfo").arg(s.uri()).output().unwrap();
    assert!(!out.status.success(), "the open fails with the job refused");
    let (status, log) = s.stop_with_log();
    assert!(status.success());
    assert!(log.contains("does not allow overlapping calls"), "{log}");
}

#[test]
fn shutdown_fires_a_filter_s_timers_at_once() {
    let dir = TempDir::new("later-shutdown");
    let filter = later_filter(&dir);
    // An hour's delay: only the shutdown can end it.
    let s = Server::start(&[&filter, "memory", "1M", "delay_ms=3600000"]);
    let mut reader = Command::new("nbdsh")
        .args(["-u", &s.uri(), "-c", "h.pread(512, 0)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let t = std::time::Instant::now();
    let status = s.stop();
    assert!(status.success());
    assert!(t.elapsed().as_secs() < 5, "the server waited for the timer");
    assert!(!reader.wait().unwrap().success(), "the read failed");
}
