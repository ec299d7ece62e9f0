//! The command line, as nbdhost-keys(1) documents it.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::commands::DEFAULT_PORT;

/// Make TLS keys and certificates for nbdhost, qemu and libnbd: PSK
/// users in a psktool-format file, and a certificate authority with
/// server and client certificates in qemu's directory layout. Keys are
/// never printed.
#[derive(Parser)]
#[command(name = "nbdhost-keys", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// PSK users in DIR/keys.psk (or in a FILE.psk given instead of DIR).
    #[command(subcommand)]
    Psk(Psk),
    /// Make a certificate authority in DIR.
    Ca {
        /// The CA's directory.
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "nbdhost CA")]
        name: String,
        /// Days the CA's certificate is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        #[command(flatten)]
        key: CaKey,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue the server's certificate into DIR/server.
    Server {
        /// The CA's directory.
        dir: PathBuf,
        /// A DNS name clients connect to (repeat, or separate with commas).
        #[arg(long, value_name = "NAME", value_delimiter = ',')]
        dns: Vec<String>,
        /// An IP address clients connect to (repeat, or separate with commas).
        #[arg(long, value_name = "ADDRESS", value_delimiter = ',')]
        ip: Vec<IpAddr>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[command(flatten)]
        key: CaKey,
        /// Replace an existing server key and certificate.
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate with CN=NAME into DIR/clients/NAME.
    Client {
        /// The CA's directory.
        dir: PathBuf,
        /// The client's name: its certificate's CN and its directory.
        #[arg(long)]
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[command(flatten)]
        key: CaKey,
        /// Replace an existing key and certificate of this client.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke every certificate issued to a client, in the CA's CRL.
    Revoke {
        /// The CA's directory.
        dir: PathBuf,
        /// The client's name.
        #[arg(long)]
        name: String,
        /// Days until the CRL's next update [default: until the CA expires].
        #[arg(long)]
        days: Option<u32>,
        #[command(flatten)]
        key: CaKey,
    },
}

#[derive(Subcommand)]
pub enum Psk {
    /// Give a user a new random key, making DIR and the file if need be.
    Add {
        /// The directory holding keys.psk, or a file whose name ends in .psk.
        dir: PathBuf,
        /// The user name (qemu's default user is "qemu").
        #[arg(long, default_value = "qemu")]
        user: String,
        /// Replace the key of a user who has one.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List the user names (never the keys).
    List {
        /// The directory holding keys.psk, or a file whose name ends in .psk.
        dir: PathBuf,
    },
    /// Remove a user.
    Remove {
        /// The directory holding keys.psk, or a file whose name ends in .psk.
        dir: PathBuf,
        /// The user name.
        #[arg(long)]
        user: String,
    },
}

/// The CA key's passphrase.
#[derive(Args)]
pub struct CaKey {
    /// A file holding the CA key's passphrase (to encrypt it, with ca; to
    /// use it, otherwise).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// Where clients connect, for the command lines printed.
#[derive(Args)]
pub struct Target {
    /// The server's host name or address in the printed command lines
    /// [default: the server certificate's first name, else localhost].
    #[arg(long)]
    pub host: Option<String>,
    /// The server's port in the printed command lines.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
}
