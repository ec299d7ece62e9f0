//! One client connection: moves bytes between its stream and the protocol
//! state machines, and sends backend work to the worker pool.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::CString;
use std::io::{self, IoSlice, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use nbdhost_plugin_api::{Error, Flags};

use crate::backend::{Backend, Extent, Handle};
use crate::export::{ExportInfo, ExportPolicy};
use crate::handshake::{Answer, Event, Handshake, HandshakeConfig, Query};
use crate::host::{self, ConnContext};
use crate::listen::{Peer, Stream};
use crate::tls::{self, TlsConfig, TlsSession};
use crate::transmission::{self, Command, Decoded, Decoder, Op};
use crate::wire::{errno_to_nbd, ReplyHeader, EIO};
use crate::workers::{Job, Notifier, Pool};

/// Requests of one connection being served at once before we stop reading.
const MAX_INFLIGHT: usize = 256;
/// Reply bytes queued for one connection before we stop reading.
const MAX_QUEUED: usize = 64 << 20;
/// Bytes asked of the socket per read, unless a payload needs more.
const READ_CHUNK: usize = 256 * 1024;
/// Size of [`Shared::read_scratch`]: the largest single read.
pub const READ_MAX: usize = 4 * READ_CHUNK;

/// A result coming back from a worker.
pub enum Completion {
    Query {
        conn: u64,
        answer: Answer,
        handle: Option<Arc<dyn Handle>>,
        ctx: Arc<ConnContext>,
    },
    Reply {
        conn: u64,
        parts: Vec<Bytes>,
    },
    /// The `--run` command exited with this status.
    ChildExited(i32),
}

/// What every connection shares.
pub struct Shared {
    /// Declared first so it is dropped first: the workers are joined while
    /// the plugin and filters are still loaded, as their threads' exit
    /// handlers (thread-locals) may run code from those libraries.
    pub pool: Pool,
    pub backend: Arc<dyn Backend>,
    /// The top layer's name, for log lines.
    pub name: Arc<str>,
    pub notify: Notifier<Completion>,
    pub policy: ExportPolicy,
    pub handshake: HandshakeConfig,
    /// Held around every backend call (serialize_all_requests and stricter).
    pub global_lock: Option<Arc<Mutex<()>>>,
    /// Whether each connection gets its own lock (serialize_requests).
    pub per_connection_lock: bool,
    /// Jobs queued or running, so shutdown can wait for them.
    pub outstanding: Arc<AtomicUsize>,
    /// Credentials for STARTTLS, when TLS is enabled.
    pub tls: Option<Arc<TlsConfig>>,
    /// The event loop's landing area for socket reads, zeroed once: only
    /// the bytes received are copied on into a connection's `rbuf`, where
    /// growing `rbuf` by a read window each time would zero-fill up to a
    /// megabyte per small request.
    pub read_scratch: RefCell<Vec<u8>>,
}

impl Shared {
    fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let outstanding = self.outstanding.clone();
        outstanding.fetch_add(1, Ordering::AcqRel);
        let job: Job = Box::new(move || {
            job();
            outstanding.fetch_sub(1, Ordering::AcqRel);
        });
        self.pool.submit(job);
    }
}

enum Phase {
    Handshake(Handshake),
    Transmission(Decoder),
}

/// The state of one client.
pub struct Connection {
    pub id: u64,
    pub stream: Stream,
    peer: Peer,
    rbuf: BytesMut,
    out: BytesMut,
    wq: VecDeque<Bytes>,
    wq_bytes: usize,
    phase: Phase,
    handle: Option<Arc<dyn Handle>>,
    ctx: Arc<ConnContext>,
    lock: Option<Arc<Mutex<()>>>,
    inflight: usize,
    /// A handshake query is with the workers.
    waiting: bool,
    /// The client will send nothing more (EOF, DISC, or we decided to close).
    read_done: bool,
    /// Close now, without waiting for anything.
    dead: bool,
    /// Reading stopped for back-pressure or a pending query, with input
    /// possibly left in the socket: edge-triggered polling will not tell
    /// us again, so whoever relieves the pressure must resume.
    paused: bool,
    /// When an unfinished handshake is given up.
    pub deadline: Option<Instant>,
    /// The TLS session after STARTTLS; every byte then passes through it.
    tls: Option<TlsSession>,
    /// The TLS handshake has completed.
    tls_ready: bool,
    /// Who the client proved to be over TLS (PSK user or certificate DN).
    tls_identity: Option<String>,
}

