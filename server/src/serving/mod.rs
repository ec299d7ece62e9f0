//! What an NBD server serves: the export table, who may open what
//! (access), where a client's query goes (routing), and the calls that run
//! on an export's chain. It answers "what does this client get when it
//! asks for this name" in one place; `runtime` only moves the calls
//! between threads and sockets.
//!
//! - [`build`]: the table built from the settings (the command line's
//!   one chain, or a configuration file's exports), and built again from
//!   the same source on a reload;
//! - [`access`]: who may see and open an export (TLS, PSK users, DNs);
//! - [`client`]: the connection a query is answered for, as one value;
//! - [`table`]: the exports by name, and routing a query: answered by the
//!   table, or a call on a chain;
//! - [`chain`]: one chain as served, and how its thread model runs it;
//! - [`calls`]: the calls run on a chain (a [`query`], a [`request`],
//!   the close of an [`open`] export) and their results; a request on a
//!   chain that answers later is [`started`] and answered on completion,
//!   both paths answering through [`outcome`];
//! - [`Serving`]: the table and the session settings that go with it, as
//!   new connections get them (a reload replaces it).

pub mod access;
pub mod build;
pub mod calls;
pub mod chain;
pub mod client;
pub mod open;
mod outcome;
mod query;
pub mod request;
pub mod started;
pub mod table;

use std::sync::Arc;

use crate::session;
use table::Table;

/// What new connections are served: the exports, and the session settings
/// that go with them (the TLS policy depends on the exports). A reload
/// replaces it; connections keep what they started with.
pub struct Serving {
    pub table: Table,
    pub session: Arc<session::Config>,
}
