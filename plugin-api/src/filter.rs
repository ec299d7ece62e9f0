//! The `Filter` and `FilterHandle` traits, the `Next` layer they call, and
//! the trampolines that expose them through the C ABI
//! (`include/nbdhost-filter.h`).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use crate::abi;
use crate::boundary::{guard, quiet_panics, starting};
use crate::host::{self, OwnedExports, OwnedExtents};
use crate::instance::Instance;
use crate::plugin::{flags, len, lend, ok, path_bytes, str_arg, Strings};
use crate::requests::{ExtentsRequest, RangeRequest, ReadRequest, WriteRequest};
use crate::{
    BlockSize, Error, Export, ExportList, ExtentList, Flags, Result, Support, ThreadModel,
};

/// The layer below a filter, for one connection. Its methods behave like
/// the plugin callbacks of the same names.
pub struct Next {
    raw: *const abi::Next,
}

/// One handle's layer below, kept so that a callback made for another
/// connection of the same export may call it: the multi-conn filter
/// flushes every connection's when one client flushes. Made by
/// [`Next::share`]; see `THE NEXT LAYER` in nbdhost-filter(3) for the
/// rules.
#[derive(Clone, Copy)]
pub struct SharedNext {
    raw: *const abi::Next,
}

// SAFETY: the server's next table may be called from any thread that runs
// a callback of the filter; how long it stays valid is the holder's to
// keep (see `SharedNext::get`).
unsafe impl Send for SharedNext {}
// SAFETY: as for Send; the value is a pointer only read.
unsafe impl Sync for SharedNext {}

impl SharedNext {
    /// The layer below of the handle this was shared from.
    ///
    /// # Safety
    /// That handle must still be open (its filter's close callback has not
    /// returned): drop every copy in `finalize` or when the handle is
    /// dropped. And a call through it must not overlap the handle's own
    /// calls below unless every layer below allows overlapping calls
    /// (thread model `Parallel`): the caller keeps them apart otherwise.
    pub unsafe fn get(&self) -> Next {
        Next { raw: self.raw }
    }
}

/// Opens the layer below during [`Filter::open`].
pub struct NextOpener {
    raw: *const abi::NextOpen,
}

impl NextOpener {
    /// Open the next layer, optionally read-only or under another export
    /// name. Call it exactly once from a successful `open`.
    pub fn open(&self, readonly: bool, export_name: &str) -> Result<()> {
        let name = CString::new(export_name)
            .map_err(|_| Error::new(libc::EINVAL, "NUL in export name"))?;
        // SAFETY: `raw` is the server's opener, valid during the open call.
        let t = unsafe { &*self.raw };
        let f = t
            .open
            .ok_or_else(|| Error::new(libc::EINVAL, "no next open"))?;
        // SAFETY: ABI call with the opener itself and a valid string.
        match unsafe { f(self.raw, c_int::from(readonly), name.as_ptr()) } {
            0 => Ok(()),
            _ => Err(Error::from_next(host::last_errno())),
        }
    }
}

/// The layer below a filter before any connection has opened it, for
/// [`Filter::list_exports`] and [`Filter::default_export`].
pub struct NextExports {
    raw: *const abi::NextExports,
}

impl NextExports {
    fn t(&self) -> &abi::NextExports {
        // SAFETY: `raw` is the server's table, valid during the callback.
        unsafe { &*self.raw }
    }

    /// The exports the layer below lists.
    pub fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<Export>> {
        let list = OwnedExports::new()?;
        self.fill(readonly, is_tls, list.0)?;
        Ok(list.to_vec())
    }

    /// Pass a listing down unchanged, filling `exports` directly.
    pub fn list_exports_into(
        &self,
        readonly: bool,
        is_tls: bool,
        exports: &mut ExportList,
    ) -> Result<()> {
        self.fill(readonly, is_tls, exports.raw())
    }

    fn fill(&self, readonly: bool, is_tls: bool, exports: *mut abi::Exports) -> Result<()> {
        let f = self.t().list_exports.ok_or_else(missing)?;
        // SAFETY: ABI call with the server's table and a live server list.
        let r = unsafe {
            f(
                self.raw,
                c_int::from(readonly),
                c_int::from(is_tls),
                exports,
            )
        };
        next_result(r).map(drop)
    }

