//! `--config FILE`: many exports from one TOML file, each with its own
//! chain, TLS policy and users. The file's `[server]` table holds the
//! command line's long options (the command line, given after them,
//! overrides them); each `[[export]]` table becomes one chain. Every
//! mistake is reported with the file, line and column it was made at.

pub mod file;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::layers::chain::Layers;
use crate::protocol::export::ExportPolicy;
use crate::protocol::handshake::TlsMode;
use crate::runtime::exports::{Access, Chain, Export};
use file::{Error, Source, Value};

/// Long options a file may not set, and why.
const NOT_IN_FILE: &[(&str, &str)] = &[
    ("config", "the file is already given"),
    ("check", "it is an action of the command line"),
    ("filter", "each export lists its own filters"),
    ("dump-config", "it is an action of the command line"),
    ("dump-plugin", "it is an action of the command line"),
    ("help", "it is an action of the command line"),
    ("version", "it is an action of the command line"),
    ("short-options", "it is an action of the command line"),
    ("long-options", "it is an action of the command line"),
    ("single", "serving stdin is for the command line"),
    ("port", "give listen = [\"HOST:PORT\"]"),
    ("ipaddr", "give listen = [\"HOST:PORT\"]"),
    ("unix", "give listen = [\"/path/to/socket\"]"),
    ("vsock", "give listen = [\"vsock:PORT\"]"),
];

/// The `[server]` options as command-line arguments, each checked on its
/// own against `cmd` (nbdhost's parser) so that a bad one is reported at
/// its place in the file.
pub fn server_args(
    src: &Source,
    server: &file::Server,
    cmd: &clap::Command,
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for (key, value) in server {
        let k = key.get_ref().as_str();
        if k == file::LISTEN || k == file::DEFAULT_EXPORT {
            continue;
        }
        let Some(arg) = cmd.get_arguments().find(|a| {
            a.get_long() == Some(k) || a.get_all_aliases().is_some_and(|al| al.contains(&k))
        }) else {
            return Err(src.error(
                Some(key.span()),
                format!("unknown key '{k}' in [server]: not a long option of nbdhost(1)"),
            ));
        };
        // By the option's own name, so an alias does not slip past.
        let long = arg.get_long().unwrap_or(k);
        if let Some((_, why)) = NOT_IN_FILE.iter().find(|(n, _)| *n == long) {
            return Err(src.error(
                Some(key.span()),
                format!("'{k}' cannot be set in [server]: {why}"),
            ));
        }
        let args: Vec<String> = match (arg.get_action().takes_values(), value.get_ref()) {
            (false, Value::Boolean(true)) => vec![format!("--{k}")],
            (false, Value::Boolean(false)) => Vec::new(),
            (false, _) => {
                return Err(src.error(
                    Some(value.span()),
                    format!("'{k}' is a switch: give true or false"),
                ))
            }
            (true, v) => v
                .texts()
                .into_iter()
                .map(|t| format!("--{k}={t}"))
                .collect(),
        };
        let probe = ["nbdhost", "--dump-config"]
            .into_iter()
            .map(String::from)
            .chain(args.iter().cloned());
        if let Err(e) = cmd.clone().try_get_matches_from(probe) {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let msg = first.trim_start_matches("error: ");
            return Err(src.error(Some(value.span()), format!("'{k}': {msg}")));
        }
        out.extend(args);
    }
    Ok(out)
}

/// What the exports are built against: the server's settings.
pub struct Context {
    /// The server has TLS credentials.
    pub has_credentials: bool,
    /// It has a PSK file, so PSK users exist.
    pub psk: bool,
    /// It verifies client certificates, so their subjects are known.
    pub verify_peer: bool,
    /// The exports are built again for a reload: descriptors given at
    /// start-up (`-FD` secrets) have been read and closed.
    pub reloading: bool,
    /// `tls` as the server settings give it explicitly.
    pub tls_setting: Option<TlsMode>,
    /// The server-wide `readonly` and `no-mc`.
    pub policy: ExportPolicy,
}

/// A file's exports as built, each beside the declaration it came from
/// (so that a reload keeps those that did not change).
pub struct Built {
    pub exports: Vec<(file::Export, Arc<Export>)>,
    pub default: Option<String>,
}

impl Built {
    /// The handshake's TLS policy for these exports: required when every
    /// export needs TLS (nothing at all is answered before it), optional
    /// when some do not, off without credentials.
    pub fn tls_mode(&self, ctx: &Context) -> TlsMode {
        if let Some(m) = ctx.tls_setting {
            return m;
        }
        if !ctx.has_credentials {
            TlsMode::Off
        } else if self.exports.iter().all(|(_, e)| e.access.tls) {
            TlsMode::Require
        } else {
            TlsMode::On
        }
    }
}

