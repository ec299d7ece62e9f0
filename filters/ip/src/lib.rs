//! The ip filter: allow or deny clients by address, Unix peer
//! credentials, vsock address or the DN of their TLS certificate, with
//! nbdkit's rules.

#![deny(unsafe_code)]

mod rules;

use std::ffi::CString;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, Filter, FilterHandle, NextOpener, Result,
};

use rules::{parse_list, Client, Rule};

/// The two lists, as configured.
#[derive(Default)]
pub struct Ip {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    /// DN rules are known only after TLS, so every rule then waits for
    /// `open`; otherwise the rules run in `preconnect`, before the
    /// handshake costs anything.
    late: bool,
}

/// fnmatch(3) ignoring case, as nbdkit matches DNs, so patterns behave
/// exactly as they do there (brackets, backslash escapes).
#[allow(unsafe_code)]
fn fnmatch(pattern: &str, text: &str) -> bool {
    let (Ok(p), Ok(t)) = (CString::new(pattern), CString::new(text)) else {
        return false;
    };
    // SAFETY: two valid NUL-terminated strings that outlive the call.
    unsafe { libc::fnmatch(p.as_ptr(), t.as_ptr(), libc::FNM_CASEFOLD) == 0 }
}

/// Everything the rules might ask about the current connection.
fn this_client(late: bool) -> Client {
    let peer = host::peer();
    Client {
        peer,
        credentials: matches!(peer, Some(host::Peer::Unix))
            .then(|| host::peer_credentials().ok())
            .flatten(),
        dn: late.then(host::peer_tls_dn).flatten().map(|d| rfc4514(&d)),
        issuer_dn: late
            .then(host::peer_tls_issuer_dn)
            .flatten()
            .map(|d| rfc4514(&d)),
    }
}

/// A DN as the server gives it (GnuTLS's compatible form, in the
/// certificate's order: `O=BigCo,CN=client`) turned round into RFC 4514's
/// order (`CN=client,O=BigCo`), the one nbdkit 1.40 matches `dn:` rules
/// against, so that the same patterns work here. The parts are split at
/// commas that are not escaped (`\,` stays inside its part).
fn rfc4514(dn: &str) -> String {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in dn.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' => {
                parts.push(&dn[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&dn[start..]);
    parts.reverse();
    parts.join(",")
}

impl Ip {
    fn first_match(&self, which: &str, rules: &[Rule], c: &Client, debug: bool) -> bool {
        rules.iter().any(|r| {
            let m = r.matches(c, fnmatch);
            if debug {
                let verdict = if m { "yes" } else { "no" };
                host::debug(&format!("match client with {which} {r:?} => {verdict}"));
            }
            m
        })
    }

    fn check(&self) -> Result<()> {
        if self.allow.is_empty() && self.deny.is_empty() {
            return Ok(());
        }
        let debug = host::debug_flag("rules") != 0;
        let c = this_client(self.late);
        if debug {
            host::debug(&format!("client is {c:?}"));
        }
        // A client whose origin is unknown (standard input, an unknown
        // family) matches only `all`; with no address to go on, fail
        // closed.
        let allowed = if c.peer.is_none() {
            false
        } else {
            self.first_match("allow", &self.allow, &c, debug)
                || !self.first_match("deny", &self.deny, &c, debug)
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::new(
                libc::EPERM,
                "client not permitted to connect because of source address restriction",
            ))
        }
    }
}

#[callbacks]
impl Filter for Ip {
    const NAME: &'static str = "ip";
    const DESCRIPTION: &'static str = "allow or deny clients by address, credentials or TLS DN";
    const CONFIG_HELP: &'static str = "allow=addr[,addr...]  Rules that allow a client.
deny=addr[,addr...]   Rules that deny a client.";
    type Handle = Passed;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        let list = match key {
            "allow" => &mut self.allow,
            "deny" => &mut self.deny,
            _ => return Ok(false),
        };
        let rules = parse_list(key, value).map_err(|e| Error::new(libc::EINVAL, e.to_string()))?;
        self.late |= rules.iter().any(Rule::needs_tls);
        list.extend(rules);
        Ok(true)
    }

    fn preconnect(&self, _readonly: bool) -> Result<()> {
        if self.late {
            return Ok(());
        }
        self.check()
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Passed> {
        if self.late {
            self.check()?;
        }
        next.open(readonly, export_name)?;
        Ok(Passed)
    }
}

/// A connection the rules let through; it needs nothing more.
pub struct Passed;

#[callbacks]
impl FilterHandle for Passed {}

nbdhost_filter!(Ip);

#[cfg(test)]
mod tests {
    use super::rfc4514;

    #[test]
    fn dns_are_turned_into_rfc_4514_order() {
        assert_eq!(rfc4514("O=BigCo,CN=client"), "CN=client,O=BigCo");
        assert_eq!(rfc4514("C=GB,O=A\\, B,CN=x"), "CN=x,O=A\\, B,C=GB");
        assert_eq!(rfc4514("CN=alone"), "CN=alone");
    }
}
