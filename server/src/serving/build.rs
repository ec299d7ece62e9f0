//! What the settings serve, built: the command line's one chain, or a
//! configuration file's exports, each checked against the server's
//! settings and its chain loaded and configured. A file's exports are
//! built again from the file on SIGHUP ([`Exports::reload`]); those whose
//! declaration did not change keep their chains.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::access::Access;
use super::chain::Chain;
use super::table::{Export, Name, Table};
use crate::config::file::{self, ConfigFile, Error, Source};
use crate::config::Settings;
use crate::layers::chain::Layers;
use crate::layers::host::debug_flags;
use crate::protocol::export::ExportPolicy;
use crate::protocol::handshake::TlsMode;

/// What is served, and where it came from.
pub enum Exports {
    /// The command line's one chain, under every name, with the TLS
    /// policy the command line gives.
    Plugin { chain: Arc<Chain>, tls: TlsMode },
    /// A configuration file's exports.
    File(FileExports),
}

impl Exports {
    /// The table new connections are served from.
    pub fn table(&self) -> Table {
        match self {
            Exports::Plugin { chain, .. } => Table::every_name(chain.clone()),
            Exports::File(f) => Table {
                exports: f.exports.iter().map(|(_, e)| e.clone()).collect(),
                default: f.default.clone(),
            },
        }
    }

    /// The handshake's TLS policy for these exports.
    pub fn tls_mode(&self) -> TlsMode {
        match self {
            Exports::Plugin { tls, .. } => *tls,
            Exports::File(f) => f.tls_mode(),
        }
    }

    /// Whether SIGHUP can build them again: a file can be read again; the
    /// command line cannot change, so SIGHUP shuts such a server down, as
    /// nbdkit's does.
    pub fn reloadable(&self) -> bool {
        matches!(self, Exports::File(_))
    }

    /// Build them again from their source: read the file again and build
    /// what changed. Exports whose declaration is unchanged keep their
    /// chains; new and changed ones are loaded, configured and started
    /// (`after_fork`) as at start-up. On an error nothing changes.
    pub fn reload(&mut self) -> Result<(), ReloadError> {
        match self {
            Exports::Plugin { .. } => Ok(()),
            Exports::File(f) => f.reload(),
        }
    }
}

/// Why a reload keeps what is served as it was.
#[derive(Debug)]
pub enum ReloadError {
    /// The file cannot be read, or declares something it may not.
    Config(Error),
    /// A new or changed export's layers refused to start.
    AfterFork {
        export: String,
        source: nbdhost_plugin_api::Error,
    },
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Config(e) => e.fmt(f),
            ReloadError::AfterFork { export, source } => write!(f, "export '{export}': {source}"),
        }
    }
}

impl std::error::Error for ReloadError {}

impl From<Error> for ReloadError {
    fn from(e: Error) -> ReloadError {
        ReloadError::Config(e)
    }
}

/// A configuration file's exports as built.
pub struct FileExports {
    path: PathBuf,
    /// `[server]` as at start-up, less what a reload may change.
    server: file::Server,
    context: Context,
    pub exports: Declared,
    /// What the empty name opens.
    pub default: Option<String>,
}

/// Each export beside the declaration it came from, so that a reload
/// keeps those that did not change.
pub type Declared = Vec<(file::Export, Arc<Export>)>;

/// What the exports are built against: the server's settings.
struct Context {
    /// The server has TLS credentials.
    has_credentials: bool,
    /// It has a PSK file, so PSK users exist.
    psk: bool,
    /// It verifies client certificates, so their subjects are known.
    verify_peer: bool,
    /// The exports are built again for a reload: descriptors given at
    /// start-up (`-FD` secrets) have been read and closed.
    reloading: bool,
    /// `tls` as the server settings give it explicitly.
    tls_setting: Option<TlsMode>,
    /// The server-wide `readonly` and `no-mc`.
    policy: ExportPolicy,
}

impl Context {
    fn new(settings: &Settings) -> Context {
        let tls = &settings.tls;
        Context {
            // tls = on or require alone uses the default certificate
            // directory.
            has_credentials: tls.psk.is_some()
                || tls.certificates.is_some()
                || matches!(tls.setting, Some(TlsMode::On | TlsMode::Require)),
            psk: tls.psk.is_some(),
            verify_peer: tls.verify_peer,
            reloading: false,
            tls_setting: tls.setting,
            policy: settings.policy,
        }
    }
}

