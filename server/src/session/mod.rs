//! One client connection as a pure state machine, in the manner of
//! quinn-proto's `Connection`: it owns the phase (handshake, the switch to
//! TLS, transmission), the buffers, back-pressure, in-flight accounting,
//! shutdown and the disposal of the connection's handle, and it is driven
//! only through calls:
//!
//! - bytes arrived: [`Session::receive`] (or [`Session::input_buffer`] and
//!   [`Session::received`] to read straight into its buffer);
//! - what work is ready: [`Session::poll_work`];
//! - this work finished: [`Session::complete`];
//! - what should be sent now: [`Session::poll_transmit`], then
//!   [`Session::sent`].
//!
//! It never touches a socket, a thread or the layer chain, so every part of
//! a connection's life can be unit-tested and fuzzed without them.

pub mod buffers;
pub mod output;
mod work;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::protocol::export::MAX_PAYLOAD;
use crate::protocol::handshake::{Event, Handshake, HandshakeConfig};
use crate::protocol::reply::{put_block_status, put_read_chunk, read_chunks, ReadChunk};
use crate::protocol::request::{Command, Decoded, Decoder, Front};
use crate::protocol::wire::{ReplyStyle, EIO};
use output::{Data, OutQueue};

pub use work::{
    Done, Outcome, PeerIdentity, Request, TlsEngine, TlsEngineError, TlsFactory, TlsHandshake,
    TlsRead, TlsState, Work,
};

/// What one connection may hold at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of request payloads, read buffers and queued replies. A
    /// single request is always taken on when nothing else is held, so a
    /// maximum-size request is never refused for the limit.
    pub max_bytes: usize,
    /// Requests handed out and not yet answered.
    pub max_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 20,
            max_requests: 256,
        }
    }
}

/// Settings every session of a server shares.
#[derive(Clone)]
pub struct Config {
    pub handshake: HandshakeConfig,
    /// Makes TLS engines for STARTTLS, when TLS is enabled.
    pub tls: Option<Arc<dyn TlsFactory>>,
    pub limits: Limits,
    /// How long a client may take to finish the handshake.
    pub handshake_timeout: Option<Duration>,
}

/// Bytes asked of the socket per read unless a request needs more.
const READ_CHUNK: usize = 64 * 1024;
/// What a request is charged beyond its data: room for its reply's
/// headers (a read with holes never sends more than its length and one
/// header).
const REPLY_OVERHEAD: usize = 64;

/// Where the connection is in the protocol.
enum Phase {
    /// Negotiating.
    Handshake {
        machine: Handshake,
        /// When the handshake will be given up.
        deadline: Option<Instant>,
        /// A query is out with the driver: nothing more is decoded until
        /// its answer is in.
        querying: bool,
    },
    /// Serving requests.
    Transmission(Decoder),
}

/// What the bytes on the wire are.
enum Transport {
    /// The protocol's own bytes: no TLS, or a TLS handshake that failed
    /// (its alert, already ciphertext, goes out as it is).
    Clear,
    /// STARTTLS was accepted and the TLS handshake is under way: every
    /// byte from here on is the engine's.
    Handshaking(Box<dyn TlsEngine>),
    /// Inside TLS: input is decrypted and replies are encrypted.
    Established {
        engine: Box<dyn TlsEngine>,
        /// Who the client proved to be, if anyone.
        identity: Option<PeerIdentity>,
    },
}

impl Transport {
    /// The TLS handshake under way has completed.
    fn establish(&mut self, identity: Option<PeerIdentity>) {
        *self = match std::mem::replace(self, Transport::Clear) {
            Transport::Handshaking(engine) => Transport::Established { engine, identity },
            other => other,
        };
    }
}

/// How much of the connection's I/O goes on. It only ever moves down
/// the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Io {
    /// Input is taken and output sent.
    Open,
    /// No more input is taken (EOF, disconnect, shutdown, the end of the
    /// handshake, a TLS session the client closed); output still goes out.
    InputClosed,
    /// Nothing more is read or sent: output is dropped (the socket
    /// failed, a fatal error, a client gone or a server shutting down
    /// mid-handshake).
    Stopped,
}

impl Io {
    /// Input is still taken.
    fn reading(self) -> bool {
        self == Io::Open
    }

    /// Output still goes out.
    fn sending(self) -> bool {
        self != Io::Stopped
    }

