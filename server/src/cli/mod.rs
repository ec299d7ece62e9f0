//! The command line: parse it, set up logging, build the chain, bind the
//! listeners, go to the background if asked, and serve.

mod args;
mod config_file;
mod dump;
mod logging;
mod process;
mod run;

use std::path::Path;
use std::sync::Arc;

use clap::Parser;

use crate::layers::chain::Layers;
use crate::layers::foreign;
use crate::layers::host::debug_flags::set_debug_flags;
use crate::layers::host::stdio::set_stdio_safe;
use crate::protocol::export::ExportPolicy;
use crate::protocol::handshake::{HandshakeConfig, TlsMode};
use crate::runtime::exports::{Chain, Table};
use crate::runtime::listen::{self, Listener, PrivateSocket};
use crate::runtime::{self, Exit};
use crate::session::{self, Limits, TlsFactory};
use crate::tls;
use args::Cli;
use run::Address;

const DEFAULT_PORT: u16 = 10809;

/// Run nbdhost with the process's arguments; returns the exit status.
pub fn main() -> i32 {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = Cli::parse_from(&argv);
    let (cli, file) = match cli.config.clone() {
        None => (cli, None),
        Some(path) => match config_file::command_line(&argv, &path) {
            Ok((cli, loaded)) => (cli, Some(loaded)),
            Err(e) => {
                eprintln!("nbdhost: error: {e}");
                return 1;
            }
        },
    };
    let explicit_log = match cli
        .log
        .as_deref()
        .map(logging::Destination::parse)
        .transpose()
    {
        Ok(d) => d.flatten(),
        Err(e) => {
            eprintln!("nbdhost: error: {e}");
            return 1;
        }
    };
    logging::init(
        cli.verbose,
        explicit_log.unwrap_or(logging::Destination::Stderr),
    );
    let served = match file {
        Some(loaded) if !cli.dump_config => config_file::serve(cli, loaded, explicit_log),
        _ => serve(cli, explicit_log),
    };
    match served {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e}");
            1
        }
    }
}

fn serve(cli: Cli, explicit_log: Option<logging::Destination>) -> Result<i32, String> {
    if cli.dump_config {
        dump::print(&dump::config());
        return Ok(0);
    }
    if cli.short_options || cli.long_options {
        dump::print(&dump::options(cli.long_options));
        return Ok(0);
    }
    set_debug_flags(cli.debug_flags()?);
    set_stdio_safe(!cli.single);
    let Some(plugin) = cli.plugin.clone() else {
        // clap demands a plugin unless one of these was given.
        dump::print(&if cli.help {
            dump::usage()
        } else {
            dump::version()
        });
        return Ok(0);
    };
    let mut params = cli.params.clone();
    let layers = match Layers::load(&plugin, &cli.filters) {
        Ok(l) => l,
        // nbdkit runs a script plugin installed under a short name with
        // its language plugin; so does nbdhost.
        Err(e) => match foreign::script(&plugin) {
            Some((language, script)) => {
                log::debug!("{plugin} is the {language} script {}", script.display());
                params.insert(0, script.display().to_string());
                Layers::load(&language, &cli.filters)?
            }
            None => return Err(e),
        },
    };
    // As nbdkit: loaded, so that a missing layer is an error, but not
    // configured.
    if cli.help {
        let mut text = dump::usage();
        for i in layers.filter_infos().chain([layers.plugin_info()]) {
            text.push('\n');
            text.push_str(&dump::layer_help(i));
        }
        dump::print(&text);
        return Ok(0);
    }
    if cli.version {
        let mut text = dump::version();
        for i in layers.filter_infos().chain([layers.plugin_info()]) {
            text.push_str(&format!("{} {}\n", i.name, i.version));
        }
        dump::print(&text);
        return Ok(0);
    }
    let magic = layers.plugin_info().magic_config_key.clone();
    // Before --dump-plugin too, as nbdkit does: a language plugin only
    // knows what it can say once its script is loaded.
    layers.config(args::plugin_params(&params, magic.as_deref())?)?;
    if cli.dump_plugin {
        // The plugin's own lines follow ours on the same stdout.
        dump::print(&dump::layer(layers.plugin_info()));
        layers.dump_plugin();
        for f in layers.filter_infos() {
            dump::print(&format!("\nfilter:\n{}", dump::layer(f)));
        }
        return Ok(0);
    }
    let backend = layers.configure()?;
    // nbdkit's rule: stdin and stdout are the plugin's only while it is
    // being configured.
    set_stdio_safe(false);

    let tls_mode = cli.tls_mode();
    let policy = ExportPolicy {
        readonly: cli.readonly,
        no_multi_conn: cli.no_mc,
    };
    let table = Table::Single(Arc::new(Chain::new(backend, policy)));
    let mut private = None;
    let bound = listeners(&cli, &mut private)?;
    launch(&cli, explicit_log, table, tls_mode, None, bound, private)
}

/// The session settings of these options, with TLS policy `tls_mode` and
/// the loaded credentials `tls`.
fn session_config(
    cli: &Cli,
    tls_mode: TlsMode,
    tls: Option<Arc<dyn TlsFactory>>,
) -> session::Config {
    session::Config {
        handshake: HandshakeConfig {
            oldstyle: cli.oldstyle,
            handshake_mask: cli.mask_handshake,
            no_structured: cli.no_sr,
            tls: tls_mode,
        },
        tls,
        limits: Limits::default(),
        handshake_timeout: cli.handshake_limit(),
    }
}

