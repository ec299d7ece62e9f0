//! nbdhost as a distribution installs it: `make install` into a staging
//! `DESTDIR`, then only the installed files. A C plugin builds outside the
//! tree with nothing but `pkg-config --cflags nbdhost`, a Rust plugin as
//! its own cargo project on the SDK; the installed binary serves both by
//! path and its own plugins and filters by short name; the manual pages
//! are where `man` looks; the systemd units run under socket activation,
//! with the TLS credentials their comments show; the defaults file is a
//! configuration file, kept once changed; and `make uninstall` takes
//! everything else away again.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbdhost_tests::{client, keys_ok, root, run, run_ok, TempDir};

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

/// Whether systemd-socket-activate, which runs a unit's command line as
/// systemd would under socket activation, is installed.
fn have_socket_activate() -> bool {
    let found = run(Command::new("systemd-socket-activate").arg("--version"))
        .status
        .code()
        .is_some();
    if !found {
        eprintln!("SKIP: systemd-socket-activate is not installed");
    }
    found
}

/// The installed service's command line as systemd would run it under
/// socket activation, from the staged binary, with `args` for
/// `$NBDHOST_ARGS` and `env` in its environment, on 127.0.0.1: the
/// activator and its port.
fn activate(
    dest: &Path,
    unit: &str,
    args: &str,
    env: &[(&str, &Path)],
) -> (std::process::Child, u16) {
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/nbdhost"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg(format!("--listen=127.0.0.1:{port}"));
    // The activator gives its command only the variables it is told to.
    for (k, v) in env {
        cmd.arg(format!("--setenv={k}={}", v.display()));
    }
    cmd.arg(staged(dest, "bin/nbdhost"));
    for w in words {
        match w {
            "$NBDHOST_ARGS" => cmd.args(args.split_whitespace()),
            w => cmd.arg(w),
        };
    }
    let activator = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (activator, port)
}

/// `nbdinfo --size URI`, tried until it answers (the server starts on
/// the first connection) or 10 seconds pass.
fn size_when_served(uri: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = run(client("nbdinfo").args(["--size", uri]));
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never served: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn stop(mut activator: std::process::Child) {
    let _ = activator.kill();
    let _ = activator.wait();
}

#[test]
fn the_service_unit_serves_under_socket_activation() {
    if !have_socket_activate() {
        return;
    }
    let dest = TempDir::new("install-unit");
    make("install", &dest.0);
    let unit =
        std::fs::read_to_string(staged(&dest.0, "lib/systemd/system/nbdhost.service")).unwrap();
    // With its default arguments.
    let args = unit
        .lines()
        .find_map(|l| l.strip_prefix("Environment=NBDHOST_ARGS="))
        .expect("default arguments")
        .trim_matches('"');
    let (activator, port) = activate(&dest.0, &unit, args, &[]);
    let size = size_when_served(&format!("nbd://127.0.0.1:{port}/"));
    stop(activator);
    assert_eq!(size, "1073741824");
    assert!(unit.contains("DynamicUser=yes") && unit.contains("ProtectSystem=strict"));
}

/// The lines of `text` that are `#KEY...` comments, without `#KEY`.
fn commented<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let key = format!("#{key}");
    text.lines()
        .filter_map(|l| l.strip_prefix(key.as_str()))
        .collect()
}

/// The installed defaults file's example arguments that `pick` chooses,
/// with its disk image replaced by `image`.
fn example_args(defaults: &str, pick: impl Fn(&str) -> bool, image: &Path) -> String {
    let examples = commented(defaults, "NBDHOST_ARGS=");
    let found = examples
        .iter()
        .map(|a| a.trim_matches('"'))
        .find(|a| pick(a))
        .unwrap_or_else(|| panic!("no such example in {examples:?}"));
    found.replace("/srv/disk.img", image.to_str().unwrap())
}

