//! Loading a plugin or filter shared object: the one loader both go
//! through. It finds the entry symbol, checks the struct's ABI major and
//! size before reading anything else, reads the metadata, treats fields
//! past the end of an older struct as absent, and runs the calls every
//! layer shares (`load`, `config`, `config_complete`, `get_ready`,
//! `unload`) the same way for both kinds.

use std::ffi::{c_char, c_int, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use nbdhost_plugin_api::{abi, Error, Result, ThreadModel};

use super::connection::Connection;
use super::host::{call, context, names};
use super::instances;
use super::load_error::LoadError;

/// Static facts about a plugin or filter, as `--dump-plugin` shows them.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// "plugin" or "filter".
    pub kind: &'static str,
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub description: String,
    pub config_help: String,
    pub magic_config_key: Option<String>,
    pub thread_model: ThreadModel,
    pub abi_version: u32,
    pub struct_size: u64,
}

/// Whether a struct of `struct_size` bytes reaches the end of a field
/// that starts at `offset`: an older struct simply ends before newer
/// fields.
pub fn reaches(struct_size: u64, offset: usize, size: usize) -> bool {
    struct_size as usize >= offset + size
}

/// Field `$field` of a layer's `$table` (of struct type `$ty`), or `None`
/// if the layer's struct is too old to have it.
macro_rules! field {
    ($table:expr, $ty:ty, $field:ident) => {{
        let t: &$ty = $table;
        let offset = std::mem::offset_of!($ty, $field);
        // Only the size of the field's type is taken here, nothing is read.
        let size = std::mem::size_of_val(&t.$field);
        if $crate::layers::loader::reaches(t.struct_size, offset, size) {
            Some(t.$field)
        } else {
            None
        }
    }};
}
pub(crate) use field;

/// The accessors of [`LayerTable`] that read fields both structs have under
/// the same names, for struct type `$ty`.
macro_rules! shared_fields {
    ($ty:ty) => {
        fn abi_version(&self) -> u32 {
            self.abi_version
        }

        fn struct_size(&self) -> u64 {
            self.struct_size
        }

        fn thread_model(&self) -> u32 {
            self.thread_model
        }

        fn common(&self) -> $crate::layers::loader::Common {
            $crate::layers::loader::Common {
                load: field!(self, $ty, load).flatten(),
                unload: field!(self, $ty, unload).flatten(),
                config: field!(self, $ty, config).flatten(),
                config_complete: field!(self, $ty, config_complete).flatten(),
                get_ready: field!(self, $ty, get_ready).flatten(),
                capabilities: field!(self, $ty, capabilities).flatten(),
                configured_thread_model: field!(self, $ty, configured_thread_model).flatten(),
                after_fork: field!(self, $ty, after_fork).flatten(),
            }
        }
    };
}
pub(crate) use shared_fields;

/// The calls both kinds of layer have, as a table provides them.
pub struct Common {
    pub load: Option<unsafe extern "C" fn() -> c_int>,
    pub unload: Option<unsafe extern "C" fn()>,
    pub config: Option<unsafe extern "C" fn(key: *const c_char, value: *const c_char) -> c_int>,
    pub config_complete: Option<unsafe extern "C" fn() -> c_int>,
    pub get_ready: Option<unsafe extern "C" fn() -> c_int>,
    pub capabilities: Option<unsafe extern "C" fn() -> u64>,
    pub configured_thread_model: Option<unsafe extern "C" fn() -> c_int>,
    pub after_fork: Option<unsafe extern "C" fn() -> c_int>,
}

/// A plugin or filter struct, as its entry point returns it.
pub trait LayerTable: Sync + 'static {
    /// "plugin" or "filter", for messages.
    const KIND: &'static str;
    /// The entry symbol.
    const ENTRY: &'static str;
    /// The entry point's type.
    type Entry: Copy;
    /// The symbol of an adapter for layers of another server.
    const ADAPTER_ENTRY: &'static str;
    /// The adapter entry point's type.
    type AdapterEntry: Copy;
    /// Call the entry point.
    ///
    /// # Safety
    /// `entry` must be the layer's entry symbol.
    unsafe fn call_entry(entry: Self::Entry) -> *const Self;
    /// Call an adapter's entry point for the foreign layer at `path`.
    ///
    /// # Safety
    /// `entry` must be an adapter's entry symbol and `path` a C string.
    unsafe fn call_adapter_entry(entry: Self::AdapterEntry, path: *const c_char) -> *const Self;
    /// Size of the smallest struct accepted: up to the metadata strings.
    fn min_size() -> usize;
    fn abi_version(&self) -> u32;
    fn struct_size(&self) -> u64;
    fn thread_model(&self) -> u32;
    /// Name, version, description, config help and magic config key.
    fn strings(&self) -> [*const c_char; 5];
    /// The shared calls present in this struct.
    fn common(&self) -> Common;
}

