//! libnbd through nbdsh issues every command and flag the server offers,
//! checking the data against a reference kept in Python, and checks the
//! errors the NBD specification names for bad requests.

use nbdhost_tests::{client, nbdsh, run, run_ok, Server};

const EVERY_COMMAND: &str = r#"
import errno, random
size = h.get_size()
ref = bytearray(size)
rnd = random.Random(7)

def check(off, n):
    got = h.pread(n, off)
    assert got == ref[off:off+n], "mismatch at %d+%d" % (off, n)

assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
assert h.can_fast_zero() and h.can_cache() and h.can_df() and h.can_multi_conn()
assert not h.is_read_only()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024

for i in range(40):
    off = rnd.randrange(0, size - 70000)
    n = rnd.randrange(1, 70000)
    data = bytes(rnd.getrandbits(8) for _ in range(64)) * (n // 64 + 1)
    data = data[:n]
    flags = nbd.CMD_FLAG_FUA if i % 2 else 0
    h.pwrite(data, off, flags)
    ref[off:off+n] = data
    check(off, n)

h.flush()
h.trim(65536, 131072)
ref[131072:196608] = bytes(65536)
h.trim(4096, 8192, nbd.CMD_FLAG_FUA)
ref[8192:12288] = bytes(4096)
h.zero(100000, 300000)
ref[300000:400000] = bytes(100000)
h.zero(5000, 500000, nbd.CMD_FLAG_NO_HOLE)
ref[500000:505000] = bytes(5000)
h.zero(65536, 655360, nbd.CMD_FLAG_FAST_ZERO)
ref[655360:720896] = bytes(65536)
h.cache(1 << 20, 0)
check(0, size)

# Structured read with DF: exactly one data chunk.
chunks = []
def chunk(subbuf, offset, status, err):
    chunks.append((offset, len(subbuf), status))
    return 0
buf = h.pread_structured(300000, 0, chunk, nbd.CMD_FLAG_DF)
assert buf == ref[:300000]
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks

# Without DF a long zero run comes back as a hole.
chunks.clear()
buf = h.pread_structured(131072, 1048576, chunk)
assert buf == ref[1048576:1048576+131072]
assert any(c[2] == nbd.READ_HOLE for c in chunks), chunks

# Block status, with and without REQ_ONE.
entries = []
def extents(metacontext, offset, e, err):
    assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
    entries.append(list(e))
    return 0
h.block_status(size, 0, extents)
flat = entries[-1]
assert sum(flat[0::2]) >= size - 0, flat
h.block_status(size, 0, extents, nbd.CMD_FLAG_REQ_ONE)
assert len(entries[-1]) == 2, entries[-1]
h.block_status(65536, 4 * 1024 * 1024 - 65536, extents)
assert entries[-1][1] & nbd.STATE_HOLE, entries[-1]

# Errors, each followed by a request that still works. libnbd checks
# bounds itself unless told not to; the server's answers are under test.
h.set_strict_mode(0)
def fails(fn, want):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno in (want, errno.errorcode.get(want)), (e.errno, want)
    else:
        raise AssertionError("expected errno %d" % want)
    check(0, 512)

fails(lambda: h.pread(512, size - 256), errno.EINVAL)
fails(lambda: h.pwrite(b"x" * 512, size - 256), errno.ENOSPC)
fails(lambda: h.trim(512, size), errno.EINVAL)
fails(lambda: h.zero(512, size - 256), errno.ENOSPC)
fails(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
print("ok")
"#;

#[test]
fn every_command_and_flag_matches_a_reference() {
    let s = Server::start(&["memory", "4M"]);
    let out =
        run_ok(client("nbdsh").args(["--base-allocation", "-u", &s.uri(), "-c", EVERY_COMMAND]));
    assert_eq!(out.trim(), "ok");
    assert!(s.stop().success());
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let s = Server::start(&["-r", "memory", "1M"]);
    let out = nbdsh(
        &s.uri(),
        r#"
import errno
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero() and not h.can_fua()
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write succeeded")
except nbd.Error as e:
    assert e.errno in (errno.EPERM, "EPERM"), e.errno
print(h.pread(4, 0))
"#,
    );
    assert!(out.contains(r"\x00\x00\x00\x00"), "{out}");
    assert!(s.stop().success());
}

#[test]
fn without_structured_replies_reads_still_work() {
    let s = Server::start(&["--no-sr", "memory", "1M"]);
    let out = nbdsh(
        &s.uri(),
        r#"
assert not h.can_df()
assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"abc" * 1000, 10)
assert h.pread(3000, 10) == b"abc" * 1000
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    drop(s);
    // The client side may decline them too.
    let s = Server::start(&["memory", "1M"]);
    let out = run(client("nbdsh").args([
        "-c",
        "h.set_request_structured_replies(False)",
        "-u",
        &s.uri(),
        "-c",
        "h.pwrite(b'q' * 4096, 0); assert h.pread(4096, 0) == b'q' * 4096; assert not h.can_df(); print('ok')",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert!(s.stop().success());
}

#[test]
fn no_multi_conn_flag_is_honoured() {
    let s = Server::start(&["--no-mc", "memory", "1M"]);
    assert_eq!(nbdsh(&s.uri(), "print(h.can_multi_conn())").trim(), "False");
    assert!(s.stop().success());
}
