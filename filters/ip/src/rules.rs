//! Rules as `allow=` and `deny=` spell them, and whether one matches a
//! client. Pure: the filter gathers what it knows of the client first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nbdhost_plugin_api::host::{Credentials, Peer};

/// One entry of an allow or deny list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `all`, `any`.
    Any,
    /// `anyipv4`, `allipv4`.
    AnyIpv4,
    /// `anyipv6`, `allipv6`.
    AnyIpv6,
    /// `anyunix`, `allunix`.
    AnyUnix,
    /// `anyvsock`, `allvsock`.
    AnyVsock,
    /// An IPv4 address or network.
    Ipv4 { net: Ipv4Addr, prefix: u32 },
    /// An IPv6 address or network.
    Ipv6 { net: Ipv6Addr, prefix: u32 },
    /// `dn:GLOB`, matched against the client certificate's subject DN.
    Dn(String),
    /// `issuer-dn:GLOB`, matched against its issuer's DN.
    IssuerDn(String),
    /// `pid:N`, a Unix-socket client's process.
    Pid(i64),
    /// `uid:N`, a Unix-socket client's user.
    Uid(i64),
    /// `gid:N`, a Unix-socket client's group.
    Gid(i64),
    /// `vsock-cid:N`.
    VsockCid(u32),
    /// `vsock-port:N`.
    VsockPort(u32),
}

/// A rule that cannot be parsed, with the message nbdkit gives.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRule(pub String);

impl std::fmt::Display for BadRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the filter knows of a client when it applies the rules.
#[derive(Debug, Default)]
pub struct Client {
    pub peer: Option<Peer>,
    /// For a Unix-socket client, when the kernel gave them.
    pub credentials: Option<Credentials>,
    /// The verified client certificate's subject and issuer DNs.
    pub dn: Option<String>,
    pub issuer_dn: Option<String>,
}

/// `value` without its case-insensitive `prefix`, if it has it.
fn strip_prefix_ci<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// Whether the parameter is one DN rule, which is not split at commas
/// (DNs contain them).
fn is_dn(value: &str) -> bool {
    strip_prefix_ci(value, "dn:").is_some() || strip_prefix_ci(value, "issuer-dn:").is_some()
}

/// Parse one `allow=` or `deny=` parameter named `param` into its rules.
pub fn parse_list(param: &str, value: &str) -> Result<Vec<Rule>, BadRule> {
    if is_dn(value) {
        return Ok(vec![parse(param, value)?]);
    }
    let mut rules = Vec::new();
    // A trailing comma ends the list; an empty entry elsewhere is an error.
    let value = value.strip_suffix(',').unwrap_or(value);
    if value.is_empty() {
        return Ok(rules);
    }
    for entry in value.split(',') {
        if entry.is_empty() {
            return Err(BadRule(format!("{param}: empty entry in rule list")));
        }
        rules.push(parse(param, entry)?);
    }
    Ok(rules)
}

fn id(key: &str, text: &str, min: i64, max: i64) -> Result<i64, BadRule> {
    let n: i64 = text
        .parse()
        .map_err(|_| BadRule(format!("{key}: could not parse number: {text}")))?;
    if n < min || n > max {
        return Err(BadRule(format!("{key} parameter out of range")));
    }
    Ok(n)
}

