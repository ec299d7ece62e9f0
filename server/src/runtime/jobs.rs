//! What the loops give the worker pool: a call on a chain, with the
//! connection and the loop its result goes back to; and each worker's
//! outbox, which hands results to a loop in batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mailbox::{ConnRef, Mailbox, Message};
use super::workers;
use crate::serving::calls::Call;

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
        out.add(reply, Message::Done(conn, call.run()));
    }
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
    fn add(&mut self, to: Arc<Mailbox>, m: Message) {
        if !self.to.as_ref().is_some_and(|t| Arc::ptr_eq(t, &to)) {
            workers::Outbox::flush(self);
            self.to = Some(to);
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
