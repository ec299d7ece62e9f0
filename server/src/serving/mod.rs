//! What an NBD server serves: the export table, who may open what
//! (access), where a client's query goes (routing), and the calls that run
//! on an export's chain. It answers "what does this client get when it
//! asks for this name" in one place; `runtime` only moves the calls
//! between threads and sockets.
//!
//! - [`access`]: who may see and open an export (TLS, PSK users, DNs);
//! - [`chain`]: one chain as served, and how its thread model runs it;
//! - [`table`]: the exports by name, and resolving a name to a chain.

pub mod access;
pub mod chain;
pub mod table;
