//! The transmission phase over byte buffers: decoding and validating
//! requests, and encoding replies. Nothing here touches a socket or the
//! backend.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::backend::Extent;
use crate::export::MAX_PAYLOAD;
use crate::handshake::{Negotiated, CONTEXT_BASE_ALLOCATION};
use crate::wire::{self, *};

/// A validated command, ready for the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        len: u32,
        df: bool,
    },
    Write {
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        len: u64,
        fua: bool,
    },
    Zero {
        len: u64,
        fua: bool,
        may_trim: bool,
        fast: bool,
    },
    Cache {
        len: u64,
    },
    BlockStatus {
        len: u64,
        req_one: bool,
    },
}

/// A validated request and how to address its reply.
#[derive(Debug, Clone)]
pub struct Op {
    pub reply: ReplyHeader,
    pub offset: u64,
    pub command: Command,
}

/// The outcome of looking at the front of the input buffer.
#[derive(Debug)]
pub enum Decoded {
    /// Not a whole request yet.
    NeedMore,
    /// A valid request.
    Op(Op),
    /// An invalid request, already answered with this error reply.
    Rejected(BytesMut),
    /// `NBD_CMD_DISC`: finish in-flight requests, then close.
    Disconnect,
    /// The stream cannot be trusted any more: close at once.
    Fatal(String),
}

/// Decodes one connection's requests.
#[derive(Debug)]
pub struct Decoder {
    session: Negotiated,
    /// Payload of a refused oversized write still to be skipped.
    discard: u64,
}

