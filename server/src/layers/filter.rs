//! A filter shared object stacked on the next layer, so that a filter and
//! the layers below it are one more [`Backend`].
//!
//! Like `plugin`, this is an ABI edge: callbacks past the end of an older
//! struct count as absent, and an absent callback passes the call to the
//! next layer unchanged.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use nbdhost_plugin_api::{abi, Error, Flags, Result, Support, ThreadModel};

use super::backend::{checked_block_size, run_sync, AsyncOp, Backend, Handle};
use super::below::{next_after, next_background, next_closing, next_reopen, Below, Opener};
use super::connection::Connection;
use super::export_list::ExportCollector;
use super::extents::ExtentCollector;
use super::filter_async::{
    next_async_cache, next_async_extents, next_async_flush, next_async_pread, next_async_pwrite,
    next_async_trim, next_async_zero, next_of, AsyncCallbacks,
};
use super::host::{call, table};
use super::inflight::{self, Token};
use super::load_error::LoadError;
use super::loader::{
    field, layer_path, layer_string, shared_fields, LayerInfo, LayerTable, Library, Origin,
};
use crate::protocol::export::{ExportEntry, Extent};

impl LayerTable for abi::Filter {
    const KIND: &'static str = "filter";
    const ENTRY: &'static str = abi::FILTER_ENTRY;
    type Entry = abi::FilterEntry;
    const ADAPTER_ENTRY: &'static str = abi::FILTER_ADAPTER_ENTRY;
    type AdapterEntry = abi::FilterAdapterEntry;

    unsafe fn call_entry(entry: abi::FilterEntry) -> *const abi::Filter {
        // SAFETY: the caller passes the filter's entry point, which takes
        // the host table; the table is 'static.
        unsafe { entry(&table::HOST) }
    }

    unsafe fn call_adapter_entry(
        entry: abi::FilterAdapterEntry,
        path: *const c_char,
    ) -> *const abi::Filter {
        // SAFETY: as for the entry point, with the path the caller passes.
        unsafe { entry(&table::HOST, path) }
    }

    fn min_size() -> usize {
        std::mem::offset_of!(abi::Filter, config_help) + std::mem::size_of::<usize>()
    }

    fn strings(&self) -> [*const c_char; 5] {
        [
            self.name,
            self.version,
            self.description,
            self.config_help,
            std::ptr::null(),
        ]
    }

    shared_fields!(abi::Filter);
}

/// A filter callback, or `None` if absent or past the end of its struct.
macro_rules! fcb {
    ($lib:expr, $field:ident) => {
        field!($lib.table(), abi::Filter, $field).flatten()
    };
}

/// A loaded filter, not yet stacked.
pub struct Filter {
    lib: Arc<Library<abi::Filter>>,
}

impl Filter {
    /// Load the filter from where it comes from.
    pub fn load(origin: &Origin) -> std::result::Result<Filter, LoadError> {
        Ok(Filter {
            lib: Arc::new(Library::load(origin)?),
        })
    }

    /// Static facts about the filter.
    pub fn info(&self) -> &LayerInfo {
        self.lib.info()
    }

    /// Offer one parameter; `Ok(true)` if the filter took it.
    pub fn config(&self, key: &str, value: &str) -> Result<bool> {
        Ok(self.lib.config(key, value)? == Some(abi::CONFIG_TAKEN))
    }

    /// All parameters have been given.
    pub fn config_complete(&self) -> Result<()> {
        self.lib.config_complete()
    }

    /// The server is about to listen.
    pub fn get_ready(&self) -> Result<()> {
        self.lib.get_ready()
    }

    /// Stack this filter on `next`, running its start-up look at the layer
    /// below first when it has one. That look is made for no client: the
    /// layer below is opened for a connection numbered 0, without a peer,
    /// under its default export.
    pub fn stack(self, next: Arc<dyn Backend>) -> Result<Arc<dyn Backend>> {
        if let Some(f) = fcb!(self.lib, startup) {
            let look = Arc::new(Connection::default());
            let export = next.default_export(&look, true, false)?;
            let export = CString::new(export).unwrap_or_default();
            let conn = look.renamed(export);
            let opened = next.open(conn.clone(), true)?;
            let below = BelowHandle::new(
                opened,
                Opener {
                    backend: next.clone(),
                    conn,
                },
            );
            // SAFETY: ABI callback with a next table whose handle lives until
            // `below` is dropped after the call.
            let r = self.lib.call(|| unsafe { f(&*below.abi) });
            let finalized = below.below.handle().finalize();
            self.lib.check("startup", r)?;
            finalized?;
        }
        Ok(Arc::new(Layer {
            lib: self.lib,
            next,
        }))
    }
}

