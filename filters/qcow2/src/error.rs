//! What can go wrong with an image, as the engine reports it. The filter
//! turns each into an errno for the client and a message for the log.

use std::fmt;

/// An engine error.
#[derive(Debug)]
pub enum Error {
    /// The layer below (or a backing file) failed; its error is passed on
    /// unchanged, so a message it already logged is not overwritten.
    Below(nbdhost_plugin_api::Error),
    /// The image's metadata contradicts itself or the format.
    Corrupt(String),
    /// A valid image using something this filter does not do.
    Unsupported(String),
    /// A parameter, or the image with a parameter, makes no sense.
    Invalid(String),
    /// No room for a new cluster in the layer below, or past the format's
    /// limits.
    NoSpace(String),
    /// The image may not be written now (read-only open, corrupt bit,
    /// lazy refcounts left dirty).
    ReadOnly(String),
    /// Asked for a fast zero that would need data writes.
    NotFast,
}

/// An engine result.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno a client sees.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Below(e) => e.raw_errno(),
            Error::Corrupt(_) => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Invalid(_) => libc::EINVAL,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NotFast => libc::ENOTSUP,
        }
    }

    /// Shorthand for [`Error::Corrupt`].
    pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
        Error::Corrupt(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Below(e) => write!(f, "{e}"),
            Error::Corrupt(m) => write!(f, "corrupt image: {m}"),
            Error::Unsupported(m) | Error::Invalid(m) | Error::NoSpace(m) | Error::ReadOnly(m) => {
                f.write_str(m)
            }
            Error::NotFast => f.write_str("zeroing here needs data writes"),
        }
    }
}

impl std::error::Error for Error {}

impl From<nbdhost_plugin_api::Error> for Error {
    fn from(e: nbdhost_plugin_api::Error) -> Self {
        Error::Below(e)
    }
}

impl From<Error> for nbdhost_plugin_api::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Below(e) => e,
            Error::NotFast => nbdhost_plugin_api::Error::errno(libc::ENOTSUP),
            other => nbdhost_plugin_api::Error::new(other.errno(), format!("qcow2: {other}")),
        }
    }
}