impl Connection {
    /// A new client; call [`Connection::start`] once it is registered.
    pub fn new(
        id: u64,
        stream: Stream,
        peer: Peer,
        shared: &Shared,
        deadline: Option<Instant>,
    ) -> Self {
        let lock = shared
            .global_lock
            .clone()
            .or_else(|| shared.per_connection_lock.then(|| Arc::new(Mutex::new(()))));
        Connection {
            id,
            stream,
            peer,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::new(),
            wq: VecDeque::new(),
            wq_bytes: 0,
            phase: Phase::Handshake(Handshake::new(shared.handshake.clone())),
            handle: None,
            ctx: Arc::new(ConnContext {
                peer: Some(peer),
                ..Default::default()
            }),
            lock,
            inflight: 0,
            waiting: false,
            read_done: false,
            dead: false,
            paused: false,
            deadline,
            tls: None,
            tls_ready: false,
            tls_identity: None,
        }
    }

    /// Begin the handshake.
    pub fn start(&mut self, sh: &Shared) {
        self.process(sh);
        self.flush();
    }

    /// Whether the connection can be dropped.
    pub fn finished(&self) -> bool {
        self.dead
            || (self.read_done
                && self.inflight == 0
                && !self.waiting
                && self.wq.is_empty()
                && self.out.is_empty())
    }

    /// Whether no request of this connection is running on a worker, so
    /// dropping it loses nothing that was acknowledged.
    pub fn nothing_running(&self) -> bool {
        self.inflight == 0
    }

