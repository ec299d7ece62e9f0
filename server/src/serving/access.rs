//! Who may open an export: TLS, PSK users and certificate DNs, and what
//! a client of some TLS state and identity may do with it.

use crate::session::{PeerIdentity, TlsState};

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
