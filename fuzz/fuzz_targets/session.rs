//! A whole connection session driven by arbitrary client bytes and an
//! arbitrary order of completions (any piece of work may finish first, as
//! on the asynchronous path), partial writes, hang-ups, shutdowns and
//! timeouts, with a stand-in TLS engine so STARTTLS paths are reached.
//!
//! Input: one configuration byte, then frames, each a tag byte and its
//! operands (see `Step`).
//!
//! Checked: no panic; the handle is closed at most once and only the one
//! opened for transmission; no more requests are in flight than the limit;
//! nothing is handed out after the session is finished; and once every
//! piece of work is done and the client gone, the session finishes.

#![no_main]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use nbdhost::protocol::export::{ExportEntry, ExportInfo, Extent};
use nbdhost::protocol::handshake::{Answer, HandshakeConfig, Query, Refusal, TlsMode};
use nbdhost::session::buffers::BufPool;
use nbdhost::session::{
    Config, Done, Limits, Outcome, PeerIdentity, Session, TlsEngine, TlsEngineError, TlsFactory,
    TlsHandshake, TlsRead, Work,
};

/// A stand-in for GnuTLS: `HELLO` opens the session, records are the
/// plaintext XORed with 0x5a, and `BYE!` from the client closes it.
struct Fake {
    incoming: BytesMut,
    out: Vec<u8>,
    ready: bool,
}

struct FakeFactory;

impl TlsFactory for FakeFactory {
    fn start(&self) -> Result<Box<dyn TlsEngine>, TlsEngineError> {
        Ok(Box::new(Fake {
            incoming: BytesMut::new(),
            out: Vec::new(),
            ready: false,
        }))
    }
}

impl TlsEngine for Fake {
    fn incoming(&mut self) -> &mut BytesMut {
        &mut self.incoming
    }
    fn handshake(&mut self) -> Result<TlsHandshake, TlsEngineError> {
        if self.incoming.len() < 5 {
            return Ok(TlsHandshake::InProgress);
        }
        if &self.incoming[..5] != b"HELLO" {
            return Err("bad hello".into());
        }
        self.incoming.advance(5);
        self.out.extend_from_slice(b"WELCOME");
        self.ready = true;
        Ok(TlsHandshake::Done)
    }
    fn read(&mut self, out: &mut BytesMut) -> Result<TlsRead, TlsEngineError> {
        let data = self.incoming.split();
        if data.windows(4).any(|w| w == b"BYE!") {
            return Ok(TlsRead::Closed);
        }
        out.extend(data.iter().map(|b| b ^ 0x5a));
        Ok(TlsRead::Open)
    }
    fn write(&mut self, data: &[u8]) -> Result<(), TlsEngineError> {
        self.out.extend(data.iter().map(|b| b ^ 0x5a));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), TlsEngineError> {
        Ok(())
    }
    fn take_output(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.out)))
    }
    fn close_notify(&mut self) {}
    fn protocol(&self) -> String {
        "fake".into()
    }
    fn peer_identity(&self) -> Option<PeerIdentity> {
        self.ready.then(|| PeerIdentity::Psk("alice".into()))
    }
    fn attempted_user(&self) -> Option<String> {
        None
    }
}

