//! nbdkit's simple shaping filters, native: nozero, noextents,
//! noparallel, nofilter, fua, swab, checkwrite and nocache. Each command
//! line of the SYNOPSIS and EXAMPLES of nbdkit's man page for them is
//! served by nbdkit and by nbdhost and must look the same to a client;
//! the rest drives each filter's behaviour with real clients, in the
//! areas nbdkit's own tests for it cover.

use std::path::Path;
use std::time::{Duration, Instant};

use nbdhost_tests::twin::same_as_nbdkit;
use nbdhost_tests::{client, nbdsh, pattern, run, run_ok, Server, TempDir};

/// A 1 MiB disk image in `dir` holding `pattern(1 MiB, 7)`, its path as
/// text.
fn disk(dir: &TempDir) -> String {
    let p = dir.path("disk.img");
    std::fs::write(&p, pattern(1 << 20, 7)).unwrap();
    p.display().to_string()
}

/// What a client is told: the named `h.can_*`/`h.is_*` answers and the
/// size, one per line.
fn told(uri: &str, questions: &[&str]) -> String {
    let mut script = String::from("print('size', h.get_size())\n");
    for q in questions {
        script.push_str(&format!("print('{q}', h.{q}())\n"));
    }
    nbdsh(uri, &script)
}

/// The outcome of one nbdsh statement run against `uri` (with libnbd's
/// client-side checks off, so the server answers): `ok` or the errno's
/// name.
fn outcome(uri: &str, statement: &str) -> String {
    let script = format!(
        "h.set_strict_mode(0)\n\
         try:\n    {statement}\n    print('ok')\n\
         except nbd.Error as e:\n    print(e.errno)\n"
    );
    run_ok(client("nbdsh").args(["-u", uri, "-c", &script]))
        .trim()
        .to_string()
}

/// Start nbdhost with these arguments (filters by name, as the server
/// finds its own).
fn serve(args: &[&str]) -> Server {
    Server::start(args)
}

/// Blocks the file at `path` holds on disk.
fn allocated_blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks()
}

