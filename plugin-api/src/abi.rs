//! The raw C ABI, mirroring `include/nbdhost-plugin.h` field for field.
//!
//! Both the server and the SDK use these definitions; `tests/layout.rs`
//! holds them to the C header's layout.

use libc::{c_char, c_int, c_void, sockaddr, socklen_t};

/// Major version of the ABI; a server refuses a plugin with another major.
pub const ABI_MAJOR: u32 = 1;
/// Minor version: grows when fields are appended.
pub const ABI_MINOR: u32 = 10;
/// `(major << 16) | minor`, as stored in `abi_version`.
pub const ABI_VERSION: u32 = (ABI_MAJOR << 16) | ABI_MINOR;
/// Name of the symbol every plugin exports.
pub const PLUGIN_ENTRY: &str = "nbdhost_plugin_entry";
/// Since ABI 1.5: the symbol of an adapter, which serves a plugin written
/// for another server.
pub const PLUGIN_ADAPTER_ENTRY: &str = "nbdhost_plugin_adapter_entry";

/// `NBDHOST_THREAD_MODEL_SERIALIZE_CONNECTIONS`.
pub const THREAD_MODEL_SERIALIZE_CONNECTIONS: u32 = 0;
/// `NBDHOST_THREAD_MODEL_SERIALIZE_ALL_REQUESTS`.
pub const THREAD_MODEL_SERIALIZE_ALL_REQUESTS: u32 = 1;
/// `NBDHOST_THREAD_MODEL_SERIALIZE_REQUESTS`.
pub const THREAD_MODEL_SERIALIZE_REQUESTS: u32 = 2;
/// `NBDHOST_THREAD_MODEL_PARALLEL`.
pub const THREAD_MODEL_PARALLEL: u32 = 3;

/// `NBDHOST_FLAG_MAY_TRIM`.
pub const FLAG_MAY_TRIM: u32 = 1 << 0;
/// `NBDHOST_FLAG_FUA`.
pub const FLAG_FUA: u32 = 1 << 1;
/// `NBDHOST_FLAG_REQ_ONE`.
pub const FLAG_REQ_ONE: u32 = 1 << 2;
/// `NBDHOST_FLAG_FAST_ZERO`.
pub const FLAG_FAST_ZERO: u32 = 1 << 3;

/// `NBDHOST_FUA_NONE` / `NBDHOST_CACHE_NONE`.
pub const SUPPORT_NONE: c_int = 0;
/// `NBDHOST_FUA_EMULATE` / `NBDHOST_CACHE_EMULATE`.
pub const SUPPORT_EMULATE: c_int = 1;
/// `NBDHOST_FUA_NATIVE` / `NBDHOST_CACHE_NATIVE`.
pub const SUPPORT_NATIVE: c_int = 2;

/// `NBDHOST_NONBLOCKING`, a bit of what [`Plugin::capabilities`] and
/// [`Filter::capabilities`] return (since ABI 1.4): no callback ever waits,
/// so the server may call them on its event loops.
pub const NONBLOCKING: u64 = 1 << 0;
/// `NBDHOST_SYNCHRONOUS` (since ABI 1.9, for plugins): as configured, the
/// plugin's `async_*` callbacks are not to be used.
pub const SYNCHRONOUS: u64 = 1 << 1;

/// `NBDHOST_LOG_ERROR`, a level of [`Host::log`] (since ABI 1.5).
pub const LOG_ERROR: c_int = 0;
/// `NBDHOST_LOG_WARNING`.
pub const LOG_WARNING: c_int = 1;
/// `NBDHOST_LOG_INFO`.
pub const LOG_INFO: c_int = 2;
/// `NBDHOST_LOG_DEBUG`.
pub const LOG_DEBUG: c_int = 3;

/// `NBDHOST_EXTENT_HOLE`.
pub const EXTENT_HOLE: u32 = 1 << 0;
/// `NBDHOST_EXTENT_ZERO`.
pub const EXTENT_ZERO: u32 = 1 << 1;

/// Opaque extent list owned by the server (`struct nbdhost_extents`).
#[repr(C)]
pub struct Extents {
    _private: [u8; 0],
}

/// Opaque export list owned by the server (`struct nbdhost_exports`).
#[repr(C)]
pub struct Exports {
    _private: [u8; 0],
}

