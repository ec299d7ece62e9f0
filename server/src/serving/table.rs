//! The export table: what the server serves under which name, and where
//! an open of a name by a client goes. The table is replaced whole on a
//! reload; a connection keeps the chain it opened until it closes.

use std::sync::Arc;

use super::access::{Access, Visibility};
use super::calls::Call;
use super::chain::Chain;
use super::client::Client;
use crate::protocol::export::ExportEntry;
use crate::protocol::handshake::{Answer, Query, Refusal};
use crate::session::TlsState;

/// One export: the names it answers, who may open it, and its chain.
pub struct Export {
    pub name: Name,
    pub access: Access,
    pub chain: Arc<Chain>,
}

/// The names an export answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// This one, as a configuration file declares it: the table lists it
    /// and the chain is asked to connect (`preconnect`) once a client
    /// opens it.
    Only(String),
    /// Every name, as the command line's chain does: the chain itself
    /// is asked to connect, lists its exports, names the default and
    /// decides what opens.
    Every,
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Name::Only(n) => f.write_str(n),
            Name::Every => f.write_str("every name"),
        }
    }
}

/// Everything served.
pub struct Table {
    /// Looked up in order.
    pub exports: Vec<Arc<Export>>,
    /// What the empty name opens, if not what the chain answering every
    /// name says.
    pub default: Option<String>,
}

/// Where an open request goes.
pub enum Target {
    /// This chain, under the name it should see (the empty name resolved
    /// to the default export's, for a named export), asking it to connect
    /// first or not.
    Chain {
        chain: Arc<Chain>,
        name: String,
        preconnect: bool,
    },
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
    /// The command line's table: `chain` under every name.
    pub fn every_name(chain: Arc<Chain>) -> Table {
        Table {
            exports: vec![Arc::new(Export {
                name: Name::Every,
                access: Access::default(),
                chain,
            })],
            default: None,
        }
    }

    /// What `client`'s `query` comes to: the answer to "what does this
    /// client get when it asks for this name" (or for the list, or to
    /// connect), from the table where it can be, otherwise from a chain.
    pub fn route(&self, query: Query, client: Client) -> Route {
        let (chain, query, preconnect) = match query {
            Query::Preconnect | Query::List => match self.every(&client.tls) {
                // The chain answering every name connects and lists for
                // itself.
                Some(chain) => (chain, query, false),
                // A file's exports each run their preconnect on open.
                None if query == Query::Preconnect => {
                    return Route::Answered(Answer::Preconnect(Ok(())))
                }
                None => {
                    let list = self.listing(&client.tls);
                    return Route::Answered(Answer::List(Ok(list)));
                }
            },
            Query::Open { name, keep } => match self.resolve(&name, &client.tls) {
                Target::Chain {
                    chain,
                    name,
                    preconnect,
                } => (chain, Query::Open { name, keep }, preconnect),
                Target::Refused(Visibility::TlsRequired) => {
                    return Route::Answered(Answer::TlsRequired)
                }
                Target::Refused(_) => {
                    log::debug!(
                        "connection {}: no export '{name}' for this client",
                        client.id
                    );
                    let refused = Refusal {
                        errno: libc::ENOENT,
                        message: format!("no export '{name}'"),
                    };
                    return Route::Answered(Answer::Open(Err(refused)));
                }
            },
        };
        Route::Call(Call::Query {
            query,
            chain,
            preconnect,
            client,
        })
    }

    /// The chain of an export answering every name, if a client in `tls`
    /// may open it.
    fn every(&self, tls: &TlsState) -> Option<Arc<Chain>> {
        self.exports
            .iter()
            .find(|e| e.name == Name::Every && e.access.visibility(tls) == Visibility::Open)
            .map(|e| e.chain.clone())
    }

    /// Where an open of `name` by a client in `tls` goes.
    pub fn resolve(&self, name: &str, tls: &TlsState) -> Target {
        let wanted = match (name, &self.default) {
            ("", Some(d)) => d.as_str(),
            _ => name,
        };
        let found = self.exports.iter().find(|e| match &e.name {
            Name::Only(n) => n == wanted,
            Name::Every => true,
        });
        match found {
            Some(e) => match e.access.visibility(tls) {
                Visibility::Open => match &e.name {
                    Name::Only(n) => Target::Chain {
                        chain: e.chain.clone(),
                        name: n.clone(),
                        preconnect: true,
                    },
                    Name::Every => Target::Chain {
                        chain: e.chain.clone(),
                        name: wanted.to_string(),
                        preconnect: false,
                    },
                },
                refused => Target::Refused(refused),
            },
            None => Target::Refused(Visibility::Hidden),
        }
    }

    /// The exports of one name a client in `tls` may list.
    pub fn listing(&self, tls: &TlsState) -> Vec<ExportEntry> {
        self.exports
            .iter()
            .filter(|e| e.access.visibility(tls) == Visibility::Open)
            .filter_map(|e| match &e.name {
                Name::Only(name) => Some(ExportEntry {
                    name: name.clone(),
                    description: e.chain.description.clone(),
                }),
                Name::Every => None,
            })
            .collect()
    }

    /// Whether some chain allows only one connection at a time.
    pub fn one_at_a_time(&self) -> bool {
        self.exports.iter().any(|e| e.chain.one_at_a_time)
    }

