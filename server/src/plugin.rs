//! Loading a plugin shared object and presenting it as a [`Backend`].
//!
//! This is the ABI edge: it checks the struct's size and version, treats
//! callbacks past the end of an older struct as absent, applies the
//! documented defaults for absent callbacks, and emulates what a plugin
//! leaves to the server (FUA by flushing, zeroing by writing zeroes,
//! caching by reading).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use nbdhost_plugin_api::{abi, Error, Flags, Result, Support, ThreadModel};

use crate::backend::{checked_block_size, Backend, ExportEntry, Extent, Handle};
use crate::host;

/// Most extents one extents call may return; more would only bloat the
/// reply (the protocol lets the server stop early).
const MAX_EXTENTS: usize = 1 << 20;

/// Static facts about a plugin or filter, as `--dump-plugin` shows them.
#[derive(Debug, Clone)]
pub struct LayerInfo {
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

/// A loaded plugin shared object.
pub struct Plugin {
    table: &'static abi::Plugin,
    info: LayerInfo,
    /// Leaked once per process so per-thread layer tracking can hold it.
    name: &'static str,
    loaded: AtomicBool,
    // Declared last so that it is dropped (dlclosed) after everything that
    // points into it.
    _lib: libloading::Library,
}

/// Resolve a callback only if the plugin's struct is long enough to hold
/// it; an older plugin's struct simply ends before newer fields.
macro_rules! cb {
    ($plugin:expr, $field:ident) => {{
        let end = std::mem::offset_of!(abi::Plugin, $field) + std::mem::size_of::<usize>();
        if ($plugin.info.struct_size as usize) >= end {
            $plugin.table.$field
        } else {
            None
        }
    }};
}

fn opt_string(p: *const c_char) -> Option<String> {
    // SAFETY: the plugin's strings are NUL-terminated and live as long as
    // the shared object, which outlives this call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
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

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(libc::EINVAL, "string contains a NUL byte"))
}

/// Check the two fields every plugin and filter struct starts with, before
/// anything else in it is read: the same ABI major, and a struct at least
/// `min_size` bytes long.
pub fn check_header(
    path: &Path,
    kind: &str,
    abi_version: u32,
    struct_size: u64,
    min_size: usize,
) -> std::result::Result<(), String> {
    let shown = path.display();
    let major = abi_version >> 16;
    if major != abi::ABI_MAJOR {
        return Err(format!(
            "{shown} was built for {kind} ABI {major}.{} but this nbdhost supports ABI {}.x; rebuild the {kind}",
            abi_version & 0xffff,
            abi::ABI_MAJOR
        ));
    }
    if (struct_size as usize) < min_size {
        return Err(format!(
            "{shown}: {kind} struct is too small ({struct_size} bytes)"
        ));
    }
    Ok(())
}

impl LayerInfo {
    /// Read the metadata of a checked struct: `strings` are its name,
    /// version, description, config help and magic config key.
    pub fn new(
        path: &Path,
        kind: &str,
        abi_version: u32,
        struct_size: u64,
        model: u32,
        strings: [*const c_char; 5],
    ) -> std::result::Result<LayerInfo, String> {
        let shown = path.display();
        let [name, version, description, config_help, magic] = strings.map(opt_string);
        Ok(LayerInfo {
            path: path.to_path_buf(),
            name: name
                .filter(|n| !n.is_empty())
                .ok_or_else(|| format!("{shown}: {kind} has no name"))?,
            version: version.unwrap_or_default(),
            description: description.unwrap_or_default(),
            config_help: config_help.unwrap_or_default(),
            magic_config_key: magic,
            thread_model: thread_model(model).map_err(|e| format!("{shown}: {e}"))?,
            abi_version,
            struct_size,
        })
    }
}

