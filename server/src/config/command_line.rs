//! The command line, nbdkit-compatible where nbdkit has the same flag,
//! parsed by clap into [`CommandLine`] and turned into [`Settings`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;

use super::{
    Action, Address, Announce, Exports, Family, Limits, Listen, Logging, Process, Protocol,
    Settings, Tls, DEFAULT_PORT,
};
use crate::protocol::export::ExportPolicy;
use crate::protocol::handshake::TlsMode;

/// Serve a disk over the Network Block Device protocol from a plugin.
#[derive(Debug, Parser)]
#[command(
    name = "nbdhost",
    about,
    // Both also describe the plugin and filters named with them, as
    // nbdkit's do, so they are ordinary flags handled after parsing.
    disable_help_flag = true,
    disable_version_flag = true,
    // As nbdkit's getopt: a repeated option's last value counts, which is
    // also how the command line overrides a configuration file.
    args_override_self = true,
    after_help = "Examples:\n  nbdhost memory 1G\n  nbdhost -r file disk.img\n  nbdhost -U - memory 1G --run 'qemu-img info \"$uri\"'\n\nSee nbdhost(1)."
)]
pub struct CommandLine {
    /// Stay in the foreground (by default nbdhost forks once it listens).
    #[arg(short = 'f', long, visible_alias = "no-fork")]
    pub foreground: bool,