    /// The name the layer below gives the empty export name.
    pub fn default_export(&self, readonly: bool, is_tls: bool) -> Result<String> {
        let f = self.t().default_export.ok_or_else(missing)?;
        // SAFETY: ABI call with the server's table; the string it returns
        // lives until this filter's callback returns, and is copied now.
        let p = unsafe { f(self.raw, c_int::from(readonly), c_int::from(is_tls)) };
        if p.is_null() {
            return Err(Error::from_next(host::last_errno()));
        }
        // SAFETY: a NUL-terminated string of the server's (see above).
        Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

fn next_result(r: c_int) -> Result<c_int> {
    if r < 0 {
        Err(Error::from_next(host::last_errno()))
    } else {
        Ok(r)
    }
}

fn support(v: c_int) -> Support {
    match v {
        0 => Support::None,
        1 => Support::Emulate,
        _ => Support::Native,
    }
}

macro_rules! next_bool {
    ($name:ident) => {
        #[doc = concat!("Ask the next layer `", stringify!($name), "`.")]
        pub fn $name(&self) -> Result<bool> {
            let f = self.t().$name.ok_or_else(missing)?;
            // SAFETY: ABI call with the server's next table.
            next_result(unsafe { f(self.raw) }).map(|v| v != 0)
        }
    };
}

macro_rules! next_range {
    ($name:ident) => {
        #[doc = concat!("Pass `", stringify!($name), "` to the next layer.")]
        pub fn $name(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            let f = self.t().$name.ok_or_else(missing)?;
            // SAFETY: ABI call with the server's next table.
            next_result(unsafe { f(self.raw, count, offset, flags.bits()) }).map(drop)
        }
    };
}

fn missing() -> Error {
    Error::new(libc::ENOSYS, "next layer lacks this call")
}

impl Next {
    pub(crate) fn from_raw(raw: *const abi::Next) -> Next {
        Next { raw }
    }

    pub(crate) fn raw(&self) -> *const abi::Next {
        self.raw
    }

    pub(crate) fn table(&self) -> &abi::Next {
        self.t()
    }

    fn t(&self) -> &abi::Next {
        // SAFETY: `raw` is the server's table, valid during the callback.
        unsafe { &*self.raw }
    }

    /// Keep this handle's layer below for callbacks made for other
    /// connections (see [`SharedNext`]).
    pub fn share(&self) -> SharedNext {
        SharedNext { raw: self.raw }
    }

    /// Size of the next layer.
    pub fn get_size(&self) -> Result<u64> {
        let f = self.t().get_size.ok_or_else(missing)?;
        // SAFETY: ABI call with the server's next table.
        let r = unsafe { f(self.raw) };
        u64::try_from(r).map_err(|_| Error::from_next(host::last_errno()))
    }

    /// Block-size constraints of the next layer.
    pub fn block_size(&self) -> Result<Option<BlockSize>> {
        let f = self.t().block_size.ok_or_else(missing)?;
        let (mut a, mut b, mut c) = (0u32, 0u32, 0u32);
        // SAFETY: ABI call writing three u32s into our locals.
        next_result(unsafe { f(self.raw, &mut a, &mut b, &mut c) })?;
        Ok((a != 0 || b != 0 || c != 0).then_some(BlockSize {
            minimum: a,
            preferred: b,
            maximum: c,
        }))
    }

    next_bool!(can_write);
    next_bool!(can_flush);
    next_bool!(can_trim);
    next_bool!(can_zero);
    next_bool!(can_fast_zero);
    next_bool!(can_multi_conn);
    next_bool!(can_extents);
    next_bool!(is_rotational);

    /// How the next layer handles FUA.
    pub fn can_fua(&self) -> Result<Support> {
        let f = self.t().can_fua.ok_or_else(missing)?;
        // SAFETY: ABI call with the server's next table.
        next_result(unsafe { f(self.raw) }).map(support)
    }

    /// How the next layer handles cache requests.
    pub fn can_cache(&self) -> Result<Support> {
        let f = self.t().can_cache.ok_or_else(missing)?;
        // SAFETY: ABI call with the server's next table.
        next_result(unsafe { f(self.raw) }).map(support)
    }

    /// The next layer's export description.
    pub fn export_description(&self) -> Result<Option<String>> {
        let f = self.t().export_description.ok_or_else(missing)?;
        // SAFETY: ABI call; the string is copied before any other call.
        let p = unsafe { f(self.raw) };
        // SAFETY: null or a NUL-terminated string valid until the next call.
        Ok((!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()))
    }

    /// Read from the next layer.
    pub fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let f = self.t().pread.ok_or_else(missing)?;
        // SAFETY: `buf` is writable for its length during the call.
        next_result(unsafe {
            f(
                self.raw,
                buf.as_mut_ptr().cast(),
                buf.len() as u64,
                offset,
                flags.bits(),
            )
        })
        .map(drop)
    }

    /// Write to the next layer.
    pub fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let f = self.t().pwrite.ok_or_else(missing)?;
        // SAFETY: `buf` is readable for its length during the call.
        next_result(unsafe {
            f(
                self.raw,
                buf.as_ptr().cast(),
                buf.len() as u64,
                offset,
                flags.bits(),
            )
        })
        .map(drop)
    }

