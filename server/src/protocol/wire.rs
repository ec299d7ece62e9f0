//! NBD wire format: constants, and pure encoders and decoders over byte
//! buffers. Nothing here touches a socket.
//!
//! Values follow `doc/proto.md` of the NBD project, including the
//! extended-headers extension.

use bytes::{Buf, BufMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// A handshake option the server knows (`NBD_OPT_*`). The option header
/// keeps the number the client sent ([`OptionHeader::option`]), so that a
/// reply, even to an option not named here, echoes it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Opt {
    ExportName = 1,
    Abort = 2,
    List = 3,
    StartTls = 5,
    Info = 6,
    Go = 7,
    StructuredReply = 8,
    ListMetaContext = 9,
    SetMetaContext = 10,
    ExtendedHeaders = 11,
}

impl Opt {
    /// The option a number on the wire names; `None` for one we do not
    /// know, which is answered with `NBD_REP_ERR_UNSUP`.
    pub fn from_wire(n: u32) -> Option<Opt> {
        Some(match n {
            1 => Opt::ExportName,
            2 => Opt::Abort,
            3 => Opt::List,
            5 => Opt::StartTls,
            6 => Opt::Info,
            7 => Opt::Go,
            8 => Opt::StructuredReply,
            9 => Opt::ListMetaContext,
            10 => Opt::SetMetaContext,
            11 => Opt::ExtendedHeaders,
            _ => return None,
        })
    }

    /// The option's number on the wire.
    pub const fn wire(self) -> u32 {
        self as u32
    }
}

impl From<Opt> for u32 {
    fn from(o: Opt) -> u32 {
        o.wire()
    }
}

/// The type of an option reply (`NBD_REP_*`): an answer, or an error with
/// the high bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum OptReply {
    Ack = 1,
    Server = 2,
    Info = 3,
    MetaContext = 4,
    ErrUnsup = REP_ERR | 1,
    ErrPolicy = REP_ERR | 2,
    ErrInvalid = REP_ERR | 3,
    ErrPlatform = REP_ERR | 4,
    ErrTlsReqd = REP_ERR | 5,
    ErrUnknown = REP_ERR | 6,
    ErrShutdown = REP_ERR | 7,
    ErrTooBig = REP_ERR | 9,
    ErrExtHeaderReqd = REP_ERR | 10,
}

/// The bit that marks an option reply as an error.
const REP_ERR: u32 = 1 << 31;

impl OptReply {
    /// The reply type a number on the wire names, as a client reads it;
    /// `None` for one we do not know.
    pub fn from_wire(n: u32) -> Option<OptReply> {
        use OptReply::*;
        [
            Ack,
            Server,
            Info,
            MetaContext,
            ErrUnsup,
            ErrPolicy,
            ErrInvalid,
            ErrPlatform,
            ErrTlsReqd,
            ErrUnknown,
            ErrShutdown,
            ErrTooBig,
            ErrExtHeaderReqd,
        ]
        .into_iter()
        .find(|r| r.wire() == n)
    }

    /// The reply type's number on the wire.
    pub const fn wire(self) -> u32 {
        self as u32
    }
}

/// A piece of information about an export (`NBD_INFO_*`), asked for by
/// `NBD_OPT_INFO` and `NBD_OPT_GO` and sent in `NBD_REP_INFO` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum InfoType {
    Export = 0,
    Name = 1,
    Description = 2,
    BlockSize = 3,
}

impl InfoType {
    /// The information a number on the wire names; `None` for one we do
    /// not know, which a request may carry and we ignore.
    pub fn from_wire(n: u16) -> Option<InfoType> {
        Some(match n {
            0 => InfoType::Export,
            1 => InfoType::Name,
            2 => InfoType::Description,
            3 => InfoType::BlockSize,
            _ => return None,
        })
    }

    /// The information's number on the wire.
    pub const fn wire(self) -> u16 {
        self as u16
    }
}

impl From<InfoType> for u16 {
    fn from(i: InfoType) -> u16 {
        i.wire()
    }
}

/// The type of a transmission request (`NBD_CMD_*`). The request header
/// keeps the number the client sent ([`Request::command`]); an unknown one
/// is refused with `EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Cmd {
    Read = 0,
    Write = 1,
    Disc = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
}

impl Cmd {
    /// The command a number on the wire names; `None` for one we do not
    /// know.
    pub fn from_wire(n: u16) -> Option<Cmd> {
        Some(match n {
            0 => Cmd::Read,
            1 => Cmd::Write,
            2 => Cmd::Disc,
            3 => Cmd::Flush,
            4 => Cmd::Trim,
            5 => Cmd::Cache,
            6 => Cmd::WriteZeroes,
            7 => Cmd::BlockStatus,
            _ => return None,
        })
    }

