//! One event loop: a thread that owns a share of the connections, moves
//! bytes between their sockets and their sessions, and runs their work,
//! on the spot when the chain never blocks or on the worker pool when it
//! may. The first loop also accepts connections and hands each to the
//! least busy loop.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::jobs::{reply_later, ConnLanes, Job, Lane};
use super::listen::{peer_credentials, Listener, Stream};
use super::mailbox::{ConnRef, Message};
use super::workers::STALL;
use super::{Loops, WAKER};
use crate::layers::connection::Peer;
use crate::layers::inflight;
use crate::protocol::wire::EIO;
use crate::serving::calls::Call;
use crate::serving::client::Client;
use crate::serving::open::OpenExport;
use crate::serving::request;
use crate::serving::started::Reply;
use crate::serving::table::Route;
use crate::serving::Serving;
use crate::session::buffers::BufPool;
use crate::session::{Done, Outcome, Session, Work};

const FIRST_CONN: usize = 1 << 20;
/// How long shutdown waits for in-flight requests before giving up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long shutdown waits for clients to read their last replies: one that
/// does not must not keep the plugin from being closed.
const REPLY_GRACE: Duration = Duration::from_secs(3);
/// Bytes one connection may read in one turn before the others get theirs.
const TURN_BYTES: usize = 4 << 20;
/// How often idle connections give back buffers they no longer need.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Idle read buffers a loop keeps for reuse.
const POOL_BYTES: usize = 32 << 20;
/// How often refused connections are reported at most.
const REFUSAL_REPORT: Duration = Duration::from_secs(1);
/// Slots of one vectored write.
const IOV_MAX: usize = 128;
/// Replies a turn lets pile up before writing them, so that the client
/// can start on them while later requests of a batch are served.
const WRITE_AT: usize = 256 << 10;

/// One client of this loop.
struct Conn {
    serial: u64,
    stream: Stream,
    peer: Peer,
    session: Session<Arc<OpenExport>>,
    /// What the connection is served: the table as it was when it
    /// connected.
    serving: Arc<Serving>,
    /// Where this connection's pool jobs queue when its chain's thread
    /// model says they must not overlap.
    lanes: ConnLanes,
    /// The last read found the socket empty: wait for the next readiness
    /// event before reading again.
    drained: bool,
    /// No new readiness event will come (the peer has hung up, or stdin is
    /// a file the poller cannot watch): read until end of file even after
    /// a short read.
    edgeless: bool,
    /// Results arrived for it in the batch being read.
    touched: bool,
    /// Registered for writability: only while output waits for room in the
    /// socket, or every reply the client reads would wake the loop again.
    /// Always for stdio, whose output is a descriptor of its own.
    writable: bool,
    /// Counted in `Loops::handshaking`: placed by a listener and not yet
    /// past its handshake.
    handshaking: bool,
}

/// The limit that refused a new connection.
#[derive(Clone, Copy)]
enum Full {
    /// `--max-connections` clients are connected.
    Connections,
    /// `--max-handshakes` clients have not finished their handshake.
    Handshakes,
}

/// Refused connections of one kind not yet reported. A flood of refusals
/// must not flood the log: the first is reported at once, the rest at
/// most once per [`REFUSAL_REPORT`], with a count.
#[derive(Default)]
struct Refusals {
    count: usize,
    /// Who was refused last.
    last: Option<Peer>,
    reported: Option<Instant>,
}

impl Refusals {
    /// One more refusal, of `peer`; what to report now, if it is time.
    fn refuse(&mut self, peer: Peer, now: Instant) -> Option<(usize, Peer)> {
        self.count += 1;
        self.last = Some(peer);
        self.due(now)
    }

    /// The refusals not yet reported and the last peer, once it is time to
    /// report them.
    fn due(&mut self, now: Instant) -> Option<(usize, Peer)> {
        let last = self.last?;
        if self
            .reported
            .is_some_and(|t| now.duration_since(t) < REFUSAL_REPORT)
        {
            return None;
        }
        self.reported = Some(now);
        self.last = None;
        Some((std::mem::take(&mut self.count), last))
    }
}

