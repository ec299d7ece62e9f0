//! Integrity under load and faults: four multi-conn clients (libnbd, from
//! Python) each keep up to 16 requests in flight on their own region, a
//! random mix of reads, writes (some with FUA), trims, zeroes and flushes,
//! and check every read against a model of the disk; at the end a fifth
//! connection reads back every block the models know and checks it.
//! Bounded by a count of operations and a time limit.
//!
//! Run plain (memory, and file through the worker pool), with the error
//! filter failing a tenth of all requests (each failure must reach the
//! client as an error, never as wrong data), with the delay filter making
//! reads slower than writes so completions come back out of order, and
//! through cow over luks. Figures are printed with `--nocapture`.

use std::process::Command;

use nbdhost_tests::{client, filter_arg, plugin, run_ok, sparse_file, Server, TempDir};

/// The stress client: `URI SEED OPS SECONDS`; prints one line of figures.
const STRESS: &str = r#"
import json, random, sys, threading, time, nbd
uri, seed, nops, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
CONNS, DEPTH, B = 4, 16, 4096
probe = nbd.NBD(); probe.connect_uri(uri)
size, multi = probe.get_size(), probe.can_multi_conn()
trim_ok, zero_ok, fua_ok = probe.can_trim(), probe.can_zero(), probe.can_fua()
probe.shutdown()
region = size // CONNS // B
stats = {"ops": 0, "checked": 0, "errors": 0, "mismatches": 0}
lock = threading.Lock()
# Per writer, each block's model: its bytes, or None when unknown (a failed
# write, or a trim, whose contents the protocol leaves open). It starts as
# what the region holds (zeroes on a new disk, noise on a new LUKS volume).
models = [{} for _ in range(CONNS)]

def worker(k):
    model, rnd = models[k], random.Random(seed * 1000 + k)
    h = nbd.NBD(); h.connect_uri(uri)
    first, inflight, busy = k * region, {}, set()
    for at in range(first, first + region, 256):
        n = min(256, first + region - at)
        for attempt in range(20):
            try:
                data = h.pread(n * B, at * B)
                break
            except nbd.Error:
                pass
        else:
            raise SystemExit("the region could not be read")
        for i in range(n):
            model[at + i] = data[i * B:(i + 1) * B]
    done = errors = checked = bad = 0
    deadline = time.time() + secs
    def finish(c, ok):
        nonlocal errors, checked, bad
        op, blocks, data, buf = inflight.pop(c)
        busy.difference_update(blocks)
        if not ok:
            errors += 1
        if op == "read" and ok:
            got = bytes(buf.to_bytearray())
            for i, b in enumerate(blocks):
                want = model[b]
                if want is None:
                    continue
                checked += 1
                if got[i * B:(i + 1) * B] != want:
                    bad += 1
        elif op == "write":
            for i, b in enumerate(blocks):
                model[b] = data[i * B:(i + 1) * B] if ok else None
        elif op == "zero":
            for b in blocks:
                model[b] = b"\0" * B if ok else None
        elif op == "trim":
            for b in blocks:
                model[b] = None
    def reap():
        h.poll(-1)
        for c in list(inflight):
            try:
                if h.aio_command_completed(c):
                    finish(c, True)
            except nbd.Error:
                finish(c, False)
    while done < nops and time.time() < deadline:
        while len(inflight) < DEPTH and done < nops:
            n = rnd.randint(1, 8)
            start = first + rnd.randrange(region - n)
            blocks = list(range(start, start + n))
            if busy.intersection(blocks):
                break
            r, off, data, buf = rnd.random(), start * B, None, None
            if r < 0.45:
                op, buf = "read", nbd.Buffer(n * B)
                c = h.aio_pread(buf, off)
            elif r < 0.8:
                op, data = "write", rnd.randbytes(n * B)
                flags = nbd.CMD_FLAG_FUA if fua_ok and rnd.random() < 0.2 else 0
                c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off, flags=flags)
            elif r < 0.88 and zero_ok:
                op = "zero"
                flags = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0
                c = h.aio_zero(n * B, off, flags=flags)
            elif r < 0.95 and trim_ok:
                op = "trim"
                c = h.aio_trim(n * B, off)
            else:
                op, blocks = "flush", []
                c = h.aio_flush()
            inflight[c] = (op, blocks, data, buf)
            busy.update(blocks)
            done += 1
        if inflight:
            reap()
    while inflight:
        reap()
    try:
        h.flush()
    except nbd.Error:
        errors += 1
    h.shutdown()
    with lock:
        stats["ops"] += done
        stats["checked"] += checked
        stats["errors"] += errors
        stats["mismatches"] += bad

