//! What the loops give the worker pool: a call on a chain, with the
//! connection and the loop its result goes back to; each worker's outbox,
//! which hands results to a loop in batches; and the lanes that keep a
//! chain's calls from overlapping when its thread model says so.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::mailbox::{ConnRef, Mailbox, Message};
use super::workers;
use crate::layers::inflight::Task;
use crate::serving::calls::Call;
use crate::serving::chain::{Chain, Lanes};
use crate::serving::started::Reply;

/// Results a worker keeps back at most before handing them over.
const BATCH: usize = 32;
/// How long a worker keeps a result back at most.
const BATCH_DELAY: Duration = Duration::from_micros(50);

/// A call for the pool, and where its result goes.
pub struct Job {
    pub conn: ConnRef,
    pub call: Call,
    pub reply: Arc<Mailbox>,
}

impl workers::Job for Job {
    type Out = Outbox;

    fn run(self, out: &mut Outbox) {
        let Job { conn, call, reply } = self;
        let later = || reply_later(&reply, conn);
        call.run(&later, |done| out.add(&reply, Message::Done(conn, done)));
    }
}

/// A filter's continuation of a request on the asynchronous path, for
/// the continuation pool: a pool of its own, so that a worker of the
/// request pool waiting for an asynchronous layer (a synchronous filter
/// above one) can never hold up what that layer's request needs to
/// finish.
pub struct Continuation(pub Task);

impl workers::Job for Continuation {
    type Out = Nothing;

    fn run(self, _: &mut Nothing) {
        (self.0)()
    }
}

/// A continuation leaves no result behind: it answers its request itself.
#[derive(Default)]
pub struct Nothing;

impl workers::Outbox for Nothing {
    fn flush_if_due(&mut self) {}
    fn flush(&mut self) {}
}

/// Where a request that completes later, on whatever thread, delivers
/// its result: the mailbox of its connection's loop, which wakes once for
/// however many arrive together.
pub fn reply_later(mailbox: &Arc<Mailbox>, conn: ConnRef) -> Reply {
    let mailbox = mailbox.clone();
    Box::new(move |done| mailbox.post(Message::Done(conn, done)))
}

/// Results of one worker not yet handed to their loop.
pub struct Outbox {
    to: Option<Arc<Mailbox>>,
    messages: Vec<Message>,
    since: Instant,
}

impl Default for Outbox {
    fn default() -> Outbox {
        Outbox {
            to: None,
            messages: Vec::new(),
            since: Instant::now(),
        }
    }
}

impl Outbox {
    fn add(&mut self, to: &Arc<Mailbox>, m: Message) {
        if !self.to.as_ref().is_some_and(|t| Arc::ptr_eq(t, to)) {
            workers::Outbox::flush(self);
            self.to = Some(to.clone());
        }
        if self.messages.is_empty() {
            self.since = Instant::now();
        }
        self.messages.push(m);
    }
}

impl workers::Outbox for Outbox {
    fn flush_if_due(&mut self) {
        if self.messages.len() >= BATCH || self.since.elapsed() >= BATCH_DELAY {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if let Some(to) = &self.to {
            to.post_all(&mut self.messages);
        }
    }
}

/// The lane of a connection, or of a chain, for its jobs.
pub type Lane = workers::Lane<Job>;

/// The lane of each chain whose calls all run one at a time
/// (`serialize_all_requests` and stricter), shared by every loop: a chain
/// that a reload keeps keeps its lane.
#[derive(Default)]
pub struct ChainLanes {
    lanes: Mutex<Vec<(Weak<Chain>, Arc<Lane>)>>,
}

impl ChainLanes {
    /// The lane of `chain`, made on its first call.
    fn of(&self, chain: &Arc<Chain>) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        // A chain no one holds any more has no call left to run.
        lanes.retain(|(c, _)| c.strong_count() > 0);
        if let Some((_, lane)) = lanes
            .iter()
            .find(|(c, _)| std::ptr::eq(c.as_ptr(), Arc::as_ptr(chain)))
        {
            return lane.clone();
        }
        let lane = Arc::new(Lane::default());
        lanes.push((Arc::downgrade(chain), lane.clone()));
        lane
    }
}

/// The lanes one connection's calls run in.
#[derive(Default)]
pub struct ConnLanes {
    /// Its own, for `serialize_requests`.
    own: Arc<Lane>,
    /// The lane of the chain it last called, if that chain has one, so
    /// that its requests do not look it up each time.
    last: Option<(Arc<Chain>, Arc<Lane>)>,
}

impl ConnLanes {
    /// The lane a call on `chain` runs in, if its thread model asks for
    /// one; `shared` holds the chains' own lanes.
    pub fn lane(&mut self, chain: &Arc<Chain>, shared: &ChainLanes) -> Option<Arc<Lane>> {
        match chain.lanes {
            Lanes::None => None,
            Lanes::PerConnection => Some(self.own.clone()),
            Lanes::Global => {
                if let Some((c, lane)) = &self.last {
                    if Arc::ptr_eq(c, chain) {
                        return Some(lane.clone());
                    }
                }
                let lane = shared.of(chain);
                self.last = Some((chain.clone(), lane.clone()));
                Some(lane)
            }
        }
    }
}
