//! One chain as it is served: its top layer, the policy it is served
//! under, and how its calls run by its thread model (on the loops or the
//! pool, and which of them must not overlap; the lanes that keep them
//! apart are the runtime's).

use std::sync::Arc;

use nbdhost_plugin_api::ThreadModel;

use crate::layers::Backend;
use crate::protocol::export::ExportPolicy;

/// One chain being served, as jobs need it.
pub struct Chain {
    pub backend: Arc<dyn Backend>,
    /// The top layer's name, for log lines.
    pub name: String,
    pub policy: ExportPolicy,
    /// The description a file gives the export, shown when the chain has
    /// none of its own.
    pub description: Option<String>,
    /// Its calls never block: work runs on the loop that read it.
    pub inline: bool,
    pub lanes: Lanes,
    /// `serialize_connections`: one client at a time in the whole server.
    pub one_at_a_time: bool,
}

/// How pool jobs of one thread model are kept from overlapping.
pub enum Lanes {
    /// They may overlap.
    None,
    /// One lane per connection (`serialize_requests`).
    PerConnection,
    /// One lane for everything of this chain (`serialize_all_requests`).
    Global,
}

impl Chain {
    /// Serve `backend` under `policy`.
    pub fn new(backend: Arc<dyn Backend>, policy: ExportPolicy) -> Chain {
        let model = backend.thread_model();
        Chain {
            name: backend.name().to_string(),
            inline: backend.nonblocking() && model >= ThreadModel::SerializeRequests,
            lanes: match model {
                ThreadModel::Parallel => Lanes::None,
                ThreadModel::SerializeRequests => Lanes::PerConnection,
                _ => Lanes::Global,
            },
            one_at_a_time: model == ThreadModel::SerializeConnections,
            backend,
            policy,
            description: None,
        }
    }
}
