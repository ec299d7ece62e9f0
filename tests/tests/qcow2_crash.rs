//! A crash of the qcow2 filter at any moment leaves an image on which
//! `qemu-img check` finds no corruption (leaked clusters are allowed), and
//! every write acknowledged with FUA, or before a FLUSH that completed,
//! reads back afterwards (issue 17, item 5).
//!
//! Two kinds of crash:
//!
//! - **A power cut below the filter.** The volatile test plugin
//!   (`tests/volatile`) keeps every write in a cache until a flush writes
//!   it back (in a random order, in 512-byte blocks) and at a chosen call
//!   throws the cache away, after writing back a random part of a flush
//!   in progress. This is the crash a SIGKILL cannot show: a missing or
//!   misplaced flush in the filter leaves metadata pointing at data, or
//!   refcounts below the references, that never reached the file. Each
//!   workload runs once without a crash to learn which call numbers are
//!   flushes, then again with the power cut at some of them and at a
//!   write, over images of every shape whose metadata grows (new L2
//!   tables, refcount blocks, a larger refcount table), version 2, a
//!   backing file, subclusters, and two connections with and without
//!   multi-conn.
//! - **SIGKILL of the server** over the file plugin while two writers
//!   run: the page cache survives, but everything the filter held in
//!   memory does not.
//!
//! The writer (python3-libnbd) does random writes (a quarter of them with
//! FUA), zero writes, trims and flushes, each 512-byte sector of each
//! write holding its write's number and its own sector number. After the
//! crash, for every sector, the image must hold the last durable
//! write's data or that of a later write (acknowledged or not: a write
//! not yet durable may or may not have landed); after a trim, zeroes or
//! what lay beneath are allowed too. Sectors no one wrote must read as
//! they were.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use nbdhost_tests::{client, filter_arg, plugin, run, run_ok, Server, TempDir};

const SECTOR: u64 = 512;
/// The guest disk of every image.
const DISK: u64 = 64 << 20;
/// The write number a backing file's sectors carry.
const BACKING_ID: u64 = u64::MAX;
/// How much of the backing file holds data (the rest is a hole).
const BACKING_DATA: u64 = 16 << 20;

/// The writer: `URI SEED COUNT CONNS STRIPE STRIPES ID_BASE`. It does
/// COUNT requests (or stops at the first that fails) over CONNS
/// connections, writing only in the 64 KiB stripes numbered STRIPE modulo
/// STRIPES (so that several writers never touch the same sectors), and
/// numbers its requests from ID_BASE + 1. It prints a JSON line before
/// each request and one when it is answered.
const WRITER: &str = r#"
import json, random, struct, sys
import nbd

uri = sys.argv[1]
seed, count, conns, stripe, stripes, id_base = map(int, sys.argv[2:8])
rng = random.Random(seed)
SECTOR, STRIPE = 512, 64 * 1024

def say(**o):
    print(json.dumps(o), flush=True)