fn parse(param: &str, v: &str) -> Result<Rule, BadRule> {
    for (words, rule) in [
        (["all", "any"], Rule::Any),
        (["allipv4", "anyipv4"], Rule::AnyIpv4),
        (["allipv6", "anyipv6"], Rule::AnyIpv6),
        (["allunix", "anyunix"], Rule::AnyUnix),
        (["allvsock", "anyvsock"], Rule::AnyVsock),
    ] {
        if words.iter().any(|w| v.eq_ignore_ascii_case(w)) {
            return Ok(rule);
        }
    }
    if let Some(glob) = strip_prefix_ci(v, "dn:") {
        return Ok(Rule::Dn(glob.to_owned()));
    }
    if let Some(glob) = strip_prefix_ci(v, "issuer-dn:") {
        return Ok(Rule::IssuerDn(glob.to_owned()));
    }
    if let Some(n) = strip_prefix_ci(v, "pid:") {
        return Ok(Rule::Pid(id("pid:", n, 1, i64::MAX)?));
    }
    if let Some(n) = strip_prefix_ci(v, "uid:") {
        return Ok(Rule::Uid(id("uid:", n, 0, i64::MAX)?));
    }
    if let Some(n) = strip_prefix_ci(v, "gid:") {
        return Ok(Rule::Gid(id("gid:", n, 0, i64::MAX)?));
    }
    if strip_prefix_ci(v, "security:").is_some() {
        // nbdhost does not read the peer's security label (SO_PEERSEC),
        // and a deny rule that could never match would let through the
        // very clients it names.
        return Err(BadRule(format!(
            "{param}={v}: security: rules are not supported by nbdhost"
        )));
    }
    if let Some(n) = strip_prefix_ci(v, "vsock-cid:") {
        return Ok(Rule::VsockCid(
            id("vsock-cid:", n, 0, u32::MAX.into())? as u32
        ));
    }
    if let Some(n) = strip_prefix_ci(v, "vsock-port:") {
        return Ok(Rule::VsockPort(
            id("vsock-port:", n, 0, u32::MAX.into())? as u32
        ));
    }
    let (addr, prefix) = match v.split_once('/') {
        Some((a, p)) => {
            let p: u32 = p
                .parse()
                .map_err(|_| BadRule(format!("{param}: cannot parse prefix length: {p}")))?;
            (a, Some(p))
        }
        None => (v, None),
    };
    match (addr.parse::<IpAddr>(), prefix) {
        (Ok(IpAddr::V4(net)), p) => match p.unwrap_or(32) {
            prefix @ 0..=32 => Ok(Rule::Ipv4 { net, prefix }),
            _ => Err(BadRule(format!("prefix is > 32 in {param}={v}"))),
        },
        (Ok(IpAddr::V6(net)), p) => match p.unwrap_or(128) {
            prefix @ 0..=128 => Ok(Rule::Ipv6 { net, prefix }),
            _ => Err(BadRule(format!("prefix is > 128 in {param}={v}"))),
        },
        (Err(_), Some(_)) => Err(BadRule(format!(
            "cannot parse address \"{addr}\" from {param}={v}"
        ))),
        (Err(_), None) => Err(BadRule(format!(
            "don't know how to parse rule: {param}={v}"
        ))),
    }
}

/// Whether the top `prefix` bits of `a` and `b` agree.
fn same_network(a: u128, b: u128, prefix: u32, bits: u32) -> bool {
    let shift = bits - prefix;
    // Prefix 0 compares nothing (and would shift by the whole width).
    shift == bits || a >> shift == b >> shift
}

impl Rule {
    /// Whether the DN rules are among these, which can be checked only
    /// once TLS is negotiated.
    pub fn needs_tls(&self) -> bool {
        matches!(self, Rule::Dn(_) | Rule::IssuerDn(_))
    }