/// A filter stacked on the layers below it.
struct Layer {
    lib: Arc<Library<abi::Filter>>,
    next: Arc<dyn Backend>,
}

/// The layer below as a `struct nbdhost_next_exports`, for the duration of
/// one list_exports or default_export callback made for `conn`.
struct ExportsBelow<'a> {
    abi: abi::NextExports,
    next: &'a dyn Backend,
    conn: &'a Arc<Connection>,
    /// The names default_export returned, kept until the callback ends.
    names: RefCell<Vec<CString>>,
}

impl<'a> ExportsBelow<'a> {
    /// Boxed, so that `opaque` can point at it.
    fn new(next: &'a dyn Backend, conn: &'a Arc<Connection>) -> Box<ExportsBelow<'a>> {
        let mut below = Box::new(ExportsBelow {
            abi: abi::NextExports {
                struct_size: std::mem::size_of::<abi::NextExports>() as u64,
                opaque: std::ptr::null_mut(),
                list_exports: Some(next_list_exports),
                default_export: Some(next_default_export),
            },
            next,
            conn,
            names: RefCell::new(Vec::new()),
        });
        below.abi.opaque = (&*below as *const ExportsBelow).cast_mut().cast();
        below
    }

    /// # Safety
    /// `this` must be the `abi` field of a live `ExportsBelow`.
    unsafe fn of<'b>(this: *const abi::NextExports) -> &'b ExportsBelow<'b> {
        // SAFETY: guaranteed by the caller.
        unsafe { &*(*this).opaque.cast::<ExportsBelow>() }
    }
}

unsafe extern "C" fn next_list_exports(
    this: *const abi::NextExports,
    readonly: c_int,
    is_tls: c_int,
    exports: *mut abi::Exports,
) -> c_int {
    // SAFETY: filters only receive `this` from a live ExportsBelow.
    let layer = unsafe { ExportsBelow::of(this) };
    // SAFETY: every export list handed to a filter is an ExportCollector.
    let Some(list) = (unsafe { exports.cast::<ExportCollector>().as_mut() }) else {
        call::record(Error::new(libc::EINVAL, "list_exports: no export list"));
        return -1;
    };
    let r = below(|| {
        layer
            .next
            .list_exports(layer.conn, readonly != 0, is_tls != 0)
    });
    report(r, |entries| {
        for e in entries {
            if let Ok(name) = CString::new(e.name) {
                let desc = e.description.and_then(|d| CString::new(d).ok());
                list.add(&name, desc.as_deref());
            }
        }
        0
    })
}

unsafe extern "C" fn next_default_export(
    this: *const abi::NextExports,
    readonly: c_int,
    is_tls: c_int,
) -> *const c_char {
    // SAFETY: filters only receive `this` from a live ExportsBelow.
    let layer = unsafe { ExportsBelow::of(this) };
    match below(|| {
        layer
            .next
            .default_export(layer.conn, readonly != 0, is_tls != 0)
    }) {
        Ok(name) => {
            let name = CString::new(name).unwrap_or_default();
            let ptr = name.as_ptr();
            // The CString's buffer does not move when the vector grows.
            layer.names.borrow_mut().push(name);
            ptr
        }
        Err(e) => {
            call::record(e);
            std::ptr::null()
        }
    }
}

/// What `next->open` records while the filter's open runs.
struct NextOpenSlot {
    next: Arc<dyn Backend>,
    /// The connection the filter is being opened for; the layer below is
    /// opened for it too, under the export name the filter asks for.
    conn: Arc<Connection>,
    /// The handle opened, and the connection it was opened for.
    opened: Option<(Box<dyn Handle>, Arc<Connection>)>,
}

unsafe extern "C" fn next_open(
    this: *const abi::NextOpen,
    readonly: c_int,
    export: *const c_char,
) -> c_int {
    // SAFETY: the server builds `this` around an `NextOpenSlot` that outlives the
    // filter's open call, the only time this function can run.
    let slot = unsafe { &mut *(*this).opaque.cast::<NextOpenSlot>() };
    let name = if export.is_null() {
        String::new()
    } else {
        // SAFETY: the filter passes a NUL-terminated string.
        unsafe { CStr::from_ptr(export) }
            .to_string_lossy()
            .into_owned()
    };
    if slot.opened.is_some() {
        call::record(Error::new(libc::EINVAL, "next->open called twice"));
        return -1;
    }
    let conn = slot.conn.renamed(CString::new(name).unwrap_or_default());
    match below(|| slot.next.open(conn.clone(), readonly != 0)) {
        Ok(h) => {
            slot.opened = Some((h, conn));
            0
        }
        Err(e) => {
            call::record(e);
            -1
        }
    }
}