    /// Flush the next layer.
    pub fn flush(&self, flags: Flags) -> Result<()> {
        let f = self.t().flush.ok_or_else(missing)?;
        // SAFETY: ABI call with the server's next table.
        next_result(unsafe { f(self.raw, flags.bits()) }).map(drop)
    }

    next_range!(trim);
    next_range!(zero);
    next_range!(cache);

    /// The next layer's extents as `(offset, length, type)`, in order.
    pub fn extents(&self, count: u64, offset: u64, flags: Flags) -> Result<Vec<(u64, u64, u32)>> {
        let f = self.t().extents.ok_or_else(missing)?;
        let list = OwnedExtents::new(offset)?;
        // SAFETY: `list` is a live server list for the duration of the call.
        next_result(unsafe { f(self.raw, count, offset, flags.bits(), list.0) })?;
        Ok(list.to_vec())
    }

    /// The local file the layer below serves, if any (`None` too from a
    /// server older than ABI 1.8, whose table lacks the call).
    pub fn local_file(&self) -> Result<Option<std::path::PathBuf>> {
        let t = self.t();
        let end = std::mem::offset_of!(abi::Next, local_file) + std::mem::size_of::<usize>();
        let Some(f) = t.local_file.filter(|_| t.struct_size as usize >= end) else {
            return Ok(None);
        };
        // SAFETY: ABI call; the string is copied before any other call.
        let p = unsafe { f(self.raw) };
        if p.is_null() {
            return Ok(None);
        }
        // SAFETY: a NUL-terminated string valid until the next call.
        let bytes = unsafe { CStr::from_ptr(p) }.to_bytes().to_vec();
        // SAFETY: the bytes came from a path's encoded bytes (or from C,
        // where any bytes other than NUL make a Unix path).
        let os = unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(bytes) };
        Ok(Some(os.into()))
    }

    /// Pass an extents request down unchanged, filling `list` directly.
    pub fn extents_into(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        let f = self.t().extents.ok_or_else(missing)?;
        // SAFETY: `list` is the server's list for the current call.
        next_result(unsafe { f(self.raw, count, offset, flags.bits(), list.raw()) }).map(drop)
    }
}

