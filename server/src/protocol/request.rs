//! Transmission requests over byte buffers: finding, decoding and
//! validating the request at the front of a connection's input. Nothing
//! here touches a socket or the layer chain.

use bytes::{Buf, Bytes, BytesMut};

use super::export::MAX_PAYLOAD;
use super::handshake::Negotiated;
use super::wire::{self, *};

/// A validated command, ready for the layer chain.
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

impl Command {
    /// The command's name, as error replies and log lines give it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read { .. } => "read",
            Command::Write { .. } => "write",
            Command::Flush => "flush",
            Command::Trim { .. } => "trim",
            Command::Zero { .. } => "zero",
            Command::Cache { .. } => "cache",
            Command::BlockStatus { .. } => "block status",
        }
    }
}

/// A validated request and how to address its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub reply: ReplyHeader,
    pub offset: u64,
    pub command: Command,
}

/// The outcome of decoding the front of the input buffer.
#[derive(Debug)]
pub enum Decoded {
    /// Not a whole request yet.
    NeedMore,
    /// A valid request.
    Op(Op),
    /// An invalid request, to be answered with this NBD error and message.
    Rejected(ReplyHeader, u32, &'static str),
    /// `NBD_CMD_DISC`: finish in-flight requests, then close.
    Disconnect,
    /// The stream cannot be trusted any more: close at once.
    Fatal(String),
}

/// What the front of the input holds, without consuming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// A request is still arriving; `wanted` more bytes complete it (0 if
    /// not even its header is known yet).
    Incomplete { wanted: usize },
    /// Whatever is at the front can be decoded now. `cost` is the request
    /// data it makes the connection hold: a write's payload or a read's
    /// reply buffer.
    Complete { cost: usize },
}

/// Decodes one connection's requests.
#[derive(Debug)]
pub struct Decoder {
    session: Negotiated,
    /// Payload of a refused oversized write still to be skipped.
    discard: u64,
    /// The reply to that write, sent once its payload is skipped: a client
    /// such as libnbd matches a reply only to a request it has finished
    /// sending.
    refused: Option<ReplyHeader>,
}

