//! Secrets given as parameters (`host->read_secret`): a password or key
//! given inline, in a file, on a descriptor, or typed at the terminal, in
//! nbdkit's forms so that its command lines carry over.
//!
//! The one `unsafe` here takes over the descriptor the user named: std
//! cannot know that nothing else owns it.

use std::io::{self, Read};
use std::os::fd::FromRawFd;

/// Why a secret could not be read. No variant holds the secret.
#[derive(Debug)]
pub enum SecretError {
    /// `-FD` without a descriptor number.
    NotADescriptor,
    /// `-FD` naming stdin, stdout or stderr.
    StandardDescriptor,
    /// The terminal could not be asked.
    Prompt(io::Error),
    File {
        path: String,
        source: io::Error,
    },
    Descriptor {
        fd: i32,
        source: io::Error,
    },
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretError::NotADescriptor => {
                f.write_str("secret '-FD' needs a file descriptor number")
            }
            SecretError::StandardDescriptor => {
                // nbdkit's words, which scripts written for it look for.
                f.write_str("cannot use password -FD for stdin, stdout or stderr")
            }
            SecretError::Prompt(e) => write!(f, "cannot read password from the terminal: {e}"),
            SecretError::File { path, source } => {
                write!(f, "cannot read secret from {path}: {source}")
            }
            SecretError::Descriptor { fd, source } => {
                write!(f, "cannot read secret from fd {fd}: {source}")
            }
        }
    }
}

impl std::error::Error for SecretError {}

/// Where a secret given as a parameter comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource<'a> {
    /// The value itself.
    Literal(&'a str),
    /// `+FILE`.
    File(&'a str),
    /// `-FD`: an open descriptor, above stderr.
    Fd(i32),
    /// `-`: ask at the terminal.
    Prompt,
}

impl<'a> SecretSource<'a> {
    /// Tell which form `value` has, without reading anything.
    pub fn parse(value: &'a str) -> Result<SecretSource<'a>, SecretError> {
        if value == "-" {
            return Ok(SecretSource::Prompt);
        }
        if let Some(path) = value.strip_prefix('+') {
            return Ok(SecretSource::File(path));
        }
        if let Some(fd) = value.strip_prefix('-') {
            let fd: i32 = fd.parse().map_err(|_| SecretError::NotADescriptor)?;
            if fd <= 2 {
                return Err(SecretError::StandardDescriptor);
            }
            return Ok(SecretSource::Fd(fd));
        }
        Ok(SecretSource::Literal(value))
    }
}

/// Read a secret: a literal, `+FILE`, `-FD`, or `-` to prompt. A single
/// trailing newline of a file or descriptor is dropped, as nbdkit does.
pub fn read_secret(value: &str) -> Result<Vec<u8>, SecretError> {
    let mut data = match SecretSource::parse(value)? {
        SecretSource::Literal(v) => return Ok(v.as_bytes().to_vec()),
        SecretSource::Prompt => rpassword::prompt_password("Password: ")
            .map_err(SecretError::Prompt)?
            .into_bytes(),
        SecretSource::File(path) => std::fs::read(path).map_err(|source| SecretError::File {
            path: path.to_string(),
            source,
        })?,
        SecretSource::Fd(fd) => {
            // SAFETY: the user named this descriptor on the command line for
            // us to read; we own it from here on and close it when done.
            let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut v = Vec::new();
            f.read_to_end(&mut v)
                .map_err(|source| SecretError::Descriptor { fd, source })?;
            v
        }
    };
    if data.last() == Some(&b'\n') {
        data.pop();
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_forms_are_told_apart_without_reading() {
        assert_eq!(
            SecretSource::parse("pw").ok(),
            Some(SecretSource::Literal("pw"))
        );
        assert_eq!(
            SecretSource::parse("+/k").ok(),
            Some(SecretSource::File("/k"))
        );
        assert_eq!(SecretSource::parse("-7").ok(), Some(SecretSource::Fd(7)));
        assert_eq!(SecretSource::parse("-").ok(), Some(SecretSource::Prompt));
        assert!(SecretSource::parse("-2").is_err());
        assert!(SecretSource::parse("-x").is_err());
    }

    #[test]
    fn literal_and_file_secrets() {
        assert_eq!(read_secret("abc").unwrap(), b"abc");
        let p = std::env::temp_dir().join(format!("nbdhost-secret-{}", std::process::id()));
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(
            read_secret(&format!("+{}", p.display())).unwrap(),
            b"s3cret"
        );
        std::fs::remove_file(&p).unwrap();
        let e = read_secret("+/nonexistent/x").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x"));
    }
}