/// A filter: global state configured from the command line, created with
/// `Default` when the server loads it.
pub trait Filter: Default + Send + Sync + 'static {
    /// Short name, as used with `--filter`.
    const NAME: &'static str;
    /// One-line description.
    const DESCRIPTION: &'static str;
    /// `key=value` lines shown by `--help`.
    const CONFIG_HELP: &'static str = "";
    /// Concurrency this filter tolerates.
    const THREAD_MODEL: ThreadModel = ThreadModel::Parallel;
    /// The methods this `impl` block defines, written by
    /// [`macro@crate::callbacks`].
    const CALLBACKS: crate::Callbacks;

    /// Per-connection state.
    type Handle: FilterHandle;

    /// Look at the layer below once, before the server accepts connections
    /// (it is open read-only on the default export for this call only); an
    /// error stops the server with its message. Not defined, the layers
    /// below are spared that extra open.
    fn startup(&self, _next: &Next) -> Result<()> {
        Ok(())
    }

    /// Offered one parameter; return `Ok(true)` if it is this filter's,
    /// `Ok(false)` to pass it further down.
    fn config(&mut self, _key: &str, _value: &str) -> Result<bool> {
        Ok(false)
    }
    /// All parameters were given.
    fn config_complete(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called once before the server starts listening.
    fn get_ready(&self) -> Result<()> {
        Ok(())
    }
    /// Called once the server has gone to the background (if it does)
    /// and before it serves: the place to start threads, which a fork
    /// would not have kept.
    fn after_fork(&self) -> Result<()> {
        Ok(())
    }
    /// Asked once after [`Filter::get_ready`]: whether, as configured, the
    /// filter adds no waiting of its own (no I/O, sleeps, blocking locks or
    /// long computation), so the chain is as non-blocking as the layers
    /// below it. Leave it `false` if in doubt.
    fn nonblocking(&self) -> bool {
        false
    }
    /// Asked once, right after [`Filter::config_complete`]: the thread
    /// model the filter tolerates as configured (ABI 1.5's
    /// `configured_thread_model`). Only a model stricter than
    /// [`Filter::THREAD_MODEL`] counts. Not defined, the constant alone
    /// applies.
    fn thread_model(&self) -> ThreadModel {
        Self::THREAD_MODEL
    }
    /// A client connected; refuse it by returning an error.
    fn preconnect(&self, _readonly: bool) -> Result<()> {
        Ok(())
    }
    /// The exports a client listing them sees: by default, those of the
    /// layer below. A filter may rename, hide or add some, reading the
    /// layer below's with [`NextExports::list_exports`].
    fn list_exports(
        &self,
        next: &NextExports,
        readonly: bool,
        is_tls: bool,
        exports: &mut ExportList,
    ) -> Result<()> {
        next.list_exports_into(readonly, is_tls, exports)
    }
    /// The name the empty export name stands for: by default, the layer
    /// below's.
    fn default_export(&self, next: &NextExports, readonly: bool, is_tls: bool) -> Result<String> {
        next.default_export(readonly, is_tls)
    }
    /// Open a connection: call `next.open` exactly once, then build the
    /// handle.
    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Self::Handle>;

    /// Called once before the filter is unloaded.
    fn unload(&mut self) {}
}

/// A filter's per-connection state. Every method defaults to passing the
/// call to the next layer unchanged.
#[allow(missing_docs)]
pub trait FilterHandle: Send + Sync + 'static {
    /// The methods this `impl` block defines, written by
    /// [`macro@crate::callbacks`].
    const CALLBACKS: crate::Callbacks;

    /// Called once, after `open` and after the layers below are open and
    /// prepared, before the handle's first request: the place to ask the
    /// layer below about the export (since ABI 1.6; older servers do not
    /// call it). An error fails the client's open.
    fn prepare(&self, _next: &Next, _readonly: bool) -> Result<()> {
        Ok(())
    }
    fn get_size(&self, next: &Next) -> Result<u64> {
        next.get_size()
    }
    fn block_size(&self, next: &Next) -> Result<Option<BlockSize>> {
        next.block_size()
    }
    fn can_write(&self, next: &Next) -> Result<bool> {
        next.can_write()
    }
    fn can_flush(&self, next: &Next) -> Result<bool> {
        next.can_flush()
    }
    fn can_trim(&self, next: &Next) -> Result<bool> {
        next.can_trim()
    }
    fn can_zero(&self, next: &Next) -> Result<bool> {
        next.can_zero()
    }
    fn can_fast_zero(&self, next: &Next) -> Result<bool> {
        next.can_fast_zero()
    }
    fn can_fua(&self, next: &Next) -> Result<Support> {
        next.can_fua()
    }
    fn can_multi_conn(&self, next: &Next) -> Result<bool> {
        next.can_multi_conn()
    }
    fn can_cache(&self, next: &Next) -> Result<Support> {
        next.can_cache()
    }
    fn can_extents(&self, next: &Next) -> Result<bool> {
        next.can_extents()
    }
    fn is_rotational(&self, next: &Next) -> Result<bool> {
        next.is_rotational()
    }
    fn export_description(&self, next: &Next) -> Result<Option<String>> {
        next.export_description()
    }
    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        next.pread(buf, offset, flags)
    }
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        next.pwrite(buf, offset, flags)
    }
    fn flush(&self, next: &Next, flags: Flags) -> Result<()> {
        next.flush(flags)
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.trim(count, offset, flags)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.zero(count, offset, flags)
    }
    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        next.extents_into(count, offset, flags, list)
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.cache(count, offset, flags)
    }
    /// The local file whose bytes this handle serves (since ABI 1.8): by
    /// default the layer below's. A filter that keeps writes elsewhere
    /// answers `None`.
    fn local_file(&self, next: &Next) -> Result<Option<std::path::PathBuf>> {
        next.local_file()
    }
    /// Called once when the connection ends, before any layer is closed
    /// and with the layer below still open (since ABI 1.8): write back
    /// what the handle kept in memory. An error is logged; the client has
    /// gone.
    fn finalize(&self, _next: &Next) -> Result<()> {
        Ok(())
    }

    /// Since ABI 1.9: start a read and return at once; defined, the
    /// server starts reads through this filter this way. Pass the request
    /// down with [`Next::async_pread`] (changing its offset first if need
    /// be), or with [`Next::async_pread_then`] to act on the data before
    /// answering. Not defined, reads through the filter run its
    /// synchronous `pread` on a worker thread.
    fn async_pread(&self, next: &Next, req: ReadRequest) {
        next.async_pread(req)
    }
    /// Since ABI 1.9: start a write; as [`FilterHandle::async_pread`].
    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        next.async_pwrite(req)
    }
    /// Since ABI 1.9: start a flush; as [`FilterHandle::async_pread`].
    fn async_flush(&self, next: &Next, req: RangeRequest) {
        next.async_flush(req)
    }
    /// Since ABI 1.9: start a trim; as [`FilterHandle::async_pread`].
    fn async_trim(&self, next: &Next, req: RangeRequest) {
        next.async_trim(req)
    }
    /// Since ABI 1.9: start a zero; as [`FilterHandle::async_pread`].
    fn async_zero(&self, next: &Next, req: RangeRequest) {
        next.async_zero(req)
    }
    /// Since ABI 1.9: start a cache; as [`FilterHandle::async_pread`].
    fn async_cache(&self, next: &Next, req: RangeRequest) {
        next.async_cache(req)
    }
    /// Since ABI 1.9: start an extents request; as
    /// [`FilterHandle::async_pread`].
    fn async_extents(&self, next: &Next, req: ExtentsRequest) {
        next.async_extents(req)
    }
}

