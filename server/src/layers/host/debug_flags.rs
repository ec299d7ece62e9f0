//! The `-D layer.flag=N` settings, as each layer asks for its own with
//! `host->debug_flag` and `host->debug_flag_name`.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::sync::OnceLock;

use super::call;

/// One `-D layer.flag=N` setting.
struct DebugFlag {
    layer: String,
    /// C, because layers get a pointer to the name.
    flag: CString,
    value: i32,
}

/// Set once at start-up, before any layer is loaded; read without a lock
/// from then on.
static DEBUG_FLAGS: OnceLock<Vec<DebugFlag>> = OnceLock::new();

/// Set the `-D layer.flag=N` values; called once at start-up.
pub fn set_debug_flags(flags: BTreeMap<String, i32>) {
    let flags = flags
        .into_iter()
        .filter_map(|(k, value)| {
            let (layer, flag) = k.split_once('.')?;
            Some(DebugFlag {
                layer: layer.to_owned(),
                flag: CString::new(flag).ok()?,
                value,
            })
        })
        .collect();
    let _ = DEBUG_FLAGS.set(flags);
}

/// Warn about each `-D` flag that names none of the `loaded` layers, as
/// nbdkit warns about a flag nothing used: a misspelt layer name would
/// otherwise be ignored without a word.
pub fn warn_unused(loaded: &[&str]) {
    for f in DEBUG_FLAGS.get().into_iter().flatten() {
        if !loaded.contains(&f.layer.as_str()) {
            log::warn!(
                "debug flag -D {}.{} was not used: no layer is called {}",
                f.layer,
                f.flag.to_string_lossy(),
                f.layer
            );
        }
    }
}

/// The debug flags set for the layer being called, in name order.
fn layer_debug_flags() -> impl Iterator<Item = &'static DebugFlag> {
    let layer = call::layer();
    DEBUG_FLAGS
        .get()
        .into_iter()
        .flatten()
        .filter(move |f| f.layer == layer)
}

/// The value the layer being called has for its flag `name`, 0 if unset.
pub(super) fn value(name: &str) -> i32 {
    layer_debug_flags()
        .find(|f| f.flag.to_bytes() == name.as_bytes())
        .map_or(0, |f| f.value)
}

/// The name of the `i`th flag set for the layer being called, in name
/// order; `None` past the last.
pub(super) fn name(i: usize) -> Option<&'static CStr> {
    layer_debug_flags().nth(i).map(|f| f.flag.as_c_str())
}