#[test]
fn the_defaults_file_is_installed_and_kept_once_changed() {
    let dest = TempDir::new("install-defaults");
    make("install", &dest.0);
    let file = staged(&dest.0, "etc/default/nbdhost");
    let shipped = std::fs::read_to_string(&file).unwrap();
    // Only comments: the unit's own default stands until one is chosen.
    assert!(
        shipped.lines().all(|l| l.is_empty() || l.starts_with('#')),
        "{shipped}"
    );
    assert!(commented(&shipped, "NBDHOST_ARGS=").len() >= 3, "{shipped}");
    let edited = format!("{shipped}NBDHOST_ARGS=\"memory 2G\"\n");
    std::fs::write(&file, &edited).unwrap();
    make("install", &dest.0);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), edited);
    make("uninstall", &dest.0);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), edited);
    std::fs::write(&file, &shipped).unwrap();
    make("uninstall", &dest.0);
    assert!(!file.exists());
}

/// The credentials directory systemd would make for the unit's
/// `LoadCredential=` lines whose ids are `ids`: a copy of each file,
/// read-only, with the keys made under `keys` standing for the unit's
/// `@SYSCONFDIR@/nbdhost/tls`.
fn credentials(unit: &str, ids: &[&str], keys: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    for line in commented(unit, "LoadCredential=") {
        let (id, path) = line.split_once(':').expect("ID:PATH");
        if !ids.contains(&id) {
            continue;
        }
        let rel = path
            .strip_prefix("/usr/local/etc/nbdhost/tls/")
            .unwrap_or_else(|| panic!("{path} is not in the unit's key directory"));
        let copy = into.join(id);
        std::fs::copy(keys.join(rel), &copy).unwrap();
        std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .unwrap();
    }
    for id in ids {
        assert!(
            into.join(id).exists(),
            "no LoadCredential={id} line in the unit"
        );
    }
}

#[test]
fn the_units_tls_examples_serve_psk_and_x509_from_credentials() {
    if !have_socket_activate() {
        return;
    }
    let dest = TempDir::new("install-tls");
    let work = TempDir::new("install-tls-work");
    make("install", &dest.0);
    let unit =
        std::fs::read_to_string(staged(&dest.0, "lib/systemd/system/nbdhost.service")).unwrap();
    let defaults = std::fs::read_to_string(staged(&dest.0, "etc/default/nbdhost")).unwrap();
    let image = work.path("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();

    // The keys as the unit's comments say to make them, with a client
    // and a revoked one, so that the CRL's credential is there too.
    let keys = work.path("tls");
    let k = keys.to_str().unwrap();
    keys_ok(&["psk", "add", k]);
    keys_ok(&["ca", k]);
    keys_ok(&["server", k, "--dns", "localhost", "--ip", "127.0.0.1"]);
    keys_ok(&["client", k, "--name", "backup"]);
    keys_ok(&["client", k, "--name", "gone"]);
    keys_ok(&["revoke", k, "--name", "gone"]);

    // TLS-PSK: keys.psk alone.
    let psk = work.path("psk-credentials");
    credentials(&unit, &["keys.psk"], &keys, &psk);
    let args = example_args(&defaults, |a| a == "file /srv/disk.img", &image);
    let (activator, port) = activate(&dest.0, &unit, &args, &[("CREDENTIALS_DIRECTORY", &psk)]);
    let size = size_when_served(&format!(
        "nbds://qemu@127.0.0.1:{port}/?tls-psk-file={k}/keys.psk"
    ));
    let plain = run(client("nbdinfo").args(["--size", &format!("nbd://127.0.0.1:{port}/")]));
    stop(activator);
    assert_eq!(size, "1048576");
    assert!(!plain.status.success(), "a plain client was served");

    // X.509 with client certificates: the certificate set and the CRL.
    let x509 = work.path("x509-credentials");
    let set = [
        "server-cert.pem",
        "server-key.pem",
        "ca-cert.pem",
        "ca-crl.pem",
    ];
    credentials(&unit, &set, &keys, &x509);
    let args = example_args(&defaults, |a| a.contains("--tls-verify-peer"), &image);
    let (activator, port) = activate(&dest.0, &unit, &args, &[("CREDENTIALS_DIRECTORY", &x509)]);
    let uri = |name: &str| format!("nbds://localhost:{port}/?tls-certificates={k}/clients/{name}");
    let size = size_when_served(&uri("backup"));
    let revoked = run(client("nbdinfo").args(["--size", &uri("gone")]));
    stop(activator);
    assert_eq!(size, "1048576");
    assert!(!revoked.status.success(), "a revoked client was served");
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
