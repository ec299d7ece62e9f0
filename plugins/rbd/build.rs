//! Find librbd and librados, and tell the crate whether it found them.
//!
//! Debian's librbd-dev ships no pkg-config file, so after asking
//! `pkg-config librbd` (other distributions, or a local build) this looks
//! for the header and the libraries in the usual places. Found, it links
//! `-lrbd -lrados` and sets `cfg(have_librbd)`; not found, the crate still
//! builds (as a plugin that refuses to start and says why), so that a
//! workspace build needs no Ceph. `NBDHOST_RBD=0` forces the binding off,
//! `NBDHOST_RBD=1` on (failing the build if librbd is missing).
//!
//! The probe runs `pkg-config` as a program rather than through the
//! `pkg-config` crate: one call needs no build dependency.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(have_librbd)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in [
        "NBDHOST_RBD",
        "PKG_CONFIG_PATH",
        "RBD_INCLUDE_DIR",
        "RBD_LIB_DIR",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let wanted = std::env::var("NBDHOST_RBD").ok();
    if wanted.as_deref() == Some("0") {
        println!("cargo::warning=rbd plugin: built without librbd (NBDHOST_RBD=0)");
        return;
    }
    let found = pkg_config().or_else(search);
    match found {
        Some(libs) => {
            for dir in libs.dirs {
                println!("cargo::rustc-link-search=native={dir}");
            }
            for lib in libs.names {
                println!("cargo::rustc-link-lib=dylib={lib}");
            }
            println!("cargo::rustc-cfg=have_librbd");
        }
        None if wanted.as_deref() == Some("1") => {
            panic!("NBDHOST_RBD=1 but librbd was not found (install librbd-dev)")
        }
        None => println!(
            "cargo::warning=rbd plugin: librbd not found (install librbd-dev); \
             the plugin will refuse to start"
        ),
    }
}

/// Where to link from and what.
struct Libs {
    dirs: Vec<String>,
    names: Vec<String>,
}

/// `pkg-config --libs librbd librados`, when both have `.pc` files.
fn pkg_config() -> Option<Libs> {
    let out = Command::new("pkg-config")
        .args(["--libs", "librbd", "librados"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut libs = Libs {
        dirs: Vec::new(),
        names: Vec::new(),
    };
    for word in text.split_whitespace() {
        if let Some(d) = word.strip_prefix("-L") {
            libs.dirs.push(d.to_owned());
        } else if let Some(l) = word.strip_prefix("-l") {
            libs.names.push(l.to_owned());
        }
    }
    libs.names.iter().any(|n| n == "rbd").then_some(libs)
}

/// The header under an include directory and both libraries' link names
/// (`librbd.so`, `librados.so`) in one library directory.
fn search() -> Option<Libs> {
    let target = std::env::var("TARGET").unwrap_or_default();
    // x86_64-unknown-linux-gnu → Debian's multiarch x86_64-linux-gnu.
    let multiarch = target.replacen("-unknown-", "-", 1);
    let include: Vec<String> = std::env::var("RBD_INCLUDE_DIR")
        .map(|d| vec![d])
        .unwrap_or_else(|_| vec!["/usr/include".into(), "/usr/local/include".into()]);
    let libdirs: Vec<String> = std::env::var("RBD_LIB_DIR")
        .map(|d| vec![d])
        .unwrap_or_else(|_| {
            vec![
                format!("/usr/lib/{multiarch}"),
                "/usr/lib64".into(),
                "/usr/lib".into(),
                "/usr/local/lib".into(),
                "/usr/local/lib64".into(),
            ]
        });
    include
        .iter()
        .any(|d| Path::new(d).join("rbd/librbd.h").exists())
        .then_some(())?;
    let dir = libdirs.into_iter().find(|d| {
        Path::new(d).join("librbd.so").exists() && Path::new(d).join("librados.so").exists()
    })?;
    Some(Libs {
        dirs: vec![dir],
        names: vec!["rbd".into(), "rados".into()],
    })
}