threads = [threading.Thread(target=worker, args=(k,)) for k in range(CONNS)]
for t in threads: t.start()
for t in threads: t.join()
# A fifth connection sees what every writer saw (multi-conn, after their
# flushes).
h, final = nbd.NBD(), 0
h.connect_uri(uri)
for m in models:
    for blk, want in m.items():
        if want is None:
            continue
        try:
            got = h.pread(B, blk * B)
        except nbd.Error:
            stats["errors"] += 1
            continue
        final += 1
        if got != want:
            stats["mismatches"] += 1
stats["final_checked"] = final
stats["multi_conn"] = int(multi)
print(json.dumps(stats))
"#;

/// The stress client's figures.
#[derive(Debug)]
struct Figures {
    ops: u64,
    checked: u64,
    errors: u64,
    mismatches: u64,
    final_checked: u64,
}

/// A number from the client's one-line JSON.
fn field(json: &str, key: &str) -> u64 {
    let at = json
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("{key} in {json}"));
    json[at + key.len() + 4..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {json}"))
}

/// Run the stress client against `s` and check the figures it reports.
fn stress(name: &str, s: &Server, expect_errors: bool) -> Figures {
    let json = run_ok(client("python3").args(["-c", STRESS, &s.uri(), "7", "3000", "30"]));
    let f = Figures {
        ops: field(&json, "ops"),
        checked: field(&json, "checked"),
        errors: field(&json, "errors"),
        mismatches: field(&json, "mismatches"),
        final_checked: field(&json, "final_checked"),
    };
    eprintln!("stress {name}: {f:?}");
    assert_eq!(field(&json, "multi_conn"), 1, "multi-conn is advertised");
    assert_eq!(f.mismatches, 0, "{name}: reads returned wrong data: {f:?}");
    assert!(
        f.ops >= 4000 && f.checked > 1000 && f.final_checked > 100,
        "{name}: {f:?}"
    );
    if expect_errors {
        assert!(
            f.errors > f.ops / 20,
            "{name}: too few injected errors: {f:?}"
        );
    } else {
        assert_eq!(f.errors, 0, "{name}: {f:?}");
    }
    f
}

#[test]
fn plain_memory_keeps_every_byte() {
    let s = Server::start(&["memory", "64M"]);
    stress("memory", &s, false);
    assert!(s.stop().success());
}

#[test]
fn plain_file_through_the_worker_pool_keeps_every_byte() {
    let dir = TempDir::new("stress-file");
    let img = dir.path("disk.img");
    sparse_file(&img, 64 << 20);
    let p = plugin("file");
    let s = Server::start(&[p.to_str().unwrap(), img.to_str().unwrap()]);
    stress("file", &s, false);
    assert!(s.stop().success());
}

#[test]
fn injected_errors_reach_the_client_never_as_wrong_data() {
    let s = Server::start(&[&filter_arg("error"), "memory", "64M", "error-rate=10%"]);
    stress("error filter", &s, true);
    assert!(s.stop().success());
}

#[test]
fn completions_out_of_order_keep_every_byte() {
    let s = Server::start(&[
        &filter_arg("delay"),
        "memory",
        "64M",
        "delay-read=3ms",
        "delay-zero=1ms",
    ]);
    stress("delay filter", &s, false);
    assert!(s.stop().success());
}

#[test]
fn cow_over_luks_keeps_every_byte() {
    let dir = TempDir::new("stress-luks");
    let img = dir.path("luks.img");
    let pw = dir.path("pw");
    std::fs::write(&pw, "stress").unwrap();
    run_ok(Command::new("truncate").args(["-s", "80M"]).arg(&img));
    run_ok(
        Command::new("cryptsetup")
            .args(["-q", "luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2"])
            .args(["--iter-time", "10", "--key-file"])
            .arg(&pw)
            .arg(&img),
    );
    let p = plugin("file");
    let pass = format!("passphrase=+{}", pw.display());
    let s = Server::start(&[
        &filter_arg("cow"),
        &filter_arg("luks"),
        p.to_str().unwrap(),
        img.to_str().unwrap(),
        &pass,
    ]);
    stress("cow over luks", &s, false);
    assert!(s.stop().success());
}