static INSTANCE: Instance = Instance::new();
static TABLE: OnceLock<abi::Filter> = OnceLock::new();

/// Borrow the handle behind a pointer that `open` produced.
///
/// # Safety
/// `h` must come from `open::<F>` and not have been closed.
pub(crate) unsafe fn handle<'a, F: Filter>(h: *mut c_void) -> &'a F::Handle {
    // SAFETY: guaranteed by the caller.
    unsafe { &*(h as *const F::Handle) }
}

/// Run `f` with the handle and next layer of a per-connection callback.
fn with_handle<F: Filter, T>(
    next: *const abi::Next,
    h: *mut c_void,
    f: impl FnOnce(&F::Handle, &Next) -> T,
) -> T {
    let next = Next { raw: next };
    // SAFETY: the server passes a live handle from `open` and its next table.
    f(unsafe { handle::<F>(h) }, &next)
}

unsafe extern "C" fn load<F: Filter>() -> c_int {
    guard(-1, || {
        INSTANCE.install(F::default())?;
        Ok(0)
    })
}

unsafe extern "C" fn unload<F: Filter>() {
    guard((), || {
        INSTANCE.with_mut::<F, _>(|f| {
            f.unload();
            Ok(())
        })?;
        INSTANCE.remove();
        Ok(())
    })
}

unsafe extern "C" fn config<F: Filter>(key: *const c_char, value: *const c_char) -> c_int {
    guard(-1, || {
        let (k, v) = (str_arg(key)?, str_arg(value)?);
        let taken = INSTANCE.with_mut::<F, _>(|f| f.config(k, v))?;
        Ok(if taken {
            abi::CONFIG_TAKEN
        } else {
            abi::CONFIG_PASS
        })
    })
}

unsafe extern "C" fn config_complete<F: Filter>() -> c_int {
    guard(
        -1,
        || ok(INSTANCE.with_mut::<F, _>(|f| f.config_complete())),
    )
}

unsafe extern "C" fn after_fork<F: Filter>() -> c_int {
    guard(-1, || ok(INSTANCE.with::<F, _>(|x| x.after_fork())))
}