    /// The command's number on the wire.
    pub const fn wire(self) -> u16 {
        self as u16
    }
}

impl From<Cmd> for u16 {
    fn from(c: Cmd) -> u16 {
        c.wire()
    }
}

// Command flags: a set of bits, kept as the `u16` of the header, since
// what matters is which bits a command allows (a mask) and whether one is
// set; unknown bits must stay visible to be refused.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Errors.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Status flags of the `base:allocation` context.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Map a host errno to the nearest error the protocol can carry.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        0 => 0,
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EFBIG | libc::EDQUOT => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP | libc::ENOSYS => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Length of an option request header: magic, option, length.
pub const OPTION_HEADER_LEN: usize = 16;

/// An option request header; its payload follows on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Why the bytes on the wire cannot be a valid message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    BadMagic(u64),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::BadMagic(m) => write!(f, "bad magic 0x{m:x}"),
        }
    }
}

impl OptionHeader {
    /// Append this header, as a client sends it before `length` bytes of
    /// option data.
    pub fn put(&self, out: &mut impl BufMut) {
        out.put_u64(IHAVEOPT);
        out.put_u32(self.option);
        out.put_u32(self.length);
    }
}

/// Decode an option header from the front of `buf` without consuming it;
/// `None` if more bytes are needed.
pub fn peek_option_header(buf: &[u8]) -> Result<Option<OptionHeader>, WireError> {
    if buf.len() < OPTION_HEADER_LEN {
        return Ok(None);
    }
    let mut b = buf;
    let magic = b.get_u64();
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic(magic));
    }
    Ok(Some(OptionHeader {
        option: b.get_u32(),
        length: b.get_u32(),
    }))
}

