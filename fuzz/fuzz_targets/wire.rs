//! The wire codecs as round trips: a request header encoded in either
//! style decodes to what was encoded (a compact header carrying the low 32
//! bits of the length), an option header likewise, and every reply header
//! the server writes parses back to its cookie, flags, type and length.

#![no_main]

use arbitrary::Arbitrary;
use bytes::Buf;
use libfuzzer_sys::fuzz_target;
use nbdhost::protocol::wire::*;

#[derive(Arbitrary, Debug)]
struct Input {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u64,
    extended: bool,
    option: u32,
    option_length: u32,
    style: u8,
    error: u32,
    chunk_flags: u16,
    chunk_type: u16,
    chunk_len: u32,
    message: String,
}

fuzz_target!(|i: Input| {
    let req = Request {
        flags: i.flags,
        command: i.command,
        cookie: i.cookie,
        offset: i.offset,
        length: if i.extended { i.length } else { i.length & 0xffff_ffff },
    };
    let mut b = Vec::new();
    req.put(&mut b, i.extended);
    assert_eq!(b.len(), request_header_len(i.extended));
    assert_eq!(peek_request(&b, i.extended), Ok(Some(req)));
    assert_eq!(peek_request(&b[..b.len() - 1], i.extended), Ok(None));

    let opt = OptionHeader {
        option: i.option,
        length: i.option_length,
    };
    let mut b = Vec::new();
    opt.put(&mut b);
    assert_eq!(peek_option_header(&b), Ok(Some(opt)));

    let style = match i.style % 3 {
        0 => ReplyStyle::Simple,
        1 => ReplyStyle::Structured,
        _ => ReplyStyle::Extended,
    };
    let hdr = ReplyHeader {
        style,
        cookie: i.cookie,
        offset: i.offset,
    };
    let mut b = Vec::new();
    hdr.put_status(&mut b, i.error, &i.message);
    let (magic, cookie) = (u32::from_be_bytes(b[..4].try_into().unwrap()), cookie_of(&b));
    assert_eq!(cookie, i.cookie);
    match (style, i.error) {
        (ReplyStyle::Simple, e) | (ReplyStyle::Structured, e @ 0) => {
            assert_eq!(magic, SIMPLE_REPLY_MAGIC);
            assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), e);
            assert_eq!(b.len(), 16);
        }
        _ => {
            let c = chunk(&b, style);
            assert_eq!(c.len as usize, c.rest);
            assert!(c.flags & REPLY_FLAG_DONE != 0);
            if i.error != 0 {
                assert_eq!(c.typ, REPLY_TYPE_ERROR);
            }
        }
    }
    if style != ReplyStyle::Simple {
        let mut b = Vec::new();
        hdr.put_chunk(&mut b, i.chunk_flags, i.chunk_type, u64::from(i.chunk_len));
        let c = chunk(&b, style);
        assert_eq!((c.flags, c.typ, c.len), (i.chunk_flags, i.chunk_type, u64::from(i.chunk_len)));
    }
});

/// The cookie of an encoded reply: at byte 8 in every style.
fn cookie_of(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[8..16].try_into().unwrap())
}

struct Chunk {
    flags: u16,
    typ: u16,
    len: u64,
    /// Bytes after the header.
    rest: usize,
}

/// Parse a structured or extended chunk header.
fn chunk(mut b: &[u8], style: ReplyStyle) -> Chunk {
    let magic = b.get_u32();
    let flags = b.get_u16();
    let typ = b.get_u16();
    let _cookie = b.get_u64();
    let len = if style == ReplyStyle::Extended {
        assert_eq!(magic, EXTENDED_REPLY_MAGIC);
        let _offset = b.get_u64();
        b.get_u64()
    } else {
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
        u64::from(b.get_u32())
    };
    Chunk {
        flags,
        typ,
        len,
        rest: b.len(),
    }
}
