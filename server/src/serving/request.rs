//! Running one transmission request on an open export, on whichever
//! thread runs it; a panic below costs only the request that raised it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use nbdhost_plugin_api::{Error, Flags, Result};

use super::open::OpenExport;
use crate::layers::backend::write_zeroes;
use crate::protocol::export::Extent;
use crate::protocol::request::Command;
use crate::protocol::wire::{errno_to_nbd, EIO};
use crate::session::buffers::PooledBuf;
use crate::session::{Done, Outcome, Request};

/// Run `req` on `open`, here, for the connection its handle was opened
/// for. A read fills `buf`, which the caller supplies with the read's
/// length.
pub fn request(open: &OpenExport, req: Request, buf: Option<PooledBuf>) -> Done<Arc<OpenExport>> {
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
    let fua = |on: bool| if on { Flags::FUA } else { Flags::empty() };
    let r: Result<Outcome> = match &op.command {
        Command::Read { len, .. } => match buf {
            Some(mut buf) if buf.len() == *len as usize => h
                .pread(buf.as_mut_slice(), off, Flags::empty())
                .map(|()| Outcome::Data(buf)),
            _ => Err(Error::new(libc::EIO, "internal error: no read buffer")),
        },
        Command::Write { data, fua: f } => h.pwrite(data, off, fua(*f)).map(|()| Outcome::Done),
        Command::Flush => h.flush(Flags::empty()).map(|()| Outcome::Done),
        Command::Trim { len, fua: f } => h.trim(*len, off, fua(*f)).map(|()| Outcome::Done),
        Command::Zero {
            len,
            fua: f,
            may_trim,
            fast,
        } => {
            let mut flags = fua(*f);
            flags.set(Flags::MAY_TRIM, *may_trim);
            flags.set(Flags::FAST_ZERO, *fast);
            // A filter may refuse to zero as well; the protocol only lets a
            // fast-zero request fail that way, so write zeroes through it.
            match h.zero(*len, off, flags) {
                Err(e) if e.raw_errno() == libc::ENOTSUP => write_zeroes(h, *len, off, flags),
                r => r,
            }
            .map(|()| Outcome::Done)
        }
        Command::Cache { len } => h.cache(*len, off, Flags::empty()).map(|()| Outcome::Done),
        Command::BlockStatus { len, req_one } => {
            let flags = if *req_one {
                Flags::REQ_ONE
            } else {
                Flags::empty()
            };
            if open.can_extents {
                h.extents(*len, off, flags).map(Outcome::Extents)
            } else {
                Ok(Outcome::Extents(vec![Extent {
                    offset: off,
                    length: *len,
                    flags: 0,
                }]))
            }
        }
    };
    r.unwrap_or_else(|e| {
        if let Some(m) = e.message() {
            log::error!(
                "{}: {} at offset {off}: {m}",
                open.chain.name,
                op.command.name()
            );
        }
        Outcome::Failed(errno_to_nbd(e.raw_errno()))
    })
}
