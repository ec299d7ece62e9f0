//! A small hand-written NBD client over a Unix socket, for sending what
//! real clients never send: every byte on the wire is the caller's choice.
//!
//! Every read has a timeout, so a server that says nothing makes the test
//! fail instead of hang.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// Longest a raw client waits for any one read.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(10);

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

/// What the server said about an export in `NBD_OPT_INFO`/`NBD_OPT_GO`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFacts {
    pub size: u64,
    pub flags: u16,
    /// `(minimum, preferred, maximum)` if `NBD_INFO_BLOCK_SIZE` was sent.
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
}

/// One transmission reply header, in any of the three styles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply; for a successful read its data follows on the wire
    /// (read it with [`RawClient::read_data`]).
    Simple { error: u32, cookie: u64 },
    /// A structured (compact) or extended chunk with its whole payload.
    Chunk(Chunk),
}

/// A structured or extended reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub extended: bool,
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    /// The header's offset field (extended headers only; 0 otherwise).
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Chunk {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
    /// For an error chunk: the errno and the message.
    pub fn error(&self) -> (u32, String) {
        assert_eq!(self.typ, REPLY_TYPE_ERROR, "{self:?}");
        let len = be16(&self.data[4..]) as usize;
        assert_eq!(self.data.len(), 6 + len, "error chunk length");
        (
            be32(&self.data),
            String::from_utf8_lossy(&self.data[6..]).into_owned(),
        )
    }
}

/// A length-prefixed string as options carry them.
pub fn put_name(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u32).to_be_bytes());
    out.extend(s);
}

/// The payload of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    put_name(&mut d, name.as_bytes());
    d.extend((infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend(i.to_be_bytes());
    }
    d
}

/// The payload of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    put_name(&mut d, export.as_bytes());
    d.extend((queries.len() as u32).to_be_bytes());
    for q in queries {
        put_name(&mut d, q.as_bytes());
    }
    d
}

/// The bytes of one option request.
pub fn option_bytes(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend(IHAVEOPT.to_be_bytes());
    b.extend(opt.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    b
}

/// The bytes of one compact (28-byte header) request and its payload.
pub fn request_bytes(
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + payload.len());
    b.extend(REQUEST_MAGIC.to_be_bytes());
    b.extend(flags.to_be_bytes());
    b.extend(cmd.to_be_bytes());
    b.extend(cookie.to_be_bytes());
    b.extend(offset.to_be_bytes());
    b.extend(len.to_be_bytes());
    b.extend(payload);
    b
}

/// The bytes of one extended (32-byte header) request and its payload.
pub fn ext_request_bytes(
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + payload.len());
    b.extend(EXTENDED_REQUEST_MAGIC.to_be_bytes());
    b.extend(flags.to_be_bytes());
    b.extend(cmd.to_be_bytes());
    b.extend(cookie.to_be_bytes());
    b.extend(offset.to_be_bytes());
    b.extend(len.to_be_bytes());
    b.extend(payload);
    b
}

/// A raw NBD client.
pub struct RawClient {
    pub s: UnixStream,
    /// The handshake flags from the greeting.
    pub server_flags: u16,
}