/// Open a shared object and find its entry symbol of type `E`.
pub fn library<E: Copy>(
    path: &Path,
    symbol: &str,
    kind: &str,
) -> std::result::Result<(libloading::Library, E), String> {
    let shown = path.display();
    // SAFETY: loading a plugin or filter runs its initialisers; that is the
    // point of it, and the user named this file on the command line.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load {kind} {shown}: {e}"))?;
    // SAFETY: the symbol's type is fixed by the ABI headers; callers name
    // the matching entry-point type.
    let entry = unsafe { lib.get::<E>(symbol.as_bytes()) }
        .map(|s| *s)
        .map_err(|_| format!("{shown} is not an nbdhost {kind}: no symbol {symbol}"))?;
    Ok((lib, entry))
}

impl Plugin {
    /// Load the shared object at `path` and read its table.
    pub fn load(path: &Path) -> std::result::Result<Plugin, String> {
        let shown = path.display();
        let (lib, entry) = library::<abi::PluginEntry>(path, abi::PLUGIN_ENTRY, "plugin")?;
        // SAFETY: the entry point takes the host table, which is 'static.
        let table = unsafe { entry(&host::HOST) };
        // SAFETY: the entry point returns null or a struct that lives as long
        // as the library, which this `Plugin` keeps loaded.
        let table: &'static abi::Plugin = unsafe { table.as_ref() }
            .ok_or_else(|| format!("{shown}: plugin entry point returned NULL"))?;
        let min_size =
            std::mem::offset_of!(abi::Plugin, magic_config_key) + std::mem::size_of::<usize>();
        check_header(
            path,
            "plugin",
            table.abi_version,
            table.struct_size,
            min_size,
        )?;
        let info = LayerInfo::new(
            path,
            "plugin",
            table.abi_version,
            table.struct_size,
            table.thread_model,
            [
                table.name,
                table.version,
                table.description,
                table.config_help,
                table.magic_config_key,
            ],
        )?;
        let name = info.name.clone();
        let plugin = Plugin {
            table,
            name: Box::leak(name.into_boxed_str()),
            info,
            loaded: AtomicBool::new(false),
            _lib: lib,
        };
        if let Some(load) = cb!(plugin, load) {
            // SAFETY: ABI callback with no arguments.
            let r = plugin.call(|| unsafe { load() });
            if r != 0 {
                return Err(format!(
                    "{}: load failed: {}",
                    plugin.name,
                    host::take_error("load")
                ));
            }
        }
        plugin.loaded.store(true, Ordering::Release);
        Ok(plugin)
    }

    /// Static facts about the plugin.
    pub fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn call<T>(&self, f: impl FnOnce() -> T) -> T {
        host::call_layer(self.name, f)
    }

    /// Check `r` (0 = success), collecting the recorded error otherwise.
    fn check(&self, what: &str, r: c_int) -> Result<()> {
        if r == -1 {
            Err(host::take_error(what))
        } else {
            Ok(())
        }
    }

    /// Pass one `key=value` parameter.
    pub fn config(&self, key: &str, value: &str) -> Result<()> {
        let Some(f) = cb!(self, config) else {
            return Err(Error::new(
                libc::EINVAL,
                format!("{} takes no parameters (got '{key}')", self.name),
            ));
        };
        let (k, v) = (cstring(key)?, cstring(value)?);
        // SAFETY: both strings are valid for the call.
        let r = self.call(|| unsafe { f(k.as_ptr(), v.as_ptr()) });
        self.check("config", r)
    }

    /// All parameters have been given.
    pub fn config_complete(&self) -> Result<()> {
        let Some(f) = cb!(self, config_complete) else {
            return Ok(());
        };
        // SAFETY: ABI callback with no arguments.
        let r = self.call(|| unsafe { f() });
        self.check("config_complete", r)
    }