type Refusal = (u32, &'static str);

impl Decoder {
    /// A decoder for what negotiation settled.
    pub fn new(session: Negotiated) -> Self {
        Decoder {
            session,
            discard: 0,
        }
    }

    /// The negotiated session.
    pub fn session(&self) -> &Negotiated {
        &self.session
    }

    fn extended(&self) -> bool {
        self.session.style == ReplyStyle::Extended
    }

    /// How many more bytes the request at the front needs, as a hint for
    /// how much to read (0 if unknown or complete).
    pub fn wanted(&self, buf: &[u8]) -> usize {
        match peek_request(buf, self.extended()) {
            Ok(Some(r)) => {
                let total =
                    request_header_len(self.extended()) as u64 + r.payload_len(self.extended());
                (total.min(u64::from(MAX_PAYLOAD) + 64) as usize).saturating_sub(buf.len())
            }
            _ => 0,
        }
    }

    /// Decode the request at the front of `buf`, consuming it if whole.
    pub fn next(&mut self, buf: &mut BytesMut) -> Decoded {
        if self.discard > 0 {
            let n = self.discard.min(buf.len() as u64);
            buf.advance(n as usize);
            self.discard -= n;
            if self.discard > 0 {
                return Decoded::NeedMore;
            }
        }
        let ext = self.extended();
        let req = match peek_request(buf, ext) {
            Ok(Some(r)) => r,
            Ok(None) => return Decoded::NeedMore,
            Err(e) => return Decoded::Fatal(format!("request: {e}")),
        };
        let reply = ReplyHeader {
            style: self.session.style,
            cookie: req.cookie,
            offset: req.offset,
        };
        let hlen = request_header_len(ext);
        let payload = req.payload_len(ext);
        if payload > u64::from(MAX_PAYLOAD) {
            if payload > u64::from(u32::MAX) {
                return Decoded::Fatal(format!("request payload of {payload} bytes is too large"));
            }
            // Skip the payload as it arrives rather than buffering it, so
            // the client can go on after the error.
            buf.advance(hlen);
            self.discard = payload;
            let mut out = BytesMut::new();
            reply.put_status(&mut out, EOVERFLOW, "request payload too large");
            return Decoded::Rejected(out);
        }
        if buf.len() < hlen + payload as usize {
            return Decoded::NeedMore;
        }
        buf.advance(hlen);
        let data = buf.split_to(payload as usize).freeze();
        if req.command == CMD_DISC {
            return Decoded::Disconnect;
        }
        match self.validate(&req, data) {
            Ok(command) => Decoded::Op(Op {
                reply,
                offset: req.offset,
                command,
            }),
            Err((errno, msg)) => {
                let mut out = BytesMut::new();
                reply.put_status(&mut out, errno, msg);
                Decoded::Rejected(out)
            }
        }
    }

    fn validate(&self, r: &wire::Request, data: Bytes) -> Result<Command, Refusal> {
        let e = &self.session.export;
        let known = match r.command {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE if self.extended() => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE => CMD_FLAG_FUA,
            CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_FLUSH | CMD_CACHE => 0,
            _ => return Err((EINVAL, "unknown command")),
        };
        if r.flags & !known != 0 {
            return Err((EINVAL, "invalid flags for this command"));
        }
        let flag = |f: u16| r.flags & f != 0;
        if flag(CMD_FLAG_DF) && self.session.style == ReplyStyle::Simple {
            return Err((EINVAL, "DF needs structured replies"));
        }
        if flag(CMD_FLAG_FUA) && !e.can_fua {
            return Err((EINVAL, "FUA was not advertised"));
        }
        if flag(CMD_FLAG_FAST_ZERO) && !e.can_fast_zero {
            return Err((EINVAL, "fast zero was not advertised"));
        }
        let len = if r.command == CMD_WRITE {
            data.len() as u64
        } else {
            r.length
        };
        if r.command == CMD_FLUSH {
            if r.offset != 0 || len != 0 {
                return Err((EINVAL, "flush offset and length must be zero"));
            }
            if !e.can_flush {
                return Err((EINVAL, "flush was not advertised"));
            }
            return Ok(Command::Flush);
        }
        if len == 0 {
            return Err((EINVAL, "zero-length request"));
        }
        let writes = matches!(r.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && e.readonly {
            return Err((EPERM, "export is read-only"));
        }
        let end = r.offset.checked_add(len);
        if end.is_none_or(|end| end > e.size) {
            // As nbdkit does: only data-writing commands run out of space.
            let errno = if matches!(r.command, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return Err((errno, "request is beyond the end of the export"));
        }
        let min = u64::from(e.min_block);
        if min > 1 && (r.offset % min != 0 || len % min != 0) {
            return Err((EINVAL, "request is not aligned to the minimum block size"));
        }
        Ok(match r.command {
            CMD_READ => {
                if len > u64::from(MAX_PAYLOAD) {
                    return Err((EOVERFLOW, "read is larger than the maximum payload"));
                }
                Command::Read {
                    len: len as u32,
                    df: flag(CMD_FLAG_DF),
                }
            }
            CMD_WRITE => Command::Write {
                data,
                fua: flag(CMD_FLAG_FUA),
            },
            CMD_TRIM if e.can_trim => Command::Trim {
                len,
                fua: flag(CMD_FLAG_FUA),
            },
            CMD_WRITE_ZEROES if e.can_zero => Command::Zero {
                len,
                fua: flag(CMD_FLAG_FUA),
                may_trim: !flag(CMD_FLAG_NO_HOLE),
                fast: flag(CMD_FLAG_FAST_ZERO),
            },
            CMD_CACHE if e.can_cache => Command::Cache { len },
            CMD_BLOCK_STATUS if self.session.base_allocation => Command::BlockStatus {
                len,
                req_one: flag(CMD_FLAG_REQ_ONE),
            },
            _ => return Err((EINVAL, "command was not advertised or negotiated")),
        })
    }
}

/// Smallest run of zeroes worth a hole chunk inside a read reply.
const HOLE_MIN: usize = 64 * 1024;
/// Granularity at which read data is checked for zeroes.
const ZERO_BLOCK: usize = 4096;

fn is_zero(b: &[u8]) -> bool {
    // Comparing the slice with itself shifted by one lets memcmp do the
    // scan at full speed: all bytes equal the first, and the first is 0.
    b.first()
        .is_none_or(|&f| f == 0 && b[..b.len() - 1] == b[1..])
}

/// Encode the reply to a successful read of `data` at `offset`.
///
/// With structured or extended replies, runs of zeroes become hole chunks
/// (unless the client asked for `DF`), so sparse regions cost a few bytes
/// on the wire instead of their length.
pub fn read_reply(hdr: &ReplyHeader, offset: u64, df: bool, data: Vec<u8>) -> Vec<Bytes> {
    let data = Bytes::from(data);
    let mut head = BytesMut::with_capacity(64);
    if hdr.style == ReplyStyle::Simple {
        hdr.put_simple(&mut head, 0);
        return vec![head.freeze(), data];
    }
    let segments = if df {
        vec![(0, data.len(), false)]
    } else {
        segments(&data)
    };
    let mut parts = Vec::with_capacity(segments.len() * 2);
    let last = segments.len() - 1;
    for (i, (start, end, hole)) in segments.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let mut h = BytesMut::with_capacity(48);
        if hole {
            hdr.put_chunk(&mut h, flags, REPLY_TYPE_OFFSET_HOLE, 12);
            h.put_u64(offset + start as u64);
            h.put_u32((end - start) as u32);
            parts.push(h.freeze());
        } else {
            hdr.put_chunk(
                &mut h,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                8 + (end - start) as u64,
            );
            h.put_u64(offset + start as u64);
            parts.push(h.freeze());
            parts.push(data.slice(start..end));
        }
    }
    parts
}

/// Split read data into `(start, end, is_hole)` segments.
fn segments(data: &[u8]) -> Vec<(usize, usize, bool)> {
    if is_zero(data) {
        return vec![(0, data.len(), true)];
    }
    if data.len() < 2 * HOLE_MIN {
        return vec![(0, data.len(), false)];
    }
    let mut segs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + ZERO_BLOCK).min(data.len());
        let hole = is_zero(&data[pos..end]);
        match segs.last_mut() {
            Some(s) if s.2 == hole => s.1 = end,
            _ => segs.push((pos, end, hole)),
        }
        pos = end;
    }
    // Short zero runs are cheaper sent as data than as extra chunks.
    let mut merged: Vec<(usize, usize, bool)> = Vec::with_capacity(segs.len());
    for (s, e, hole) in segs {
        let hole = hole && e - s >= HOLE_MIN;
        match merged.last_mut() {
            Some(m) if !m.2 && !hole => m.1 = e,
            _ => merged.push((s, e, hole)),
        }
    }
    merged
}

