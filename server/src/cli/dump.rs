//! What nbdhost prints about itself instead of serving: `--dump-config`
//! and `--dump-plugin` (one `key=value` per line as nbdkit prints them),
//! `--help`, `--version` and the option lists.
//!
//! Each function returns its text and [`print`] writes it, so that a
//! reader that goes away (`nbdhost --help | head`) ends the output
//! instead of panicking the process.

use std::fmt::Write as _;
use std::io::Write as _;

use clap::CommandFactory;

use super::args::Cli;
use crate::layers::{chain, LayerInfo};
use crate::paths;
use crate::protocol::export::MAX_PAYLOAD;
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
    Cli::command().render_help().to_string()
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
    let cmd = Cli::command();
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