impl Backend for Layer {
    fn name(&self) -> &str {
        self.lib.name()
    }

    fn thread_model(&self) -> ThreadModel {
        self.lib.thread_model().min(self.next.thread_model())
    }

    fn nonblocking(&self) -> bool {
        self.lib.nonblocking() && self.next.nonblocking()
    }

    fn after_fork(&self) -> Result<()> {
        self.next.after_fork()?;
        self.lib.after_fork()
    }

    fn preconnect(&self, conn: &Arc<Connection>, readonly: bool) -> Result<()> {
        if let Some(f) = fcb!(self.lib, preconnect) {
            // SAFETY: ABI callback taking an int.
            let r = self
                .lib
                .call_for(conn, || unsafe { f(c_int::from(readonly)) });
            self.lib.check("preconnect", r)?;
        }
        self.next.preconnect(conn, readonly)
    }

    fn list_exports(
        &self,
        conn: &Arc<Connection>,
        readonly: bool,
        is_tls: bool,
    ) -> Result<Vec<ExportEntry>> {
        let Some(f) = fcb!(self.lib, list_exports) else {
            return self.next.list_exports(conn, readonly, is_tls);
        };
        let below = ExportsBelow::new(&*self.next, conn);
        let mut list = ExportCollector::default();
        let ptr = list.as_abi();
        // SAFETY: the next table and the list outlive the call, and the
        // filter may use them only during it.
        let r = self.lib.call_for(conn, || unsafe {
            f(&below.abi, c_int::from(readonly), c_int::from(is_tls), ptr)
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
        let Some(f) = fcb!(self.lib, default_export) else {
            return self.next.default_export(conn, readonly, is_tls);
        };
        let below = ExportsBelow::new(&*self.next, conn);
        // SAFETY: the next table outlives the call; the result is copied
        // at once.
        let p = self.lib.call_for(conn, || unsafe {
            f(&below.abi, c_int::from(readonly), c_int::from(is_tls))
        });
        layer_string(p).ok_or_else(|| call::take_error("default_export"))
    }

    fn open(&self, conn: Arc<Connection>, readonly: bool) -> Result<Box<dyn Handle>> {
        let Some(f) = fcb!(self.lib, open) else {
            let next = self.next.open(conn.clone(), readonly)?;
            let opener = Opener {
                backend: self.next.clone(),
                conn: conn.clone(),
            };
            return Ok(Box::new(FilterHandle::new(
                self.lib.clone(),
                std::ptr::null_mut(),
                conn,
                next,
                opener,
            )));
        };
        let mut slot = NextOpenSlot {
            next: self.next.clone(),
            conn: conn.clone(),
            opened: None,
        };
        let opener = abi::NextOpen {
            struct_size: std::mem::size_of::<abi::NextOpen>() as u64,
            opaque: (&mut slot as *mut NextOpenSlot).cast(),
            open: Some(next_open),
        };
        let export = conn.export_name.as_ptr();
        // SAFETY: `opener` and `export` (in `conn`) outlive the call; the
        // filter may call `opener.open` during it and not after.
        let h = self.lib.call_for(&conn, || unsafe {
            f(&opener, c_int::from(readonly), export)
        });
        let next = slot.opened.take();
        match (h.is_null(), next) {
            (false, Some((next, below_conn))) => {
                let opener = Opener {
                    backend: self.next.clone(),
                    conn: below_conn,
                };
                let handle = FilterHandle::new(self.lib.clone(), h, conn, next, opener);
                handle.prepare(readonly)?;
                Ok(Box::new(handle))
            }
            (true, _) => Err(call::take_error("open")),
            (false, None) => {
                if let Some(close) = fcb!(self.lib, close) {
                    // SAFETY: closing the handle the filter just returned.
                    self.lib.call_for(&conn, || unsafe { close(h) });
                }
                Err(Error::new(
                    libc::EINVAL,
                    format!("{}: open did not open the next layer", self.lib.name()),
                ))
            }
        }
    }
}

/// An open handle of the layer below, exposed as a `struct nbdhost_next`.
struct BelowHandle {
    /// Boxed so its address is stable, with `opaque` pointing at `below`.
    abi: Box<abi::Next>,
    below: Box<Below>,
}

/// A filter handle over the next layer's handle. It holds its library, so
/// the filter cannot be unloaded while the handle is open.
pub(super) struct FilterHandle {
    lib: Arc<Library<abi::Filter>>,
    handle: *mut c_void,
    /// The connection it was opened for: every callback on the handle is
    /// made for it.
    conn: Arc<Connection>,
    // Declared last: dropped after the filter's close callback has run.
    next: BelowHandle,
}

// SAFETY: the filter handle is an opaque token; the thread model, enforced
// by the worker pool, decides which calls may overlap.
unsafe impl Send for FilterHandle {}
// SAFETY: as for Send.
unsafe impl Sync for FilterHandle {}

/// Run a call on the layer below for a filter. A panic in the server's own
/// code there must not unwind into the filter's frames (across the C ABI it
/// would abort the server): it becomes an EIO for this request.
fn below<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(Error::new(
            libc::EIO,
            "internal error in the layer below (panic)",
        ))
    })
}

