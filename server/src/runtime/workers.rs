//! The worker pool: threads for calls that may block, and lanes that keep
//! a thread model's order without parking a worker.
//!
//! The pool knows nothing of what its jobs do: a [`Job`] runs on a worker
//! and leaves its result in the worker's [`Outbox`], which hands results
//! over in batches. Jobs that must not overlap (a connection's requests under `serialize_requests`, every
//! request under `serialize_all_requests`) go through a [`Lane`]: the lane
//! is queued in the pool, and the worker that takes it runs the lane's next
//! job, then queues the lane again if more are waiting. No worker ever
//! waits for another to finish.
//!
//! Waking a thread costs more than a fast plugin call (a read from the page
//! cache), so workers are woken lazily: a job queued while some worker is
//! awake waits for that worker, and only a job that has waited longer than
//! [`STALL`] (behind calls that block on a disk, say) wakes another.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A piece of work for the pool.
pub trait Job: Send + 'static {
    /// Where a worker keeps the results of its jobs until it hands them
    /// over.
    type Out: Outbox;
    /// Run, on a worker, leaving the result in `out`.
    fn run(self, out: &mut Self::Out);
}

/// The results of one worker's jobs not yet handed over.
pub trait Outbox: Default {
    /// Hand over what is kept if it is enough or old enough.
    fn flush_if_due(&mut self);
    /// Hand over everything kept: the worker is about to sleep or exit.
    fn flush(&mut self);
}

/// How long a queued job may wait for a busy worker before another worker
/// is woken for it.
pub const STALL: Duration = Duration::from_millis(1);

/// Jobs that run one at a time, in order.
pub struct Lane<J> {
    state: Mutex<LaneState<J>>,
}

struct LaneState<J> {
    jobs: VecDeque<J>,
    /// The lane is in the pool's queue or a worker is running its job.
    scheduled: bool,
}

impl<J> Default for Lane<J> {
    fn default() -> Lane<J> {
        Lane {
            state: Mutex::new(LaneState {
                jobs: VecDeque::new(),
                scheduled: false,
            }),
        }
    }
}

impl<J> Lane<J> {
    fn lock(&self) -> MutexGuard<'_, LaneState<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Task<J> {
    Job(J),
    Lane(Arc<Lane<J>>),
}

/// A task and when it was queued.
struct Queued<J> {
    at: Instant,
    task: Task<J>,
}

/// A fixed set of threads taking tasks from one queue.
///
/// Idle workers sleep on a condition variable rather than spinning: the
/// pool is usually larger than the machine (blocking plugins want many
/// threads), and spinning workers steal the CPU from the event loops that
/// feed them.
pub struct Pool<J> {
    shared: Arc<Shared<J>>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared<J> {
    state: Mutex<State<J>>,
    ready: Condvar,
}

struct State<J> {
    tasks: VecDeque<Queued<J>>,
    /// Workers waiting on `ready`, including those already woken that have
    /// not run yet.
    idle: usize,
    /// Wake-ups sent and not yet taken by a waiting worker.
    wakes: usize,
    /// Workers running or woken: each looks at the queue before it sleeps.
    awake: usize,
    closed: bool,
}

impl<J> State<J> {
    /// Whether the front task has waited too long for the awake workers.
    fn stalled(&self, now: Instant) -> bool {
        self.tasks
            .front()
            .is_some_and(|q| now.duration_since(q.at) >= STALL)
    }

    /// Claim a waiting worker for one wake-up, if one is left. The waker
    /// counts it awake at once, so tasks queued before it runs do not wake
    /// more workers.
    fn summon(&mut self) -> bool {
        if self.idle > self.wakes {
            self.wakes += 1;
            self.awake += 1;
            true
        } else {
            false
        }
    }
}

impl<J> Shared<J> {
    fn lock(&self) -> MutexGuard<'_, State<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, task: Task<J>) {
        let now = Instant::now();
        let mut st = self.lock();
        st.tasks.push_back(Queued { at: now, task });
        let wake = (st.awake == 0 || st.stalled(now)) && st.summon();
        drop(st);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Wake a worker if the front task has waited too long.
    fn nudge(&self) {
        let mut st = self.lock();
        let wake = st.stalled(Instant::now()) && st.summon();
        drop(st);
        if wake {
            self.ready.notify_one();
        }
    }
}

impl<J: Job> Pool<J> {
    /// Start `n` workers (none when all work runs on the event loops).
    pub fn new(n: usize) -> std::io::Result<Pool<J>> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tasks: VecDeque::new(),
                idle: 0,
                wakes: 0,
                awake: n,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let threads = (0..n)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("worker{i}"))
                    .spawn(move || work(&shared))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Pool { shared, threads })
    }

    /// Wake another worker if queued work has waited too long: called by
    /// the loops while they wait for results, since workers blocked in a
    /// slow call cannot notice.
    pub fn nudge(&self) {
        self.shared.nudge();
    }

    /// Queue a job, on `lane` if it must wait for the lane's earlier jobs.
    pub fn submit(&self, job: J, lane: Option<&Arc<Lane<J>>>) {
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

fn work<J: Job>(shared: &Shared<J>) {
    let mut out = J::Out::default();
    let mut st = shared.lock();
    loop {
        let Some(q) = st.tasks.pop_front() else {
            if st.closed {
                break;
            }
            // Nothing queued: hand over the results before sleeping.
            drop(st);
            out.flush();
            st = shared.lock();
            if !st.tasks.is_empty() || st.closed {
                continue;
            }
            st.awake -= 1;
            st.idle += 1;
            // Woken for a task (the waker counted this worker awake), or
            // at close; other wake-ups are spurious.
            while st.wakes == 0 && !st.closed {
                st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.idle -= 1;
            if st.wakes > 0 {
                st.wakes -= 1;
            } else {
                st.awake += 1;
            }
            continue;
        };
        // Work is piling up behind slow calls: get help.
        let help = st.stalled(Instant::now()) && st.summon();
        drop(st);
        if help {
            shared.ready.notify_one();
        }
        match q.task {
            Task::Job(job) => job.run(&mut out),
            Task::Lane(lane) => {
                let job = lane.lock().jobs.pop_front();
                if let Some(job) = job {
                    job.run(&mut out);
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
        out.flush_if_due();
        st = shared.lock();
    }
    drop(st);
    out.flush();
}

impl<J> Drop for Pool<J> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
