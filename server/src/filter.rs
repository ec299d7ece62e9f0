//! Loading a filter shared object and stacking it on the next layer, so
//! that a filter and the layers below it are one more [`Backend`].
//!
//! Like `plugin`, this is an ABI edge: struct size and version are checked,
//! callbacks past the end of an older struct count as absent, and an absent
//! callback passes the call to the next layer unchanged.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use nbdhost_plugin_api::{abi, Error, Flags, Result, Support, ThreadModel};

use crate::backend::{checked_block_size, Backend, ExportEntry, Extent, Handle};
use crate::host;
use crate::plugin::{check_header, library, ExtentCollector, LayerInfo};

/// A loaded filter shared object, not yet stacked.
pub struct LoadedFilter {
    table: &'static abi::Filter,
    info: LayerInfo,
    name: &'static str,
    _lib: libloading::Library,
}

macro_rules! fcb {
    ($f:expr, $field:ident) => {{
        let end = std::mem::offset_of!(abi::Filter, $field) + std::mem::size_of::<usize>();
        if ($f.info.struct_size as usize) >= end {
            $f.table.$field
        } else {
            None
        }
    }};
}

fn opt_string(p: *const c_char) -> Option<String> {
    // SAFETY: the filter's strings are NUL-terminated and live as long as
    // the library, which outlives this call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

impl LoadedFilter {
    /// Load the filter at `path` and read its table.
    pub fn load(path: &Path) -> std::result::Result<LoadedFilter, String> {
        let shown = path.display();
        let (lib, entry) = library::<abi::FilterEntry>(path, abi::FILTER_ENTRY, "filter")?;
        // SAFETY: the entry point takes the host table, which is 'static.
        let table = unsafe { entry(&host::HOST) };
        // SAFETY: null or a struct that lives as long as the library.
        let table: &'static abi::Filter = unsafe { table.as_ref() }
            .ok_or_else(|| format!("{shown}: filter entry point returned NULL"))?;
        let min_size =
            std::mem::offset_of!(abi::Filter, config_help) + std::mem::size_of::<usize>();
        check_header(
            path,
            "filter",
            table.abi_version,
            table.struct_size,
            min_size,
        )?;
        let info = LayerInfo::new(
            path,
            "filter",
            table.abi_version,
            table.struct_size,
            table.thread_model,
            [
                table.name,
                table.version,
                table.description,
                table.config_help,
                std::ptr::null(),
            ],
        )?;
        let name = info.name.clone();
        let f = LoadedFilter {
            table,
            name: Box::leak(name.into_boxed_str()),
            info,
            _lib: lib,
        };
        if let Some(load) = fcb!(f, load) {
            // SAFETY: ABI callback with no arguments.
            if host::call_layer(f.name, || unsafe { load() }) != 0 {
                return Err(format!(
                    "{}: load failed: {}",
                    f.name,
                    host::take_error("load")
                ));
            }
        }
        Ok(f)
    }

    /// Static facts about the filter.
    pub fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn check(&self, what: &str, r: c_int) -> Result<()> {
        if r == -1 {
            Err(host::take_error(what))
        } else {
            Ok(())
        }
    }

    /// Offer one parameter; `Ok(true)` if the filter took it.
    pub fn config(&self, key: &str, value: &str) -> Result<bool> {
        let Some(f) = fcb!(self, config) else {
            return Ok(false);
        };
        let k = CString::new(key).map_err(|_| Error::new(libc::EINVAL, "NUL in key"))?;
        let v = CString::new(value).map_err(|_| Error::new(libc::EINVAL, "NUL in value"))?;
        // SAFETY: both strings are valid for the call.
        let r = host::call_layer(self.name, || unsafe { f(k.as_ptr(), v.as_ptr()) });
        self.check("config", r)?;
        Ok(r == abi::CONFIG_TAKEN)
    }

    /// All parameters have been given.
    pub fn config_complete(&self) -> Result<()> {
        let Some(f) = fcb!(self, config_complete) else {
            return Ok(());
        };
        // SAFETY: ABI callback with no arguments.
        let r = host::call_layer(self.name, || unsafe { f() });
        self.check("config_complete", r)
    }

    /// The server is about to listen.
    pub fn get_ready(&self) -> Result<()> {
        let Some(f) = fcb!(self, get_ready) else {
            return Ok(());
        };
        // SAFETY: ABI callback with no arguments.
        let r = host::call_layer(self.name, || unsafe { f() });
        self.check("get_ready", r)
    }

    /// Stack this filter on `next`, running its start-up look at the layer
    /// below first when it has one.
    pub fn stack(self, next: Arc<dyn Backend>) -> Result<Arc<dyn Backend>> {
        if let Some(f) = fcb!(self, startup) {
            let export = next.default_export(true, false)?;
            let below = OpenedNext::new(host::with_export_name(&export, || next.open(true))?);
            // SAFETY: ABI callback with a next table whose handle lives until
            // `below` is dropped after the call.
            let r = host::call_layer(self.name, || unsafe { f(&*below.abi) });
            self.check("startup", r)?;
        }
        Ok(Arc::new(Layer { filter: self, next }))
    }
}

impl Drop for LoadedFilter {
    fn drop(&mut self) {
        if let Some(f) = fcb!(self, unload) {
            // SAFETY: called once, after every handle has been closed.
            host::call_layer(self.name, || unsafe { f() });
        }
    }
}

/// A filter stacked on the layers below it.
struct Layer {
    filter: LoadedFilter,
    next: Arc<dyn Backend>,
}

/// What `next->open` records while the filter's open runs.
struct OpenSlot {
    next: Arc<dyn Backend>,
    opened: Option<Box<dyn Handle>>,
}

unsafe extern "C" fn next_open(
    this: *const abi::NextOpen,
    readonly: c_int,
    export: *const c_char,
) -> c_int {
    // SAFETY: the server builds `this` around an `OpenSlot` that outlives the
    // filter's open call, the only time this function can run.
    let slot = unsafe { &mut *(*this).opaque.cast::<OpenSlot>() };
    let name = if export.is_null() {
        String::new()
    } else {
        // SAFETY: the filter passes a NUL-terminated string.
        unsafe { CStr::from_ptr(export) }
            .to_string_lossy()
            .into_owned()
    };
    if slot.opened.is_some() {
        host::record(Error::new(libc::EINVAL, "next->open called twice"));
        return -1;
    }
    match below(|| host::with_export_name(&name, || slot.next.open(readonly != 0))) {
        Ok(h) => {
            slot.opened = Some(h);
            0
        }
        Err(e) => {
            host::record(e);
            -1
        }
    }
}

impl Backend for Layer {
    fn name(&self) -> &str {
        self.filter.name
    }

    fn thread_model(&self) -> ThreadModel {
        self.filter.info.thread_model.min(self.next.thread_model())
    }

    fn preconnect(&self, readonly: bool) -> Result<()> {
        if let Some(f) = fcb!(self.filter, preconnect) {
            // SAFETY: ABI callback taking an int.
            let r = host::call_layer(self.filter.name, || unsafe { f(c_int::from(readonly)) });
            self.filter.check("preconnect", r)?;
        }
        self.next.preconnect(readonly)
    }

    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<ExportEntry>> {
        self.next.list_exports(readonly, is_tls)
    }

    fn default_export(&self, readonly: bool, is_tls: bool) -> Result<String> {
        self.next.default_export(readonly, is_tls)
    }

    fn open(&self, readonly: bool) -> Result<Box<dyn Handle>> {
        let mut slot = OpenSlot {
            next: self.next.clone(),
            opened: None,
        };
        let Some(f) = fcb!(self.filter, open) else {
            let next = self.next.open(readonly)?;
            return Ok(Box::new(FilterHandle::new(
                self,
                std::ptr::null_mut(),
                next,
            )));
        };
        let opener = abi::NextOpen {
            struct_size: std::mem::size_of::<abi::NextOpen>() as u64,
            opaque: (&mut slot as *mut OpenSlot).cast(),
            open: Some(next_open),
        };
        let export = host::export_name();
        // SAFETY: `opener` and `export` outlive the call; the filter may call
        // `opener.open` during it and not after.
        let h = host::call_layer(self.filter.name, || unsafe {
            f(&opener, c_int::from(readonly), export.as_ptr())
        });
        let next = slot.opened.take();
        match (h.is_null(), next) {
            (false, Some(next)) => Ok(Box::new(FilterHandle::new(self, h, next))),
            (true, _) => Err(host::take_error("open")),
            (false, None) => {
                if let Some(close) = fcb!(self.filter, close) {
                    // SAFETY: closing the handle the filter just returned.
                    host::call_layer(self.filter.name, || unsafe { close(h) });
                }
                Err(Error::new(
                    libc::EINVAL,
                    format!("{}: open did not open the next layer", self.filter.name),
                ))
            }
        }
    }
}

/// An open handle of the layer below, exposed as a `struct nbdhost_next`.
struct OpenedNext {
    /// Boxed so its address is stable, with `opaque` pointing at `handle`.
    abi: Box<abi::Next>,
    handle: Box<Box<dyn Handle>>,
}

/// A filter handle over the next layer's handle.
struct FilterHandle {
    // The stacked layer outlives its handles: connections are drained
    // before the chain is dropped (see `server`).
    layer: *const Layer,
    handle: *mut c_void,
    // Declared last: dropped after the filter's close callback has run.
    next: OpenedNext,
}

// SAFETY: the filter handle is an opaque token; the thread model, enforced
// by the worker pool, decides which calls may overlap.
unsafe impl Send for FilterHandle {}
// SAFETY: as for Send.
unsafe impl Sync for FilterHandle {}

/// Recover the next layer's handle from a `struct nbdhost_next`.
///
/// # Safety
/// `next` must be the `abi` table of a live `OpenedNext`.
unsafe fn next_of<'a>(next: *const abi::Next) -> &'a dyn Handle {
    // SAFETY: guaranteed by the caller: `opaque` points at the boxed handle.
    unsafe { &**(*next).opaque.cast::<Box<dyn Handle>>() }
}

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
            host::record(e);
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
            host::record(e);
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
            host::record(e);
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
                host::record(err);
                return -1;
            }
        }
        0
    })
}

