//! The worker pool: threads for calls that may block, and lanes that keep
//! a thread model's order without parking a worker.
//!
//! A job carries one piece of a session's work and the mailbox of the event
//! loop that owns the session; the result goes back there. Jobs that must
//! not overlap (a connection's requests under `serialize_requests`, every
//! request under `serialize_all_requests`) go through a [`Lane`]: the lane
//! is queued in the pool, and the worker that takes it runs the lane's next
//! job, then queues the lane again if more are waiting. No worker ever
//! waits for another to finish.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::mailbox::{ConnRef, Mailbox, Message};
use super::Chain;
use crate::layers::execute::{self, Opened};
use crate::layers::host::Peer;
use crate::protocol::handshake::Query;
use crate::session::buffers::PooledBuf;
use crate::session::{Done, Request, TlsState};

/// A piece of work for the pool.
pub struct Job {
    pub conn: ConnRef,
    pub work: JobWork,
    pub reply: Arc<Mailbox>,
}

/// What a job does.
pub enum JobWork {
    Query {
        query: Query,
        tls: TlsState,
        peer: Peer,
    },
    Request {
        req: Request,
        opened: Arc<Opened>,
        buf: Option<PooledBuf>,
    },
    Close(Arc<Opened>),
}

impl Job {
    fn run(self, chain: &Chain) {
        let Job { conn, work, reply } = self;
        let done = match work {
            JobWork::Query { query, tls, peer } => {
                let (answer, opened) =
                    execute::query(&*chain.backend, query, peer, &tls, chain.policy);
                Done::Query {
                    answer,
                    opened: opened.map(Arc::new),
                }
            }
            JobWork::Request { req, opened, buf } => {
                let outcome = execute::request(&opened, &req, buf, &chain.name);
                // Before the result is posted: the session's own reference
                // must be the last one when it closes the handle.
                drop(opened);
                Done::Request(req, outcome)
            }
            JobWork::Close(opened) => {
                close(opened);
                Done::Closed
            }
        };
        reply.post(Message::Done(conn, done));
    }
}

/// Close an opened export whose last reference this is.
pub fn close(opened: Arc<Opened>) {
    match Arc::try_unwrap(opened) {
        Ok(o) => execute::close(o),
        Err(_) => log::error!("internal error: a handle is still in use when it is closed"),
    }
}

/// Jobs that run one at a time, in order.
#[derive(Default)]
pub struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    jobs: VecDeque<Job>,
    /// The lane is in the pool's queue or a worker is running its job.
    scheduled: bool,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Task {
    Job(Job),
    Lane(Arc<Lane>),
}

/// A fixed set of threads taking tasks from one queue.
///
/// Idle workers sleep on a condition variable rather than spinning: the
/// pool is usually larger than the machine (blocking plugins want many
/// threads), and spinning workers steal the CPU from the event loops that
/// feed them.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

struct State {
    tasks: VecDeque<Task>,
    /// Workers waiting on `ready`: when none is, a new task needs no
    /// wake-up (a futex call on the loop's thread), as a busy worker will
    /// find it.
    idle: usize,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, task: Task) {
        let mut st = self.lock();
        st.tasks.push_back(task);
        let wake = st.idle > 0;
        drop(st);
        if wake {
            self.ready.notify_one();
        }
    }

    /// The next task, or `None` once the pool is closed and drained.
    fn take(&self) -> Option<Task> {
        let mut st = self.lock();
        loop {
            if let Some(t) = st.tasks.pop_front() {
                return Some(t);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle -= 1;
        }
    }
}

impl Pool {
    /// Start `n` workers running jobs on `chain` (none for a chain whose
    /// work all runs on the event loops).
    pub fn new(n: usize, chain: Arc<Chain>) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tasks: VecDeque::new(),
                idle: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let threads = (0..n)
            .map(|i| {
                let shared = shared.clone();
                let chain = chain.clone();
                std::thread::Builder::new()
                    .name(format!("worker{i}"))
                    .spawn(move || work(&shared, &chain))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Pool { shared, threads })
    }

    /// Queue a job, on `lane` if it must wait for the lane's earlier jobs.
    pub fn submit(&self, job: Job, lane: Option<&Arc<Lane>>) {
        let Some(lane) = lane else {
            self.shared.push(Task::Job(job));
            return;
        };
        let mut l = lane.lock();
        l.jobs.push_back(job);
        if !std::mem::replace(&mut l.scheduled, true) {
            drop(l);
            self.shared.push(Task::Lane(lane.clone()));
        }
    }
}

fn work(shared: &Shared, chain: &Chain) {
    while let Some(task) = shared.take() {
        match task {
            Task::Job(job) => job.run(chain),
            Task::Lane(lane) => {
                let job = lane.lock().jobs.pop_front();
                if let Some(job) = job {
                    job.run(chain);
                }
                let mut l = lane.lock();
                if l.jobs.is_empty() {
                    l.scheduled = false;
                } else {
                    // Behind whatever else is queued, so one busy lane
                    // cannot keep the pool to itself.
                    drop(l);
                    shared.push(Task::Lane(lane));
                }
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