fn report<T>(r: Result<T>, ok: impl FnOnce(T) -> c_int) -> c_int {
    match r {
        Ok(v) => ok(v),
        Err(e) => {
            call::record(e);
            -1
        }
    }
}

macro_rules! next_can {
    ($name:ident, $method:ident, $conv:expr) => {
        unsafe extern "C" fn $name(next: *const abi::Next) -> c_int {
            // SAFETY: filters only receive `next` from a live FilterHandle.
            report(below(|| unsafe { next_of(next) }.$method()), $conv)
        }
    };
}

next_can!(next_can_write, can_write, c_int::from);
next_can!(next_can_flush, can_flush, c_int::from);
next_can!(next_can_trim, can_trim, c_int::from);
next_can!(next_can_zero, can_zero, c_int::from);
next_can!(next_can_fast_zero, can_fast_zero, c_int::from);
next_can!(next_can_fua, can_fua, |s: Support| s as c_int);
next_can!(next_can_multi_conn, can_multi_conn, c_int::from);
next_can!(next_can_cache, can_cache, |s: Support| s as c_int);
next_can!(next_can_extents, can_extents, c_int::from);
next_can!(next_is_rotational, is_rotational, c_int::from);

unsafe extern "C" fn next_get_size(next: *const abi::Next) -> i64 {
    // SAFETY: filters only receive `next` from a live FilterHandle.
    match below(|| unsafe { next_of(next) }.get_size()) {
        Ok(s) => s as i64,
        Err(e) => {
            call::record(e);
            -1
        }
    }
}

unsafe extern "C" fn next_block_size(
    next: *const abi::Next,
    min: *mut u32,
    pref: *mut u32,
    max: *mut u32,
) -> c_int {
    // SAFETY: filters only receive `next` from a live FilterHandle.
    report(below(|| unsafe { next_of(next) }.block_size()), |bs| {
        let (a, b, c) = bs.unwrap_or((0, 0, 0));
        // SAFETY: the filter passes three writable places.
        unsafe {
            *min = a;
            *pref = b;
            *max = c;
        }
        0
    })
}

thread_local! {
    static DESCRIPTION: std::cell::RefCell<CString> = Default::default();
}

unsafe extern "C" fn next_export_description(next: *const abi::Next) -> *const c_char {
    // SAFETY: filters only receive `next` from a live FilterHandle.
    match below(|| unsafe { next_of(next) }.export_description()) {
        Ok(Some(d)) => DESCRIPTION.with(|slot| {
            *slot.borrow_mut() = CString::new(d).unwrap_or_default();
            slot.borrow().as_ptr()
        }),
        Ok(None) => std::ptr::null(),
        Err(e) => {
            call::record(e);
            std::ptr::null()
        }
    }
}

unsafe extern "C" fn next_pread(
    next: *const abi::Next,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
) -> c_int {
    // SAFETY: the filter passes a writable buffer of `count` bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), count as usize) };
    // SAFETY: filters only receive `next` from a live FilterHandle.
    report(
        below(|| unsafe { next_of(next) }.pread(buf, offset, Flags::from_bits_truncate(flags))),
        |()| 0,
    )
}

unsafe extern "C" fn next_pwrite(
    next: *const abi::Next,
    buf: *const c_void,
    count: u64,
    offset: u64,
    flags: u32,
) -> c_int {
    // SAFETY: the filter passes a readable buffer of `count` bytes.
    let buf = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), count as usize) };
    // SAFETY: filters only receive `next` from a live FilterHandle.
    report(
        below(|| unsafe { next_of(next) }.pwrite(buf, offset, Flags::from_bits_truncate(flags))),
        |()| 0,
    )
}

unsafe extern "C" fn next_flush(next: *const abi::Next, flags: u32) -> c_int {
    // SAFETY: filters only receive `next` from a live FilterHandle.
    report(
        below(|| unsafe { next_of(next) }.flush(Flags::from_bits_truncate(flags))),
        |()| 0,
    )
}

