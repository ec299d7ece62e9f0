//! What the server is asked to do, from either of its two sources: the
//! command line ([`command_line`]) or a TOML file named with `--config`
//! ([`file`]), whose `[server]` options go in front of the command line's.
//! Both produce one [`Settings`] value: where to listen, what to export,
//! TLS, limits and the process's chores. Nothing here loads a layer or
//! opens a socket; the start-up (`cli`) does that from the settings.

pub mod command_line;
pub mod file;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::protocol::export::ExportPolicy;
use crate::protocol::handshake::TlsMode;
use command_line::CommandLine;

/// The NBD port: where the server listens when nothing else is named.
pub const DEFAULT_PORT: u16 = 10809;

/// Everything the server was asked, whichever source it came from.
pub struct Settings {
    /// Serve, or print something and exit.
    pub action: Action,
    /// What is served.
    pub exports: Exports,
    /// Where clients connect.
    pub listen: Listen,
    /// TLS credentials and policy.
    pub tls: Tls,
    /// The handshake's options.
    pub protocol: Protocol,
    /// `-r` and `--no-mc`, for every export.
    pub policy: ExportPolicy,
    /// Connections and threads.
    pub limits: Limits,
    /// Going to the background, the user, the pid file.
    pub process: Process,
    /// How the server tells its users where it is: `--print-uri` and the
    /// `--run` command.
    pub announce: Announce,
    /// `-v`, `--log` and `-D`.
    pub logging: Logging,
}

/// What the server is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Serve,
    /// `--check`: build a file's exports, print them, and exit.
    Check,
    /// `--dump-config`.
    DumpConfig,
    /// `--short-options` or (`long`) `--long-options`.
    ListOptions {
        long: bool,
    },
    /// `--help`, with the plugin's and filters' if one is named.
    Help,
    /// `--version`, with the plugin's and filters' if one is named.
    Version,
    /// `--dump-plugin`.
    DumpPlugin,
}

/// What is served.
pub enum Exports {
    /// The command line's plugin; `None` when only `--help` or `--version`
    /// (or another action that needs none) was asked for.
    Plugin(Option<Plugin>),
    /// The exports of a configuration file.
    File(file::ConfigFile),
}

/// The command line's plugin and what is stacked on it.
pub struct Plugin {
    /// A short name or a path.
    pub name: String,
    /// Its parameters as given: `key=value` or a bare value.
    pub params: Vec<String>,
    /// The filters, nearest the client first.
    pub filters: Vec<String>,
}

/// Where clients connect.
pub struct Listen {
    pub address: Address,
    /// `-4` and `-6`.
    pub family: Family,
    /// `--keepalive`.
    pub keepalive: bool,
}

/// The address the command line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// None: a configuration file's `listen` addresses if it gives any,
    /// else a private Unix socket for `--run`, else TCP port
    /// [`DEFAULT_PORT`] on every address. Sockets passed by socket
    /// activation come first in every case but `-s`.
    Unnamed,
    /// `-s`: standard input and output.
    Stdio,
    /// `-U PATH`.
    Unix(PathBuf),
    /// `-U -`: a private temporary Unix socket.
    PrivateUnix,
    /// `--vsock`, on this port.
    Vsock(u32),
    /// `-p` or `-i`.
    Tcp { ipaddr: Option<String>, port: u16 },
}

/// The IP families TCP listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Any,
    /// `-4`.
    V4,
    /// `-6`.
    V6,
}

/// TLS as the settings give it.
pub struct Tls {
    /// `--tls`, if given.
    pub setting: Option<TlsMode>,
    /// `--tls-psk`.
    pub psk: Option<PathBuf>,
    /// `--tls-certificates`.
    pub certificates: Option<PathBuf>,
    /// `--tls-verify-peer`.
    pub verify_peer: bool,
    /// `--tls-priority`.
    pub priority: Option<String>,
}

/// The PSK file's name in a directory of keys, as qemu's
/// `tls-creds-psk,dir=` and systemd credentials have it.
pub const PSK_FILE_NAME: &str = "keys.psk";

