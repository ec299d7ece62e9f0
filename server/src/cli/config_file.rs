//! `--config FILE`: the command line's side of a configuration file. The
//! file's `[server]` options go in front of the command line's own
//! arguments (so that those override them), its exports are built into
//! the table the loops serve, and SIGHUP builds them again.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches};

use super::args::Cli;
use super::run::Address;
use super::{dump, family, launch, listeners, logging, Rebuild};
use crate::config::{self, file, Built, Context};
use crate::layers::host::debug_flags::set_debug_flags;
use crate::layers::host::stdio::set_stdio_safe;
use crate::protocol::export::ExportPolicy;
use crate::protocol::handshake::TlsMode;
use crate::runtime::exports::{Export, Table};
use crate::runtime::listen::{self, Listener, PrivateSocket};

/// A parsed configuration file and the arguments its `[server]` gives.
pub struct Loaded {
    source: file::Source,
    file: file::File,
    args: Vec<String>,
}

/// The command line with the file's server options in front of it.
pub fn command_line(argv: &[OsString], path: &Path) -> Result<(Cli, Loaded), String> {
    let source = file::Source::read(path).map_err(|e| e.to_string())?;
    let parsed = source.parse().map_err(|e| e.to_string())?;
    let cmd = Cli::command();
    let args = config::server_args(&source, &parsed.server, &cmd).map_err(|e| e.to_string())?;
    let full: Vec<OsString> = argv
        .iter()
        .take(1)
        .cloned()
        .chain(args.iter().map(OsString::from))
        .chain(argv.iter().skip(1).cloned())
        .collect();
    let matches = cmd.try_get_matches_from(full).unwrap_or_else(|e| e.exit());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok((
        cli,
        Loaded {
            source,
            file: parsed,
            args,
        },
    ))
}

fn context(cli: &Cli) -> Context {
    let tls_setting = cli.tls_setting();
    Context {
        // tls = on or require alone uses the default certificate directory.
        has_credentials: cli.tls_psk.is_some()
            || cli.tls_certificates.is_some()
            || matches!(tls_setting, Some(TlsMode::On | TlsMode::Require)),
        psk: cli.tls_psk.is_some(),
        verify_peer: cli.tls_verify_peer,
        reloading: false,
        tls_setting,
        policy: ExportPolicy {
            readonly: cli.readonly,
            no_multi_conn: cli.no_mc,
        },
    }
}

fn table(built: &Built) -> Table {
    Table::Named {
        exports: built.exports.iter().map(|(_, e)| e.clone()).collect(),
        default: built.default.clone(),
    }
}

/// Serve the file's exports.
pub fn serve(
    cli: Cli,
    loaded: Loaded,
    explicit_log: Option<logging::Destination>,
) -> Result<i32, String> {
    let Loaded { source, file, args } = loaded;
    set_debug_flags(cli.debug_flags()?);
    set_stdio_safe(!cli.single);
    let ctx = context(&cli);
    let built = config::build(&source, &file, &ctx, &[]).map_err(|e| e.to_string())?;
    set_stdio_safe(false);
    let tls_mode = built.tls_mode(&ctx);
    if cli.check {
        let user: Vec<String> = std::env::args().skip(1).collect();
        let all: Vec<String> = args.iter().cloned().chain(user).collect();
        dump::print(&config::describe(&source, &file, &all, tls_mode, &built));
        return Ok(0);
    }
    log::info!(
        "{}: {} export(s){}",
        source.path.display(),
        built.exports.len(),
        built
            .default
            .as_ref()
            .map_or(String::new(), |d| format!(", default '{d}'"))
    );
    let mut private = None;
    let (listeners, address, sockets) = bind(&cli, &source, &file, &mut private)?;
    let initial = table(&built);
    let rebuild = rebuilder(source.path.clone(), file.server.clone(), ctx, built.exports);
    let code = launch(
        &cli,
        explicit_log,
        initial,
        tls_mode,
        Some(rebuild),
        (listeners, address),
        private,
    );
    for p in sockets {
        let _ = std::fs::remove_file(p);
    }
    code
}

/// What SIGHUP runs: read the file again and build what changed. Exports
/// whose table is unchanged keep their chains; new and changed ones are
/// loaded, configured and started as at start-up.
fn rebuilder(
    path: std::path::PathBuf,
    server: file::Server,
    mut ctx: Context,
    mut current: Vec<(file::Export, Arc<Export>)>,
) -> Rebuild {
    ctx.reloading = true;
    let fixed = |s: &file::Server| {
        let mut s = s.clone();
        s.remove(file::DEFAULT_EXPORT);
        s
    };
    let server = fixed(&server);
    Box::new(move || {
        let source = file::Source::read(&path).map_err(|e| e.to_string())?;
        let parsed = source.parse().map_err(|e| e.to_string())?;
        if fixed(&parsed.server) != server {
            log::warn!(
                "{}: changes to [server] take effect when the server is restarted",
                path.display()
            );
        }
        let built = config::build(&source, &parsed, &ctx, &current).map_err(|e| e.to_string())?;
        for (_, e) in &built.exports {
            if !current.iter().any(|(_, c)| Arc::ptr_eq(c, e)) {
                e.chain
                    .backend
                    .after_fork()
                    .map_err(|err| format!("export '{}': {err}", e.name))?;
            }
        }
        let mode = built.tls_mode(&ctx);
        let table = table(&built);
        log::info!(
            "{}: {} export(s) after the reload",
            path.display(),
            built.exports.len()
        );
        current = built.exports;
        Ok((table, mode))
    })
}

/// The listeners: the command line's, if it names any; else the file's
/// `listen` addresses, beside any passed by socket activation; else the
/// command line's defaults. Also the Unix sockets to remove at exit.
fn bind(
    cli: &Cli,
    source: &file::Source,
    file: &file::File,
    private: &mut Option<PrivateSocket>,
) -> Result<(Vec<Listener>, Address, Vec<std::path::PathBuf>), String> {
    let named =
        cli.single || cli.unix.is_some() || cli.port.is_some() || cli.ipaddr.is_some() || cli.vsock;
    let wanted = file::listen(source, &file.server).map_err(|e| e.to_string())?;
    if named || wanted.is_empty() {
        let (l, a) = listeners(cli, private)?;
        return Ok((l, a, Vec::new()));
    }
    let mut out = match listen::socket_activation() {
        Some(activated) => activated?,
        None => Vec::new(),
    };
    let (mut address, mut sockets) = (None, Vec::new());
    for l in &wanted {
        let at = |e: String| source.error(Some(l.span()), e).to_string();
        let (bound, addr) = match l.get_ref() {
            file::Listen::Unix(p) => {
                sockets.push(p.clone());
                (vec![listen::unix(p).map_err(at)?], Address::Unix(p.clone()))
            }
            file::Listen::Vsock(port) => (
                vec![listen::vsock(*port).map_err(at)?],
                Address::Vsock(*port),
            ),
            file::Listen::Tcp(host, port) => (
                listen::tcp(host.as_deref(), *port, family(cli)).map_err(at)?,
                Address::Tcp(*port),
            ),
        };
        out.extend(bound);
        address.get_or_insert(addr);
    }
    Ok((out, address.unwrap_or(Address::Activated), sockets))
}
