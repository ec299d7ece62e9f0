//! The one global state object of a plugin or filter: created at load,
//! written during configuration, shared by every connection, and dropped
//! at unload so that whatever it holds (files, memory) is released before
//! the shared object goes away.
//!
//! A shared object holds exactly one plugin or one filter, so one static
//! per object is enough; it is typed at each use by the trampolines.

use std::any::Any;
use std::sync::RwLock;

use crate::{Error, Result};

type State = Box<dyn Any + Send + Sync>;

/// A lazily installed, lock-protected value of a type fixed at install.
pub(crate) struct Instance(RwLock<Option<State>>);

impl Instance {
    pub(crate) const fn new() -> Self {
        Instance(RwLock::new(None))
    }

    /// Install the value; fails if one is installed already.
    pub(crate) fn install<T: Any + Send + Sync>(&self, value: T) -> Result<()> {
        let mut slot = self
            .0
            .write()
            .map_err(|_| Error::new(libc::EIO, "state poisoned"))?;
        if slot.is_some() {
            return Err(Error::new(libc::EINVAL, "loaded twice"));
        }
        *slot = Some(Box::new(value));
        Ok(())
    }

    /// Run `f` with shared access, as every connection does.
    pub(crate) fn with<T: Any, R>(&self, f: impl FnOnce(&T) -> Result<R>) -> Result<R> {
        let guard = self
            .0
            .read()
            .map_err(|_| Error::new(libc::EIO, "state poisoned"))?;
        let state = guard
            .as_ref()
            .ok_or_else(|| Error::new(libc::EINVAL, "not loaded"))?;
        f(state.downcast_ref::<T>().expect("installed with this type"))
    }

    /// Run `f` with exclusive access, as configuration does.
    pub(crate) fn with_mut<T: Any, R>(&self, f: impl FnOnce(&mut T) -> Result<R>) -> Result<R> {
        let mut guard = self
            .0
            .write()
            .map_err(|_| Error::new(libc::EIO, "state poisoned"))?;
        let state = guard
            .as_mut()
            .ok_or_else(|| Error::new(libc::EINVAL, "not loaded"))?;
        f(state.downcast_mut::<T>().expect("installed with this type"))
    }

    /// Drop the value, at unload.
    pub(crate) fn remove(&self) {
        let state = self.0.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(state);
    }
}
