//! Plugins and filters written for nbdkit. They are served through the
//! `nbdkit` adapter (`plugins/nbdkit`), which provides the `nbdkit_*`
//! functions they call; all the server has to know is how to recognise
//! them (the entry symbol they export), where nbdkit keeps them (its plugin
//! and filter directories), and where the adapter is. Nothing else in the
//! server is nbdkit-specific.

use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol};

/// The entry symbol of an nbdkit plugin or filter (`kind`).
fn entry_symbol(kind: &str) -> &'static str {
    if kind == "filter" {
        "filter_init"
    } else {
        "plugin_init"
    }
}

/// Whether the shared object at `path` is an nbdkit `kind` ("plugin" or
/// "filter"): it defines nbdkit's entry symbol. Read from the file, since
/// loading it would fail (or run its initialisers) before the adapter has
/// supplied the functions it needs.
pub fn is_nbdkit(path: &Path, kind: &str) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let Ok(file) = object::File::parse(&*data) else {
        return false;
    };
    let entry = entry_symbol(kind);
    file.dynamic_symbols()
        .any(|s| s.is_definition() && s.name() == Ok(entry))
}

/// nbdkit's directory for `kind`: `$NBDHOST_NBDKIT_PLUGINDIR` (or
/// `…FILTERDIR`) if set, else the one fixed when nbdhost was built
/// (`build.rs`: pkg-config's `nbdkit` module), else the first of the
/// distributions' directories that exists. Never `nbdkit --dump-config`:
/// where nbdhost is installed as `nbdkit`, that would ask nbdhost.
pub fn nbdkit_dir(kind: &str) -> Option<PathBuf> {
    let var = format!("NBDHOST_NBDKIT_{}DIR", kind.to_uppercase());
    if let Some(d) = std::env::var_os(&var) {
        return Some(PathBuf::from(d));
    }
    let built = if kind == "filter" {
        option_env!("NBDHOST_NBDKIT_FILTERDIR")
    } else {
        option_env!("NBDHOST_NBDKIT_PLUGINDIR")
    };
    built
        .map(PathBuf::from)
        .into_iter()
        .chain(distribution_dirs(kind))
        .find(|d| d.is_dir())
}

/// Where distributions install nbdkit's `kind`s: Debian's multiarch
/// directory, then Fedora's and others' `lib64`, then plain `lib`.
fn distribution_dirs(kind: &str) -> impl Iterator<Item = PathBuf> {
    let multiarch = format!("/usr/lib/{}-linux-gnu", std::env::consts::ARCH);
    [
        multiarch.as_str(),
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ]
    .map(|lib| Path::new(lib).join("nbdkit").join(format!("{kind}s")))
    .into_iter()
}

/// An nbdkit script plugin installed under a short name: an executable
/// `nbdkit-NAME-plugin` (no `.so`) in nbdkit's plugin directory whose
/// first line is `#!/…/nbdkit LANGUAGE`. nbdkit executes such a file,
/// which runs nbdkit with the language plugin and the script; this gives
/// the same pair, the language plugin's name and the script's path, so
/// nbdhost can serve it that way.
pub fn script(name: &str) -> Option<(String, PathBuf)> {
    use std::io::{BufRead, Read};
    use std::os::unix::fs::PermissionsExt;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return None;
    }
    let path = nbdkit_dir("plugin")?.join(format!("nbdkit-{name}-plugin"));
    let md = std::fs::metadata(&path).ok()?;
    if !md.is_file() || md.permissions().mode() & 0o100 == 0 {
        return None;
    }
    let mut first = String::new();
    std::io::BufReader::new(std::fs::File::open(&path).ok()?.take(4096))
        .read_line(&mut first)
        .ok()?;
    let mut words = first.strip_prefix("#!")?.split_whitespace();
    let interpreter = Path::new(words.next()?);
    let language = words.next()?;
    (interpreter.file_name()? == "nbdkit").then(|| (language.to_string(), path))
}

/// nbdkit's `kind` called `name` (`curl` → `nbdkit-curl-plugin.so` in
/// nbdkit's plugin directory), if it is installed.
pub fn find(name: &str, kind: &str) -> Option<PathBuf> {
    let p = nbdkit_dir(kind)?.join(format!("nbdkit-{name}-{kind}.so"));
    p.exists().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_nbdhost_plugin_is_not_taken_for_an_nbdkit_one() {
        let exe = std::env::current_exe().unwrap();
        assert!(!is_nbdkit(&exe, "plugin"));
        assert!(!is_nbdkit(Path::new("/nonexistent"), "plugin"));
    }
}
