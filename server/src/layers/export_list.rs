//! The export list handed across the ABI to `list_exports` callbacks,
//! which keeps its names as C strings so that a filter reading it back
//! (`exports_get`) borrows them without a copy.

use std::ffi::{CStr, CString};

use nbdhost_plugin_api::abi;

use crate::protocol::export::ExportEntry;

/// Exports as a layer added them, in order.
#[derive(Default)]
pub struct ExportCollector {
    exports: Vec<(CString, Option<CString>)>,
}

impl ExportCollector {
    /// The list as the `struct nbdhost_exports *` a callback is given.
    pub fn as_abi(&mut self) -> *mut abi::Exports {
        (self as *mut ExportCollector).cast()
    }

    /// Append one export.
    pub fn add(&mut self, name: &CStr, description: Option<&CStr>) {
        self.exports
            .push((name.to_owned(), description.map(CStr::to_owned)));
    }

    /// How many exports the list holds.
    pub fn len(&self) -> usize {
        self.exports.len()
    }

    /// The `i`th export's name and description.
    pub fn get(&self, i: usize) -> Option<(&CStr, Option<&CStr>)> {
        self.exports
            .get(i)
            .map(|(n, d)| (n.as_c_str(), d.as_deref()))
    }

    /// The list for the protocol.
    pub fn into_entries(self) -> Vec<ExportEntry> {
        self.exports
            .into_iter()
            .map(|(name, description)| ExportEntry {
                name: name.to_string_lossy().into_owned(),
                description: description.map(|d| d.to_string_lossy().into_owned()),
            })
            .collect()
    }
}