/// `struct nbdhost_host`: services the server offers to plugins.
#[repr(C)]
pub struct Host {
    pub struct_size: u64,
    pub abi_version: u32,
    pub reserved: u32,
    pub error: Option<unsafe extern "C" fn(errnum: c_int, msg: *const c_char)>,
    pub debug: Option<unsafe extern "C" fn(msg: *const c_char)>,
    pub add_extent: Option<
        unsafe extern "C" fn(extents: *mut Extents, offset: u64, length: u64, typ: u32) -> c_int,
    >,
    pub add_export: Option<
        unsafe extern "C" fn(
            exports: *mut Exports,
            name: *const c_char,
            description: *const c_char,
        ) -> c_int,
    >,
    pub parse_size: Option<unsafe extern "C" fn(s: *const c_char) -> i64>,
    pub read_secret:
        Option<unsafe extern "C" fn(value: *const c_char, secret: *mut *mut c_char) -> c_int>,
    pub free_secret: Option<unsafe extern "C" fn(secret: *mut c_char)>,
    pub peer_name:
        Option<unsafe extern "C" fn(addr: *mut sockaddr, addrlen: *mut socklen_t) -> c_int>,
    pub export_name: Option<unsafe extern "C" fn() -> *const c_char>,
    pub debug_flag: Option<unsafe extern "C" fn(name: *const c_char) -> c_int>,
    pub extents_new: Option<unsafe extern "C" fn(offset: u64) -> *mut Extents>,
    pub extents_free: Option<unsafe extern "C" fn(extents: *mut Extents)>,
    pub extents_count: Option<unsafe extern "C" fn(extents: *const Extents) -> usize>,
    pub extents_get: Option<
        unsafe extern "C" fn(
            extents: *const Extents,
            i: usize,
            offset: *mut u64,
            length: *mut u64,
            typ: *mut u32,
        ) -> c_int,
    >,
    pub last_errno: Option<unsafe extern "C" fn() -> c_int>,
    pub is_tls: Option<unsafe extern "C" fn() -> c_int>,
    pub peer_identity: Option<unsafe extern "C" fn() -> *const c_char>,
    /// Since ABI 1.3: a sleep that ends early at shutdown.
    pub nanosleep: Option<unsafe extern "C" fn(sec: u64, nsec: u64) -> c_int>,
    /// Since ABI 1.5: log without recording an error.
    pub log: Option<unsafe extern "C" fn(level: c_int, msg: *const c_char)>,
    pub debug_flag_name: Option<unsafe extern "C" fn(i: usize) -> *const c_char>,
    pub peer_credentials:
        Option<unsafe extern "C" fn(pid: *mut i64, uid: *mut i64, gid: *mut i64) -> c_int>,
    pub peer_tls_dn: Option<unsafe extern "C" fn() -> *const c_char>,
    pub peer_tls_issuer_dn: Option<unsafe extern "C" fn() -> *const c_char>,
    pub shutdown: Option<unsafe extern "C" fn()>,
    pub disconnect: Option<unsafe extern "C" fn(force: c_int)>,
    pub stdio_safe: Option<unsafe extern "C" fn() -> c_int>,
    /// Since ABI 1.6: the current connection's number, 0 outside one.
    pub connection_id: Option<unsafe extern "C" fn() -> u64>,
    /// Since ABI 1.7: an empty export list of the filter's own, for
    /// asking the layer below for its exports.
    pub exports_new: Option<unsafe extern "C" fn() -> *mut Exports>,
    pub exports_free: Option<unsafe extern "C" fn(exports: *mut Exports)>,
    pub exports_count: Option<unsafe extern "C" fn(exports: *const Exports) -> usize>,
    /// The `i`th export; the strings stay valid until the list changes or
    /// is freed, and `description` may come back null.
    pub exports_get: Option<
        unsafe extern "C" fn(
            exports: *const Exports,
            i: usize,
            name: *mut *const c_char,
            description: *mut *const c_char,
        ) -> c_int,
    >,
    /// Since ABI 1.9: complete an asynchronous request, once, from any
    /// thread; `errnum` 0 for success, `msg` (may be null) logged.
    pub complete:
        Option<unsafe extern "C" fn(req: *mut Request, errnum: c_int, msg: *const c_char)>,
    /// Since ABI 1.9, for filters: a new request whose completion calls
    /// `done(data, errnum)` on a worker thread, for the connection of the
    /// callback that made it.
    pub request_then:
        Option<unsafe extern "C" fn(done: ContinuationFn, data: *mut c_void) -> *mut Request>,
}

