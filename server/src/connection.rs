//! One client connection: moves bytes between its stream and the protocol
//! state machines, and sends backend work to the worker pool.

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
use crate::transmission::{self, Command, Decoded, Decoder, Op};
use crate::wire::{errno_to_nbd, ReplyHeader, EIO};
use crate::workers::{Job, Notifier, Pool};

/// Requests of one connection being served at once before we stop reading.
const MAX_INFLIGHT: usize = 256;
/// Reply bytes queued for one connection before we stop reading.
const MAX_QUEUED: usize = 64 << 20;
/// Bytes asked of the socket per read, unless a payload needs more.
const READ_CHUNK: usize = 256 * 1024;

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
    pub backend: Arc<dyn Backend>,
    /// The top layer's name, for log lines.
    pub name: Arc<str>,
    pub pool: Pool,
    pub notify: Notifier<Completion>,
    pub policy: ExportPolicy,
    pub handshake: HandshakeConfig,
    /// Held around every backend call (serialize_all_requests and stricter).
    pub global_lock: Option<Arc<Mutex<()>>>,
    /// Whether each connection gets its own lock (serialize_requests).
    pub per_connection_lock: bool,
    /// Jobs queued or running, so shutdown can wait for them.
    pub outstanding: Arc<AtomicUsize>,
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
                Phase::Transmission(d) => d.wanted(&self.rbuf).clamp(READ_CHUNK, 4 * READ_CHUNK),
                Phase::Handshake(_) => READ_CHUNK,
            };
            let len = self.rbuf.len();
            self.rbuf.resize(len + want, 0);
            let r = self.stream.read(&mut self.rbuf[len..]);
            match r {
                Ok(0) => {
                    self.rbuf.truncate(len);
                    self.read_done = true;
                    if self.in_handshake() {
                        log::debug!(
                            "connection {}: client closed during the handshake",
                            self.id >> 32
                        );
                        self.dead = true;
                    }
                }
                Ok(n) => {
                    self.rbuf.truncate(len + n);
                    self.process(sh);
                }
                Err(e) => {
                    self.rbuf.truncate(len);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => {}
                        _ => self.fail(&format!("read error: {e}")),
                    }
                }
            }
        }
        if !self.read_done && !self.dead && !self.can_read() {
            self.paused = true;
        }
        self.process(sh);
        self.flush();
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
                    if self.waiting {
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
                self.fail("STARTTLS accepted without a TLS configuration");
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
        sh.submit(move || {
            let _g = lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
            let run = || run_query(&*backend, q, peer, policy);
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
        if !b.is_empty() {
            self.wq_bytes += b.len();
            self.wq.push_back(b);
        }
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
                Err(e) => self.fail(&format!("write error: {e}")),
            }
        }
    }
}

/// Run a handshake query against the backend (on a worker).
fn run_query(
    backend: &dyn Backend,
    q: Query,
    peer: Peer,
    policy: ExportPolicy,
) -> (Answer, Option<Arc<dyn Handle>>, Arc<ConnContext>) {
    let readonly = policy.readonly;
    let mut ctx = ConnContext {
        peer: Some(peer),
        ..Default::default()
    };
    let msg = |e: Error| e.to_string();
    match q {
        Query::Preconnect => {
            let r = host::with_context(&ctx, || backend.preconnect(readonly)).map_err(msg);
            (Answer::Preconnect(r), None, Arc::new(ctx))
        }
        Query::List => {
            let r = host::with_context(&ctx, || backend.list_exports(readonly, false)).map_err(msg);
            (Answer::List(r), None, Arc::new(ctx))
        }
        Query::Open { name, keep } => {
            let resolved = if name.is_empty() {
                host::with_context(&ctx, || backend.default_export(readonly, false))
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
            ("zero", h.zero(len, off, flags).map(|()| ok(&op.reply)))
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