/// An nbdkit `sh` plugin script in `dir` with this body, executable; its
/// path as text.
fn sh_script(dir: &TempDir, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.path("plugin.sh");
    std::fs::write(&p, format!("#!/bin/bash\n{body}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

// ---- nozero ---------------------------------------------------------

const ZERO_QUESTIONS: &[&str] = &["can_zero", "can_fast_zero", "is_read_only"];

#[test]
fn nozero_man_page_command_lines_behave_as_in_nbdkit() {
    let dir = TempDir::new("nozero-twin");
    let img = disk(&dir);
    for args in [
        vec!["--filter=nozero", "file", &img],
        vec!["--filter=nozero", "file", "zeromode=emulate", &img],
        vec![
            "--filter=nozero",
            "file",
            "zeromode=plugin",
            "fastzeromode=none",
            &img,
        ],
        vec![
            "--filter=nozero",
            "file",
            "zeromode=notrim",
            "fastzeromode=slow",
            &img,
        ],
        vec![
            "--filter=nozero",
            "file",
            "zeromode=emulate",
            "fastzeromode=ignore",
            &img,
        ],
    ] {
        same_as_nbdkit(&args, |uri| {
            told(uri, ZERO_QUESTIONS)
                + &outcome(uri, "h.zero(4096, 0)")
                + &outcome(
                    uri,
                    "if h.can_fast_zero(): h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)",
                )
        });
    }
}

#[test]
fn nozero_by_default_hides_write_zeroes() {
    let s = serve(&["--filter=nozero", "memory", "1M"]);
    assert!(told(&s.uri(), &["can_zero"]).contains("can_zero False"));
}

#[test]
fn nozero_emulate_writes_the_zeroes_instead_of_punching_holes() {
    let dir = TempDir::new("nozero-emulate");
    let img = dir.path("sparse.img");
    nbdhost_tests::sparse_file(&img, 4 << 20);
    let s = serve(&[
        "--filter=nozero",
        "file",
        img.to_str().unwrap(),
        "zeromode=emulate",
    ]);
    nbdhost_tests::qemu_io(&s.uri(), &["write -z 0 2M", "read -P 0 0 2M"]);
    assert!(
        allocated_blocks(&img) * 512 >= 2 << 20,
        "2 MiB of zeroes written, {} blocks allocated",
        allocated_blocks(&img)
    );
}

#[test]
fn nozero_notrim_keeps_zeroed_ranges_allocated() {
    let dir = TempDir::new("nozero-notrim");
    let img = dir.path("full.img");
    std::fs::write(&img, pattern(2 << 20, 3)).unwrap();
    let before = allocated_blocks(&img);
    let s = serve(&[
        "--filter=nozero",
        "file",
        img.to_str().unwrap(),
        "zeromode=notrim",
    ]);
    nbdhost_tests::qemu_io(&s.uri(), &["write -z -u 0 2M", "read -P 0 0 2M"]);
    assert_eq!(
        allocated_blocks(&img),
        before,
        "a zero with MAY_TRIM punched a hole"
    );
}

#[test]
fn nozero_fastzeromode_slow_fails_fast_zeroes_with_enotsup() {
    let s = serve(&[
        "--filter=nozero",
        "memory",
        "1M",
        "zeromode=plugin",
        "fastzeromode=slow",
    ]);
    let uri = s.uri();
    assert!(told(&uri, &["can_fast_zero"]).contains("can_fast_zero True"));
    assert_eq!(
        outcome(&uri, "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)"),
        "ENOTSUP"
    );
    assert_eq!(outcome(&uri, "h.zero(4096, 0)"), "ok");
}

#[test]
fn nozero_rejects_an_unknown_mode() {
    let out = run(
        client(nbdhost_tests::nbdhost_bin().to_str().unwrap()).args([
            "--filter=nozero",
            "memory",
            "1M",
            "zeromode=fast",
            "--run",
            "true",
        ]),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown zeromode 'fast'"));
}

// ---- noextents ------------------------------------------------------

#[test]
fn noextents_man_page_command_line_behaves_as_in_nbdkit() {
    let dir = TempDir::new("noextents-twin");
    let img = dir.path("sparse.img");
    nbdhost_tests::sparse_file(&img, 1 << 20);
    let img = img.display().to_string();
    let map = same_as_nbdkit(&["--filter=noextents", "file", &img], |uri| {
        run_ok(client("nbdinfo").args(["--map", uri]))
    });
    if let Some(map) = map {
        assert_eq!(map.lines().count(), 1, "{map}");
        assert!(map.contains("data"), "{map}");
    }
}

#[test]
fn noextents_shows_a_sparse_file_as_all_data() {
    let dir = TempDir::new("noextents");
    let img = dir.path("sparse.img");
    nbdhost_tests::sparse_file(&img, 1 << 20);
    let img = img.display().to_string();
    let plain = serve(&["file", &img]);
    let map = run_ok(client("nbdinfo").args(["--map", &plain.uri()]));
    assert!(map.contains("hole"), "{map}");
    let filtered = serve(&["--filter=noextents", "file", &img]);
    let map = run_ok(client("nbdinfo").args(["--map", &filtered.uri()]));
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", "1048576", "0", "data"]
    );
}

// ---- noparallel -----------------------------------------------------

#[test]
fn noparallel_man_page_command_lines_behave_as_in_nbdkit() {
    let dir = TempDir::new("noparallel-twin");
    let img = disk(&dir);
    for args in [
        vec!["--filter=noparallel", "file", &img],
        vec!["--filter=noparallel", "file", "serialize=connections", &img],
    ] {
        same_as_nbdkit(&args, |uri| {
            let mc = told(uri, &["can_multi_conn"]);
            mc + &run_ok(client("nbdcopy").args([uri, "-"])).len().to_string()
        });
    }
}

/// Seconds two reads take, each delayed 0.4 s below `filters` (given
/// `params`), sent at once on one connection (`two_connections` false)
/// or one on each of two.
fn two_delayed_reads(filters: &[&str], params: &[&str], two_connections: bool) -> f64 {
    let mut args = filters.to_vec();
    args.extend(["--filter=delay", "memory", "1M", "delay-read=0.4"]);
    args.extend(params);
    let s = serve(&args);
    // Timed inside the client, from the first read sent to the last
    // answered, so Python's start-up does not count.
    let script = if two_connections {
        format!(
            "import time\ng = nbd.NBD()\ng.connect_uri('{}')\nt0 = time.monotonic()\n\
             a = h.aio_pread(nbd.Buffer(512), 0)\nb = g.aio_pread(nbd.Buffer(512), 4096)\n\
             while h.aio_in_flight() > 0 or g.aio_in_flight() > 0:\n    \
             h.poll(0)\n    g.poll(0)\n    time.sleep(0.01)\n\
             print(time.monotonic() - t0)\n",
            s.uri()
        )
    } else {
        "import time\nt0 = time.monotonic()\n\
         a = h.aio_pread(nbd.Buffer(512), 0)\nb = h.aio_pread(nbd.Buffer(512), 4096)\n\
         while h.aio_in_flight() > 0:\n    h.poll(-1)\n\
         print(time.monotonic() - t0)\n"
            .to_string()
    };
    nbdsh(&s.uri(), &script).trim().parse().unwrap()
}

#[test]
fn noparallel_serialises_the_requests_of_one_connection() {
    assert!(two_delayed_reads(&[], &[], false) < 0.7);
    assert!(two_delayed_reads(&["--filter=noparallel"], &[], false) >= 0.8);
}

#[test]
fn noparallel_all_requests_serialises_across_connections() {
    assert!(two_delayed_reads(&["--filter=noparallel"], &[], true) < 0.7);
    assert!(two_delayed_reads(&["--filter=noparallel"], &["serialize=all-requests"], true) >= 0.8);
}

#[test]
fn noparallel_connections_serves_one_client_at_a_time() {
    let s = serve(&[
        "--filter=noparallel",
        "memory",
        "1M",
        "serialize=connections",
    ]);
    let uri = s.uri();
    assert!(told(&uri, &["can_multi_conn"]).contains("can_multi_conn False"));
    let mut first = client("nbdsh")
        .args([
            "-u",
            &uri,
            "-c",
            "import time\nprint('connected', flush=True)\ntime.sleep(1)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(first.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "connected");
    let t = Instant::now();
    run_ok(client("nbdinfo").args(["--size", &uri]));
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "a second client was served while the first was connected"
    );
    assert!(first.wait().unwrap().success());
}

// ---- nofilter -------------------------------------------------------

#[test]
fn nofilter_man_page_command_line_behaves_as_in_nbdkit() {
    let questions = [
        "can_zero",
        "can_trim",
        "can_flush",
        "can_fua",
        "can_cache",
        "is_read_only",
    ];
    same_as_nbdkit(&["--filter=nofilter", "pattern", "1M"], |uri| {
        told(uri, &questions) + &run_ok(client("nbdcopy").args([uri, "-"])).len().to_string()
    });
}

#[test]
fn nofilter_changes_nothing_a_client_sees() {
    let questions = [
        "can_zero",
        "can_fast_zero",
        "can_trim",
        "can_flush",
        "can_fua",
        "can_cache",
        "can_multi_conn",
        "is_read_only",
    ];
    let dir = TempDir::new("nofilter");
    let img = disk(&dir);
    let plain = serve(&["file", &img]);
    let filtered = serve(&["--filter=nofilter", "file", &img]);
    assert_eq!(
        told(&plain.uri(), &questions),
        told(&filtered.uri(), &questions)
    );
    let src = dir.path("src.img");
    std::fs::write(&src, pattern(1 << 20, 9)).unwrap();
    nbdhost_tests::convert_and_compare(&src, &filtered.uri());
}

// ---- fua ------------------------------------------------------------

const FUA_QUESTIONS: &[&str] = &["can_fua", "can_flush"];

#[test]
fn fua_man_page_command_lines_behave_as_in_nbdkit() {
    let dir = TempDir::new("fua-twin");
    let img = disk(&dir);
    // The man page's first example names `--filter=discard`, a filter
    // neither server has (a slip for `--filter=fua`), so the fua filter
    // serves it here.
    for args in [
        vec!["--filter=fua", "file", &img, "fuamode=discard"],
        vec!["--filter=fua", "file", &img],
        vec!["--filter=fua", "file", &img, "fuamode=force"],
        vec!["--filter=fua", "file", &img, "fuamode=pass"],
    ] {
        same_as_nbdkit(&args, |uri| {
            told(uri, FUA_QUESTIONS)
                + &outcome(uri, "h.pwrite(bytes(4096), 0, nbd.CMD_FLAG_FUA)")
                + &outcome(uri, "h.flush()")
        });
    }
}

/// The client's requests in every fua test: a write with FUA, one
/// without, and a flush.
const FUA_CLIENT: &[&str] = &["write -f 0 16k", "write 16k 16k", "flush"];

/// The requests in the log file at `log` as (flushes, writes with FUA,
/// writes without); the file is emptied for the next server.
fn logged_fua(log: &Path) -> (usize, usize, usize) {
    let text = std::fs::read_to_string(log).unwrap();
    std::fs::File::create(log).unwrap();
    let writes = |fua: &str| {
        text.lines()
            .filter(|l| l.contains(" Write ") && l.contains(fua))
            .count()
    };
    let flushes = text.lines().filter(|l| l.contains(" Flush ")).count();
    (flushes, writes("fua=1"), writes("fua=0"))
}

/// `FILTERS file IMG maxlen=4k logfile=LOG fuamode=MODE`, the man page's
/// blocksize and log command lines, as owned arguments.
fn fua_log_args(filters: &[&str], img: &str, log: &Path, mode: &str) -> Vec<String> {
    let mut args: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
    args.extend([
        "file".to_string(),
        img.to_string(),
        "maxlen=4k".to_string(),
        format!("logfile={}", log.display()),
        format!("fuamode={mode}"),
    ]);
    args
}

/// The log filter between blocksize and fua sees what the client's
/// requests become above fua, once blocksize has split them.
const ABOVE_FUA: &[&str] = &["--filter=blocksize", "--filter=log", "--filter=fua"];
/// The log filter below fua sees what fua passes down.
const BELOW_FUA: &[&str] = &["--filter=blocksize", "--filter=fua", "--filter=log"];

#[test]
fn fua_blocksize_examples_send_what_nbdkit_sends() {
    let dir = TempDir::new("fua-blocksize");
    let img = disk(&dir);
    let log = dir.path("fua.log");
    for mode in ["emulate", "native"] {
        let args = fua_log_args(ABOVE_FUA, &img, &log, mode);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        same_as_nbdkit(&args, |uri| {
            nbdhost_tests::qemu_io(uri, FUA_CLIENT);
            format!("{:?}", logged_fua(&log))
        });
    }
}

/// What the log filter below the fua filter saw in nbdhost.
fn fua_logged_below(mode: &str) -> (usize, usize, usize) {
    let dir = TempDir::new("fua-log");
    let img = disk(&dir);
    let log = dir.path("fua.log");
    let args = fua_log_args(BELOW_FUA, &img, &log, mode);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = serve(&args);
    nbdhost_tests::qemu_io(&s.uri(), FUA_CLIENT);
    drop(s);
    logged_fua(&log)
}

#[test]
fn fua_force_adds_fua_to_every_write_and_drops_flushes() {
    let (flushes, fua, plain) = fua_logged_below("force");
    assert_eq!((flushes, plain), (0, 0));
    assert!(fua >= 1);
}

#[test]
fn fua_discard_drops_fua_and_flushes() {
    let (flushes, fua, plain) = fua_logged_below("discard");
    assert_eq!((flushes, fua), (0, 0));
    assert!(plain >= 1);
}

#[test]
fn fua_emulate_needs_a_flush_below() {
    let dir = TempDir::new("fua-noflush");
    let script = sh_script(
        &dir,
        "case \"$1\" in\n  get_size) echo 1048576 ;;\n  pread) head -c $3 /dev/zero ;;\n  \
         can_write) exit 0 ;;\n  pwrite) cat >/dev/null ;;\n  can_flush) exit 3 ;;\n  \
         *) exit 2 ;;\nesac\n",
    );
    let s = serve(&["--filter=fua", "sh", &script, "fuamode=emulate"]);
    let out = run(client("nbdinfo").arg(s.uri()));
    assert!(!out.status.success());
    assert!(
        s.log_text()
            .contains("fuamode 'emulate' requires plugin flush support"),
        "{}",
        s.log_text()
    );
}

// ---- swab -----------------------------------------------------------

#[test]
fn swab_man_page_command_line_behaves_as_in_nbdkit() {
    let dir = TempDir::new("swab-twin");
    let img = disk(&dir);
    let file_arg = format!("file={img}");
    let data = same_as_nbdkit(&["--filter=swab", "file", &file_arg], |uri| {
        nbdsh(uri, "print(h.pread(64, 1000).hex())")
    });
    if let Some(data) = data {
        let raw = pattern(1 << 20, 7);
        let mut want = raw[1000..1064].to_vec();
        for w in want.chunks_mut(2) {
            w.swap(0, 1);
        }
        let want: String = want.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(data.trim(), want);
    }
}

#[test]
fn swab_bits_read_pattern_as_nbdkit_does() {
    for bits in ["8", "16", "32", "64"] {
        let arg = format!("swab-bits={bits}");
        same_as_nbdkit(&["--filter=swab", "pattern", "size=128K", &arg], |uri| {
            nbdsh(uri, "print(h.get_size(), h.pread(32, 65528).hex())")
        });
    }
}

#[test]
fn swab_writes_reach_the_disk_swapped() {
    let dir = TempDir::new("swab-write");
    let img = disk(&dir);
    let s = serve(&["--filter=swab", "file", &img, "swab-bits=32"]);
    nbdsh(&s.uri(), "h.pwrite(bytes(range(8)), 4096)");
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(raw[4096..4104], [3, 2, 1, 0, 7, 6, 5, 4]);
}

#[test]
fn swab_rounds_the_size_down_to_a_whole_word() {
    let dir = TempDir::new("swab-size");
    let img = dir.path("odd.img");
    std::fs::write(&img, pattern(1001, 1)).unwrap();
    let s = serve(&[
        "--filter=swab",
        "file",
        img.to_str().unwrap(),
        "swab-bits=64",
    ]);
    assert_eq!(nbdhost_tests::export_size(&s.uri()), "1000");
}

#[test]
fn swab_fails_unaligned_requests_with_einval() {
    let s = serve(&["--filter=swab", "memory", "1M", "swab-bits=32"]);
    let uri = s.uri();
    assert_eq!(outcome(&uri, "h.pread(2, 0)"), "EINVAL");
    assert_eq!(outcome(&uri, "h.pwrite(bytes(4), 2)"), "EINVAL");
    assert_eq!(outcome(&uri, "h.zero(4, 6)"), "EINVAL");
    assert_eq!(outcome(&uri, "h.pread(4, 4)"), "ok");
}

/// nbdkit's test-swab-extents.sh: extents of odd lengths, seen through
/// each word size, merged as a client reads them.
#[test]
fn swab_extents_combine_at_word_boundaries_as_in_nbdkit() {
    let extents = "echo \" 0 7\"; echo \" 7 8\"; echo \"15 8 zero\"; \
                   echo \"23 8 zero,hole\"; echo \"31 2 hole\"; echo \"33 2 zero\"; \
                   echo \"35 4 zero,hole\"; echo \"39 8 hole\"; echo \"47 1\"";
    let script = "size = h.get_size()\noffs = 0\nentries = []\n\
                  def f(ctx, offset, e, err):\n    global offs\n    \
                  for length, flags in zip(*[iter(e)] * 2):\n        \
                  if entries and flags == entries[-1][1]:\n            \
                  entries[-1] = (entries[-1][0] + length, flags)\n        \
                  else:\n            entries.append((length, flags))\n        \
                  offs = offs + length\n\
                  while offs < size:\n    h.block_status(size - offs, offs, f)\n\
                  print(entries)\n";
    let expected = [
        (
            "8",
            "[(15, 0), (8, 2), (8, 3), (2, 1), (2, 2), (4, 3), (8, 1), (1, 0)]",
        ),
        (
            "16",
            "[(16, 0), (8, 2), (6, 3), (2, 1), (2, 0), (2, 2), (2, 3), (8, 1), (2, 0)]",
        ),
        (
            "32",
            "[(16, 0), (8, 2), (4, 3), (4, 1), (4, 0), (8, 1), (4, 0)]",
        ),
        ("64", "[(16, 0), (8, 2), (8, 1), (16, 0)]"),
    ];
    for (bits, want) in expected {
        let bits_arg = format!("swab-bits={bits}");
        let extents_arg = format!("extents={extents}");
        let args = [
            "--filter=swab",
            "eval",
            &bits_arg,
            "get_size=echo 48",
            "pread=exit 1",
            &extents_arg,
        ];
        let s = serve(&args);
        let got = run_ok(client("nbdsh").args(["--base-allocation", "-u", &s.uri(), "-c", script]));
        assert_eq!(got.trim(), want, "swab-bits={bits}");
        // The same extents answered one at a time, as the second half of
        // nbdkit's test does: a word the first answer leaves unfinished
        // is completed by asking again.
        let one_arg = format!("extents={ONE_AT_A_TIME}");
        let s = serve(&[
            "--filter=swab",
            "eval",
            &bits_arg,
            "get_size=echo 48",
            "pread=exit 1",
            &one_arg,
        ]);
        let got = run_ok(client("nbdsh").args(["--base-allocation", "-u", &s.uri(), "-c", script]));
        assert_eq!(got.trim(), want, "swab-bits={bits}, one extent at a time");
    }
}

/// An eval extents script giving, from the offset asked for, only the one
/// extent of nbdkit's test-swab-extents.sh list that holds it.
const ONE_AT_A_TIME: &str = "case $4 in \
    0|1|2|3|4|5|6) echo ' 0 7' ;; \
    7|8|9|10|11|12|13|14) echo ' 7 8' ;; \
    15|16|17|18|19|20|21|22) echo '15 8 zero' ;; \
    23|24|25|26|27|28|29|30) echo '23 8 zero,hole' ;; \
    31|32) echo '31 2 hole' ;; \
    33|34) echo '33 2 zero' ;; \
    35|36|37|38) echo '35 4 zero,hole' ;; \
    39|40|41|42|43|44|45|46) echo '39 8 hole' ;; \
    47) echo '47 1' ;; \
    esac";

// ---- checkwrite -----------------------------------------------------

/// `nbdcopy URI URI` (or qemu-img convert -n) onto the same export:
/// whether it succeeded.
fn copy_onto_itself(uri: &str, qemu: bool) -> String {
    let out = if qemu {
        run(client("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", uri, uri]))
    } else {
        run(client("nbdcopy").args([uri, uri]))
    };
    format!("copied: {}", out.status.success())
}

#[test]
fn checkwrite_man_page_command_lines_behave_as_in_nbdkit() {
    let dir = TempDir::new("checkwrite-twin");
    let img = disk(&dir);
    let tree = dir.path("testdir");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("hello.txt"), "hello, world\n").unwrap();
    let tree = tree.display().to_string();
    let seen = same_as_nbdkit(&["--filter=checkwrite", "data", "@32768 1"], |uri| {
        copy_onto_itself(uri, false)
    });
    assert!(seen.is_none_or(|s| s == "copied: true"));
    let seen = same_as_nbdkit(&["--filter=checkwrite", "file", &img], |uri| {
        copy_onto_itself(uri, false)
    });
    assert!(seen.is_none_or(|s| s == "copied: true"));
    if nbdhost_tests::have("mke2fs") {
        same_as_nbdkit(&["--filter=checkwrite", "linuxdisk", &tree], |uri| {
            copy_onto_itself(uri, true)
        });
    }
}

#[test]
fn checkwrite_copies_of_sparse_and_patterned_disks_pass() {
    for args in [
        vec!["--filter=checkwrite", "memory", "10M"],
        vec!["--filter=checkwrite", "data", "1 @0x100000 1"],
        vec!["--filter=checkwrite", "pattern", "1M"],
        vec![
            "--filter=checkwrite",
            "--filter=offset",
            "data",
            "1 @0x100000 1",
            "offset=1",
        ],
    ] {
        let s = serve(&args);
        assert_eq!(
            copy_onto_itself(&s.uri(), false),
            "copied: true",
            "{args:?}"
        );
    }
}

#[test]
fn checkwrite_fails_a_write_of_different_data_with_eio() {
    let s = serve(&["--filter=checkwrite", "memory", "1M"]);
    let uri = s.uri();
    assert_eq!(outcome(&uri, "h.pwrite(b'1', 0)"), "EIO");
    assert_eq!(outcome(&uri, "h.pwrite(bytes(512), 0)"), "ok");
}

#[test]
fn checkwrite_fails_a_zero_over_data_and_never_writes() {
    let dir = TempDir::new("checkwrite-zero");
    let img = disk(&dir);
    let s = serve(&["--filter=checkwrite", "file", &img]);
    let uri = s.uri();
    assert_eq!(outcome(&uri, "h.zero(4096, 0)"), "EIO");
    assert_eq!(outcome(&uri, "h.trim(4096, 0)"), "EIO");
    assert_eq!(
        outcome(&uri, "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)"),
        "ENOTSUP"
    );
    assert_eq!(outcome(&uri, "h.flush()"), "ok");
    assert_eq!(std::fs::read(&img).unwrap(), pattern(1 << 20, 7));
}

/// nbdkit's test-checkwrite-bounds.sh: a zero across extents of a
/// plugin that has them checks only the range asked.
#[test]
fn checkwrite_zero_checks_the_range_by_its_extents() {
    let dir = TempDir::new("checkwrite-bounds");
    let script = sh_script(
        &dir,
        "case \"$1\" in\n  get_size) echo 1048576 ;;\n  \
         pread) head -c $3 /dev/zero ;;\n  can_extents) exit 0 ;;\n  \
         extents)\n    echo 0 262144 3\n    echo 262144 131072 0\n    \
         echo 393216 655360 3\n  ;;\n  *) exit 2 ;;\nesac\n",
    );
    let s = serve(&["--filter=checkwrite", "sh", &script]);
    assert_eq!(outcome(&s.uri(), "h.zero(262144, 655360)"), "ok");
    assert_eq!(
        outcome(&s.uri(), "h.zero(131072, 262144, nbd.CMD_FLAG_FAST_ZERO)"),
        "ENOTSUP"
    );
}

#[test]
fn checkwrite_advertises_every_write_type_request() {
    let s = serve(&["--filter=checkwrite", "pattern", "1M"]);
    let got = told(
        &s.uri(),
        &[
            "is_read_only",
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_multi_conn",
        ],
    );
    assert!(got.contains("is_read_only False"), "{got}");
    let offered = |l: &&str| !l.starts_with("can_") || l.ends_with("True");
    assert!(got.lines().all(|l| offered(&l)), "{got}");
}

// ---- nocache --------------------------------------------------------

#[test]
fn nocache_man_page_command_lines_behave_as_in_nbdkit() {
    let dir = TempDir::new("nocache-twin");
    let img = disk(&dir);
    for args in [
        vec!["--filter=nocache", "file", &img],
        vec!["--filter=nocache", "file", &img, "cachemode=nop"],
        vec!["--filter=nocache", "file", &img, "cachemode=emulate"],
    ] {
        same_as_nbdkit(&args, |uri| {
            told(uri, &["can_cache"]) + &outcome(uri, "h.cache(65536, 0)")
        });
    }
}

/// The reads the log filter below nocache saw for one cache request.
fn reads_below_nocache(mode: &str) -> usize {
    let dir = TempDir::new("nocache-log");
    let log = dir.path("log");
    let log_arg = format!("logfile={}", log.display());
    let mode_arg = format!("cachemode={mode}");
    {
        let s = serve(&[
            "--filter=nocache",
            "--filter=log",
            "memory",
            "4M",
            &log_arg,
            &mode_arg,
        ]);
        assert_eq!(outcome(&s.uri(), "h.cache(3 * 1024 * 1024, 0)"), "ok");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(" Cache "), "{text}");
    text.lines().filter(|l| l.contains(" Read ")).count()
}

#[test]
fn nocache_emulate_reads_the_range_and_nop_reads_nothing() {
    assert!(reads_below_nocache("emulate") >= 1);
    assert_eq!(reads_below_nocache("nop"), 0);
}

#[test]
fn nocache_by_default_hides_cache_requests() {
    let s = serve(&["--filter=nocache", "memory", "1M"]);
    assert!(told(&s.uri(), &["can_cache"]).contains("can_cache False"));
}
