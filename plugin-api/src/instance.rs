//! The one global state object of a plugin or filter: created at load,
//! written during configuration, then shared by every connection.
//!
//! A shared object holds exactly one plugin or one filter, so one static
//! per object is enough; it is typed at each use by the trampolines.

use std::any::Any;
use std::sync::{OnceLock, RwLock};

use crate::{Error, Result};

/// A lazily installed, lock-protected value of a type fixed at install.
pub(crate) struct Instance(OnceLock<RwLock<Box<dyn Any + Send + Sync>>>);

impl Instance {
    pub(crate) const fn new() -> Self {
        Instance(OnceLock::new())
    }

    /// Install the value; fails if one is installed already.
    pub(crate) fn install<T: Any + Send + Sync>(&self, value: T) -> Result<()> {
        self.0
            .set(RwLock::new(Box::new(value)))
            .map_err(|_| Error::new(libc::EINVAL, "loaded twice"))
    }

    /// Run `f` with shared access, as every connection does.
    pub(crate) fn with<T: Any, R>(&self, f: impl FnOnce(&T) -> Result<R>) -> Result<R> {
        let lock = self
            .0
            .get()
            .ok_or_else(|| Error::new(libc::EINVAL, "not loaded"))?;
        let guard = lock
            .read()
            .map_err(|_| Error::new(libc::EIO, "state poisoned"))?;
        f(guard.downcast_ref::<T>().expect("installed with this type"))
    }

    /// Run `f` with exclusive access, as configuration does.
    pub(crate) fn with_mut<T: Any, R>(&self, f: impl FnOnce(&mut T) -> Result<R>) -> Result<R> {
        let lock = self
            .0
            .get()
            .ok_or_else(|| Error::new(libc::EINVAL, "not loaded"))?;
        let mut guard = lock
            .write()
            .map_err(|_| Error::new(libc::EIO, "state poisoned"))?;
        f(guard.downcast_mut::<T>().expect("installed with this type"))
    }
}
