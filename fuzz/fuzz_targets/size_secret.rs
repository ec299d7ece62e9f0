//! Size and secret parameters: `parse_size` (`512`, `64K`, `1.5T`, `2s`)
//! and the form of a secret value (literal, `+FILE`, `-FD`, `-`), parsed
//! without reading anything.
//!
//! Checked: no panic; a size fits in an `i64`; a descriptor is never
//! stdin, stdout or stderr.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdhost::layers::host::secret::SecretSource;
use nbdhost::layers::host::size::parse_size;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = parse_size(s) {
        assert!(v <= i64::MAX as u64);
    }
    match SecretSource::parse(s) {
        Ok(SecretSource::Fd(fd)) => assert!(fd > 2),
        Ok(SecretSource::Literal(l)) => assert_eq!(l, s),
        Ok(_) | Err(_) => {}
    }
});