/// A loaded shared object and its table.
pub struct Library<T: LayerTable> {
    table: &'static T,
    info: LayerInfo,
    /// Interned, so per-thread layer tracking can hold it.
    name: &'static str,
    loaded: bool,
    /// What the layer said of its calls once ready: they never wait.
    nonblocking: AtomicBool,
    /// The layer asked that its asynchronous callbacks not be used.
    synchronous: AtomicBool,
    /// The thread model as configured: the struct's, or stricter once the
    /// layer has said so after `config_complete`.
    thread_model: AtomicU32,
    // Declared last so that it is dropped (dlclosed) after everything that
    // points into it.
    _lib: instances::Loaded,
}

fn opt_string(p: *const c_char) -> Option<String> {
    // SAFETY: a layer's strings are NUL-terminated and live as long as its
    // shared object, which outlives this call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A string from a layer that may be absent or empty.
pub fn layer_string(p: *const c_char) -> Option<String> {
    opt_string(p)
}

/// A path a layer returned (null for none), copied at once: any bytes but
/// NUL make a Unix path, so none is lost to UTF-8.
pub fn layer_path(p: *const c_char) -> Option<std::path::PathBuf> {
    if p.is_null() {
        return None;
    }
    // SAFETY: a non-null string from a layer is NUL-terminated and valid
    // until the layer's next call on this thread, which comes after this.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    Some(std::ffi::OsStr::from_bytes(bytes).into())
}

/// Decode a `thread_model` field.
pub fn thread_model(v: u32) -> Result<ThreadModel> {
    Ok(match v {
        abi::THREAD_MODEL_SERIALIZE_CONNECTIONS => ThreadModel::SerializeConnections,
        abi::THREAD_MODEL_SERIALIZE_ALL_REQUESTS => ThreadModel::SerializeAllRequests,
        abi::THREAD_MODEL_SERIALIZE_REQUESTS => ThreadModel::SerializeRequests,
        abi::THREAD_MODEL_PARALLEL => ThreadModel::Parallel,
        other => {
            return Err(Error::new(
                libc::EINVAL,
                format!("unknown thread model {other}"),
            ))
        }
    })
}

/// A C string for a layer; a NUL inside is an error.
pub fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(libc::EINVAL, "string contains a NUL byte"))
}

fn check_header(
    path: &Path,
    kind: &'static str,
    abi_version: u32,
    struct_size: u64,
    min: usize,
) -> std::result::Result<(), LoadError> {
    let major = abi_version >> 16;
    if major != abi::ABI_MAJOR {
        return Err(LoadError::Abi {
            kind,
            path: path.to_path_buf(),
            abi_version,
            supported: abi::ABI_MAJOR,
        });
    }
    if (struct_size as usize) < min {
        return Err(LoadError::TooSmall {
            kind,
            path: path.to_path_buf(),
            struct_size,
        });
    }
    Ok(())
}

/// Where a layer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An nbdhost plugin or filter.
    Native(PathBuf),
    /// A layer written for another server, served by an adapter.
    Adapted { adapter: PathBuf, foreign: PathBuf },
}

impl<T: LayerTable> Library<T> {
    /// Load a layer from where it comes from.
    pub fn load(origin: &Origin) -> std::result::Result<Library<T>, LoadError> {
        match origin {
            Origin::Native(path) => Library::open(path),
            Origin::Adapted { adapter, foreign } => Library::open_adapted(adapter, foreign),
        }
    }

