//! The threads and sockets around the pure session: listeners, one event
//! loop per core, the worker pool, and the main thread that waits for a
//! signal, the end of the `--run` command or of the `-s` connection, and
//! then shuts everything down in order.
//!
//! Shutdown order matters: the loops finish (every request answered,
//! every handle closed), then the workers are joined, and only then is
//! the chain dropped, unloading the plugin and filters.

mod event_loop;
pub mod listen;
mod mailbox;
mod workers;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{mpsc, Arc, Mutex};

use mio::{Poll, Token, Waker};
use nbdhost_plugin_api::ThreadModel;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::layers::{host, Backend};
use crate::protocol::export::ExportPolicy;
use crate::session;
use event_loop::EventLoop;
use listen::{Listener, Stream};
use mailbox::{Mailbox, Message};
use workers::{Lane, Pool};

/// The chain being served, as jobs need it.
pub struct Chain {
    pub backend: Arc<dyn Backend>,
    /// The top layer's name, for log lines.
    pub name: String,
    pub policy: ExportPolicy,
}

/// The token of every loop's mailbox waker.
const WAKER: Token = Token(usize::MAX - 1);

/// How the server serves.
pub struct Options {
    /// Event loops; more than one only for chains that allow it.
    pub loops: usize,
    /// Most clients served at once.
    pub max_connections: usize,
    /// Worker threads for chains that may block.
    pub threads: usize,
    pub policy: ExportPolicy,
    pub session: session::Config,
    /// `-s`: serve one connection on stdin/stdout, then exit.
    pub stdio: bool,
}

/// Why the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGINT or SIGTERM, or the `-s` connection ended.
    Normal,
    /// The `--run` command exited with this status.
    Child(i32),
}

/// How pool jobs of one thread model are kept from overlapping.
pub(crate) enum Lanes {
    /// They may overlap.
    None,
    /// One lane per connection (`serialize_requests`).
    PerConnection,
    /// One lane for everything (`serialize_all_requests` and stricter).
    Global(Arc<Lane>),
}

/// What the event loops share.
pub(crate) struct Loops {
    /// Declared first so it is dropped first: the workers are joined while
    /// the plugin and filters are still loaded, as their threads' exit
    /// handlers (thread-locals) may run code from those libraries.
    pool: Pool,
    chain: Arc<Chain>,
    session: Arc<session::Config>,
    /// Work runs on the loop that read it.
    inline: bool,
    lanes: Lanes,
    /// `serialize_connections`: one client at a time.
    one_at_a_time: bool,
    mailboxes: Vec<Arc<Mailbox>>,
    /// Connections each loop serves, to place new ones.
    load: Vec<AtomicUsize>,
    max_connections: usize,
    next_id: AtomicU64,
    events: Mutex<mpsc::Sender<Event>>,
}

impl Loops {
    fn stdio_finished(&self) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Event::StdioDone);
    }
}

/// What the main thread waits for.
enum Event {
    Signal(i32),
    Child(i32),
    StdioDone,
    /// A layer called `host->shutdown`.
    Requested,
}

/// A signal arrived while the `--run` command runs: as with nbdkit, the
/// server outlives its client. SIGTERM is passed on to the command (a
/// terminal's SIGINT has reached it already, through the process group);
/// then the command's exit, or a second signal, ends the wait.
fn wait_for_run(rx: &mpsc::Receiver<Event>, pid: u32, signal: i32) -> Exit {
    log::info!("signal {signal} received, waiting for the --run command to exit");
    if signal == SIGTERM {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill touches no memory of ours. (Had the "run"
            // thread reaped the command a moment ago, Linux hands out pids
            // cyclically, so the number is not yet anyone else's.)
            unsafe { libc::kill(pid, SIGTERM) };
        }
    }
    loop {
        match rx.recv() {
            Ok(Event::Child(code)) => {
                log::debug!("--run command exited with status {code}");
                return Exit::Child(code);
            }
            Ok(Event::Signal(s)) => {
                log::info!("signal {s} received again, shutting down");
                return Exit::Normal;
            }
            Ok(Event::Requested | Event::StdioDone) => {}
            Err(_) => return Exit::Normal,
        }
    }
}

/// Catch SIGINT and SIGTERM from now on, for [`serve`] to act on: taken
/// before the layers' `after_fork` and the pid file, so that a signal
/// sent as soon as the server looks ready still shuts it down in order
/// (closing and cleaning up the layers) instead of killing it.
pub fn catch_signals() -> std::io::Result<Signals> {
    Signals::new([SIGINT, SIGTERM])
}

/// Serve until a signal, the end of the `-s` connection, or the end of the
/// `--run` child. Returns once every request has been answered and every
/// handle closed.
pub fn serve(
    backend: Arc<dyn Backend>,
    listeners: Vec<Listener>,
    opts: Options,
    mut signals: Signals,
    child: Option<std::process::Child>,
) -> std::io::Result<Exit> {
    let model = backend.thread_model();
    let inline = backend.nonblocking() && model >= ThreadModel::SerializeRequests;
    let lanes = match model {
        ThreadModel::Parallel => Lanes::None,
        ThreadModel::SerializeRequests => Lanes::PerConnection,
        _ => Lanes::Global(Arc::new(Lane::default())),
    };
    let one_at_a_time = model == ThreadModel::SerializeConnections;
    let n = if one_at_a_time || opts.stdio {
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
    let chain = Arc::new(Chain {
        name: backend.name().to_string(),
        backend,
        policy: opts.policy,
    });
    let polls = (0..n)
        .map(|_| Poll::new())
        .collect::<std::io::Result<Vec<_>>>()?;
    let mailboxes = polls
        .iter()
        .map(|p| Ok(Arc::new(Mailbox::new(Waker::new(p.registry(), WAKER)?))))
        .collect::<std::io::Result<Vec<_>>>()?;
    let (tx, rx) = mpsc::channel();
    let loops = Arc::new(Loops {
        pool: Pool::new(if inline { 0 } else { opts.threads }, chain.clone())?,
        chain,
        session: Arc::new(opts.session),
        inline,
        lanes,
        one_at_a_time,
        load: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        max_connections: opts.max_connections,
        mailboxes,
        next_id: AtomicU64::new(0),
        events: Mutex::new(tx.clone()),
    });

    let signal_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if signal_tx.send(Event::Signal(s)).is_err() {
                    return;
                }
            }
        })?;
    let run_pid = child.as_ref().map(std::process::Child::id);
    if let Some(mut child) = child {
        let tx = tx.clone();
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
                let _ = tx.send(Event::Child(code));
            })?;
    }
    let requested = Mutex::new(tx.clone());
    host::on_shutdown_request(Some(Box::new(move || {
        let _ = requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Event::Requested);
    })));
    drop(tx);

    let stdio = if opts.stdio {
        Some(Stream::stdio()?)
    } else {
        None
    };
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

    let exit = match rx.recv() {
        Ok(Event::Signal(s)) => match run_pid {
            Some(pid) => wait_for_run(&rx, pid, s),
            None => {
                log::info!("signal {s} received, shutting down");
                Exit::Normal
            }
        },
        Ok(Event::Child(code)) => {
            log::debug!("--run command exited with status {code}");
            Exit::Child(code)
        }
        Ok(Event::Requested) => {
            log::debug!("a layer asked for the shutdown");
            Exit::Normal
        }
        Ok(Event::StdioDone) | Err(_) => Exit::Normal,
    };
    host::on_shutdown_request(None);
    host::begin_shutdown();
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
