//! nbdhost: a Network Block Device server whose disks come from plugins.
//!
//! The crate is the whole server; the `nbdhost` binary only calls
//! [`cli::main`]. Its parts, by concern:
//!
//! - [`protocol`]: the NBD wire format, handshake, request decoding and
//!   reply encoding, as pure code over buffers;
//! - [`session`]: one connection as a pure state machine driven by calls;
//! - [`layers`]: plugins and filters, their loader and the host services;
//! - [`tls`]: GnuTLS credentials and engines over in-memory buffers;
//! - [`serving`]: the export table built from the settings, access,
//!   routing a query to a chain, and the calls run on a chain;
//! - [`runtime`]: listeners, event loops, mailboxes and the worker pool;
//! - [`config`]: the command line and the configuration file, read into
//!   one settings value;
//! - [`cli`]: the process's edge: logging, what nbdhost prints about
//!   itself, loading the command line's chain, and the start-up in named
//!   steps;
//! - [`paths`]: the installation directories this build was made for;
//! - [`private_dir`]: the private temporary directories of `-U -` and
//!   `--run`.

pub mod cli;
pub mod config;
pub mod layers;
pub mod paths;
pub mod private_dir;
pub mod protocol;
pub mod runtime;
pub mod serving;
pub mod session;
pub mod tls;
