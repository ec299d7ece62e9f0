//! Documentation ships with features: every manual page renders without
//! warnings, every flag `nbdhost --help` lists is documented in
//! nbdhost(1), and every in-tree plugin and filter has its own page.

use std::path::{Path, PathBuf};

use nbdhost_tests::{nbdhost_bin, run, run_ok};

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../man")
}

fn pages() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(man_dir())
        .expect("man/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| {
                e.len() == 1 && e.to_str().unwrap().chars().all(|c| c.is_ascii_digit())
            })
        })
        .collect();
    v.sort();
    v
}

#[test]
fn pages_render_without_warnings() {
    let pages = pages();
    assert!(
        pages.len() >= 4,
        "expected the manual pages in man/, found {pages:?}"
    );
    for p in pages {
        let out = run(std::process::Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(&p)
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            p.display()
        );
        assert!(
            out.stdout.len() > 500,
            "{} renders almost nothing",
            p.display()
        );
    }
}

#[test]
fn every_flag_is_documented() {
    let help = run_ok(std::process::Command::new(nbdhost_bin()).arg("--help"));
    let page = std::fs::read_to_string(man_dir().join("nbdhost.1")).unwrap();
    // In roff source a dash is often written \- ; compare without escapes.
    let page = page
        .replace("\\-", "-")
        .replace("\\f[BIR]", "")
        .replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fP", "");
    let flags: Vec<&str> = help
        .split_whitespace()
        .map(|w| w.trim_end_matches([',', ']']).split('=').next().unwrap())
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    assert!(flags.len() > 15, "--help lists too few flags: {flags:?}");
    for f in flags {
        assert!(page.contains(f), "nbdhost(1) does not document {f}");
    }
}

#[test]
fn every_plugin_and_filter_has_a_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for kind in ["plugin", "filter"] {
        for e in std::fs::read_dir(root.join(format!("{kind}s"))).unwrap() {
            let e = e.unwrap();
            // Library crates shared by layers (filters/luks-crypto) are
            // not layers: only a crate that builds a shared object is.
            let manifest = std::fs::read_to_string(e.path().join("Cargo.toml")).unwrap();
            if !manifest.contains("\"cdylib\"") {
                continue;
            }
            let name = e.file_name().into_string().unwrap();
            let page = man_dir().join(format!("nbdhost-{name}-{kind}.1"));
            assert!(
                page.exists(),
                "{kind} {name} has no manual page {}",
                page.display()
            );
        }
        assert!(man_dir().join(format!("nbdhost-{kind}.3")).exists());
    }
}
