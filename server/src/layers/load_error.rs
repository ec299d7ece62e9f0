//! Why a plugin or filter could not be found or loaded: one type for the
//! finder (`chain`), the loader and its instance count (`instances`), so
//! that none of them imports another for it. Its message is the one the
//! user reads at start-up or in a configuration file's error.

use std::fmt;
use std::path::PathBuf;

use nbdhost_plugin_api::Error;

/// Why a plugin or filter (`kind`) could not be found or loaded.
#[derive(Debug)]
pub enum LoadError {
    /// A short name with no `lib<name><kind>.so` in the directories
    /// searched.
    NotFound {
        kind: &'static str,
        name: String,
        file: String,
        searched: Vec<PathBuf>,
    },
    /// Neither a short name nor a path.
    BadName { kind: &'static str, arg: String },
    /// Not found as an nbdhost layer, nor as nbdkit's in its directory.
    NorInNbdkit {
        error: Box<LoadError>,
        name: String,
        kind: &'static str,
        nbdkit_dir: PathBuf,
    },
    /// An nbdkit filter, which nbdhost does not serve.
    NbdkitFilter(PathBuf),
    /// An nbdkit plugin, without the adapter that serves those.
    NoAdapter {
        kind: &'static str,
        foreign: PathBuf,
        error: Box<LoadError>,
    },
    /// The file could not be inspected.
    Unreadable {
        kind: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// The dynamic linker refused the file.
    Dlopen {
        kind: &'static str,
        path: PathBuf,
        error: libloading::Error,
    },
    /// A second instance's private copy could not be made.
    PrivateCopy {
        kind: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// A layer that can have one instance is loaded already.
    AlreadyLoaded { kind: &'static str, path: PathBuf },
    /// An adapter named where the layer it serves was expected.
    IsAdapter { kind: &'static str, path: PathBuf },
    /// No entry symbol.
    NoEntry {
        kind: &'static str,
        path: PathBuf,
        symbol: &'static str,
    },
    /// An adapter without its entry symbol.
    NoAdapterEntry {
        kind: &'static str,
        path: PathBuf,
        symbol: &'static str,
    },
    /// The foreign layer's path cannot be passed to the adapter.
    ForeignPath(Error),
    /// The adapter could not describe the foreign layer.
    Adapter { foreign: PathBuf, error: Error },
    /// The entry point returned no table.
    NullTable { kind: &'static str, path: PathBuf },
    /// Built for another major ABI version.
    Abi {
        kind: &'static str,
        path: PathBuf,
        abi_version: u32,
        supported: u32,
    },
    /// The table is smaller than the oldest the ABI allows.
    TooSmall {
        kind: &'static str,
        path: PathBuf,
        struct_size: u64,
    },
    /// The table names no layer.
    NoName { kind: &'static str, path: PathBuf },
    /// The table's thread model is not one the ABI defines.
    ThreadModel { path: PathBuf, error: Error },
    /// The layer's `load` callback failed.
    LoadCallback { name: String, error: Error },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotFound {
                kind,
                name,
                file,
                searched,
            } => {
                let searched: Vec<String> =
                    searched.iter().map(|d| d.display().to_string()).collect();
                write!(
                    f,
                    "{kind} '{name}' not found ({file} is not in {}); set NBDHOST_{}DIR or give a path",
                    searched.join(", "),
                    kind.to_uppercase()
                )
            }
            LoadError::BadName { kind, arg } => {
                write!(f, "'{arg}' is neither a {kind} name nor a path")
            }
            LoadError::NorInNbdkit {
                error,
                name,
                kind,
                nbdkit_dir,
            } => write!(
                f,
                "{error}; nor is nbdkit-{name}-{kind}.so in nbdkit's {}",
                nbdkit_dir.display()
            ),
            LoadError::NbdkitFilter(path) => write!(
                f,
                "{} is an nbdkit filter: nbdhost serves nbdkit plugins but not nbdkit filters (see nbdhost-nbdkit-plugin(1))",
                path.display()
            ),
            LoadError::NoAdapter {
                kind,
                foreign,
                error,
            } => write!(
                f,
                "{} is an nbdkit {kind}: the adapter that serves those is missing: {error}",
                foreign.display()
            ),
            LoadError::Unreadable { kind, path, error } => {
                write!(f, "cannot load {kind} {}: {error}", path.display())
            }
            LoadError::Dlopen { kind, path, error } => {
                write!(f, "cannot load {kind} {}: {error}", path.display())
            }
            LoadError::PrivateCopy { kind, path, error } => write!(
                f,
                "cannot load {kind} {}: a private copy: {error}",
                path.display()
            ),
            LoadError::AlreadyLoaded { kind, path } => write!(
                f,
                "{} is already loaded for another export; an nbdkit {kind} keeps its \
                 state in globals, so one process serves it once",
                path.display()
            ),
            LoadError::IsAdapter { kind, path } => write!(
                f,
                "{} is an adapter that serves another server's {kind}s: \
                 name one of those instead (see nbdhost-nbdkit-plugin(1))",
                path.display()
            ),
            LoadError::NoEntry { kind, path, symbol } => write!(
                f,
                "{} is not an nbdhost {kind}: no symbol {symbol}",
                path.display()
            ),
            LoadError::NoAdapterEntry { kind, path, symbol } => write!(
                f,
                "{} is not an nbdhost {kind} adapter: no symbol {symbol}",
                path.display()
            ),
            LoadError::ForeignPath(error) => write!(f, "{error}"),
            LoadError::Adapter { foreign, error } => {
                write!(f, "{}: {error}", foreign.display())
            }
            LoadError::NullTable { kind, path } => {
                write!(f, "{}: {kind} entry point returned NULL", path.display())
            }
            LoadError::Abi {
                kind,
                path,
                abi_version,
                supported,
            } => write!(
                f,
                "{} was built for {kind} ABI {}.{} but this nbdhost supports ABI {supported}.x; rebuild the {kind}",
                path.display(),
                abi_version >> 16,
                abi_version & 0xffff
            ),
            LoadError::TooSmall {
                kind,
                path,
                struct_size,
            } => write!(
                f,
                "{}: {kind} struct is too small ({struct_size} bytes)",
                path.display()
            ),
            LoadError::NoName { kind, path } => {
                write!(f, "{}: {kind} has no name", path.display())
            }
            LoadError::ThreadModel { path, error } => write!(f, "{}: {error}", path.display()),
            LoadError::LoadCallback { name, error } => write!(f, "{name}: load failed: {error}"),
        }
    }
}

impl std::error::Error for LoadError {}
