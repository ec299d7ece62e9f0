//! Why nbdhost could not do what its command line asked: each step's own
//! error, kept as it is until `main` logs it. The messages are the steps'
//! own, with the context a step adds.

use std::fmt;
use std::io;

use crate::config::command_line::ArgumentError;
use crate::config::file;
use crate::layers::chain::ChainError;
use crate::layers::LoadError;
use crate::runtime::listen::ListenError;
use crate::tls::TlsError;

use super::captive::ForkError;
use super::captive_psk::CaptivePskError;
use super::logging::LogError;
use super::process::ProcessError;

/// One failed step of reading the settings, building the exports or
/// serving them.
#[derive(Debug)]
pub enum CliError {
    Argument(ArgumentError),
    Log(LogError),
    Config(file::Error),
    Load(LoadError),
    Chain(ChainError),
    Listen(ListenError),
    Tls(TlsError),
    /// `-o` with TLS required: oldstyle has no STARTTLS.
    OldstyleTls,
    /// The private socket could not be handed to the `-u` user.
    PrivateSocket {
        path: std::path::PathBuf,
        source: io::Error,
    },
    /// `--keepalive` could not be set on a listener.
    Keepalive {
        listener: String,
        source: io::Error,
    },
    Process(ProcessError),
    Fork(ForkError),
    CaptivePsk(CaptivePskError),
    /// A layer's `after_fork` refused to start.
    AfterFork(nbdhost_plugin_api::Error),
    /// The signal handlers could not be installed.
    Signals(io::Error),
    /// The loops could not be started.
    EventLoop(io::Error),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Argument(e) => e.fmt(f),
            CliError::Log(e) => e.fmt(f),
            CliError::Config(e) => e.fmt(f),
            CliError::Load(e) => e.fmt(f),
            CliError::Chain(e) => e.fmt(f),
            CliError::Listen(e) => e.fmt(f),
            CliError::Tls(e) => e.fmt(f),
            CliError::OldstyleTls => f.write_str(
                "the oldstyle protocol (-o) cannot do TLS, which these settings require",
            ),
            CliError::PrivateSocket { path, source } => {
                write!(
                    f,
                    "{}: cannot give it to the -u user: {source}",
                    path.display()
                )
            }
            CliError::Keepalive { listener, source } => {
                write!(f, "--keepalive on {listener}: {source}")
            }
            CliError::Process(e) => e.fmt(f),
            CliError::Fork(e) => e.fmt(f),
            CliError::CaptivePsk(e) => e.fmt(f),
            CliError::AfterFork(e) => e.fmt(f),
            CliError::Signals(e) => write!(f, "signals: {e}"),
            CliError::EventLoop(e) => write!(f, "event loop: {e}"),
        }
    }
}

impl std::error::Error for CliError {}

/// `?` on a step's own error.
macro_rules! from {
    ($($error:ty => $variant:ident),* $(,)?) => {
        $(impl From<$error> for CliError {
            fn from(e: $error) -> CliError {
                CliError::$variant(e)
            }
        })*
    };
}

from! {
    ArgumentError => Argument,
    LogError => Log,
    file::Error => Config,
    LoadError => Load,
    ChainError => Chain,
    ListenError => Listen,
    TlsError => Tls,
    ProcessError => Process,
    ForkError => Fork,
    CaptivePskError => CaptivePsk,
}
