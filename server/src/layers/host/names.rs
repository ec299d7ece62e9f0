//! Layer names with a `'static` lifetime, so that the per-thread record of
//! the layer being called ([`super::call`]) can hold one without a
//! lifetime or a reference count.

use std::sync::Mutex;

/// Names of the layers loaded, kept for the life of the process; a name
/// loaded again (another export, a reload) reuses its entry, so the list
/// grows only with new names.
static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// A layer's name with a `'static` lifetime, each name stored once.
pub fn intern(name: &str) -> &'static str {
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let n: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(n);
    n
}