/// Rebuilds the exports and their TLS policy on SIGHUP.
type Rebuild = Box<dyn FnMut() -> Result<(Table, TlsMode), String> + Send>;

/// The TLS credentials the settings name, loaded; `None` when TLS is off.
fn tls_credentials(cli: &Cli, tls_mode: TlsMode) -> Result<Option<Arc<dyn TlsFactory>>, String> {
    if cli.oldstyle && tls_mode == TlsMode::Require {
        // Oldstyle has no STARTTLS: every byte would go in clear.
        return Err(
            "the oldstyle protocol (-o) cannot do TLS, which these settings require".into(),
        );
    }
    if tls_mode == TlsMode::Off {
        return Ok(None);
    }
    let opts = tls::TlsOptions {
        psk_file: cli.tls_psk.clone(),
        cert_dir: cli.tls_certificates.clone(),
        verify_peer: cli.tls_verify_peer,
        priority: cli.tls_priority.clone(),
    };
    Ok(Some(Arc::new(tls::TlsConfig::load(&opts)?)))
}

/// Serve `table` on the bound listeners: print the URI, change user, go
/// to the background, start the `--run` command, and serve until the end;
/// `reload` rebuilds what is served on SIGHUP.
fn launch(
    cli: &Cli,
    explicit_log: Option<logging::Destination>,
    table: Table,
    tls_mode: TlsMode,
    reload: Option<Rebuild>,
    (listeners, address): (Vec<Listener>, Address),
    private: Option<PrivateSocket>,
) -> Result<i32, String> {
    let tls = tls_credentials(cli, tls_mode)?;
    for l in &listeners {
        log::info!("listening on {}", l.describe());
        if cli.keepalive {
            l.set_keepalive()
                .map_err(|e| format!("--keepalive on {}: {e}", l.describe()))?;
        }
    }
    let run_tls = run::Tls {
        mode: tls_mode,
        certificates: cli.tls_certificates.as_deref(),
        psk: cli.tls_psk.as_deref(),
    };
    if cli.print_uri {
        // Before going to the background, so the caller reads it.
        if let Some(uri) = run::uri(&address, cli.exportname.as_deref().unwrap_or(""), &run_tls) {
            dump::print(&format!("{uri}\n"));
        }
    }
    if cli.user.is_some() || cli.group.is_some() {
        process::change_user(cli.user.as_deref(), cli.group.as_deref())?;
    }
    // Socket activation implies the foreground: the activating process
    // (systemd, libnbd) tracks and signals the pid it started.
    let activated = matches!(address, Address::Activated);
    let foreground = cli.foreground || cli.single || cli.run.is_some() || activated;
    if !foreground {
        process::daemonize()?;
        logging::set_destination(explicit_log.unwrap_or(logging::Destination::Syslog));
    }
    let signals = runtime::catch_signals().map_err(|e| format!("signals: {e}"))?;
    if cli.exit_with_parent {
        process::exit_with_parent()?;
    }
    if let Some(p) = &cli.pidfile {
        process::write_pidfile(p)?;
    }
    for chain in table.chains() {
        chain.backend.after_fork().map_err(|e| e.to_string())?;
    }
    // Once everything that can refuse to start has passed.
    let child = match &cli.run {
        Some(cmd) => Some(run::spawn(
            cmd,
            &address,
            cli.exportname.as_deref().unwrap_or(""),
            &run_tls,
        )?),
        None => None,
    };
    process::raise_fd_limit(cli.max_connections);
    let opts = runtime::Options {
        max_connections: cli.max_connections,
        loops: cli.loops(),
        threads: cli.threads,
        stdio: cli.single,
    };
    // A reload keeps these settings and credentials; only the TLS policy
    // follows the new exports.
    let base = session_config(cli, tls_mode, tls);
    let serving = runtime::Serving {
        table,
        session: Arc::new(base.clone()),
    };
    let reload = reload.map(|mut rebuild| {
        Box::new(move || {
            let (table, mode) = rebuild()?;
            let mut session = base.clone();
            session.handshake.tls = mode;
            Ok(runtime::Serving {
                table,
                session: Arc::new(session),
            })
        }) as runtime::Reload
    });
    let exit = runtime::serve(serving, reload, listeners, opts, signals, child)
        .map_err(|e| format!("event loop: {e}"))?;
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
        || (cli.unix.is_none()
            && cli.run.is_some()
            && cli.port.is_none()
            && cli.ipaddr.is_none()
            && !cli.vsock);
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
    if cli.vsock {
        let port = u32::from(port);
        return Ok((vec![listen::vsock(port)?], Address::Vsock(port)));
    }
    Ok((
        listen::tcp(cli.ipaddr.as_deref(), port, family(cli))?,
        Address::Tcp(port),
    ))
}

/// The IP families `-4` and `-6` leave.
fn family(cli: &Cli) -> listen::Family {
    if cli.ipv4_only {
        listen::Family::V4
    } else if cli.ipv6_only {
        listen::Family::V6
    } else {
        listen::Family::Any
    }
}
