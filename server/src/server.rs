//! The event loop: mio owns the listeners and every connection; workers
//! report back through a waker; signals and the `--run` child end it.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use nbdhost_plugin_api::ThreadModel;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::backend::Backend;
use crate::connection::{Completion, Connection, Shared, READ_MAX};
use crate::export::ExportPolicy;
use crate::handshake::HandshakeConfig;
use crate::host;
use crate::listen::{Listener, Peer, Stream};
use crate::workers::{self, Pool};

const WAKER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const FIRST_CONN: usize = 1 << 20;
/// How long shutdown waits for in-flight requests before giving up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long shutdown waits for clients to read their last replies: one that
/// does not must not keep the plugin from being closed.
const REPLY_GRACE: Duration = Duration::from_secs(3);

/// How the loop serves.
pub struct Options {
    pub threads: usize,
    pub handshake_timeout: Option<Duration>,
    pub policy: ExportPolicy,
    pub handshake: HandshakeConfig,
    /// `-s`: serve one connection on stdin/stdout, then exit.
    pub stdio: bool,
    /// Credentials, when TLS is enabled.
    pub tls: Option<std::sync::Arc<crate::tls::TlsConfig>>,
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGINT or SIGTERM, or the `-s` connection ended.
    Normal,
    /// The `--run` command exited with this status.
    Child(i32),
}

/// Serve until a signal, the end of the `-s` connection, or the end of the
/// `--run` child. Returns once every request has been answered and every
/// handle closed.
pub fn serve(
    backend: Arc<dyn Backend>,
    mut listeners: Vec<Listener>,
    opts: Options,
    child: Option<std::process::Child>,
) -> io::Result<Exit> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let (notify, inbox) = workers::channel::<Completion>(waker);
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    for (i, l) in listeners.iter_mut().enumerate() {
        poll.registry().register(l, Token(i), Interest::READABLE)?;
    }

    let model = backend.thread_model();
    let shared = Shared {
        name: Arc::from(backend.name()),
        backend,
        pool: Pool::new(opts.threads)?,
        notify: notify.clone(),
        policy: opts.policy,
        handshake: opts.handshake,
        global_lock: (model <= ThreadModel::SerializeAllRequests).then(|| Arc::new(Mutex::new(()))),
        per_connection_lock: model == ThreadModel::SerializeRequests,
        outstanding: Arc::new(AtomicUsize::new(0)),
        tls: opts.tls,
        read_scratch: RefCell::new(vec![0; READ_MAX]),
    };
    let one_at_a_time = model == ThreadModel::SerializeConnections;

    if let Some(mut child) = child {
        let notify = notify.clone();
        std::thread::Builder::new()
            .name("run".into())
            .spawn(move || {
                let code = match child.wait() {
                    Ok(st) => st.code().unwrap_or_else(|| {
                        use std::os::unix::process::ExitStatusExt;
                        128 + st.signal().unwrap_or(0)
                    }),
                    Err(e) => {
                        log::error!("--run: cannot wait for the command: {e}");
                        1
                    }
                };
                notify.send(Completion::ChildExited(code));
            })?;
    }

    let mut lp = Loop {
        poll,
        conns: Slab::new(),
        next_id: 0,
        timeout: opts.handshake_timeout,
        one_at_a_time,
        shared,
        shutting_down: None,
        exit: Exit::Normal,
    };
    if opts.stdio {
        lp.add(Stream::stdio()?, Peer::Pipe)?;
    }
    let mut events = Events::with_capacity(1024);
    loop {
        let timeout = lp.poll_timeout();
        if let Err(e) = lp.poll.poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        for ev in events.iter() {
            match ev.token() {
                WAKER => {
                    let mut touched = Vec::new();
                    for c in inbox.drain() {
                        touched.extend(lp.completion(c));
                    }
                    // One vectored write per connection for the whole batch.
                    touched.sort_unstable();
                    touched.dedup();
                    for k in touched {
                        if let Some(c) = lp.conns.get_mut(k) {
                            c.flush();
                        }
                    }
                }
                SIGNALS => {
                    for s in signals.pending() {
                        log::info!("signal {s} received, shutting down");
                        lp.begin_shutdown(&mut listeners);
                    }
                }
                Token(i) if i < FIRST_CONN => {
                    if lp.shutting_down.is_none() {
                        lp.accept(&listeners[i]);
                    }
                }
                Token(t) => {
                    if let Some(c) = lp.conns.get_mut(t - FIRST_CONN) {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            c.on_readable(&lp.shared);
                        }
                        if ev.is_writable() {
                            c.flush();
                            c.resume(&lp.shared);
                        }
                    }
                }
            }
        }
        if matches!(lp.exit, Exit::Child(_)) && lp.shutting_down.is_none() {
            lp.begin_shutdown(&mut listeners);
        }
        lp.expire_handshakes();
        let closed = lp.reap();
        if closed && lp.one_at_a_time && lp.conns.is_empty() && lp.shutting_down.is_none() {
            // Connections waiting in the backlog raised no new event.
            for l in &listeners {
                lp.accept(l);
            }
        }
        if opts.stdio && lp.conns.is_empty() && lp.shutting_down.is_none() {
            lp.begin_shutdown(&mut listeners);
        }
        if let Some(since) = lp.shutting_down {
            if since.elapsed() > REPLY_GRACE {
                lp.drop_unread();
            }
            let idle = lp.conns.is_empty() && lp.shared.outstanding.load(Ordering::Acquire) == 0;
            if idle {
                break;
            }
            if since.elapsed() > SHUTDOWN_GRACE {
                log::error!("requests still running after {SHUTDOWN_GRACE:?}; exiting without closing the plugin");
                std::process::exit(1);
            }
        }
    }
    // Dropping the pool joins the workers after they ran the close jobs.
    drop(lp.shared);
    Ok(lp.exit)
}

