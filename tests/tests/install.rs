//! nbdhost as a distribution installs it: `make install` into a staging
//! `DESTDIR`, then only the installed files. A C plugin builds outside the
//! tree with nothing but `pkg-config --cflags nbdhost`, a Rust plugin as
//! its own cargo project on the SDK; the installed binary serves both by
//! path and its own plugins and filters by short name; the manual pages
//! are where `man` looks; the systemd units run under socket activation;
//! and `make uninstall` takes everything away again.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbdhost_tests::{client, root, run, run_ok, TempDir};

/// The default prefix, which the debug build the tests use was compiled
/// with.
const PREFIX: &str = "/usr/local";

/// `make install` (or another target) of the debug build into `dest`.
fn make(target: &str, dest: &Path) {
    run_ok(
        Command::new("make")
            .arg("-C")
            .arg(root())
            .args([target, "PROFILE=debug"])
            .arg(format!("DESTDIR={}", dest.display()))
            // The test runs inside make check; its flags are not ours.
            .env_remove("MAKEFLAGS")
            .env_remove("MAKELEVEL"),
    );
}

/// A path under the staged prefix.
fn staged(dest: &Path, rel: &str) -> PathBuf {
    dest.join(PREFIX.trim_start_matches('/')).join(rel)
}

/// What `nbdinfo --size` says of the export the installed binary serves
/// with `args`, on a private socket.
fn served_size(dest: &Path, args: &[&str]) -> String {
    let out = run_ok(
        Command::new(staged(dest, "bin/nbdhost"))
            .args(["-U", "-"])
            .args(args)
            .args(["--run", "nbdinfo --size \"$uri\""])
            .env(
                "PATH",
                format!("/usr/bin:{}", std::env::var("PATH").unwrap()),
            )
            .env_remove("NBDHOST_PLUGINDIR")
            .env_remove("NBDHOST_FILTERDIR"),
    );
    out.trim().to_string()
}

/// A C plugin compiled outside the tree against the installed header
/// only, as a third-party author would.
fn build_c_plugin(dest: &Path, work: &TempDir) -> PathBuf {
    let src = work.path("cmem.c");
    std::fs::copy(root().join("plugin-api/examples/cplugin.c"), &src).unwrap();
    let cflags = run_ok(
        Command::new("pkg-config")
            .args(["--cflags", "nbdhost"])
            .env("PKG_CONFIG_PATH", staged(dest, "lib/pkgconfig"))
            .env("PKG_CONFIG_SYSROOT_DIR", dest),
    );
    assert!(
        cflags.contains(&staged(dest, "include").display().to_string()),
        "{cflags}"
    );
    let so = work.path("libcmemplugin.so");
    run_ok(
        Command::new("cc")
            .args(cflags.split_whitespace())
            .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
            .arg(&so)
            .arg(&src),
    );
    so
}

const RUST_PLUGIN: &str = r#"
use nbdhost_plugin_api::{callbacks, nbdhost_plugin, Flags, Handle, Plugin, Result};

#[derive(Default)]
pub struct Sevens;

#[callbacks]
impl Plugin for Sevens {
    const NAME: &'static str = "sevens";
    const DESCRIPTION: &'static str = "3 MiB of sevens";
    type Handle = SevensHandle;
    fn open(&self, _readonly: bool) -> Result<SevensHandle> {
        Ok(SevensHandle)
    }
}

pub struct SevensHandle;

#[callbacks]
impl Handle for SevensHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(3 << 20)
    }
    fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(7);
        Ok(())
    }
}

nbdhost_plugin!(Sevens);
"#;

/// A Rust plugin as its own cargo project, depending on the SDK by path
/// and built offline (its dependencies are in cargo's cache from the
/// build of the tree).
fn build_rust_plugin(work: &TempDir) -> PathBuf {
    let dir = work.path("sevens");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"sevens\"\nversion = \"1.0.0\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\n\
             nbdhost-plugin-api = {{ path = \"{}\" }}\n\n[workspace]\n",
            root().join("plugin-api").display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("src/lib.rs"), RUST_PLUGIN).unwrap();
    run_ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--offline", "--quiet", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .env_remove("RUSTFLAGS"),
    );
    dir.join("target/debug/libsevens.so")
}

#[test]
fn installed_files_alone_build_and_serve_plugins() {
    let dest = TempDir::new("install");
    let work = TempDir::new("install-work");
    make("install", &dest.0);

    // Short names come from the installed layout.
    let bin = staged(&dest.0, "bin/nbdhost");
    let cfg = run_ok(Command::new(&bin).arg("--dump-config"));
    assert!(
        cfg.lines()
            .any(|l| l.starts_with("plugindir=") && l.ends_with(":/usr/local/lib/nbdhost/plugins")),
        "{cfg}"
    );
    assert_eq!(served_size(&dest.0, &["memory", "1M"]), "1048576");
    assert_eq!(
        served_size(
            &dest.0,
            &["--filter=offset", "memory", "4M", "offset=1M", "range=2M"]
        ),
        "2097152"
    );

    let c = build_c_plugin(&dest.0, &work);
    assert_eq!(
        served_size(&dest.0, &[c.to_str().unwrap(), "size=5M"]),
        "5242880"
    );
    let rust = build_rust_plugin(&work);
    assert_eq!(served_size(&dest.0, &[rust.to_str().unwrap()]), "3145728");

    let page = run_ok(
        Command::new("man")
            .arg("-M")
            .arg(staged(&dest.0, "share/man"))
            .arg("nbdhost-plugin")
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat"),
    );
    assert!(page.contains("NBDHOST-PLUGIN"), "{page}");

    make("uninstall", &dest.0);
    let left: Vec<_> = walk(&dest.0).into_iter().filter(|p| p.is_file()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn the_service_unit_serves_under_socket_activation() {
    if run(Command::new("systemd-socket-activate").arg("--version"))
        .status
        .code()
        .is_none()
    {
        eprintln!("SKIP: systemd-socket-activate is not installed");
        return;
    }
    let dest = TempDir::new("install-unit");
    make("install", &dest.0);
    let unit =
        std::fs::read_to_string(staged(&dest.0, "lib/systemd/system/nbdhost.service")).unwrap();
    // The unit's command line as systemd would run it, with its default
    // arguments, from the staged binary.
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let args = unit
        .lines()
        .find_map(|l| l.strip_prefix("Environment=NBDHOST_ARGS="))
        .expect("default arguments")
        .trim_matches('"');
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/nbdhost"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg(format!("--listen=127.0.0.1:{port}"))
        .arg(staged(&dest.0, "bin/nbdhost"));
    for w in words {
        match w {
            "$NBDHOST_ARGS" => cmd.args(args.split_whitespace()),
            w => cmd.arg(w),
        };
    }
    let mut activator = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let size = loop {
        let out = run(client("nbdinfo").args(["--size", &uri]));
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "never served");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = activator.kill();
    let _ = activator.wait();
    assert_eq!(size, "1073741824");
    assert!(unit.contains("DynamicUser=yes") && unit.contains("ProtectSystem=strict"));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