    /// Use the newstyle protocol (the default; accepted for nbdkit compatibility).
    #[arg(
        short = 'n',
        long,
        visible_alias = "new-style",
        conflicts_with = "oldstyle"
    )]
    pub newstyle: bool,

    /// Use the oldstyle protocol.
    #[arg(short = 'o', long, visible_alias = "old-style")]
    pub oldstyle: bool,

    /// TCP port to listen on.
    #[arg(short = 'p', long, value_name = "PORT")]
    pub port: Option<u16>,

    /// Listen only on this address.
    #[arg(
        short = 'i',
        long = "ipaddr",
        visible_alias = "ip-addr",
        value_name = "ADDR"
    )]
    pub ipaddr: Option<String>,

    /// Listen on IPv4 addresses only.
    #[arg(short = '4', long = "ipv4-only", conflicts_with = "ipv6_only")]
    pub ipv4_only: bool,

    /// Listen on IPv6 addresses only.
    #[arg(short = '6', long = "ipv6-only")]
    pub ipv6_only: bool,

    /// Enable TCP keepalive on client connections.
    #[arg(long, visible_alias = "keep-alive")]
    pub keepalive: bool,

    /// Listen on AF_VSOCK, on the port -p gives (default 10809), for
    /// virtual machines to reach the host.
    #[arg(long, conflicts_with_all = ["ipaddr", "unix", "ipv4_only", "ipv6_only"])]
    pub vsock: bool,

    /// Listen on a Unix socket; "-" makes a private temporary one.
    #[arg(short = 'U', long = "unix", value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Serve one connection on stdin and stdout, then exit.
    #[arg(
        short = 's',
        long,
        visible_alias = "stdin",
        conflicts_with_all = ["port", "ipaddr", "unix", "run", "vsock", "dump_plugin"]
    )]
    pub single: bool,

    /// Write the server's process id to this file once it listens.
    #[arg(short = 'P', long, visible_alias = "pid-file", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// Change to this user (a name or a number) once listening, before
    /// serving.
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,

    /// Change to this group (a name or a number) once listening, before
    /// serving.
    #[arg(short = 'g', long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Print the export's URI once listening.
    #[arg(long, visible_aliases = ["print-url", "show-uri", "show-url"])]
    pub print_uri: bool,

    /// Serve read-only.
    #[arg(short = 'r', long, visible_alias = "read-only")]
    pub readonly: bool,

    /// Export name to put in the --run URI.
    #[arg(
        short = 'e',
        long = "exportname",
        visible_aliases = ["export-name", "export"],
        value_name = "NAME"
    )]
    pub exportname: Option<String>,

    /// Worker threads for plugins and filters whose calls may block.
    #[arg(short = 't', long, value_name = "N", default_value_t = 16, value_parser = count)]
    pub threads: usize,

    /// Most clients served at once; more are refused and logged.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = connections)]
    pub max_connections: usize,

    /// Most of those clients still in their handshake; more are refused and
    /// logged.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = connections)]
    pub max_handshakes: usize,

    /// Event loops serving sockets (default: one per CPU).
    #[arg(long, value_name = "N", value_parser = count)]
    pub loops: Option<usize>,

    /// Log debug messages.
    #[arg(short = 'v', long)]
    pub verbose: bool,

    /// Where to log: stderr, syslog, null or an absolute file path
    /// (default: stderr in the foreground, syslog once in the background).
    #[arg(long, value_name = "stderr|syslog|null|FILE")]
    pub log: Option<String>,

    /// Set a plugin debug flag: -D PLUGIN.FLAG=N.
    #[arg(short = 'D', long = "debug", value_name = "PLUGIN.FLAG=N")]
    pub debug: Vec<String>,

    /// Exit when the parent process exits.
    #[arg(long)]
    pub exit_with_parent: bool,

    /// Handshake flags to offer (a mask; 0 offers none).
    #[arg(long, value_name = "MASK", default_value_t = 3)]
    pub mask_handshake: u16,

    /// Do not offer structured replies or extended headers.
    #[arg(long = "no-sr", visible_alias = "no-structured-replies")]
    pub no_sr: bool,

    /// Do not advertise multi-conn.
    #[arg(long = "no-mc", visible_alias = "no-meta-contexts")]
    pub no_mc: bool,

    /// Seconds a client may take to finish the handshake (0: no limit).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10,
        conflicts_with = "timeout"
    )]
    pub handshake_timeout: u64,

    /// As nbdkit's: how long a client may take to finish the handshake,
    /// TLS included (1.5, 500ms, 2s; 0: no limit).
    #[arg(long, visible_alias = "time-out", value_name = "DELAY", value_parser = delay)]
    pub timeout: Option<std::time::Duration>,

    /// TLS policy: off, on (also serve plain clients) or require. Giving
    /// --tls-psk or --tls-certificates without --tls means require.
    #[arg(long, value_name = "off|on|require", value_parser = ["off", "on", "require"])]
    pub tls: Option<String>,

    /// PSK file in psktool's username:hexkey format, or a directory holding
    /// it as keys.psk; read again for every PSK handshake.
    #[arg(long, value_name = "FILE|DIR")]
    pub tls_psk: Option<PathBuf>,

    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem and optionally ca-crl.pem.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,

    /// Require client certificates that chain to ca-cert.pem and are not revoked.
    #[arg(long)]
    pub tls_verify_peer: bool,

    /// GnuTLS priority string.
    #[arg(long, value_name = "STRING")]
    pub tls_priority: Option<String>,

    /// Run CMD with $uri, $nbd, $unixsocket, $port and $exportname set, then
    /// exit with its status.
    #[arg(long, value_name = "CMD")]
    pub run: Option<String>,

    /// Stack a filter (a short name or a path); repeat for more, the first
    /// given nearest to the client.
    #[arg(long = "filter", value_name = "NAME|PATH")]
    pub filters: Vec<String>,

    /// Serve the exports of this TOML file (see nbdhost.toml(5)); the
    /// command line overrides its [server] settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the --config file (loading and configuring every layer),
    /// print the resolved configuration with secrets masked, and exit.
    #[arg(long, requires = "config")]
    pub check: bool,

    /// Print build and path settings, then exit.
    #[arg(long)]
    pub dump_config: bool,

    /// Print the plugin's details, then exit.
    #[arg(long)]
    pub dump_plugin: bool,

    /// Print this help; with a plugin, its parameters and the filters'
    /// too.
    #[arg(short = 'h', long)]
    pub help: bool,

    /// Print the version; with a plugin, its version and the filters'
    /// too (loading them, so a missing one is an error).
    #[arg(short = 'V', long)]
    pub version: bool,

    /// Print every short option, one per line.
    #[arg(long)]
    pub short_options: bool,

    /// Print every long option, one per line.
    #[arg(long)]
    pub long_options: bool,

    /// Plugin: a short name (file, memory, or one of nbdkit's) or a path
    /// to a shared object.
    #[arg(
        value_name = "PLUGIN",
        required_unless_present_any = ["dump_config", "help", "version", "short_options", "long_options", "config"],
        conflicts_with = "config"
    )]
    pub plugin: Option<String>,

    /// Plugin parameters: key=value, or a bare value for the plugin's main key.
    #[arg(value_name = "PARAMS")]
    pub params: Vec<String>,
}