    /// Take no more input.
    fn close_input(&mut self) {
        if *self == Io::Open {
            *self = Io::InputClosed;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandleState {
    /// The handle (if any) is still open.
    Open,
    /// [`Work::Close`] has been handed out.
    Closing,
    /// Nothing of the connection is left but unsent output.
    Closed,
}

/// The state of one client connection.
pub struct Session<H> {
    /// The connection's number, for log lines.
    id: u64,
    /// Who the client is, for log lines.
    peer: String,
    cfg: Arc<Config>,
    phase: Phase,
    /// Plaintext received and not yet decoded.
    input: BytesMut,
    /// Bytes for the wire.
    out: OutQueue,
    /// Plaintext replies waiting to be encrypted, once TLS is established.
    plain: OutQueue,
    /// Clear or TLS.
    transport: Transport,
    /// Whether input is taken and output sent.
    io: Io,
    ready: VecDeque<Work<H>>,
    handle: Option<H>,
    in_flight: usize,
    in_flight_bytes: usize,
    handle_state: HandleState,
    /// Scratch list of read chunks, kept to avoid allocating per reply.
    chunks: Vec<ReadChunk>,
    /// Anything happened since the last [`Session::shrink`].
    active: bool,
}

impl<H> Session<H> {
    /// A new connection; the first work (the `preconnect` query) is ready
    /// at once.
    pub fn new(id: u64, peer: String, cfg: Arc<Config>, now: Instant) -> Session<H> {
        let mut s = Session {
            id,
            peer,
            phase: Phase::Handshake {
                machine: Handshake::new(cfg.handshake.clone()),
                deadline: cfg.handshake_timeout.map(|t| now + t),
                querying: false,
            },
            cfg,
            input: BytesMut::new(),
            out: OutQueue::default(),
            plain: OutQueue::default(),
            transport: Transport::Clear,
            io: Io::Open,
            ready: VecDeque::new(),
            handle: None,
            in_flight: 0,
            in_flight_bytes: 0,
            handle_state: HandleState::Open,
            chunks: Vec::new(),
            active: true,
        };
        s.process();
        s
    }

    /// The connection's number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes arrived from the client.
    pub fn receive(&mut self, data: &[u8]) {
        if !self.io.reading() {
            return;
        }
        self.wire_in().extend_from_slice(data);
        self.process();
    }

    /// The buffer received bytes go into, with room reserved for one read;
    /// call [`Session::received`] after filling it.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        let hint = self.read_hint();
        let b = self.wire_in();
        b.reserve(hint);
        b
    }

    /// Bytes were added to [`Session::input_buffer`].
    pub fn received(&mut self) {
        if !self.io.reading() {
            self.wire_in().clear();
            return;
        }
        self.process();
    }

    /// How many bytes to ask the socket for.
    pub fn read_hint(&self) -> usize {
        match &self.phase {
            Phase::Transmission(d) if matches!(self.transport, Transport::Clear) => {
                match d.front(&self.input) {
                    Front::Incomplete { wanted } => wanted.clamp(READ_CHUNK, MAX_PAYLOAD as usize),
                    Front::Complete { .. } => READ_CHUNK,
                }
            }
            _ => READ_CHUNK,
        }
    }

    /// The client will send nothing more.
    pub fn eof(&mut self) {
        log::debug!("connection {}: client closed its side", self.id);
        if self.in_handshake() {
            // Nobody is listening for the rest of a handshake.
            self.io = Io::Stopped;
            self.out.clear();
        } else {
            self.io.close_input();
        }
        self.process();
    }

    /// The socket failed: nothing more can be read or sent.
    pub fn connection_lost(&mut self, why: &str) {
        log::debug!("connection {}: {why}", self.id);
        self.stop_io();
        self.process();
    }

    /// Close the connection as soon as what is running has finished,
    /// logging why; unsent output is dropped.
    pub fn abandon(&mut self, why: &str) {
        self.fail(why);
        self.process();
    }

    /// The server is shutting down: take no new requests and finish those
    /// running. An unfinished handshake is simply dropped.
    pub fn begin_shutdown(&mut self) {
        if self.in_handshake() {
            self.io = Io::Stopped;
            self.out.clear();
        } else {
            self.io.close_input();
        }
        self.process();
    }

    /// When the handshake will be given up, while it lasts.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Handshake { deadline, .. } => *deadline,
            Phase::Transmission(_) => None,
        }
    }

