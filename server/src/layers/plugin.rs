//! A plugin shared object presented as a [`Backend`]: the bottom of every
//! chain.
//!
//! This is an ABI edge: callbacks past the end of an older struct are
//! absent, absent callbacks get the documented defaults, and what a plugin
//! leaves to the server is emulated here (FUA by flushing, zeroing by
//! writing zeroes, caching by reading).

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use nbdhost_plugin_api::{abi, Error, Flags, Result, Support, ThreadModel};

use super::backend::{checked_block_size, write_zeroes, AsyncOp, Backend, Handle};
use super::connection::Connection;
use super::export_list::ExportCollector;
use super::extents::ExtentCollector;
use super::host::{call, table};
use super::inflight::Token;
use super::load_error::LoadError;
use super::loader::{
    field, layer_path, layer_string, shared_fields, LayerInfo, LayerTable, Library, Origin,
};
use crate::protocol::export::{ExportEntry, Extent};

impl LayerTable for abi::Plugin {
    const KIND: &'static str = "plugin";
    const ENTRY: &'static str = abi::PLUGIN_ENTRY;
    type Entry = abi::PluginEntry;
    const ADAPTER_ENTRY: &'static str = abi::PLUGIN_ADAPTER_ENTRY;
    type AdapterEntry = abi::PluginAdapterEntry;

    unsafe fn call_entry(entry: abi::PluginEntry) -> *const abi::Plugin {
        // SAFETY: the caller passes the plugin's entry point, which takes
        // the host table; the table is 'static.
        unsafe { entry(&table::HOST) }
    }

    unsafe fn call_adapter_entry(
        entry: abi::PluginAdapterEntry,
        path: *const c_char,
    ) -> *const abi::Plugin {
        // SAFETY: as for the entry point, with the path the caller passes.
        unsafe { entry(&table::HOST, path) }
    }

    fn min_size() -> usize {
        std::mem::offset_of!(abi::Plugin, magic_config_key) + std::mem::size_of::<usize>()
    }

    fn strings(&self) -> [*const c_char; 5] {
        [
            self.name,
            self.version,
            self.description,
            self.config_help,
            self.magic_config_key,
        ]
    }

    shared_fields!(abi::Plugin);
}

/// A plugin callback, or `None` if absent or past the end of its struct.
macro_rules! cb {
    ($lib:expr, $field:ident) => {
        field!($lib.table(), abi::Plugin, $field).flatten()
    };
}

/// A plugin's asynchronous callbacks (ABI 1.9).
#[derive(Default)]
pub(super) struct AsyncCallbacks {
    pub pread: Option<abi::AsyncPreadFn>,
    pub pwrite: Option<abi::AsyncPwriteFn>,
    pub flush: Option<abi::AsyncFlushFn>,
    pub trim: Option<abi::AsyncRangeFn>,
    pub zero: Option<abi::AsyncRangeFn>,
    pub cache: Option<abi::AsyncRangeFn>,
    pub extents: Option<abi::AsyncExtentsFn>,
}

/// A loaded plugin.
pub struct Plugin {
    lib: Arc<Library<abi::Plugin>>,
}

impl Plugin {
    /// Load the plugin from where it comes from.
    pub fn load(origin: &Origin) -> std::result::Result<Plugin, LoadError> {
        Ok(Plugin {
            lib: Arc::new(Library::load(origin)?),
        })
    }

    /// Static facts about the plugin.
    pub fn info(&self) -> &LayerInfo {
        self.lib.info()
    }

    /// Pass one `key=value` parameter.
    pub fn config(&self, key: &str, value: &str) -> Result<()> {
        match self.lib.config(key, value)? {
            Some(_) => Ok(()),
            None => Err(Error::new(
                libc::EINVAL,
                format!(
                    "{} takes no parameters (got '{key}={value}')",
                    self.lib.name()
                ),
            )),
        }
    }