/// Since ABI 1.9: `struct nbdhost_request`, an asynchronous request in
/// flight. Opaque: the server's token for whoever waits for the result.
#[repr(C)]
pub struct Request {
    _private: [u8; 0],
}

/// Since ABI 1.9: what a filter's continuation is, for `request_then`.
pub type ContinuationFn = unsafe extern "C" fn(data: *mut c_void, errnum: c_int);

/// Since ABI 1.9: a plugin's asynchronous read.
pub type AsyncPreadFn = unsafe extern "C" fn(
    handle: *mut c_void,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut Request,
);
/// Since ABI 1.9: a plugin's asynchronous write.
pub type AsyncPwriteFn = unsafe extern "C" fn(
    handle: *mut c_void,
    buf: *const c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut Request,
);
/// Since ABI 1.9: a plugin's asynchronous flush.
pub type AsyncFlushFn = unsafe extern "C" fn(handle: *mut c_void, flags: u32, req: *mut Request);
/// Since ABI 1.9: a plugin's asynchronous trim, zero or cache.
pub type AsyncRangeFn = unsafe extern "C" fn(
    handle: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut Request,
);
/// Since ABI 1.9: a plugin's asynchronous extents.
pub type AsyncExtentsFn = unsafe extern "C" fn(
    handle: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    extents: *mut Extents,
    req: *mut Request,
);

/// Callback taking only a handle, as the `can_*` family does.
pub type HandleFn = unsafe extern "C" fn(handle: *mut c_void) -> c_int;
/// Callback for trim, zero and cache.
pub type RangeFn =
    unsafe extern "C" fn(handle: *mut c_void, count: u64, offset: u64, flags: u32) -> c_int;

/// `struct nbdhost_plugin`: what a plugin's entry point returns.
#[repr(C)]
pub struct Plugin {
    pub struct_size: u64,
    pub abi_version: u32,
    pub thread_model: u32,
    pub name: *const c_char,
    pub version: *const c_char,
    pub description: *const c_char,
    pub config_help: *const c_char,
    pub magic_config_key: *const c_char,
    pub load: Option<unsafe extern "C" fn() -> c_int>,
    pub unload: Option<unsafe extern "C" fn()>,
    pub config: Option<unsafe extern "C" fn(key: *const c_char, value: *const c_char) -> c_int>,
    pub config_complete: Option<unsafe extern "C" fn() -> c_int>,
    pub get_ready: Option<unsafe extern "C" fn() -> c_int>,
    pub preconnect: Option<unsafe extern "C" fn(readonly: c_int) -> c_int>,
    pub list_exports: Option<
        unsafe extern "C" fn(readonly: c_int, is_tls: c_int, exports: *mut Exports) -> c_int,
    >,
    pub default_export:
        Option<unsafe extern "C" fn(readonly: c_int, is_tls: c_int) -> *const c_char>,
    pub open: Option<unsafe extern "C" fn(readonly: c_int) -> *mut c_void>,
    pub close: Option<unsafe extern "C" fn(handle: *mut c_void)>,
    pub get_size: Option<unsafe extern "C" fn(handle: *mut c_void) -> i64>,
    pub block_size: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            minimum: *mut u32,
            preferred: *mut u32,
            maximum: *mut u32,
        ) -> c_int,
    >,
    pub can_write: Option<HandleFn>,
    pub can_flush: Option<HandleFn>,
    pub can_trim: Option<HandleFn>,
    pub can_zero: Option<HandleFn>,
    pub can_fast_zero: Option<HandleFn>,
    pub can_fua: Option<HandleFn>,
    pub can_multi_conn: Option<HandleFn>,
    pub can_cache: Option<HandleFn>,
    pub can_extents: Option<HandleFn>,
    pub is_rotational: Option<HandleFn>,
    pub export_description: Option<unsafe extern "C" fn(handle: *mut c_void) -> *const c_char>,
    pub pread: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *mut c_void,
            count: u64,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    pub pwrite: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *const c_void,
            count: u64,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    pub flush: Option<unsafe extern "C" fn(handle: *mut c_void, flags: u32) -> c_int>,
    pub trim: Option<RangeFn>,
    pub zero: Option<RangeFn>,
    pub extents: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            count: u64,
            offset: u64,
            flags: u32,
            extents: *mut Extents,
        ) -> c_int,
    >,
    pub cache: Option<RangeFn>,
    /// Since ABI 1.4: called after `get_ready`; [`NONBLOCKING`] and
    /// future capability bits.
    pub capabilities: Option<unsafe extern "C" fn() -> u64>,
    /// Since ABI 1.5: the thread model as configured, asked after
    /// `config_complete`.
    pub configured_thread_model: Option<unsafe extern "C" fn() -> c_int>,
    /// Since ABI 1.5: called once the server is serving.
    pub after_fork: Option<unsafe extern "C" fn() -> c_int>,
    /// Since ABI 1.5: more `key=value` lines for `--dump-plugin`.
    pub dump_plugin: Option<unsafe extern "C" fn()>,
    /// Since ABI 1.8: the local file the handle serves, or null.
    pub local_file: Option<unsafe extern "C" fn(handle: *mut c_void) -> *const c_char>,
    /// Since ABI 1.9: requests started now and completed later through
    /// `host->complete`.
    pub async_pread: Option<AsyncPreadFn>,
    pub async_pwrite: Option<AsyncPwriteFn>,
    pub async_flush: Option<AsyncFlushFn>,
    pub async_trim: Option<AsyncRangeFn>,
    pub async_zero: Option<AsyncRangeFn>,
    pub async_cache: Option<AsyncRangeFn>,
    pub async_extents: Option<AsyncExtentsFn>,
}