struct Loop {
    poll: Poll,
    conns: Slab<Connection>,
    next_id: u64,
    timeout: Option<Duration>,
    one_at_a_time: bool,
    shared: Shared,
    shutting_down: Option<Instant>,
    exit: Exit,
}

impl Loop {
    fn poll_timeout(&self) -> Option<Duration> {
        if self.shutting_down.is_some() {
            // Close jobs report nothing back: look again soon.
            return Some(Duration::from_millis(20));
        }
        let now = Instant::now();
        self.conns
            .iter()
            .filter_map(|(_, c)| c.deadline)
            .min()
            .map(|d| d.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn add(&mut self, mut stream: Stream, peer: Peer) -> io::Result<()> {
        let entry = self.conns.vacant_entry();
        let token = Token(FIRST_CONN + entry.key());
        self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.next_id += 1;
        // The id names the slab slot in its low half, so completions find
        // their connection at once, and a serial number in its high half, so
        // a late result never reaches a newer connection in the same slot.
        let id = (self.next_id << 32) | entry.key() as u64;
        log::debug!("connection {}: accepted from {peer:?}", id >> 32);
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let conn = entry.insert(Connection::new(id, stream, peer, &self.shared, deadline));
        conn.start(&self.shared);
        Ok(())
    }

    fn accept(&mut self, l: &Listener) {
        loop {
            if self.one_at_a_time && !self.conns.is_empty() {
                return;
            }
            match l.accept() {
                Ok((stream, peer)) => {
                    if let Err(e) = self.add(stream, peer) {
                        log::error!("cannot register a new connection: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: log and let the next event retry.
                    log::error!("accept on {}: {e}", l.describe());
                    return;
                }
            }
        }
    }

    /// Deliver a worker's result; returns the slab key of the connection
    /// it went to, if that connection still exists.
    fn completion(&mut self, c: Completion) -> Option<usize> {
        let id = match &c {
            Completion::Query { conn, .. } | Completion::Reply { conn, .. } => *conn,
            Completion::ChildExited(code) => {
                log::debug!("--run command exited with status {code}");
                self.exit = Exit::Child(*code);
                return None;
            }
        };
        // Results for a connection already gone are dropped.
        let key = (id & 0xffff_ffff) as usize;
        let conn = self.conns.get_mut(key).filter(|x| x.id == id)?;
        conn.complete(c, &self.shared);
        Some(key)
    }

    fn begin_shutdown(&mut self, listeners: &mut Vec<Listener>) {
        if self.shutting_down.is_some() {
            return;
        }
        self.shutting_down = Some(Instant::now());
        host::begin_shutdown();
        for mut l in listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        for (_, c) in self.conns.iter_mut() {
            c.begin_shutdown();
        }
    }

    fn expire_handshakes(&mut self) {
        let now = Instant::now();
        for (_, c) in self.conns.iter_mut() {
            if c.in_handshake() && c.deadline.is_some_and(|d| d <= now) {
                c.fail("handshake timed out");
            }
        }
    }

    /// During shutdown, give up on clients that leave their replies unread
    /// once nothing of theirs is running.
    fn drop_unread(&mut self) {
        for (_, c) in self.conns.iter_mut() {
            if c.nothing_running() && !c.finished() {
                c.fail("replies unread at shutdown");
            }
        }
    }

    /// Drop finished connections; returns whether any was dropped.
    fn reap(&mut self) -> bool {
        let done: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.finished())
            .map(|(k, _)| k)
            .collect();
        for k in &done {
            let mut c = self.conns.remove(*k);
            let _ = self.poll.registry().deregister(&mut c.stream);
            c.close(&self.shared);
        }
        !done.is_empty()
    }
}