macro_rules! next_range {
    ($name:ident, $method:ident) => {
        unsafe extern "C" fn $name(
            next: *const abi::Next,
            count: u64,
            offset: u64,
            flags: u32,
        ) -> c_int {
            // SAFETY: filters only receive `next` from a live FilterHandle.
            report(
                below(|| {
                    unsafe { next_of(next) }.$method(
                        count,
                        offset,
                        Flags::from_bits_truncate(flags),
                    )
                }),
                |()| 0,
            )
        }
    };
}

next_range!(next_trim, trim);
next_range!(next_zero, zero);
next_range!(next_cache, cache);

unsafe extern "C" fn next_extents(
    next: *const abi::Next,
    count: u64,
    offset: u64,
    flags: u32,
    list: *mut abi::Extents,
) -> c_int {
    // SAFETY: every extent list handed to a filter is an ExtentCollector.
    let list = unsafe { &mut *list.cast::<ExtentCollector>() };
    // SAFETY: filters only receive `next` from a live FilterHandle.
    let r =
        below(|| unsafe { next_of(next) }.extents(count, offset, Flags::from_bits_truncate(flags)));
    report(r, |extents| {
        for e in extents {
            if let Err(err) = list.add(e.offset, e.length, e.flags) {
                call::record(err);
                return -1;
            }
        }
        0
    })
}

thread_local! {
    static LOCAL_FILE: std::cell::RefCell<CString> = Default::default();
}

unsafe extern "C" fn next_local_file(next: *const abi::Next) -> *const c_char {
    // SAFETY: filters only receive `next` from a live FilterHandle.
    match below(|| unsafe { next_of(next) }.local_file()) {
        Ok(Some(p)) => LOCAL_FILE.with(|slot| {
            *slot.borrow_mut() =
                CString::new(p.into_os_string().into_encoded_bytes()).unwrap_or_default();
            slot.borrow().as_ptr()
        }),
        Ok(None) => std::ptr::null(),
        Err(e) => {
            call::record(e);
            std::ptr::null()
        }
    }
}

impl BelowHandle {
    fn new(handle: Box<dyn Handle>, opener: Opener) -> BelowHandle {
        let below = Box::new(Below::new(handle, opener));
        let abi = Box::new(abi::Next {
            struct_size: std::mem::size_of::<abi::Next>() as u64,
            opaque: (&*below as *const Below).cast_mut().cast(),
            get_size: Some(next_get_size),
            block_size: Some(next_block_size),
            can_write: Some(next_can_write),
            can_flush: Some(next_can_flush),
            can_trim: Some(next_can_trim),
            can_zero: Some(next_can_zero),
            can_fast_zero: Some(next_can_fast_zero),
            can_fua: Some(next_can_fua),
            can_multi_conn: Some(next_can_multi_conn),
            can_cache: Some(next_can_cache),
            can_extents: Some(next_can_extents),
            is_rotational: Some(next_is_rotational),
            export_description: Some(next_export_description),
            pread: Some(next_pread),
            pwrite: Some(next_pwrite),
            flush: Some(next_flush),
            trim: Some(next_trim),
            zero: Some(next_zero),
            extents: Some(next_extents),
            cache: Some(next_cache),
            local_file: Some(next_local_file),
            async_pread: Some(next_async_pread),
            async_pwrite: Some(next_async_pwrite),
            async_flush: Some(next_async_flush),
            async_trim: Some(next_async_trim),
            async_zero: Some(next_async_zero),
            async_cache: Some(next_async_cache),
            async_extents: Some(next_async_extents),
            reopen: Some(next_reopen),
            after: Some(next_after),
            background: Some(next_background),
            closing: Some(next_closing),
        });
        BelowHandle { abi, below }
    }
}

impl FilterHandle {
    fn new(
        lib: Arc<Library<abi::Filter>>,
        handle: *mut c_void,
        conn: Arc<Connection>,
        next: Box<dyn Handle>,
        opener: Opener,
    ) -> FilterHandle {
        FilterHandle {
            lib,
            handle,
            conn,
            next: BelowHandle::new(next, opener),
        }
    }

    /// The filter's `prepare`, now that everything below is open (and,
    /// being opened first, prepared). A failure drops the handle, which
    /// closes it and the layers below.
    fn prepare(&self, readonly: bool) -> Result<()> {
        let Some(f) = fcb!(self.lib, prepare) else {
            return Ok(());
        };
        // SAFETY: ABI callback with our next table and the filter's handle.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle, c_int::from(readonly)) });
        self.lib.check("prepare", r).map_err(|e| {
            log::debug!("{}: prepare failed: {e}", self.lib.name());
            e
        })
    }