/// Build every export of `file`. Those whose declaration is the same as in
/// `previous` are kept as they are; the others are loaded and configured
/// afresh, so a filter's or plugin's refusal is reported at the parameter.
pub fn build(
    src: &Source,
    file: &file::File,
    ctx: &Context,
    previous: &[(file::Export, Arc<Export>)],
) -> Result<Built, Error> {
    if file.exports.is_empty() {
        return Err(src.error(None, "the file has no [[export]] table: nothing to serve"));
    }
    file::listen(src, &file.server)?;
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &file.exports {
        let name = e.name.get_ref();
        if name.is_empty() {
            return Err(src.error(
                Some(e.name.span()),
                "an export needs a name (the empty name is set with default-export in [server])",
            ));
        }
        if name.len() > 4096 {
            return Err(src.error(Some(e.name.span()), "the export name is over 4096 bytes"));
        }
        if let Some(first) = seen.insert(name, e.name.span().start) {
            let (line, _) = src.error(Some(first..first), "").place.unwrap_or((0, 0));
            return Err(src.error(
                Some(e.name.span()),
                format!("export '{name}' is defined twice (first at line {line})"),
            ));
        }
    }
    let default = match &file::default_export(src, &file.server)? {
        Some(d) if !seen.contains_key(d.get_ref().as_str()) => {
            return Err(src.error(
                Some(d.span()),
                format!("default-export '{}' is not one of the exports", d.get_ref()),
            ))
        }
        Some(d) => Some(d.get_ref().clone()),
        None => None,
    };
    let mut exports = Vec::with_capacity(file.exports.len());
    for decl in &file.exports {
        let access = access(src, decl, ctx)?;
        let kept = previous
            .iter()
            .find(|(d, _)| d == decl)
            .map(|(_, e)| e.clone());
        let export = match kept {
            Some(e) => e,
            None => Arc::new(Export {
                name: decl.name.get_ref().clone(),
                access,
                chain: Arc::new(chain(src, decl, ctx)?),
            }),
        };
        exports.push((decl.clone(), export));
    }
    Ok(Built { exports, default })
}

/// Who may open `decl`, checked against the server's TLS.
fn access(src: &Source, decl: &file::Export, ctx: &Context) -> Result<Access, Error> {
    let restricted = !decl.allow_psk.is_empty() || !decl.allow_dn.is_empty();
    let server_tls = ctx.has_credentials && ctx.tls_setting != Some(TlsMode::Off);
    let tls = match &decl.tls {
        Some(t) if *t.get_ref() && !server_tls => return Err(src.error(
            Some(t.span()),
            "tls = true, but the server has no TLS (set tls-psk or tls-certificates in [server])",
        )),
        Some(t) if !*t.get_ref() && restricted => {
            return Err(src.error(
                Some(t.span()),
                "tls = false, but allow-psk and allow-dn name TLS identities",
            ))
        }
        Some(t) if !*t.get_ref() && ctx.tls_setting == Some(TlsMode::Require) => {
            return Err(src.error(
                Some(t.span()),
                "tls = false, but the server's tls = \"require\" serves no client without TLS",
            ))
        }
        Some(t) => *t.get_ref(),
        None if restricted && !server_tls => {
            return Err(src.error(
                Some(decl.name.span()),
                "allow-psk and allow-dn need TLS, but the server has none",
            ))
        }
        None => server_tls,
    };
    if !decl.allow_psk.is_empty() && !ctx.psk {
        return Err(src.error(
            Some(decl.name.span()),
            "allow-psk names PSK users, but the server has no tls-psk file",
        ));
    }
    if !decl.allow_dn.is_empty() && !ctx.verify_peer {
        return Err(src.error(
            Some(decl.name.span()),
            "allow-dn names certificate subjects, but without tls-verify-peer clients present none",
        ));
    }
    Ok(Access {
        tls,
        psk_users: decl.allow_psk.clone(),
        dns: decl.allow_dn.clone(),
    })
}

