//! Start-up: serve the built exports as the settings say, in order:
//!
//! 1. [`bind`] the listening sockets;
//! 2. [`read_credentials`]: load the TLS certificates and check the PSK
//!    file, while they are still readable;
//! 3. [`announce`] where the server listens (the log, `--print-uri`);
//! 4. [`drop_privileges`] (`-u`, `-g`);
//! 5. [`daemonize`], unless something keeps the server in the foreground;
//! 6. [`run`]: pid file, the layers' `after_fork`, the `--run` command,
//!    and the loops until the end; then clean up.
//!
//! What is served can be built again on SIGHUP: [`Served`] is the
//! runtime's [`Reload`], through [`Exports::reload`].

use std::path::PathBuf;
use std::sync::Arc;

use super::captive;
use super::error::CliError;
use super::logging;
use super::process;
use super::run::{self, Address};
use super::{dump, Settings};
use crate::config::{self, file};
use crate::protocol::handshake::{HandshakeConfig, TlsMode};
use crate::runtime::listen::{self, Family, ListenError, Listener, PrivateSocket};
use crate::runtime::{self, Clients, Exit, Reload, StopOn};
use crate::serving::build::{Exports, ReloadError};
use crate::serving::Serving;
use crate::session::{self, Limits, TlsFactory};
use crate::tls;

/// Serve `exports` as `settings` say, until the end; returns the exit
/// status.
pub fn start(
    settings: &Settings,
    exports: Exports,
    explicit_log: Option<logging::Destination>,
) -> Result<i32, CliError> {
    let bound = bind(settings)?;
    // A file's Unix sockets are removed however serving ends.
    let declared = bound.declared.clone();
    let code = serve(settings, exports, bound, explicit_log);
    for p in declared {
        let _ = std::fs::remove_file(p);
    }
    code
}

/// The steps after [`bind`].
fn serve(
    settings: &Settings,
    exports: Exports,
    bound: Bound,
    explicit_log: Option<logging::Destination>,
) -> Result<i32, CliError> {
    let tls = read_credentials(settings, exports.tls_mode())?;
    announce(settings, &bound, exports.tls_mode())?;
    drop_privileges(&settings.process)?;
    daemonize(settings, &bound, explicit_log)?;
    run(settings, bound, Served::new(settings, exports, tls))
}

/// The listening sockets and where clients reach them.
struct Bound {
    listeners: Vec<Listener>,
    address: Address,
    /// The private socket of `-U -` (or `--run` with no address), removed
    /// with its directory when dropped.
    private: Option<PrivateSocket>,
    /// The Unix sockets a file's `listen` made, removed at exit.
    declared: Vec<PathBuf>,
}

impl Bound {
    fn at(listeners: Vec<Listener>, address: Address) -> Bound {
        Bound {
            listeners,
            address,
            private: None,
            declared: Vec::new(),
        }
    }
}

/// Step 1: the listeners. Those the command line names, if it names any;
/// else a file's `listen` addresses, beside any passed by socket
/// activation; else socket activation's; else a private socket for
/// `--run`, or TCP port 10809.
fn bind(settings: &Settings) -> Result<Bound, CliError> {
    use config::Address as A;
    let family = match settings.listen.family {
        config::Family::Any => Family::Any,
        config::Family::V4 => Family::V4,
        config::Family::V6 => Family::V6,
    };
    let address = &settings.listen.address;
    if let (A::Unnamed, config::Exports::File(f)) = (address, &settings.exports) {
        let wanted = file::listen(&f.source, &f.file.server)?;
        if !wanted.is_empty() {
            return bind_declared(&f.source, &wanted, family);
        }
    }
    if settings.stdio() {
        return Ok(Bound::at(Vec::new(), Address::Stdio));
    }
    if let Some(activated) = listen::socket_activation() {
        return Ok(Bound::at(activated?, Address::Activated));
    }
    let private = match address {
        A::PrivateUnix => true,
        A::Unnamed => settings.announce.run.is_some(),
        _ => false,
    };
    if private {
        let p = PrivateSocket::new()?;
        let l = listen::unix(&p.path)?;
        // The `--run` command runs as the -u user: it must reach the socket.
        if let Some(user) = &settings.process.user {
            let uid = process::uid_of(user)?;
            p.dir
                .give_to(uid)
                .map_err(|source| CliError::PrivateSocket {
                    path: p.path.clone(),
                    source,
                })?;
        }
        let path = p.path.clone();
        return Ok(Bound {
            private: Some(p),
            ..Bound::at(vec![l], Address::Unix(path))
        });
    }
    Ok(match address {
        A::Unix(path) => Bound::at(vec![listen::unix(path)?], Address::Unix(path.clone())),
        A::Vsock(port) => Bound::at(vec![listen::vsock(*port)?], Address::Vsock(*port)),
        A::Tcp { ipaddr, port } => Bound::at(
            listen::tcp(ipaddr.as_deref(), *port, family)?,
            Address::Tcp(*port),
        ),
        // (-s and -U - are served above.)
        A::Unnamed | A::PrivateUnix | A::Stdio => Bound::at(
            listen::tcp(None, config::DEFAULT_PORT, family)?,
            Address::Tcp(config::DEFAULT_PORT),
        ),
    })
}