// SAFETY: a `Plugin` is an immutable table of C strings and function
// pointers that its shared object keeps alive; nothing in it is written
// after the entry point returns it, so sharing it between threads is sound.
unsafe impl Sync for Plugin {}
// SAFETY: see `Sync` above; the table refers only to 'static data.
unsafe impl Send for Plugin {}
// SAFETY: as for `Plugin`, the host table is never written once built.
unsafe impl Sync for Host {}

/// Signature of `nbdhost_plugin_entry`.
pub type PluginEntry = unsafe extern "C" fn(host: *const Host) -> *const Plugin;
/// Signature of `nbdhost_plugin_adapter_entry` (since ABI 1.5): the
/// foreign plugin's path in, its description out.
pub type PluginAdapterEntry =
    unsafe extern "C" fn(host: *const Host, path: *const c_char) -> *const Plugin;

/// Name of the symbol every filter exports.
pub const FILTER_ENTRY: &str = "nbdhost_filter_entry";
/// Since ABI 1.5: the symbol of an adapter for filters written for
/// another server.
pub const FILTER_ADAPTER_ENTRY: &str = "nbdhost_filter_adapter_entry";
/// `NBDHOST_CONFIG_TAKEN`: the filter used the key.
pub const CONFIG_TAKEN: c_int = 0;
/// `NBDHOST_CONFIG_PASS`: not the filter's key; offer it further down.
pub const CONFIG_PASS: c_int = 1;

/// A `next` callback taking only the layer, as the `can_*` family does.
pub type NextFn = unsafe extern "C" fn(next: *const Next) -> c_int;
/// A `next` callback for trim, zero and cache.
pub type NextRangeFn =
    unsafe extern "C" fn(next: *const Next, count: u64, offset: u64, flags: u32) -> c_int;