/// A delay as nbdkit writes one: seconds with an optional fraction, or a
/// number followed by `s`, `ms`, `us` or `ns`.
fn delay(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, unit) = [("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|&(suffix, unit)| t.strip_suffix(suffix).map(|n| (n, unit)))
        .unwrap_or((t, 1.0));
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .and_then(|v| std::time::Duration::try_from_secs_f64(v * unit).ok())
        .ok_or_else(|| format!("'{s}' is not a delay (such as 30, 1.5 or 500ms)"))
}

/// A connection limit: 1 to a million.
fn connections(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a number from 1 to 1000000")),
    }
}

/// A count of threads: 1 to 1024.
fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a number from 1 to 1024")),
    }
}

impl CommandLine {
    /// The settings these options give, serving `exports`.
    pub fn settings(self, exports: Exports) -> Settings {
        Settings {
            action: self.action(),
            exports,
            listen: Listen {
                address: self.address(),
                family: if self.ipv4_only {
                    Family::V4
                } else if self.ipv6_only {
                    Family::V6
                } else {
                    Family::Any
                },
                keepalive: self.keepalive,
            },
            tls: Tls {
                setting: self.tls.as_deref().map(|t| match t {
                    "on" => TlsMode::On,
                    "require" => TlsMode::Require,
                    _ => TlsMode::Off,
                }),
                psk: self.tls_psk,
                certificates: self.tls_certificates,
                verify_peer: self.tls_verify_peer,
                priority: self.tls_priority,
            },
            protocol: Protocol {
                oldstyle: self.oldstyle,
                handshake_mask: self.mask_handshake,
                no_structured: self.no_sr,
                handshake_timeout: Some(
                    self.timeout
                        .unwrap_or(std::time::Duration::from_secs(self.handshake_timeout)),
                )
                .filter(|d| !d.is_zero()),
            },
            policy: ExportPolicy {
                readonly: self.readonly,
                no_multi_conn: self.no_mc,
            },
            limits: Limits {
                max_connections: self.max_connections,
                max_handshakes: self.max_handshakes,
                threads: self.threads,
                loops: self.loops,
            },
            process: Process {
                foreground: self.foreground,
                user: self.user,
                group: self.group,
                pidfile: self.pidfile,
                exit_with_parent: self.exit_with_parent,
            },
            announce: Announce {
                print_uri: self.print_uri,
                run: self.run,
                export_name: self.exportname.unwrap_or_default(),
            },
            logging: Logging {
                verbose: self.verbose,
                log: self.log,
                debug: self.debug,
            },
        }
    }

    /// What these options ask for. With `--config`, only `--dump-config`
    /// and `--check` are actions: the others are not looked at, and the
    /// file is served.
    fn action(&self) -> Action {
        if self.dump_config {
            Action::DumpConfig
        } else if self.config.is_some() {
            if self.check {
                Action::Check
            } else {
                Action::Serve
            }
        } else if self.short_options || self.long_options {
            Action::ListOptions {
                long: self.long_options,
            }
        } else if self.help {
            Action::Help
        } else if self.version {
            Action::Version
        } else if self.dump_plugin {
            Action::DumpPlugin
        } else {
            Action::Serve
        }
    }

    /// The address these options name.
    fn address(&self) -> Address {
        let port = self.port.unwrap_or(DEFAULT_PORT);
        match &self.unix {
            _ if self.single => Address::Stdio,
            Some(p) if p.as_os_str() == "-" => Address::PrivateUnix,
            Some(p) => Address::Unix(p.clone()),
            None if self.vsock => Address::Vsock(u32::from(port)),
            None if self.port.is_none() && self.ipaddr.is_none() => Address::Unnamed,
            None => Address::Tcp {
                ipaddr: self.ipaddr.clone(),
                port,
            },
        }
    }
}

/// An argument that is not in the form its option or place needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgumentError {
    /// `-D` without `PLUGIN.FLAG=`.
    DebugFlag(String),
    /// `-D`'s value is not a C `int`.
    DebugValue { flag: String, value: String },
    /// A bare parameter where only `key=value` can go.
    BareParameter(String),
}

