//! Whether layers may use stdin and stdout (`host->stdio_safe`). nbdkit's
//! rule: they are a layer's only while it is being configured (to prompt
//! for a password, say), and never when they carry the NBD connection
//! (`-s`), where a layer reading stdin would take the client's bytes.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by start-up: `!-s` while layers are configured, `false` after.
static STDIO_SAFE: AtomicBool = AtomicBool::new(true);

/// Say whether layers may use stdin and stdout from now on.
pub fn set_stdio_safe(safe: bool) {
    STDIO_SAFE.store(safe, Ordering::Relaxed);
}

/// Whether layers may use stdin and stdout.
pub(super) fn stdio_safe() -> bool {
    STDIO_SAFE.load(Ordering::Relaxed)
}
