//! `--config FILE`: many exports from one TOML file, each with its own
//! chain, TLS policy and users. The file's `[server]` table holds the
//! command line's long options (the command line, given after them,
//! overrides them); each `[[export]]` table declares one chain.
//!
//! The file is read with serde into the declarations below, every name
//! and value kept with its place in the file so that an error can point
//! at it. Unknown keys are errors, so a typo is never silently ignored.
//! The exports are checked and built where they are served (`cli::exports`),
//! at start-up and again on SIGHUP.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::command_line::CommandLine;
use super::{Exports, Settings};

/// A configuration file as read, and the arguments its `[server]` gives.
pub struct ConfigFile {
    pub source: Source,
    pub file: File,
    /// The `[server]` options as command-line arguments.
    pub args: Vec<String>,
}

/// The settings of the command line `argv` with the `[server]` options of
/// the file at `path` in front of it.
pub fn settings(argv: &[OsString], path: &Path) -> Result<Settings, Error> {
    let source = Source::read(path)?;
    let file = source.parse()?;
    let cmd = CommandLine::command();
    let args = server_args(&source, &file.server, &cmd)?;
    let full: Vec<OsString> = argv
        .iter()
        .take(1)
        .cloned()
        .chain(args.iter().map(OsString::from))
        .chain(argv.iter().skip(1).cloned())
        .collect();
    let matches = cmd.try_get_matches_from(full).unwrap_or_else(|e| e.exit());
    let cli = CommandLine::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok(cli.settings(Exports::File(ConfigFile { source, file, args })))
}

/// Long options a file may not set, and why.
const NOT_IN_FILE: &[(&str, &str)] = &[
    ("config", "the file is already given"),
    ("check", "it is an action of the command line"),
    ("filter", "each export lists its own filters"),
    ("dump-config", "it is an action of the command line"),
    ("dump-plugin", "it is an action of the command line"),
    ("help", "it is an action of the command line"),
    ("version", "it is an action of the command line"),
    ("short-options", "it is an action of the command line"),
    ("long-options", "it is an action of the command line"),
    ("single", "serving stdin is for the command line"),
    ("port", "give listen = [\"HOST:PORT\"]"),
    ("ipaddr", "give listen = [\"HOST:PORT\"]"),
    ("unix", "give listen = [\"/path/to/socket\"]"),
    ("vsock", "give listen = [\"vsock:PORT\"]"),
];

/// The `[server]` options as command-line arguments, each checked on its
/// own against `cmd` (nbdhost's parser) so that a bad one is reported at
/// its place in the file.
pub fn server_args(
    src: &Source,
    server: &Server,
    cmd: &clap::Command,
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for (key, value) in server {
        let k = key.get_ref().as_str();
        if k == LISTEN || k == DEFAULT_EXPORT {
            continue;
        }
        let Some(arg) = cmd.get_arguments().find(|a| {
            a.get_long() == Some(k) || a.get_all_aliases().is_some_and(|al| al.contains(&k))
        }) else {
            return Err(src.error(
                Some(key.span()),
                format!("unknown key '{k}' in [server]: not a long option of nbdhost(1)"),
            ));
        };
        // By the option's own name, so an alias does not slip past.
        let long = arg.get_long().unwrap_or(k);
        if let Some((_, why)) = NOT_IN_FILE.iter().find(|(n, _)| *n == long) {
            return Err(src.error(
                Some(key.span()),
                format!("'{k}' cannot be set in [server]: {why}"),
            ));
        }
        let args: Vec<String> = match (arg.get_action().takes_values(), value.get_ref()) {
            (false, Value::Boolean(true)) => vec![format!("--{k}")],
            (false, Value::Boolean(false)) => Vec::new(),
            (false, _) => {
                return Err(src.error(
                    Some(value.span()),
                    format!("'{k}' is a switch: give true or false"),
                ))
            }
            (true, v) => v
                .texts()
                .into_iter()
                .map(|t| format!("--{k}={t}"))
                .collect(),
        };
        let probe = ["nbdhost", "--dump-config"]
            .into_iter()
            .map(String::from)
            .chain(args.iter().cloned());
        if let Err(e) = cmd.clone().try_get_matches_from(probe) {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let msg = first.trim_start_matches("error: ");
            return Err(src.error(Some(value.span()), format!("'{k}': {msg}")));
        }
        out.extend(args);
    }
    Ok(out)
}

/// The whole file.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Settings of the server as a whole, as on the command line.
    #[serde(default)]
    pub server: Server,
    /// One table per export, in the order given.
    #[serde(default, rename = "export")]
    pub exports: Vec<Export>,
}

/// The `[server]` table: the command line's long options by name, and the
/// two settings only a file can give (`listen` and `default-export`).
pub type Server = BTreeMap<Spanned<String>, Spanned<Value>>;

/// The keys of `[server]` that are not command-line options.
pub const LISTEN: &str = "listen";
pub const DEFAULT_EXPORT: &str = "default-export";

/// One address of `listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `HOST:PORT`, `[V6]:PORT`, or `:PORT` for every address.
    Tcp(Option<String>, u16),
    /// An absolute path.
    Unix(PathBuf),
    /// `vsock:PORT`.
    Vsock(u32),
}

/// Why a `listen` address is not one; the message quotes the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenError {
    /// `vsock:` followed by no port number.
    VsockPort(String),
    /// Neither `HOST:PORT`, a path, nor `vsock:PORT`.
    Address(String),
    /// `HOST:` followed by no TCP port number.
    TcpPort(String),
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenError::VsockPort(p) => write!(f, "'{p}' is not a vsock port"),
            ListenError::Address(t) => write!(f, "'{t}' is not HOST:PORT, /path or vsock:PORT"),
            ListenError::TcpPort(p) => write!(f, "'{p}' is not a TCP port"),
        }
    }
}

