//! How other threads reach an event loop: results from workers, new
//! connections from the accepting loop, and the order to shut down. One
//! wake-up per batch: a sender only pays for the `eventfd` write when the
//! loop has taken everything before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::listen::Stream;
use crate::layers::connection::Peer;
use crate::serving::open::OpenExport;
use crate::session::Done;

/// A connection of one loop: its slab slot and the serial number of the
/// connection in it, so a late result never reaches a newer connection
/// that took the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub key: usize,
    pub serial: u64,
}

/// A message for an event loop.
pub enum Message {
    /// Work of this connection finished on a worker.
    Done(ConnRef, Done<Arc<OpenExport>>),
    /// Serve this new connection.
    Adopt(Stream, Peer),
    /// Stop taking connections and requests; exit once all are finished.
    Shutdown,
}

/// An event loop's inbox.
pub struct Mailbox {
    queue: Mutex<VecDeque<Message>>,
    waker: mio::Waker,
    /// A wake-up is on its way or the loop is awake.
    pending: AtomicBool,
}

impl Mailbox {
    /// An inbox that wakes the loop through `waker`.
    pub fn new(waker: mio::Waker) -> Mailbox {
        Mailbox {
            queue: Mutex::new(VecDeque::new()),
            waker,
            pending: AtomicBool::new(false),
        }
    }

    /// Deliver `m` and wake the loop if it may be asleep.
    pub fn post(&self, m: Message) {
        self.post_all(&mut vec![m]);
    }

    /// Deliver every message in `ms` (leaving it empty) with one wake-up.
    pub fn post_all(&self, ms: &mut Vec<Message>) {
        if ms.is_empty() {
            return;
        }
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ms.drain(..));
        if !self.pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                log::error!("cannot wake an event loop: {e}");
            }
        }
    }

    /// Move everything delivered so far into `into` (which the loop keeps,
    /// so no allocation happens in steady state). The flag is cleared
    /// first, so a message posted during the take wakes the loop again.
    pub fn take(&self, into: &mut VecDeque<Message>) {
        self.pending.store(false, Ordering::Release);
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *q, into);
    }
}
