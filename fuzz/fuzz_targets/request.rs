//! The transmission decoder fed arbitrary request streams for an export
//! whose size, block size, capabilities and negotiated reply style come
//! from the first bytes.
//!
//! Checked: no panic; every request handed out lies inside the export,
//! respects the minimum block size, carries exactly its payload and only
//! what the export offers; and `front` agrees with `next` (the session's
//! back-pressure depends on it).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbdhost::protocol::export::{ExportInfo, MAX_PAYLOAD};
use nbdhost::protocol::handshake::Negotiated;
use nbdhost::protocol::request::{Command, Decoded, Decoder, Front};
use nbdhost::protocol::wire::ReplyStyle;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, stream) = data.split_at(4);
    let caps = head[1];
    let size = (u64::from(head[2]) + 1) << (head[3] % 41);
    let min_block = 1u32 << (head[0] >> 4).min(12);
    let export = ExportInfo {
        name: String::new(),
        description: None,
        size,
        min_block,
        preferred_block: min_block.max(4096),
        max_block: MAX_PAYLOAD,
        readonly: caps & 1 != 0,
        can_flush: caps & 2 != 0,
        can_fua: caps & 4 != 0,
        can_trim: caps & 8 != 0,
        can_zero: caps & 16 != 0,
        can_fast_zero: caps & 32 != 0,
        can_multi_conn: true,
        can_cache: caps & 64 != 0,
        can_extents: true,
        rotational: false,
    };
    let style = match head[0] & 3 {
        0 => ReplyStyle::Simple,
        1 => ReplyStyle::Structured,
        _ => ReplyStyle::Extended,
    };
    let mut d = Decoder::new(Negotiated {
        style,
        base_allocation: caps & 128 != 0,
        export: export.clone(),
    });
    // Fed in pieces of a size chosen by the first byte, as reads arrive.
    let piece = usize::from(head[0] >> 2 & 3) * 7 + 1;
    let mut buf = BytesMut::new();
    for part in stream.chunks(piece) {
        buf.extend_from_slice(part);
        loop {
            let front = d.front(&buf);
            let before = buf.len();
            let decoded = d.next(&mut buf);
            if let Front::Incomplete { .. } = front {
                assert!(matches!(decoded, Decoded::NeedMore), "{front:?} but {decoded:?}");
            }
            assert!(buf.len() <= before);
            match decoded {
                Decoded::NeedMore => break,
                Decoded::Op(op) => {
                    let len = match &op.command {
                        Command::Read { len, .. } => u64::from(*len),
                        Command::Write { data, .. } => {
                            assert!(!export.readonly);
                            data.len() as u64
                        }
                        Command::Trim { len, .. } => {
                            assert!(export.can_trim && !export.readonly);
                            *len
                        }
                        Command::Zero { len, fast, .. } => {
                            assert!(export.can_zero && !export.readonly);
                            assert!(!fast || export.can_fast_zero);
                            *len
                        }
                        Command::Cache { len } => *len,
                        Command::BlockStatus { len, .. } => *len,
                        Command::Flush => {
                            assert!(export.can_flush);
                            assert_eq!(op.offset, 0);
                            continue;
                        }
                    };
                    assert!(len > 0);
                    assert!(op.offset.checked_add(len).is_some_and(|e| e <= export.size));
                    let min = u64::from(min_block);
                    assert_eq!((op.offset % min, len % min), (0, 0));
                }
                Decoded::Rejected(..) => {}
                Decoded::Disconnect | Decoded::Fatal(_) => return,
            }
        }
    }
});