    /// Time has passed: give up a handshake that took too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline().is_some_and(|d| d <= now) && self.io.sending() {
            self.abandon("handshake timed out");
        }
    }

    /// Whether the handshake is still under way.
    pub fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Handshake { .. })
    }

    /// Whether the session wants more input now. `false` is back-pressure:
    /// the driver stops reading until a completion or a write makes room.
    pub fn wants_read(&self) -> bool {
        if !self.io.reading() {
            return false;
        }
        if matches!(self.transport, Transport::Handshaking(_)) {
            return true;
        }
        match &self.phase {
            Phase::Handshake { querying, .. } => !querying,
            Phase::Transmission(d) => {
                matches!(d.front(&self.input), Front::Incomplete { .. })
                    && self.held() < self.cfg.limits.max_bytes
                    && self.in_flight < self.cfg.limits.max_requests
            }
        }
    }

    /// The next piece of work, if any.
    #[must_use]
    pub fn poll_work(&mut self) -> Option<Work<H>> {
        self.ready.pop_front()
    }

    /// The open handle, for running a request where it was polled.
    pub fn handle(&self) -> Option<&H> {
        self.handle.as_ref()
    }

    /// Work handed out by [`Session::poll_work`] has finished.
    pub fn complete(&mut self, done: Done<H>) {
        self.active = true;
        match done {
            Done::Query { answer, opened } => {
                if let Some(h) = opened {
                    self.handle = Some(h);
                }
                let encrypting = self.encrypting();
                if let Phase::Handshake {
                    machine, querying, ..
                } = &mut self.phase
                {
                    *querying = false;
                    // A client that has gone needs no answer.
                    if self.io.sending() {
                        let out = if encrypting {
                            &mut self.plain
                        } else {
                            &mut self.out
                        };
                        let ev = out.encode(|o| machine.answer(answer, o));
                        self.handshake_event(ev);
                    }
                }
            }
            Done::Request(req, outcome) => {
                self.in_flight -= 1;
                self.in_flight_bytes -= req.cost();
                if self.io.sending() {
                    self.reply(req, outcome);
                }
            }
            Done::Closed => self.handle_state = HandleState::Closed,
        }
        self.process();
    }

    /// The bytes to send now, if any: encrypts pending replies first.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<&OutQueue> {
        if self.encrypting() && !self.plain.is_empty() {
            if let Err(e) = self.encrypt() {
                self.abandon(&format!("TLS: {e}"));
            }
        }
        (self.io.sending() && !self.out.is_empty()).then_some(&self.out)
    }

    /// `n` bytes of [`Session::poll_transmit`]'s output were written.
    pub fn sent(&mut self, n: usize) {
        self.out.advance(n);
        self.active = true;
        self.process();
    }

    /// Bytes of replies not yet written, encrypted or not.
    pub fn unsent(&self) -> usize {
        self.out.len() + self.plain.len()
    }

    /// Work of this connection that is running or waiting to be polled.
    pub fn running(&self) -> usize {
        let querying = matches!(self.phase, Phase::Handshake { querying: true, .. });
        self.in_flight + usize::from(querying)
    }

    /// Whether the connection is over: the handle is closed and nothing is
    /// left to send.
    pub fn is_finished(&self) -> bool {
        self.handle_state == HandleState::Closed
            && self.ready.is_empty()
            && (!self.io.sending() || (self.out.is_empty() && self.plain.is_empty()))
    }

    /// Give back buffers kept from busier times if nothing has happened
    /// since the last call.
    pub fn shrink(&mut self) {
        if !std::mem::take(&mut self.active)
            && self.input.is_empty()
            && matches!(self.transport, Transport::Clear)
        {
            self.input = BytesMut::new();
            self.out.shrink();
            self.plain.shrink();
            self.ready.shrink_to_fit();
            self.chunks = Vec::new();
        }
    }

    fn wire_in(&mut self) -> &mut BytesMut {
        self.active = true;
        match &mut self.transport {
            Transport::Handshaking(t) | Transport::Established { engine: t, .. } => t.incoming(),
            Transport::Clear => &mut self.input,
        }
    }

    /// Whether replies are encrypted: the connection is inside TLS.
    fn encrypting(&self) -> bool {
        matches!(self.transport, Transport::Established { .. })
    }

    /// Bytes the connection holds for requests: payloads and read buffers
    /// of running requests, and replies not yet sent.
    fn held(&self) -> usize {
        self.in_flight_bytes + self.out.len() + self.plain.len()
    }

    /// Stop at once: nothing more is read or sent.
    fn fail(&mut self, why: &str) {
        log::warn!("connection {}: {why}; closing", self.id);
        self.stop_io();
    }

    fn stop_io(&mut self) {
        self.io = Io::Stopped;
        self.out.clear();
        self.plain.clear();
    }

    /// Act on what has arrived as far as possible, then see whether the
    /// connection can be wound up.
    fn process(&mut self) {
        loop {
            if self.io == Io::Stopped {
                break;
            }
            if matches!(self.transport, Transport::Handshaking(_)) {
                self.advance_tls();
                if !self.encrypting() {
                    break;
                }
            }
            if self.encrypting() && self.io.reading() {
                self.decrypt();
            }
            if !self.io.reading() && self.in_handshake() {
                break;
            }
            while self.step() {}
            // Go round again only for a TLS handshake that STARTTLS began.
            if !matches!(self.transport, Transport::Handshaking(_)) {
                break;
            }
        }
        self.wind_up();
    }

    /// Take one step in the current phase; `false` when nothing more can be
    /// done with the input at hand.
    fn step(&mut self) -> bool {
        if matches!(self.transport, Transport::Handshaking(_)) {
            return false;
        }
        let held = self.held();
        let limits = self.cfg.limits;
        let out = if self.encrypting() {
            &mut self.plain
        } else {
            &mut self.out
        };
        match &mut self.phase {
            Phase::Handshake {
                machine, querying, ..
            } => {
                if *querying {
                    return false;
                }
                let ev = out.encode(|o| machine.receive(&mut self.input, o));
                self.handshake_event(ev)
            }
            Phase::Transmission(dec) => {
                if !self.io.reading() {
                    return false;
                }
                let cost = match dec.front(&self.input) {
                    Front::Incomplete { .. } => return false,
                    Front::Complete { cost } => cost + REPLY_OVERHEAD,
                };
                if self.in_flight >= limits.max_requests
                    || (held > 0 && held + cost > limits.max_bytes)
                {
                    return false;
                }
                match dec.next(&mut self.input) {
                    Decoded::NeedMore => false,
                    Decoded::Op(op) => {
                        self.in_flight += 1;
                        self.in_flight_bytes += cost;
                        self.ready.push_back(Work::Request(Request::new(op, cost)));
                        true
                    }
                    Decoded::Rejected(hdr, errno, msg) => {
                        out.encode(|o| hdr.put_status(o, errno, msg));
                        true
                    }
                    Decoded::Disconnect => {
                        log::debug!("connection {}: client disconnected", self.id);
                        self.io.close_input();
                        self.input.clear();
                        false
                    }
                    Decoded::Fatal(why) => {
                        self.fail(&why);
                        false
                    }
                }
            }
        }
    }

    /// Act on a handshake event; returns whether to go on processing input.
    fn handshake_event(&mut self, ev: Event) -> bool {
        match ev {
            Event::NeedInput => false,
            Event::Query(query) => {
                if let Phase::Handshake { querying, .. } = &mut self.phase {
                    *querying = true;
                }
                let tls = match &self.transport {
                    Transport::Established { identity, .. } => TlsState {
                        active: true,
                        identity: identity.clone(),
                    },
                    Transport::Clear | Transport::Handshaking(_) => TlsState::default(),
                };
                self.ready.push_back(Work::Query { query, tls });
                false
            }
            Event::Done(n) => {
                log::debug!(
                    "connection {}: serving export '{}' ({} bytes, {:?} replies)",
                    self.id,
                    n.export.name,
                    n.export.size,
                    n.style
                );
                self.phase = Phase::Transmission(Decoder::new(n));
                true
            }
            Event::StartTls => {
                self.start_tls();
                true
            }
            Event::Aborted => {
                log::debug!("connection {}: client ended the handshake", self.id);
                self.io.close_input();
                false
            }
            Event::Close(why) => {
                log::warn!("connection {}: {why}; closing", self.id);
                self.io.close_input();
                false
            }
        }
    }

    /// STARTTLS was accepted; its reply is already queued in clear, and
    /// every later byte is inside TLS.
    fn start_tls(&mut self) {
        let Some(factory) = self.cfg.tls.clone() else {
            self.fail("STARTTLS accepted without a TLS configuration");
            return;
        };
        match factory.start() {
            Ok(mut t) => {
                // A client may already have sent its ClientHello.
                t.incoming().extend_from_slice(&self.input.split());
                self.transport = Transport::Handshaking(t);
            }
            Err(e) => self.fail(&format!("cannot start TLS: {e}")),
        }
    }

    /// Drive the TLS handshake with what has arrived.
    fn advance_tls(&mut self) {
        let Transport::Handshaking(t) = &mut self.transport else {
            return;
        };
        let r = t.handshake();
        if let Some(b) = t.take_output() {
            self.out.push(Data::Bytes(b));
        }
        match r {
            Ok(TlsHandshake::InProgress) => {}
            Ok(TlsHandshake::Done) => {
                let who = t.peer_identity();
                log::debug!(
                    "connection {}: {} established{}",
                    self.id,
                    t.protocol(),
                    who.as_ref()
                        .map(|w| format!(" with {w}"))
                        .unwrap_or_default()
                );
                self.transport.establish(who);
                if let Phase::Handshake { machine, .. } = &mut self.phase {
                    machine.tls_established();
                }
            }
            Err(e) => {
                let user = t
                    .attempted_user()
                    .map(|u| format!(" (as PSK user {u})"))
                    .unwrap_or_default();
                log::warn!(
                    "connection {}: TLS handshake with {}{user} failed: {e}",
                    self.id,
                    self.peer
                );
                // The alert is queued; send it, then close.
                self.transport = Transport::Clear;
                self.io.close_input();
            }
        }
    }

    /// Move decrypted input into `input`.
    fn decrypt(&mut self) {
        let Transport::Established { engine: t, .. } = &mut self.transport else {
            return;
        };
        match t.read(&mut self.input) {
            Ok(TlsRead::Open) => {}
            Ok(TlsRead::Closed) => {
                log::debug!("connection {}: client closed the TLS session", self.id);
                self.io.close_input();
            }
            Err(e) => self.fail(&format!("TLS: {e}")),
        }
    }

    /// Seal pending plaintext into records, as few as the record size
    /// allows, and queue them for the wire.
    fn encrypt(&mut self) -> Result<(), TlsEngineError> {
        let Transport::Established { engine: t, .. } = &mut self.transport else {
            return Ok(());
        };
        self.plain.drain(|b| t.write(b))?;
        t.flush()?;
        if let Some(b) = t.take_output() {
            self.out.push(Data::Bytes(b));
        }
        Ok(())
    }

    /// Encode the reply to a finished request.
    fn reply(&mut self, req: Request, outcome: Outcome) {
        let op = req.op();
        let hdr = op.reply;
        let out = if self.encrypting() {
            &mut self.plain
        } else {
            &mut self.out
        };
        match (outcome, &op.command) {
            (Outcome::Done, _) => out.encode(|o| hdr.put_status(o, 0, "")),
            (Outcome::Failed(errno), c) => out.encode(|o| hdr.put_status(o, errno, c.name())),
            (Outcome::Data(buf), Command::Read { df, .. }) => {
                if hdr.style == ReplyStyle::Simple {
                    out.encode(|o| hdr.put_simple(o, 0));
                    let end = buf.len();
                    out.push(Data::Pooled { buf, start: 0, end });
                    return;
                }
                self.chunks.clear();
                self.chunks.extend(read_chunks(buf.as_slice(), *df));
                let data_chunks = self.chunks.iter().filter(|c| !c.hole).count();
                let mut shared = None;
                let mut whole = Some(buf);
                for c in &self.chunks {
                    out.encode(|o| put_read_chunk(o, &hdr, op.offset, c));
                    if c.hole {
                        continue;
                    }
                    if data_chunks == 1 {
                        if let Some(buf) = whole.take() {
                            out.push(Data::Pooled {
                                buf,
                                start: c.start,
                                end: c.end,
                            });
                        }
                    } else {
                        // Several pieces of one buffer: share it.
                        let b: &Bytes =
                            shared.get_or_insert_with(|| Bytes::from_owner(whole.take().unwrap()));
                        out.push(Data::Bytes(b.slice(c.start..c.end)));
                    }
                }
            }
            (Outcome::Extents(ex), Command::BlockStatus { len, req_one }) => out.encode(|o| {
                put_block_status(o, &hdr, op.offset, *len, *req_one, &ex);
            }),
            (outcome, c) => {
                log::error!(
                    "connection {}: internal error: {outcome:?} for a {} request",
                    self.id,
                    c.name()
                );
                out.encode(|o| hdr.put_status(o, EIO, "internal error"));
            }
        }
    }

    /// Once no more input will be taken and nothing is running, say
    /// goodbye over TLS and hand out the handle for closing.
    fn wind_up(&mut self) {
        if self.io.reading() || self.handle_state != HandleState::Open || self.running() > 0 {
            return;
        }
        // From here on the handle state leaves `Open`, so this runs once.
        if self.io.sending() {
            if let Transport::Established { engine: t, .. } = &mut self.transport {
                // Replies still pending go out before the alert.
                if let Err(e) = self.plain.drain(|b| t.write(b)).and_then(|()| t.flush()) {
                    log::debug!("connection {}: TLS: {e}", self.id);
                }
                t.close_notify();
                if let Some(b) = t.take_output() {
                    self.out.push(Data::Bytes(b));
                }
            }
        }
        match self.handle.take() {
            Some(h) => {
                self.handle_state = HandleState::Closing;
                self.ready.push_back(Work::Close(h));
            }
            None => self.handle_state = HandleState::Closed,
        }
    }
}
