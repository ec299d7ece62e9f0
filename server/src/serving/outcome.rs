//! What a request asks of the chain and how its result is answered, for
//! both paths: the layer flags its command maps to, the block status of a
//! chain that reports no allocation, and a failure logged and turned into
//! the client's errno.

use nbdhost_plugin_api::{Error, Flags};

use super::open::OpenExport;
use crate::protocol::export::Extent;
use crate::protocol::request::Command;
use crate::protocol::wire::errno_to_nbd;
use crate::session::{Outcome, Request};

/// The layer flags a request's command asks for.
pub fn request_flags(command: &Command) -> Flags {
    let fua = |on: bool| if on { Flags::FUA } else { Flags::empty() };
    match *command {
        Command::Write { fua: f, .. } | Command::Trim { fua: f, .. } => fua(f),
        Command::Zero {
            fua: f,
            may_trim,
            fast,
            ..
        } => {
            let mut flags = fua(f);
            flags.set(Flags::MAY_TRIM, may_trim);
            flags.set(Flags::FAST_ZERO, fast);
            flags
        }
        Command::BlockStatus { req_one: true, .. } => Flags::REQ_ONE,
        _ => Flags::empty(),
    }
}

/// Block status of a chain that reports no allocation: all data.
pub fn unallocated(offset: u64, length: u64) -> Outcome {
    Outcome::Extents(vec![Extent {
        offset,
        length,
        flags: 0,
    }])
}

/// A request's failure, logged with its message (a layer's error that
/// has one) and answered with its errno.
pub fn failed(open: &OpenExport, req: &Request, e: Error) -> Outcome {
    if let Some(m) = e.message() {
        log::error!(
            "{}: {} at offset {}: {m}",
            open.chain.name,
            req.op().command.name(),
            req.op().offset
        );
    }
    Outcome::Failed(errno_to_nbd(e.raw_errno()))
}