impl std::fmt::Display for ArgumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgumentError::DebugFlag(d) => write!(f, "-D {d}: must have the format NAME.FLAG=N"),
            ArgumentError::DebugValue { flag, value } => {
                write!(f, "-D {flag}: {value} is not a number")
            }
            ArgumentError::BareParameter(p) => {
                write!(f, "expecting key=value on the command line but got: {p}")
            }
        }
    }
}

impl std::error::Error for ArgumentError {}

/// `-D layer.flag=N` settings as a map.
pub fn debug_flags(flags: &[String]) -> Result<BTreeMap<String, i32>, ArgumentError> {
    flags
        .iter()
        .map(|d| {
            let (k, v) = d
                .split_once('=')
                .filter(|(k, _)| {
                    // nbdkit's rule: a layer's name, a flag's and a value,
                    // none empty.
                    k.split_once('.')
                        .is_some_and(|(layer, flag)| !layer.is_empty() && !flag.is_empty())
                })
                .filter(|(_, v)| !v.is_empty())
                .ok_or_else(|| ArgumentError::DebugFlag(d.clone()))?;
            let n = c_int(v).ok_or_else(|| ArgumentError::DebugValue {
                flag: d.clone(),
                value: v.to_string(),
            })?;
            Ok((k.to_string(), n))
        })
        .collect()
}

/// An `int` as C reads one in base 0, as nbdkit reads `-D` values: a
/// sign, then `0x` for hexadecimal, a leading `0` for octal, or decimal.
fn c_int(s: &str) -> Option<i32> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (radix, digits) = match body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        Some(hex) => (16, hex),
        None if body.len() > 1 && body.starts_with('0') => (8, &body[1..]),
        None => (10, body),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let v = i64::from_str_radix(digits, radix).ok()?;
    i32::try_from(if negative { -v } else { v }).ok()
}

/// Whether `k` can be a parameter's key, as nbdkit decides it: a letter,
/// then letters, digits, `_`, `-` and `.`. Anything else before an `=`
/// makes the whole parameter a bare value (a path such as `./a=b.img`).
fn is_key(k: &str) -> bool {
    let mut c = k.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || "_-.".contains(ch))
}