/// Load and configure one export's chain.
fn chain(src: &Source, decl: &file::Export, ctx: &Context) -> Result<Chain, Error> {
    let names: Vec<String> = decl
        .filters
        .iter()
        .map(|f| f.filter.get_ref().clone())
        .collect();
    let layers = Layers::load_each(decl.plugin.get_ref(), &names).map_err(|(at, e)| {
        let span = match at {
            None => decl.plugin.span(),
            Some(i) => decl.filters[i].filter.span(),
        };
        src.error(Some(span), e)
    })?;
    let descriptor = |k: &toml::Spanned<String>, text: &str| -> Result<(), Error> {
        let fd = text
            .strip_prefix('-')
            .is_some_and(|n| n.is_empty() || n.bytes().all(|b| b.is_ascii_digit()));
        if ctx.reloading && fd {
            return Err(src.error(
                Some(k.span()),
                format!(
                    "'{}' reads a descriptor or standard input ({text}), which only works at start-up; use +FILE to reload",
                    k.get_ref()
                ),
            ));
        }
        Ok(())
    };
    for (i, f) in decl.filters.iter().enumerate() {
        for (k, v) in &f.params {
            for text in v.get_ref().texts() {
                descriptor(k, &text)?;
                layers
                    .config_filter(i, k.get_ref(), &text)
                    .map_err(|e| src.error(Some(k.span()), e))?;
            }
        }
    }
    for (k, v) in &decl.params {
        for text in v.get_ref().texts() {
            descriptor(k, &text)?;
            layers
                .config_plugin(k.get_ref(), &text)
                .map_err(|e| src.error(Some(k.span()), e))?;
        }
    }
    let name = decl.name.get_ref();
    let backend = layers
        .configure()
        .map_err(|e| src.error(Some(decl.name.span()), format!("export '{name}': {e}")))?;
    let policy = ExportPolicy {
        readonly: ctx.policy.readonly || decl.readonly,
        no_multi_conn: ctx.policy.no_multi_conn,
    };
    Ok(Chain {
        description: decl.description.clone(),
        ..Chain::new(backend, policy)
    })
}

/// Whether a parameter's value is a secret that `--check` must not show.
/// Layers do not declare their secrets, so the names tell: a passphrase,
/// a password, a key, a token, credentials.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["pass", "secret", "key", "token", "cred", "psk", "cookie"]
        .iter()
        .any(|w| k.contains(w))
}

/// The resolved configuration, as `--check` prints it: the server
/// arguments the file gives and the command line adds, the effective TLS
/// policy, and each export with its layers found and secrets masked.
pub fn describe(
    src: &Source,
    file: &file::File,
    args: &[String],
    tls: TlsMode,
    built: &Built,
) -> String {
    let quote = |s: &str| format!("{s:?}");
    let mut out = format!("# {}: valid\n[server]\n", src.path.display());
    let listen = file::listen(src, &file.server).unwrap_or_default();
    if !listen.is_empty() {
        let l: Vec<String> = listen
            .iter()
            .map(|l| match l.get_ref() {
                file::Listen::Tcp(host, port) => {
                    quote(&format!("{}:{port}", host.as_deref().unwrap_or("")))
                }
                file::Listen::Unix(p) => quote(&p.display().to_string()),
                file::Listen::Vsock(port) => quote(&format!("vsock:{port}")),
            })
            .collect();
        out += &format!("listen = [{}]\n", l.join(", "));
    }
    if let Some(d) = &built.default {
        out += &format!("default-export = {}\n", quote(d));
    }
    let tls = match tls {
        TlsMode::Off => "off",
        TlsMode::On => "on",
        TlsMode::Require => "require",
    };
    out += &format!("tls = {}\n", quote(tls));
    let shown: Vec<String> = args.iter().map(|a| quote(a)).collect();
    out += &format!("arguments = [{}]\n", shown.join(", "));
    let params = |p: &file::Params| -> String {
        let items: Vec<String> = p
            .iter()
            .map(|(k, v)| {
                let v = if is_secret(k.get_ref()) {
                    quote("(secret)")
                } else {
                    let texts = v.get_ref().texts();
                    quote(&texts.join(","))
                };
                format!("{} = {v}", quote(k.get_ref()))
            })
            .collect();
        format!("{{ {} }}", items.join(", "))
    };
    for (decl, e) in &built.exports {
        out += &format!("\n[[export]]\nname = {}\n", quote(&e.name));
        if let Some(d) = &e.chain.description {
            out += &format!("description = {}\n", quote(d));
        }
        out += &format!("plugin = {}\n", quote(decl.plugin.get_ref()));
        out += &format!("layer = {}\n", quote(&e.chain.name));
        if !decl.params.is_empty() {
            out += &format!("params = {}\n", params(&decl.params));
        }
        out += &format!("readonly = {}\n", e.chain.policy.readonly);
        out += &format!("tls = {}\n", e.access.tls);
        if !e.access.psk_users.is_empty() {
            let u: Vec<String> = e.access.psk_users.iter().map(|u| quote(u)).collect();
            out += &format!("allow-psk = [{}]\n", u.join(", "));
        }
        if !e.access.dns.is_empty() {
            let d: Vec<String> = e.access.dns.iter().map(|d| quote(d)).collect();
            out += &format!("allow-dn = [{}]\n", d.join(", "));
        }
        for f in &decl.filters {
            out += &format!(
                "[[export.filters]]\nfilter = {}\nparams = {}\n",
                quote(f.filter.get_ref()),
                params(&f.params)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_names_are_masked() {
        for k in [
            "passphrase",
            "password",
            "key-file",
            "api_token",
            "secret",
            "psk",
        ] {
            assert!(is_secret(k), "{k}");
        }
        for k in ["file", "size", "offset", "dir"] {
            assert!(!is_secret(k), "{k}");
        }
    }
}