impl Tls {
    /// Find the credentials where users keep them: `--tls-psk=DIR` means
    /// `DIR/keys.psk`; with neither `--tls-psk` nor `--tls-certificates`,
    /// the credentials systemd passed (`LoadCredential=`) in
    /// `credentials`: `keys.psk` and, with `server-cert.pem`, the
    /// directory as the certificate directory.
    pub fn locate(&mut self, credentials: Option<&Path>) {
        if let Some(p) = &self.psk {
            if p.is_dir() {
                self.psk = Some(p.join(PSK_FILE_NAME));
            }
        }
        if let (None, None, Some(dir)) = (&self.psk, &self.certificates, credentials) {
            let psk = dir.join(PSK_FILE_NAME);
            if psk.exists() {
                self.psk = Some(psk);
            }
            if dir.join("server-cert.pem").exists() {
                self.certificates = Some(dir.to_path_buf());
            }
        }
    }

    /// The TLS policy: secure when asked once. Credentials without an
    /// explicit `--tls` mean TLS is required; `--tls=on` is the opt-in to
    /// serve plain clients as well. (A file's exports may relax it: see
    /// `cli::exports`.)
    pub fn mode(&self) -> TlsMode {
        match self.setting {
            Some(m) => m,
            None if self.psk.is_some() || self.certificates.is_some() => TlsMode::Require,
            None => TlsMode::Off,
        }
    }
}

/// The handshake's options.
pub struct Protocol {
    /// `-o`.
    pub oldstyle: bool,
    /// `--mask-handshake`.
    pub handshake_mask: u16,
    /// `--no-sr`.
    pub no_structured: bool,
    /// How long a client may take over the handshake (`--timeout`, else
    /// `--handshake-timeout`); `None` for no limit.
    pub handshake_timeout: Option<Duration>,
}

/// Connections and threads.
pub struct Limits {
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--max-handshakes`.
    pub max_handshakes: usize,
    /// `-t`: worker threads.
    pub threads: usize,
    /// `--loops`, if given.
    pub loops: Option<usize>,
}

impl Limits {
    /// How many event loops to run: `--loops`, else one per CPU.
    pub fn loops(&self) -> usize {
        self.loops.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// The process's chores.
pub struct Process {
    /// `-f`: stay in the foreground (so do `-s`, `--run` and socket
    /// activation).
    pub foreground: bool,
    /// `-u`.
    pub user: Option<String>,
    /// `-g`.
    pub group: Option<String>,
    /// `-P`.
    pub pidfile: Option<PathBuf>,
    /// `--exit-with-parent`.
    pub exit_with_parent: bool,
}

/// How the server tells its users where it is.
pub struct Announce {
    /// `--print-uri`.
    pub print_uri: bool,
    /// `--run`.
    pub run: Option<String>,
    /// `-e`: the export name in the URI.
    pub export_name: String,
}

/// `-v`, `--log` and `-D`.
pub struct Logging {
    pub verbose: bool,
    /// `--log` as given.
    pub log: Option<String>,
    /// `-D` as given (checked when the layers are about to be loaded).
    pub debug: Vec<String>,
}

impl Settings {
    /// The settings of this process's arguments `argv`: the command
    /// line's, with a configuration file's `[server]` options in front of
    /// them when `--config` names one, and TLS credentials found where
    /// they are kept (see [`Tls::locate`]); `credentials` is systemd's
    /// `$CREDENTIALS_DIRECTORY`. A bad command line exits here, as clap
    /// does (usage on standard error, status 2).
    pub fn from_args(
        argv: &[OsString],
        credentials: Option<&Path>,
    ) -> Result<Settings, file::Error> {
        let cli = CommandLine::parse_from(argv);
        let mut settings = match cli.config.clone() {
            None => {
                let exports = Exports::Plugin(cli.plugin.clone().map(|name| Plugin {
                    name,
                    params: cli.params.clone(),
                    filters: cli.filters.clone(),
                }));
                cli.settings(exports)
            }
            Some(path) => file::settings(argv, &path)?,
        };
        settings.tls.locate(credentials);
        Ok(settings)
    }

    /// `-D layer.flag=N` settings as a map.
    pub fn debug_flags(&self) -> Result<BTreeMap<String, i32>, command_line::ArgumentError> {
        command_line::debug_flags(&self.logging.debug)
    }

    /// `-s`: one connection on standard input and output.
    pub fn stdio(&self) -> bool {
        self.listen.address == Address::Stdio
    }
}
