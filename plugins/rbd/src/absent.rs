//! The plugin as built without librbd: it takes the same parameters (so
//! `--help` and `--dump-plugin` say what it would take) and refuses to
//! start, saying why. The description says so too, which is how the test
//! suite knows to skip its rbd tests.

use nbdhost_plugin_api::{callbacks, errno, Error, Flags, Handle, Plugin, Result};

use crate::config::{Config, HELP};

/// The plugin without its binding.
#[derive(Default)]
pub struct Rbd {
    config: Config,
}

#[callbacks]
impl Plugin for Rbd {
    const NAME: &'static str = "rbd";
    const DESCRIPTION: &'static str =
        "Ceph RBD images (built without librbd: install librbd-dev and rebuild)";
    const CONFIG_HELP: &'static str = HELP;
    const MAGIC_CONFIG_KEY: Option<&'static str> = Some("image");
    type Handle = Never;

    fn config(&mut self, key: &str, value: &str) -> Result<()> {
        self.config.set(key, value)
    }

    fn config_complete(&mut self) -> Result<()> {
        self.config.complete()?;
        Err(Error::new(
            errno::ENOTSUP,
            "this plugin was built without librbd: install librbd-dev \
             (librbd and librados) and rebuild nbdhost",
        ))
    }

    fn open(&self, _readonly: bool) -> Result<Never> {
        Err(Error::errno(errno::ENOTSUP))
    }
}

/// No connection is ever opened.
pub enum Never {}

#[callbacks]
impl Handle for Never {
    fn get_size(&self) -> Result<u64> {
        match *self {}
    }
    fn pread(&self, _buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        match *self {}
    }
}