    /// Whether the handshake is still under way.
    pub fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Handshake(_))
    }

    /// Stop taking requests; finish those in flight. An unfinished
    /// handshake is simply dropped.
    pub fn begin_shutdown(&mut self) {
        self.read_done = true;
        if self.in_handshake() {
            self.dead = true;
        }
    }

    /// Drop the connection now, logging why.
    pub fn fail(&mut self, why: &str) {
        log::warn!("connection {}: {why}; closing", self.id >> 32);
        self.dead = true;
    }

    /// Release the plugin handle on a worker (closing may block).
    pub fn close(&mut self, sh: &Shared) {
        if let Some(t) = self.tls.as_mut().filter(|_| self.tls_ready && !self.dead) {
            // Best effort: the socket may not take the alert, and we close
            // anyway.
            t.close_notify();
            if let Some(b) = t.take_output() {
                self.push_wire(b);
            }
            self.flush();
        }
        self.stream.shutdown();
        if let Some(h) = self.handle.take() {
            let lock = self.lock.clone();
            let ctx = self.ctx.clone();
            sh.submit(move || {
                let _g = lock
                    .as_ref()
                    .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
                host::with_context(&ctx, || drop(h));
            });
        }
        log::debug!("connection {}: closed", self.id >> 32);
    }

    fn can_read(&self) -> bool {
        if self.read_done || self.dead {
            return false;
        }
        match self.phase {
            Phase::Handshake(_) => !self.waiting,
            Phase::Transmission(_) => self.inflight < MAX_INFLIGHT && self.wq_bytes < MAX_QUEUED,
        }
    }

    /// The socket has data (or EOF): read it all and act on it.
    pub fn on_readable(&mut self, sh: &Shared) {
        while self.can_read() {
            let want = match &self.phase {
                Phase::Transmission(d) => d.wanted(&self.rbuf).clamp(READ_CHUNK, READ_MAX),
                Phase::Handshake(_) => READ_CHUNK,
            };
            if self.tls.is_some() {
                match self.read_tls(sh) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        self.fail(&e);
                        break;
                    }
                }
            }
            let r = {
                let mut scratch = sh.read_scratch.borrow_mut();
                let want = want.min(scratch.len());
                let r = self.stream.read(&mut scratch[..want]);
                if let Ok(n) = r {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                }
                r
            };
            match r {
                Ok(0) => {
                    self.read_done = true;
                    if self.in_handshake() {
                        log::debug!(
                            "connection {}: client closed during the handshake",
                            self.id >> 32
                        );
                        self.dead = true;
                    }
                }
                Ok(_) => self.process(sh),
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => {}
                    _ => self.fail(&format!("read error: {e}")),
                },
            }
        }
        if !self.read_done && !self.dead && !self.can_read() {
            self.paused = true;
        }
        self.process(sh);
        self.flush();
    }

    /// One read through TLS: ciphertext from the socket into the session,
    /// plaintext out of it into `rbuf`. `Ok(false)` when the socket has
    /// nothing more for now.
    fn read_tls(&mut self, sh: &Shared) -> Result<bool, String> {
        let mut buf = [0u8; 64 * 1024];
        let n = match self.stream.read(&mut buf) {
            Ok(0) => {
                self.read_done = true;
                if self.in_handshake() {
                    self.dead = true;
                }
                return Ok(false);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(format!("read error: {e}")),
        };
        let t = self.tls.as_mut().expect("TLS connection");
        t.feed(&buf[..n]);
        if self.tls_ready {
            self.decrypt()?;
        } else {
            self.advance_tls(sh);
        }
        self.process(sh);
        Ok(true)
    }

    /// Move decrypted input into `rbuf`.
    fn decrypt(&mut self) -> Result<(), String> {
        let t = self.tls.as_mut().expect("TLS connection");
        if t.read_plaintext(&mut self.rbuf)
            .map_err(|e| format!("TLS: {e}"))?
            == tls::Read::Closed
        {
            self.read_done = true;
        }
        Ok(())
    }

    /// STARTTLS was accepted: everything after its reply is TLS.
    fn start_tls(&mut self, sh: &Shared) {
        let Some(cfg) = &sh.tls else {
            self.fail("STARTTLS accepted without a TLS configuration");
            return;
        };
        // The plaintext ACK must precede the first TLS record.
        if !self.out.is_empty() {
            let b = self.out.split().freeze();
            self.queue(b);
        }
        match TlsSession::new(cfg) {
            Ok(mut t) => {
                // A client may already have sent its ClientHello.
                t.feed(&self.rbuf.split());
                self.tls = Some(t);
                self.advance_tls(sh);
            }
            Err(e) => self.fail(&format!("cannot start TLS: {e}")),
        }
    }

    /// Drive the TLS handshake with what has arrived.
    fn advance_tls(&mut self, sh: &Shared) {
        let t = self.tls.as_mut().expect("TLS connection");
        let r = t.handshake();
        // GnuTLS only knows the peer's identity once the handshake is done.
        let (proto, who) = match r {
            Ok(true) => (t.protocol(), t.peer_identity()),
            _ => (
                String::new(),
                t.attempted_user().map(|u| format!("PSK user {u}")),
            ),
        };
        if let Some(b) = t.take_output() {
            self.push_wire(b);
        }
        match r {
            Ok(false) => {}
            Ok(true) => {
                log::debug!(
                    "connection {}: {proto} established{}",
                    self.id >> 32,
                    who.as_deref()
                        .map(|w| format!(" with {w}"))
                        .unwrap_or_default()
                );
                self.tls_ready = true;
                self.tls_identity = who;
                if let Phase::Handshake(hs) = &mut self.phase {
                    hs.tls_established();
                }
                if let Err(e) = self.decrypt() {
                    self.fail(&e);
                    return;
                }
                self.process(sh);
            }
            Err(e) => {
                let user = who.map(|w| format!(" (as {w})")).unwrap_or_default();
                log::warn!(
                    "connection {}: TLS handshake with {}{user} failed: {e}",
                    self.id >> 32,
                    peer_text(&self.peer)
                );
                // Let the alert go out, then close.
                self.read_done = true;
            }
        }
    }

    /// Resume reading if it was paused; call after relieving pressure.
    pub fn resume(&mut self, sh: &Shared) {
        if self.paused {
            self.paused = false;
            self.on_readable(sh);
        }
    }

    /// Act on buffered input as far as possible.
    fn process(&mut self, sh: &Shared) {
        loop {
            if self.dead {
                return;
            }
            match &mut self.phase {
                Phase::Handshake(hs) => {
                    if self.waiting || (self.tls.is_some() && !self.tls_ready) {
                        return;
                    }
                    let ev = hs.receive(&mut self.rbuf, &mut self.out);
                    if !self.handshake_event(ev, sh) {
                        return;
                    }
                }
                Phase::Transmission(dec) => {
                    if self.inflight >= MAX_INFLIGHT || self.wq_bytes >= MAX_QUEUED {
                        self.paused = true;
                        return;
                    }
                    match dec.next(&mut self.rbuf) {
                        Decoded::NeedMore => return,
                        Decoded::Op(op) => self.dispatch(op, sh),
                        Decoded::Rejected(reply) => self.queue(reply.freeze()),
                        Decoded::Disconnect => {
                            log::debug!("connection {}: client disconnected", self.id >> 32);
                            self.read_done = true;
                            self.rbuf.clear();
                            return;
                        }
                        Decoded::Fatal(why) => {
                            self.fail(&why);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Returns whether to keep processing input.
    fn handshake_event(&mut self, ev: Event, sh: &Shared) -> bool {
        match ev {
            Event::NeedInput => false,
            Event::Query(q) => {
                self.query(q, sh);
                false
            }
            Event::Done(n) => {
                log::debug!(
                    "connection {}: serving export '{}' ({} bytes, {:?} replies)",
                    self.id >> 32,
                    n.export.name,
                    n.export.size,
                    n.style
                );
                self.phase = Phase::Transmission(Decoder::new(n));
                self.deadline = None;
                true
            }
            Event::StartTls => {
                self.start_tls(sh);
                false
            }
            Event::Aborted => {
                log::debug!("connection {}: client ended the handshake", self.id >> 32);
                self.read_done = true;
                false
            }
            Event::Close(why) => {
                log::warn!("connection {}: {why}; closing", self.id >> 32);
                self.read_done = true;
                false
            }
        }
    }

    fn query(&mut self, q: Query, sh: &Shared) {
        self.waiting = true;
        let backend = sh.backend.clone();
        let notify = sh.notify.clone();
        let lock = sh.global_lock.clone();
        let (id, peer, policy) = (self.id, self.peer, sh.policy);
        let tls = self.tls_ready.then(|| self.tls_identity.clone());
        sh.submit(move || {
            let _g = lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
            let run = || run_query(&*backend, q, peer, tls, policy);
            let (answer, handle, ctx) = catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|_| {
                let answer = Answer::Open(Err((libc::EIO, "internal error".into())));
                (answer, None, Arc::new(ConnContext::default()))
            });
            notify.send(Completion::Query {
                conn: id,
                answer,
                handle,
                ctx,
            });
        });
    }

    fn dispatch(&mut self, op: Op, sh: &Shared) {
        let Some(handle) = self.handle.clone() else {
            self.fail("request without an open export");
            return;
        };
        self.inflight += 1;
        let notify = sh.notify.clone();
        let lock = self.lock.clone();
        let ctx = self.ctx.clone();
        let name = sh.name.clone();
        let id = self.id;
        let can_extents = match &self.phase {
            Phase::Transmission(d) => d.session().export.can_extents,
            Phase::Handshake(_) => false,
        };
        sh.submit(move || {
            let _g = lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
            let hdr = op.reply;
            let run = || host::with_context(&ctx, || execute(&*handle, op, &name, can_extents));
            let parts = catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|_| {
                log::error!("{name}: request panicked");
                status(&hdr, EIO, "internal error")
            });
            notify.send(Completion::Reply { conn: id, parts });
        });
    }

    /// A worker finished something for this connection. Output is left
    /// queued: the loop flushes once per batch of completions.
    pub fn complete(&mut self, c: Completion, sh: &Shared) {
        match c {
            Completion::Query {
                answer,
                handle,
                ctx,
                ..
            } => {
                self.waiting = false;
                if let Some(h) = handle {
                    self.handle = Some(h);
                    self.ctx = ctx;
                }
                if let Phase::Handshake(hs) = &mut self.phase {
                    let ev = hs.answer(answer, &mut self.out);
                    if self.handshake_event(ev, sh) {
                        self.process(sh);
                    }
                }
            }
            Completion::Reply { parts, .. } => {
                self.inflight -= 1;
                for p in parts {
                    self.queue(p);
                }
            }
            Completion::ChildExited(_) => {}
        }
        self.resume(sh);
    }

    fn queue(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        let b = match self.tls.as_mut().filter(|_| self.tls_ready) {
            Some(t) => {
                if let Err(e) = t.write_plaintext(&b) {
                    self.fail(&format!("TLS: {e}"));
                    return;
                }
                match t.take_output() {
                    Some(c) => c,
                    None => return,
                }
            }
            None => b,
        };
        self.push_wire(b);
    }

    /// Queue bytes exactly as they go on the wire (already encrypted).
    fn push_wire(&mut self, b: Bytes) {
        self.wq_bytes += b.len();
        self.wq.push_back(b);
    }

    /// Write as much queued output as the socket takes.
    pub fn flush(&mut self) {
        if !self.out.is_empty() {
            let b = self.out.split().freeze();
            self.queue(b);
        }
        while !self.wq.is_empty() && !self.dead {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = self.wq.len().min(iov.len());
            for (slot, b) in iov.iter_mut().zip(self.wq.iter()) {
                *slot = IoSlice::new(b);
            }
            match self.stream.write_vectored(&iov[..n]) {
                Ok(0) => self.fail("peer stopped reading"),
                Ok(mut written) => {
                    self.wq_bytes -= written;
                    while written > 0 {
                        let front = self
                            .wq
                            .front_mut()
                            .expect("written bytes came from the queue");
                        if front.len() <= written {
                            written -= front.len();
                            self.wq.pop_front();
                        } else {
                            front.advance(written);
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    // The client hung up; nothing to warn anyone about.
                    log::debug!("connection {}: client went away: {e}", self.id >> 32);
                    self.dead = true;
                }
                Err(e) => self.fail(&format!("write error: {e}")),
            }
        }
    }
}

/// Run a handshake query against the backend (on a worker).
/// `tls` is `Some(identity)` on a TLS connection.
fn run_query(
    backend: &dyn Backend,
    q: Query,
    peer: Peer,
    tls: Option<Option<String>>,
    policy: ExportPolicy,
) -> (Answer, Option<Arc<dyn Handle>>, Arc<ConnContext>) {
    let readonly = policy.readonly;
    let is_tls = tls.is_some();
    let mut ctx = ConnContext {
        peer: Some(peer),
        is_tls,
        identity: tls.flatten().and_then(|i| CString::new(i).ok()),
        ..Default::default()
    };
    let msg = |e: Error| e.to_string();
    match q {
        Query::Preconnect => {
            let r = host::with_context(&ctx, || backend.preconnect(readonly)).map_err(msg);
            (Answer::Preconnect(r), None, Arc::new(ctx))
        }
        Query::List => {
            let r =
                host::with_context(&ctx, || backend.list_exports(readonly, is_tls)).map_err(msg);
            (Answer::List(r), None, Arc::new(ctx))
        }
        Query::Open { name, keep } => {
            let resolved = if name.is_empty() {
                host::with_context(&ctx, || backend.default_export(readonly, is_tls))
            } else {
                Ok(name)
            };
            let opened = resolved.and_then(|name| {
                ctx.export_name = CString::new(name.clone())
                    .map_err(|_| Error::new(libc::EINVAL, "NUL in export name"))?;
                host::with_context(&ctx, || {
                    let h = backend.open(readonly)?;
                    let info = ExportInfo::query(&name, &*h, policy)?;
                    Ok((h, info))
                })
            });
            let ctx = Arc::new(ctx);
            match opened {
                Ok((h, info)) => {
                    let handle: Option<Arc<dyn Handle>> = if keep {
                        Some(Arc::from(h))
                    } else {
                        host::with_context(&ctx, || drop(h));
                        None
                    };
                    (Answer::Open(Ok(info)), handle, ctx)
                }
                Err(e) => {
                    log::warn!("{}: cannot open export: {e}", backend.name());
                    (Answer::Open(Err((e.raw_errno(), e.to_string()))), None, ctx)
                }
            }
        }
    }
}

fn status(hdr: &ReplyHeader, error: u32, msg: &str) -> Vec<Bytes> {
    let mut b = BytesMut::with_capacity(64);
    hdr.put_status(&mut b, error, msg);
    vec![b.freeze()]
}

/// Perform one request against the handle and encode its reply.
fn execute(h: &dyn Handle, op: Op, name: &str, can_extents: bool) -> Vec<Bytes> {
    let off = op.offset;
    let fua = |on: bool| if on { Flags::FUA } else { Flags::empty() };
    let (what, r): (&str, Result<Vec<Bytes>, Error>) = match op.command {
        Command::Read { len, df } => {
            let mut buf = vec![0u8; len as usize];
            let r = h.pread(&mut buf, off, Flags::empty());
            (
                "read",
                r.map(|()| transmission::read_reply(&op.reply, off, df, buf)),
            )
        }
        Command::Write { data, fua: f } => (
            "write",
            h.pwrite(&data, off, fua(f)).map(|()| ok(&op.reply)),
        ),
        Command::Flush => ("flush", h.flush(Flags::empty()).map(|()| ok(&op.reply))),
        Command::Trim { len, fua: f } => ("trim", h.trim(len, off, fua(f)).map(|()| ok(&op.reply))),
        Command::Zero {
            len,
            fua: f,
            may_trim,
            fast,
        } => {
            let mut flags = fua(f);
            flags.set(Flags::MAY_TRIM, may_trim);
            flags.set(Flags::FAST_ZERO, fast);
            // A filter may refuse to zero as well; the protocol only lets a
            // fast-zero request fail that way, so write zeroes through it.
            let r = match h.zero(len, off, flags) {
                Err(e) if e.raw_errno() == libc::ENOTSUP => {
                    crate::backend::write_zeroes(h, len, off, flags)
                }
                r => r,
            };
            ("zero", r.map(|()| ok(&op.reply)))
        }
        Command::Cache { len } => (
            "cache",
            h.cache(len, off, Flags::empty()).map(|()| ok(&op.reply)),
        ),
        Command::BlockStatus { len, req_one } => {
            let flags = if req_one {
                Flags::REQ_ONE
            } else {
                Flags::empty()
            };
            let extents = if can_extents {
                h.extents(len, off, flags)
            } else {
                Ok(vec![Extent {
                    offset: off,
                    length: len,
                    flags: 0,
                }])
            };
            let r = extents.map(|ex| {
                vec![transmission::block_status_reply(&op.reply, off, len, req_one, &ex).freeze()]
            });
            ("block status", r)
        }
    };
    match r {
        Ok(parts) => parts,
        Err(e) => {
            if let Some(m) = e.message() {
                log::error!("{name}: {what} at offset {off}: {m}");
            }
            status(&op.reply, errno_to_nbd(e.raw_errno()), what)
        }
    }
}

fn ok(hdr: &ReplyHeader) -> Vec<Bytes> {
    status(hdr, 0, "")
}

fn peer_text(p: &Peer) -> String {
    match p {
        Peer::Inet(a) => a.to_string(),
        Peer::Unix => "a Unix-socket client".into(),
        Peer::Pipe => "the stdin client".into(),
    }
}