    /// Whether this rule matches `c`. `glob` matches a DN against a
    /// pattern, as fnmatch(3) does, ignoring case.
    pub fn matches(&self, c: &Client, glob: impl Fn(&str, &str) -> bool) -> bool {
        let creds = || match c.peer {
            Some(Peer::Unix) => c.credentials,
            _ => None,
        };
        match (self, c.peer) {
            (Rule::Any, _) => true,
            (Rule::AnyIpv4, Some(Peer::Inet(a))) => a.is_ipv4(),
            (Rule::AnyIpv6, Some(Peer::Inet(a))) => a.is_ipv6(),
            (Rule::AnyUnix, Some(Peer::Unix)) => true,
            (Rule::AnyVsock, Some(Peer::Vsock { .. })) => true,
            (Rule::Ipv4 { net, prefix }, Some(Peer::Inet(a))) => match a.ip() {
                IpAddr::V4(ip) => {
                    same_network(u32::from(ip).into(), u32::from(*net).into(), *prefix, 32)
                }
                IpAddr::V6(_) => false,
            },
            (Rule::Ipv6 { net, prefix }, Some(Peer::Inet(a))) => match a.ip() {
                IpAddr::V6(ip) => same_network(ip.into(), (*net).into(), *prefix, 128),
                IpAddr::V4(_) => false,
            },
            (Rule::Dn(g), _) => c.dn.as_deref().is_some_and(|dn| glob(g, dn)),
            (Rule::IssuerDn(g), _) => c.issuer_dn.as_deref().is_some_and(|dn| glob(g, dn)),
            (Rule::Pid(n), _) => creds().is_some_and(|k| k.pid == *n),
            (Rule::Uid(n), _) => creds().is_some_and(|k| k.uid == *n),
            (Rule::Gid(n), _) => creds().is_some_and(|k| k.gid == *n),
            (Rule::VsockCid(n), Some(Peer::Vsock { cid, .. })) => cid == *n,
            (Rule::VsockPort(n), Some(Peer::Vsock { port, .. })) => port == *n,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inet(s: &str) -> Client {
        Client {
            peer: Some(Peer::Inet(std::net::SocketAddr::new(s.parse().unwrap(), 1))),
            ..Client::default()
        }
    }

    fn no_glob(_: &str, _: &str) -> bool {
        false
    }

    fn rule(v: &str) -> Rule {
        parse("allow", v).unwrap()
    }

    #[test]
    fn networks_match_by_their_prefix() {
        assert!(rule("10.0.0.0/8").matches(&inet("10.200.1.2"), no_glob));
        assert!(!rule("10.0.0.0/8").matches(&inet("11.0.0.1"), no_glob));
        assert!(rule("0.0.0.0/0").matches(&inet("192.0.2.1"), no_glob));
        assert!(rule("127.0.0.1").matches(&inet("127.0.0.1"), no_glob));
        assert!(!rule("127.0.0.1").matches(&inet("127.0.0.2"), no_glob));
        assert!(rule("fe80::/10").matches(&inet("fe80::1"), no_glob));
        assert!(!rule("fe80::/10").matches(&inet("::1"), no_glob));
        assert!(rule("::/0").matches(&inet("2001:db8::1"), no_glob));
        assert!(!rule("::/0").matches(&inet("127.0.0.1"), no_glob));
    }

    #[test]
    fn keywords_ignore_case_and_match_their_family() {
        assert_eq!(rule("ANYIPV4"), Rule::AnyIpv4);
        assert!(rule("allipv6").matches(&inet("::1"), no_glob));
        assert!(!rule("anyunix").matches(&inet("::1"), no_glob));
        let unix = Client {
            peer: Some(Peer::Unix),
            ..Client::default()
        };
        assert!(rule("anyunix").matches(&unix, no_glob));
    }

    #[test]
    fn lists_split_at_commas_except_dn_rules() {
        assert_eq!(
            parse_list("allow", "127.0.0.1,::1").unwrap(),
            vec![rule("127.0.0.1"), rule("::1")]
        );
        assert_eq!(
            parse_list("allow", "dn:CN=a,O=b").unwrap(),
            vec![Rule::Dn("CN=a,O=b".into())]
        );
        assert!(parse_list("allow", "127.0.0.1,,::1").is_err());
    }

    #[test]
    fn bad_rules_are_refused() {
        for v in [
            "10.0.0.0/33",
            "::/129",
            "nonsense",
            "pid:0",
            "uid:-1",
            "1.2.3/8",
            "security:x",
        ] {
            assert!(parse("allow", v).is_err(), "{v}");
        }
    }
}