/// A file's `listen` addresses, after any sockets passed by socket
/// activation; a failure names the address's place in the file.
fn bind_declared(
    source: &file::Source,
    wanted: &[toml::Spanned<file::Listen>],
    family: Family,
) -> Result<Bound, CliError> {
    let mut listeners = match listen::socket_activation() {
        Some(activated) => activated?,
        None => Vec::new(),
    };
    let (mut address, mut declared) = (None, Vec::new());
    for l in wanted {
        let at = |e: ListenError| source.error(Some(l.span()), e);
        let (bound, addr) = match l.get_ref() {
            file::Listen::Unix(p) => {
                declared.push(p.clone());
                (vec![listen::unix(p).map_err(at)?], Address::Unix(p.clone()))
            }
            file::Listen::Vsock(port) => (
                vec![listen::vsock(*port).map_err(at)?],
                Address::Vsock(*port),
            ),
            file::Listen::Tcp(host, port) => (
                listen::tcp(host.as_deref(), *port, family).map_err(at)?,
                Address::Tcp(*port),
            ),
        };
        listeners.extend(bound);
        address.get_or_insert(addr);
    }
    Ok(Bound {
        declared,
        ..Bound::at(listeners, address.unwrap_or(Address::Activated))
    })
}

/// Step 2: the TLS credentials for the policy `mode`, loaded (the
/// certificates) and checked (the PSK file, read again for every PSK
/// handshake); `None` when TLS is off.
fn read_credentials(
    settings: &Settings,
    mode: TlsMode,
) -> Result<Option<Arc<dyn TlsFactory>>, CliError> {
    if settings.protocol.oldstyle && mode == TlsMode::Require {
        // Oldstyle has no STARTTLS: every byte would go in clear.
        return Err(CliError::OldstyleTls);
    }
    if mode == TlsMode::Off {
        return Ok(None);
    }
    let t = &settings.tls;
    let opts = tls::TlsOptions {
        psk_file: t.psk.clone(),
        cert_dir: t.certificates.clone(),
        verify_peer: t.verify_peer,
        priority: t.priority.clone(),
        run_as: settings
            .process
            .user
            .as_deref()
            .map(process::uid_of)
            .transpose()?,
    };
    Ok(Some(Arc::new(tls::TlsConfig::load(&opts)?)))
}

/// The TLS settings the `--run` command and the URI are told about.
fn run_tls(settings: &Settings, mode: TlsMode) -> run::Tls<'_> {
    run::Tls {
        mode,
        certificates: settings.tls.certificates.as_deref(),
        psk: settings.tls.psk.as_deref(),
    }
}

/// Step 3: log the listeners (setting `--keepalive` on them) and print
/// the URI for `--print-uri`, before going to the background, so the
/// caller reads it.
fn announce(settings: &Settings, bound: &Bound, mode: TlsMode) -> Result<(), CliError> {
    for l in &bound.listeners {
        log::info!("listening on {}", l.describe());
        if settings.listen.keepalive {
            l.set_keepalive().map_err(|source| CliError::Keepalive {
                listener: l.describe(),
                source,
            })?;
        }
    }
    let a = &settings.announce;
    if a.print_uri {
        if let Some(uri) = run::uri(&bound.address, &a.export_name, &run_tls(settings, mode)) {
            dump::print(&format!("{uri}\n"));
        }
    }
    Ok(())
}

/// Step 4: `-u` and `-g`. What is read after this must be readable by
/// that user: the PSK file (every PSK handshake, and `--run`'s URI), and
/// on SIGHUP the configuration file and what its new exports' layers
/// open.
fn drop_privileges(p: &config::Process) -> Result<(), CliError> {
    if p.user.is_some() || p.group.is_some() {
        process::change_user(p.user.as_deref(), p.group.as_deref())?;
    }
    Ok(())
}