    /// Load the shared object at `path`, check and read its table, and run
    /// its `load` callback.
    fn open(path: &Path) -> std::result::Result<Library<T>, LoadError> {
        let kind = T::KIND;
        let lib = instances::open(path, kind)?;
        // SAFETY: the symbol's type is fixed by the ABI headers.
        let entry = unsafe { lib.lib.get::<T::Entry>(T::ENTRY.as_bytes()) }
            .map(|s| *s)
            .map_err(|_| {
                // SAFETY: only looked up, never called.
                if unsafe { lib.lib.get::<T::AdapterEntry>(T::ADAPTER_ENTRY.as_bytes()) }.is_ok() {
                    LoadError::IsAdapter {
                        kind,
                        path: path.to_path_buf(),
                    }
                } else {
                    LoadError::NoEntry {
                        kind,
                        path: path.to_path_buf(),
                        symbol: T::ENTRY,
                    }
                }
            })?;
        // SAFETY: `entry` is the layer's entry symbol.
        let table = unsafe { T::call_entry(entry) };
        Library::with_table(lib, table, path)
    }

    /// Load the adapter at `adapter` and have it describe `foreign`, a
    /// layer written for another server; then as [`Library::open`].
    fn open_adapted(adapter: &Path, foreign: &Path) -> std::result::Result<Library<T>, LoadError> {
        let kind = T::KIND;
        let mut lib = instances::open(adapter, kind)?;
        lib.hold(instances::claim_only(foreign, kind)?);
        // SAFETY: the symbol's type is fixed by the ABI headers.
        let entry = unsafe { lib.lib.get::<T::AdapterEntry>(T::ADAPTER_ENTRY.as_bytes()) }
            .map(|s| *s)
            .map_err(|_| LoadError::NoAdapterEntry {
                kind,
                path: adapter.to_path_buf(),
                symbol: T::ADAPTER_ENTRY,
            })?;
        let path = cstring(&foreign.to_string_lossy()).map_err(LoadError::ForeignPath)?;
        // SAFETY: `entry` is the adapter's entry symbol; the path outlives
        // the call.
        let table = call::call_layer("adapter", || unsafe {
            T::call_adapter_entry(entry, path.as_ptr())
        });
        if table.is_null() {
            return Err(LoadError::Adapter {
                foreign: foreign.to_path_buf(),
                error: call::take_error("loading it"),
            });
        }
        Library::with_table(lib, table, foreign)
    }