/// `struct nbdhost_next`: the layer below a filter, for one connection.
#[repr(C)]
pub struct Next {
    pub struct_size: u64,
    pub opaque: *mut c_void,
    pub get_size: Option<unsafe extern "C" fn(next: *const Next) -> i64>,
    pub block_size: Option<
        unsafe extern "C" fn(
            next: *const Next,
            minimum: *mut u32,
            preferred: *mut u32,
            maximum: *mut u32,
        ) -> c_int,
    >,
    pub can_write: Option<NextFn>,
    pub can_flush: Option<NextFn>,
    pub can_trim: Option<NextFn>,
    pub can_zero: Option<NextFn>,
    pub can_fast_zero: Option<NextFn>,
    pub can_fua: Option<NextFn>,
    pub can_multi_conn: Option<NextFn>,
    pub can_cache: Option<NextFn>,
    pub can_extents: Option<NextFn>,
    pub is_rotational: Option<NextFn>,
    pub export_description: Option<unsafe extern "C" fn(next: *const Next) -> *const c_char>,
    pub pread: Option<
        unsafe extern "C" fn(
            next: *const Next,
            buf: *mut c_void,
            count: u64,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    pub pwrite: Option<
        unsafe extern "C" fn(
            next: *const Next,
            buf: *const c_void,
            count: u64,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    pub flush: Option<unsafe extern "C" fn(next: *const Next, flags: u32) -> c_int>,
    pub trim: Option<NextRangeFn>,
    pub zero: Option<NextRangeFn>,
    pub extents: Option<
        unsafe extern "C" fn(
            next: *const Next,
            count: u64,
            offset: u64,
            flags: u32,
            extents: *mut Extents,
        ) -> c_int,
    >,
    pub cache: Option<NextRangeFn>,
    /// Since ABI 1.8: the layer below's local file, or null.
    pub local_file: Option<unsafe extern "C" fn(next: *const Next) -> *const c_char>,
    /// Since ABI 1.9: start a request on the layer below, whose result
    /// completes `req` (the filter's own, passed down, or a new one from
    /// `host->request_then`).
    pub async_pread: Option<NextAsyncPreadFn>,
    pub async_pwrite: Option<NextAsyncPwriteFn>,
    pub async_flush: Option<NextAsyncFlushFn>,
    pub async_trim: Option<NextAsyncRangeFn>,
    pub async_zero: Option<NextAsyncRangeFn>,
    pub async_cache: Option<NextAsyncRangeFn>,
    pub async_extents: Option<NextAsyncExtentsFn>,
    /// Since ABI 1.10: finalize the layer below and open it again for the
    /// same connection and export; calls through this table then go to the
    /// new handle. The old one is closed with the filter's handle.
    pub reopen: Option<unsafe extern "C" fn(next: *const Next, readonly: c_int) -> c_int>,
    /// Since ABI 1.10: run `done(data, errnum)` once on a worker thread
    /// after `nsec` nanoseconds, holding no thread meanwhile; `errnum` is
    /// `ESHUTDOWN` when shutdown cut the wait short, `ECANCELED` when the
    /// handle closed first. 0, or -1 (error recorded; `done` never runs).
    pub after: Option<
        unsafe extern "C" fn(
            next: *const Next,
            nsec: u64,
            done: ContinuationFn,
            data: *mut c_void,
        ) -> c_int,
    >,
    /// Since ABI 1.10: run `job(next, data)` once on a thread of its own,
    /// with the layer below open until it returns; the filter's close
    /// waits for it. 0, or -1 (error recorded; `job` never runs).
    pub background: Option<
        unsafe extern "C" fn(next: *const Next, job: BackgroundFn, data: *mut c_void) -> c_int,
    >,
    /// Since ABI 1.10: 1 once the handle is closing or the server shutting
    /// down (a background job should return soon), else 0.
    pub closing: Option<NextFn>,
}

/// Since ABI 1.10: a job for `next->background`.
pub type BackgroundFn = unsafe extern "C" fn(next: *const Next, data: *mut c_void);

/// Since ABI 1.9: `next->async_pread`.
pub type NextAsyncPreadFn = unsafe extern "C" fn(
    next: *const Next,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut Request,
);
/// Since ABI 1.9: `next->async_pwrite`.
pub type NextAsyncPwriteFn = unsafe extern "C" fn(
    next: *const Next,
    buf: *const c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut Request,
);
/// Since ABI 1.9: `next->async_flush`.
pub type NextAsyncFlushFn = unsafe extern "C" fn(next: *const Next, flags: u32, req: *mut Request);
/// Since ABI 1.9: `next->async_trim`, `_zero` and `_cache`.
pub type NextAsyncRangeFn =
    unsafe extern "C" fn(next: *const Next, count: u64, offset: u64, flags: u32, req: *mut Request);
/// Since ABI 1.9: `next->async_extents`.
pub type NextAsyncExtentsFn = unsafe extern "C" fn(
    next: *const Next,
    count: u64,
    offset: u64,
    flags: u32,
    extents: *mut Extents,
    req: *mut Request,
);

/// Since ABI 1.9: a filter's asynchronous read.
pub type FilterAsyncPreadFn = unsafe extern "C" fn(
    next: *const Next,
    handle: *mut c_void,
    buf: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut Request,
);
/// Since ABI 1.9: a filter's asynchronous write.
pub type FilterAsyncPwriteFn = unsafe extern "C" fn(
    next: *const Next,
    handle: *mut c_void,
    buf: *const c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut Request,
);
/// Since ABI 1.9: a filter's asynchronous flush.
pub type FilterAsyncFlushFn =
    unsafe extern "C" fn(next: *const Next, handle: *mut c_void, flags: u32, req: *mut Request);
/// Since ABI 1.9: a filter's asynchronous trim, zero or cache.
pub type FilterAsyncRangeFn = unsafe extern "C" fn(
    next: *const Next,
    handle: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    req: *mut Request,
);
/// Since ABI 1.9: a filter's asynchronous extents.
pub type FilterAsyncExtentsFn = unsafe extern "C" fn(
    next: *const Next,
    handle: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    extents: *mut Extents,
    req: *mut Request,
);

/// `struct nbdhost_next_open`: opens the layer below during a filter's open.
#[repr(C)]
pub struct NextOpen {
    pub struct_size: u64,
    pub opaque: *mut c_void,
    pub open: Option<
        unsafe extern "C" fn(
            this: *const NextOpen,
            readonly: c_int,
            export_name: *const c_char,
        ) -> c_int,
    >,
}

/// `struct nbdhost_next_exports` (since ABI 1.7): the layer below a
/// filter, before any connection has opened it.
#[repr(C)]
pub struct NextExports {
    pub struct_size: u64,
    pub opaque: *mut c_void,
    pub list_exports: Option<
        unsafe extern "C" fn(
            this: *const NextExports,
            readonly: c_int,
            is_tls: c_int,
            exports: *mut Exports,
        ) -> c_int,
    >,
    /// The string stays valid until the filter's callback returns.
    pub default_export: Option<
        unsafe extern "C" fn(
            this: *const NextExports,
            readonly: c_int,
            is_tls: c_int,
        ) -> *const c_char,
    >,
}

/// A filter callback taking the next layer and the filter's handle.
pub type FilterHandleFn = unsafe extern "C" fn(next: *const Next, handle: *mut c_void) -> c_int;
/// A filter callback for trim, zero and cache.
pub type FilterRangeFn = unsafe extern "C" fn(
    next: *const Next,
    handle: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
) -> c_int;

/// `struct nbdhost_filter`: what a filter's entry point returns.
#[repr(C)]
pub struct Filter {
    pub struct_size: u64,
    pub abi_version: u32,
    pub thread_model: u32,
    pub name: *const c_char,
    pub version: *const c_char,
    pub description: *const c_char,
    pub config_help: *const c_char,
    pub load: Option<unsafe extern "C" fn() -> c_int>,
    pub unload: Option<unsafe extern "C" fn()>,
    pub config: Option<unsafe extern "C" fn(key: *const c_char, value: *const c_char) -> c_int>,
    pub config_complete: Option<unsafe extern "C" fn() -> c_int>,
    pub get_ready: Option<unsafe extern "C" fn() -> c_int>,
    pub preconnect: Option<unsafe extern "C" fn(readonly: c_int) -> c_int>,
    pub open: Option<
        unsafe extern "C" fn(
            next: *const NextOpen,
            readonly: c_int,
            export_name: *const c_char,
        ) -> *mut c_void,
    >,
    pub close: Option<unsafe extern "C" fn(handle: *mut c_void)>,
    pub get_size: Option<unsafe extern "C" fn(next: *const Next, handle: *mut c_void) -> i64>,
    pub block_size: Option<
        unsafe extern "C" fn(
            next: *const Next,
            handle: *mut c_void,
            minimum: *mut u32,
            preferred: *mut u32,
            maximum: *mut u32,
        ) -> c_int,
    >,
    pub can_write: Option<FilterHandleFn>,
    pub can_flush: Option<FilterHandleFn>,
    pub can_trim: Option<FilterHandleFn>,
    pub can_zero: Option<FilterHandleFn>,
    pub can_fast_zero: Option<FilterHandleFn>,
    pub can_fua: Option<FilterHandleFn>,
    pub can_multi_conn: Option<FilterHandleFn>,
    pub can_cache: Option<FilterHandleFn>,
    pub can_extents: Option<FilterHandleFn>,
    pub is_rotational: Option<FilterHandleFn>,
    pub export_description:
        Option<unsafe extern "C" fn(next: *const Next, handle: *mut c_void) -> *const c_char>,
    pub pread: Option<
        unsafe extern "C" fn(
            next: *const Next,
            handle: *mut c_void,
            buf: *mut c_void,
            count: u64,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    pub pwrite: Option<
        unsafe extern "C" fn(
            next: *const Next,
            handle: *mut c_void,
            buf: *const c_void,
            count: u64,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    pub flush:
        Option<unsafe extern "C" fn(next: *const Next, handle: *mut c_void, flags: u32) -> c_int>,
    pub trim: Option<FilterRangeFn>,
    pub zero: Option<FilterRangeFn>,
    pub extents: Option<
        unsafe extern "C" fn(
            next: *const Next,
            handle: *mut c_void,
            count: u64,
            offset: u64,
            flags: u32,
            extents: *mut Extents,
        ) -> c_int,
    >,
    pub cache: Option<FilterRangeFn>,
    /// Since ABI 1.2: look at the layer below once, before serving.
    pub startup: Option<unsafe extern "C" fn(next: *const Next) -> c_int>,
    /// Since ABI 1.4: called after `get_ready`; [`NONBLOCKING`] if the
    /// filter adds no waiting of its own.
    pub capabilities: Option<unsafe extern "C" fn() -> u64>,
    /// Since ABI 1.5: as in [`Plugin`].
    pub configured_thread_model: Option<unsafe extern "C" fn() -> c_int>,
    /// Since ABI 1.5: as in [`Plugin`].
    pub after_fork: Option<unsafe extern "C" fn() -> c_int>,
    /// Since ABI 1.6: once per handle, after the layers below are open and
    /// prepared and before the handle's first request; may ask the layer
    /// below anything.
    pub prepare: Option<
        unsafe extern "C" fn(next: *const Next, handle: *mut c_void, readonly: c_int) -> c_int,
    >,
    /// Since ABI 1.7: the exports to list, given the layer below's.
    pub list_exports: Option<
        unsafe extern "C" fn(
            next: *const NextExports,
            readonly: c_int,
            is_tls: c_int,
            exports: *mut Exports,
        ) -> c_int,
    >,
    /// Since ABI 1.7: the name the empty export name stands for; the
    /// string must stay valid until the next call on the same thread.
    pub default_export: Option<
        unsafe extern "C" fn(
            next: *const NextExports,
            readonly: c_int,
            is_tls: c_int,
        ) -> *const c_char,
    >,
    /// Since ABI 1.8: once per prepared handle when its connection ends,
    /// before any layer is closed, with the layer below still open.
    pub finalize: Option<FilterHandleFn>,
    /// Since ABI 1.8: the local file the handle serves; null passes the
    /// question down.
    pub local_file:
        Option<unsafe extern "C" fn(next: *const Next, handle: *mut c_void) -> *const c_char>,
    /// Since ABI 1.9: requests started now, completed later through
    /// `host->complete`; NULL runs the synchronous callback (or passes the
    /// request down).
    pub async_pread: Option<FilterAsyncPreadFn>,
    pub async_pwrite: Option<FilterAsyncPwriteFn>,
    pub async_flush: Option<FilterAsyncFlushFn>,
    pub async_trim: Option<FilterAsyncRangeFn>,
    pub async_zero: Option<FilterAsyncRangeFn>,
    pub async_cache: Option<FilterAsyncRangeFn>,
    pub async_extents: Option<FilterAsyncExtentsFn>,
}

// SAFETY: as for `Plugin`: an immutable table of 'static strings and
// function pointers.
unsafe impl Sync for Filter {}
// SAFETY: as above.
unsafe impl Send for Filter {}

/// Signature of `nbdhost_filter_entry`.
pub type FilterEntry = unsafe extern "C" fn(host: *const Host) -> *const Filter;
/// Signature of `nbdhost_filter_adapter_entry` (since ABI 1.5).
pub type FilterAdapterEntry =
    unsafe extern "C" fn(host: *const Host, path: *const c_char) -> *const Filter;