/// Encode the reply to a successful block-status request.
pub fn block_status_reply(
    hdr: &ReplyHeader,
    offset: u64,
    len: u64,
    req_one: bool,
    extents: &[Extent],
) -> BytesMut {
    let end = offset + len;
    let mut out_extents = Vec::with_capacity(extents.len().min(1024));
    for e in extents {
        let s = e.offset.max(offset);
        let t = (e.offset + e.length).min(end);
        if t <= s {
            continue;
        }
        out_extents.push(wire::Extent {
            length: t - s,
            flags: e.flags & (STATE_HOLE | STATE_ZERO),
        });
        if req_one {
            break;
        }
    }
    if out_extents.is_empty() {
        out_extents.push(wire::Extent {
            length: len,
            flags: 0,
        });
    }
    let mut out = BytesMut::with_capacity(40 + 16 * out_extents.len());
    put_block_status(&mut out, hdr, CONTEXT_BASE_ALLOCATION, &out_extents);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::test_export;

    fn decoder(style: ReplyStyle) -> Decoder {
        Decoder::new(Negotiated {
            style,
            base_allocation: true,
            export: test_export(1 << 20),
        })
    }

    fn request(b: &mut BytesMut, flags: u16, cmd: u16, offset: u64, len: u32) {
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(flags);
        b.put_u16(cmd);
        b.put_u64(0x1234);
        b.put_u64(offset);
        b.put_u32(len);
    }

    fn rejected_errno(d: Decoded) -> u32 {
        let Decoded::Rejected(b) = d else {
            panic!("{d:?}")
        };
        u32::from_be_bytes(b[4..8].try_into().unwrap())
    }

    #[test]
    fn batches_of_requests_decode_in_order() {
        let mut d = decoder(ReplyStyle::Simple);
        let mut b = BytesMut::new();
        request(&mut b, 0, CMD_WRITE, 0, 4);
        b.put_slice(b"abcd");
        request(&mut b, 0, CMD_READ, 0, 4);
        request(&mut b, 0, CMD_DISC, 0, 0);
        let Decoded::Op(w) = d.next(&mut b) else {
            panic!()
        };
        assert_eq!(
            w.command,
            Command::Write {
                data: Bytes::from_static(b"abcd"),
                fua: false
            }
        );
        let Decoded::Op(r) = d.next(&mut b) else {
            panic!()
        };
        assert_eq!(r.command, Command::Read { len: 4, df: false });
        assert!(matches!(d.next(&mut b), Decoded::Disconnect));
        assert!(matches!(d.next(&mut b), Decoded::NeedMore));
    }

    #[test]
    fn invalid_requests_get_the_spec_errors() {
        let mut d = decoder(ReplyStyle::Simple);
        let mut b = BytesMut::new();
        request(&mut b, 0, CMD_READ, (1 << 20) - 1, 2);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        request(&mut b, 0, CMD_WRITE, (1 << 20) - 1, 2);
        b.put_slice(b"xy");
        assert_eq!(rejected_errno(d.next(&mut b)), ENOSPC);
        request(&mut b, 0, 42, 0, 0);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        request(&mut b, CMD_FLAG_DF, CMD_READ, 0, 512);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        request(&mut b, 0, CMD_FLUSH, 1, 0);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        request(&mut b, 0, CMD_READ, u64::MAX, 1);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        assert!(b.is_empty());
    }

    #[test]
    fn oversized_write_payload_is_skipped_not_buffered() {
        let mut d = decoder(ReplyStyle::Simple);
        let mut b = BytesMut::new();
        request(&mut b, 0, CMD_WRITE, 0, MAX_PAYLOAD + 1);
        assert_eq!(rejected_errno(d.next(&mut b)), EOVERFLOW);
        b.put_bytes(7, 1000);
        assert!(matches!(d.next(&mut b), Decoded::NeedMore));
        assert!(b.is_empty());
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut d = decoder(ReplyStyle::Simple);
        let mut b = BytesMut::new();
        b.put_bytes(0x55, 28);
        assert!(matches!(d.next(&mut b), Decoded::Fatal(_)));
    }

    #[test]
    fn sparse_reads_become_holes() {
        let hdr = ReplyHeader {
            style: ReplyStyle::Structured,
            cookie: 1,
            offset: 0,
        };
        let parts = read_reply(&hdr, 0, false, vec![0u8; 1 << 20]);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].len(), 20 + 12);
        let mut data = vec![0u8; 256 * 1024];
        data[0] = 1;
        let segs = segments(&data);
        assert_eq!(segs, vec![(0, 4096, false), (4096, 256 * 1024, true)]);
        let parts = read_reply(&hdr, 0, true, data);
        assert_eq!(parts.len(), 2, "DF forces one data chunk");
    }

    #[test]
    fn block_status_clips_to_request() {
        let hdr = ReplyHeader {
            style: ReplyStyle::Structured,
            cookie: 1,
            offset: 100,
        };
        let ex = [
            Extent {
                offset: 0,
                length: 150,
                flags: 0,
            },
            Extent {
                offset: 150,
                length: 1000,
                flags: 3,
            },
        ];
        let b = block_status_reply(&hdr, 100, 200, false, &ex);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(&b[24..32], &[0, 0, 0, 50, 0, 0, 0, 0]);
        assert_eq!(&b[32..40], &[0, 0, 0, 150, 0, 0, 0, 3]);
        let b = block_status_reply(&hdr, 100, 200, true, &ex);
        assert_eq!(b.len(), 20 + 4 + 8);
    }
}
