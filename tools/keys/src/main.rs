//! nbdhost-keys: TLS keys and certificates for nbdhost, qemu and libnbd.
//! See nbdhost-keys(1).

#![forbid(unsafe_code)]

mod ca;
mod cli;
mod commands;
mod crl;
mod error;
mod files;
mod index;
mod issue;
mod keyfile;
mod layout;
mod psk;
mod random;
mod validity;

use std::process::ExitCode;

use clap::Parser;

use cli::{CaKey, Cli, Command, Psk, Target};
use error::Error;
use keyfile::Passphrase;
use layout::{Layout, CA_CERT, CA_CRL, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nbdhost-keys: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<String, Error> {
    match command {
        Command::Psk(Psk::Add {
            dir,
            user,
            force,
            target,
        }) => {
            let loc = psk::Location::new(&dir)?;
            let replaced = psk::add(&loc, &user, force)?;
            let t = target.resolve(None);
            Ok(commands::psk_added(
                &loc.file, &loc.dir, &user, replaced, &t,
            ))
        }
        Command::Psk(Psk::List { dir }) => {
            let names = psk::list(&psk::Location::new(&dir)?)?;
            Ok(names.iter().map(|n| format!("{n}\n")).collect())
        }
        Command::Psk(Psk::Remove { dir, user }) => {
            let loc = psk::Location::new(&dir)?;
            psk::remove(&loc, &user)?;
            Ok(commands::psk_removed(&loc.file, &user))
        }
        Command::Ca {
            dir,
            name,
            days,
            key,
            force,
        } => {
            let layout = Layout::new(&dir)?;
            let passphrase = key.read()?;
            let new = ca::NewCa {
                name: &name,
                validity: validity::Validity { days },
                passphrase: passphrase.as_ref(),
                force,
            };
            let not_after = ca::create(&layout, &new)?;
            Ok(commands::ca_made(
                &layout.root,
                &name,
                not_after,
                passphrase.is_some(),
            ))
        }
        Command::Server {
            dir,
            dns,
            ip,
            days,
            key,
            force,
        } => {
            let layout = Layout::new(&dir)?;
            let passphrase = key.read()?;
            let req = issue::Request {
                validity: validity::Validity { days },
                passphrase: passphrase.as_ref(),
                force,
            };
            let issued = issue::server(&layout, &dns, &ip, &req)?;
            let mut files = vec![CA_CERT, SERVER_CERT, SERVER_KEY];
            if issued.dir.join(CA_CRL).exists() {
                files.push(CA_CRL);
            }
            Ok(commands::server_issued(&layout.root, &issued, &files))
        }
        Command::Client {
            dir,
            name,
            days,
            key,
            force,
            target,
        } => {
            let layout = Layout::new(&dir)?;
            let passphrase = key.read()?;
            let req = issue::Request {
                validity: validity::Validity { days },
                passphrase: passphrase.as_ref(),
                force,
            };
            let issued = issue::client(&layout, &name, &req)?;
            let index = index::Index::load(&layout.index())?;
            // A wildcard name is no host to connect to.
            let server = index.server_name().filter(|n| !n.contains('*'));
            let t = target.resolve(server);
            let files = [CA_CERT, CLIENT_CERT, CLIENT_KEY];
            Ok(commands::client_issued(&name, &issued, &files, &t))
        }
        Command::Revoke {
            dir,
            name,
            days,
            key,
        } => {
            let layout = Layout::new(&dir)?;
            let passphrase = key.read()?;
            let validity = days.map(|days| validity::Validity { days });
            let r = crl::revoke(&layout, &name, passphrase.as_ref(), validity)?;
            Ok(commands::revoked(&name, &r, &layout.server_dir()))
        }
    }
}

impl CaKey {
    fn read(&self) -> Result<Option<Passphrase>, Error> {
        self.passphrase_file
            .as_deref()
            .map(Passphrase::read)
            .transpose()
    }
}

impl Target {
    /// Where the printed command lines connect: `--host`, else
    /// `default`, else localhost.
    fn resolve(self, default: Option<&str>) -> commands::Target {
        commands::Target {
            host: self
                .host
                .or_else(|| default.map(str::to_owned))
                .unwrap_or_else(|| "localhost".into()),
            port: self.port,
        }
    }
}