    /// Whether every chain runs its calls on the loops, so no worker is
    /// needed (as long as no reload brings a chain that blocks).
    pub fn all_inline(&self) -> bool {
        self.exports.iter().all(|e| e.chain.inline)
    }

    /// Every chain, for `after_fork`.
    pub fn chains(&self) -> Vec<Arc<Chain>> {
        self.exports.iter().map(|e| e.chain.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::backend::{Backend, Handle};
    use crate::layers::connection::{Connection, Peer};
    use crate::protocol::export::ExportPolicy;
    use crate::session::PeerIdentity;
    use nbdhost_plugin_api::{Error, Result, ThreadModel};

    /// A chain that is never called: routing alone is under test.
    struct Idle;

    impl Backend for Idle {
        fn name(&self) -> &str {
            "idle"
        }
        fn thread_model(&self) -> ThreadModel {
            ThreadModel::Parallel
        }
        fn nonblocking(&self) -> bool {
            true
        }
        fn after_fork(&self) -> Result<()> {
            Ok(())
        }
        fn preconnect(&self, _: &Arc<Connection>, _: bool) -> Result<()> {
            Ok(())
        }
        fn list_exports(&self, _: &Arc<Connection>, _: bool, _: bool) -> Result<Vec<ExportEntry>> {
            Ok(Vec::new())
        }
        fn default_export(&self, _: &Arc<Connection>, _: bool, _: bool) -> Result<String> {
            Ok(String::new())
        }
        fn open(&self, _: Arc<Connection>, _: bool) -> Result<Box<dyn Handle>> {
            Err(Error::new(libc::EIO, "not opened in this test"))
        }
    }

    fn chain() -> Arc<Chain> {
        Arc::new(Chain::new(Arc::new(Idle), ExportPolicy::default()))
    }

    fn client(tls: TlsState) -> Client {
        Client {
            id: 1,
            peer: Peer::Pipe(None),
            tls,
        }
    }

    fn alice() -> TlsState {
        TlsState {
            active: true,
            identity: Some(PeerIdentity::Psk("alice".into())),
        }
    }

    /// A file's table: "public" for anyone, "secret" for alice over TLS,
    /// "public" by default.
    fn file() -> Table {
        let export = |name: &str, access| {
            Arc::new(Export {
                name: Name::Only(name.into()),
                access,
                chain: chain(),
            })
        };
        Table {
            exports: vec![
                export("public", Access::default()),
                export(
                    "secret",
                    Access {
                        tls: true,
                        psk_users: vec!["alice".into()],
                        dns: vec![],
                    },
                ),
            ],
            default: Some("public".into()),
        }
    }

    fn open(name: &str) -> Query {
        Query::Open {
            name: name.into(),
            keep: true,
        }
    }

    /// The call a query routes to: the query the chain gets and whether it
    /// is asked to connect first.
    fn called(r: Route) -> (Query, bool) {
        match r {
            Route::Call(Call::Query {
                query, preconnect, ..
            }) => (query, preconnect),
            Route::Call(_) => panic!("not a query"),
            Route::Answered(a) => panic!("answered by the table: {a:?}"),
        }
    }

    fn answered(r: Route) -> Answer {
        match r {
            Route::Answered(a) => a,
            Route::Call(_) => panic!("sent to a chain"),
        }
    }

    #[test]
    fn a_file_table_answers_connecting_and_listing_itself() {
        let t = file();
        let plain = client(TlsState::default());
        assert!(matches!(
            answered(t.route(Query::Preconnect, plain.clone())),
            Answer::Preconnect(Ok(()))
        ));
        let Answer::List(Ok(list)) = answered(t.route(Query::List, plain)) else {
            panic!("not a list");
        };
        let names: Vec<_> = list.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["public"]);
        let Answer::List(Ok(list)) = answered(t.route(Query::List, client(alice()))) else {
            panic!("not a list");
        };
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn a_file_export_opens_under_its_name_after_connecting() {
        let t = file();
        let plain = client(TlsState::default());
        assert_eq!(
            called(t.route(open(""), plain.clone())),
            (open("public"), true)
        );
        assert_eq!(
            called(t.route(open("public"), plain)),
            (open("public"), true)
        );
        assert_eq!(
            called(t.route(open("secret"), client(alice()))),
            (open("secret"), true)
        );
    }

    #[test]
    fn a_name_kept_for_others_looks_like_no_export() {
        let t = file();
        for tls in [
            TlsState::default(),
            TlsState {
                active: true,
                identity: Some(PeerIdentity::Psk("bob".into())),
            },
        ] {
            let Answer::Open(Err(refusal)) = answered(t.route(open("secret"), client(tls))) else {
                panic!("not refused");
            };
            assert_eq!(
                refusal,
                Refusal {
                    errno: libc::ENOENT,
                    message: "no export 'secret'".into()
                }
            );
        }
    }

    #[test]
    fn the_command_lines_chain_answers_every_name_itself() {
        let t = Table::every_name(chain());
        let plain = client(TlsState::default());
        assert_eq!(
            called(t.route(Query::Preconnect, plain.clone())),
            (Query::Preconnect, false)
        );
        assert_eq!(
            called(t.route(Query::List, plain.clone())),
            (Query::List, false)
        );
        assert_eq!(called(t.route(open(""), plain.clone())), (open(""), false));
        assert_eq!(called(t.route(open("any"), plain)), (open("any"), false));
    }
}