/// The state of one event loop thread.
pub struct EventLoop {
    index: usize,
    poll: Poll,
    loops: Arc<Loops>,
    conns: Slab<Conn>,
    serial: u64,
    listeners: Vec<Listener>,
    bufs: BufPool,
    inbox: VecDeque<Message>,
    /// Handshake deadlines in the order they fall (each is the accept time
    /// plus one fixed timeout).
    timers: VecDeque<(Instant, ConnRef)>,
    /// Connections that used up their turn with input still waiting.
    again: Vec<usize>,
    /// Connections with results in the mailbox batch being read.
    touched: Vec<usize>,
    /// Jobs of this loop on the worker pool.
    in_pool: Cell<usize>,
    shutting_down: Option<Instant>,
    last_sweep: Instant,
    /// Connections refused over `--max-connections`.
    refused_connections: Refusals,
    /// Connections refused over `--max-handshakes`.
    refused_handshakes: Refusals,
}

impl EventLoop {
    /// A loop polling `poll`, whose waker belongs to `loops.mailboxes[index]`.
    pub fn new(
        index: usize,
        poll: Poll,
        loops: Arc<Loops>,
        mut listeners: Vec<Listener>,
    ) -> io::Result<EventLoop> {
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry().register(l, Token(i), Interest::READABLE)?;
        }
        Ok(EventLoop {
            index,
            poll,
            loops,
            conns: Slab::new(),
            serial: 0,
            listeners,
            bufs: BufPool::new(POOL_BYTES),
            inbox: VecDeque::new(),
            timers: VecDeque::new(),
            again: Vec::new(),
            touched: Vec::new(),
            in_pool: Cell::new(0),
            shutting_down: None,
            last_sweep: Instant::now(),
            refused_connections: Refusals::default(),
            refused_handshakes: Refusals::default(),
        })
    }

    /// Serve until shut down and every connection has finished.
    pub fn run(mut self, stdio: Option<Stream>) -> io::Result<()> {
        if let Some(s) = stdio {
            let credentials = peer_credentials(&s);
            self.adopt(s, Peer::Pipe(credentials));
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => self.read_mailbox(),
                    Token(i) if i < FIRST_CONN => self.accept(i),
                    Token(t) => {
                        let key = t - FIRST_CONN;
                        if let Some(c) = self.conns.get_mut(key) {
                            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                                c.drained = false;
                            }
                            if ev.is_read_closed() || ev.is_error() {
                                c.edgeless = true;
                            }
                            self.drive(key);
                        }
                    }
                }
            }
            for key in std::mem::take(&mut self.again) {
                self.drive(key);
            }
            if self.in_pool.get() > 0 {
                self.loops.pool.nudge();
            }
            self.expire_handshakes();
            self.sweep();
            if self.shutting_down.is_some() && self.wind_down() {
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut t = self.last_sweep + SWEEP_EVERY;
        if let Some((d, _)) = self.timers.front() {
            t = t.min(*d);
        }
        if self.in_pool.get() > 0 {
            // Workers blocked in slow calls cannot notice work piling up.
            t = t.min(now + STALL);
        }
        if self.shutting_down.is_some() {
            // Grace periods are checked on every turn.
            t = t.min(now + Duration::from_millis(20));
        }
        Some(t.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn read_mailbox(&mut self) {
        self.loops.mailboxes[self.index].take(&mut self.inbox);
        while let Some(m) = self.inbox.pop_front() {
            match m {
                Message::Done(r, done) => {
                    self.in_pool.set(self.in_pool.get() - 1);
                    let Some(c) = self.conns.get_mut(r.key).filter(|c| c.serial == r.serial) else {
                        // The connection is gone; only a close can be left.
                        continue;
                    };
                    c.session.complete(done);
                    honour_disconnect(c);
                    // Driven once for the whole batch: one write for all
                    // of its replies.
                    if !std::mem::replace(&mut c.touched, true) {
                        self.touched.push(r.key);
                    }
                }
                Message::Adopt(stream, peer) => {
                    if self.shutting_down.is_some() {
                        self.loops.release(self.index, true);
                        stream.shutdown();
                    } else {
                        self.adopt(stream, peer);
                    }
                }
                Message::Shutdown => self.begin_shutdown(),
            }
        }
        for key in std::mem::take(&mut self.touched) {
            if let Some(c) = self.conns.get_mut(key) {
                c.touched = false;
                self.drive(key);
            }
        }
    }

    fn accept(&mut self, i: usize) {
        if self.shutting_down.is_some() {
            return;
        }
        loop {
            if !self.conns.is_empty() && self.loops.serving().table.one_at_a_time() {
                return;
            }
            match self.listeners[i].accept() {
                Ok((stream, peer)) => self.place(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: log and let the next event retry.
                    log::error!("accept on {}: {e}", self.listeners[i].describe());
                    return;
                }
            }
        }
    }

    /// Give a new connection to the loop serving the fewest, or refuse it
    /// over `--max-connections`, or over `--max-handshakes` (connections
    /// that have finished their handshake count only against the first,
    /// so stalled handshakes cannot lock them out).
    fn place(&mut self, stream: Stream, peer: Peer) {
        let live: usize = self
            .loops
            .load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .sum();
        let full = if live >= self.loops.max_connections {
            Some(Full::Connections)
        } else if self.loops.handshaking.load(Ordering::Relaxed) >= self.loops.max_handshakes {
            Some(Full::Handshakes)
        } else {
            None
        };
        if let Some(full) = full {
            stream.shutdown();
            if let Some((n, last)) = self.refusals(full).refuse(peer, Instant::now()) {
                self.report(full, n, last);
            }
            return;
        }
        let target = (0..self.loops.mailboxes.len())
            .min_by_key(|&i| self.loops.load[i].load(Ordering::Relaxed))
            .unwrap_or(self.index);
        self.loops.load[target].fetch_add(1, Ordering::Relaxed);
        self.loops.handshaking.fetch_add(1, Ordering::Relaxed);
        if target == self.index {
            self.adopt(stream, peer);
        } else {
            self.loops.mailboxes[target].post(Message::Adopt(stream, peer));
        }
    }

    fn refusals(&mut self, full: Full) -> &mut Refusals {
        match full {
            Full::Connections => &mut self.refused_connections,
            Full::Handshakes => &mut self.refused_handshakes,
        }
    }

    fn report(&self, full: Full, n: usize, last: Peer) {
        match full {
            Full::Connections => log::warn!(
                "refused {n} connection(s), the last from {last}: {} clients are served already (--max-connections)",
                self.loops.max_connections
            ),
            Full::Handshakes => log::warn!(
                "refused {n} connection(s), the last from {last}: {} clients are in their handshake already (--max-handshakes)",
                self.loops.max_handshakes
            ),
        }
    }

    fn adopt(&mut self, mut stream: Stream, peer: Peer) {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let writable = matches!(peer, Peer::Pipe(_));
        let interest = if writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut stream, Token(FIRST_CONN + key), interest)
        {
            log::error!("cannot register a new connection: {e}");
            if !matches!(peer, Peer::Pipe(_)) {
                self.loops.release(self.index, true);
            }
            return;
        }
        self.serial += 1;
        let id = self.loops.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        log::debug!("connection {id}: accepted from {peer:?}");
        let now = Instant::now();
        let serving = self.loops.serving();
        let session = Session::new(id, peer.to_string(), serving.session.clone(), now);
        if let Some(d) = session.deadline() {
            let r = ConnRef {
                key,
                serial: self.serial,
            };
            self.timers.push_back((d, r));
        }
        let edgeless = stream.unwatched_input();
        entry.insert(Conn {
            serial: self.serial,
            stream,
            peer,
            session,
            serving,
            lanes: ConnLanes::default(),
            drained: false,
            edgeless,
            touched: false,
            writable,
            handshaking: !matches!(peer, Peer::Pipe(_)),
        });
        self.drive(key);
    }

    /// Move the connection at `key` along as far as it goes now: read, run
    /// work, write, until none of them makes progress.
    fn drive(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let r = ConnRef {
            key,
            serial: conn.serial,
        };
        let turn = Turn {
            loops: &self.loops,
            bufs: &self.bufs,
            in_pool: &self.in_pool,
            index: self.index,
            conn: r,
        };
        match catch_unwind(AssertUnwindSafe(|| turn.drive(conn))) {
            Ok(true) => self.again.push(key),
            Ok(false) => {}
            Err(_) => {
                log::error!(
                    "connection {}: internal error (panic); dropping the connection",
                    conn.session.id()
                );
                self.remove(key);
                return;
            }
        }
        let c = &mut self.conns[key];
        if c.session.is_finished() {
            self.remove(key);
            return;
        }
        if c.handshaking && !c.session.in_handshake() {
            c.handshaking = false;
            self.loops.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
        // Ask to hear of room in the socket only while output waits for it.
        let waiting = c.session.poll_transmit().is_some();
        if waiting != c.writable && !matches!(c.peer, Peer::Pipe(_)) {
            let interest = if waiting {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            match self
                .poll
                .registry()
                .reregister(&mut c.stream, Token(FIRST_CONN + key), interest)
            {
                Ok(()) => c.writable = waiting,
                Err(e) => c.session.abandon(&format!("cannot poll the socket: {e}")),
            }
        }
    }

    fn remove(&mut self, key: usize) {
        let mut c = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut c.stream);
        c.stream.shutdown();
        log::debug!("connection {}: closed", c.session.id());
        if matches!(c.peer, Peer::Pipe(_)) {
            self.loops.stdio_finished();
        } else {
            self.loops.release(self.index, c.handshaking);
        }
        if self.conns.is_empty() && self.loops.serving().table.one_at_a_time() {
            // Connections waiting in the backlog raised no new event.
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
        }
    }

    fn expire_handshakes(&mut self) {
        let now = Instant::now();
        while let Some(&(d, r)) = self.timers.front() {
            if d > now {
                break;
            }
            self.timers.pop_front();
            if let Some(c) = self.conns.get_mut(r.key).filter(|c| c.serial == r.serial) {
                c.session.handle_timeout(now);
                self.drive(r.key);
            }
        }
    }

    /// Once a second, let connections that did nothing since the last
    /// sweep give back their buffers, and report refusals that the end of
    /// a flood left unreported.
    fn sweep(&mut self) {
        if self.last_sweep.elapsed() < SWEEP_EVERY {
            return;
        }
        let now = Instant::now();
        self.last_sweep = now;
        for full in [Full::Connections, Full::Handshakes] {
            if let Some((n, last)) = self.refusals(full).due(now) {
                self.report(full, n, last);
            }
        }
        for (_, c) in self.conns.iter_mut() {
            c.session.shrink();
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down.is_some() {
            return;
        }
        self.shutting_down = Some(Instant::now());
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.conns[k].session.begin_shutdown();
            self.drive(k);
        }
    }

    /// During shutdown: give up on what takes too long; `true` once every
    /// connection is finished and the loop can end.
    fn wind_down(&mut self) -> bool {
        let since = self.shutting_down.map_or(Duration::ZERO, |t| t.elapsed());
        if since > REPLY_GRACE {
            let unread: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| c.session.running() == 0 && !c.session.is_finished())
                .map(|(k, _)| k)
                .collect();
            for k in unread {
                self.conns[k].session.abandon("replies unread at shutdown");
                self.drive(k);
            }
        }
        if self.conns.is_empty() {
            // Results for connections already gone are all that can be
            // left; read them so nothing is dropped with the mailbox.
            self.read_mailbox();
            return self.conns.is_empty();
        }
        if since > SHUTDOWN_GRACE {
            log::error!(
                "requests still running after {SHUTDOWN_GRACE:?} ({} started asynchronously and not completed); exiting without closing the plugin",
                inflight::in_flight()
            );
            std::process::exit(1);
        }
        false
    }
}

