//! nbdhost: a Network Block Device server whose disks come from plugins.

mod backend;
mod cli;
mod connection;
mod export;
mod filter;
mod handshake;
mod host;
mod listen;
mod logging;
mod plugin;
mod process;
mod server;
mod tls;
mod transmission;
mod wire;
mod workers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::backend::Backend;
use crate::cli::Cli;
use crate::export::ExportPolicy;
use crate::handshake::HandshakeConfig;
use crate::listen::{Listener, PrivateSocket};
use crate::server::Exit;

const DEFAULT_PORT: u16 = 10809;

fn main() {
    let cli = Cli::parse();
    let explicit_log = match cli
        .log
        .as_deref()
        .map(logging::Destination::parse)
        .transpose()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("nbdhost: error: {e}");
            std::process::exit(1);
        }
    };
    logging::init(
        cli.verbose,
        explicit_log.unwrap_or(logging::Destination::Stderr),
    );
    match run(cli, explicit_log) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            log::error!("{e}");
            std::process::exit(1);
        }
    }
}

/// Directories searched for plugins (`kind` = "plugin") or filters given
/// by short name: `$NBDHOST_PLUGINDIR` or `$NBDHOST_FILTERDIR` if set,
/// otherwise beside the executable, then the installed locations.
fn layer_dirs(kind: &str) -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os(format!("NBDHOST_{}DIR", kind.to_uppercase())) {
        return std::env::split_paths(&d).collect();
    }
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.clone());
        dirs.push(exe_dir.join(format!("../lib/nbdhost/{kind}s")));
    }
    dirs.push(PathBuf::from(format!("/usr/lib/nbdhost/{kind}s")));
    dirs
}

/// A path is used as is; a short name is looked up as `lib<name><kind>.so`.
fn resolve_layer(arg: &str, kind: &str) -> Result<PathBuf, String> {
    if arg.contains('/') || arg.ends_with(".so") {
        return Ok(PathBuf::from(arg));
    }
    if !arg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!("'{arg}' is neither a {kind} name nor a path"));
    }
    let file = format!("lib{arg}{kind}.so");
    let dirs = layer_dirs(kind);
    dirs.iter()
        .map(|d| d.join(&file))
        .find(|p| p.exists())
        .ok_or_else(|| {
            let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            format!(
                "{kind} '{arg}' not found ({file} is not in {}); set NBDHOST_{}DIR or give a path",
                searched.join(", "),
                kind.to_uppercase()
            )
        })
}

