//! Helpers shared by the integration tests that compile C against the
//! headers in `include/`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding `nbdhost-plugin.h` and `nbdhost-filter.h`.
pub fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// A scratch directory unique to this process and test, removed on drop
/// (also when the test fails, so reruns start clean).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nbdhost-api-{tag}-{}", std::process::id()));
        // A leftover from an earlier run with a recycled pid.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run the C compiler (`$CC`, or `cc`) with `args`, failing the test with
/// the compiler's own diagnostics if it rejects the input and with a clear
/// message if there is no compiler at all.
pub fn cc(args: &[&OsStr]) {
    let compiler = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let mut cmd = Command::new(&compiler);
    cmd.args(args);
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "no C compiler: `{}` was not found on PATH. These tests compile C against \
             plugin-api/include; install a C compiler (e.g. gcc) or set CC.",
            compiler.to_string_lossy()
        ),
        Err(e) => panic!("cannot run `{}`: {e}", compiler.to_string_lossy()),
    };
    assert!(
        out.status.success(),
        "{:?} failed ({}):\n{}{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
