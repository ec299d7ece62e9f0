//! What nbdhost prints about itself instead of serving: `--dump-config`
//! and `--dump-plugin` (one `key=value` per line as nbdkit prints them),
//! `--help`, `--version`, the option lists, and `--check`'s account of a
//! configuration file.
//!
//! Each function returns its text and [`print`] writes it, so that a
//! reader that goes away (`nbdhost --help | head`) ends the output
//! instead of panicking the process.

use std::fmt::Write as _;
use std::io::Write as _;

use clap::CommandFactory;

use crate::config::command_line::CommandLine;
use crate::config::file::{self, ConfigFile};
use crate::layers::{chain, LayerInfo};
use crate::paths;
use crate::protocol::export::MAX_PAYLOAD;
use crate::protocol::handshake::TlsMode;
use crate::serving::build::FileExports;
use crate::tls::ROOT_CERT_DIR;
use nbdhost_plugin_api::abi;

/// Write `text` to stdout and flush it; a closed stdout is not an error
/// worth reporting here.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `--help`: the server's options.
pub fn usage() -> String {
    CommandLine::command().render_help().to_string()
}

/// `--help` with a plugin: one layer's name, path and parameters, in
/// nbdkit's layout.
pub fn layer_help(i: &LayerInfo) -> String {
    let mut s = format!("{}: {}", i.kind, i.name);
    if !i.description.is_empty() {
        let _ = write!(s, " ({})", i.description);
    }
    let _ = writeln!(s, "\n({})", i.path.display());
    if !i.config_help.is_empty() {
        let _ = writeln!(s, "{}", i.config_help.trim_end_matches('\n'));
    }
    s
}

/// `--version`: the server's.
pub fn version() -> String {
    format!("nbdhost {}\n", env!("CARGO_PKG_VERSION"))
}

/// `--short-options` / `--long-options`: every option, one per line, for
/// shell completion.
pub fn options(long: bool) -> String {
    let cmd = CommandLine::command();
    let mut names: Vec<String> = cmd
        .get_arguments()
        .flat_map(|a| -> Vec<String> {
            if long {
                a.get_long_and_visible_aliases()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|l| format!("--{l}\n"))
                    .collect()
            } else {
                a.get_short_and_visible_aliases()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| format!("-{c}\n"))
                    .collect()
            }
        })
        .collect();
    names.sort();
    names.concat()
}

/// `--dump-config`: build and path settings, with the keys nbdkit prints
/// wherever they mean the same here (scripts read `tls`, `version_major`,
/// `plugindir`, …), and nbdhost's own (`abi_version`, `max_payload`).
pub fn config() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let mut parts = version.split('.');
    let mut next = || parts.next().unwrap_or("0").to_owned();
    let (major, minor) = (next(), next());
    let dirs = |kind| {
        chain::layer_dirs(kind)
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    let binary = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let lines = [
        (
            "abi_version",
            format!("{}.{}", abi::ABI_MAJOR, abi::ABI_MINOR),
        ),
        ("binary", binary),
        ("bindir", paths::bindir()),
        ("exit_with_parent", "yes".into()),
        ("filterdir", dirs("filter")),
        ("host_cpu", std::env::consts::ARCH.into()),
        ("host_os", std::env::consts::OS.into()),
        ("libdir", paths::libdir()),
        ("mandir", paths::mandir()),
        // The nbdkit plugin API the adapter speaks.
        ("max_api_version", "2".into()),
        ("max_payload", MAX_PAYLOAD.to_string()),
        ("name", "nbdhost".into()),
        ("plugindir", dirs("plugin")),
        ("root_tls_certificates_dir", ROOT_CERT_DIR.into()),
        ("run_default_socket", "Unix".into()),
        ("sbindir", paths::sbindir()),
        ("selinux", "no".into()),
        ("soext", "so".into()),
        ("sysconfdir", paths::sysconfdir()),
        ("timeout_option", "yes".into()),
        ("tls", "yes".into()),
        ("version", version.into()),
        ("version_major", major),
        ("version_minor", minor),
        ("vsock_option", "yes".into()),
        ("zstd", "no".into()),
    ];
    lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// `--dump-plugin`: one layer's facts.
pub fn layer(i: &LayerInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "path={}", i.path.display());
    let _ = writeln!(s, "name={}", i.name);
    let _ = writeln!(s, "version={}", i.version);
    let _ = writeln!(s, "description={}", i.description);
    let _ = writeln!(
        s,
        "abi_version={}.{}",
        i.abi_version >> 16,
        i.abi_version & 0xffff
    );
    let _ = writeln!(s, "struct_size={}", i.struct_size);
    let _ = writeln!(s, "thread_model={}", thread_model_name(i.thread_model));
    if let Some(k) = &i.magic_config_key {
        let _ = writeln!(s, "magic_config_key={k}");
    }
    if !i.config_help.is_empty() {
        let _ = writeln!(s, "config_help=\n{}", i.config_help);
    }
    s
}

fn thread_model_name(m: nbdhost_plugin_api::ThreadModel) -> &'static str {
    use nbdhost_plugin_api::ThreadModel::*;
    match m {
        SerializeConnections => "serialize_connections",
        SerializeAllRequests => "serialize_all_requests",
        SerializeRequests => "serialize_requests",
        Parallel => "parallel",
    }
}

pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["pass", "secret", "key", "token", "cred", "psk", "cookie"]
        .iter()
        .any(|w| k.contains(w))
}

/// `--check`: the resolved configuration of `config`, whose exports are
/// `built`: the server arguments the file gives and the command line adds
/// (`args`), the effective TLS policy, and each export with its layers
/// found and secrets masked.
pub fn check(config: &ConfigFile, args: &[String], built: &FileExports) -> String {
    let (src, file) = (&config.source, &config.file);
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
    let tls = match built.tls_mode() {
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
        out += &format!("\n[[export]]\nname = {}\n", quote(decl.name.get_ref()));
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