hs = []
for _ in range(conns):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
size = hs[0].get_size()
say(multi_conn=hs[0].can_multi_conn(), size=size)
own = [i for i in range(size // STRIPE) if i % stripes == stripe]

def place(lengths):
    # Often the same few stripes (overwrites in place), otherwise
    # anywhere (new clusters, new L2 tables, new refcount blocks).
    if rng.random() < 0.3:
        idx = own[rng.randrange(min(8, len(own)))]
    else:
        idx = rng.choice(own)
    start = idx * STRIPE + rng.randrange(STRIPE // SECTOR) * SECTOR
    limit = (idx + 1) * STRIPE if stripes > 1 else size
    n = min(rng.choice(lengths), (limit - start) // SECTOR)
    return start, n * SECTOR

def payload(i, off, n):
    return b"".join(struct.pack("<QQ", i, s) * 32
                    for s in range(off // SECTOR, (off + n) // SECTOR))

failed = False
for k in range(count):
    i = id_base + k + 1
    c = rng.randrange(conns)
    h = hs[c]
    r = rng.random()
    fua = rng.random() < 0.25
    flags = nbd.CMD_FLAG_FUA if fua else 0
    if r < 0.62:
        off, n = place([1, 1, 2, 3, 8, 8, 16, 31, 128, 256])
        say(id=i, op="write", conn=c, off=off, len=n, fua=fua)
        call = lambda: h.pwrite(payload(i, off, n), off, flags)
    elif r < 0.74:
        off, n = place([1, 8, 64, 256, 512])
        if rng.random() < 0.5:
            flags |= nbd.CMD_FLAG_NO_HOLE
        say(id=i, op="zero", conn=c, off=off, len=n, fua=fua)
        call = lambda: h.zero(n, off, flags)
    elif r < 0.82:
        off, n = place([1, 8, 128, 512])
        say(id=i, op="trim", conn=c, off=off, len=n, fua=fua)
        call = lambda: h.trim(n, off, flags)
    else:
        say(id=i, op="flush", conn=c)
        call = lambda: h.flush()
    try:
        call()
    except Exception as e:
        say(id=i, ok=False, error=str(e))
        failed = True
        break
    say(id=i, ok=True)
if not failed:
    for h in hs:
        h.shutdown()
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Zero,
    Trim,
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked,
    Failed,
    /// Sent, and the answer never came (the server was killed).
    Unanswered,
}

/// One request as the writer reported it.
#[derive(Debug, Clone)]
struct Op {
    id: u64,
    kind: Kind,
    conn: u64,
    off: u64,
    len: u64,
    fua: bool,
    outcome: Outcome,
}

/// What the writers did, and whether one connection's flush covers the
/// others' writes.
struct Log {
    ops: Vec<Op>,
    multi_conn: bool,
}

/// Parse the writer's output; `conn_base` keeps the connections of
/// several writers apart.
fn parse(text: &str, conn_base: u64) -> Log {
    let mut ops: Vec<Op> = Vec::new();
    let mut multi_conn = false;
    let mut at: HashMap<u64, usize> = HashMap::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("writer said {line:?}: {e}"));
        if let Some(m) = v.get("multi_conn") {
            multi_conn = m.as_bool().unwrap();
            continue;
        }
        let id = v["id"].as_u64().unwrap();
        if let Some(ok) = v.get("ok") {
            ops[at[&id]].outcome = if ok.as_bool().unwrap() {
                Outcome::Acked
            } else {
                Outcome::Failed
            };
            continue;
        }
        let kind = match v["op"].as_str().unwrap() {
            "write" => Kind::Write,
            "zero" => Kind::Zero,
            "trim" => Kind::Trim,
            "flush" => Kind::Flush,
            other => panic!("unknown op {other}"),
        };
        at.insert(id, ops.len());
        ops.push(Op {
            id,
            kind,
            conn: conn_base + v["conn"].as_u64().unwrap(),
            off: v["off"].as_u64().unwrap_or(0),
            len: v["len"].as_u64().unwrap_or(0),
            fua: v["fua"].as_bool().unwrap_or(false),
            outcome: Outcome::Unanswered,
        });
    }
    Log { ops, multi_conn }
}

/// What a sector holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Content {
    Zero,
    /// The backing file's data for this sector.
    Backing,
    Write(u64),
}

/// What lies beneath the image's own data.
#[derive(Clone, Copy)]
enum Base {
    Zeroes,
    /// A backing file whose first [`BACKING_DATA`] bytes hold data.
    Backing,
}

impl Base {
    fn content(self, sector: u64) -> Content {
        match self {
            Base::Backing if sector * SECTOR < BACKING_DATA => Content::Backing,
            _ => Content::Zero,
        }
    }
}

/// Sector `sector` of write `id`: the two numbers, repeated.
fn sector_data(id: u64, sector: u64) -> Vec<u8> {
    let mut one = id.to_le_bytes().to_vec();
    one.extend(sector.to_le_bytes());
    one.repeat((SECTOR / 16) as usize)
}

/// What `data` (sector `sector` of the disk) holds, or a description of
/// the bytes if it is none of the contents ever written there.
fn classify(data: &[u8], sector: u64) -> Result<Content, String> {
    if data == [0; SECTOR as usize] {
        return Ok(Content::Zero);
    }
    let id = u64::from_le_bytes(data[..8].try_into().unwrap());
    let at = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if data == sector_data(id, at) {
        let whose = if id == BACKING_ID {
            "the backing file's".to_string()
        } else {
            format!("write {id}'s")
        };
        return match (at == sector, id == BACKING_ID) {
            (true, true) => Ok(Content::Backing),
            (true, false) => Ok(Content::Write(id)),
            (false, _) => Err(format!("{whose} data for sector {at}")),
        };
    }
    Err(format!("unknown bytes starting {:02x?}", &data[..16]))
}

/// Which requests are durable: answered when sent with FUA, or answered
/// before a flush that was answered too (a flush of the same connection,
/// unless multi-conn); after a clean shutdown (`all`), every answered one.
fn durable(log: &Log, all: bool) -> Vec<bool> {
    // The last answered flush of each connection, and of any.
    let mut last: HashMap<u64, usize> = HashMap::new();
    let mut last_any = None;
    for (i, f) in log.ops.iter().enumerate() {
        if f.kind == Kind::Flush && f.outcome == Outcome::Acked {
            last.insert(f.conn, i);
            last_any = Some(i);
        }
    }
    log.ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let flushed = if log.multi_conn {
                last_any
            } else {
                last.get(&op.conn).copied()
            };
            op.outcome == Outcome::Acked && (all || op.fua || flushed.is_some_and(|f| f > i))
        })
        .collect()
}

