//! Why the adapter cannot serve the nbdkit plugin it was given. The entry
//! point reports it to the server as `EINVAL` with this message.

use std::ffi::c_int;
use std::fmt;

/// Why the adapter's entry point returns no plugin.
#[derive(Debug)]
pub enum LoadError {
    /// The server passed no host table.
    NoHostTable,
    /// The server's ABI (major in the high 16 bits) is older than 1.5.
    HostTooOld { abi_version: u32 },
    /// The server passed no plugin path.
    NoPath,
    /// `dladdr` does not know the adapter's own file.
    NoOwnFile,
    /// The adapter's own symbols could not be made global.
    Publish(libloading::Error),
    /// The plugin's shared object does not load.
    Load(libloading::Error),
    /// The object at this path has no `plugin_init`.
    NoPluginInit { path: String },
    /// `plugin_init` returned NULL.
    InitReturnedNull { path: String },
    /// The plugin struct is smaller than the fields read from it.
    StructTooSmall { path: String, size: usize },
    /// An nbdkit plugin API version other than 1 and 2.
    ApiVersion { path: String, version: c_int },
    /// The plugin has no name, or an empty one.
    NoName,
    /// The plugin lacks `open` or `get_size`.
    NoOpenOrGetSize { name: String },
    /// The plugin lacks `pread`.
    NoPread { name: String },
    /// A second plugin in the same process.
    SecondPlugin,
    /// Loading the plugin panicked.
    Panicked,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NoHostTable => f.write_str("no host table"),
            LoadError::HostTooOld { abi_version } => write!(
                f,
                "this server offers nbdhost ABI {}.{}; the nbdkit adapter needs 1.5",
                abi_version >> 16,
                abi_version & 0xffff
            ),
            LoadError::NoPath => f.write_str("no plugin path"),
            LoadError::NoOwnFile => f.write_str("cannot find the adapter's own file"),
            LoadError::Publish(e) => write!(f, "cannot publish the nbdkit functions: {e}"),
            LoadError::Load(e) => write!(f, "cannot load nbdkit plugin: {e}"),
            LoadError::NoPluginInit { path } => {
                write!(f, "{path} is not an nbdkit plugin: no symbol plugin_init")
            }
            LoadError::InitReturnedNull { path } => {
                write!(f, "{path}: plugin_init returned NULL")
            }
            LoadError::StructTooSmall { path, size } => {
                write!(f, "{path}: plugin struct too small ({size} bytes)")
            }
            LoadError::ApiVersion { path, version } => write!(
                f,
                "{path}: nbdkit plugin API version {version} is not 1 or 2"
            ),
            LoadError::NoName => f.write_str("the plugin has no name"),
            LoadError::NoOpenOrGetSize { name } => {
                write!(f, "{name}: the plugin must have open and get_size")
            }
            LoadError::NoPread { name } => write!(f, "{name}: the plugin must have pread"),
            LoadError::SecondPlugin => {
                f.write_str("the nbdkit adapter serves one plugin per process")
            }
            LoadError::Panicked => f.write_str("internal error loading the plugin"),
        }
    }
}

impl std::error::Error for LoadError {}