unsafe extern "C" fn get_ready<F: Filter>() -> c_int {
    guard(-1, || ok(INSTANCE.with::<F, _>(|f| f.get_ready())))
}

unsafe extern "C" fn capabilities<F: Filter>() -> u64 {
    guard(0, || {
        let nonblocking = INSTANCE.with::<F, _>(|f| Ok(f.nonblocking()))?;
        Ok(if nonblocking { abi::NONBLOCKING } else { 0 })
    })
}

unsafe extern "C" fn configured_thread_model<F: Filter>() -> c_int {
    guard(-1, || {
        let model = INSTANCE.with::<F, _>(|f| Ok(f.thread_model()))?;
        Ok(model as c_int)
    })
}

unsafe extern "C" fn preconnect<F: Filter>(readonly: c_int) -> c_int {
    guard(-1, || {
        ok(INSTANCE.with::<F, _>(|f| f.preconnect(readonly != 0)))
    })
}

unsafe extern "C" fn open<F: Filter>(
    next: *const abi::NextOpen,
    readonly: c_int,
    export: *const c_char,
) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        let export = if export.is_null() {
            ""
        } else {
            str_arg(export)?
        };
        let opener = NextOpener { raw: next };
        let h = INSTANCE.with::<F, _>(|f| f.open(&opener, readonly != 0, export))?;
        Ok(Box::into_raw(Box::new(h)).cast())
    })
}

unsafe extern "C" fn startup<F: Filter>(next: *const abi::Next) -> c_int {
    guard(-1, || {
        let next = Next { raw: next };
        ok(INSTANCE.with::<F, _>(|f| f.startup(&next)))
    })
}

unsafe extern "C" fn list_exports<F: Filter>(
    next: *const abi::NextExports,
    readonly: c_int,
    is_tls: c_int,
    exports: *mut abi::Exports,
) -> c_int {
    guard(-1, || {
        let next = NextExports { raw: next };
        let mut list = ExportList::from_raw(exports);
        ok(INSTANCE.with::<F, _>(|f| f.list_exports(&next, readonly != 0, is_tls != 0, &mut list)))
    })
}

unsafe extern "C" fn default_export<F: Filter>(
    next: *const abi::NextExports,
    readonly: c_int,
    is_tls: c_int,
) -> *const c_char {
    guard(std::ptr::null(), || {
        let next = NextExports { raw: next };
        let name =
            INSTANCE.with::<F, _>(|f| f.default_export(&next, readonly != 0, is_tls != 0))?;
        lend(Some(name), "export name")
    })
}

unsafe extern "C" fn close<F: Filter>(h: *mut c_void) {
    guard((), || {
        // SAFETY: the server closes each handle from `open` exactly once.
        drop(unsafe { Box::from_raw(h as *mut F::Handle) });
        Ok(())
    })
}

unsafe extern "C" fn prepare<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    readonly: c_int,
) -> c_int {
    guard(-1, || {
        ok(with_handle::<F, _>(next, h, |h, n| {
            h.prepare(n, readonly != 0)
        }))
    })
}

unsafe extern "C" fn get_size<F: Filter>(next: *const abi::Next, h: *mut c_void) -> i64 {
    guard(-1, || {
        let size = with_handle::<F, _>(next, h, |h, n| h.get_size(n))?;
        i64::try_from(size).map_err(|_| Error::new(libc::EOVERFLOW, "size too large"))
    })
}

unsafe extern "C" fn block_size<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    min: *mut u32,
    pref: *mut u32,
    max: *mut u32,
) -> c_int {
    guard(-1, || {
        let bs = with_handle::<F, _>(next, h, |h, n| h.block_size(n))?;
        let (a, b, c) = bs.map_or((0, 0, 0), |b| (b.minimum, b.preferred, b.maximum));
        // SAFETY: the server passes three writable places.
        unsafe {
            *min = a;
            *pref = b;
            *max = c;
        }
        Ok(0)
    })
}

macro_rules! can_fn {
    ($name:ident, $conv:expr) => {
        unsafe extern "C" fn $name<F: Filter>(next: *const abi::Next, h: *mut c_void) -> c_int {
            guard(-1, || {
                Ok($conv(with_handle::<F, _>(next, h, |h, n| h.$name(n))?))
            })
        }
    };
}

