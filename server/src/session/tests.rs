//! The connection lifecycle, driven without sockets or threads: the test
//! plays client (bytes in, bytes out) and driver (running work on a small
//! in-memory disk).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::buffers::BufPool;
use super::*;
use crate::protocol::export::test_export;
use crate::protocol::handshake::{Answer, HandshakeConfig, Query, TlsMode};
use crate::protocol::wire::*;

/// Counts this thread's heap allocations, so a test can show that a code
/// path allocates nothing.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as allocated above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        // SAFETY: as allocated above.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

const DISK: usize = 1 << 20;
/// The handle the test driver hands the session.
const HANDLE: u32 = 7;

fn config(tls: TlsMode, limits: Limits) -> Arc<Config> {
    Arc::new(Config {
        handshake: HandshakeConfig {
            handshake_mask: 3,
            tls,
            ..Default::default()
        },
        tls: (tls != TlsMode::Off).then(|| Arc::new(FakeTlsFactory) as Arc<dyn TlsFactory>),
        limits,
        handshake_timeout: Some(Duration::from_secs(10)),
    })
}

fn option(b: &mut Vec<u8>, opt: Opt, data: &[u8]) {
    b.put_u64(IHAVEOPT);
    b.put_u32(opt.wire());
    b.put_u32(data.len() as u32);
    b.put_slice(data);
}

fn go(b: &mut Vec<u8>) {
    let mut d = Vec::new();
    d.put_u32(0);
    d.put_u16(0);
    option(b, Opt::Go, &d);
}

fn request(b: &mut Vec<u8>, cmd: Cmd, cookie: u64, offset: u64, len: u32) {
    b.put_u32(REQUEST_MAGIC);
    b.put_u16(0);
    b.put_u16(cmd.wire());
    b.put_u64(cookie);
    b.put_u64(offset);
    b.put_u32(len);
}

/// The test's side of one connection: a session, the disk behind it, and
/// what the session has sent.
struct Peer {
    s: Session<u32>,
    disk: Vec<u8>,
    bufs: BufPool,
    sent: Vec<u8>,
    /// Work polled but not yet completed, to complete later.
    held: Vec<Work<u32>>,
    closes: usize,
}

impl Peer {
    fn new(cfg: Arc<Config>) -> Peer {
        Peer {
            s: Session::new(1, "test".into(), cfg, Instant::now()),
            // Not zero, so that reads are answered with data, not holes.
            disk: vec![0xab; DISK],
            bufs: BufPool::new(1 << 20),
            sent: Vec::new(),
            held: Vec::new(),
            closes: 0,
        }
    }

    /// A plain session in transmission with structured replies.
    fn transmitting(limits: Limits) -> Peer {
        let mut p = Peer::new(config(TlsMode::Off, limits));
        let mut b = Vec::new();
        b.put_u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        option(&mut b, Opt::StructuredReply, &[]);
        go(&mut b);
        p.s.receive(&b);
        p.run();
        p.flush();
        assert!(!p.s.in_handshake());
        p.sent.clear();
        p
    }

    fn answer(&mut self, w: Work<u32>) {
        let done = match w {
            Work::Query { query, .. } => match query {
                Query::Preconnect => Done::Query {
                    answer: Answer::Preconnect(Ok(())),
                    opened: None,
                },
                Query::List => Done::Query {
                    answer: Answer::List(Ok(Vec::new())),
                    opened: None,
                },
                Query::Open { keep, .. } => Done::Query {
                    answer: Answer::Open(Ok(test_export(DISK as u64))),
                    opened: keep.then_some(HANDLE),
                },
            },
            Work::Request(req) => {
                assert_eq!(self.s.handle(), Some(&HANDLE));
                let off = req.op().offset as usize;
                let outcome = match &req.op().command {
                    Command::Read { len, .. } => {
                        let mut b = self.bufs.get(*len as usize);
                        b.as_mut_slice()
                            .copy_from_slice(&self.disk[off..off + *len as usize]);
                        Outcome::Data(b)
                    }
                    Command::Write { data, .. } => {
                        self.disk[off..off + data.len()].copy_from_slice(data);
                        Outcome::Done
                    }
                    _ => Outcome::Done,
                };
                Done::Request(req, outcome)
            }
            Work::Close(h) => {
                assert_eq!(h, HANDLE);
                self.closes += 1;
                Done::Closed
            }
        };
        self.s.complete(done);
    }

    /// Run every piece of ready work at once.
    fn run(&mut self) {
        while let Some(w) = self.s.poll_work() {
            self.answer(w);
        }
    }

    /// Poll work but hold it, as a busy worker pool would.
    fn hold(&mut self) -> usize {
        let mut n = 0;
        while let Some(w) = self.s.poll_work() {
            self.held.push(w);
            n += 1;
        }
        n
    }