/// Split parameters into `(key, value)` pairs, as nbdkit does: each bare
/// value goes to the plugin's magic key (a plugin such as split takes
/// several); without one, a bare first parameter is `script=` (how
/// language plugins such as python find theirs) and any later bare one is
/// an error.
pub fn plugin_params(
    params: &[String],
    magic: Option<&str>,
) -> Result<Vec<(String, String)>, ArgumentError> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) if is_key(k) => Ok((k.to_string(), v.to_string())),
            _ => match magic {
                Some(key) => Ok((key.to_string(), p.clone())),
                None if i == 0 => Ok(("script".to_string(), p.clone())),
                None => Err(ArgumentError::BareParameter(p.clone())),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings of `nbdhost ARGS memory`.
    fn settings(args: &[&str]) -> Settings {
        let mut v = vec!["nbdhost"];
        v.extend_from_slice(args);
        v.push("memory");
        CommandLine::try_parse_from(v)
            .unwrap()
            .settings(Exports::Plugin(None))
    }

    #[test]
    fn timeouts_take_nbdkit_delays() {
        use std::time::Duration;
        assert_eq!(delay("2"), Ok(Duration::from_secs(2)));
        assert_eq!(delay("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(delay("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(delay("3s"), Ok(Duration::from_secs(3)));
        assert!(delay("-1").is_err() && delay("soon").is_err());
        let limit = |v: &[&str]| settings(v).protocol.handshake_timeout;
        assert_eq!(limit(&[]), Some(Duration::from_secs(10)));
        assert_eq!(
            limit(&["--timeout=250ms"]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(limit(&["--timeout=0"]), None);
        assert_eq!(limit(&["--handshake-timeout=0"]), None);
    }

    #[test]
    fn debug_flag_values_read_as_c_integers() {
        for (text, want) in [
            ("42", Some(42)),
            ("0x2a", Some(42)),
            ("052", Some(42)),
            ("-1", Some(-1)),
            ("0", Some(0)),
            ("08", None),
            ("0x", None),
            ("1e3", None),
            ("4294967296", None),
        ] {
            assert_eq!(c_int(text), want, "{text}");
        }
    }

    #[test]
    fn without_a_magic_key_a_bare_first_parameter_is_the_script() {
        assert_eq!(
            plugin_params(&["s.py".into(), "k=v".into()], None).unwrap(),
            vec![("script".into(), "s.py".into()), ("k".into(), "v".into())]
        );
        let e = plugin_params(&["s.py".into(), "extra".into()], None).unwrap_err();
        assert_eq!(e, ArgumentError::BareParameter("extra".into()));
    }

    #[test]
    fn bare_value_goes_to_magic_key() {
        let p = plugin_params(&["disk.img".into(), "cache=none".into()], Some("file")).unwrap();
        assert_eq!(
            p,
            vec![
                ("file".into(), "disk.img".into()),
                ("cache".into(), "none".into())
            ]
        );
        assert!(plugin_params(&["k=v".into(), "x".into()], None).is_err());
        assert_eq!(
            plugin_params(&["a".into(), "b".into()], Some("k")).unwrap(),
            vec![("k".into(), "a".into()), ("k".into(), "b".into())]
        );
        let p = plugin_params(&["./dir/a=b.img".into()], Some("file")).unwrap();
        assert_eq!(p[0], ("file".into(), "./dir/a=b.img".into()));
    }

    #[test]
    fn cli_parses_nbdkit_style_lines() {
        let c = CommandLine::try_parse_from(["nbdhost", "-f", "-r", "-U", "-", "memory", "1G"])
            .unwrap();
        assert_eq!(c.plugin.as_deref(), Some("memory"));
        assert_eq!(c.params, vec!["1G"]);
        assert!(CommandLine::try_parse_from(["nbdhost", "-s", "-p", "1", "memory"]).is_err());
        assert!(CommandLine::try_parse_from(["nbdhost", "--dump-config"]).is_ok());
    }

    #[test]
    fn credentials_alone_require_tls() {
        use crate::protocol::handshake::TlsMode;
        let mode = |args: &[&str]| settings(args).tls.mode();
        assert_eq!(mode(&[]), TlsMode::Off);
        assert_eq!(mode(&["--tls-psk=k.psk"]), TlsMode::Require);
        assert_eq!(mode(&["--tls-certificates=/d"]), TlsMode::Require);
        assert_eq!(mode(&["--tls=on", "--tls-psk=k.psk"]), TlsMode::On);
        assert_eq!(mode(&["--tls=off", "--tls-psk=k.psk"]), TlsMode::Off);
        assert!(CommandLine::try_parse_from(["nbdhost", "--tls=maybe", "memory"]).is_err());
    }

    #[test]
    fn the_address_is_what_the_options_name_or_unnamed() {
        let address = |args: &[&str]| settings(args).listen.address;
        assert_eq!(address(&[]), Address::Unnamed);
        assert_eq!(address(&["--run", "true"]), Address::Unnamed);
        assert_eq!(address(&["-s"]), Address::Stdio);
        assert_eq!(address(&["-U", "-", "-p", "1"]), Address::PrivateUnix);
        assert_eq!(
            address(&["-U", "/s", "-p", "1"]),
            Address::Unix("/s".into())
        );
        assert_eq!(address(&["--vsock"]), Address::Vsock(10809));
        assert_eq!(address(&["--vsock", "-p", "7"]), Address::Vsock(7));
        assert_eq!(
            address(&["-i", "::1"]),
            Address::Tcp {
                ipaddr: Some("::1".into()),
                port: 10809
            }
        );
        assert_eq!(
            address(&["-p", "7"]),
            Address::Tcp {
                ipaddr: None,
                port: 7
            }
        );
    }

    #[test]
    fn dump_config_comes_before_check_and_help_before_version() {
        let action = |args: &[&str]| {
            let mut v = vec!["nbdhost"];
            v.extend_from_slice(args);
            CommandLine::try_parse_from(v).unwrap().action()
        };
        assert_eq!(action(&["--config=f"]), Action::Serve);
        assert_eq!(action(&["--config=f", "--check"]), Action::Check);
        assert_eq!(
            action(&["--config=f", "--check", "--dump-config"]),
            Action::DumpConfig
        );
        assert_eq!(action(&["--help", "--version", "memory"]), Action::Help);
        assert_eq!(
            action(&["--long-options", "--help"]),
            Action::ListOptions { long: true }
        );
        assert_eq!(action(&["--dump-plugin", "memory"]), Action::DumpPlugin);
    }
}