fn export() -> ExportInfo {
    ExportInfo {
        name: String::new(),
        description: None,
        size: 1 << 20,
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

/// The test's side: the work it holds and what it has seen.
struct Driver {
    s: Session<u32>,
    pending: VecDeque<Work<u32>>,
    bufs: BufPool,
    limits: Limits,
    opened: Option<u32>,
    closed: bool,
    next_handle: u32,
}

impl Driver {
    fn poll(&mut self) {
        while let Some(w) = self.s.poll_work() {
            assert!(!self.closed, "work after the handle was closed: {w:?}");
            self.pending.push_back(w);
        }
        let requests = self
            .pending
            .iter()
            .filter(|w| matches!(w, Work::Request(_)))
            .count();
        assert!(requests <= self.limits.max_requests);
    }

    fn complete(&mut self, w: Work<u32>, variant: u8) {
        let done = match w {
            Work::Query { query, .. } => match query {
                Query::Preconnect => Done::Query {
                    answer: Answer::Preconnect(if variant % 7 == 6 {
                        Err(Refusal {
                            errno: 1,
                            message: "refused".into(),
                        })
                    } else {
                        Ok(())
                    }),
                    opened: None,
                },
                Query::List => Done::Query {
                    answer: Answer::List(Ok(vec![ExportEntry {
                        name: "disk".into(),
                        description: None,
                    }])),
                    opened: None,
                },
                Query::Open { keep, .. } => {
                    if variant % 5 == 4 {
                        Done::Query {
                            answer: Answer::Open(Err(Refusal {
                                errno: 2,
                                message: "no such export".into(),
                            })),
                            opened: None,
                        }
                    } else {
                        let opened = keep.then(|| {
                            assert!(self.opened.is_none(), "a second handle kept");
                            self.next_handle += 1;
                            self.opened = Some(self.next_handle);
                            self.next_handle
                        });
                        Done::Query {
                            answer: Answer::Open(Ok(export())),
                            opened,
                        }
                    }
                }
            },
            Work::Request(req) => {
                let outcome = match (variant % 4, req.read_len()) {
                    (0, Some(n)) | (2, Some(n)) => Outcome::Data(self.bufs.get(n)),
                    (1, _) => Outcome::Failed(5),
                    (3, _) => Outcome::Extents(vec![Extent {
                        offset: req.op().offset,
                        length: 4096,
                        flags: u32::from(variant >> 4) & 3,
                    }]),
                    _ => Outcome::Done,
                };
                Done::Request(req, outcome)
            }
            Work::Close(h) => {
                assert_eq!(Some(h), self.opened, "closed a handle never kept");
                assert!(!self.closed, "closed twice");
                self.closed = true;
                Done::Closed
            }
        };
        self.s.complete(done);
        self.poll();
    }

    fn transmit(&mut self, max: usize) {
        if let Some(out) = self.s.poll_transmit() {
            let mut iov = [std::io::IoSlice::new(&[]); 16];
            let n = out.slices(&mut iov);
            let avail: usize = iov[..n].iter().map(|s| s.len()).sum();
            let k = avail.min(max);
            if k > 0 {
                self.s.sent(k);
            }
        }
        self.poll();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, mut rest)) = data.split_first() else {
        return;
    };
    let tls = match cfg & 3 {
        0 => TlsMode::Off,
        1 => TlsMode::On,
        _ => TlsMode::Require,
    };
    let limits = if cfg & 4 != 0 {
        Limits {
            max_bytes: 64 * 1024,
            max_requests: 8,
        }
    } else {
        Limits::default()
    };
    let config = Arc::new(Config {
        handshake: HandshakeConfig {
            oldstyle: cfg & 8 != 0,
            handshake_mask: 3,
            no_structured: cfg & 16 != 0,
            tls,
            ..HandshakeConfig::default()
        },
        tls: (tls != TlsMode::Off).then(|| Arc::new(FakeFactory) as Arc<dyn TlsFactory>),
        limits,
        handshake_timeout: Some(Duration::from_secs(60)),
    });
    let start = Instant::now();
    let mut d = Driver {
        s: Session::new(1, "fuzz".into(), config, start),
        pending: VecDeque::new(),
        bufs: BufPool::new(1 << 20),
        limits,
        opened: None,
        closed: false,
        next_handle: 0,
    };
    d.poll();
    while let Some((&tag, after)) = rest.split_first() {
        rest = after;
        let variant = tag >> 4;
        match tag % 10 {
            0 => {
                let Some((&n, after)) = rest.split_first() else {
                    break;
                };
                let n = usize::from(n).min(after.len());
                d.s.receive(&after[..n]);
                d.poll();
                rest = &after[n..];
            }
            1 => {
                while let Some(w) = d.pending.pop_front() {
                    d.complete(w, variant);
                }
            }
            2 => {
                if let Some(w) = d.pending.pop_front() {
                    d.complete(w, variant);
                }
            }
            3 => {
                // Any one of the pieces of work out, as an asynchronous
                // layer completes them: in whatever order they finish.
                if !d.pending.is_empty() {
                    let i = usize::from(variant) % d.pending.len();
                    if let Some(w) = d.pending.remove(i) {
                        d.complete(w, variant);
                    }
                }
            }
            4 => d.transmit(usize::from(variant) * 4096 + 1),
            5 => d.s.eof(),
            6 => d.s.connection_lost("fuzz"),
            7 => d.s.begin_shutdown(),
            8 => {
                d.s.handle_timeout(start + Duration::from_secs(u64::from(variant) * 10))
            }
            _ => d.s.shrink(),
        }
        d.poll();
        if d.s.is_finished() {
            assert!(d.pending.is_empty(), "finished with work outstanding");
            return;
        }
    }
    // Wind up: the client leaves, everything outstanding completes, and the
    // session must then be finished.
    d.s.connection_lost("end of input");
    d.poll();
    for _ in 0..4 {
        while let Some(w) = d.pending.pop_front() {
            d.complete(w, 0);
        }
    }
    assert!(d.pending.is_empty());
    assert!(d.s.is_finished(), "the session never finished");
});
