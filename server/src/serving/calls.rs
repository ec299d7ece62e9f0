//! The calls that run on a chain (a handshake query, a request, the
//! close of a handle) and what they give back, on whichever thread runs
//! them: the loop that read the work when the chain never blocks, a worker
//! otherwise.

use std::sync::Arc;

use super::chain::Chain;
use super::client::Client;
use crate::layers::execute::{self, Opened};
use crate::protocol::handshake::{Answer, Query};
use crate::session::buffers::PooledBuf;
use crate::session::{Done, Request};

/// A connection's open export: its handle, and the chain it came from,
/// which a reload does not take away while the handle is open.
pub struct Open {
    pub opened: Opened,
    pub chain: Arc<Chain>,
}

impl std::fmt::Debug for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.opened.fmt(f)
    }
}

/// One call on a chain.
pub enum Call {
    /// A handshake query the table sent to `chain`.
    Query {
        query: Query,
        chain: Arc<Chain>,
        /// Call `preconnect` before an open: an export of a configuration
        /// file is known only once the client names it.
        preconnect: bool,
        client: Client,
    },
    /// A transmission request on an open handle; `buf` is the read's.
    Request {
        req: Request,
        open: Arc<Open>,
        buf: Option<PooledBuf>,
    },
    /// Close a handle whose last reference this is.
    Close(Arc<Open>),
}

impl Call {
    /// The chain the call runs on, which says where and in which lane.
    pub fn chain(&self) -> &Arc<Chain> {
        match self {
            Call::Query { chain, .. } => chain,
            Call::Request { open, .. } | Call::Close(open) => &open.chain,
        }
    }

    /// Run the call, here, and say what came of it.
    pub fn run(self) -> Done<Arc<Open>> {
        match self {
            Call::Query {
                query,
                chain,
                preconnect,
                client,
            } => query_chain(&chain, query, preconnect, &client),
            Call::Request { req, open, buf } => {
                let done = request(&open, req, buf);
                // Before the result is handed over: the session's own
                // reference must be the last one when it closes the handle.
                drop(open);
                done
            }
            Call::Close(open) => {
                close(open);
                Done::Closed
            }
        }
    }
}

/// Run a request on `open`, here.
pub fn request(open: &Open, req: Request, buf: Option<PooledBuf>) -> Done<Arc<Open>> {
    let outcome = execute::request(&open.opened, &req, buf, &open.chain.name);
    Done::Request(req, outcome)
}

/// Answer a handshake query on `chain` for `client`.
fn query_chain(
    chain: &Arc<Chain>,
    query: Query,
    preconnect: bool,
    client: &Client,
) -> Done<Arc<Open>> {
    let (mut answer, opened) = execute::query(
        &*chain.backend,
        query,
        preconnect,
        client.connection(),
        chain.policy,
    );
    if let Answer::Open(Ok(info)) = &mut answer {
        if info.description.is_none() {
            info.description.clone_from(&chain.description);
        }
    }
    Done::Query {
        answer,
        opened: opened.map(|opened| {
            Arc::new(Open {
                opened,
                chain: chain.clone(),
            })
        }),
    }
}

/// Close an opened export whose last reference this is.
fn close(open: Arc<Open>) {
    match Arc::try_unwrap(open) {
        Ok(o) => execute::close(o.opened),
        Err(_) => log::error!("internal error: a handle is still in use when it is closed"),
    }
}
