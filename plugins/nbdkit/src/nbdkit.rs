//! nbdkit's plugin ABI as its `nbdkit-plugin.h` defines it (unchanged from
//! nbdkit 1.16 to 1.46): `struct nbdkit_plugin` with both API versions'
//! names for the slots whose meaning changed, and the constants that
//! cross it. `tests/layout.rs` holds these offsets to the installed header
//! where nbdkit's development files are present.

use std::ffi::{c_char, c_int, c_void};

/// Opaque: what nbdkit calls `struct nbdkit_extents`. The adapter's own
/// type stands behind the pointer (see `lists.rs`).
pub type Extents = c_void;
/// Opaque: `struct nbdkit_exports`.
pub type Exports = c_void;

/// A callback taking only a handle: `can_write` and its kin.
pub type HandleFn = unsafe extern "C" fn(handle: *mut c_void) -> c_int;

/// `struct nbdkit_plugin`. Fields past a plugin's `_struct_size` are read
/// as absent: the adapter copies only that many bytes into a zeroed value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Plugin {
    pub struct_size: u64,
    pub api_version: c_int,
    pub thread_model: c_int,

    pub name: *const c_char,
    pub longname: *const c_char,
    pub version: *const c_char,
    pub description: *const c_char,

    pub load: Option<unsafe extern "C" fn()>,
    pub unload: Option<unsafe extern "C" fn()>,

    pub config: Option<unsafe extern "C" fn(key: *const c_char, value: *const c_char) -> c_int>,
    pub config_complete: Option<unsafe extern "C" fn() -> c_int>,
    pub config_help: *const c_char,

    pub open: Option<unsafe extern "C" fn(readonly: c_int) -> *mut c_void>,
    pub close: Option<unsafe extern "C" fn(handle: *mut c_void)>,

    pub get_size: Option<unsafe extern "C" fn(handle: *mut c_void) -> i64>,

    pub can_write: Option<HandleFn>,
    pub can_flush: Option<HandleFn>,
    pub is_rotational: Option<HandleFn>,
    pub can_trim: Option<HandleFn>,

    /// API 1's data callbacks, without flags; unused by API 2.
    pub pread_v1: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *mut c_void,
            count: u32,
            offset: u64,
        ) -> c_int,
    >,
    pub pwrite_v1: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *const c_void,
            count: u32,
            offset: u64,
        ) -> c_int,
    >,
    pub flush_v1: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    pub trim_v1:
        Option<unsafe extern "C" fn(handle: *mut c_void, count: u32, offset: u64) -> c_int>,
    pub zero_v1: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            count: u32,
            offset: u64,
            may_trim: c_int,
        ) -> c_int,
    >,

    pub errno_is_preserved: c_int,

    pub dump_plugin: Option<unsafe extern "C" fn()>,

    pub can_zero: Option<HandleFn>,
    pub can_fua: Option<HandleFn>,

    /// API 2's data callbacks, with flags; unused (and zero) in API 1.
    pub pread: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *mut c_void,
            count: u32,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    pub pwrite: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *const c_void,
            count: u32,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    pub flush: Option<unsafe extern "C" fn(handle: *mut c_void, flags: u32) -> c_int>,
    pub trim: Option<RangeFn>,
    pub zero: Option<RangeFn>,

    pub magic_config_key: *const c_char,

    pub can_multi_conn: Option<HandleFn>,

    pub can_extents: Option<HandleFn>,
    pub extents: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            count: u32,
            offset: u64,
            flags: u32,
            extents: *mut Extents,
        ) -> c_int,
    >,
    pub can_cache: Option<HandleFn>,
    pub cache: Option<RangeFn>,

    /// `thread_model` in C: the model as configured.
    pub thread_model_cb: Option<unsafe extern "C" fn() -> c_int>,

    pub can_fast_zero: Option<HandleFn>,

    pub preconnect: Option<unsafe extern "C" fn(readonly: c_int) -> c_int>,

    pub get_ready: Option<unsafe extern "C" fn() -> c_int>,
    pub after_fork: Option<unsafe extern "C" fn() -> c_int>,

    pub list_exports: Option<
        unsafe extern "C" fn(readonly: c_int, is_tls: c_int, exports: *mut Exports) -> c_int,
    >,
    pub default_export:
        Option<unsafe extern "C" fn(readonly: c_int, is_tls: c_int) -> *const c_char>,
    pub export_description: Option<unsafe extern "C" fn(handle: *mut c_void) -> *const c_char>,

    pub cleanup: Option<unsafe extern "C" fn()>,

    pub block_size: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            minimum: *mut u32,
            preferred: *mut u32,
            maximum: *mut u32,
        ) -> c_int,
    >,
}

/// API 2's trim, zero and cache.
pub type RangeFn =
    unsafe extern "C" fn(handle: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int;

/// `plugin_init`, the symbol every nbdkit plugin exports.
pub type PluginInit = unsafe extern "C" fn() -> *const Plugin;

/// The smallest struct accepted: through the API 1 `pread`, which every
/// plugin has had since the first release.
pub const MIN_STRUCT_SIZE: usize =
    std::mem::offset_of!(Plugin, pread_v1) + std::mem::size_of::<usize>();

/// `NBDKIT_FUA_NATIVE`; `NBDKIT_FUA_EMULATE` is 1.
pub const FUA_NATIVE: c_int = 2;
/// `NBDKIT_FUA_EMULATE`.
pub const FUA_EMULATE: c_int = 1;
/// `NBDKIT_FLAG_MAY_TRIM`.
pub const FLAG_MAY_TRIM: u32 = 1 << 0;
/// `NBDKIT_FLAG_FAST_ZERO`.
pub const FLAG_FAST_ZERO: u32 = 1 << 3;

impl Plugin {
    /// A plugin's struct as its `plugin_init` returned it, with every
    /// field past its `_struct_size` absent.
    ///
    /// # Safety
    /// `p` must point to a `struct nbdkit_plugin` of at least
    /// [`MIN_STRUCT_SIZE`] bytes whose `_struct_size` is its true size.
    pub unsafe fn read(p: *const Plugin) -> Plugin {
        // SAFETY: the caller promises `struct_size` readable bytes; every
        // field of `Plugin` is valid when zero (null pointers, `None`).
        unsafe {
            let size = ((*p).struct_size as usize).min(std::mem::size_of::<Plugin>());
            let mut out = std::mem::MaybeUninit::<Plugin>::zeroed();
            std::ptr::copy_nonoverlapping(p.cast::<u8>(), out.as_mut_ptr().cast::<u8>(), size);
            out.assume_init()
        }
    }
}