/// What one turn of a connection needs from its loop.
struct Turn<'a> {
    loops: &'a Loops,
    bufs: &'a BufPool,
    in_pool: &'a Cell<usize>,
    index: usize,
    conn: ConnRef,
}

impl Turn<'_> {
    /// Returns whether input is left that this turn had no room for.
    fn drive(&self, c: &mut Conn) -> bool {
        let mut budget = TURN_BYTES;
        loop {
            let mut progress = false;
            while c.session.wants_read() && !c.drained {
                if budget == 0 {
                    self.run_work(c);
                    self.transmit(c);
                    return true;
                }
                progress = true;
                let buf = c.session.input_buffer();
                let room = buf.capacity() - buf.len();
                match c.stream.read_buf(buf) {
                    Ok(0) => c.session.eof(),
                    Ok(n) => {
                        // A short read emptied the socket: the next arrival
                        // raises a new edge.
                        c.drained = n < room && !c.edgeless;
                        budget = budget.saturating_sub(n);
                        c.session.received();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.drained = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => c.session.connection_lost(&format!("read error: {e}")),
                }
                self.run_work(c);
            }
            progress |= self.run_work(c);
            progress |= self.transmit(c);
            if !progress {
                return false;
            }
        }
    }

    /// Run or hand out every piece of ready work; returns whether there was
    /// any.
    fn run_work(&self, c: &mut Conn) -> bool {
        let mut any = false;
        while let Some(w) = c.session.poll_work() {
            any = true;
            match w {
                Work::Query { query, tls } => {
                    let client = Client {
                        id: c.session.id(),
                        peer: c.peer,
                        tls,
                    };
                    match c.serving.table.route(query, client) {
                        Route::Answered(answer) => {
                            let opened = None;
                            self.complete_here(c, Done::Query { answer, opened });
                        }
                        Route::Call(call) => self.call(c, call),
                    }
                }
                Work::Request(req) => {
                    let Some(open) = c.session.handle() else {
                        c.session.complete(Done::Request(req, Outcome::Failed(EIO)));
                        continue;
                    };
                    let buf = req.read_len().map(|n| self.bufs.get(n));
                    if open.chain.inline {
                        // The hot path: no call to build and no reference
                        // to take for a request run right here.
                        if open.asynchronous() {
                            request::start(open, req, buf, self.reply_later());
                        } else {
                            let done = request::run(open, req, buf);
                            self.complete_here(c, done);
                        }
                    } else {
                        let open = open.clone();
                        self.call(c, Call::Request { req, open, buf });
                    }
                }
                Work::Close(open) => self.call(c, Call::Close(open)),
            }
        }
        any
    }

    /// Run a call on its chain: here when the chain never blocks,
    /// otherwise on the pool, in the lane its thread model asks for.
    fn call(&self, c: &mut Conn, call: Call) {
        if call.chain().inline {
            call.run(&|| self.reply_later(), |done| self.complete_here(c, done));
        } else {
            let lane = c.lanes.lane(call.chain(), &self.loops.lanes);
            self.submit(lane, call);
        }
    }

    /// Hand the result of work run on this thread to the session.
    fn complete_here(&self, c: &mut Conn, done: Done<Arc<OpenExport>>) {
        c.session.complete(done);
        honour_disconnect(c);
        if c.session.unsent() >= WRITE_AT {
            self.transmit(c);
        }
    }

    /// Where a request started here on the asynchronous path replies,
    /// by mail like the pool's results, and counted as they are.
    fn reply_later(&self) -> Reply {
        self.in_pool.set(self.in_pool.get() + 1);
        reply_later(&self.loops.mailboxes[self.index], self.conn)
    }

    /// Hand work to the worker pool; the result comes back by mail.
    fn submit(&self, lane: Option<Arc<Lane>>, call: Call) {
        let job = Job {
            conn: self.conn,
            call,
            reply: self.loops.mailboxes[self.index].clone(),
        };
        self.in_pool.set(self.in_pool.get() + 1);
        self.loops.pool.submit(job, lane.as_ref());
    }

    /// Write what the session has to send; returns whether anything went.
    fn transmit(&self, c: &mut Conn) -> bool {
        let mut any = false;
        loop {
            let Some(out) = c.session.poll_transmit() else {
                return any;
            };
            let mut iov = [IoSlice::new(&[]); IOV_MAX];
            let n = out.slices(&mut iov);
            match c.stream.write_vectored(&iov[..n]) {
                Ok(0) => c.session.abandon("peer stopped reading"),
                Ok(w) => {
                    any = true;
                    c.session.sent(w);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return any,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    c.session.connection_lost(&format!("client went away: {e}"));
                }
                Err(e) => c.session.abandon(&format!("write error: {e}")),
            }
        }
    }
}

/// Act on a layer's `host->disconnect` once one of the connection's calls
/// has returned.
fn honour_disconnect(c: &mut Conn) {
    match c.session.handle().and_then(|h| h.take_disconnect()) {
        Some(true) => c.session.abandon("a layer asked to disconnect at once"),
        Some(false) => {
            log::debug!("connection {}: a layer asked to disconnect", c.session.id());
            c.session.begin_shutdown();
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_refusals_is_reported_at_once_then_as_one_count() {
        let mut r = Refusals::default();
        let t = Instant::now();
        let peer = Peer::Unix(None);
        assert_eq!(r.refuse(peer, t), Some((1, peer)));
        for ms in 1..1000 {
            assert_eq!(r.refuse(peer, t + Duration::from_millis(ms)), None);
        }
        assert_eq!(r.due(t + REFUSAL_REPORT), Some((999, peer)));
        assert_eq!(r.due(t + 10 * REFUSAL_REPORT), None, "all were reported");
    }
}
