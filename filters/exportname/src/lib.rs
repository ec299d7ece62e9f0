//! The exportname filter: choose what a client listing exports sees, which
//! export the empty name opens, and, strictly, which names may be opened,
//! with nbdkit-exportname-filter's parameters.

#![forbid(unsafe_code)]

use std::process::Command;

use nbdhost_plugin_api::host::{self, LogLevel};
use nbdhost_plugin_api::{
    callbacks, errno, nbdhost_filter, Error, ExportList, Filter, FilterHandle, Next, NextExports,
    NextOpener, Result,
};

/// Which exports `NBD_OPT_LIST` shows.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ListMode {
    /// The layer below's list.
    #[default]
    Keep,
    /// An error instead of a list.
    Error,
    /// No exports.
    Empty,
    /// Only the default export, under its real name.
    DefaultOnly,
    /// The names given with `exportname=`.
    Explicit,
}

/// The descriptions shown beside the names and given to a client that
/// opens an export.
#[derive(Clone, Default)]
enum Description {
    /// The layer below's.
    #[default]
    Keep,
    /// None at all, so nothing leaks from the layer below.
    None,
    /// The same text for every export.
    Fixed(String),
    /// A shell command's output, with `$name` set to the export.
    Script(String),
}

/// Configured names.
#[derive(Default)]
pub struct ExportName {
    default_name: String,
    list: ListMode,
    strict: bool,
    names: Vec<String>,
    description: Description,
}

fn einval(msg: String) -> Error {
    Error::new(errno::EINVAL, msg)
}

impl Description {
    /// The description of export `name`, whose description below is
    /// `below`.
    fn of(&self, name: &str, below: Option<String>) -> Result<Option<String>> {
        Ok(match self {
            Description::Keep => below,
            Description::None => None,
            Description::Fixed(text) => Some(text.clone()),
            Description::Script(script) => {
                let out = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(script)
                    .env("name", name)
                    .output()
                    .map_err(|e| Error::new(errno::EIO, format!("exportdesc script: {e}")))?;
                if !out.status.success() {
                    return Err(Error::new(
                        errno::EIO,
                        format!("exportdesc script for '{name}' failed: {}", out.status),
                    ));
                }
                let text = String::from_utf8_lossy(&out.stdout);
                Some(text.trim_end_matches('\n').to_string())
            }
        })
    }
}

#[callbacks]
impl Filter for ExportName {
    const NAME: &'static str = "exportname";
    const DESCRIPTION: &'static str = "adjust export names between client and plugin";
    const CONFIG_HELP: &'static str = "default-export=<NAME>   Export the empty name opens.
exportname-list=<MODE>  keep|error|empty|defaultonly|explicit: what clients listing see.
exportname-strict=<BOOL> Refuse names not given with exportname=.
exportname=<NAME>       An export to list (repeatable).
exportdesc=<DESC>       keep|none|fixed:STRING|script:SCRIPT: the descriptions.";
    type Handle = Opened;

    fn nonblocking(&self) -> bool {
        // A description script runs when listing and when a client asks
        // for an export's description; everything else is a lookup.
        !matches!(self.description, Description::Script(_))
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "default-export" => self.default_name = value.to_string(),
            "exportname-list" => {
                self.list = match value {
                    "keep" => ListMode::Keep,
                    "error" => ListMode::Error,
                    "empty" => ListMode::Empty,
                    "defaultonly" => ListMode::DefaultOnly,
                    "explicit" => ListMode::Explicit,
                    _ => {
                        return Err(einval(format!(
                    "exportname-list: '{value}' is not keep, error, empty, defaultonly or explicit"
                )))
                    }
                }
            }
            "exportname-strict" => {
                self.strict = nbdhost_plugin_api::host::parse_bool(key, value)?;
            }
            "exportname" => self.names.push(value.to_string()),
            "exportdesc" => {
                self.description = match value.split_once(':') {
                    _ if value == "keep" => Description::Keep,
                    _ if value == "none" => Description::None,
                    Some(("fixed", text)) => Description::Fixed(text.to_string()),
                    Some(("script", script)) => Description::Script(script.to_string()),
                    _ => {
                        return Err(einval(format!(
                            "exportdesc: '{value}' is not keep, none, fixed:STRING or script:SCRIPT"
                        )))
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn list_exports(
        &self,
        next: &NextExports,
        readonly: bool,
        is_tls: bool,
        exports: &mut ExportList,
    ) -> Result<()> {
        let listed: Vec<(String, Option<String>)> = match self.list {
            ListMode::Keep => next
                .list_exports(readonly, is_tls)?
                .into_iter()
                .map(|e| (e.name, e.description))
                .collect(),
            ListMode::Error => {
                return Err(Error::new(
                    errno::EPERM,
                    "listing exports is not allowed here",
                ))
            }
            ListMode::Empty => Vec::new(),
            ListMode::DefaultOnly => {
                vec![(self.default_export(next, readonly, is_tls)?, None)]
            }
            ListMode::Explicit => self.names.iter().map(|n| (n.clone(), None)).collect(),
        };
        for (name, below) in listed {
            let description = self.description.of(&name, below)?;
            exports.add(&name, description.as_deref())?;
        }
        Ok(())
    }

    fn default_export(&self, next: &NextExports, readonly: bool, is_tls: bool) -> Result<String> {
        if self.strict {
            // As nbdkit: strictly, the empty name opens nothing unless it
            // is one of the names (`exportname=` with no value), and then
            // it is itself unless `default-export=` says otherwise.
            if !self.names.iter().any(String::is_empty) {
                return Err(Error::new(
                    errno::ENOENT,
                    "default export (\"\") not permitted: exportname-strict=true without exportname=",
                ));
            }
            return Ok(self.default_name.clone());
        }
        if self.default_name.is_empty() {
            next.default_export(readonly, is_tls)
        } else {
            Ok(self.default_name.clone())
        }
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Opened> {
        if self.strict && !self.names.iter().any(|n| n == export_name) {
            return Err(Error::new(
                errno::ENOENT,
                format!("export '{export_name}' is not one of the exportname= names"),
            ));
        }
        next.open(readonly, export_name)?;
        Ok(Opened {
            name: export_name.to_string(),
            description: self.description.clone(),
        })
    }
}

/// A connection: its export's description is the filter's, as in the
/// listing; everything else passes through.
pub struct Opened {
    name: String,
    description: Description,
}

#[callbacks]
impl FilterHandle for Opened {
    fn export_description(&self, next: &Next) -> Result<Option<String>> {
        let below = match self.description {
            Description::Keep => next.export_description()?,
            _ => None,
        };
        // As nbdkit: a script that fails costs the client the
        // description, not the export.
        Ok(self.description.of(&self.name, below).unwrap_or_else(|e| {
            host::log(LogLevel::Error, &e.to_string());
            None
        }))
    }
}

nbdhost_filter!(ExportName);
