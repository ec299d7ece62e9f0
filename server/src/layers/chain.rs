//! Building the chain: finding plugins and filters by short name, loading
//! them, passing parameters down the stack, and stacking the filters on
//! the plugin.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbdhost_plugin_api::Error;

use super::backend::Backend;
use super::filter::Filter;
use super::foreign;
use super::load_error::LoadError;
use super::loader::{LayerInfo, Origin};
use super::plugin::Plugin;

/// Why a loaded chain could not be configured or stacked (why it could
/// not be loaded is a [`LoadError`]). A layer's own error
/// keeps its errno and message; the message is prefixed with the layer's
/// name when shown.
#[derive(Debug)]
pub enum ChainError {
    /// A layer refused a parameter, the end of configuration, `get_ready`
    /// or being stacked.
    Layer { layer: String, error: Error },
    /// A filter was given a parameter it does not take.
    UnknownParameter { filter: String, key: String },
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainError::Layer { layer, error } => write!(f, "{layer}: {error}"),
            ChainError::UnknownParameter { filter, key } => {
                write!(f, "{filter} takes no parameter '{key}'")
            }
        }
    }
}

impl std::error::Error for ChainError {}

/// Directories searched for plugins (`kind` = "plugin") or filters given
/// by short name: `$NBDHOST_PLUGINDIR` or `$NBDHOST_FILTERDIR` if set,
/// otherwise beside the executable, then the installed locations.
pub fn layer_dirs(kind: &str) -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os(format!("NBDHOST_{}DIR", kind.to_uppercase())) {
        return std::env::split_paths(&d).collect();
    }
    let mut dirs = Vec::new();
    let installed = PathBuf::from(crate::paths::layer_dir(kind));
    // Beside a binary run from its build tree or a staged install; not
    // beside the installed one, whose directory holds other programs.
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| *d != Path::new(&crate::paths::bindir()))
    {
        dirs.push(exe_dir.clone());
        dirs.push(exe_dir.join(format!("../lib/nbdhost/{kind}s")));
    }
    dirs.push(installed);
    dirs
}

/// A path is used as is; a short name is looked up as `lib<name><kind>.so`,
/// the name's hyphens dropped as Cargo drops them from a library's name
/// (`blocksize-policy` is `libblocksizepolicyfilter.so`).
pub fn resolve(arg: &str, kind: &'static str) -> Result<PathBuf, LoadError> {
    if is_path(arg) {
        return Ok(PathBuf::from(arg));
    }
    check_name(arg, kind)?;
    let file = format!("lib{}{kind}.so", arg.replace('-', ""));
    let dirs = layer_dirs(kind);
    match dirs.iter().map(|d| d.join(&file)).find(|p| p.exists()) {
        Some(p) => Ok(p),
        None => Err(LoadError::NotFound {
            kind,
            name: arg.to_string(),
            file,
            searched: dirs,
        }),
    }
}

fn is_path(arg: &str) -> bool {
    arg.contains('/') || arg.ends_with(".so")
}

fn check_name(arg: &str, kind: &'static str) -> Result<(), LoadError> {
    if arg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        Ok(())
    } else {
        Err(LoadError::BadName {
            kind,
            arg: arg.to_string(),
        })
    }
}

/// Where the plugin or filter `arg` (a short name or a path) comes from:
/// an nbdhost layer of that name or at that path; otherwise nbdkit's layer
/// of that name, or the nbdkit layer at that path, served by the adapter.
pub fn locate(arg: &str, kind: &'static str) -> Result<Origin, LoadError> {
    let adapted = |foreign: PathBuf| {
        // libnbdkitplugin.so, or libnbdkitfilter.so: nbdhost ships no
        // filter adapter, as nbdkit's filter ABI is tied to the exact
        // nbdkit release that built each filter; one installed beside the
        // filters is used.
        let adapter = resolve("nbdkit", kind).map_err(|e| {
            if kind == "filter" {
                LoadError::NbdkitFilter(foreign.clone())
            } else {
                LoadError::NoAdapter {
                    kind,
                    foreign: foreign.clone(),
                    error: Box::new(e),
                }
            }
        })?;
        Ok(Origin::Adapted { adapter, foreign })
    };
    match resolve(arg, kind) {
        Ok(path) if foreign::is_nbdkit(&path, kind) => adapted(path),
        Ok(path) => Ok(Origin::Native(path)),
        Err(e) if !is_path(arg) => match foreign::find(arg, kind) {
            Some(path) => adapted(path),
            None => Err(match foreign::nbdkit_dir(kind) {
                Some(d) => LoadError::NorInNbdkit {
                    error: Box::new(e),
                    name: arg.to_string(),
                    kind,
                    nbdkit_dir: d,
                },
                None => e,
            }),
        },
        Err(e) => Err(e),
    }
}

