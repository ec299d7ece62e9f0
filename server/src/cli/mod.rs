//! The command line's edge: read the settings (`config`), set up logging,
//! do what they ask: print something about nbdhost, or build the exports
//! ([`crate::serving::build`]) and serve them ([`start`]).

mod captive;
mod captive_psk;
mod dump;
mod error;
mod logging;
mod process;
mod run;
mod start;

use std::sync::Arc;

use crate::config::command_line::plugin_params;
use crate::config::{self, Action, Settings};
use crate::layers::chain::Layers;
use crate::layers::foreign;
use crate::layers::host::debug_flags::{self, set_debug_flags};
use crate::layers::host::stdio::set_stdio_safe;
use crate::serving::build::{Exports, FileExports};
use crate::serving::chain::Chain;
use captive_psk::CaptivePsk;
use error::CliError;

/// Run nbdhost with the process's arguments; returns the exit status.
pub fn main() -> i32 {
    process::default_sigpipe();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let settings = match Settings::from_args(&argv, credentials.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbdhost: error: {e}");
            return 1;
        }
    };
    let explicit_log = match settings
        .logging
        .log
        .as_deref()
        .map(logging::Destination::parse)
        .transpose()
    {
        Ok(d) => d.flatten(),
        Err(e) => {
            eprintln!("nbdhost: error: {e}");
            return 1;
        }
    };
    logging::init(
        settings.logging.verbose,
        explicit_log.unwrap_or(logging::Destination::Stderr),
    );
    match act(settings, explicit_log) {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e}");
            1
        }
    }
}

/// Do what `settings` ask; returns the exit status.
fn act(
    mut settings: Settings,
    explicit_log: Option<logging::Destination>,
) -> Result<i32, CliError> {
    match settings.action {
        Action::DumpConfig => {
            dump::print(&dump::config());
            return Ok(0);
        }
        Action::ListOptions { long } => {
            dump::print(&dump::options(long));
            return Ok(0);
        }
        _ => {}
    }
    // Before the exports are built: a file's exports take TLS as on when
    // the server has credentials.
    let captive = if CaptivePsk::wanted(&settings) {
        let owner = settings.process.user.as_deref().map(process::uid_of);
        let psk = CaptivePsk::create(owner.transpose()?)?;
        log::info!("--run: TLS with a one-time PSK, {}", psk.file().display());
        settings.tls.psk = Some(psk.file());
        Some(psk)
    } else {
        None
    };
    let settings = &settings;
    set_debug_flags(settings.debug_flags()?);
    set_stdio_safe(!settings.stdio());
    let exports = match &settings.exports {
        config::Exports::Plugin(plugin) => match plugin_chain(settings, plugin.as_ref())? {
            Some(chain) => Exports::Plugin {
                chain,
                tls: settings.tls.mode(),
            },
            None => return Ok(0),
        },
        config::Exports::File(file) => {
            let built = FileExports::build(file, settings)?;
            set_stdio_safe(false);
            if settings.action == Action::Check {
                let user: Vec<String> = std::env::args().skip(1).collect();
                let all: Vec<String> = file.args.iter().cloned().chain(user).collect();
                dump::print(&dump::check(file, &all, &built));
                return Ok(0);
            }
            log::info!(
                "{}: {} export(s){}",
                file.source.path.display(),
                built.exports.len(),
                built
                    .default
                    .as_ref()
                    .map_or(String::new(), |d| format!(", default '{d}'"))
            );
            debug_flags::warn_unused();
            Exports::File(built)
        }
    };
    let code = start::start(settings, exports, explicit_log);
    // The key goes only once the command and the server are done with it.
    drop(captive);
    code
}

/// The command line's plugin with its filters, loaded and configured; or
/// `None` once `--help`, `--version` or `--dump-plugin` has printed what
/// it asks for.
fn plugin_chain(
    settings: &Settings,
    plugin: Option<&config::Plugin>,
) -> Result<Option<Arc<Chain>>, CliError> {
    let Some(plugin) = plugin else {
        // clap demands a plugin unless one of these was given.
        dump::print(&if settings.action == Action::Help {
            dump::usage()
        } else {
            dump::version()
        });
        return Ok(None);
    };
    let mut params = plugin.params.clone();
    let layers = match Layers::load(&plugin.name, &plugin.filters) {
        Ok(l) => l,
        // nbdkit runs a script plugin installed under a short name with
        // its language plugin; so does nbdhost.
        Err(e) => match foreign::script(&plugin.name) {
            Some((language, script)) => {
                log::debug!(
                    "{} is the {language} script {}",
                    plugin.name,
                    script.display()
                );
                params.insert(0, script.display().to_string());
                Layers::load(&language, &plugin.filters)?
            }
            None => return Err(e.into()),
        },
    };
    debug_flags::loaded(
        layers
            .filter_infos()
            .chain([layers.plugin_info()])
            .map(|i| i.name.as_str()),
    );
    // As nbdkit, as soon as the layers are loaded: a configuration that
    // then fails (a missing parameter) still shows the misspelt flag.
    debug_flags::warn_unused();
    // As nbdkit: loaded, so that a missing layer is an error, but not
    // configured.
    if settings.action == Action::Help {
        let mut text = dump::usage();
        for i in layers.filter_infos().chain([layers.plugin_info()]) {
            text.push('\n');
            text.push_str(&dump::layer_help(i));
        }
        dump::print(&text);
        return Ok(None);
    }
    if settings.action == Action::Version {
        let mut text = dump::version();
        for i in layers.filter_infos().chain([layers.plugin_info()]) {
            text.push_str(&format!("{} {}\n", i.name, i.version));
        }
        dump::print(&text);
        return Ok(None);
    }
    let magic = layers.plugin_info().magic_config_key.clone();
    // Before --dump-plugin too, as nbdkit does: a language plugin only
    // knows what it can say once its script is loaded.
    layers.config(plugin_params(&params, magic.as_deref())?)?;
    if settings.action == Action::DumpPlugin {
        // The plugin's own lines follow ours on the same stdout.
        dump::print(&dump::layer(layers.plugin_info()));
        layers.dump_plugin();
        for f in layers.filter_infos() {
            dump::print(&format!("\nfilter:\n{}", dump::layer(f)));
        }
        return Ok(None);
    }
    let backend = layers.configure()?;
    // nbdkit's rule: stdin and stdout are the plugin's only while it is
    // being configured.
    set_stdio_safe(false);
    Ok(Some(Arc::new(Chain::new(backend, settings.policy))))
}
