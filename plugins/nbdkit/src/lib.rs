//! The nbdkit adapter: serves an unmodified nbdkit plugin as an nbdhost
//! plugin, so filters, TLS and every transport apply to it unchanged.
//!
//! The server loads this library when it meets an nbdkit plugin (one that
//! exports `plugin_init`, or one found by short name in nbdkit's plugin
//! directory) and calls [`nbdhost_plugin_adapter_entry`] with its path.
//! nbdkit plugins call `nbdkit_*` functions that they expect the process
//! that loads them to provide; this library defines all of them on top of
//! the server's host services, and makes its symbols global before it
//! loads the plugin so that the plugin's references resolve to them.
//!
//! See nbdhost-nbdkit-plugin(1) for what is supported.

mod calls;
mod error;
mod host;
mod lists;
mod nbdkit;
mod parse;
mod plugin;
mod services;
mod variadic;

use std::ffi::{c_char, CStr};

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use nbdhost_plugin_api::abi;

use error::LoadError;

/// Make this library's symbols (the `nbdkit_*` functions) visible to
/// objects loaded after it: the server loaded it privately.
fn publish_own_symbols() -> Result<(), LoadError> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    let here = nbdhost_plugin_adapter_entry as *const libc::c_void;
    // SAFETY: dladdr fills `info` for an address inside a loaded object.
    if unsafe { libc::dladdr(here, info.as_mut_ptr()) } == 0 {
        return Err(LoadError::NoOwnFile);
    }
    // SAFETY: filled by the successful dladdr above.
    let fname = unsafe { info.assume_init() }.dli_fname;
    // SAFETY: dladdr's file name is a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(fname) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: reopening an object that is already loaded runs nothing; it
    // only widens the scope of its symbols.
    let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL | libc::RTLD_NOLOAD) }
        .map_err(LoadError::Publish)?;
    // Kept open for good: loaded plugins refer to these symbols.
    std::mem::forget(lib);
    Ok(())
}

/// Load the nbdkit plugin at `path` and describe it to the server.
fn adapt(path: &str) -> Result<&'static abi::Plugin, LoadError> {
    publish_own_symbols()?;
    // As nbdkit loads plugins: language plugins (python) load modules of
    // their own that need the plugin's libraries in the global scope.
    // SAFETY: loading the plugin the user named runs its initialisers.
    let lib =
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(LoadError::Load)?;
    // SAFETY: `plugin_init`'s type is fixed by nbdkit's ABI.
    let init = unsafe { lib.get::<nbdkit::PluginInit>(b"plugin_init") }.map_err(|_| {
        LoadError::NoPluginInit {
            path: path.to_owned(),
        }
    })?;
    // SAFETY: nbdkit's entry point takes nothing.
    let raw = unsafe { init() };
    if raw.is_null() {
        return Err(LoadError::InitReturnedNull {
            path: path.to_owned(),
        });
    }
    // SAFETY: the first field of every nbdkit plugin struct is its size.
    let size = unsafe { (*raw).struct_size } as usize;
    if size < nbdkit::MIN_STRUCT_SIZE {
        return Err(LoadError::StructTooSmall {
            path: path.to_owned(),
            size,
        });
    }
    // SAFETY: checked that the struct reaches the fields `read` needs.
    let p = unsafe { nbdkit::Plugin::read(raw) };
    if !(1..=2).contains(&p.api_version) {
        return Err(LoadError::ApiVersion {
            path: path.to_owned(),
            version: p.api_version,
        });
    }
    plugin::install(p, lib)
}

/// The adapter's entry point: see `nbdhost_plugin_adapter_entry_fn` in
/// `nbdhost-plugin.h`.
///
/// # Safety
/// Called by the server with its host table and a path.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdhost_plugin_adapter_entry(
    h: *const abi::Host,
    path: *const c_char,
) -> *const abi::Plugin {
    // SAFETY: the server's table, valid for the process.
    if let Err(e) = unsafe { host::set(h) } {
        return fail_entry(&e);
    }
    let Some(path) = host::string(path) else {
        return fail_entry(&LoadError::NoPath);
    };
    match std::panic::catch_unwind(|| adapt(&path)) {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => fail_entry(&e),
        Err(_) => fail_entry(&LoadError::Panicked),
    }
}

/// Tell the server why there is no plugin: `EINVAL`, with the message.
fn fail_entry(e: &LoadError) -> *const abi::Plugin {
    host::error(libc::EINVAL, Some(&host::c(&e.to_string())));
    std::ptr::null()
}
