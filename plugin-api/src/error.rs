//! The error a plugin callback returns: an errno for the client and an
//! optional message for the log.

use std::fmt;

/// A failed plugin call. The errno is what the client sees (mapped to the
/// nearest NBD error); the message goes to the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    errno: i32,
    message: Option<String>,
    /// Already recorded by the layer below; returning it unchanged must not
    /// overwrite that record (and its message).
    propagated: bool,
}

/// Result of a plugin callback.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error with an errno and a message for the log.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: Some(message.into()),
            propagated: false,
        }
    }

    /// An error with only an errno, for expected failures that need no
    /// log line (for example `ENOTSUP` from a zero callback).
    pub fn errno(errno: i32) -> Self {
        Error {
            errno,
            message: None,
            propagated: false,
        }
    }

    /// The error the next layer recorded (for filters).
    pub(crate) fn from_next(errno: i32) -> Self {
        Error {
            errno: if errno == 0 { libc::EIO } else { errno },
            message: None,
            propagated: true,
        }
    }

    /// Whether the layer below already recorded this error.
    pub(crate) fn is_propagated(&self) -> bool {
        self.propagated
    }

    /// The errno value.
    pub fn raw_errno(&self) -> i32 {
        self.errno
    }

    /// The log message, if any.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(m) => f.write_str(m),
            None => write!(f, "{}", std::io::Error::from_raw_os_error(self.errno)),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(e.to_string()),
            propagated: false,
        }
    }
}