/// Append an option reply to `option`, the number the client sent (echoed
/// even when we do not know it).
pub fn put_option_reply(out: &mut impl BufMut, option: u32, reply: OptReply, data: &[u8]) {
    out.put_u64(REPLY_MAGIC_OPT);
    out.put_u32(option);
    out.put_u32(reply.wire());
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// The server's first message in the newstyle handshake.
pub fn put_newstyle_greeting(out: &mut impl BufMut, flags: u16) {
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(flags);
}

/// The whole oldstyle handshake.
pub fn put_oldstyle_greeting(out: &mut impl BufMut, size: u64, flags: u16) {
    out.put_u64(NBDMAGIC);
    out.put_u64(OLDSTYLE_MAGIC);
    out.put_u64(size);
    out.put_u32(u32::from(flags));
    out.put_bytes(0, 124);
}

/// A decoded transmission request. For writes, `length` is the payload
/// length that follows the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Bytes of payload that follow this request's header on the wire.
    ///
    /// A write always carries its data, even in extended mode without
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`: qemu 10 omits the flag, and nbdkit and
    /// qemu-nbd accept that, so we do too.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let write = self.command == Cmd::Write.wire();
        if write || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }

    /// Append this request's header in the negotiated style, as a client
    /// sends it; a compact header carries the low 32 bits of the length.
    pub fn put(&self, out: &mut impl BufMut, extended: bool) {
        out.put_u32(if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        });
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        if extended {
            out.put_u64(self.length);
        } else {
            out.put_u32(self.length as u32);
        }
    }
}

/// Size of a request header in the negotiated style.
pub fn request_header_len(extended: bool) -> usize {
    if extended {
        32
    } else {
        28
    }
}

/// Decode a request header from the front of `buf` without consuming it.
pub fn peek_request(buf: &[u8], extended: bool) -> Result<Option<Request>, WireError> {
    if buf.len() < request_header_len(extended) {
        return Ok(None);
    }
    let mut b = buf;
    let magic = b.get_u32();
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(WireError::BadMagic(u64::from(magic)));
    }
    let flags = b.get_u16();
    let command = b.get_u16();
    let cookie = b.get_u64();
    let offset = b.get_u64();
    let length = if extended {
        b.get_u64()
    } else {
        u64::from(b.get_u32())
    };
    Ok(Some(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    }))
}

/// Which reply headers the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    Simple,
    Structured,
    Extended,
}

/// Encodes reply headers for one request in the negotiated style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub style: ReplyStyle,
    pub cookie: u64,
    pub offset: u64,
}

impl ReplyHeader {
    /// A simple reply header (compact style only).
    pub fn put_simple(&self, out: &mut impl BufMut, error: u32) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(error);
        out.put_u64(self.cookie);
    }

    /// A structured or extended chunk header announcing `len` payload bytes.
    pub fn put_chunk(&self, out: &mut impl BufMut, flags: u16, typ: u16, len: u64) {
        if self.style == ReplyStyle::Extended {
            out.put_u32(EXTENDED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(self.cookie);
            out.put_u64(self.offset);
            out.put_u64(len);
        } else {
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(self.cookie);
            out.put_u32(len as u32);
        }
    }

    /// A reply with no payload: success or a bare error.
    pub fn put_status(&self, out: &mut impl BufMut, error: u32, message: &str) {
        match (self.style, error) {
            (ReplyStyle::Simple, _) => self.put_simple(out, error),
            (ReplyStyle::Structured, 0) => self.put_simple(out, 0),
            (ReplyStyle::Extended, 0) => self.put_chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
            _ => self.put_error_chunk(out, error, message),
        }
    }

    /// A final error chunk carrying a message for the user.
    pub fn put_error_chunk(&self, out: &mut impl BufMut, error: u32, message: &str) {
        let msg = &message.as_bytes()[..message.len().min(4096)];
        self.put_chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u64);
        out.put_u32(error);
        out.put_u16(msg.len() as u16);
        out.put_slice(msg);
    }
}

/// One extent as reported to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// Append a block-status reply for one metadata context.
pub fn put_block_status(
    out: &mut impl BufMut,
    hdr: &ReplyHeader,
    context_id: u32,
    extents: &[Extent],
) {
    if hdr.style == ReplyStyle::Extended {
        hdr.put_chunk(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            8 + 16 * extents.len() as u64,
        );
        out.put_u32(context_id);
        out.put_u32(extents.len() as u32);
        for e in extents {
            out.put_u64(e.length);
            out.put_u64(u64::from(e.flags));
        }
    } else {
        hdr.put_chunk(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * extents.len() as u64,
        );
        out.put_u32(context_id);
        for e in extents {
            out.put_u32(e.length as u32);
            out.put_u32(e.flags);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn compact_and_extended_requests_decode() {
        let mut b = BytesMut::new();
        let write = Request {
            flags: CMD_FLAG_FUA,
            command: Cmd::Write.into(),
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        write.put(&mut b, false);
        let r = peek_request(&b, false).unwrap().unwrap();
        assert_eq!(r, write);
        assert_eq!(
            (r.command, r.cookie, r.offset, r.length),
            (Cmd::Write.wire(), 7, 4096, 512)
        );
        assert_eq!(r.payload_len(false), 512);
        assert!(peek_request(&b[..27], false).unwrap().is_none());
        let mut padded = b.clone();
        padded.put_u32(0);
        assert!(
            peek_request(&padded, true).is_err(),
            "compact magic in extended mode"
        );

        let mut e = BytesMut::new();
        Request {
            flags: 0,
            command: Cmd::Trim.into(),
            cookie: 9,
            offset: 0,
            length: 1 << 40,
        }
        .put(&mut e, true);
        let r = peek_request(&e, true).unwrap().unwrap();
        assert_eq!(r.length, 1 << 40);
        assert_eq!(r.payload_len(true), 0);
    }

    #[test]
    fn status_replies_follow_style() {
        let mk = |style| ReplyHeader {
            style,
            cookie: 1,
            offset: 0,
        };
        let mut o = BytesMut::new();
        mk(ReplyStyle::Simple).put_status(&mut o, EIO, "x");
        assert_eq!(o.len(), 16);
        o.clear();
        mk(ReplyStyle::Structured).put_status(&mut o, EIO, "bad");
        assert_eq!(o.len(), 20 + 6 + 3);
        o.clear();
        mk(ReplyStyle::Extended).put_status(&mut o, 0, "");
        assert_eq!(o.len(), 32);
        assert_eq!(&o[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
    }

    #[test]
    fn option_header_rejects_bad_magic() {
        let mut b = BytesMut::new();
        b.put_u64(0x1234);
        b.put_u32(1);
        b.put_u32(0);
        assert_eq!(peek_option_header(&b), Err(WireError::BadMagic(0x1234)));
    }

    #[test]
    fn option_headers_round_trip() {
        let h = OptionHeader {
            option: Opt::Go.into(),
            length: 6,
        };
        let mut b = Vec::new();
        h.put(&mut b);
        assert_eq!(peek_option_header(&b), Ok(Some(h)));
        assert_eq!(peek_option_header(&b[..15]), Ok(None));
    }
}
