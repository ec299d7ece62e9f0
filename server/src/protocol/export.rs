//! The facts of an export that the protocol carries: what negotiation
//! announces and request validation checks against, the export list, and
//! allocation extents. Plain data; the layer chain fills it in.

use super::wire::*;

/// Largest payload in one request or reply: the maximum block size we
/// advertise and the largest read we answer in one piece.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// What the server allows on top of the plugin's own answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportPolicy {
    /// `-r`: serve read-only whatever the plugin can do.
    pub readonly: bool,
    /// `--no-mc`: never advertise multi-conn.
    pub no_multi_conn: bool,
}

/// One export as listed to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub description: Option<String>,
}

/// One extent of the `base:allocation` context, with absolute offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// `HOLE` and `ZERO` bits as in the protocol.
    pub flags: u32,
}

/// Capabilities and geometry of an opened export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    pub readonly: bool,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_fast_zero: bool,
    pub can_multi_conn: bool,
    pub can_cache: bool,
    pub can_extents: bool,
    pub rotational: bool,
}

impl ExportInfo {
    /// Transmission flags for this export; `DF` only with structured or
    /// extended replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TF_HAS_FLAGS;
        let mut set = |cond: bool, bit: u16| {
            if cond {
                f |= bit;
            }
        };
        set(self.readonly, TF_READ_ONLY);
        set(self.can_flush, TF_SEND_FLUSH);
        set(self.can_fua, TF_SEND_FUA);
        set(self.rotational, TF_ROTATIONAL);
        set(self.can_trim, TF_SEND_TRIM);
        set(self.can_zero, TF_SEND_WRITE_ZEROES);
        set(structured, TF_SEND_DF);
        set(self.can_multi_conn, TF_CAN_MULTI_CONN);
        set(self.can_cache, TF_SEND_CACHE);
        set(self.can_fast_zero, TF_SEND_FAST_ZERO);
        f
    }
}

#[cfg(test)]
pub(crate) fn test_export(size: u64) -> ExportInfo {
    ExportInfo {
        name: String::new(),
        description: None,
        size,
        min_block: 1,
        preferred_block: 4096,
        max_block: MAX_PAYLOAD,
        readonly: false,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_zero: true,
        can_fast_zero: true,
        can_multi_conn: true,
        can_cache: true,
        can_extents: true,
        rotational: false,
    }
}