/// Prefix an error with the name of the layer that raised it.
fn named(layer: &str) -> impl Fn(Error) -> ChainError + '_ {
    move |error| ChainError::Layer {
        layer: layer.to_string(),
        error,
    }
}

/// A plugin and its filters, loaded but not yet configured.
pub struct Layers {
    plugin: Plugin,
    /// Nearest the client first.
    filters: Vec<Filter>,
}

impl Layers {
    /// Load the plugin and filters named on the command line.
    pub fn load(plugin: &str, filters: &[String]) -> Result<Layers, LoadError> {
        let plugin = Plugin::load(&locate(plugin, "plugin")?)?;
        let filters = filters
            .iter()
            .map(|f| Filter::load(&locate(f, "filter")?))
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(Layers { plugin, filters })
    }

    /// Load a configuration file's plugin and filters, saying which of
    /// them failed: `None` for the plugin, else the filter's index.
    pub fn load_each(
        plugin: &str,
        filters: &[String],
    ) -> Result<Layers, (Option<usize>, LoadError)> {
        let plugin = locate(plugin, "plugin")
            .and_then(|o| Plugin::load(&o))
            .map_err(|e| (None, e))?;
        let filters = filters
            .iter()
            .enumerate()
            .map(|(i, f)| {
                locate(f, "filter")
                    .and_then(|o| Filter::load(&o))
                    .map_err(|e| (Some(i), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Layers { plugin, filters })
    }

    /// Give the plugin one parameter.
    pub fn config_plugin(&self, key: &str, value: &str) -> Result<(), ChainError> {
        self.plugin
            .config(key, value)
            .map_err(named(&self.plugin.info().name))
    }

    /// Give filter `i` one parameter, which must be one it takes.
    pub fn config_filter(&self, i: usize, key: &str, value: &str) -> Result<(), ChainError> {
        let f = &self.filters[i];
        let name = &f.info().name;
        match f.config(key, value).map_err(named(name))? {
            true => Ok(()),
            false => Err(ChainError::UnknownParameter {
                filter: name.clone(),
                key: key.to_string(),
            }),
        }
    }

    /// The plugin's facts.
    pub fn plugin_info(&self) -> &LayerInfo {
        self.plugin.info()
    }

    /// Let the plugin print its own `--dump-plugin` lines.
    pub fn dump_plugin(&self) {
        self.plugin.dump_plugin();
    }

    /// Each filter's facts, nearest the client first.
    pub fn filter_infos(&self) -> impl Iterator<Item = &LayerInfo> {
        self.filters.iter().map(Filter::info)
    }

    /// Pass parameters down the stack: each filter, nearest the client
    /// first, takes the keys it knows; the plugin gets the rest.
    pub fn config(&self, params: Vec<(String, String)>) -> Result<(), ChainError> {
        let name = &self.plugin.info().name;
        for (k, v) in params {
            let mut taken = false;
            for f in &self.filters {
                if f.config(&k, &v).map_err(named(&f.info().name))? {
                    taken = true;
                    break;
                }
            }
            if !taken {
                self.plugin.config(&k, &v).map_err(named(name))?;
            }
        }
        Ok(())
    }

    /// Once [`Layers::config`] has passed every parameter: finish
    /// configuration, and stack the filters on the plugin.
    pub fn configure(self) -> Result<Arc<dyn Backend>, ChainError> {
        let Layers { plugin, filters } = self;
        let name = plugin.info().name.clone();
        for f in &filters {
            f.config_complete().map_err(named(&f.info().name))?;
        }
        plugin.config_complete().map_err(named(&name))?;
        plugin.get_ready().map_err(named(&name))?;
        for f in &filters {
            f.get_ready().map_err(named(&f.info().name))?;
        }
        let mut top: Arc<dyn Backend> = Arc::new(plugin);
        for f in filters.into_iter().rev() {
            let name = f.info().name.clone();
            top = f.stack(top).map_err(named(&name))?;
        }
        Ok(top)
    }
}
