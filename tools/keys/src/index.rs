//! The CA's record of what it issued (`DIR/issued.txt`), so that
//! `revoke` can find a certificate's serial number by its name. One
//! tab-separated line per certificate:
//!
//! ```text
//! SERIAL(hex)  server|client  NAME  NOT-AFTER(RFC 3339)  REVOKED-AT(RFC 3339)|-
//! ```

use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::Error;
use crate::files::{self, Kind};

const HEADER: &str =
    "# Certificates issued by this CA (nbdhost-keys): serial, role, name, not after, revoked at\n";

/// Whom a certificate was issued to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

/// One issued certificate.
pub struct Record {
    pub serial: Vec<u8>,
    pub role: Role,
    /// The client's name (its CN), or the server's first name.
    pub name: String,
    pub not_after: OffsetDateTime,
    pub revoked: Option<OffsetDateTime>,
}

/// The whole record, read and written under the CA directory's lock.
pub struct Index {
    path: PathBuf,
    records: Vec<Record>,
}

impl Index {
    /// The record at `path`; empty if there is no file yet.
    pub fn load(path: &Path) -> Result<Index, Error> {
        let mut records = Vec::new();
        let text = files::read_optional(path)?;
        for (n, line) in text.iter().flat_map(|t| t.lines()).enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let bad = || Error::BadIndexLine {
                file: path.to_path_buf(),
                line: n + 1,
            };
            records.push(parse(line).ok_or_else(bad)?);
        }
        Ok(Index {
            path: path.to_path_buf(),
            records,
        })
    }

    /// An empty record at `path`, for a new CA.
    pub fn empty(path: &Path) -> Index {
        Index {
            path: path.to_path_buf(),
            records: Vec::new(),
        }
    }

    /// Write the record back.
    pub fn save(&self) -> Result<(), Error> {
        let mut text = String::from(HEADER);
        for r in &self.records {
            let time = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
            text.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\n",
                hex::encode(&r.serial),
                r.role.as_str(),
                r.name,
                time(r.not_after),
                r.revoked.map(time).unwrap_or_else(|| "-".into())
            ));
        }
        files::write_atomic(&self.path, text.as_bytes(), Kind::Public)
    }

    pub fn push(&mut self, record: Record) {
        self.records.push(record);
    }

    /// Mark every certificate issued to the client `name` and not yet
    /// revoked as revoked `at`; how many were. `NotIssued` if the CA
    /// never issued one to that name.
    pub fn revoke_client(&mut self, name: &str, at: OffsetDateTime) -> Result<usize, Error> {
        let mut found = false;
        let mut newly = 0;
        for r in self
            .records
            .iter_mut()
            .filter(|r| r.role == Role::Client && r.name == name)
        {
            found = true;
            if r.revoked.is_none() {
                r.revoked = Some(at);
                newly += 1;
            }
        }
        if !found {
            return Err(Error::NotIssued(name.to_owned()));
        }
        Ok(newly)
    }

    /// Every revoked certificate.
    pub fn revoked(&self) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(|r| r.revoked.is_some())
    }

    /// The name of the newest server certificate not revoked: what
    /// clients connect to.
    pub fn server_name(&self) -> Option<&str> {
        self.records
            .iter()
            .rev()
            .find(|r| r.role == Role::Server && r.revoked.is_none())
            .map(|r| r.name.as_str())
    }
}

fn parse(line: &str) -> Option<Record> {
    let mut f = line.split('\t');
    let serial = hex::decode(f.next()?).ok()?;
    let role = match f.next()? {
        "server" => Role::Server,
        "client" => Role::Client,
        _ => return None,
    };
    let name = f.next()?.to_owned();
    let not_after = OffsetDateTime::parse(f.next()?, &Rfc3339).ok()?;
    let revoked = match f.next()? {
        "-" => None,
        t => Some(OffsetDateTime::parse(t, &Rfc3339).ok()?),
    };
    Some(Record {
        serial,
        role,
        name,
        not_after,
        revoked,
    })
}