/// `[server]` less `default-export`, which a reload may change.
fn fixed(server: &file::Server) -> file::Server {
    let mut s = server.clone();
    s.remove(file::DEFAULT_EXPORT);
    s
}

impl FileExports {
    /// Check and build every export `config` declares, against
    /// `settings`.
    pub fn build(config: &ConfigFile, settings: &Settings) -> Result<FileExports, Error> {
        let context = Context::new(settings);
        let (exports, default) = build(&config.source, &config.file, &context, &[])?;
        Ok(FileExports {
            path: config.source.path.clone(),
            server: fixed(&config.file.server),
            context,
            exports,
            default,
        })
    }

    /// The handshake's TLS policy for these exports: required when every
    /// export needs TLS (nothing at all is answered before it), optional
    /// when some do not, off without credentials.
    pub fn tls_mode(&self) -> TlsMode {
        if let Some(m) = self.context.tls_setting {
            return m;
        }
        if !self.context.has_credentials {
            TlsMode::Off
        } else if self.exports.iter().all(|(_, e)| e.access.tls) {
            TlsMode::Require
        } else {
            TlsMode::On
        }
    }

    /// See [`Exports::reload`].
    fn reload(&mut self) -> Result<(), ReloadError> {
        let path = &self.path;
        let source = Source::read(path)?;
        let parsed = source.parse()?;
        if fixed(&parsed.server) != self.server {
            log::warn!(
                "{}: changes to [server] take effect when the server is restarted",
                path.display()
            );
        }
        self.context.reloading = true;
        let (exports, default) = build(&source, &parsed, &self.context, &self.exports)?;
        for (_, e) in &exports {
            if !self.exports.iter().any(|(_, c)| Arc::ptr_eq(c, e)) {
                e.chain
                    .backend
                    .after_fork()
                    .map_err(|source| ReloadError::AfterFork {
                        export: e.name.to_string(),
                        source,
                    })?;
            }
        }
        log::info!(
            "{}: {} export(s) after the reload",
            path.display(),
            exports.len()
        );
        self.exports = exports;
        self.default = default;
        Ok(())
    }
}

/// Every export of `file` and the default's name. Those whose declaration
/// is the same as in `previous` are kept as they are; the others are
/// loaded and configured afresh, so a filter's or plugin's refusal is
/// reported at the parameter.
fn build(
    src: &Source,
    file: &file::File,
    ctx: &Context,
    previous: &[(file::Export, Arc<Export>)],
) -> Result<(Declared, Option<String>), Error> {
    if file.exports.is_empty() {
        return Err(src.error(None, "the file has no [[export]] table: nothing to serve"));
    }
    file::listen(src, &file.server)?;
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &file.exports {
        let name = e.name.get_ref();
        if name.is_empty() {
            return Err(src.error(
                Some(e.name.span()),
                "an export needs a name (the empty name is set with default-export in [server])",
            ));
        }
        if name.len() > 4096 {
            return Err(src.error(Some(e.name.span()), "the export name is over 4096 bytes"));
        }
        if let Some(first) = seen.insert(name, e.name.span().start) {
            let (line, _) = src.error(Some(first..first), "").place.unwrap_or((0, 0));
            return Err(src.error(
                Some(e.name.span()),
                format!("export '{name}' is defined twice (first at line {line})"),
            ));
        }
    }
    let default = match &file::default_export(src, &file.server)? {
        Some(d) if !seen.contains_key(d.get_ref().as_str()) => {
            return Err(src.error(
                Some(d.span()),
                format!("default-export '{}' is not one of the exports", d.get_ref()),
            ))
        }
        Some(d) => Some(d.get_ref().clone()),
        None => None,
    };
    let mut exports = Vec::with_capacity(file.exports.len());
    for decl in &file.exports {
        let access = access(src, decl, ctx)?;
        let kept = previous
            .iter()
            .find(|(d, _)| d == decl)
            .map(|(_, e)| e.clone());
        let export = match kept {
            Some(e) => e,
            None => Arc::new(Export {
                name: Name::Only(decl.name.get_ref().clone()),
                access,
                chain: Arc::new(chain(src, decl, ctx)?),
            }),
        };
        exports.push((decl.clone(), export));
    }
    Ok((exports, default))
}