    fn release(&mut self, n: usize) {
        for w in self.held.drain(..n).collect::<Vec<_>>() {
            self.answer(w);
        }
    }

    /// Take everything the session wants to send.
    fn flush(&mut self) {
        while let Some(out) = self.s.poll_transmit() {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = out.slices(&mut iov);
            let mut total = 0;
            for s in &iov[..n] {
                self.sent.extend_from_slice(s);
                total += s.len();
            }
            self.s.sent(total);
        }
    }
}

/// A stand-in for GnuTLS: the client's "ClientHello" is `HELLO`, the
/// server answers `WELCOME`, and records are the plaintext XORed with
/// 0x5a, one per flush.
struct FakeTls {
    incoming: BytesMut,
    pending: Vec<u8>,
    out: Vec<u8>,
    ready: bool,
}

struct FakeTlsFactory;

impl TlsFactory for FakeTlsFactory {
    fn start(&self) -> Result<Box<dyn TlsEngine>, TlsEngineError> {
        Ok(Box::new(FakeTls {
            incoming: BytesMut::new(),
            pending: Vec::new(),
            out: Vec::new(),
            ready: false,
        }))
    }
}

const KEY: u8 = 0x5a;
/// What one flush adds in front of a record, so records can be counted.
const RECORD: &[u8] = b"REC";

fn xor(b: &[u8]) -> Vec<u8> {
    b.iter().map(|x| x ^ KEY).collect()
}

impl TlsEngine for FakeTls {
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
        out.extend_from_slice(&xor(&self.incoming.split()));
        Ok(TlsRead::Open)
    }
    fn write(&mut self, data: &[u8]) -> Result<(), TlsEngineError> {
        self.pending.extend_from_slice(&xor(data));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), TlsEngineError> {
        if !self.pending.is_empty() {
            self.out.extend_from_slice(RECORD);
            self.out.append(&mut self.pending);
        }
        Ok(())
    }
    fn take_output(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.out)))
    }
    fn close_notify(&mut self) {
        self.out.extend_from_slice(b"BYE");
    }
    fn protocol(&self) -> String {
        "FAKE".into()
    }
    fn peer_identity(&self) -> Option<PeerIdentity> {
        self.ready.then(|| PeerIdentity::Psk("alice".into()))
    }
    fn attempted_user(&self) -> Option<String> {
        None
    }
}

/// Option replies at the front of `b`: (option, type), consuming them.
fn option_replies(b: &mut &[u8]) -> Vec<(u32, OptReply)> {
    let mut v = Vec::new();
    while b.len() >= 20 && b[..8] == REPLY_MAGIC_OPT.to_be_bytes() {
        b.advance(8);
        let (o, t, l) = (b.get_u32(), b.get_u32(), b.get_u32() as usize);
        b.advance(l);
        let t = OptReply::from_wire(t).unwrap_or_else(|| panic!("reply type 0x{t:x}"));
        v.push((o, t));
    }
    v
}

/// Cookies of the replies in `b` (simple replies and final chunks).
fn reply_cookies(mut b: &[u8]) -> Vec<u64> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        match b.get_u32() {
            SIMPLE_REPLY_MAGIC => {
                b.advance(4);
                v.push(b.get_u64());
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = b.get_u16();
                b.advance(2);
                let cookie = b.get_u64();
                let len = b.get_u32() as usize;
                b.advance(len);
                if flags & REPLY_FLAG_DONE != 0 {
                    v.push(cookie);
                }
            }
            m => panic!("bad reply magic {m:x}"),
        }
    }
    v
}

#[test]
fn the_handshake_asks_preconnect_then_opens_on_go() {
    let mut p = Peer::new(config(TlsMode::Off, Limits::default()));
    let Some(Work::Query { query, .. }) = p.s.poll_work() else {
        panic!("preconnect first")
    };
    assert_eq!(query, Query::Preconnect);
    p.s.complete(Done::Query {
        answer: Answer::Preconnect(Ok(())),
        opened: None,
    });
    p.flush();
    assert_eq!(p.sent.len(), 18, "the greeting");
    let mut b = Vec::new();
    b.put_u32(CLIENT_FIXED_NEWSTYLE);
    go(&mut b);
    p.s.receive(&b);
    let Some(Work::Query { query, tls }) = p.s.poll_work() else {
        panic!("open on GO")
    };
    assert!(matches!(query, Query::Open { keep: true, .. }));
    assert!(!tls.active);
    assert!(
        !p.s.wants_read(),
        "nothing more is read while the open runs"
    );
}