    /// Check and read the table an entry point returned, then run `load`.
    fn with_table(
        lib: instances::Loaded,
        table: *const T,
        path: &Path,
    ) -> std::result::Result<Library<T>, LoadError> {
        let kind = T::KIND;
        // SAFETY: the entry point returns null or a struct that lives as
        // long as the library, which this `Library` keeps loaded.
        let table: &'static T = unsafe { table.as_ref() }.ok_or_else(|| LoadError::NullTable {
            kind,
            path: path.to_path_buf(),
        })?;
        // Nothing beyond these two fields may be read before they pass.
        check_header(
            path,
            kind,
            table.abi_version(),
            table.struct_size(),
            T::min_size(),
        )?;
        let [name, version, description, config_help, magic] = table.strings().map(opt_string);
        let info = LayerInfo {
            kind,
            path: path.to_path_buf(),
            name: name
                .filter(|n| !n.is_empty())
                .ok_or_else(|| LoadError::NoName {
                    kind,
                    path: path.to_path_buf(),
                })?,
            version: version.unwrap_or_default(),
            description: description.unwrap_or_default(),
            config_help: config_help.unwrap_or_default(),
            magic_config_key: magic,
            thread_model: thread_model(table.thread_model()).map_err(|error| {
                LoadError::ThreadModel {
                    path: path.to_path_buf(),
                    error,
                }
            })?,
            abi_version: table.abi_version(),
            struct_size: table.struct_size(),
        };
        let mut l = Library {
            table,
            name: names::intern(&info.name),
            info,
            loaded: false,
            nonblocking: AtomicBool::new(false),
            synchronous: AtomicBool::new(false),
            thread_model: AtomicU32::new(table.thread_model()),
            _lib: lib,
        };
        if let Some(load) = l.table.common().load {
            // SAFETY: ABI callback with no arguments.
            if l.call(|| unsafe { load() }) != 0 {
                return Err(LoadError::LoadCallback {
                    name: l.name.to_string(),
                    error: call::take_error("load"),
                });
            }
        }
        l.loaded = true;
        Ok(l)
    }

    /// The layer's table.
    pub fn table(&self) -> &'static T {
        self.table
    }

    /// Static facts about the layer.
    pub fn info(&self) -> &LayerInfo {
        &self.info
    }

    /// The layer's name, for logs and host-service attribution.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Run `f` as a call into this layer made for no connection
    /// (configuration, start-up, unload), collecting the error it records.
    pub fn call<R>(&self, f: impl FnOnce() -> R) -> R {
        context::with_connection(None, || call::call_layer(self.name, f))
    }

    /// Run `f` as a call into this layer made for `conn`: the host
    /// functions it calls answer for that connection. Collects the error
    /// it records.
    pub fn call_for<R>(&self, conn: &Arc<Connection>, f: impl FnOnce() -> R) -> R {
        context::with_connection(Some(conn), || call::call_layer(self.name, f))
    }

    /// Check `r` (-1 = failure), collecting the recorded error.
    pub fn check(&self, what: &str, r: c_int) -> Result<()> {
        if r == -1 {
            Err(call::take_error(what))
        } else {
            Ok(())
        }
    }

    /// Offer one `key=value` parameter: the callback's non-negative result,
    /// or `None` if the layer takes no parameters at all.
    pub fn config(&self, key: &str, value: &str) -> Result<Option<c_int>> {
        let Some(f) = self.table.common().config else {
            return Ok(None);
        };
        let (k, v) = (cstring(key)?, cstring(value)?);
        // SAFETY: both strings are valid for the call.
        let r = self.call(|| unsafe { f(k.as_ptr(), v.as_ptr()) });
        self.check("config", r)?;
        Ok(Some(r))
    }

    /// All parameters have been given; then the layer may say that, as
    /// configured, it needs a stricter thread model.
    pub fn config_complete(&self) -> Result<()> {
        let common = self.table.common();
        if let Some(f) = common.config_complete {
            // SAFETY: ABI callback with no arguments.
            let r = self.call(|| unsafe { f() });
            self.check("config_complete", r)?;
        }
        if let Some(f) = common.configured_thread_model {
            // SAFETY: ABI callback with no arguments.
            let r = self.call(|| unsafe { f() });
            let model = u32::try_from(r).map_err(|_| call::take_error("thread_model"))?;
            thread_model(model)?;
            self.thread_model.fetch_min(model, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The thread model, as configured.
    pub fn thread_model(&self) -> ThreadModel {
        // Only valid values are ever stored: the struct's was checked at
        // load, a configured one before it was stored.
        thread_model(self.thread_model.load(Ordering::Relaxed))
            .unwrap_or(ThreadModel::SerializeConnections)
    }

    /// The server is serving (in the background, if it went there).
    pub fn after_fork(&self) -> Result<()> {
        let Some(f) = self.table.common().after_fork else {
            return Ok(());
        };
        // SAFETY: ABI callback with no arguments.
        let r = self.call(|| unsafe { f() });
        // Named here: by now the chain is stacked and no longer says which
        // layer failed.
        self.check("after_fork", r)
            .map_err(|e| Error::new(e.raw_errno(), format!("{}: {e}", self.name)))
    }

    /// The server is about to listen; then the layer says what it can.
    pub fn get_ready(&self) -> Result<()> {
        let common = self.table.common();
        if let Some(f) = common.get_ready {
            // SAFETY: ABI callback with no arguments.
            let r = self.call(|| unsafe { f() });
            self.check("get_ready", r)?;
        }
        if let Some(f) = common.capabilities {
            // SAFETY: ABI callback with no arguments.
            let caps = self.call(|| unsafe { f() });
            self.nonblocking
                .store(caps & abi::NONBLOCKING != 0, Ordering::Relaxed);
            self.synchronous
                .store(caps & abi::SYNCHRONOUS != 0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether the layer, as configured, never waits in a call.
    pub fn nonblocking(&self) -> bool {
        self.nonblocking.load(Ordering::Relaxed)
    }

    /// Whether the layer, as configured, asks that its asynchronous
    /// callbacks not be used (ABI 1.9).
    pub fn synchronous(&self) -> bool {
        self.synchronous.load(Ordering::Relaxed)
    }
}

impl<T: LayerTable> Drop for Library<T> {
    fn drop(&mut self) {
        if !self.loaded {
            return;
        }
        if let Some(f) = self.table.common().unload {
            // SAFETY: called once, when nothing refers to the layer any more:
            // every handle holds the library, so all are closed.
            self.call(|| unsafe { f() });
        }
    }
}