/// Who may open `decl`, checked against the server's TLS.
fn access(src: &Source, decl: &file::Export, ctx: &Context) -> Result<Access, Error> {
    let restricted = !decl.allow_psk.is_empty() || !decl.allow_dn.is_empty();
    let server_tls = ctx.has_credentials && ctx.tls_setting != Some(TlsMode::Off);
    let tls = match &decl.tls {
        Some(t) if *t.get_ref() && !server_tls => return Err(src.error(
            Some(t.span()),
            "tls = true, but the server has no TLS (set tls-psk or tls-certificates in [server])",
        )),
        Some(t) if !*t.get_ref() && restricted => {
            return Err(src.error(
                Some(t.span()),
                "tls = false, but allow-psk and allow-dn name TLS identities",
            ))
        }
        Some(t) if !*t.get_ref() && ctx.tls_setting == Some(TlsMode::Require) => {
            return Err(src.error(
                Some(t.span()),
                "tls = false, but the server's tls = \"require\" serves no client without TLS",
            ))
        }
        Some(t) => *t.get_ref(),
        None if restricted && !server_tls => {
            return Err(src.error(
                Some(decl.name.span()),
                "allow-psk and allow-dn need TLS, but the server has none",
            ))
        }
        None => server_tls,
    };
    if !decl.allow_psk.is_empty() && !ctx.psk {
        return Err(src.error(
            Some(decl.name.span()),
            "allow-psk names PSK users, but the server has no tls-psk file",
        ));
    }
    if !decl.allow_dn.is_empty() && !ctx.verify_peer {
        return Err(src.error(
            Some(decl.name.span()),
            "allow-dn names certificate subjects, but without tls-verify-peer clients present none",
        ));
    }
    Ok(Access {
        tls,
        psk_users: decl.allow_psk.clone(),
        dns: decl.allow_dn.clone(),
    })
}

/// Load and configure one export's chain.
fn chain(src: &Source, decl: &file::Export, ctx: &Context) -> Result<Chain, Error> {
    let names: Vec<String> = decl
        .filters
        .iter()
        .map(|f| f.filter.get_ref().clone())
        .collect();
    let layers = Layers::load_each(decl.plugin.get_ref(), &names).map_err(|(at, e)| {
        let span = match at {
            None => decl.plugin.span(),
            Some(i) => decl.filters[i].filter.span(),
        };
        src.error(Some(span), e)
    })?;
    debug_flags::loaded(
        layers
            .filter_infos()
            .chain([layers.plugin_info()])
            .map(|i| i.name.as_str()),
    );
    let descriptor = |k: &toml::Spanned<String>, text: &str| -> Result<(), Error> {
        let fd = text
            .strip_prefix('-')
            .is_some_and(|n| n.is_empty() || n.bytes().all(|b| b.is_ascii_digit()));
        if ctx.reloading && fd {
            return Err(src.error(
                Some(k.span()),
                format!(
                    "'{}' reads a descriptor or standard input ({text}), which only works at start-up; use +FILE to reload",
                    k.get_ref()
                ),
            ));
        }
        Ok(())
    };
    for (i, f) in decl.filters.iter().enumerate() {
        for (k, v) in &f.params {
            for text in v.get_ref().texts() {
                descriptor(k, &text)?;
                layers
                    .config_filter(i, k.get_ref(), &text)
                    .map_err(|e| src.error(Some(k.span()), e))?;
            }
        }
    }
    for (k, v) in &decl.params {
        for text in v.get_ref().texts() {
            descriptor(k, &text)?;
            layers
                .config_plugin(k.get_ref(), &text)
                .map_err(|e| src.error(Some(k.span()), e))?;
        }
    }
    let name = decl.name.get_ref();
    let backend = layers
        .configure()
        .map_err(|e| src.error(Some(decl.name.span()), format!("export '{name}': {e}")))?;
    let policy = ExportPolicy {
        readonly: ctx.policy.readonly || decl.readonly,
        no_multi_conn: ctx.policy.no_multi_conn,
    };
    Ok(Chain {
        description: decl.description.clone(),
        ..Chain::new(backend, policy)
    })
}