can_fn!(can_write, c_int::from);
can_fn!(can_flush, c_int::from);
can_fn!(can_trim, c_int::from);
can_fn!(can_zero, c_int::from);
can_fn!(can_fast_zero, c_int::from);
can_fn!(can_fua, |s: Support| s as c_int);
can_fn!(can_multi_conn, c_int::from);
can_fn!(can_cache, |s: Support| s as c_int);
can_fn!(can_extents, c_int::from);
can_fn!(is_rotational, c_int::from);

unsafe extern "C" fn export_description<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
) -> *const c_char {
    guard(std::ptr::null(), || {
        let d = with_handle::<F, _>(next, h, |h, n| h.export_description(n))?;
        lend(d, "description")
    })
}

unsafe extern "C" fn local_file<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
) -> *const c_char {
    guard(std::ptr::null(), || {
        let path = with_handle::<F, _>(next, h, |h, n| h.local_file(n))?;
        lend(path.map(path_bytes), "local file")
    })
}

unsafe extern "C" fn finalize<F: Filter>(next: *const abi::Next, h: *mut c_void) -> c_int {
    guard(-1, || {
        ok(with_handle::<F, _>(next, h, |h, n| h.finalize(n)))
    })
}

unsafe extern "C" fn pread<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    f: u32,
) -> c_int {
    guard(-1, || {
        // SAFETY: the server passes a writable buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len(count)?) };
        ok(with_handle::<F, _>(next, h, |h, n| {
            h.pread(n, buf, offset, flags(f))
        }))
    })
}

unsafe extern "C" fn pwrite<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    buf: *const c_void,
    count: u64,
    offset: u64,
    f: u32,
) -> c_int {
    guard(-1, || {
        // SAFETY: the server passes a readable buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len(count)?) };
        ok(with_handle::<F, _>(next, h, |h, n| {
            h.pwrite(n, buf, offset, flags(f))
        }))
    })
}

unsafe extern "C" fn flush<F: Filter>(next: *const abi::Next, h: *mut c_void, f: u32) -> c_int {
    guard(-1, || {
        ok(with_handle::<F, _>(next, h, |h, n| h.flush(n, flags(f))))
    })
}

macro_rules! range_fn {
    ($name:ident) => {
        unsafe extern "C" fn $name<F: Filter>(
            next: *const abi::Next,
            h: *mut c_void,
            count: u64,
            offset: u64,
            f: u32,
        ) -> c_int {
            guard(-1, || {
                ok(with_handle::<F, _>(next, h, |h, n| {
                    h.$name(n, count, offset, flags(f))
                }))
            })
        }
    };
}

range_fn!(trim);
range_fn!(zero);
range_fn!(cache);

unsafe extern "C" fn extents<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    count: u64,
    offset: u64,
    f: u32,
    list: *mut abi::Extents,
) -> c_int {
    guard(-1, || {
        let mut list = ExtentList::from_raw(list);
        ok(with_handle::<F, _>(next, h, |h, n| {
            h.extents(n, count, offset, flags(f), &mut list)
        }))
    })
}

unsafe extern "C" fn async_pread<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    f: u32,
    req: *mut abi::Request,
) {
    starting(|| {
        let req = ReadRequest::new(buf, count as usize, offset, flags(f), req);
        // SAFETY: the server passes a live handle from `open` and its next
        // table, and a writable buffer until the request completes.
        unsafe { handle::<F>(h) }.async_pread(&Next::from_raw(next), req)
    })
}

unsafe extern "C" fn async_pwrite<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    buf: *const c_void,
    count: u64,
    offset: u64,
    f: u32,
    req: *mut abi::Request,
) {
    starting(|| {
        let req = WriteRequest::new(buf, count as usize, offset, flags(f), req);
        // SAFETY: as for async_pread, with a readable buffer.
        unsafe { handle::<F>(h) }.async_pwrite(&Next::from_raw(next), req)
    })
}

unsafe extern "C" fn async_flush<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    f: u32,
    req: *mut abi::Request,
) {
    starting(|| {
        let req = RangeRequest::new(0, 0, flags(f), req);
        // SAFETY: the server passes a live handle and its next table.
        unsafe { handle::<F>(h) }.async_flush(&Next::from_raw(next), req)
    })
}

