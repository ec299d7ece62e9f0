//! nbdkit's plugin ABI as its `nbdkit-plugin.h` defines it (unchanged from
//! nbdkit 1.16 to 1.46): `struct nbdkit_plugin` with both API versions'
//! names for the slots whose meaning changed, and the constants that
//! cross it. The tests below hold these offsets to the installed header
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

#[cfg(test)]
mod tests {
    //! [`Plugin`] against the installed `nbdkit-plugin.h`: a C program
    //! prints the size of `struct nbdkit_plugin`, every field's offset and
    //! the constants, under both API versions, and they must equal ours.

    use super::*;
    use std::mem::{offset_of, size_of};
    use std::path::Path;
    use std::process::Command;

    const HEADER: &str = "/usr/include/nbdkit-plugin.h";

    /// Fields whose names are the same in both API versions.
    fn common_fields() -> Vec<(&'static str, usize)> {
        macro_rules! f {
            ($($c:ident => $r:ident),* $(,)?) => {
                vec![$((stringify!($c), offset_of!(Plugin, $r))),*]
            };
        }
        f!(
            _struct_size => struct_size, _api_version => api_version,
            _thread_model => thread_model, name => name, longname => longname,
            version => version, description => description, load => load,
            unload => unload, config => config, config_complete => config_complete,
            config_help => config_help, open => open, close => close,
            get_size => get_size, can_write => can_write, can_flush => can_flush,
            is_rotational => is_rotational, can_trim => can_trim,
            errno_is_preserved => errno_is_preserved, dump_plugin => dump_plugin,
            can_zero => can_zero, can_fua => can_fua,
            magic_config_key => magic_config_key, can_multi_conn => can_multi_conn,
            can_extents => can_extents, extents => extents, can_cache => can_cache,
            cache => cache, thread_model => thread_model_cb,
            can_fast_zero => can_fast_zero, preconnect => preconnect,
            get_ready => get_ready, after_fork => after_fork,
            list_exports => list_exports, default_export => default_export,
            export_description => export_description, cleanup => cleanup,
            block_size => block_size,
        )
    }

    /// The data callbacks, by the names API `api` gives them.
    fn data_fields(api: u32) -> Vec<(&'static str, usize)> {
        let v1 = [
            offset_of!(Plugin, pread_v1),
            offset_of!(Plugin, pwrite_v1),
            offset_of!(Plugin, flush_v1),
            offset_of!(Plugin, trim_v1),
            offset_of!(Plugin, zero_v1),
        ];
        let v2 = [
            offset_of!(Plugin, pread),
            offset_of!(Plugin, pwrite),
            offset_of!(Plugin, flush),
            offset_of!(Plugin, trim),
            offset_of!(Plugin, zero),
        ];
        let (names, offsets) = if api == 1 {
            (["pread", "pwrite", "flush", "trim", "zero"], v1)
        } else {
            (
                [
                    "_pread_v1",
                    "_pwrite_v1",
                    "_flush_v1",
                    "_trim_v1",
                    "_zero_v1",
                ],
                v1,
            )
        };
        let mut out: Vec<_> = names.into_iter().zip(offsets).collect();
        if api == 2 {
            out.extend(
                ["pread", "pwrite", "flush", "trim", "zero"]
                    .into_iter()
                    .zip(v2),
            );
        }
        out
    }

    /// Compile and run a program printing `name value` lines.
    fn c_values(api: u32, exprs: &[(String, String)]) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!("nbdkit-layout-{}-{api}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut src = format!(
            "#define NBDKIT_API_VERSION {api}\n#include <stddef.h>\n#include <stdio.h>\n\
             #include <nbdkit-plugin.h>\nint main (void) {{\n"
        );
        for (name, expr) in exprs {
            src.push_str(&format!(
                "  printf (\"{name} %llu\\n\", (unsigned long long) ({expr}));\n"
            ));
        }
        src.push_str("  return 0;\n}\n");
        std::fs::write(dir.join("layout.c"), src).unwrap();
        let exe = dir.join("layout");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let out = Command::new(cc)
            .arg("-o")
            .arg(&exe)
            .arg(dir.join("layout.c"))
            .output()
            .expect("a C compiler");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run = Command::new(&exe).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        String::from_utf8(run.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_plugin_struct_matches_nbdkit_plugin_h_in_both_api_versions() {
        if !Path::new(HEADER).exists() {
            eprintln!("skipped: {HEADER} is absent (Debian's nbdkit-plugin-dev has it)");
            return;
        }
        for api in [1, 2] {
            let mut fields = common_fields();
            fields.extend(data_fields(api));
            let mut exprs = vec![(
                "sizeof".to_string(),
                "sizeof (struct nbdkit_plugin)".to_string(),
            )];
            let mut want = vec![format!("sizeof {}", size_of::<Plugin>())];
            for (name, off) in &fields {
                exprs.push((
                    name.to_string(),
                    format!("offsetof (struct nbdkit_plugin, {name})"),
                ));
                want.push(format!("{name} {off}"));
            }
            // Those the adapter passes through unchanged as nbdhost's.
            use nbdhost_plugin_api::abi;
            for (name, value) in [
                (
                    "NBDKIT_THREAD_MODEL_SERIALIZE_CONNECTIONS",
                    u64::from(abi::THREAD_MODEL_SERIALIZE_CONNECTIONS),
                ),
                (
                    "NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS",
                    u64::from(abi::THREAD_MODEL_SERIALIZE_ALL_REQUESTS),
                ),
                (
                    "NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS",
                    u64::from(abi::THREAD_MODEL_SERIALIZE_REQUESTS),
                ),
                (
                    "NBDKIT_THREAD_MODEL_PARALLEL",
                    u64::from(abi::THREAD_MODEL_PARALLEL),
                ),
                ("NBDKIT_FLAG_FUA", u64::from(abi::FLAG_FUA)),
                ("NBDKIT_FLAG_REQ_ONE", u64::from(abi::FLAG_REQ_ONE)),
                ("NBDKIT_CACHE_NONE", abi::SUPPORT_NONE as u64),
                ("NBDKIT_CACHE_EMULATE", abi::SUPPORT_EMULATE as u64),
                ("NBDKIT_CACHE_NATIVE", abi::SUPPORT_NATIVE as u64),
                ("NBDKIT_EXTENT_HOLE", u64::from(abi::EXTENT_HOLE)),
                ("NBDKIT_EXTENT_ZERO", u64::from(abi::EXTENT_ZERO)),
                ("NBDKIT_FUA_NATIVE", FUA_NATIVE as u64),
                ("NBDKIT_FUA_EMULATE", FUA_EMULATE as u64),
                ("NBDKIT_FLAG_MAY_TRIM", u64::from(FLAG_MAY_TRIM)),
                ("NBDKIT_FLAG_FAST_ZERO", u64::from(FLAG_FAST_ZERO)),
            ] {
                exprs.push((name.to_string(), name.to_string()));
                want.push(format!("{name} {value}"));
            }
            assert_eq!(c_values(api, &exprs), want, "API {api}");
        }
    }
}
