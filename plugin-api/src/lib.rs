//! The nbdhost plugin ABI and the Rust SDK for writing plugins.
//!
//! A plugin is a `cdylib` that implements [`Plugin`] (global state and
//! configuration) and [`Handle`] (one per client connection), then names
//! its type with [`nbdhost_plugin!`]:
//!
//! ```
//! use nbdhost_plugin_api::{errno, nbdhost_plugin, Error, Handle, Plugin, Result};
//!
//! #[derive(Default)]
//! struct Zero;
//! struct ZeroHandle;
//!
//! impl Plugin for Zero {
//!     const NAME: &'static str = "zero";
//!     const DESCRIPTION: &'static str = "an empty 1 MiB disk";
//!     type Handle = ZeroHandle;
//!     fn open(&self, _readonly: bool) -> Result<ZeroHandle> { Ok(ZeroHandle) }
//! }
//! impl Handle for ZeroHandle {
//!     fn get_size(&self) -> Result<u64> { Ok(1 << 20) }
//!     fn pread(&self, buf: &mut [u8], offset: u64, _flags: nbdhost_plugin_api::Flags) -> Result<()> {
//!         if offset == 4096 {
//!             return Err(Error::new(errno::EIO, "a bad sector, for the demonstration"));
//!         }
//!         buf.fill(0);
//!         Ok(())
//!     }
//! }
//! nbdhost_plugin!(Zero);
//! ```
//!
//! The SDK fills every callback of the C struct, catches panics at the
//! boundary (they become `EIO` and a logged message) and reaches the
//! server only through the host-service table, so a plugin links against
//! nothing but this crate. [`abi`] holds the raw definitions, which match
//! `include/nbdhost-plugin.h`.

pub mod abi;
mod error;
mod filter;
pub mod host;
mod instance;
mod plugin;

pub use error::{Error, Result};

/// The errno values an [`Error`] carries to the client (the server maps
/// each to the nearest NBD error), so that a plugin needs no `libc` of its
/// own.
pub mod errno {
    pub use libc::{
        EACCES, EDQUOT, EFBIG, EINVAL, EIO, ENOENT, ENOMEM, ENOSPC, ENOTSUP, EOPNOTSUPP, EOVERFLOW,
        EPERM, EROFS, ESHUTDOWN,
    };
}
pub use filter::{Filter, FilterHandle, Next, NextOpener};
pub use plugin::{BlockSize, ExportList, ExtentList, Flags, Handle, Plugin, Support, ThreadModel};

#[doc(hidden)]
pub mod __private {
    pub use crate::filter::entry as filter_entry;
    pub use crate::plugin::entry;
}

/// Export a type implementing [`Plugin`] as this shared object's plugin.
///
/// Use it exactly once per `cdylib`. The version string reported to the
/// server is the plugin crate's own `CARGO_PKG_VERSION`.
#[macro_export]
macro_rules! nbdhost_plugin {
    ($plugin:ty) => {
        /// Entry point the nbdhost server looks up when it loads this plugin.
        ///
        /// # Safety
        /// `host` must point to a host-service table that outlives the plugin.
        #[no_mangle]
        pub unsafe extern "C" fn nbdhost_plugin_entry(
            host: *const $crate::abi::Host,
        ) -> *const $crate::abi::Plugin {
            const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
            // SAFETY: the caller passes a table that lives as long as the
            // plugin, which is what `entry` requires.
            unsafe { $crate::__private::entry::<$plugin>(host, VERSION) }
        }
    };
}

/// Export a type implementing [`Filter`] as this shared object's filter.
///
/// Use it exactly once per `cdylib`.
#[macro_export]
macro_rules! nbdhost_filter {
    ($filter:ty) => {
        /// Entry point the nbdhost server looks up when it loads this filter.
        ///
        /// # Safety
        /// `host` must point to a host-service table that outlives the filter.
        #[no_mangle]
        pub unsafe extern "C" fn nbdhost_filter_entry(
            host: *const $crate::abi::Host,
        ) -> *const $crate::abi::Filter {
            const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
            // SAFETY: the caller passes a table that lives as long as the
            // filter, which is what `filter_entry` requires.
            unsafe { $crate::__private::filter_entry::<$filter>(host, VERSION) }
        }
    };
}