impl RawClient {
    /// Connect with read and write timeouts; read nothing yet.
    pub fn connect_only(socket: &Path) -> RawClient {
        let s = UnixStream::connect(socket).expect("connect to nbdhost");
        s.set_read_timeout(Some(RAW_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(RAW_TIMEOUT)).unwrap();
        RawClient { s, server_flags: 0 }
    }

    /// Connect and read the fixed-newstyle greeting; send no flags yet.
    pub fn greeted(socket: &Path) -> RawClient {
        let mut c = RawClient::connect_only(socket);
        let g = c.read_exact(18);
        assert_eq!(be64(&g), NBDMAGIC, "greeting magic");
        assert_eq!(be64(&g[8..]), IHAVEOPT, "newstyle magic");
        c.server_flags = be16(&g[16..]);
        assert!(
            c.server_flags & FLAG_FIXED_NEWSTYLE != 0,
            "fixed newstyle offered"
        );
        c
    }

    /// Connect, read the greeting and send the client flags
    /// (`FIXED_NEWSTYLE | NO_ZEROES`): ready for options.
    pub fn connect(socket: &Path) -> RawClient {
        let mut c = RawClient::greeted(socket);
        c.send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to nbdhost");
    }

    /// Read exactly `n` bytes, panicking on EOF or timeout.
    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes from nbdhost: {e}"));
        v
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&option_bytes(opt, data));
    }

    /// Read one option reply.
    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.read_exact(20);
        assert_eq!(be64(&h), REPLY_MAGIC_OPT, "option reply magic");
        let len = be32(&h[16..]) as usize;
        OptReply {
            option: be32(&h[8..]),
            typ: be32(&h[12..]),
            data: self.read_exact(len),
        }
    }

    /// Read option replies up to and including the final ACK or error.
    pub fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.typ == REP_ACK || r.typ & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Send one option and expect a single reply of type `typ` to it.
    pub fn expect_opt(&mut self, opt: u32, data: &[u8], typ: u32) -> OptReply {
        self.option(opt, data);
        let r = self.opt_reply();
        assert_eq!(
            (r.option, r.typ),
            (opt, typ),
            "reply to option {opt}: {:?}",
            String::from_utf8_lossy(&r.data)
        );
        r
    }

    /// Send `NBD_OPT_INFO` or `NBD_OPT_GO` for `name` and parse the
    /// successful answer.
    pub fn info(&mut self, opt: u32, name: &str, infos: &[u16]) -> ExportFacts {
        self.option(opt, &info_request(name, infos));
        let replies = self.opt_replies();
        let last = replies.last().unwrap();
        assert_eq!((last.option, last.typ), (opt, REP_ACK), "{replies:?}");
        let mut f = ExportFacts::default();
        let mut saw_export = false;
        for r in &replies[..replies.len() - 1] {
            assert_eq!((r.option, r.typ), (opt, REP_INFO), "{r:?}");
            match be16(&r.data) {
                INFO_EXPORT => {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                    f.size = be64(&r.data[2..]);
                    f.flags = be16(&r.data[10..]);
                    saw_export = true;
                }
                INFO_NAME => f.name = Some(String::from_utf8_lossy(&r.data[2..]).into_owned()),
                INFO_BLOCK_SIZE => {
                    assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                    f.block_size =
                        Some((be32(&r.data[2..]), be32(&r.data[6..]), be32(&r.data[10..])));
                }
                _ => {}
            }
        }
        assert!(saw_export, "NBD_INFO_EXPORT missing: {replies:?}");
        f
    }

    /// `NBD_OPT_GO` for the default export.
    pub fn go(&mut self) -> ExportFacts {
        self.info(OPT_GO, "", &[])
    }

    /// Send a compact request.
    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&request_bytes(flags, cmd, cookie, offset, len, &[]));
    }

    /// Send a compact write with its payload.
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send(&request_bytes(
            0,
            CMD_WRITE,
            cookie,
            offset,
            data.len() as u32,
            data,
        ));
    }

    /// Read one reply header (and a chunk's payload).
    pub fn reply(&mut self) -> Reply {
        let m = self.read_exact(4);
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let h = self.read_exact(12);
                Reply::Simple {
                    error: be32(&h),
                    cookie: be64(&h[4..]),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let h = self.read_exact(16);
                let len = be32(&h[12..]) as usize;
                Reply::Chunk(Chunk {
                    extended: false,
                    flags: be16(&h),
                    typ: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    offset: 0,
                    data: self.read_exact(len),
                })
            }
            EXTENDED_REPLY_MAGIC => {
                let h = self.read_exact(28);
                let len = be64(&h[20..]);
                assert!(len < 64 << 20, "chunk of {len} bytes");
                Reply::Chunk(Chunk {
                    extended: true,
                    flags: be16(&h),
                    typ: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    offset: be64(&h[12..]),
                    data: self.read_exact(len as usize),
                })
            }
            other => panic!("bad reply magic 0x{other:08x}"),
        }
    }

    /// Read a simple reply: `(error, cookie)`.
    pub fn simple(&mut self) -> (u32, u64) {
        match self.reply() {
            Reply::Simple { error, cookie } => (error, cookie),
            r => panic!("expected a simple reply, got {r:?}"),
        }
    }

    /// Read a structured or extended chunk.
    pub fn chunk(&mut self) -> Chunk {
        match self.reply() {
            Reply::Chunk(c) => c,
            r => panic!("expected a chunk, got {r:?}"),
        }
    }

    /// The data after a successful simple read reply.
    pub fn read_data(&mut self, len: usize) -> Vec<u8> {
        self.read_exact(len)
    }

    /// A compact read with simple replies that must succeed.
    pub fn read_ok(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len);
        assert_eq!(self.simple(), (0, cookie), "read {len} at {offset}");
        self.read_data(len as usize)
    }

    /// Wait until the server closes the connection (EOF or reset); return
    /// whatever it sent first. Panics if it is still open after the
    /// timeout.
    pub fn wait_closed(&mut self) -> Vec<u8> {
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "connection still open after {:?} (got {} bytes)",
                        start.elapsed(),
                        got.len()
                    )
                }
                Err(_) => return got,
            }
        }
    }

    /// Whether the connection is still open: nothing arrives within
    /// `wait`, and no EOF.
    pub fn is_open(&mut self, wait: Duration) -> bool {
        self.s.set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 1];
        let r = self.s.read(&mut b);
        self.s.set_read_timeout(Some(RAW_TIMEOUT)).unwrap();
        match r {
            Ok(0) => false,
            Ok(_) => panic!("unexpected byte 0x{:02x} from the server", b[0]),
            Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }
}