/// A session with TLS required, sent in one go: the client flags,
/// STARTTLS, the fake ClientHello, and `inner` options inside TLS.
fn starttls_with(inner: &[u8]) -> Peer {
    let mut p = Peer::new(config(TlsMode::Require, Limits::default()));
    p.run();
    p.flush();
    p.sent.clear();
    let mut b = Vec::new();
    b.put_u32(CLIENT_FIXED_NEWSTYLE);
    option(&mut b, Opt::StartTls, &[]);
    b.extend_from_slice(b"HELLO");
    b.extend_from_slice(&xor(inner));
    p.s.receive(&b);
    p
}

#[test]
fn starttls_mid_stream_switches_every_later_byte_into_tls() {
    // The client pipelines its first TLS bytes right behind STARTTLS, and
    // the options it sends inside TLS right behind those.
    let mut inner = Vec::new();
    option(&mut inner, Opt::StructuredReply, &[]);
    go(&mut inner);
    let mut p = starttls_with(&inner);
    let Some(Work::Query { query, tls }) = p.s.poll_work() else {
        panic!("GO inside TLS")
    };
    assert!(matches!(query, Query::Open { .. }));
    assert_eq!(
        tls,
        TlsState {
            active: true,
            identity: Some(PeerIdentity::Psk("alice".into()))
        }
    );
    p.s.complete(Done::Query {
        answer: Answer::Open(Ok(test_export(DISK as u64))),
        opened: Some(HANDLE),
    });
    p.flush();
    let mut wire: &[u8] = &p.sent;
    assert_eq!(
        option_replies(&mut wire),
        vec![(Opt::StartTls.wire(), OptReply::Ack)]
    );
    assert_eq!(&wire[..7], b"WELCOME");
    wire.advance(7);
    assert_eq!(&wire[..3], RECORD);
    let inside = xor(&wire[3..]);
    let mut inside: &[u8] = &inside;
    let types: Vec<OptReply> = option_replies(&mut inside).iter().map(|r| r.1).collect();
    assert_eq!(types.first(), Some(&OptReply::Ack));
    assert_eq!(types.last(), Some(&OptReply::Ack));
    assert!(inside.is_empty());
    assert!(!p.s.in_handshake());
}

#[test]
fn replies_of_one_batch_are_sealed_into_one_record_under_tls() {
    let mut inner = Vec::new();
    option(&mut inner, Opt::StructuredReply, &[]);
    go(&mut inner);
    let mut p = starttls_with(&inner);
    p.run();
    p.flush();
    p.sent.clear();
    let mut reqs = Vec::new();
    for i in 0..32 {
        request(&mut reqs, Cmd::Read, i, i * 4096, 4096);
    }
    p.s.receive(&xor(&reqs));
    p.run();
    p.flush();
    assert_eq!(&p.sent[..3], RECORD);
    let plain = xor(&p.sent[3..]);
    assert_eq!(reply_cookies(&plain), (0..32).collect::<Vec<_>>());
}

#[test]
fn back_pressure_stops_reading_and_completions_resume_it() {
    let limits = Limits {
        max_bytes: 16 * (4096 + REPLY_OVERHEAD),
        max_requests: 256,
    };
    let mut p = Peer::transmitting(limits);
    let mut b = Vec::new();
    for i in 0..64 {
        request(&mut b, Cmd::Read, i, 0, 4096);
    }
    p.s.receive(&b);
    assert_eq!(p.hold(), 16, "16 reads of 4 KiB fill the limit");
    assert!(!p.s.wants_read());
    p.release(8);
    // The replies are queued, unsent: they still count.
    assert_eq!(p.hold(), 0);
    p.flush();
    assert_eq!(p.hold(), 8, "sent replies make room for more");
    p.release(16);
    p.flush();
    while p.hold() > 0 {
        let n = p.held.len();
        p.release(n);
        p.flush();
    }
    assert_eq!(reply_cookies(&p.sent).len(), 64);
    assert!(p.s.wants_read(), "reading resumes once all is answered");
}

#[test]
fn a_connection_never_holds_more_than_its_byte_limit() {
    let limits = Limits::default();
    let mut p = Peer::transmitting(limits);
    let mut b = Vec::new();
    for i in 0..2000 {
        request(&mut b, Cmd::Read, i, 0, 1 << 20);
    }
    p.s.receive(&b);
    p.run();
    // The client reads nothing: replies pile up only to the limit.
    assert!(p.s.held() <= limits.max_bytes);
    assert!(p.s.held() >= limits.max_bytes - (1 << 20));
    assert!(!p.s.wants_read());
    assert_eq!(p.s.poll_work().map(|_| ()), None);
}

#[test]
fn one_maximum_size_request_is_taken_on_whatever_the_limit() {
    let limits = Limits {
        max_bytes: 4096,
        max_requests: 256,
    };
    let mut p = Peer::transmitting(limits);
    let mut b = Vec::new();
    request(&mut b, Cmd::Read, 1, 0, DISK as u32);
    p.s.receive(&b);
    assert_eq!(p.hold(), 1);
}