impl std::error::Error for ListenError {}

impl Listen {
    fn parse(text: &str) -> Result<Listen, ListenError> {
        if text.starts_with('/') {
            return Ok(Listen::Unix(PathBuf::from(text)));
        }
        if let Some(port) = text.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Listen::Vsock)
                .map_err(|_| ListenError::VsockPort(port.to_string()));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| ListenError::Address(text.to_string()))?;
        let port: u16 = port
            .parse()
            .map_err(|_| ListenError::TcpPort(port.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Listen::Tcp(
            (!host.is_empty()).then(|| host.to_string()),
            port,
        ))
    }
}

/// Where to listen, each address with its place. Sockets passed by socket
/// activation are served beside these.
pub fn listen(src: &Source, server: &Server) -> Result<Vec<Spanned<Listen>>, Error> {
    let Some((_, v)) = server.get_key_value(LISTEN) else {
        return Ok(Vec::new());
    };
    let texts = match v.get_ref() {
        Value::String(s) => vec![s.clone()],
        Value::List(items) if items.iter().all(|i| matches!(i, Value::String(_))) => {
            v.get_ref().texts()
        }
        _ => return Err(src.error(Some(v.span()), "listen takes a list of addresses")),
    };
    texts
        .iter()
        .map(|t| {
            Listen::parse(t)
                .map(|l| Spanned::new(v.span(), l))
                .map_err(|e| src.error(Some(v.span()), format!("listen: {e}")))
        })
        .collect()
}

/// The export the empty name opens, with its place.
pub fn default_export(src: &Source, server: &Server) -> Result<Option<Spanned<String>>, Error> {
    match server.get_key_value(DEFAULT_EXPORT) {
        None => Ok(None),
        Some((_, v)) => match v.get_ref() {
            Value::String(s) => Ok(Some(Spanned::new(v.span(), s.clone()))),
            _ => Err(src.error(Some(v.span()), "default-export takes an export's name")),
        },
    }
}

/// One `[[export]]` table.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Export {
    pub name: Spanned<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A short name or a path, as on the command line.
    pub plugin: Spanned<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: Params,
    /// Nearest the client first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub readonly: bool,
    /// Whether the export needs TLS; by default, when the server has TLS
    /// credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Spanned<bool>>,
    /// PSK users allowed to open it (empty: anyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_psk: Vec<String>,
    /// Verified client certificates' subject DNs allowed to open it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_dn: Vec<String>,
}

/// One filter of an export.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub filter: Spanned<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: Params,
}

/// A layer's parameters.
pub type Params = BTreeMap<Spanned<String>, Spanned<Value>>;

/// A parameter's value: what the command line would have given as text.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    /// Only for the options that may be repeated (`debug`).
    List(Vec<Value>),
}

impl Value {
    /// The value as its command-line text; a list gives one per item.
    pub fn texts(&self) -> Vec<String> {
        match self {
            Value::String(s) => vec![s.clone()],
            Value::Integer(i) => vec![i.to_string()],
            Value::Float(f) => vec![f.to_string()],
            Value::Boolean(b) => vec![b.to_string()],
            Value::List(items) => items.iter().flat_map(Value::texts).collect(),
        }
    }
}

/// An error in the file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub path: PathBuf,
    /// 1-based line and column; `None` for the file as a whole.
    pub place: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.place {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// The file's text, to turn byte offsets into lines and columns.
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    /// Read the file.
    pub fn read(path: &Path) -> Result<Source, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            path: path.to_path_buf(),
            place: None,
            message: format!("cannot read the configuration: {e}"),
        })?;
        Ok(Source {
            path: path.to_path_buf(),
            text,
        })
    }

    /// An error at `span` (a byte range of the text).
    pub fn error(&self, span: Option<Range<usize>>, message: impl std::fmt::Display) -> Error {
        Error {
            path: self.path.clone(),
            place: span.map(|s| self.line_col(s.start)),
            message: message.to_string(),
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, col)
    }

    /// Parse the text.
    pub fn parse(&self) -> Result<File, Error> {
        toml::from_str(&self.text).map_err(|e| {
            // The message alone: the place comes first, as compilers put it.
            let message = e.message().trim().replace('`', "'").replace(
                "data did not match any variant of untagged enum Value",
                "a value must be a string, a number, a boolean or a list of them",
            );
            self.error(e.span(), message)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        Source {
            path: PathBuf::from("test.toml"),
            text: text.to_string(),
        }
    }

    #[test]
    fn a_minimal_file_parses() {
        let f =
            source("[[export]]\nname = \"a\"\nplugin = \"memory\"\nparams = { size = \"1M\" }\n")
                .parse()
                .unwrap();
        assert_eq!(f.exports.len(), 1);
        assert_eq!(f.exports[0].name.get_ref(), "a");
    }

    #[test]
    fn an_unknown_export_key_names_its_line_and_column() {
        let e = source("[[export]]\nname = \"a\"\nplugin = \"memory\"\nreadnoly = true\n")
            .parse()
            .unwrap_err();
        assert_eq!(e.place, Some((4, 1)), "{e}");
        assert!(e.message.contains("unknown field 'readnoly'"), "{e}");
        assert!(e.to_string().starts_with("test.toml:4:1: "), "{e}");
    }

    #[test]
    fn values_become_the_text_the_command_line_would_give() {
        assert_eq!(Value::Integer(16).texts(), ["16"]);
        assert_eq!(Value::Boolean(true).texts(), ["true"]);
        assert_eq!(
            Value::List(vec![Value::String("a.b=1".into()), Value::Integer(2)]).texts(),
            ["a.b=1", "2"]
        );
    }
}
