//! The export table: what the server serves under which name, and where
//! an open of a name by a client goes. The table is replaced whole on a
//! reload; a connection keeps the chain it opened until it closes.

use std::sync::Arc;

use super::access::{Access, Visibility};
use super::calls::Call;
use super::chain::Chain;
use super::client::Client;
use crate::protocol::export::ExportEntry;
use crate::protocol::handshake::{Answer, Query};
use crate::session::TlsState;

/// One named export of a configuration file.
pub struct Export {
    pub name: String,
    pub access: Access,
    pub chain: Arc<Chain>,
}

/// Everything served.
pub enum Table {
    /// The command line's one chain, under every name: the chain itself
    /// lists its exports, names the default and decides what opens.
    Single(Arc<Chain>),
    /// A configuration file's exports.
    Named {
        exports: Vec<Arc<Export>>,
        /// What the empty name opens.
        default: Option<String>,
    },
}

/// Where an open request goes.
pub enum Target {
    /// This chain, under the name it should see (the empty name resolved
    /// to the default export's, for a named export).
    Chain { chain: Arc<Chain>, name: String },
    /// Refused before any layer is asked.
    Refused(Visibility),
}

/// What a handshake query comes to.
pub enum Route {
    /// The table answers it without asking a chain.
    Answered(Answer),
    /// This call on a chain answers it.
    Call(Call),
}

impl Table {
    /// What `client`'s `query` comes to: the answer to "what does this
    /// client get when it asks for this name" (or for the list, or to
    /// connect), from the table where it can be, otherwise from a chain.
    pub fn route(&self, query: Query, client: Client) -> Route {
        let (chain, query, preconnect) = match (self, query) {
            (Table::Single(chain), query) => (chain.clone(), query, false),
            // A file's exports each run their preconnect on open.
            (Table::Named { .. }, Query::Preconnect) => {
                return Route::Answered(Answer::Preconnect(Ok(())))
            }
            (Table::Named { .. }, Query::List) => {
                let list = self.listing(&client.tls).unwrap_or_default();
                return Route::Answered(Answer::List(Ok(list)));
            }
            (Table::Named { .. }, Query::Open { name, keep }) => {
                match self.resolve(&name, &client.tls) {
                    Target::Chain { chain, name } => (chain, Query::Open { name, keep }, true),
                    Target::Refused(Visibility::TlsRequired) => {
                        return Route::Answered(Answer::TlsRequired)
                    }
                    Target::Refused(_) => {
                        log::debug!(
                            "connection {}: no export '{name}' for this client",
                            client.id
                        );
                        let refused = Err((libc::ENOENT, format!("no export '{name}'")));
                        return Route::Answered(Answer::Open(refused));
                    }
                }
            }
        };
        Route::Call(Call::Query {
            query,
            chain,
            preconnect,
            client,
        })
    }

    /// Where an open of `name` by a client in `tls` goes.
    pub fn resolve(&self, name: &str, tls: &TlsState) -> Target {
        match self {
            Table::Single(chain) => Target::Chain {
                chain: chain.clone(),
                name: name.to_string(),
            },
            Table::Named { exports, default } => {
                let wanted = match (name, default) {
                    ("", Some(d)) => d.as_str(),
                    _ => name,
                };
                match exports.iter().find(|e| e.name == wanted) {
                    Some(e) => match e.access.visibility(tls) {
                        Visibility::Open => Target::Chain {
                            chain: e.chain.clone(),
                            name: e.name.clone(),
                        },
                        refused => Target::Refused(refused),
                    },
                    None => Target::Refused(Visibility::Hidden),
                }
            }
        }
    }

    /// The exports a client in `tls` may list, or `None` for the single
    /// chain, which lists its own.
    pub fn listing(&self, tls: &TlsState) -> Option<Vec<ExportEntry>> {
        let Table::Named { exports, .. } = self else {
            return None;
        };
        Some(
            exports
                .iter()
                .filter(|e| e.access.visibility(tls) == Visibility::Open)
                .map(|e| ExportEntry {
                    name: e.name.clone(),
                    description: e.chain.description.clone(),
                })
                .collect(),
        )
    }

    /// Whether some chain allows only one connection at a time.
    pub fn one_at_a_time(&self) -> bool {
        match self {
            Table::Single(c) => c.one_at_a_time,
            Table::Named { exports, .. } => exports.iter().any(|e| e.chain.one_at_a_time),
        }
    }

    /// Whether every chain runs its calls on the loops, so no worker is
    /// needed. A file's table may be replaced by one that needs them.
    pub fn all_inline(&self) -> bool {
        match self {
            Table::Single(c) => c.inline,
            Table::Named { .. } => false,
        }
    }

    /// Every chain, for `after_fork`.
    pub fn chains(&self) -> Vec<Arc<Chain>> {
        match self {
            Table::Single(c) => vec![c.clone()],
            Table::Named { exports, .. } => exports.iter().map(|e| e.chain.clone()).collect(),
        }
    }
}