macro_rules! async_range_fn {
    ($name:ident) => {
        unsafe extern "C" fn $name<F: Filter>(
            next: *const abi::Next,
            h: *mut c_void,
            count: u64,
            offset: u64,
            f: u32,
            req: *mut abi::Request,
        ) {
            starting(|| {
                let req = RangeRequest::new(count, offset, flags(f), req);
                // SAFETY: the server passes a live handle and its next table.
                unsafe { handle::<F>(h) }.$name(&Next::from_raw(next), req)
            })
        }
    };
}

async_range_fn!(async_trim);
async_range_fn!(async_zero);
async_range_fn!(async_cache);

unsafe extern "C" fn async_extents<F: Filter>(
    next: *const abi::Next,
    h: *mut c_void,
    count: u64,
    offset: u64,
    f: u32,
    list: *mut abi::Extents,
    req: *mut abi::Request,
) {
    starting(|| {
        let req = ExtentsRequest::new(count, offset, flags(f), list, req);
        // SAFETY: the server passes a live handle, its next table, and a
        // list that lives until the request completes.
        unsafe { handle::<F>(h) }.async_extents(&Next::from_raw(next), req)
    })
}

/// Build the filter's C table; called by [`crate::nbdhost_filter!`].
///
/// # Safety
/// `host` must point to a host table that outlives the filter, and the
/// strings to NUL-terminated statics of the filter.
pub unsafe fn entry<F: Filter>(host: *const abi::Host, strings: Strings) -> *const abi::Filter {
    host::install(host);
    quiet_panics();
    TABLE.get_or_init(|| abi::Filter {
        struct_size: std::mem::size_of::<abi::Filter>() as u64,
        abi_version: abi::ABI_VERSION,
        thread_model: F::THREAD_MODEL as u32,
        name: strings.name,
        version: strings.version,
        description: strings.description,
        config_help: strings.config_help,
        load: Some(load::<F>),
        unload: Some(unload::<F>),
        config: defined!(F, F, config),
        config_complete: defined!(F, F, config_complete),
        get_ready: defined!(F, F, get_ready),
        preconnect: defined!(F, F, preconnect),
        open: Some(open::<F>),
        close: Some(close::<F>),
        get_size: defined!(F, F::Handle, get_size),
        block_size: defined!(F, F::Handle, block_size),
        can_write: defined!(F, F::Handle, can_write),
        can_flush: defined!(F, F::Handle, can_flush),
        can_trim: defined!(F, F::Handle, can_trim),
        can_zero: defined!(F, F::Handle, can_zero),
        can_fast_zero: defined!(F, F::Handle, can_fast_zero),
        can_fua: defined!(F, F::Handle, can_fua),
        can_multi_conn: defined!(F, F::Handle, can_multi_conn),
        can_cache: defined!(F, F::Handle, can_cache),
        can_extents: defined!(F, F::Handle, can_extents),
        is_rotational: defined!(F, F::Handle, is_rotational),
        export_description: defined!(F, F::Handle, export_description),
        pread: defined!(F, F::Handle, pread),
        pwrite: defined!(F, F::Handle, pwrite),
        flush: defined!(F, F::Handle, flush),
        trim: defined!(F, F::Handle, trim),
        zero: defined!(F, F::Handle, zero),
        extents: defined!(F, F::Handle, extents),
        cache: defined!(F, F::Handle, cache),
        startup: defined!(F, F, startup),
        capabilities: defined!(F, F, nonblocking, capabilities),
        configured_thread_model: defined!(F, F, thread_model, configured_thread_model),
        after_fork: defined!(F, F, after_fork),
        prepare: defined!(F, F::Handle, prepare),
        list_exports: defined!(F, F, list_exports),
        default_export: defined!(F, F, default_export),
        finalize: defined!(F, F::Handle, finalize),
        local_file: defined!(F, F::Handle, local_file),
        async_pread: defined!(F, F::Handle, async_pread),
        async_pwrite: defined!(F, F::Handle, async_pwrite),
        async_flush: defined!(F, F::Handle, async_flush),
        async_trim: defined!(F, F::Handle, async_trim),
        async_zero: defined!(F, F::Handle, async_zero),
        async_cache: defined!(F, F::Handle, async_cache),
        async_extents: defined!(F, F::Handle, async_extents),
    })
}