/// Check every sector of the guest disk `disk` against what the writers
/// did; returns how many sectors they had written.
fn verify(disk: &[u8], base: Base, log: &Log, all_durable: bool) -> Result<usize, String> {
    let durable = durable(log, all_durable);
    let mut touched: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, op) in log.ops.iter().enumerate() {
        if op.kind != Kind::Flush {
            for s in op.off / SECTOR..(op.off + op.len) / SECTOR {
                touched.entry(s).or_default().push(i);
            }
        }
    }
    let mut errors = Vec::new();
    for s in 0..disk.len() as u64 / SECTOR {
        let data = &disk[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        let found = classify(data, s);
        let (allowed, why) = match touched.get(&s) {
            None => (
                vec![base.content(s)],
                "nothing was written there".to_string(),
            ),
            Some(hist) => {
                // The last durable write or zero write (a trim may be
                // ignored), and everything after it.
                let anchor = hist
                    .iter()
                    .rposition(|&i| durable[i] && log.ops[i].kind != Kind::Trim);
                let mut allowed = vec![match anchor {
                    Some(a) => content_of(&log.ops[hist[a]]),
                    None => base.content(s),
                }];
                for &i in &hist[anchor.map_or(0, |a| a + 1)..] {
                    allowed.push(content_of(&log.ops[i]));
                    if log.ops[i].kind == Kind::Trim {
                        allowed.push(base.content(s));
                    }
                }
                let why = match anchor {
                    Some(a) => {
                        let op = &log.ops[hist[a]];
                        format!(
                            "request {} ({:?}{}) was durable",
                            op.id,
                            op.kind,
                            if op.fua {
                                " with FUA"
                            } else {
                                ", then flushed"
                            }
                        )
                    }
                    None => "no durable request wrote there".to_string(),
                };
                (allowed, why)
            }
        };
        match found {
            Ok(c) if allowed.contains(&c) => {}
            other => {
                errors.push(format!(
                    "sector {s} (byte {}): holds {other:?}; allowed {allowed:?}: {why}",
                    s * SECTOR
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(touched.len())
    } else {
        let n = errors.len();
        errors.truncate(12);
        Err(format!("{n} sectors wrong:\n{}", errors.join("\n")))
    }
}

/// What request `op` leaves in the sectors it covers.
fn content_of(op: &Op) -> Content {
    match op.kind {
        Kind::Write => Content::Write(op.id),
        Kind::Zero | Kind::Trim => Content::Zero,
        Kind::Flush => unreachable!("flushes write nothing"),
    }
}

/// `qemu-img check`: no corruption (exit 2) and no failure to check
/// (exit 1); leaked clusters (exit 3) are allowed after a crash, not after
/// a clean shutdown. Returns its report, or why it is not good enough.
fn check(img: &Path, leaks_allowed: bool) -> Result<String, String> {
    let out = run(client("qemu-img").args(["check", "-f", "qcow2"]).arg(img));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code();
    if code == Some(0) || (leaks_allowed && code == Some(3)) {
        Ok(text)
    } else {
        Err(format!("qemu-img check exited {:?}:\n{text}", out.status))
    }
}

/// The guest disk of `img` as qemu reads it.
fn guest(img: &Path, dir: &TempDir) -> Vec<u8> {
    let raw = dir.path("guest.raw");
    run_ok(
        client("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(img)
            .arg(&raw),
    );
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    assert_eq!(bytes.len() as u64, DISK);
    bytes
}

/// splitmix64, for choosing crash points from a seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// An image shape to crash.
struct Shape {
    /// `qemu-img create -o` options.
    opts: &'static str,
    backing: bool,
    /// Connections the writer uses, and whether the volatile plugin
    /// advertises multi-conn.
    conns: u32,
    multi_conn: bool,
    /// Requests per run.
    count: u32,
}

const SHAPE: Shape = Shape {
    opts: "",
    backing: false,
    conns: 1,
    multi_conn: true,
    count: 250,
};

/// A fresh image of `shape` at `dir/name`.
fn create(dir: &TempDir, shape: &Shape, name: &str) -> PathBuf {
    let img = dir.path(name);
    let mut c = client("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    if !shape.opts.is_empty() {
        c.args(["-o", shape.opts]);
    }
    if shape.backing {
        c.arg("-b").arg(backing_file(dir)).args(["-F", "raw"]);
    }
    run_ok(c.arg(&img).arg(DISK.to_string()));
    img
}

/// The raw backing file of `dir`, made on first use: [`BACKING_DATA`]
/// bytes of numbered sectors, then a hole.
fn backing_file(dir: &TempDir) -> PathBuf {
    let p = dir.path("backing.raw");
    if !p.exists() {
        let data: Vec<u8> = (0..BACKING_DATA / SECTOR)
            .flat_map(|s| sector_data(BACKING_ID, s))
            .collect();
        std::fs::write(&p, data).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(DISK)
            .unwrap();
    }
    p
}

/// Run the writer (`seed`, `count` requests, `conns` connections) against
/// `uri` to its end; returns its output.
fn write(uri: &str, seed: u64, count: u32, conns: u32) -> String {
    let out = run(client("python3").args([
        "-c",
        WRITER,
        uri,
        &seed.to_string(),
        &count.to_string(),
        &conns.to_string(),
        "0",
        "1",
        "0",
    ]));
    assert!(
        out.status.success(),
        "writer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Serve `img` through the qcow2 filter over the volatile plugin, with
/// the power cut at call `crash`'s number, writing back in its order.
fn serve_volatile(
    dir: &TempDir,
    shape: &Shape,
    img: &Path,
    trace: &Path,
    seed: u64,
    crash: Option<(u64, &str)>,
) -> Server {
    let volatile = plugin("volatile");
    let mut args = vec![
        filter_arg("qcow2"),
        volatile.display().to_string(),
        format!("file={}", img.display()),
        format!("trace={}", trace.display()),
        format!("seed={seed}"),
        format!("multi-conn={}", shape.multi_conn),
    ];
    if let Some((n, order)) = crash {
        args.push(format!("crash-after={n}"));
        args.push(format!("order={order}"));
    }
    if shape.backing {
        args.push(format!("backing-dir={}", dir.0.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// For each of `seeds`: run the workload without a crash (everything
/// answered must be there after a clean shutdown, and the image must
/// check clean), then with the power cut at three of its flushes and one
/// of its other calls, checking each image and every durable write.
///
/// `NBDHOST_TEST_CRASH_SEEDS=N` adds N more seeds to each shape, for a
/// longer hunt than the suite's.
fn power_cuts(shape: Shape, seeds: &[u64]) {
    let started = Instant::now();
    let extra: u64 = std::env::var("NBDHOST_TEST_CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let more: Vec<u64> = (1..=extra).map(|i| seeds[0] * 1000 + i).collect();
    let seeds = [seeds, &more].concat();
    let dir = TempDir::new("qcow2-crash");
    let base = if shape.backing {
        Base::Backing
    } else {
        Base::Zeroes
    };
    let mut cuts = 0;
    for &seed in &seeds {
        // The run without a crash, to learn the calls the workload makes.
        let img = create(&dir, &shape, &format!("calibrate-{seed}.qcow2"));
        let trace = dir.path(&format!("calibrate-{seed}.trace"));
        let s = serve_volatile(&dir, &shape, &img, &trace, seed, None);
        let out = write(&s.uri(), seed, shape.count, shape.conns);
        let (st, server_log) = s.stop_with_log();
        assert!(st.success(), "nbdhost exited {st}:\n{server_log}");
        let log = parse(&out, 0);
        assert_eq!(log.multi_conn, shape.multi_conn);
        check(&img, false)
            .unwrap_or_else(|e| panic!("seed {seed}, no crash, after a clean shutdown: {e}"));
        verify(&guest(&img, &dir), base, &log, true)
            .unwrap_or_else(|e| panic!("seed {seed}, no crash, after a clean shutdown: {e}"));
        // Each counted call as the trace has it: number, kind, then the
        // offset and length, or for a flush the blocks it wrote back.
        let calls: Vec<(u64, String, u64)> = std::fs::read_to_string(&trace)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let w: Vec<&str> = l.split(' ').collect();
                (
                    w[0].parse().unwrap(),
                    w[1].to_string(),
                    w[2].parse().unwrap(),
                )
            })
            .collect();
        let flushes: Vec<u64> = calls
            .iter()
            .filter(|c| c.1 == "flush" && c.2 > 0)
            .map(|c| c.0)
            .collect();
        let others: Vec<u64> = calls
            .iter()
            .filter(|c| c.1 != "flush")
            .map(|c| c.0)
            .collect();
        assert!(flushes.len() > 10, "too few flushes: {calls:?}");

        // Three cuts in flushes that have something to write back, one
        // in another call. (The cuts take turns at the write-back orders.)
        let mut rng = Rng(seed);
        let mut points: Vec<u64> = (0..3)
            .map(|_| flushes[rng.below(flushes.len() as u64) as usize])
            .collect();
        points.push(others[rng.below(others.len() as u64) as usize]);
        // And where the header is first rewritten (the refcount table
        // moving): in the flush before, the write, and three times (in
        // each write-back order) in the flush after.
        if let Some(h) = calls.iter().position(|c| c.1 == "write" && c.2 == 0) {
            let is_flush = |c: &&(u64, String, u64)| c.1 == "flush";
            points.extend(calls[..h].iter().rev().find(is_flush).map(|c| c.0));
            points.push(calls[h].0);
            let after = calls[h + 1..].iter().find(is_flush).map(|c| c.0);
            points.extend([after; 3].into_iter().flatten());
        }
        for (k, &point) in points.iter().enumerate() {
            let plugin_seed = seed * 100 + k as u64;
            let order = ["random", "ascending", "descending"][k % 3];
            let reproduce = format!(
                "workload seed {seed}, crash-after={point} seed={plugin_seed} order={order}, \
                 image -o '{}'{}",
                shape.opts,
                if shape.backing {
                    " with a backing file"
                } else {
                    ""
                }
            );
            let img = create(&dir, &shape, &format!("crash-{seed}-{k}.qcow2"));
            let trace = dir.path(&format!("crash-{seed}-{k}.trace"));
            let crash = Some((point, order));
            let s = serve_volatile(&dir, &shape, &img, &trace, plugin_seed, crash);
            let out = write(&s.uri(), seed, shape.count, shape.conns);
            // The cut may come with the last connection's goodbye, so
            // the server is let finish: after the cut nothing reaches the
            // file whatever it does.
            s.stop();
            let calls = std::fs::read_to_string(&trace).unwrap();
            let cut = calls
                .lines()
                .find(|l| l.starts_with("# volatile: power cut"))
                .unwrap_or_else(|| panic!("{reproduce}: the power was never cut:\n{calls}"))
                .to_string();
            let report = check(&img, true).unwrap_or_else(|e| panic!("{reproduce}: {cut}\n{e}"));
            let log = parse(&out, 0);
            let n = verify(&guest(&img, &dir), base, &log, false)
                .unwrap_or_else(|e| panic!("{reproduce}: {cut}\nqemu-img check:\n{report}\n{e}"));
            eprintln!("{reproduce}: {cut}; {n} written sectors checked");
            cuts += 1;
        }
    }
    eprintln!(
        "{cuts} power cuts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn power_cut_leaves_a_default_image_consistent_with_its_durable_writes() {
    power_cuts(SHAPE, &[1, 2]);
}

#[test]
fn power_cut_leaves_a_4k_cluster_image_with_new_l2_tables_consistent() {
    power_cuts(
        Shape {
            opts: "cluster_size=4k",
            ..SHAPE
        },
        &[3, 4],
    );
}

#[test]
fn power_cut_while_the_refcount_table_grows_leaves_the_image_consistent() {
    // 512-byte clusters of 64-bit refcounts: a refcount block covers 32
    // KiB and the first refcount table 2 MiB of the file.
    power_cuts(
        Shape {
            opts: "cluster_size=512,refcount_bits=64",
            ..SHAPE
        },
        &[5, 6],
    );
}

#[test]
fn power_cut_leaves_an_image_of_one_bit_refcounts_consistent() {
    power_cuts(
        Shape {
            opts: "cluster_size=4k,refcount_bits=1",
            ..SHAPE
        },
        &[7],
    );
}

#[test]
fn power_cut_leaves_a_version_2_image_consistent() {
    power_cuts(
        Shape {
            opts: "compat=0.10,cluster_size=4k",
            ..SHAPE
        },
        &[8],
    );
}

#[test]
fn power_cut_leaves_an_image_over_a_backing_file_consistent() {
    power_cuts(
        Shape {
            opts: "cluster_size=4k",
            backing: true,
            ..SHAPE
        },
        &[9],
    );
}

#[test]
fn power_cut_leaves_an_image_with_subclusters_consistent() {
    power_cuts(
        Shape {
            opts: "extended_l2=on,cluster_size=16k",
            ..SHAPE
        },
        &[10],
    );
}

#[test]
fn power_cut_with_two_connections_and_multi_conn_keeps_what_either_flushed() {
    power_cuts(
        Shape {
            opts: "cluster_size=4k",
            conns: 2,
            ..SHAPE
        },
        &[11],
    );
}

#[test]
fn power_cut_with_two_connections_without_multi_conn_keeps_what_each_flushed() {
    power_cuts(
        Shape {
            opts: "cluster_size=4k",
            conns: 2,
            multi_conn: false,
            ..SHAPE
        },
        &[12],
    );
}

/// Two writers, each on its own stripes and connection, against the
/// qcow2 filter over the file plugin; the server is killed with SIGKILL
/// once the first has had `acks` answers. Returns the writers' log.
fn write_then_kill(s: &mut Server, seed: u64, acks: usize) -> Log {
    let spawn = |stripe: u64| {
        client("python3")
            .args([
                "-c",
                WRITER,
                &s.uri(),
                &(seed + stripe).to_string(),
                "1000000",
                "1",
                &stripe.to_string(),
                "2",
                &(stripe * 1_000_000_000).to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn(0);
    let second = spawn(1);
    let other = std::thread::spawn(move || second.wait_with_output().unwrap());
    let mut text = String::new();
    let mut seen = 0;
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen += usize::from(line.contains("\"ok\": true"));
        text.push_str(&line);
        text.push('\n');
        if seen == acks {
            break;
        }
    }
    assert_eq!(seen, acks, "the first writer stopped early:\n{text}");
    s.signal(libc::SIGKILL);
    for line in lines {
        text.push_str(&line.unwrap());
        text.push('\n');
    }
    first.wait().unwrap();
    let second = other.join().unwrap();
    let mut log = parse(&text, 0);
    log.ops
        .extend(parse(&String::from_utf8_lossy(&second.stdout), 1).ops);
    log
}

/// SIGKILL at a random moment of two writers' work, over an image of
/// `opts`: the image checks without corruption and holds every durable
/// write. (`NBDHOST_TEST_CRASH_SEEDS` adds rounds here too.)
fn sigkill(opts: &'static str, seed: u64) {
    let extra: u64 = std::env::var("NBDHOST_TEST_CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for seed in std::iter::once(seed).chain((1..=extra).map(|i| seed * 1000 + i)) {
        let dir = TempDir::new("qcow2-kill");
        let img = create(&dir, &Shape { opts, ..SHAPE }, "kill.qcow2");
        let file = plugin("file");
        let mut s = Server::start(&[
            &filter_arg("qcow2"),
            file.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let acks = 150 + Rng(seed).below(250) as usize;
        let log = write_then_kill(&mut s, seed, acks);
        drop(s);
        let reproduce = format!("SIGKILL after {acks} answers, seed {seed}, -o '{opts}'");
        let report = check(&img, true).unwrap_or_else(|e| panic!("{reproduce}: {e}"));
        // Each writer's flushes cover only its own writes here.
        let log = Log {
            multi_conn: false,
            ..log
        };
        let n = verify(&guest(&img, &dir), Base::Zeroes, &log, false)
            .unwrap_or_else(|e| panic!("{reproduce}:\nqemu-img check:\n{report}\n{e}"));
        eprintln!("{reproduce}: {n} written sectors checked");
    }
}

#[test]
fn sigkill_leaves_a_4k_cluster_image_consistent_with_its_durable_writes() {
    sigkill("cluster_size=4k", 21);
}

#[test]
fn sigkill_leaves_a_default_image_consistent_with_its_durable_writes() {
    sigkill("", 22);
}

/// The oracle itself: a lost durable write is caught, a lost or landed
/// undurable one is not.
#[test]
fn the_check_of_durable_writes_tells_lost_from_allowed() {
    let op = |id, kind, fua, outcome| Op {
        id,
        kind,
        conn: 0,
        off: 0,
        len: SECTOR,
        fua,
        outcome,
    };
    let disk = |id: Option<u64>| match id {
        Some(id) => sector_data(id, 0),
        None => vec![0; SECTOR as usize],
    };
    let log = |ops| Log {
        ops,
        multi_conn: true,
    };
    // Write 1 with FUA, write 2 never flushed: either may be there.
    let fua_then_plain = log(vec![
        op(1, Kind::Write, true, Outcome::Acked),
        op(2, Kind::Write, false, Outcome::Acked),
    ]);
    assert!(verify(&disk(Some(1)), Base::Zeroes, &fua_then_plain, false).is_ok());
    assert!(verify(&disk(Some(2)), Base::Zeroes, &fua_then_plain, false).is_ok());
    assert!(verify(&disk(None), Base::Zeroes, &fua_then_plain, false).is_err());
    // Write 1 flushed: the flush makes it durable.
    let flushed = log(vec![
        op(1, Kind::Write, false, Outcome::Acked),
        op(2, Kind::Flush, false, Outcome::Acked),
    ]);
    assert!(verify(&disk(None), Base::Zeroes, &flushed, false).is_err());
    // A flush that failed makes nothing durable.
    let unflushed = log(vec![
        op(1, Kind::Write, false, Outcome::Acked),
        op(2, Kind::Flush, false, Outcome::Failed),
    ]);
    assert!(verify(&disk(None), Base::Zeroes, &unflushed, false).is_ok());
    // Another connection's flush counts only with multi-conn.
    let mut other = log(vec![
        op(1, Kind::Write, false, Outcome::Acked),
        Op {
            conn: 1,
            ..op(2, Kind::Flush, false, Outcome::Acked)
        },
    ]);
    assert!(verify(&disk(None), Base::Zeroes, &other, false).is_err());
    other.multi_conn = false;
    assert!(verify(&disk(None), Base::Zeroes, &other, false).is_ok());
    // Bytes nobody wrote are never allowed.
    let mut garbage = disk(Some(1));
    garbage[100] ^= 1;
    assert!(verify(&garbage, Base::Zeroes, &fua_then_plain, false).is_err());
}