    /// Run `f` as a callback on this handle, made for its connection.
    pub(super) fn call<T>(&self, f: impl FnOnce() -> T) -> T {
        self.lib.call_for(&self.conn, f)
    }

    /// The filter's asynchronous callbacks (none past the end of an
    /// older filter's struct).
    pub(super) fn async_callbacks(&self) -> AsyncCallbacks {
        AsyncCallbacks {
            pread: fcb!(self.lib, async_pread),
            pwrite: fcb!(self.lib, async_pwrite),
            flush: fcb!(self.lib, async_flush),
            trim: fcb!(self.lib, async_trim),
            zero: fcb!(self.lib, async_zero),
            cache: fcb!(self.lib, async_cache),
            extents: fcb!(self.lib, async_extents),
        }
    }

    /// A synchronous call of a filter that has only the asynchronous
    /// callback for it: started, and waited for here, so the filter is not
    /// skipped. `None` when it has neither: the call goes down unchanged.
    fn wait_async(&self, op: AsyncOp) -> Option<Result<()>> {
        let t = self.async_callbacks();
        let has = match op {
            AsyncOp::Read { .. } => t.pread.is_some(),
            AsyncOp::Write { .. } => t.pwrite.is_some(),
            AsyncOp::Flush { .. } => t.flush.is_some(),
            AsyncOp::Trim { .. } => t.trim.is_some(),
            AsyncOp::Zero { .. } => t.zero.is_some(),
            AsyncOp::Cache { .. } => t.cache.is_some(),
            AsyncOp::Extents { .. } => t.extents.is_some(),
        };
        has.then(|| inflight::wait(|token| self.start_async(op, token)))
    }

    /// Whether the filter has the synchronous callback for `op`'s kind.
    pub(super) fn has_sync(&self, op: &AsyncOp) -> bool {
        match op {
            AsyncOp::Read { .. } => fcb!(self.lib, pread).is_some(),
            AsyncOp::Write { .. } => fcb!(self.lib, pwrite).is_some(),
            AsyncOp::Flush { .. } => fcb!(self.lib, flush).is_some(),
            AsyncOp::Trim { .. } => fcb!(self.lib, trim).is_some(),
            AsyncOp::Zero { .. } => fcb!(self.lib, zero).is_some(),
            AsyncOp::Cache { .. } => fcb!(self.lib, cache).is_some(),
            AsyncOp::Extents { .. } => fcb!(self.lib, extents).is_some(),
        }
    }

    /// The layer below's table, as the filter's callbacks get it.
    pub(super) fn next_table(&self) -> *const abi::Next {
        &*self.next.abi
    }

    /// The filter's own handle.
    pub(super) fn raw_handle(&self) -> *mut c_void {
        self.handle
    }

    /// The layer below.
    pub(super) fn below(&self) -> &dyn Handle {
        self.next.below.handle()
    }

    /// The filter's name, for messages.
    pub(super) fn lib_name(&self) -> &'static str {
        self.lib.name()
    }

    fn can(&self, cb: Option<abi::FilterHandleFn>, what: &str) -> Option<Result<c_int>> {
        let f = cb?;
        // SAFETY: ABI callback with our next table and the filter's handle.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle) });
        Some(if r < 0 {
            Err(call::take_error(what))
        } else {
            Ok(r)
        })
    }

    fn range(
        &self,
        cb: abi::FilterRangeFn,
        what: &str,
        count: u64,
        offset: u64,
        flags: Flags,
    ) -> Result<()> {
        // SAFETY: ABI callback with our next table and the filter's handle.
        let r =
            self.call(|| unsafe { cb(&*self.next.abi, self.handle, count, offset, flags.bits()) });
        self.lib.check(what, r)
    }
}