/// Step 5: go to the background, logging to syslog from there unless
/// `--log` says otherwise. `-f`, `-s` and `--run` stay in the foreground,
/// and so does socket activation: the activating process (systemd,
/// libnbd) tracks and signals the pid it started.
fn daemonize(
    settings: &Settings,
    bound: &Bound,
    explicit_log: Option<logging::Destination>,
) -> Result<(), CliError> {
    let foreground = settings.process.foreground
        || settings.stdio()
        || settings.announce.run.is_some()
        || matches!(bound.address, Address::Activated);
    if !foreground {
        process::daemonize()?;
        logging::set_destination(explicit_log.unwrap_or(logging::Destination::Syslog));
    }
    Ok(())
}

/// Step 6: get ready to serve (`--exit-with-parent`; with `--run`, fork,
/// see [`captive`]; signals, the pid file, the layers' `after_fork`),
/// have the `--run` command started once everything that can refuse to
/// start has passed, serve until the end, and clean up.
fn run(settings: &Settings, bound: Bound, mut served: Served) -> Result<i32, CliError> {
    let p = &settings.process;
    if p.exit_with_parent {
        process::exit_with_parent()?;
    }
    process::ignore_sigpipe();
    let a = &settings.announce;
    // Before anything catches signals or starts a thread: from here on
    // this process serves, and its parent runs the command.
    let captive = match &a.run {
        Some(cmd) => {
            let tls = run_tls(settings, served.exports.tls_mode());
            Some(captive::fork(|| {
                run::spawn(cmd, &bound.address, &a.export_name, &tls)
            })?)
        }
        None => None,
    };
    let signals = runtime::catch_signals().map_err(CliError::Signals)?;
    if let Some(f) = &p.pidfile {
        process::write_pidfile(f)?;
    }
    for chain in served.exports.table().chains() {
        chain.backend.after_fork().map_err(CliError::AfterFork)?;
    }
    let child = match captive.map(captive::Serving::ready) {
        // The parent could not start the command, and said why.
        Some(None) => return Ok(1),
        Some(Some(wait)) => Some(wait),
        None => None,
    };
    let limits = &settings.limits;
    process::raise_fd_limit(limits.max_connections);
    let Bound {
        listeners,
        address,
        private,
        ..
    } = bound;
    let opts = runtime::Options {
        clients: if settings.stdio() {
            Clients::Stdio
        } else {
            Clients::Listeners(listeners)
        },
        loops: limits.loops(),
        max_connections: limits.max_connections,
        max_handshakes: limits.max_handshakes,
        threads: limits.threads,
    };
    let serving = served.serving();
    let reload = served
        .exports
        .reloadable()
        .then_some(&mut served as &mut dyn Reload);
    let stop = StopOn {
        signals,
        run: child,
    };
    let exit = runtime::serve(serving, reload, opts, stop).map_err(CliError::EventLoop)?;
    if let (Address::Unix(path), None) = (&address, &private) {
        let _ = std::fs::remove_file(path);
    }
    drop(private);
    if let Some(f) = &p.pidfile {
        let _ = std::fs::remove_file(f);
    }
    Ok(match exit {
        Exit::Normal => 0,
        Exit::Child(code) => code,
    })
}

/// What new connections are served: the exports, and the session settings
/// with the credentials. A reload keeps the settings and credentials;
/// only the TLS policy follows the new exports.
struct Served {
    exports: Exports,
    session: session::Config,
}

impl Served {
    fn new(settings: &Settings, exports: Exports, tls: Option<Arc<dyn TlsFactory>>) -> Served {
        let p = &settings.protocol;
        let session = session::Config {
            handshake: HandshakeConfig {
                oldstyle: p.oldstyle,
                handshake_mask: p.handshake_mask,
                no_structured: p.no_structured,
                tls: exports.tls_mode(),
                ..HandshakeConfig::default()
            },
            tls,
            limits: Limits::default(),
            handshake_timeout: p.handshake_timeout,
        };
        Served { exports, session }
    }

    fn serving(&self) -> Serving {
        let mut session = self.session.clone();
        session.handshake.tls = self.exports.tls_mode();
        Serving {
            table: self.exports.table(),
            session: Arc::new(session),
        }
    }
}

impl Reload for Served {
    fn reload(&mut self) -> Result<Serving, ReloadError> {
        self.exports.reload()?;
        Ok(self.serving())
    }
}
