//! The handshake state machine fed arbitrary option streams, with TLS off,
//! offered or required, and with structured replies and extended headers
//! allowed or not; every query it asks is answered, and the first byte
//! also decides how the stream is cut into reads.
//!
//! Checked: no panic, and with TLS required nothing about the exports (a
//! list, an open) is asked for before the TLS handshake.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbdhost::protocol::export::{ExportEntry, ExportInfo};
use nbdhost::protocol::handshake::{
    Answer, Event, Handshake, HandshakeConfig, Query, Refusal, TlsMode,
};

/// errno for an export that does not exist.
const ENOENT: i32 = 2;

fn export(size: u64) -> ExportInfo {
    ExportInfo {
        name: "disk".into(),
        description: Some("a disk".into()),
        size,
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 << 20,
        readonly: false,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_zero: true,
        can_fast_zero: true,
        can_multi_conn: true,
        can_cache: true,
        can_extents: true,
        rotational: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, stream)) = data.split_first() else {
        return;
    };
    let tls = match (cfg >> 4) & 3 {
        0 => TlsMode::Off,
        1 => TlsMode::On,
        _ => TlsMode::Require,
    };
    let mut hs = Handshake::new(HandshakeConfig {
        oldstyle: cfg & 1 != 0,
        handshake_mask: u16::from((cfg >> 1) & 3),
        no_structured: cfg & 8 != 0,
        tls,
        ..HandshakeConfig::default()
    });
    let chunk = if cfg & 0x40 != 0 {
        1
    } else {
        stream.len().max(1)
    };
    let failing_opens = cfg & 0x80 != 0;
    let mut in_tls = false;
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    let mut answers = 0u32;
    let mut ev = hs.receive(&mut input, &mut out);
    let mut rest = stream;
    loop {
        match ev {
            Event::NeedInput => {
                if rest.is_empty() {
                    return;
                }
                let (now, later) = rest.split_at(chunk.min(rest.len()));
                rest = later;
                input.extend_from_slice(now);
                ev = hs.receive(&mut input, &mut out);
            }
            Event::Query(q) => {
                if matches!(q, Query::List | Query::Open { .. }) {
                    assert!(
                        tls != TlsMode::Require || in_tls,
                        "{q:?} asked before the required TLS"
                    );
                }
                answers += 1;
                let answer = match q {
                    Query::Preconnect => Answer::Preconnect(Ok(())),
                    Query::List => Answer::List(Ok(vec![ExportEntry {
                        name: "disk".into(),
                        description: None,
                    }])),
                    Query::Open { .. } if failing_opens && answers % 3 == 0 => {
                        Answer::Open(Err(Refusal {
                            errno: ENOENT,
                            message: "no such export".into(),
                        }))
                    }
                    // A TLS-only export of a server where TLS is optional.
                    Query::Open { .. } if failing_opens && answers % 3 == 1 => Answer::TlsRequired,
                    Query::Open { .. } => Answer::Open(Ok(export(u64::from(answers) << 20))),
                };
                ev = hs.answer(answer, &mut out);
            }
            Event::StartTls => {
                assert_ne!(tls, TlsMode::Off, "STARTTLS accepted without TLS");
                hs.tls_established();
                in_tls = true;
                ev = hs.receive(&mut input, &mut out);
            }
            Event::Done(n) => {
                assert!(tls != TlsMode::Require || in_tls);
                assert!(n.export.size > 0);
                return;
            }
            Event::Aborted | Event::Close(_) => return,
        }
    }
});
