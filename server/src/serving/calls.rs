//! The calls that run on a chain (a handshake query, a request, the
//! close of a handle) and what they give back, on whichever thread runs
//! them: the loop that read the work when the chain never blocks, a worker
//! otherwise.

use std::sync::Arc;

use super::chain::Chain;
use super::client::Client;
use super::open::OpenExport;
use super::started::Reply;
use super::{query, request};
use crate::protocol::handshake::Query;
use crate::session::buffers::PooledBuf;
use crate::session::{Done, Request};

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
        open: Arc<OpenExport>,
        buf: Option<PooledBuf>,
    },
    /// Close a handle whose last reference this is.
    Close(Arc<OpenExport>),
}

impl Call {
    /// The chain the call runs on, which says where and in which lane.
    pub fn chain(&self) -> &Arc<Chain> {
        match self {
            Call::Query { chain, .. } => chain,
            Call::Request { open, .. } | Call::Close(open) => &open.chain,
        }
    }

    /// Run the call, here, and hand what came of it to `done`; a request
    /// started on the asynchronous path hands it later to the [`Reply`]
    /// that `later` makes instead. (A sink rather than a returned
    /// `Option`: the result, a request and its outcome, is not moved once
    /// more on the pool's path for every request.)
    pub fn run(self, later: &dyn Fn() -> Reply, done: impl FnOnce(Done<Arc<OpenExport>>)) {
        match self {
            Call::Query {
                query,
                chain,
                preconnect,
                client,
            } => done(query::query(&chain, query, preconnect, &client)),
            Call::Request { req, open, buf } => {
                if open.asynchronous() {
                    return request::start(&open, req, buf, later());
                }
                let result = request::run(&open, req, buf);
                // Before the result is handed over: the session's own
                // reference must be the last one when it closes the handle.
                drop(open);
                done(result)
            }
            Call::Close(open) => {
                close(open);
                done(Done::Closed)
            }
        }
    }
}

/// Close an open export whose last reference this is.
fn close(open: Arc<OpenExport>) {
    match Arc::try_unwrap(open) {
        Ok(o) => o.close(),
        Err(_) => log::error!("internal error: a handle is still in use when it is closed"),
    }
}