    /// The server is about to listen.
    pub fn get_ready(&self) -> Result<()> {
        let Some(f) = cb!(self, get_ready) else {
            return Ok(());
        };
        // SAFETY: ABI callback with no arguments.
        let r = self.call(|| unsafe { f() });
        self.check("get_ready", r)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if self.loaded.swap(false, Ordering::AcqRel) {
            if let Some(f) = cb!(self, unload) {
                // SAFETY: called once, after every handle has been closed.
                self.call(|| unsafe { f() });
            }
        }
    }
}

impl Backend for Plugin {
    fn name(&self) -> &str {
        self.name
    }

    fn thread_model(&self) -> ThreadModel {
        self.info.thread_model
    }

    fn preconnect(&self, readonly: bool) -> Result<()> {
        let Some(f) = cb!(self, preconnect) else {
            return Ok(());
        };
        // SAFETY: ABI callback taking an int.
        let r = self.call(|| unsafe { f(c_int::from(readonly)) });
        self.check("preconnect", r)
    }

    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<ExportEntry>> {
        let Some(f) = cb!(self, list_exports) else {
            return Ok(vec![ExportEntry {
                name: self.default_export(readonly, is_tls)?,
                description: None,
            }]);
        };
        let mut list: Vec<ExportEntry> = Vec::new();
        let ptr = (&mut list as *mut Vec<ExportEntry>).cast::<abi::Exports>();
        // SAFETY: `ptr` is the list host_add_export expects and outlives the call.
        let r = self.call(|| unsafe { f(c_int::from(readonly), c_int::from(is_tls), ptr) });
        self.check("list_exports", r)?;
        Ok(list)
    }

    fn default_export(&self, readonly: bool, is_tls: bool) -> Result<String> {
        let Some(f) = cb!(self, default_export) else {
            return Ok(String::new());
        };
        // SAFETY: ABI callback taking two ints; the result is copied at once.
        let p = self.call(|| unsafe { f(c_int::from(readonly), c_int::from(is_tls)) });
        opt_string(p).ok_or_else(|| host::take_error("default_export"))
    }

    fn open(&self, readonly: bool) -> Result<Box<dyn Handle>> {
        let Some(f) = cb!(self, open) else {
            return Err(Error::new(
                libc::EINVAL,
                format!("{} has no open callback", self.name),
            ));
        };
        // SAFETY: ABI callback taking an int; returns null on failure.
        let h = self.call(|| unsafe { f(c_int::from(readonly)) });
        if h.is_null() {
            return Err(host::take_error("open"));
        }
        Ok(Box::new(PluginHandle {
            plugin: self as *const Plugin,
            handle: h,
            readonly,
            zero_native: AtomicBool::new(true),
            fua: OnceLock::new(),
        }))
    }
}

/// One open plugin handle.
struct PluginHandle {
    // The plugin outlives every handle: connections are drained before the
    // plugin is dropped (see `server`), so a raw pointer avoids an Arc on
    // every call.
    plugin: *const Plugin,
    handle: *mut c_void,
    readonly: bool,
    /// Cleared after the plugin's zero said ENOTSUP, to skip the attempt.
    zero_native: AtomicBool,
    /// The plugin's FUA answer, asked once: every write consults it.
    fua: OnceLock<Support>,
}

// SAFETY: the handle is an opaque token the plugin hands back on every call;
// the plugin's thread model, enforced by the worker pool, decides which
// calls may overlap.
unsafe impl Send for PluginHandle {}
// SAFETY: as for Send.
unsafe impl Sync for PluginHandle {}

impl PluginHandle {
    fn p(&self) -> &Plugin {
        // SAFETY: see the `plugin` field: the plugin outlives its handles.
        unsafe { &*self.plugin }
    }

    /// Call a `can_*`-style callback, or return `absent` if not provided.
    fn ask(
        &self,
        f: Option<abi::HandleFn>,
        what: &str,
        absent: impl FnOnce() -> Result<c_int>,
    ) -> Result<c_int> {
        let Some(f) = f else { return absent() };
        // SAFETY: ABI callback taking our live handle.
        let r = self.p().call(|| unsafe { f(self.handle) });
        if r < 0 {
            Err(host::take_error(what))
        } else {
            Ok(r)
        }
    }

