//! The layer chain: plugins and filters loaded from shared objects through
//! one loader, stacked into a chain that presents one [`Backend`] to the
//! protocol, and the host services every layer calls back into.

pub mod backend;
mod below;
pub mod chain;
pub mod connection;
mod export_list;
pub mod extents;
mod filter;
mod filter_async;
pub mod foreign;
pub mod host;
pub mod inflight;
mod instances;
mod load_error;
mod loader;
mod plugin;
mod plugin_async;

pub use backend::{Backend, Handle};
pub use load_error::LoadError;
pub use loader::LayerInfo;