#[test]
fn a_client_that_vanishes_with_requests_in_flight_closes_after_they_finish() {
    let mut p = Peer::transmitting(Limits::default());
    let mut b = Vec::new();
    for i in 0..4 {
        request(&mut b, Cmd::Read, i, 0, 4096);
    }
    p.s.receive(&b);
    assert_eq!(p.hold(), 4);
    p.s.connection_lost("client went away");
    assert!(p.s.poll_work().is_none(), "no close while requests run");
    p.release(3);
    assert!(p.s.poll_work().is_none());
    p.release(1);
    let Some(Work::Close(h)) = p.s.poll_work() else {
        panic!("the handle is closed once the last request is done")
    };
    assert_eq!(h, HANDLE);
    assert!(!p.s.is_finished());
    p.s.complete(Done::Closed);
    assert!(p.s.is_finished());
    assert!(
        p.s.poll_transmit().is_none(),
        "nothing is sent to a lost client"
    );
}

#[test]
fn shutdown_with_work_outstanding_answers_it_then_closes() {
    let mut p = Peer::transmitting(Limits::default());
    let mut b = Vec::new();
    request(&mut b, Cmd::Read, 1, 0, 4096);
    request(&mut b, Cmd::Read, 2, 0, 4096);
    p.s.receive(&b);
    assert_eq!(p.hold(), 2);
    p.s.begin_shutdown();
    let mut late = Vec::new();
    request(&mut late, Cmd::Read, 3, 0, 4096);
    p.s.receive(&late);
    assert!(p.s.poll_work().is_none(), "no new requests after shutdown");
    p.release(2);
    p.run();
    p.flush();
    assert_eq!(reply_cookies(&p.sent), vec![1, 2]);
    assert_eq!(p.closes, 1);
    assert!(p.s.is_finished());
}

#[test]
fn disconnect_finishes_the_pipeline_then_closes_the_handle_once() {
    let mut p = Peer::transmitting(Limits::default());
    let mut b = Vec::new();
    request(&mut b, Cmd::Write, 1, 0, 4);
    b.put_slice(b"data");
    request(&mut b, Cmd::Read, 2, 0, 4);
    request(&mut b, Cmd::Disc, 3, 0, 0);
    request(&mut b, Cmd::Read, 4, 0, 4);
    p.s.receive(&b);
    p.run();
    p.flush();
    assert_eq!(reply_cookies(&p.sent), vec![1, 2]);
    assert_eq!(p.closes, 1);
    assert!(p.s.is_finished());
    p.s.eof();
    p.run();
    assert_eq!(p.closes, 1);
}

#[test]
fn an_unfinished_handshake_is_dropped_at_shutdown() {
    let mut p = Peer::new(config(TlsMode::Off, Limits::default()));
    p.run();
    p.s.begin_shutdown();
    p.run();
    assert!(p.s.is_finished());
    assert_eq!(p.closes, 0, "nothing was opened");
}

#[test]
fn an_open_still_running_when_the_client_leaves_is_closed_afterwards() {
    let mut p = Peer::new(config(TlsMode::Off, Limits::default()));
    p.run();
    let mut b = Vec::new();
    b.put_u32(CLIENT_FIXED_NEWSTYLE);
    go(&mut b);
    p.s.receive(&b);
    assert_eq!(p.hold(), 1, "the open");
    p.s.eof();
    assert!(!p.s.is_finished());
    p.release(1);
    p.run();
    assert_eq!(p.closes, 1);
    assert!(p.s.is_finished());
}

#[test]
fn a_handshake_that_takes_too_long_is_given_up() {
    let mut p = Peer::new(config(TlsMode::Off, Limits::default()));
    p.run();
    let d = p.s.deadline().expect("a deadline while negotiating");
    p.s.handle_timeout(d - Duration::from_millis(1));
    assert!(!p.s.is_finished());
    p.s.handle_timeout(d);
    assert!(p.s.is_finished());
}

#[test]
fn steady_state_requests_allocate_nothing() {
    let mut p = Peer::transmitting(Limits::default());
    let mut batch = Vec::new();
    for i in 0..64u64 {
        if i % 2 == 0 {
            request(&mut batch, Cmd::Read, i, i * 4096, 4096);
        } else {
            request(&mut batch, Cmd::Write, i, i * 4096, 4096);
            batch.put_bytes(i as u8, 4096);
        }
    }
    let round = |p: &mut Peer| {
        p.s.receive(&batch);
        p.run();
        while let Some(out) = p.s.poll_transmit() {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = out.slices(&mut iov);
            let total: usize = iov[..n].iter().map(|s| s.len()).sum();
            p.s.sent(total);
        }
    };
    for _ in 0..20 {
        round(&mut p);
    }
    let before = allocations();
    for _ in 0..100 {
        round(&mut p);
    }
    assert_eq!(allocations() - before, 0, "6400 requests, no allocation");
}
