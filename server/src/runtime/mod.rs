//! The threads and sockets around the pure session: listeners, one event
//! loop per core, the worker pool, and the main thread that waits for a
//! signal, the end of the `--run` command or of the `-s` connection, and
//! then shuts everything down in order.
//!
//! Shutdown order matters: the loops finish (every request answered,
//! every handle closed), then the workers are joined, and only then is
//! the chain dropped, unloading the plugin and filters.

mod event_loop;
pub(crate) mod jobs;
pub mod listen;
mod mailbox;
mod workers;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use mio::{Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::layers::host::shutdown;
use crate::layers::inflight;
use crate::serving::build::ReloadError;
use crate::serving::Serving;
use event_loop::EventLoop;
use listen::{Listener, Stream};
use mailbox::{Mailbox, Message};
use workers::Pool;

/// The token of every loop's mailbox waker.
const WAKER: Token = Token(usize::MAX - 1);

/// How the server serves: where its clients come from, and its threads.
pub struct Options {
    pub clients: Clients,
    /// Event loops; more than one only for chains that allow it.
    pub loops: usize,
    /// Most clients served at once.
    pub max_connections: usize,
    /// Most of those that may be in their handshake at once.
    pub max_handshakes: usize,
    /// Worker threads for chains that may block.
    pub threads: usize,
}

/// Where clients come from.
pub enum Clients {
    /// These listeners (none at all leaves only a layer's shutdown, or a
    /// signal, to end the server).
    Listeners(Vec<Listener>),
    /// `-s`: one connection on standard input and output; its end ends
    /// the server.
    Stdio,
}

/// What ends the server besides a layer's `shutdown`.
pub struct StopOn {
    /// SIGINT and SIGTERM (SIGHUP too when there is nothing to reload),
    /// caught by [`catch_signals`].
    pub signals: Signals,
    /// The `--run` command: blocks until it has exited and gives the
    /// status the server exits with.
    pub run: Option<RunCommand>,
}

/// Waits for the `--run` command to end; returns the status to exit with.
pub type RunCommand = Box<dyn FnOnce() -> i32 + Send>;

/// Where what is served comes from, asked again on SIGHUP.
pub trait Reload {
    /// Build a new [`Serving`] from the same source, or say why the
    /// source was refused (the old one then stays in force).
    fn reload(&mut self) -> Result<Serving, ReloadError>;
}

/// Why the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGINT or SIGTERM, or the `-s` connection ended.
    Normal,
    /// The `--run` command exited with this status.
    Child(i32),
}

/// Threads for continuations: as many as the machine has CPUs (what they
/// run, decrypting say, is CPU work), at least two. They are made even
/// when every chain runs on the loops, since an asynchronous plugin's
/// completions may still need them (a flush after a write with FUA).
fn continuation_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// What the event loops share.
pub(crate) struct Loops {
    /// Declared first so it is dropped first: the workers are joined while
    /// the plugin and filters are still loaded, as their threads' exit
    /// handlers (thread-locals) may run code from those libraries.
    pool: Pool<jobs::Job>,
    /// Filters' continuations on the asynchronous path.
    continuations: Pool<jobs::Continuation>,
    /// The lanes of chains whose calls must not overlap at all.
    lanes: jobs::ChainLanes,
    serving: RwLock<Arc<Serving>>,
    mailboxes: Vec<Arc<Mailbox>>,
    /// Connections each loop serves, to place new ones.
    load: Vec<AtomicUsize>,
    max_connections: usize,
    /// Connections placed on any loop that have not finished their
    /// handshake.
    handshaking: AtomicUsize,
    max_handshakes: usize,
    next_id: AtomicU64,
    events: Mutex<mpsc::Sender<Wakeup>>,
}

