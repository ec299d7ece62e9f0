//! Where nbdkit keeps its plugins and filters, fixed when nbdhost is
//! built, so that finding them never depends on which `nbdkit` is first
//! in PATH (where nbdhost is installed as `nbdkit`, that one is nbdhost).
//!
//! `NBDHOST_NBDKIT_PLUGINDIR` and `NBDHOST_NBDKIT_FILTERDIR` in the build's
//! environment win (the server reads them with `option_env!`); otherwise
//! they are what pkg-config's `nbdkit` module (Debian's
//! `nbdkit-plugin-dev`) says. Without either, the server falls back to
//! the distributions' directories at run time.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    for (variable, env) in [
        ("plugindir", "NBDHOST_NBDKIT_PLUGINDIR"),
        ("filterdir", "NBDHOST_NBDKIT_FILTERDIR"),
    ] {
        println!("cargo:rerun-if-env-changed={env}");
        if std::env::var_os(env).is_some() {
            continue;
        }
        if let Some(dir) = pkg_config(variable) {
            println!("cargo:rustc-env={env}={dir}");
        }
    }
}

/// `pkg-config --variable=VARIABLE nbdkit`, if pkg-config and the module
/// are there.
fn pkg_config(variable: &str) -> Option<String> {
    let out = Command::new("pkg-config")
        .arg(format!("--variable={variable}"))
        .arg("nbdkit")
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !dir.is_empty()).then_some(dir)
}