type Refusal = (u32, &'static str);

/// How much of a refused payload is asked for at a time.
const DISCARD_PIECE: u64 = 256 * 1024;

impl Decoder {
    /// A decoder for what negotiation settled.
    pub fn new(session: Negotiated) -> Self {
        Decoder {
            session,
            discard: 0,
            refused: None,
        }
    }

    /// The negotiated session.
    pub fn session(&self) -> &Negotiated {
        &self.session
    }

    fn extended(&self) -> bool {
        self.session.style == ReplyStyle::Extended
    }

    /// Look at the front of `buf`: is a request complete, and what would it
    /// cost to take it on?
    pub fn front(&self, buf: &[u8]) -> Front {
        if self.discard > 0 {
            // A refused payload is skipped piece by piece as it arrives,
            // never held whole: what has arrived is taken at once, and
            // no more than a piece is asked for.
            return if buf.is_empty() {
                Front::Incomplete {
                    wanted: self.discard.min(DISCARD_PIECE) as usize,
                }
            } else {
                Front::Complete { cost: 0 }
            };
        }
        let ext = self.extended();
        let req = match peek_request(buf, ext) {
            Ok(Some(r)) => r,
            Ok(None) => return Front::Incomplete { wanted: 0 },
            // Malformed: decoding it now is what closes the connection.
            Err(_) => return Front::Complete { cost: 0 },
        };
        let payload = req.payload_len(ext);
        if payload > u64::from(MAX_PAYLOAD) {
            // Refused and skipped as it arrives, never buffered.
            return Front::Complete { cost: 0 };
        }
        let total = request_header_len(ext) + payload as usize;
        if buf.len() < total {
            return Front::Incomplete {
                wanted: total - buf.len(),
            };
        }
        let read = Cmd::from_wire(req.command) == Some(Cmd::Read);
        let reply = if read && req.length <= u64::from(MAX_PAYLOAD) {
            req.length as usize
        } else {
            0
        };
        Front::Complete {
            cost: payload as usize + reply,
        }
    }

    /// Decode the request at the front of `buf`, consuming it if whole.
    #[must_use]
    pub fn next(&mut self, buf: &mut BytesMut) -> Decoded {
        if self.discard > 0 {
            let n = self.discard.min(buf.len() as u64);
            buf.advance(n as usize);
            self.discard -= n;
            if self.discard > 0 {
                return Decoded::NeedMore;
            }
            if let Some(reply) = self.refused.take() {
                return Decoded::Rejected(reply, EOVERFLOW, "request payload too large");
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
            // Skip the payload as it arrives rather than buffering it, and
            // answer once it is all read, so the client can go on after
            // the error.
            buf.advance(hlen);
            self.discard = payload;
            self.refused = Some(reply);
            return self.next(buf);
        }
        if buf.len() < hlen + payload as usize {
            return Decoded::NeedMore;
        }
        buf.advance(hlen);
        let data = buf.split_to(payload as usize).freeze();
        let command = Cmd::from_wire(req.command);
        if command == Some(Cmd::Disc) {
            return Decoded::Disconnect;
        }
        match self.validate(&req, command, data) {
            Ok(command) => Decoded::Op(Op {
                reply,
                offset: req.offset,
                command,
            }),
            Err((errno, msg)) => Decoded::Rejected(reply, errno, msg),
        }
    }

    /// Check request `r`, whose type is `command` (`None` if unknown), and
    /// make it a [`Command`].
    fn validate(
        &self,
        r: &wire::Request,
        command: Option<Cmd>,
        data: Bytes,
    ) -> Result<Command, Refusal> {
        let e = &self.session.export;
        let Some(cmd) = command else {
            return Err((EINVAL, "unknown command"));
        };
        let known = match cmd {
            Cmd::Read => CMD_FLAG_DF,
            Cmd::Write if self.extended() => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
            Cmd::Write => CMD_FLAG_FUA,
            Cmd::Trim => CMD_FLAG_FUA,
            Cmd::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Cmd::BlockStatus => CMD_FLAG_REQ_ONE,
            Cmd::Flush | Cmd::Cache => 0,
            // Answered before validation, in `next`.
            Cmd::Disc => 0,
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
        let len = if cmd == Cmd::Write {
            data.len() as u64
        } else {
            r.length
        };
        if cmd == Cmd::Flush {
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
        let writes = matches!(cmd, Cmd::Write | Cmd::Trim | Cmd::WriteZeroes);
        if writes && e.readonly {
            return Err((EPERM, "export is read-only"));
        }
        let end = r.offset.checked_add(len);
        if end.is_none_or(|end| end > e.size) {
            // As nbdkit does: only data-writing commands run out of space.
            let errno = if matches!(cmd, Cmd::Write | Cmd::WriteZeroes) {
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
        Ok(match cmd {
            Cmd::Read => {
                if len > u64::from(MAX_PAYLOAD) {
                    return Err((EOVERFLOW, "read is larger than the maximum payload"));
                }
                Command::Read {
                    len: len as u32,
                    df: flag(CMD_FLAG_DF),
                }
            }
            Cmd::Write => Command::Write {
                data,
                fua: flag(CMD_FLAG_FUA),
            },
            Cmd::Trim if e.can_trim => Command::Trim {
                len,
                fua: flag(CMD_FLAG_FUA),
            },
            Cmd::WriteZeroes if e.can_zero => Command::Zero {
                len,
                fua: flag(CMD_FLAG_FUA),
                may_trim: !flag(CMD_FLAG_NO_HOLE),
                fast: flag(CMD_FLAG_FAST_ZERO),
            },
            Cmd::Cache if e.can_cache => Command::Cache { len },
            Cmd::BlockStatus if self.session.base_allocation => Command::BlockStatus {
                len,
                req_one: flag(CMD_FLAG_REQ_ONE),
            },
            _ => return Err((EINVAL, "command was not advertised or negotiated")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::export::test_export;
    use bytes::BufMut;

    fn decoder(style: ReplyStyle) -> Decoder {
        Decoder::new(Negotiated {
            style,
            base_allocation: true,
            export: test_export(1 << 20),
        })
    }

    /// Append a compact request: a [`Cmd`], or any number as a `u16`.
    fn request(b: &mut BytesMut, flags: u16, command: impl Into<u16>, offset: u64, len: u32) {
        wire::Request {
            flags,
            command: command.into(),
            cookie: 0x1234,
            offset,
            length: u64::from(len),
        }
        .put(b, false);
    }

    fn rejected_errno(d: Decoded) -> u32 {
        let Decoded::Rejected(_, errno, _) = d else {
            panic!("{d:?}")
        };
        errno
    }

    #[test]
    fn batches_of_requests_decode_in_order() {
        let mut d = decoder(ReplyStyle::Simple);
        let mut b = BytesMut::new();
        request(&mut b, 0, Cmd::Write, 0, 4);
        b.put_slice(b"abcd");
        request(&mut b, 0, Cmd::Read, 0, 4);
        request(&mut b, 0, Cmd::Disc, 0, 0);
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
        request(&mut b, 0, Cmd::Read, (1 << 20) - 1, 2);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        request(&mut b, 0, Cmd::Write, (1 << 20) - 1, 2);
        b.put_slice(b"xy");
        assert_eq!(rejected_errno(d.next(&mut b)), ENOSPC);
        request(&mut b, 0, 42u16, 0, 0);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        request(&mut b, CMD_FLAG_DF, Cmd::Read, 0, 512);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        request(&mut b, 0, Cmd::Flush, 1, 0);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        request(&mut b, 0, Cmd::Read, u64::MAX, 1);
        assert_eq!(rejected_errno(d.next(&mut b)), EINVAL);
        assert!(b.is_empty());
    }

    #[test]
    fn oversized_write_payload_is_skipped_not_buffered() {
        let mut d = decoder(ReplyStyle::Simple);
        let mut b = BytesMut::new();
        request(&mut b, 0, Cmd::Write, 0, MAX_PAYLOAD + 1);
        b.put_bytes(7, 1000);
        assert_eq!(
            d.front(&b),
            Front::Complete { cost: 0 },
            "what has arrived is taken, to be skipped"
        );
        assert!(matches!(d.next(&mut b), Decoded::NeedMore));
        assert!(b.is_empty());
        assert_eq!(
            d.front(&b),
            Front::Incomplete {
                wanted: DISCARD_PIECE as usize
            },
            "more is wanted, a piece at a time"
        );
        b.put_bytes(7, MAX_PAYLOAD as usize - 1000);
        assert!(matches!(d.next(&mut b), Decoded::NeedMore));
        assert!(b.is_empty(), "skipped in pieces, never held whole");
        b.put_bytes(7, 1);
        assert_eq!(
            rejected_errno(d.next(&mut b)),
            EOVERFLOW,
            "answered once the last byte is read"
        );
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut d = decoder(ReplyStyle::Simple);
        let mut b = BytesMut::new();
        b.put_bytes(0x55, 28);
        assert!(matches!(d.next(&mut b), Decoded::Fatal(_)));
    }

    #[test]
    fn the_front_tells_what_is_missing_and_what_a_request_costs() {
        let d = decoder(ReplyStyle::Simple);
        let mut b = BytesMut::new();
        assert_eq!(d.front(&b), Front::Incomplete { wanted: 0 });
        request(&mut b, 0, Cmd::Write, 0, 4096);
        assert_eq!(d.front(&b), Front::Incomplete { wanted: 4096 });
        b.put_bytes(1, 4096);
        assert_eq!(d.front(&b), Front::Complete { cost: 4096 });
        let mut r = BytesMut::new();
        request(&mut r, 0, Cmd::Read, 0, 65536);
        assert_eq!(d.front(&r), Front::Complete { cost: 65536 });
        let mut f = BytesMut::new();
        request(&mut f, 0, Cmd::Flush, 0, 0);
        assert_eq!(d.front(&f), Front::Complete { cost: 0 });
    }
}