    fn range(
        &self,
        f: abi::RangeFn,
        what: &str,
        count: u64,
        offset: u64,
        flags: Flags,
    ) -> Result<()> {
        // SAFETY: ABI callback taking our live handle and plain integers.
        let r = self
            .p()
            .call(|| unsafe { f(self.handle, count, offset, flags.bits()) });
        self.p().check(what, r)
    }

    fn fua_support(&self) -> Result<Support> {
        if let Some(s) = self.fua.get() {
            return Ok(*s);
        }
        let s = self.can_fua()?;
        Ok(*self.fua.get_or_init(|| s))
    }

    /// After a write-type call with FUA that the plugin only emulates.
    fn fua_flush(&self, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FUA) && self.fua_support()? == Support::Emulate {
            self.flush(Flags::empty())?;
        }
        Ok(())
    }

    /// The plugin's flags for a write-type call: FUA only if it is native.
    fn native_flags(&self, flags: Flags) -> Result<Flags> {
        if flags.contains(Flags::FUA) && self.fua_support()? != Support::Native {
            Ok(flags - Flags::FUA)
        } else {
            Ok(flags)
        }
    }
}

impl Drop for PluginHandle {
    fn drop(&mut self) {
        if let Some(f) = cb!(self.p(), close) {
            // SAFETY: each handle is closed exactly once, here.
            self.p().call(|| unsafe { f(self.handle) });
        }
    }
}

fn support(v: c_int) -> Support {
    match v {
        0 => Support::None,
        1 => Support::Emulate,
        _ => Support::Native,
    }
}

impl Handle for PluginHandle {
    fn get_size(&self) -> Result<u64> {
        let Some(f) = cb!(self.p(), get_size) else {
            return Err(Error::new(
                libc::EINVAL,
                format!("{} has no get_size callback", self.p().name),
            ));
        };
        // SAFETY: ABI callback taking our live handle.
        let r = self.p().call(|| unsafe { f(self.handle) });
        u64::try_from(r).map_err(|_| host::take_error("get_size"))
    }

    fn block_size(&self) -> Result<Option<(u32, u32, u32)>> {
        let Some(f) = cb!(self.p(), block_size) else {
            return Ok(None);
        };
        let (mut min, mut pref, mut max) = (0u32, 0u32, 0u32);
        // SAFETY: ABI callback writing three u32s into our locals.
        let r = self
            .p()
            .call(|| unsafe { f(self.handle, &mut min, &mut pref, &mut max) });
        self.p().check("block_size", r)?;
        checked_block_size(self.p().name, min, pref, max)
    }

    fn can_write(&self) -> Result<bool> {
        if self.readonly {
            return Ok(false);
        }
        let has_pwrite = cb!(self.p(), pwrite).is_some();
        Ok(self.ask(cb!(self.p(), can_write), "can_write", || {
            Ok(c_int::from(has_pwrite))
        })? != 0
            && has_pwrite)
    }

    fn can_flush(&self) -> Result<bool> {
        let has = cb!(self.p(), flush).is_some();
        Ok(self.ask(cb!(self.p(), can_flush), "can_flush", || {
            Ok(c_int::from(has))
        })? != 0
            && has)
    }

    fn can_trim(&self) -> Result<bool> {
        let has = cb!(self.p(), trim).is_some();
        Ok(self.can_write()?
            && self.ask(cb!(self.p(), can_trim), "can_trim", || Ok(c_int::from(has)))? != 0
            && has)
    }

    fn can_zero(&self) -> Result<bool> {
        // Zeroing is always possible on a writable export: the server falls
        // back to writing zeroes.
        Ok(self.can_write()? && self.ask(cb!(self.p(), can_zero), "can_zero", || Ok(1))? != 0)
    }