    /// All parameters have been given.
    pub fn config_complete(&self) -> Result<()> {
        self.lib.config_complete()
    }

    /// The server is about to listen.
    pub fn get_ready(&self) -> Result<()> {
        self.lib.get_ready()
    }

    /// Let the plugin print its own `--dump-plugin` lines.
    pub fn dump_plugin(&self) {
        if let Some(f) = cb!(self.lib, dump_plugin) {
            // SAFETY: ABI callback with no arguments.
            self.lib.call(|| unsafe { f() });
            // A C plugin prints with stdio, whose buffer would otherwise
            // come out after what the server prints next.
            // SAFETY: fflush(NULL) flushes every stdio stream.
            unsafe { libc::fflush(std::ptr::null_mut()) };
        }
    }
}

impl Backend for Plugin {
    fn name(&self) -> &str {
        self.lib.name()
    }

    fn thread_model(&self) -> ThreadModel {
        self.lib.thread_model()
    }

    fn nonblocking(&self) -> bool {
        self.lib.nonblocking()
    }

    fn after_fork(&self) -> Result<()> {
        self.lib.after_fork()
    }

    fn preconnect(&self, conn: &Arc<Connection>, readonly: bool) -> Result<()> {
        let Some(f) = cb!(self.lib, preconnect) else {
            return Ok(());
        };
        // SAFETY: ABI callback taking an int.
        let r = self
            .lib
            .call_for(conn, || unsafe { f(c_int::from(readonly)) });
        self.lib.check("preconnect", r)
    }

    fn list_exports(
        &self,
        conn: &Arc<Connection>,
        readonly: bool,
        is_tls: bool,
    ) -> Result<Vec<ExportEntry>> {
        let Some(f) = cb!(self.lib, list_exports) else {
            // As nbdkit: a default export that cannot be named is left
            // out, and the list is empty rather than an error.
            return Ok(match self.default_export(conn, readonly, is_tls) {
                Ok(name) => vec![ExportEntry {
                    name,
                    description: None,
                }],
                Err(e) => {
                    log::warn!("{}: default_export: {e}; nothing to list", self.info().name);
                    Vec::new()
                }
            });
        };
        let mut list = ExportCollector::default();
        let ptr = list.as_abi();
        // SAFETY: `ptr` is the list host_add_export expects and outlives the call.
        let r = self.lib.call_for(conn, || unsafe {
            f(c_int::from(readonly), c_int::from(is_tls), ptr)
        });
        self.lib.check("list_exports", r)?;
        Ok(list.into_entries())
    }

    fn default_export(
        &self,
        conn: &Arc<Connection>,
        readonly: bool,
        is_tls: bool,
    ) -> Result<String> {
        let Some(f) = cb!(self.lib, default_export) else {
            return Ok(String::new());
        };
        // SAFETY: ABI callback taking two ints; the result is copied at once.
        let p = self.lib.call_for(conn, || unsafe {
            f(c_int::from(readonly), c_int::from(is_tls))
        });
        layer_string(p).ok_or_else(|| call::take_error("default_export"))
    }

    fn open(&self, conn: Arc<Connection>, readonly: bool) -> Result<Box<dyn Handle>> {
        let Some(f) = cb!(self.lib, open) else {
            return Err(Error::new(
                libc::EINVAL,
                format!("{} has no open callback", self.lib.name()),
            ));
        };
        // SAFETY: ABI callback taking an int; returns null on failure.
        let h = self
            .lib
            .call_for(&conn, || unsafe { f(c_int::from(readonly)) });
        if h.is_null() {
            return Err(call::take_error("open"));
        }
        Ok(Box::new(PluginHandle {
            lib: self.lib.clone(),
            handle: h,
            conn,
            readonly,
            zero_native: AtomicBool::new(true),
            fua: OnceLock::new(),
        }))
    }
}

