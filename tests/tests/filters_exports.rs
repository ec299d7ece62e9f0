//! Filters that see the export list (ABI 1.7): the exportname filter,
//! compared with nbdkit's filter of the same name, and a C filter that
//! edits the layer below's list through the host's export-list services.
//! Clients are nbdinfo and qemu-img.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbdhost_tests::{build_c, client, filter_arg, plugin, root, run, run_ok, Server, TempDir};

/// A directory of three exports for the file plugin's `dir=`: `a` (1 MiB),
/// `b` (2 MiB) and `c` (3 MiB).
fn three_files(dir: &TempDir) -> PathBuf {
    let d = dir.path("exports");
    std::fs::create_dir(&d).unwrap();
    for (name, mib) in [("a", 1), ("b", 2), ("c", 3)] {
        let f = std::fs::File::create(d.join(name)).unwrap();
        f.set_len(mib << 20).unwrap();
    }
    d
}

fn serve(filter: &str, dir: &Path, params: &[&str]) -> Server {
    let mut args = vec![
        filter.to_string(),
        plugin("file").display().to_string(),
        format!("dir={}", dir.display()),
    ];
    args.extend(params.iter().map(|p| p.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// The exports `nbdinfo --list` shows, as (name, description), sorted:
/// nbdkit lists a directory in readdir order.
fn listing(uri: &str) -> Vec<(String, Option<String>)> {
    let out = run_ok(client("nbdinfo").args(["--list", uri]));
    let mut exports = Vec::new();
    for line in out.lines() {
        if let Some(name) = line.strip_prefix("export=\"") {
            exports.push((name.trim_end_matches("\":").to_string(), None));
        } else if let Some(d) = line.strip_prefix("\tdescription: ") {
            if let Some(last) = exports.last_mut() {
                last.1 = Some(d.to_string());
            }
        }
    }
    exports.sort();
    exports
}

fn export_uri(server: &Server, export: &str) -> String {
    server
        .uri()
        .replacen("nbd+unix:///", &format!("nbd+unix:///{export}"), 1)
}

fn size_of(uri: &str) -> String {
    run_ok(client("nbdinfo").args(["--size", uri]))
        .trim()
        .to_string()
}

/// nbdkit itself, serving `dir` through its exportname filter, stopped on
/// drop.
struct Nbdkit {
    child: Child,
    socket: PathBuf,
}

impl Nbdkit {
    fn start(tmp: &TempDir, dir: &Path, params: &[&str]) -> Option<Nbdkit> {
        let socket = tmp.path("nbdkit.sock");
        let child = Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["--filter=exportname", "file"])
            .arg(format!("dir={}", dir.display()))
            .args(params)
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("skipped the nbdkit comparison: nbdkit is not installed");
            return None;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Nbdkit { child, socket })
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serve `params` through both servers' exportname filters; the listings
/// must agree. Returns nbdhost's.
fn listing_as_nbdkit_shows_it(params: &[&str]) -> Vec<(String, Option<String>)> {
    let tmp = TempDir::new("exportname");
    let dir = three_files(&tmp);
    let ours = serve(&filter_arg("exportname"), &dir, params);
    let mine = listing(&ours.uri());
    if let Some(theirs) = Nbdkit::start(&tmp, &dir, params) {
        assert_eq!(mine, listing(&theirs.uri()), "nbdhost and nbdkit differ");
    }
    mine
}

fn names(list: &[(String, Option<String>)]) -> Vec<&str> {
    list.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn without_parameters_the_plugins_list_passes_through() {
    let list = listing_as_nbdkit_shows_it(&[]);
    assert_eq!(names(&list), ["a", "b", "c"]);
}

#[test]
fn an_explicit_list_shows_only_the_names_given() {
    let list =
        listing_as_nbdkit_shows_it(&["exportname-list=explicit", "exportname=a", "exportname=c"]);
    assert_eq!(names(&list), ["a", "c"]);
}

#[test]
fn an_empty_list_shows_nothing() {
    let list = listing_as_nbdkit_shows_it(&["exportname-list=empty"]);
    assert!(list.is_empty(), "{list:?}");
}

#[test]
fn defaultonly_lists_the_default_export_under_its_name() {
    let list = listing_as_nbdkit_shows_it(&["exportname-list=defaultonly", "default-export=b"]);
    assert_eq!(names(&list), ["b"]);
}

#[test]
fn a_fixed_description_is_shown_beside_every_name() {
    let list = listing_as_nbdkit_shows_it(&["exportdesc=fixed:a test disk"]);
    assert!(
        list.iter()
            .all(|(_, d)| d.as_deref() == Some("a test disk")),
        "{list:?}"
    );
}

#[test]
fn a_description_script_runs_with_the_export_name() {
    let list = listing_as_nbdkit_shows_it(&["exportdesc=script:echo \"disk $name\""]);
    let want: Vec<(String, Option<String>)> = ["a", "b", "c"]
        .iter()
        .map(|n| (n.to_string(), Some(format!("disk {n}"))))
        .collect();
    assert_eq!(list, want);
}

#[test]
fn the_error_mode_refuses_the_listing_but_not_an_open() {
    let tmp = TempDir::new("exportname");
    let dir = three_files(&tmp);
    let s = serve(&filter_arg("exportname"), &dir, &["exportname-list=error"]);
    let out = run(client("nbdinfo").args(["--list", &s.uri()]));
    assert!(!out.status.success(), "the listing should fail");
    assert_eq!(size_of(&export_uri(&s, "b")), "2097152");
}

#[test]
fn the_default_export_is_what_the_empty_name_opens() {
    let tmp = TempDir::new("exportname");
    let dir = three_files(&tmp);
    let s = serve(&filter_arg("exportname"), &dir, &["default-export=c"]);
    assert_eq!(size_of(&s.uri()), "3145728");
    let info = run_ok(client("qemu-img").args(["info", "-f", "raw", &s.uri()]));
    assert!(info.contains("3 MiB"), "{info}");
}

#[test]
fn strict_names_refuse_an_export_not_given() {
    let tmp = TempDir::new("exportname");
    let dir = three_files(&tmp);
    let s = serve(
        &filter_arg("exportname"),
        &dir,
        &["exportname-strict=true", "exportname=a"],
    );
    assert_eq!(size_of(&export_uri(&s, "a")), "1048576");
    let out = run(client("qemu-img").args(["info", "-f", "raw", &export_uri(&s, "b")]));
    assert!(!out.status.success(), "export b should be refused");
    assert!(
        s.log_text().contains("is not one of the exportname= names"),
        "{}",
        s.log_text()
    );
}

#[test]
fn a_c_filter_edits_the_list_and_default_of_the_layer_below() {
    let tmp = TempDir::new("hide");
    let dir = three_files(&tmp);
    let so = build_c(&tmp, "hide", &root().join("tests/c/hide.c"), &[]);
    let s = serve(
        &format!("--filter={}", so.display()),
        &dir,
        &["hide-prefix=a"],
    );
    assert_eq!(names(&listing(&s.uri())), ["b", "c"]);
    // The file plugin has no default export with dir=; the filter makes
    // the first one it lists the default.
    assert_eq!(size_of(&s.uri()), "2097152");
    let out = run(client("nbdinfo").args(["--size", &export_uri(&s, "a")]));
    assert!(!out.status.success(), "a hidden export should not open");
}