    fn can_fast_zero(&self) -> Result<bool> {
        // Without a zero callback every fast-zero request fails at once with
        // ENOTSUP, which is exactly what the flag asks for.
        let has_zero = cb!(self.p(), zero).is_some();
        Ok(self.can_zero()?
            && self.ask(cb!(self.p(), can_fast_zero), "can_fast_zero", || {
                Ok(c_int::from(!has_zero))
            })? != 0)
    }

    fn can_fua(&self) -> Result<Support> {
        if !self.can_write()? {
            return Ok(Support::None);
        }
        let v = self.ask(cb!(self.p(), can_fua), "can_fua", || {
            Ok(if self.can_flush()? {
                abi::SUPPORT_EMULATE
            } else {
                abi::SUPPORT_NONE
            })
        })?;
        Ok(support(v))
    }

    fn can_multi_conn(&self) -> Result<bool> {
        Ok(self.ask(cb!(self.p(), can_multi_conn), "can_multi_conn", || Ok(0))? != 0)
    }

    fn can_cache(&self) -> Result<Support> {
        let has = cb!(self.p(), cache).is_some();
        let v = self.ask(cb!(self.p(), can_cache), "can_cache", || {
            Ok(if has {
                abi::SUPPORT_NATIVE
            } else {
                abi::SUPPORT_NONE
            })
        })?;
        Ok(match support(v) {
            Support::Native if !has => Support::Emulate,
            s => s,
        })
    }

    fn can_extents(&self) -> Result<bool> {
        let has = cb!(self.p(), extents).is_some();
        Ok(self.ask(cb!(self.p(), can_extents), "can_extents", || {
            Ok(c_int::from(has))
        })? != 0
            && has)
    }

    fn is_rotational(&self) -> Result<bool> {
        Ok(self.ask(cb!(self.p(), is_rotational), "is_rotational", || Ok(0))? != 0)
    }

