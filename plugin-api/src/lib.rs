//! The nbdhost plugin ABI and the Rust SDK for writing plugins.
//!
//! A plugin is a `cdylib` that implements [`Plugin`] (global state and
//! configuration) and [`Handle`] (one per client connection), then names
//! its type with [`nbdhost_plugin!`]. Each `impl` block carries
//! [`#[callbacks]`](macro@callbacks), which records the methods it defines:
//!
//! ```
//! use nbdhost_plugin_api::{callbacks, errno, nbdhost_plugin, Error, Handle, Plugin, Result};
//!
//! #[derive(Default)]
//! struct Zero;
//! struct ZeroHandle;
//!
//! #[callbacks]
//! impl Plugin for Zero {
//!     const NAME: &'static str = "zero";
//!     const DESCRIPTION: &'static str = "an empty 1 MiB disk";
//!     type Handle = ZeroHandle;
//!     fn open(&self, _readonly: bool) -> Result<ZeroHandle> { Ok(ZeroHandle) }
//! }
//! #[callbacks]
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
//! The SDK registers with the server only the callbacks a block defines:
//! the others stay NULL in the C struct, so the server's defaults apply
//! (each trait method's documentation says what its default is) and a
//! request a layer does not handle never crosses the ABI. It catches
//! panics at the boundary (they become `EIO` and a logged message) and reaches the
//! server only through the host-service table, so a plugin links against
//! nothing but this crate. [`abi`] holds the raw definitions, which match
//! `include/nbdhost-plugin.h`.

/// In a layer's C table: `Some(callback::<L>)` when the impl block of
/// `$by` defines `$method` (by default the callback's own name), else
/// `None`, so the server's default applies.
macro_rules! defined {
    ($layer:ident, $by:ty, $name:ident) => {
        defined!($layer, $by, $name, $name)
    };
    ($layer:ident, $by:ty, $method:ident, $callback:ident) => {
        <$by>::CALLBACKS
            .has(stringify!($method))
            .then_some($callback::<$layer> as _)
    };
}

pub mod abi;
mod boundary;
mod callbacks;
mod data;
mod error;
mod filter;
mod filter_async;
pub mod host;
mod instance;
mod next_services;
mod plugin;
mod requests;

pub use callbacks::Callbacks;
pub use error::{Error, Result};
/// Put on every `impl` block of [`Plugin`], [`Handle`], [`Filter`] and
/// [`FilterHandle`]: it defines the block's `CALLBACKS` constant, the
/// names of the methods the block defines, which decides the callbacks
/// the SDK registers. Without it the compiler reports the constant
/// missing. The generated code names this crate `nbdhost_plugin_api`, so
/// depend on it under that name.
pub use nbdhost_plugin_api_macros::callbacks;

/// The errno values an [`Error`] carries to the client (the server maps
/// each to the nearest NBD error), so that a plugin needs no `libc` of its
/// own.
pub mod errno {
    pub use libc::{
        EACCES, EDQUOT, EFBIG, EINVAL, EIO, ENOENT, ENOMEM, ENOSPC, ENOTSUP, EOPNOTSUPP, EOVERFLOW,
        EPERM, EROFS, ESHUTDOWN,
    };
}
pub use data::{BlockSize, ExportList, ExtentList, Flags, Support};
pub use filter::{Filter, FilterHandle, Next, NextExports, NextOpener, SharedNext};
pub use host::Export;
pub use next_services::{InFlight, Parked};
pub use plugin::{Handle, Plugin, ThreadModel};
pub use requests::{Completion, ExtentsRequest, RangeRequest, ReadRequest, WriteRequest};

#[doc(hidden)]
pub mod __private {
    pub use crate::filter::entry as filter_entry;
    pub use crate::plugin::{entry, Strings};

    /// `s` as a NUL-terminated C string of `N` bytes (its length plus
    /// one), at compile time, so the layer's names need no allocation.
    /// C stops at a NUL inside, as it would.
    pub const fn c_array<const N: usize>(s: &str) -> [u8; N] {
        let b = s.as_bytes();
        let mut out = [0u8; N];
        let mut i = 0;
        while i < b.len() && i + 1 < N {
            out[i] = b[i];
            i += 1;
        }
        out
    }

    /// The layer's `&str` consts as C strings in statics of its own
    /// shared object; `$layer` names the trait the consts belong to.
    #[macro_export]
    #[doc(hidden)]
    macro_rules! __nbdhost_strings {
        ($ty:ty, $layer:path) => {{
            const NAME: &str = <$ty as $layer>::NAME;
            const DESCRIPTION: &str = <$ty as $layer>::DESCRIPTION;
            const HELP: &str = <$ty as $layer>::CONFIG_HELP;
            static NAME_C: [u8; NAME.len() + 1] = $crate::__private::c_array(NAME);
            static DESCRIPTION_C: [u8; DESCRIPTION.len() + 1] =
                $crate::__private::c_array(DESCRIPTION);
            static HELP_C: [u8; HELP.len() + 1] = $crate::__private::c_array(HELP);
            static VERSION_C: [u8; env!("CARGO_PKG_VERSION").len() + 1] =
                $crate::__private::c_array(env!("CARGO_PKG_VERSION"));
            $crate::__private::Strings {
                name: NAME_C.as_ptr().cast(),
                version: VERSION_C.as_ptr().cast(),
                description: DESCRIPTION_C.as_ptr().cast(),
                config_help: HELP_C.as_ptr().cast(),
            }
        }};
    }
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
            const MAGIC: Option<&str> = <$plugin as $crate::Plugin>::MAGIC_CONFIG_KEY;
            const MAGIC_LEN: usize = match MAGIC {
                Some(m) => m.len(),
                None => 0,
            };
            static MAGIC_C: [u8; MAGIC_LEN + 1] = $crate::__private::c_array(match MAGIC {
                Some(m) => m,
                None => "",
            });
            let strings = $crate::__nbdhost_strings!($plugin, $crate::Plugin);
            let magic = if MAGIC.is_some() {
                MAGIC_C.as_ptr().cast()
            } else {
                ::std::ptr::null()
            };
            // SAFETY: the caller passes a table that lives as long as the
            // plugin, and the strings are statics of this object, which is
            // what `entry` requires.
            unsafe { $crate::__private::entry::<$plugin>(host, strings, magic) }
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
            let strings = $crate::__nbdhost_strings!($filter, $crate::Filter);
            // SAFETY: the caller passes a table that lives as long as the
            // filter, and the strings are statics of this object, which is
            // what `filter_entry` requires.
            unsafe { $crate::__private::filter_entry::<$filter>(host, strings) }
        }
    };
}