/// One open plugin handle. It holds its library, so the plugin cannot be
/// unloaded while the handle is open.
pub(super) struct PluginHandle {
    lib: Arc<Library<abi::Plugin>>,
    handle: *mut c_void,
    /// The connection it was opened for: every callback on the handle is
    /// made for it, and the export name the plugin read in open stays
    /// valid until close.
    conn: Arc<Connection>,
    readonly: bool,
    /// Cleared after the plugin's zero said ENOTSUP, to skip the attempt.
    zero_native: AtomicBool,
    /// The plugin's FUA answer, asked once: every write consults it.
    fua: OnceLock<Support>,
}

// SAFETY: the handle is an opaque token the plugin hands back on every call;
// the plugin's thread model, which the server enforces, decides which calls
// may overlap.
unsafe impl Send for PluginHandle {}
// SAFETY: as for Send.
unsafe impl Sync for PluginHandle {}

impl PluginHandle {
    /// Run `f` as a callback on this handle, made for its connection.
    pub(super) fn call<T>(&self, f: impl FnOnce() -> T) -> T {
        self.lib.call_for(&self.conn, f)
    }

    /// The plugin's asynchronous callbacks (none past the end of an
    /// older plugin's struct, and none when, as configured, it asks that
    /// they not be used).
    pub(super) fn async_callbacks(&self) -> AsyncCallbacks {
        if self.lib.synchronous() {
            return AsyncCallbacks::default();
        }
        AsyncCallbacks {
            pread: cb!(self.lib, async_pread),
            pwrite: cb!(self.lib, async_pwrite),
            flush: cb!(self.lib, async_flush),
            trim: cb!(self.lib, async_trim),
            zero: cb!(self.lib, async_zero),
            cache: cb!(self.lib, async_cache),
            extents: cb!(self.lib, async_extents),
        }
    }

    /// The plugin's own handle.
    pub(super) fn raw_handle(&self) -> *mut c_void {
        self.handle
    }