impl Loops {
    /// What a new connection is served.
    fn serving(&self) -> Arc<Serving> {
        self.serving
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A connection placed on loop `index` is gone; `in_handshake` if it
    /// had not finished its handshake.
    fn release(&self, index: usize, in_handshake: bool) {
        self.load[index].fetch_sub(1, Ordering::Relaxed);
        if in_handshake {
            self.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn stdio_finished(&self) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Wakeup::StdioDone);
    }
}

/// What the main thread waits for.
enum Wakeup {
    Signal(i32),
    Child(i32),
    StdioDone,
    /// A layer called `host->shutdown`.
    Requested,
}

/// A signal arrived while the `--run` command runs: as with nbdkit, the
/// server outlives its client, and leaves it alone (a terminal's SIGINT
/// has reached it already, through the process group); the command's
/// exit, or a second signal, ends the wait.
fn wait_for_run(rx: &mpsc::Receiver<Wakeup>, signal: i32) -> Exit {
    log::info!("signal {signal} received, waiting for the --run command to exit");
    loop {
        match rx.recv() {
            Ok(Wakeup::Child(code)) => {
                log::debug!("--run command exited with status {code}");
                return Exit::Child(code);
            }
            Ok(Wakeup::Signal(s)) => {
                log::info!("signal {s} received again, shutting down");
                return Exit::Normal;
            }
            Ok(Wakeup::Requested | Wakeup::StdioDone) => {}
            Err(_) => return Exit::Normal,
        }
    }
}

/// Catch SIGINT, SIGTERM and SIGHUP from now on, for [`serve`] to act
/// on: taken before the layers' `after_fork` and the pid file, so that a
/// signal sent as soon as the server looks ready still shuts it down in
/// order (closing and cleaning up the layers) instead of killing it.
/// SIGHUP reloads a configuration file, and otherwise shuts down, as
/// nbdkit does.
pub fn catch_signals() -> std::io::Result<Signals> {
    Signals::new([SIGINT, SIGTERM, SIGHUP])
}

/// Serve `serving` until a signal, the end of the `-s` connection, or the
/// end of the `--run` command; on SIGHUP, serve what `reload` builds, or
/// without one, shut down. Returns once every request has been answered
/// and every handle closed.
pub fn serve(
    serving: Serving,
    mut reload: Option<&mut dyn Reload>,
    opts: Options,
    stop: StopOn,
) -> std::io::Result<Exit> {
    let StopOn {
        mut signals,
        run: child,
    } = stop;
    let (listeners, stdio) = match opts.clients {
        Clients::Listeners(l) => (l, false),
        Clients::Stdio => (Vec::new(), true),
    };
    // A table that a reload may replace could bring a chain that blocks.
    let inline = reload.is_none() && serving.table.all_inline();
    let n = if serving.table.one_at_a_time() || stdio {
        1
    } else {
        opts.loops.max(1)
    };
    log::debug!(
        "{n} event loop(s); requests run {}",
        if inline {
            "on the event loops"
        } else {
            "on the worker pool"
        }
    );
    let polls = (0..n)
        .map(|_| Poll::new())
        .collect::<std::io::Result<Vec<_>>>()?;
    let mailboxes = polls
        .iter()
        .map(|p| Ok(Arc::new(Mailbox::new(Waker::new(p.registry(), WAKER)?))))
        .collect::<std::io::Result<Vec<_>>>()?;
    let (tx, rx) = mpsc::channel();
    let loops = Arc::new(Loops {
        pool: Pool::new(if inline { 0 } else { opts.threads })?,
        continuations: Pool::new(continuation_threads())?,
        lanes: jobs::ChainLanes::default(),
        serving: RwLock::new(Arc::new(serving)),
        load: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        max_connections: opts.max_connections,
        handshaking: AtomicUsize::new(0),
        max_handshakes: opts.max_handshakes,
        mailboxes,
        next_id: AtomicU64::new(0),
        events: Mutex::new(tx.clone()),
    });

    // Continuations on the asynchronous path (a filter's, the server's
    // own after a plugin's completion) run on their pool, never inside the
    // `complete` that a plugin's or a client library's thread called.
    let weak = Arc::downgrade(&loops);
    inflight::set_executor(Box::new(move |task| match weak.upgrade() {
        Some(l) => l.continuations.submit(jobs::Continuation(task), None),
        None => task(),
    }));

    let signal_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if signal_tx.send(Wakeup::Signal(s)).is_err() {
                    return;
                }
            }
        })?;
    let running = child.is_some();
    if let Some(wait) = child {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("run".into())
            .spawn(move || {
                let _ = tx.send(Wakeup::Child(wait()));
            })?;
    }
    let requested = Mutex::new(tx.clone());
    shutdown::on_shutdown_request(Some(Box::new(move || {
        let _ = requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Wakeup::Requested);
    })));
    drop(tx);

    let stdio = if stdio { Some(Stream::stdio()?) } else { None };
    let mut listeners = Some(listeners);
    let mut stdio = Some(stdio);
    let mut threads = Vec::with_capacity(n);
    for (i, poll) in polls.into_iter().enumerate() {
        let l = if i == 0 {
            listeners.take().unwrap_or_default()
        } else {
            Vec::new()
        };
        let s = if i == 0 { stdio.take().flatten() } else { None };
        let loops = loops.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("loop{i}"))
                .spawn(move || EventLoop::new(i, poll, loops, l)?.run(s))?,
        );
    }

    let exit = loop {
        let event = rx.recv();
        if let (Ok(Wakeup::Signal(SIGHUP)), Some(source)) = (&event, reload.as_mut()) {
            match source.reload() {
                Ok(new) => {
                    *loops.serving.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
                    log::info!("configuration reloaded");
                }
                Err(e) => log::error!("reload refused, still serving the old configuration: {e}"),
            }
            continue;
        }
        break match event {
            Ok(Wakeup::Signal(s)) if running => wait_for_run(&rx, s),
            Ok(Wakeup::Signal(s)) => {
                log::info!("signal {s} received, shutting down");
                Exit::Normal
            }
            Ok(Wakeup::Child(code)) => {
                log::debug!("--run command exited with status {code}");
                Exit::Child(code)
            }
            Ok(Wakeup::Requested) => {
                log::debug!("a layer asked for the shutdown");
                Exit::Normal
            }
            Ok(Wakeup::StdioDone) | Err(_) => Exit::Normal,
        };
    };
    shutdown::on_shutdown_request(None);
    shutdown::begin_shutdown();
    for m in &loops.mailboxes {
        m.post(Message::Shutdown);
    }
    let mut result = Ok(exit);
    for (i, t) in threads.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => {
                log::error!("event loop {i} failed");
                result = Err(std::io::Error::other(format!("event loop {i} failed")));
            }
        }
    }
    // Joins the workers, then drops the chain if nothing else holds it.
    drop(loops);
    result
}