fn dump_config() {
    println!(
        "binary={}",
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    println!("version={}", env!("CARGO_PKG_VERSION"));
    println!(
        "abi_version={}.{}",
        nbdhost_plugin_api::abi::ABI_MAJOR,
        nbdhost_plugin_api::abi::ABI_MINOR
    );
    for kind in ["plugin", "filter"] {
        let dirs: Vec<String> = layer_dirs(kind)
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        println!("{kind}dir={}", dirs.join(":"));
    }
    println!("host_cpu={}", std::env::consts::ARCH);
    println!("host_os={}", std::env::consts::OS);
    println!("max_payload={}", export::MAX_PAYLOAD);
}

fn dump_layer(i: &plugin::LayerInfo) {
    println!("path={}", i.path.display());
    println!("name={}", i.name);
    println!("version={}", i.version);
    println!("description={}", i.description);
    println!(
        "abi_version={}.{}",
        i.abi_version >> 16,
        i.abi_version & 0xffff
    );
    println!("struct_size={}", i.struct_size);
    println!("thread_model={}", thread_model_name(i.thread_model));
    if let Some(k) = &i.magic_config_key {
        println!("magic_config_key={k}");
    }
    if !i.config_help.is_empty() {
        println!("config_help=");
        println!("{}", i.config_help);
    }
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

/// Where clients reach us, for `--run` and the log.
enum Address {
    Unix(PathBuf),
    Tcp(u16),
    /// Listeners passed in by systemd socket activation.
    Activated,
    /// `-s`: stdin and stdout.
    Stdio,
}

fn run(cli: Cli, explicit_log: Option<logging::Destination>) -> Result<i32, String> {
    if cli.dump_config {
        dump_config();
        return Ok(0);
    }
    host::set_debug_flags(cli.debug_flags()?);
    let plugin_arg = cli.plugin.clone().ok_or("no plugin given")?;
    let plugin = plugin::Plugin::load(&resolve_layer(&plugin_arg, "plugin")?)?;
    let filters = cli
        .filters
        .iter()
        .map(|f| filter::LoadedFilter::load(&resolve_layer(f, "filter")?))
        .collect::<Result<Vec<_>, String>>()?;
    if cli.dump_plugin {
        dump_layer(plugin.info());
        for f in &filters {
            println!();
            println!("filter:");
            dump_layer(f.info());
        }
        return Ok(0);
    }
    let backend = configure(plugin, filters, &cli.params)?;

    let mut private = None;
    let (listeners, address) = listeners(&cli, &mut private)?;
    for l in &listeners {
        log::info!("listening on {}", l.describe());
    }
    // Socket activation implies the foreground: the activating process
    // (systemd, libnbd) tracks and signals the pid it started.
    let activated = matches!(address, Address::Activated);
    let foreground = cli.foreground || cli.single || cli.run.is_some() || activated;
    if !foreground {
        process::daemonize()?;
        logging::set_destination(explicit_log.unwrap_or(logging::Destination::Syslog));
    }
    if cli.exit_with_parent {
        process::exit_with_parent()?;
    }
    if let Some(p) = &cli.pidfile {
        process::write_pidfile(p)?;
    }
    let child = match &cli.run {
        Some(cmd) => Some(spawn_run(
            cmd,
            &address,
            cli.exportname.as_deref().unwrap_or(""),
        )?),
        None => None,
    };
    let tls_mode = cli.tls_mode();
    let tls = if tls_mode == handshake::TlsMode::Off {
        None
    } else {
        let opts = tls::TlsOptions {
            psk_file: cli.tls_psk.clone(),
            cert_dir: cli.tls_certificates.clone(),
            verify_peer: cli.tls_verify_peer,
            priority: cli.tls_priority.clone(),
        };
        Some(Arc::new(tls::TlsConfig::load(&opts)?))
    };
    let opts = server::Options {
        threads: cli.threads,
        handshake_timeout: (cli.handshake_timeout > 0)
            .then(|| Duration::from_secs(cli.handshake_timeout)),
        policy: ExportPolicy {
            readonly: cli.readonly,
            no_multi_conn: cli.no_mc,
        },
        handshake: HandshakeConfig {
            oldstyle: cli.oldstyle,
            handshake_mask: cli.mask_handshake,
            no_structured: cli.no_sr,
            tls: tls_mode,
        },
        stdio: cli.single,
        tls,
    };
    let exit =
        server::serve(backend, listeners, opts, child).map_err(|e| format!("event loop: {e}"))?;
    if let (Address::Unix(p), None) = (&address, &private) {
        let _ = std::fs::remove_file(p);
    }
    drop(private);
    if let Some(p) = &cli.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(match exit {
        Exit::Normal => 0,
        Exit::Child(code) => code,
    })
}

/// Pass parameters down the stack (each filter, nearest the client first,
/// takes the keys it knows; the plugin gets the rest), finish
/// configuration, and stack the filters on the plugin.
fn configure(
    plugin: plugin::Plugin,
    filters: Vec<filter::LoadedFilter>,
    params: &[String],
) -> Result<Arc<dyn Backend>, String> {
    let name = plugin.info().name.clone();
    for (k, v) in cli::plugin_params(params, plugin.info().magic_config_key.as_deref())? {
        let mut taken = false;
        for f in &filters {
            if f.config(&k, &v)
                .map_err(|e| format!("{}: {e}", f.info().name))?
            {
                taken = true;
                break;
            }
        }
        if !taken {
            plugin.config(&k, &v).map_err(|e| format!("{name}: {e}"))?;
        }
    }
    for f in &filters {
        f.config_complete()
            .map_err(|e| format!("{}: {e}", f.info().name))?;
    }
    plugin
        .config_complete()
        .map_err(|e| format!("{name}: {e}"))?;
    plugin.get_ready().map_err(|e| format!("{name}: {e}"))?;
    for f in &filters {
        f.get_ready()
            .map_err(|e| format!("{}: {e}", f.info().name))?;
    }
    let mut backend: Arc<dyn Backend> = Arc::new(plugin);
    for f in filters.into_iter().rev() {
        let name = f.info().name.clone();
        backend = f.stack(backend).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(backend)
}

fn listeners(
    cli: &Cli,
    private: &mut Option<PrivateSocket>,
) -> Result<(Vec<Listener>, Address), String> {
    if cli.single {
        return Ok((Vec::new(), Address::Stdio));
    }
    if let Some(activated) = listen::socket_activation() {
        return Ok((activated?, Address::Activated));
    }
    let want_private = cli.unix.as_deref() == Some(Path::new("-"))
        || (cli.unix.is_none() && cli.run.is_some() && cli.port.is_none() && cli.ipaddr.is_none());
    if want_private {
        let p = PrivateSocket::new()?;
        let l = listen::unix(&p.path)?;
        let path = p.path.clone();
        *private = Some(p);
        return Ok((vec![l], Address::Unix(path)));
    }
    if let Some(path) = &cli.unix {
        return Ok((vec![listen::unix(path)?], Address::Unix(path.clone())));
    }
    let port = cli.port.unwrap_or(DEFAULT_PORT);
    Ok((
        listen::tcp(cli.ipaddr.as_deref(), port)?,
        Address::Tcp(port),
    ))
}

/// Start the `--run` command with the connection details in its
/// environment, as nbdkit does.
fn spawn_run(cmd: &str, address: &Address, export: &str) -> Result<std::process::Child, String> {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    let enc = percent_encode(export);
    match address {
        Address::Unix(p) => {
            let p = p.display().to_string();
            c.env(
                "uri",
                format!("nbd+unix:///{enc}?socket={}", percent_encode(&p)),
            );
            c.env("nbd", format!("nbd:unix:{p}"));
            c.env("unixsocket", &p);
            c.env("port", "");
        }
        Address::Tcp(port) => {
            c.env("uri", format!("nbd://localhost:{port}/{enc}"));
            c.env("nbd", format!("nbd:localhost:{port}"));
            c.env("unixsocket", "");
            c.env("port", port.to_string());
        }
        Address::Activated | Address::Stdio => {}
    }
    c.env("exportname", export);
    c.spawn()
        .map_err(|e| format!("--run: cannot start /bin/sh: {e}"))
}

/// Percent-encode everything but unreserved URI characters and '/'.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
