//! The values callbacks take and give: request flags, what a layer
//! supports, block-size constraints, and the extent and export lists it
//! fills.

use crate::abi;
use crate::host;
use crate::Result;

bitflags::bitflags! {
    /// Flags passed with data requests.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Flags: u32 {
        /// zero: the range may be deallocated rather than written.
        const MAY_TRIM = abi::FLAG_MAY_TRIM;
        /// write, trim, zero: persist before returning.
        const FUA = abi::FLAG_FUA;
        /// extents: one extent is enough.
        const REQ_ONE = abi::FLAG_REQ_ONE;
        /// zero: fail with `ENOTSUP` unless faster than writing zeroes.
        const FAST_ZERO = abi::FLAG_FAST_ZERO;
    }
}

/// Answer of `can_fua` and `can_cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Support {
    /// Not supported: not advertised to clients.
    None = abi::SUPPORT_NONE,
    /// Advertised; the server emulates it (flush after write, read to cache).
    Emulate = abi::SUPPORT_EMULATE,
    /// Advertised and handled by the plugin itself.
    Native = abi::SUPPORT_NATIVE,
}

/// Block-size constraints of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest request alignment (a power of two, 1 to 64 KiB).
    pub minimum: u32,
    /// Preferred request size (a power of two, at least `minimum`).
    pub preferred: u32,
    /// Largest request the plugin accepts.
    pub maximum: u32,
}

/// The extent list an `extents` call fills.
pub struct ExtentList {
    raw: *mut abi::Extents,
}

impl ExtentList {
    pub(crate) fn from_raw(raw: *mut abi::Extents) -> Self {
        ExtentList { raw }
    }

    pub(crate) fn raw(&mut self) -> *mut abi::Extents {
        self.raw
    }

    /// Append an extent. Extents must be contiguous and in order; `typ` is a
    /// combination of [`abi::EXTENT_HOLE`] and [`abi::EXTENT_ZERO`].
    pub fn add(&mut self, offset: u64, length: u64, typ: u32) -> Result<()> {
        host::add_extent(self.raw, offset, length, typ)
    }
}

/// The export list a `list_exports` call fills.
pub struct ExportList {
    raw: *mut abi::Exports,
}

impl ExportList {
    pub(crate) fn from_raw(raw: *mut abi::Exports) -> Self {
        ExportList { raw }
    }

    pub(crate) fn raw(&mut self) -> *mut abi::Exports {
        self.raw
    }

    /// Append an export with an optional description.
    pub fn add(&mut self, name: &str, description: Option<&str>) -> Result<()> {
        host::add_export(self.raw, name, description)
    }
}
