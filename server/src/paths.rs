//! Where this build is installed: the GNU directory variables, fixed at
//! build time from `NBDHOST_PREFIX`, `NBDHOST_BINDIR`, … in the build's
//! environment (the Makefile sets them), defaulting to `/usr/local`.

/// One directory: its build-time variable, or `default` under the
/// prefix.
macro_rules! dir {
    ($(#[$doc:meta])* $name:ident, $var:literal, $default:literal) => {
        $(#[$doc])*
        pub fn $name() -> String {
            option_env!($var).map_or_else(|| format!("{}/{}", prefix(), $default), str::to_owned)
        }
    };
}

/// The installation prefix.
pub fn prefix() -> &'static str {
    option_env!("NBDHOST_PREFIX").unwrap_or("/usr/local")
}

dir!(
    /// Where the `nbdhost` binary goes.
    bindir, "NBDHOST_BINDIR", "bin"
);
dir!(
    /// Where system binaries go (nbdkit reports it; nbdhost installs none).
    sbindir, "NBDHOST_SBINDIR", "sbin"
);
dir!(
    /// The library directory; plugins and filters live in `nbdhost/` under it.
    libdir, "NBDHOST_LIBDIR", "lib"
);
dir!(
    /// Where the manual pages go.
    mandir, "NBDHOST_MANDIR", "share/man"
);
dir!(
    /// The configuration directory.
    sysconfdir, "NBDHOST_SYSCONFDIR", "etc"
);

/// The installed directory of plugins (`kind` = "plugin") or filters.
pub fn layer_dir(kind: &str) -> String {
    format!("{}/nbdhost/{kind}s", libdir())
}