    fn export_description(&self) -> Result<Option<String>> {
        let Some(f) = cb!(self.p(), export_description) else {
            return Ok(None);
        };
        // SAFETY: ABI callback taking our live handle; the string is copied.
        let p = self.p().call(|| unsafe { f(self.handle) });
        Ok(opt_string(p))
    }

    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = cb!(self.p(), pread) else {
            return Err(Error::new(
                libc::EINVAL,
                format!("{} has no pread callback", self.p().name),
            ));
        };
        // SAFETY: `buf` is writable for its whole length during the call.
        let r = self.p().call(|| unsafe {
            f(
                self.handle,
                buf.as_mut_ptr().cast(),
                buf.len() as u64,
                offset,
                flags.bits(),
            )
        });
        self.p().check("pread", r)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = cb!(self.p(), pwrite) else {
            return Err(Error::errno(libc::EROFS));
        };
        let native = self.native_flags(flags)?;
        // SAFETY: `buf` is readable for its whole length during the call.
        let r = self.p().call(|| unsafe {
            f(
                self.handle,
                buf.as_ptr().cast(),
                buf.len() as u64,
                offset,
                native.bits(),
            )
        });
        self.p().check("pwrite", r)?;
        self.fua_flush(flags)
    }

    fn flush(&self, flags: Flags) -> Result<()> {
        let Some(f) = cb!(self.p(), flush) else {
            return Err(Error::errno(libc::EINVAL));
        };
        // SAFETY: ABI callback taking our live handle.
        let r = self.p().call(|| unsafe { f(self.handle, flags.bits()) });
        self.p().check("flush", r)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = cb!(self.p(), trim) else {
            return Err(Error::errno(libc::EINVAL));
        };
        self.range(f, "trim", count, offset, self.native_flags(flags)?)?;
        self.fua_flush(flags)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let native = self.native_flags(flags)?;
        if let Some(f) = cb!(self.p(), zero).filter(|_| self.zero_native.load(Ordering::Relaxed)) {
            match self.range(f, "zero", count, offset, native) {
                Ok(()) => return self.fua_flush(flags),
                Err(e) if e.raw_errno() == libc::ENOTSUP => {
                    if !flags.contains(Flags::FAST_ZERO) {
                        self.zero_native.store(false, Ordering::Relaxed);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        crate::backend::write_zeroes(self, count, offset, flags)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags) -> Result<Vec<Extent>> {
        let Some(f) = cb!(self.p(), extents) else {
            return Ok(vec![Extent {
                offset,
                length: count,
                flags: 0,
            }]);
        };
        let mut c = ExtentCollector::new(offset);
        let ptr = (&mut c as *mut ExtentCollector).cast::<abi::Extents>();
        // SAFETY: `ptr` is the collector host_add_extent expects; it
        // outlives the call.
        let r = self
            .p()
            .call(|| unsafe { f(self.handle, count, offset, flags.bits(), ptr) });
        self.p().check("extents", r)?;
        if c.items.is_empty() {
            return Err(Error::new(
                libc::EIO,
                format!(
                    "{}: extents returned no extent at offset {offset}",
                    self.p().name
                ),
            ));
        }
        Ok(c.items)
    }

    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match (self.can_cache()?, cb!(self.p(), cache)) {
            (Support::Native, Some(f)) => self.range(f, "cache", count, offset, flags),
            (Support::None, _) => Err(Error::errno(libc::EINVAL)),
            _ => {
                const CHUNK: u64 = 1 << 20;
                let mut buf = vec![0u8; CHUNK.min(count) as usize];
                let (mut count, mut offset) = (count, offset);
                while count > 0 {
                    let n = CHUNK.min(count);
                    self.pread(&mut buf[..n as usize], offset, Flags::empty())?;
                    count -= n;
                    offset += n;
                }
                Ok(())
            }
        }
    }
}

/// The list behind `struct nbdhost_extents`: checks that a plugin adds
/// extents in order and without gaps, and merges neighbours of one type.
pub struct ExtentCollector {
    next: u64,
    items: Vec<Extent>,
}

impl ExtentCollector {
    /// An empty list for a range starting at `start`.
    pub fn new(start: u64) -> Self {
        ExtentCollector {
            next: start,
            items: Vec::new(),
        }
    }

    /// The extents gathered so far.
    pub fn extents(&self) -> &[Extent] {
        &self.items
    }

    /// Append one extent, as `host->add_extent` does.
    pub fn add(&mut self, offset: u64, length: u64, typ: u32) -> Result<()> {
        let end = offset
            .checked_add(length)
            .ok_or_else(|| Error::new(libc::EINVAL, "extent overflows"))?;
        if end <= self.next {
            // Wholly before the request or already covered: ignore.
            return Ok(());
        }
        if offset > self.next {
            return Err(Error::new(
                libc::EINVAL,
                format!(
                    "extents must be contiguous: expected offset {}, got {offset}",
                    self.next
                ),
            ));
        }
        let flags = typ & (abi::EXTENT_HOLE | abi::EXTENT_ZERO);
        let full = self.items.len() >= MAX_EXTENTS;
        match self.items.last_mut() {
            Some(last) if last.flags == flags => last.length += end - self.next,
            _ if full => return Ok(()),
            _ => self.items.push(Extent {
                offset: self.next,
                length: end - self.next,
                flags,
            }),
        }
        self.next = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_clips_merges_and_rejects_gaps() {
        let mut c = ExtentCollector::new(100);
        c.add(0, 50, 0).unwrap();
        c.add(50, 100, 0).unwrap();
        c.add(150, 50, 0).unwrap();
        c.add(200, 10, 3).unwrap();
        assert_eq!(
            c.items,
            vec![
                Extent {
                    offset: 100,
                    length: 100,
                    flags: 0
                },
                Extent {
                    offset: 200,
                    length: 10,
                    flags: 3
                }
            ]
        );
        assert!(c.add(300, 1, 0).is_err());
    }
}