impl Drop for FilterHandle {
    fn drop(&mut self) {
        // Before the filter's close: its timers and background jobs may
        // use the handle and the layer below.
        self.next.below.quiesce();
        if let Some(close) = fcb!(self.lib, close) {
            // SAFETY: each filter handle is closed exactly once, here, before
            // the next layer's handle it may refer to.
            self.call(|| unsafe { close(self.handle) });
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

macro_rules! can_bool {
    ($method:ident) => {
        fn $method(&self) -> Result<bool> {
            match self.can(fcb!(self.lib, $method), stringify!($method)) {
                Some(r) => r.map(|v| v != 0),
                None => self.next.below.handle().$method(),
            }
        }
    };
}

/// A filter's asynchronous requests: started with the filter's `async_*`
/// callback, else its synchronous one on the starting thread, else passed
/// down unchanged, so a filter that only changes what clients are told
/// never makes a chain synchronous.
impl FilterHandle {
    /// Whether requests through this handle can be started without
    /// waiting: the filter starts some itself, or passes them to a layer
    /// that does.
    pub(super) fn has_async(&self) -> bool {
        self.async_callbacks().any() || self.below().is_async()
    }

    /// Start `op` for `token`: with the filter's asynchronous callback,
    /// else its synchronous one here, else down unchanged.
    pub(super) fn start_async(&self, op: AsyncOp, token: Token) {
        let t = self.async_callbacks();
        let (next, h, req) = (self.next_table(), self.raw_handle(), token.as_ptr());
        // SAFETY (each call): the filter's callback with our next table and
        // its handle; the buffers and list stay valid, and the handle open,
        // until `token` completes.
        let started = match op {
            AsyncOp::Read {
                buf,
                len,
                offset,
                flags,
            } => t.pread.map(|f| {
                self.call(|| unsafe {
                    f(next, h, buf.cast(), len as u64, offset, flags.bits(), req)
                })
            }),
            AsyncOp::Write {
                buf,
                len,
                offset,
                flags,
            } => t.pwrite.map(|f| {
                self.call(|| unsafe {
                    f(next, h, buf.cast(), len as u64, offset, flags.bits(), req)
                })
            }),
            AsyncOp::Flush { flags } => t
                .flush
                .map(|f| self.call(|| unsafe { f(next, h, flags.bits(), req) })),
            AsyncOp::Trim {
                count,
                offset,
                flags,
            }
            | AsyncOp::Zero {
                count,
                offset,
                flags,
            }
            | AsyncOp::Cache {
                count,
                offset,
                flags,
            } => {
                let f = match op {
                    AsyncOp::Trim { .. } => t.trim,
                    AsyncOp::Zero { .. } => t.zero,
                    _ => t.cache,
                };
                f.map(|f| self.call(|| unsafe { f(next, h, count, offset, flags.bits(), req) }))
            }
            AsyncOp::Extents {
                count,
                offset,
                flags,
                list,
            } => t.extents.map(|f| {
                let list = list.cast::<abi::Extents>();
                self.call(|| unsafe { f(next, h, count, offset, flags.bits(), list, req) })
            }),
        };
        if started.is_some() {
            return;
        }
        if self.has_sync(&op) {
            let r = run_sync(self, &op);
            inflight::complete(token, r, self.lib_name());
        } else {
            self.below().start(op, token);
        }
    }
}

impl Handle for FilterHandle {
    fn get_size(&self) -> Result<u64> {
        let Some(f) = fcb!(self.lib, get_size) else {
            return self.next.below.handle().get_size();
        };
        // SAFETY: ABI callback with our next table and the filter's handle.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle) });
        u64::try_from(r).map_err(|_| call::take_error("get_size"))
    }

    fn block_size(&self) -> Result<Option<(u32, u32, u32)>> {
        let Some(f) = fcb!(self.lib, block_size) else {
            return self.next.below.handle().block_size();
        };
        let (mut a, mut b, mut c) = (0u32, 0u32, 0u32);
        // SAFETY: ABI callback writing three u32s into our locals.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle, &mut a, &mut b, &mut c) });
        self.lib.check("block_size", r)?;
        checked_block_size(self.lib.name(), a, b, c)
    }

    can_bool!(can_write);
    can_bool!(can_flush);
    can_bool!(can_trim);
    can_bool!(can_zero);
    can_bool!(can_fast_zero);
    can_bool!(can_multi_conn);
    can_bool!(can_extents);
    can_bool!(is_rotational);

    fn can_fua(&self) -> Result<Support> {
        match self.can(fcb!(self.lib, can_fua), "can_fua") {
            Some(r) => r.map(support),
            None => self.next.below.handle().can_fua(),
        }
    }

    fn can_cache(&self) -> Result<Support> {
        match self.can(fcb!(self.lib, can_cache), "can_cache") {
            Some(r) => r.map(support),
            None => self.next.below.handle().can_cache(),
        }
    }

    fn export_description(&self) -> Result<Option<String>> {
        let Some(f) = fcb!(self.lib, export_description) else {
            return self.next.below.handle().export_description();
        };
        // SAFETY: ABI callback; the string is copied at once.
        let p = self.call(|| unsafe { f(&*self.next.abi, self.handle) });
        Ok(layer_string(p))
    }

    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = fcb!(self.lib, pread) else {
            let op = AsyncOp::Read {
                buf: buf.as_mut_ptr(),
                len: buf.len(),
                offset,
                flags,
            };
            return self
                .wait_async(op)
                .unwrap_or_else(|| self.next.below.handle().pread(buf, offset, flags));
        };
        let (ptr, len) = (buf.as_mut_ptr(), buf.len() as u64);
        // SAFETY: `buf` is writable for its length during the call.
        let r = self.call(|| unsafe {
            f(
                &*self.next.abi,
                self.handle,
                ptr.cast(),
                len,
                offset,
                flags.bits(),
            )
        });
        self.lib.check("pread", r)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = fcb!(self.lib, pwrite) else {
            let op = AsyncOp::Write {
                buf: buf.as_ptr(),
                len: buf.len(),
                offset,
                flags,
            };
            return self
                .wait_async(op)
                .unwrap_or_else(|| self.next.below.handle().pwrite(buf, offset, flags));
        };
        // SAFETY: `buf` is readable for its length during the call.
        let r = self.call(|| unsafe {
            f(
                &*self.next.abi,
                self.handle,
                buf.as_ptr().cast(),
                buf.len() as u64,
                offset,
                flags.bits(),
            )
        });
        self.lib.check("pwrite", r)
    }

    fn flush(&self, flags: Flags) -> Result<()> {
        let Some(f) = fcb!(self.lib, flush) else {
            return self
                .wait_async(AsyncOp::Flush { flags })
                .unwrap_or_else(|| self.next.below.handle().flush(flags));
        };
        // SAFETY: ABI callback with our next table and the filter's handle.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle, flags.bits()) });
        self.lib.check("flush", r)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match fcb!(self.lib, trim) {
            Some(f) => self.range(f, "trim", count, offset, flags),
            None => {
                let op = AsyncOp::Trim {
                    count,
                    offset,
                    flags,
                };
                self.wait_async(op)
                    .unwrap_or_else(|| self.next.below.handle().trim(count, offset, flags))
            }
        }
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match fcb!(self.lib, zero) {
            Some(f) => self.range(f, "zero", count, offset, flags),
            None => {
                let op = AsyncOp::Zero {
                    count,
                    offset,
                    flags,
                };
                self.wait_async(op)
                    .unwrap_or_else(|| self.next.below.handle().zero(count, offset, flags))
            }
        }
    }

    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match fcb!(self.lib, cache) {
            Some(f) => self.range(f, "cache", count, offset, flags),
            None => {
                let op = AsyncOp::Cache {
                    count,
                    offset,
                    flags,
                };
                self.wait_async(op)
                    .unwrap_or_else(|| self.next.below.handle().cache(count, offset, flags))
            }
        }
    }

    fn local_file(&self) -> Result<Option<std::path::PathBuf>> {
        let Some(f) = fcb!(self.lib, local_file) else {
            return self.next.below.handle().local_file();
        };
        // SAFETY: ABI callback with our next table and the filter's handle;
        // the path is copied at once.
        let p = self.call(|| unsafe { f(&*self.next.abi, self.handle) });
        Ok(layer_path(p))
    }

    fn is_async(&self) -> bool {
        self.has_async()
    }

    fn start(&self, op: AsyncOp, token: Token) {
        self.start_async(op, token);
    }

    fn finalize(&self) -> Result<()> {
        let mine = match fcb!(self.lib, finalize) {
            Some(f) => {
                // SAFETY: ABI callback with our next table and the filter's handle.
                let r = self.call(|| unsafe { f(&*self.next.abi, self.handle) });
                self.lib.check("finalize", r)
            }
            None => Ok(()),
        };
        // The layers below write back theirs even when this one failed.
        let below = self.next.below.handle().finalize();
        mine.and(below)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags) -> Result<Vec<Extent>> {
        let Some(f) = fcb!(self.lib, extents) else {
            let mut c = ExtentCollector::new(offset);
            let op = AsyncOp::Extents {
                count,
                offset,
                flags,
                list: &mut c,
            };
            return match self.wait_async(op) {
                Some(r) => r.map(|()| c.into_extents()),
                None => self.next.below.handle().extents(count, offset, flags),
            };
        };
        let mut c = ExtentCollector::new(offset);
        let list = c.as_abi();
        // SAFETY: `list` is a collector that outlives the call.
        let r = self.call(|| unsafe {
            f(
                &*self.next.abi,
                self.handle,
                count,
                offset,
                flags.bits(),
                list,
            )
        });
        self.lib.check("extents", r)?;
        if c.extents().is_empty() {
            return Err(Error::new(
                libc::EIO,
                format!("{}: extents returned no extent", self.lib.name()),
            ));
        }
        Ok(c.into_extents())
    }
}
