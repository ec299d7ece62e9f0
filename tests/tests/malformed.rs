//! Bad input from a hand-written client (real clients never send it): each
//! malformed option or request gets the error the protocol names, or a
//! logged reason and a closed connection, and nobody else is affected.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nbdhost_tests::{client, run_ok, Server};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_POLICY: u32 = 0x8000_0002;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_TOO_BIG: u32 = 0x8000_0009;
const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;

/// A raw NBD client over a Unix socket.
struct Raw {
    s: UnixStream,
}

impl Raw {
    /// Connect and read the newstyle greeting; send client flags.
    fn connect(server: &Server) -> Raw {
        let s = UnixStream::connect(&server.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        r.send(&1u32.to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend(IHAVEOPT.to_be_bytes());
        b.extend(opt.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        self.send(&b);
    }

    /// Read one option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    /// Read replies up to the final ACK (or an error); return their types.
    fn replies_until_done(&mut self) -> Vec<u32> {
        let mut types = Vec::new();
        loop {
            let (_, t, _) = self.reply();
            types.push(t);
            if t == REP_ACK || t & 0x8000_0000 != 0 {
                return types;
            }
        }
    }

    fn go(&mut self) {
        let mut d = Vec::new();
        d.extend(0u32.to_be_bytes());
        d.extend(0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let types = self.replies_until_done();
        assert_eq!(*types.last().unwrap(), REP_ACK, "{types:?}");
        assert!(types.contains(&REP_INFO));
    }

    fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::new();
        b.extend(0x2560_9513u32.to_be_bytes());
        b.extend(flags.to_be_bytes());
        b.extend(cmd.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.extend(payload);
        self.send(&b);
    }

    /// Read a simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    fn read_ok(&mut self, cookie: u64, len: usize) -> Vec<u8> {
        self.request(0, 0, cookie, 0, len as u32, &[]);
        assert_eq!(self.simple(), (0, cookie));
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).unwrap();
        d
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn server() -> Server {
    Server::start(&["--handshake-timeout", "2", "memory", "1M"])
}

fn still_serves(s: &Server) {
    run_ok(
        client("qemu-io")
            .args(["-f", "raw", "-c", "write -P 1 0 4k", "-c", "read -P 1 0 4k"])
            .arg(s.uri()),
    );
}

#[test]
fn bad_options_get_errors_and_negotiation_goes_on() {
    let s = server();
    let mut c = Raw::connect(&s);
    c.option(99, b"whatever");
    assert_eq!(c.reply().1, ERR_UNSUP);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply().1, ERR_INVALID);
    c.option(OPT_INFO, &[0, 0, 0, 9, 0]);
    assert_eq!(c.reply().1, ERR_INVALID);
    let mut meta = Vec::new();
    meta.extend(0u32.to_be_bytes());
    meta.extend(0u32.to_be_bytes());
    c.option(OPT_SET_META_CONTEXT, &meta);
    assert_eq!(
        c.reply().1,
        ERR_INVALID,
        "meta context needs structured replies first"
    );
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().1, ERR_POLICY);
    // An option over 64 KiB is refused and skipped, not stored.
    c.option(OPT_GO, &vec![0u8; 1 << 20]);
    assert_eq!(c.reply().1, ERR_TOO_BIG);
    c.go();
    assert_eq!(c.read_ok(1, 16), vec![0u8; 16]);
    still_serves(&s);
    assert!(s.stop().success());
}

#[test]
fn fatal_handshake_input_closes_only_that_connection() {
    let s = server();
    let mut bad = Raw::connect(&s);
    bad.send(&[0xaa; 16]);
    assert!(bad.closed());
    let mut long = Raw::connect(&s);
    long.option(OPT_EXPORT_NAME, &vec![b'x'; 100 * 1024]);
    assert!(long.closed());
    let mut abort = Raw::connect(&s);
    abort.option(OPT_ABORT, &[]);
    assert_eq!(abort.reply().1, REP_ACK);
    assert!(abort.closed());
    // A client that stalls is dropped after the handshake timeout.
    let mut stall = UnixStream::connect(&s.socket).unwrap();
    stall
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    let mut sink = Vec::new();
    let _ = stall.read_to_end(&mut sink);
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "stalled client kept for {:?}",
        t.elapsed()
    );
    still_serves(&s);
    let log = s.log_text();
    assert!(
        log.contains("bad magic") && log.contains("timed out"),
        "{log}"
    );
    assert!(s.stop().success());
}

#[test]
fn bad_requests_get_spec_errors_and_the_connection_goes_on() {
    let s = server();
    let mut c = Raw::connect(&s);
    c.go();
    c.request(0, 0, 2, (1 << 20) - 8, 16, &[]);
    assert_eq!(c.simple(), (EINVAL, 2), "read beyond the end");
    c.request(0, 42, 3, 0, 0, &[]);
    assert_eq!(c.simple(), (EINVAL, 3), "unknown command");
    c.request(1 << 3, 0, 4, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 4), "REQ_ONE on a read");
    c.request(0, 3, 5, 4096, 0, &[]);
    assert_eq!(c.simple(), (EINVAL, 5), "flush with an offset");
    c.request(0, 0, 6, 0, 0, &[]);
    assert_eq!(c.simple(), (EINVAL, 6), "zero-length read");
    // A 33 MiB write payload is refused and skipped.
    let big = vec![7u8; 33 << 20];
    c.request(0, 1, 7, 0, big.len() as u32, &big);
    assert_eq!(c.simple(), (EOVERFLOW, 7));
    assert_eq!(
        c.read_ok(8, 8),
        vec![0u8; 8],
        "the payload was skipped, not written"
    );
    // A batch in one write: every reply comes back with its cookie.
    let mut batch = Vec::new();
    for cookie in 10..20u64 {
        batch.extend(0x2560_9513u32.to_be_bytes());
        batch.extend(0u16.to_be_bytes());
        batch.extend(3u16.to_be_bytes());
        batch.extend(cookie.to_be_bytes());
        batch.extend(0u64.to_be_bytes());
        batch.extend(0u32.to_be_bytes());
    }
    c.send(&batch);
    let mut cookies: Vec<u64> = (0..10).map(|_| c.simple().1).collect();
    cookies.sort();
    assert_eq!(cookies, (10..20).collect::<Vec<_>>());
    // Garbage where a request should be ends the connection, with a reason.
    c.send(&[0x55; 28]);
    assert!(c.closed());
    assert!(s.log_text().contains("bad magic"), "{}", s.log_text());
    still_serves(&s);
    assert!(s.stop().success());
}

