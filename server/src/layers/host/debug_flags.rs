//! The `-D layer.flag=N` settings, as each layer asks for its own with
//! `host->debug_flag` and `host->debug_flag_name`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString};
use std::sync::{Mutex, OnceLock};

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

/// The names of the layers loaded so far, for [`warn_unused`].
static LOADED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Layers called `names` are loaded: their `-D` flags are used.
pub fn loaded<'a>(names: impl IntoIterator<Item = &'a str>) {
    let mut set = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    set.extend(names.into_iter().map(str::to_owned));
}

/// Warn about each `-D` flag that names none of the layers [`loaded`] so
/// far, as nbdkit warns about a flag nothing used: a misspelt layer name
/// would otherwise be ignored without a word.
pub fn warn_unused() {
    let set = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    for f in DEBUG_FLAGS.get().into_iter().flatten() {
        if !set.contains(&f.layer) {
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
