//! Transmission requests on the asynchronous path (ABI 1.9): the top of
//! the chain starts each one and returns at once; its result arrives
//! later, on whichever thread completes it (a client library's, the
//! plugin's own), and goes on to the connection's loop through its
//! [`Reply`], where it is encoded and written with whatever else arrived.
//!
//! What the request was lent (the read buffer, the write's data, an
//! extents list) and the open export travel with the request until it
//! completes: a client that goes away frees nothing a layer still writes
//! into, and the handle is not closed while a request on it is in flight.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use nbdhost_plugin_api::{Error, Result};

use super::open::OpenExport;
use super::outcome::{failed, request_flags, unallocated};
use crate::layers::backend::{write_zeroes, AsyncOp};
use crate::layers::extents::ExtentCollector;
use crate::layers::inflight;
use crate::protocol::request::Command;
use crate::protocol::wire::EIO;
use crate::session::buffers::PooledBuf;
use crate::session::{Done, Outcome, Request};

/// Where the result of a request started on the asynchronous path goes
/// once it completes, from whatever thread: the connection's loop.
pub type Reply = Box<dyn FnOnce(Done<Arc<OpenExport>>) + Send>;

/// What a request keeps until it completes.
struct Kept {
    buf: Option<PooledBuf>,
    list: Option<Box<ExtentCollector>>,
}

/// Start `req` on `open`'s chain; `reply` gets its result, now or later.
pub fn start(open: &Arc<OpenExport>, req: Request, buf: Option<PooledBuf>, reply: Reply) {
    let mut kept = Kept { buf, list: None };
    let op = req.op();
    let (offset, flags) = (op.offset, request_flags(&op.command));
    let started = match &op.command {
        Command::Read { len, .. } => match kept.buf.as_mut() {
            Some(b) if b.len() == *len as usize => AsyncOp::Read {
                buf: b.as_mut_slice().as_mut_ptr(),
                len: b.len(),
                offset,
                flags,
            },
            _ => {
                let e = Error::new(libc::EIO, "internal error: no read buffer");
                let outcome = failed(open, &req, e);
                return reply(Done::Request(req, outcome));
            }
        },
        Command::Write { data, .. } => AsyncOp::Write {
            buf: data.as_ptr(),
            len: data.len(),
            offset,
            flags,
        },
        Command::Flush => AsyncOp::Flush { flags },
        Command::Trim { len, .. } => AsyncOp::Trim {
            count: *len,
            offset,
            flags,
        },
        Command::Zero { len, .. } => AsyncOp::Zero {
            count: *len,
            offset,
            flags,
        },
        Command::Cache { len } => AsyncOp::Cache {
            count: *len,
            offset,
            flags,
        },
        Command::BlockStatus { len, .. } if !open.can_extents => {
            let outcome = unallocated(offset, *len);
            return reply(Done::Request(req, outcome));
        }
        Command::BlockStatus { len, .. } => {
            let list = kept.list.insert(Box::new(ExtentCollector::new(offset)));
            AsyncOp::Extents {
                count: *len,
                offset,
                flags,
                list: &mut **list,
            }
        }
    };
    let waiting = open.clone();
    let token = inflight::register(Box::new(move |r| finish(waiting, req, kept, r, reply)));
    if catch_unwind(AssertUnwindSafe(|| open.handle.start(started, token))).is_err() {
        log::error!("{}: starting a request panicked", open.chain.name);
        let e = Error::new(libc::EIO, "starting the request panicked");
        inflight::complete(token, Err(e), "server");
    }
}

/// A request has completed with `r`: answer it.
fn finish(open: Arc<OpenExport>, req: Request, kept: Kept, r: Result<()>, reply: Reply) {
    let outcome = match (r, &req.op().command) {
        (Ok(()), Command::Read { .. }) => match kept.buf {
            Some(buf) => Outcome::Data(buf),
            None => Outcome::Failed(EIO),
        },
        (Ok(()), Command::BlockStatus { .. }) => {
            let extents = kept.list.map(|l| l.into_extents()).unwrap_or_default();
            if extents.is_empty() {
                let e = Error::new(libc::EIO, "extents returned no extent");
                failed(&open, &req, e)
            } else {
                Outcome::Extents(extents)
            }
        }
        (Ok(()), _) => Outcome::Done,
        // A filter may refuse to zero as well; the protocol only lets a
        // fast-zero request fail that way, so write zeroes through it, on
        // the pool: this may be a client library's thread.
        (
            Err(e),
            Command::Zero {
                len, fast: false, ..
            },
        ) if e.raw_errno() == libc::ENOTSUP => {
            let (count, offset) = (*len, req.op().offset);
            let flags = request_flags(&req.op().command);
            inflight::execute(Box::new(move || {
                let outcome = match write_zeroes(&*open.handle, count, offset, flags) {
                    Ok(()) => Outcome::Done,
                    Err(e) => failed(&open, &req, e),
                };
                drop(open);
                reply(Done::Request(req, outcome));
            }));
            return;
        }
        (Err(e), _) => failed(&open, &req, e),
    };
    // The session's reference must be the last when it closes the handle.
    drop(open);
    reply(Done::Request(req, outcome));
}
