//! What the server serves: each export's chain, with how its calls run
//! (on the loops or the pool, and in which lanes), and who may open it.
//! The table is replaced whole on a reload; a connection keeps the chain
//! it opened until it closes.

use std::sync::Arc;

use nbdhost_plugin_api::ThreadModel;

use super::workers::Lane;
use crate::layers::Backend;
use crate::protocol::export::{ExportEntry, ExportPolicy};
use crate::session::{PeerIdentity, TlsState};

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
    Global(Arc<Lane>),
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
                _ => Lanes::Global(Arc::new(Lane::default())),
            },
            one_at_a_time: model == ThreadModel::SerializeConnections,
            backend,
            policy,
            description: None,
        }
    }

    /// The lane a job of a connection (whose own lane is `own`) runs in.
    pub fn lane(&self, own: &Arc<Lane>) -> Option<Arc<Lane>> {
        match &self.lanes {
            Lanes::None => None,
            Lanes::PerConnection => Some(own.clone()),
            Lanes::Global(l) => Some(l.clone()),
        }
    }
}

/// Who may open an export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// It needs TLS.
    pub tls: bool,
    /// PSK users allowed; with `dns`, empty means anyone (with TLS if
    /// `tls`).
    pub psk_users: Vec<String>,
    /// Subject DNs of verified client certificates allowed.
    pub dns: Vec<String>,
}

/// What a client may do with an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// List it and open it.
    Open,
    /// It needs TLS, which the client has not started.
    TlsRequired,
    /// Not for this client: it sees what it would for a name that does
    /// not exist.
    Hidden,
}

impl Access {
    /// What a client in `tls` may do.
    pub fn visibility(&self, tls: &TlsState) -> Visibility {
        let restricted = !self.psk_users.is_empty() || !self.dns.is_empty();
        if self.tls && !tls.active {
            // A name kept for some identities must not be confirmed to a
            // client that has shown none.
            return if restricted {
                Visibility::Hidden
            } else {
                Visibility::TlsRequired
            };
        }
        if !restricted {
            return Visibility::Open;
        }
        let allowed = match &tls.identity {
            Some(PeerIdentity::Psk(user)) => self.psk_users.iter().any(|u| u == user),
            Some(PeerIdentity::Certificate { subject, .. }) => {
                self.dns.iter().any(|d| same_dn(d, subject))
            }
            None => false,
        };
        if allowed {
            Visibility::Open
        } else {
            Visibility::Hidden
        }
    }
}

/// The attribute=value parts of a DN, with attribute types in upper case
/// and spaces around the separators dropped; a backslash escapes a comma.
fn rdns(dn: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = dn.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let last = parts.last_mut().expect("never empty");
                last.push(c);
                if let Some(n) = chars.next() {
                    last.push(n);
                }
            }
            ',' => parts.push(String::new()),
            _ => parts.last_mut().expect("never empty").push(c),
        }
    }
    parts
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => format!("{}={}", k.trim().to_ascii_uppercase(), v.trim()),
            None => p.trim().to_string(),
        })
        .collect()
}

/// Whether two DNs name the same subject: the same parts in the same
/// order, or in the reverse order (RFC 4514 writes a DN from its last
/// part, GnuTLS's own form from its first; users copy either).
fn same_dn(a: &str, b: &str) -> bool {
    let (a, b) = (rdns(a), rdns(b));
    a == b || a.iter().eq(b.iter().rev())
}

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

impl Table {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> TlsState {
        TlsState {
            active: false,
            identity: None,
        }
    }

    fn psk(user: &str) -> TlsState {
        TlsState {
            active: true,
            identity: Some(PeerIdentity::Psk(user.into())),
        }
    }

    fn cert(subject: &str) -> TlsState {
        TlsState {
            active: true,
            identity: Some(PeerIdentity::Certificate {
                subject: subject.into(),
                issuer: "CN=ca".into(),
            }),
        }
    }

    #[test]
    fn an_open_export_is_open_to_everyone() {
        assert_eq!(Access::default().visibility(&plain()), Visibility::Open);
    }

    #[test]
    fn a_tls_export_asks_a_plain_client_for_tls() {
        let a = Access {
            tls: true,
            ..Access::default()
        };
        assert_eq!(a.visibility(&plain()), Visibility::TlsRequired);
        assert_eq!(a.visibility(&psk("anyone")), Visibility::Open);
    }

    #[test]
    fn a_user_list_hides_the_export_from_a_plain_client_rather_than_ask_for_tls() {
        let a = Access {
            tls: true,
            psk_users: vec!["alice".into()],
            dns: vec![],
        };
        assert_eq!(a.visibility(&plain()), Visibility::Hidden);
    }

    #[test]
    fn a_user_list_hides_the_export_from_other_users() {
        let a = Access {
            tls: true,
            psk_users: vec!["alice".into()],
            dns: vec!["CN=client1,O=Example".into()],
        };
        assert_eq!(a.visibility(&psk("alice")), Visibility::Open);
        assert_eq!(a.visibility(&psk("bob")), Visibility::Hidden);
        assert_eq!(
            a.visibility(&cert("CN=client1,O=Example")),
            Visibility::Open
        );
        assert_eq!(
            a.visibility(&cert("CN=client2,O=Example")),
            Visibility::Hidden
        );
    }

    #[test]
    fn a_dn_matches_in_either_order_and_with_spaces_after_commas() {
        assert!(same_dn(
            "CN=backup,O=nbdhost tests",
            "O=nbdhost tests,CN=backup"
        ));
        assert!(same_dn(
            "cn=backup, O=nbdhost tests",
            "CN=backup,O=nbdhost tests"
        ));
        assert!(!same_dn("CN=backup,O=nbdhost tests", "CN=backup,O=others"));
        assert!(!same_dn("CN=a\\,b", "CN=a,b"));
        assert!(!same_dn("CN=a,O=b,C=c", "O=b,CN=a,C=c"));
    }

    #[test]
    fn a_psk_user_does_not_match_a_dn_of_the_same_text() {
        let a = Access {
            tls: true,
            psk_users: vec![],
            dns: vec!["alice".into()],
        };
        assert_eq!(a.visibility(&psk("alice")), Visibility::Hidden);
    }
}