#[test]
fn extended_headers_and_structured_replies_on_the_wire() {
    let s = server();
    let mut c = Raw::connect(&s);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    let mut meta = Vec::new();
    meta.extend(0u32.to_be_bytes());
    meta.extend(1u32.to_be_bytes());
    meta.extend(15u32.to_be_bytes());
    meta.extend(b"base:allocation");
    c.option(OPT_SET_META_CONTEXT, &meta);
    assert_eq!(c.replies_until_done(), vec![REP_META_CONTEXT, REP_ACK]);
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    c.go();
    let ext = |flags: u16, cmd: u16, cookie: u64, offset: u64, len: u64| {
        let mut b = Vec::new();
        b.extend(0x21e4_1c71u32.to_be_bytes());
        b.extend(flags.to_be_bytes());
        b.extend(cmd.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b
    };
    let read_chunk = |c: &mut Raw| {
        let mut h = [0u8; 32];
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6e8a_278c);
        let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        c.s.read_exact(&mut d).unwrap();
        (typ, cookie, d)
    };
    let mut w = ext(1 << 5, 1, 1, 4096, 8);
    w.extend(b"extended");
    c.send(&w);
    assert_eq!(read_chunk(&mut c).0, 0, "NBD_REPLY_TYPE_NONE");
    c.send(&ext(0, 0, 2, 4096, 8));
    let (typ, cookie, d) = read_chunk(&mut c);
    assert_eq!((typ, cookie), (1, 2));
    assert_eq!(&d[8..], b"extended");
    // Unwritten data comes back as a hole.
    c.send(&ext(0, 0, 3, 512 * 1024, 256 * 1024));
    assert_eq!(read_chunk(&mut c).0, 2, "NBD_REPLY_TYPE_OFFSET_HOLE");
    // 64-bit block status.
    c.send(&ext(0, 7, 4, 0, 1 << 20));
    let (typ, _, d) = read_chunk(&mut c);
    assert_eq!(typ, 6, "NBD_REPLY_TYPE_BLOCK_STATUS_EXT");
    assert_eq!(
        u32::from_be_bytes(d[..4].try_into().unwrap()),
        1,
        "base:allocation id"
    );
    // A 64-bit effect length beyond the end is an error chunk.
    c.send(&ext(0, 4, 5, 0, 1 << 40));
    let (typ, cookie, d) = read_chunk(&mut c);
    assert_eq!((typ, cookie), (0x8001, 5));
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), EINVAL);
    assert!(s.stop().success());
}