    /// The plugin's name, for messages.
    pub(super) fn lib_name(&self) -> &'static str {
        self.lib.name()
    }

    /// Whether to try the plugin's zero before writing zeroes.
    pub(super) fn zero_native(&self) -> &AtomicBool {
        &self.zero_native
    }

    /// How the plugin handles FUA.
    pub(super) fn fua_support_now(&self) -> Result<Support> {
        self.fua_support()
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
        let r = self.call(|| unsafe { f(self.handle) });
        if r < 0 {
            Err(call::take_error(what))
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
        let r = self.call(|| unsafe { f(self.handle, count, offset, flags.bits()) });
        self.lib.check(what, r)
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
        if let Some(f) = cb!(self.lib, close) {
            // SAFETY: each handle is closed exactly once, here.
            self.call(|| unsafe { f(self.handle) });
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
        let Some(f) = cb!(self.lib, get_size) else {
            return Err(Error::new(
                libc::EINVAL,
                format!("{} has no get_size callback", self.lib.name()),
            ));
        };
        // SAFETY: ABI callback taking our live handle.
        let r = self.call(|| unsafe { f(self.handle) });
        u64::try_from(r).map_err(|_| call::take_error("get_size"))
    }

    fn block_size(&self) -> Result<Option<(u32, u32, u32)>> {
        let Some(f) = cb!(self.lib, block_size) else {
            return Ok(None);
        };
        let (mut min, mut pref, mut max) = (0u32, 0u32, 0u32);
        // SAFETY: ABI callback writing three u32s into our locals.
        let r = self.call(|| unsafe { f(self.handle, &mut min, &mut pref, &mut max) });
        self.lib.check("block_size", r)?;
        checked_block_size(self.lib.name(), min, pref, max)
    }

    fn can_write(&self) -> Result<bool> {
        if self.readonly {
            return Ok(false);
        }
        let has_pwrite = cb!(self.lib, pwrite).is_some() || cb!(self.lib, async_pwrite).is_some();
        Ok(self.ask(cb!(self.lib, can_write), "can_write", || {
            Ok(c_int::from(has_pwrite))
        })? != 0
            && has_pwrite)
    }

    fn can_flush(&self) -> Result<bool> {
        let has = cb!(self.lib, flush).is_some() || cb!(self.lib, async_flush).is_some();
        Ok(self.ask(cb!(self.lib, can_flush), "can_flush", || {
            Ok(c_int::from(has))
        })? != 0
            && has)
    }

    fn can_trim(&self) -> Result<bool> {
        let has = cb!(self.lib, trim).is_some() || cb!(self.lib, async_trim).is_some();
        Ok(self.can_write()?
            && self.ask(cb!(self.lib, can_trim), "can_trim", || Ok(c_int::from(has)))? != 0
            && has)
    }

    fn can_zero(&self) -> Result<bool> {
        // Zeroing is always possible on a writable export: the server falls
        // back to writing zeroes.
        Ok(self.can_write()? && self.ask(cb!(self.lib, can_zero), "can_zero", || Ok(1))? != 0)
    }

    fn can_fast_zero(&self) -> Result<bool> {
        // Without a zero callback every fast-zero request fails at once with
        // ENOTSUP, which is exactly what the flag asks for.
        let has_zero = cb!(self.lib, zero).is_some() || cb!(self.lib, async_zero).is_some();
        Ok(self.can_zero()?
            && self.ask(cb!(self.lib, can_fast_zero), "can_fast_zero", || {
                Ok(c_int::from(!has_zero))
            })? != 0)
    }

    fn can_fua(&self) -> Result<Support> {
        if !self.can_write()? {
            return Ok(Support::None);
        }
        let v = self.ask(cb!(self.lib, can_fua), "can_fua", || {
            Ok(if self.can_flush()? {
                abi::SUPPORT_EMULATE
            } else {
                abi::SUPPORT_NONE
            })
        })?;
        Ok(support(v))
    }

    fn can_multi_conn(&self) -> Result<bool> {
        Ok(self.ask(cb!(self.lib, can_multi_conn), "can_multi_conn", || Ok(0))? != 0)
    }

    fn can_cache(&self) -> Result<Support> {
        let has = cb!(self.lib, cache).is_some() || cb!(self.lib, async_cache).is_some();
        let v = self.ask(cb!(self.lib, can_cache), "can_cache", || {
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
        let has = cb!(self.lib, extents).is_some() || cb!(self.lib, async_extents).is_some();
        Ok(self.ask(cb!(self.lib, can_extents), "can_extents", || {
            Ok(c_int::from(has))
        })? != 0
            && has)
    }

    fn is_rotational(&self) -> Result<bool> {
        Ok(self.ask(cb!(self.lib, is_rotational), "is_rotational", || Ok(0))? != 0)
    }

    fn export_description(&self) -> Result<Option<String>> {
        let Some(f) = cb!(self.lib, export_description) else {
            return Ok(None);
        };
        // SAFETY: ABI callback taking our live handle; the string is copied.
        let p = self.call(|| unsafe { f(self.handle) });
        Ok(layer_string(p))
    }

    fn local_file(&self) -> Result<Option<std::path::PathBuf>> {
        let Some(f) = cb!(self.lib, local_file) else {
            return Ok(None);
        };
        // SAFETY: ABI callback taking our live handle; the path is copied.
        let p = self.call(|| unsafe { f(self.handle) });
        Ok(layer_path(p))
    }

    fn finalize(&self) -> Result<()> {
        Ok(())
    }

    fn is_async(&self) -> bool {
        self.has_async()
    }

    fn start(&self, op: AsyncOp, token: Token) {
        self.start_async(op, token);
    }

    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = cb!(self.lib, pread) else {
            let op = AsyncOp::Read {
                buf: buf.as_mut_ptr(),
                len: buf.len(),
                offset,
                flags,
            };
            if let Some(r) = self.wait_async(op) {
                return r;
            }
            return Err(Error::new(
                libc::EINVAL,
                format!("{} has no pread callback", self.lib.name()),
            ));
        };
        // SAFETY: `buf` is writable for its whole length during the call.
        let r = self.call(|| unsafe {
            f(
                self.handle,
                buf.as_mut_ptr().cast(),
                buf.len() as u64,
                offset,
                flags.bits(),
            )
        });
        self.lib.check("pread", r)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = cb!(self.lib, pwrite) else {
            let op = AsyncOp::Write {
                buf: buf.as_ptr(),
                len: buf.len(),
                offset,
                flags,
            };
            return self
                .wait_async(op)
                .unwrap_or(Err(Error::errno(libc::EROFS)));
        };
        let native = self.native_flags(flags)?;
        // SAFETY: `buf` is readable for its whole length during the call.
        let r = self.call(|| unsafe {
            f(
                self.handle,
                buf.as_ptr().cast(),
                buf.len() as u64,
                offset,
                native.bits(),
            )
        });
        self.lib.check("pwrite", r)?;
        self.fua_flush(flags)
    }

    fn flush(&self, flags: Flags) -> Result<()> {
        let Some(f) = cb!(self.lib, flush) else {
            return self
                .wait_async(AsyncOp::Flush { flags })
                .unwrap_or(Err(Error::errno(libc::EINVAL)));
        };
        // SAFETY: ABI callback taking our live handle.
        let r = self.call(|| unsafe { f(self.handle, flags.bits()) });
        self.lib.check("flush", r)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = cb!(self.lib, trim) else {
            let op = AsyncOp::Trim {
                count,
                offset,
                flags,
            };
            return self
                .wait_async(op)
                .unwrap_or(Err(Error::errno(libc::EINVAL)));
        };
        self.range(f, "trim", count, offset, self.native_flags(flags)?)?;
        self.fua_flush(flags)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let native = self.native_flags(flags)?;
        let native_zero = self.zero_native.load(Ordering::Relaxed);
        let zeroed = match cb!(self.lib, zero).filter(|_| native_zero) {
            Some(f) => Some(self.range(f, "zero", count, offset, native)),
            None if native_zero => self.wait_async(AsyncOp::Zero {
                count,
                offset,
                flags: native,
            }),
            None => None,
        };
        if let Some(r) = zeroed {
            match r {
                Ok(()) => return self.fua_flush(flags),
                Err(e) if e.raw_errno() == libc::ENOTSUP => {
                    if !flags.contains(Flags::FAST_ZERO) {
                        self.zero_native.store(false, Ordering::Relaxed);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        write_zeroes(self, count, offset, flags)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags) -> Result<Vec<Extent>> {
        let mut c = ExtentCollector::new(offset);
        if let Some(f) = cb!(self.lib, extents) {
            let ptr = c.as_abi();
            // SAFETY: `ptr` is the collector host_add_extent expects; it
            // outlives the call.
            let r = self.call(|| unsafe { f(self.handle, count, offset, flags.bits(), ptr) });
            self.lib.check("extents", r)?;
        } else {
            let op = AsyncOp::Extents {
                count,
                offset,
                flags,
                list: &mut c,
            };
            match self.wait_async(op) {
                Some(r) => r?,
                None => {
                    return Ok(vec![Extent {
                        offset,
                        length: count,
                        flags: 0,
                    }])
                }
            }
        }
        if c.extents().is_empty() {
            return Err(Error::new(
                libc::EIO,
                format!(
                    "{}: extents returned no extent at offset {offset}",
                    self.lib.name()
                ),
            ));
        }
        Ok(c.into_extents())
    }

    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match (self.can_cache()?, cb!(self.lib, cache)) {
            (Support::Native, Some(f)) => self.range(f, "cache", count, offset, flags),
            (Support::Native, None) => {
                let op = AsyncOp::Cache {
                    count,
                    offset,
                    flags,
                };
                self.wait_async(op).unwrap_or(Ok(()))
            }
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
