//! Running one transmission request on an open export, on whichever
//! thread runs it (or starting it, on a chain that answers later: see
//! [`started`]); a panic below costs only the request that raised it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use nbdhost_plugin_api::{Error, Result};

use super::open::OpenExport;
use super::outcome::{failed, request_flags, unallocated};
use super::started::{self, Reply};
use crate::layers::backend::write_zeroes;
use crate::protocol::request::Command;
use crate::protocol::wire::EIO;
use crate::session::buffers::PooledBuf;
use crate::session::{Done, Outcome, Request};

/// Start `req` on `open`'s chain, which answers later through `reply`.
pub fn start(open: &Arc<OpenExport>, req: Request, buf: Option<PooledBuf>, reply: Reply) {
    started::start(open, req, buf, reply);
}

/// Run `req` on `open` here, on a chain that answers at once. The event
/// loop's path for inline chains calls it directly: the hot path, where
/// even the move of the result through an `Option` shows.
pub fn run(open: &OpenExport, req: Request, buf: Option<PooledBuf>) -> Done<Arc<OpenExport>> {
    let outcome =
        catch_unwind(AssertUnwindSafe(|| perform(open, &req, buf))).unwrap_or_else(|_| {
            log::error!(
                "{}: {} request panicked",
                open.chain.name,
                req.op().command.name()
            );
            Outcome::Failed(EIO)
        });
    Done::Request(req, outcome)
}

fn perform(open: &OpenExport, req: &Request, buf: Option<PooledBuf>) -> Outcome {
    let h = &*open.handle;
    let op = req.op();
    let off = op.offset;
    let flags = request_flags(&op.command);
    let r: Result<Outcome> = match &op.command {
        Command::Read { len, .. } => match buf {
            Some(mut buf) if buf.len() == *len as usize => h
                .pread(buf.as_mut_slice(), off, flags)
                .map(|()| Outcome::Data(buf)),
            _ => Err(Error::new(libc::EIO, "internal error: no read buffer")),
        },
        Command::Write { data, .. } => h.pwrite(data, off, flags).map(|()| Outcome::Done),
        Command::Flush => h.flush(flags).map(|()| Outcome::Done),
        Command::Trim { len, .. } => h.trim(*len, off, flags).map(|()| Outcome::Done),
        Command::Zero { len, .. } => {
            // A filter may refuse to zero as well; the protocol only lets a
            // fast-zero request fail that way, so write zeroes through it.
            match h.zero(*len, off, flags) {
                Err(e) if e.raw_errno() == libc::ENOTSUP => write_zeroes(h, *len, off, flags),
                r => r,
            }
            .map(|()| Outcome::Done)
        }
        Command::Cache { len } => h.cache(*len, off, flags).map(|()| Outcome::Done),
        Command::BlockStatus { len, .. } => {
            if open.can_extents {
                h.extents(*len, off, flags).map(Outcome::Extents)
            } else {
                Ok(unallocated(off, *len))
            }
        }
    };
    r.unwrap_or_else(|e| failed(open, req, e))
}