impl OpenedNext {
    fn new(handle: Box<dyn Handle>) -> OpenedNext {
        let handle = Box::new(handle);
        let abi = Box::new(abi::Next {
            struct_size: std::mem::size_of::<abi::Next>() as u64,
            opaque: (&*handle as *const Box<dyn Handle>).cast_mut().cast(),
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
        });
        OpenedNext { abi, handle }
    }
}

impl FilterHandle {
    fn new(layer: &Layer, handle: *mut c_void, next: Box<dyn Handle>) -> FilterHandle {
        FilterHandle {
            layer,
            handle,
            next: OpenedNext::new(next),
        }
    }

    fn f(&self) -> &LoadedFilter {
        // SAFETY: see the `layer` field: the layer outlives its handles.
        unsafe { &(*self.layer).filter }
    }

    fn call<T>(&self, f: impl FnOnce() -> T) -> T {
        host::call_layer(self.f().name, f)
    }

    fn can(&self, cb: Option<abi::FilterHandleFn>, what: &str) -> Option<Result<c_int>> {
        let f = cb?;
        // SAFETY: ABI callback with our next table and the filter's handle.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle) });
        Some(if r < 0 {
            Err(host::take_error(what))
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
        self.f().check(what, r)
    }
}

impl Drop for FilterHandle {
    fn drop(&mut self) {
        if let Some(close) = fcb!(self.f(), close) {
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
            match self.can(fcb!(self.f(), $method), stringify!($method)) {
                Some(r) => r.map(|v| v != 0),
                None => self.next.handle.$method(),
            }
        }
    };
}

impl Handle for FilterHandle {
    fn get_size(&self) -> Result<u64> {
        let Some(f) = fcb!(self.f(), get_size) else {
            return self.next.handle.get_size();
        };
        // SAFETY: ABI callback with our next table and the filter's handle.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle) });
        u64::try_from(r).map_err(|_| host::take_error("get_size"))
    }

    fn block_size(&self) -> Result<Option<(u32, u32, u32)>> {
        let Some(f) = fcb!(self.f(), block_size) else {
            return self.next.handle.block_size();
        };
        let (mut a, mut b, mut c) = (0u32, 0u32, 0u32);
        // SAFETY: ABI callback writing three u32s into our locals.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle, &mut a, &mut b, &mut c) });
        self.f().check("block_size", r)?;
        checked_block_size(self.f().name, a, b, c)
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
        match self.can(fcb!(self.f(), can_fua), "can_fua") {
            Some(r) => r.map(support),
            None => self.next.handle.can_fua(),
        }
    }

    fn can_cache(&self) -> Result<Support> {
        match self.can(fcb!(self.f(), can_cache), "can_cache") {
            Some(r) => r.map(support),
            None => self.next.handle.can_cache(),
        }
    }

    fn export_description(&self) -> Result<Option<String>> {
        let Some(f) = fcb!(self.f(), export_description) else {
            return self.next.handle.export_description();
        };
        // SAFETY: ABI callback; the string is copied at once.
        let p = self.call(|| unsafe { f(&*self.next.abi, self.handle) });
        Ok(opt_string(p))
    }

    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = fcb!(self.f(), pread) else {
            return self.next.handle.pread(buf, offset, flags);
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
        self.f().check("pread", r)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let Some(f) = fcb!(self.f(), pwrite) else {
            return self.next.handle.pwrite(buf, offset, flags);
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
        self.f().check("pwrite", r)
    }

    fn flush(&self, flags: Flags) -> Result<()> {
        let Some(f) = fcb!(self.f(), flush) else {
            return self.next.handle.flush(flags);
        };
        // SAFETY: ABI callback with our next table and the filter's handle.
        let r = self.call(|| unsafe { f(&*self.next.abi, self.handle, flags.bits()) });
        self.f().check("flush", r)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match fcb!(self.f(), trim) {
            Some(f) => self.range(f, "trim", count, offset, flags),
            None => self.next.handle.trim(count, offset, flags),
        }
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match fcb!(self.f(), zero) {
            Some(f) => self.range(f, "zero", count, offset, flags),
            None => self.next.handle.zero(count, offset, flags),
        }
    }

    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match fcb!(self.f(), cache) {
            Some(f) => self.range(f, "cache", count, offset, flags),
            None => self.next.handle.cache(count, offset, flags),
        }
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags) -> Result<Vec<Extent>> {
        let Some(f) = fcb!(self.f(), extents) else {
            return self.next.handle.extents(count, offset, flags);
        };
        let mut c = ExtentCollector::new(offset);
        let list = (&mut c as *mut ExtentCollector).cast::<abi::Extents>();
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
        self.f().check("extents", r)?;
        if c.extents().is_empty() {
            return Err(Error::new(
                libc::EIO,
                format!("{}: extents returned no extent", self.f().name),
            ));
        }
        Ok(c.extents().to_vec())
    }
}
