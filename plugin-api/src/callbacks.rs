//! Which trait methods a plugin or filter defines, so that only those are
//! registered with the server.

/// The names of the methods one `impl` block defines, which
/// [`macro@crate::callbacks`] writes as the block's `CALLBACKS` constant.
///
/// A callback the block does not define is left NULL in the table the
/// server sees, so the server's own default applies (the same one the
/// trait's default method describes) and the call never crosses the ABI.
/// Writing the constant by hand is possible but easy to get out of step
/// with the block; prefer the attribute.
#[derive(Clone, Copy, Debug)]
pub struct Callbacks(&'static [&'static str]);

impl Callbacks {
    /// The set named by `names`.
    pub const fn new(names: &'static [&'static str]) -> Callbacks {
        Callbacks(names)
    }

    /// Whether the method `name` is defined.
    pub const fn has(&self, name: &str) -> bool {
        let mut i = 0;
        while i < self.0.len() {
            if str_eq(self.0[i], name) {
                return true;
            }
            i += 1;
        }
        false
    }
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::Callbacks;

    #[test]
    fn a_named_method_is_found_and_a_prefix_of_one_is_not() {
        let c = Callbacks::new(&["pread", "pwrite"]);
        assert!(c.has("pwrite"));
        assert!(!c.has("pwr"));
        assert!(!c.has("flush"));
    }
}
