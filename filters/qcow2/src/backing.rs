//! Backing files: the images an image's unallocated clusters read
//! through to, opened read-only as local files and locked as qemu locks
//! them.
//!
//! Images are untrusted input, so a backing file is opened only as the
//! policy allows: its format is the one recorded in the image that names
//! it (never probed, so a raw file cannot pass itself off as qcow2);
//! `json:` and protocol-prefixed names are refused; a relative name
//! resolves against the directory of the image that names it, as qemu
//! resolves it; over a layer that is not a local file, only a directory or
//! a file given explicitly is used; and with a directory given, nothing
//! outside it (after following links) is opened.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::crypto::Crypto;
use crate::error::{Error, Result};
use crate::header::{Encryption, Header};
use crate::image::{Image, Options};
use crate::io::{Beneath, FileIo, Io};
use crate::lock::{Access, ImageLock};

/// Backing chains deeper than this are refused (qemu has no fixed limit;
/// this bounds what a chain of untrusted images can make the server open).
pub const MAX_DEPTH: usize = 64;

/// A backing file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The format a `backing_fmt` string names.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::Unsupported(format!(
                "backing files of format '{other}' (raw and qcow2 are served)"
            ))),
        }
    }
}

/// Where backing files may come from.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Serve without backing files: what they would hold reads as zeroes.
    pub ignore: bool,
    /// The top image's backing file, instead of the one it names.
    pub file: Option<PathBuf>,
    /// Its format, when `file` is given or the image records none.
    pub format: Option<Format>,
    /// Every backing file must lie in this directory (canonical).
    pub dir: Option<PathBuf>,
}

/// One backing file, open.
pub enum Backing {
    /// A raw file: its bytes are the disk.
    Raw {
        io: FileIo,
        size: u64,
        _lock: Option<ImageLock>,
    },
    /// A qcow2 image, with its own chain.
    Qcow2 {
        image: Box<Image>,
        io: FileIo,
        _lock: Option<ImageLock>,
    },
}

/// What opening the top image's chain needs to know.
pub struct Chain<'a> {
    pub policy: &'a Policy,
    pub opts: &'a Options,
    /// Where the top image lives, if it is a local file.
    pub image_file: Option<&'a Path>,
    /// Take qemu's read locks on the backing files.
    pub locking: bool,
    /// The secret of encrypted backing files (the top image's), borrowed
    /// so that no copy outlives the one start-up wipes.
    pub secret: Option<&'a [u8]>,
    /// Hears the keyslot messages of encrypted backing files.
    pub log: &'a mut dyn FnMut(&str),
    /// Set once a backing file was unlocked with the policy's secret.
    pub used_secret: bool,
}

/// Whether a backing name names a protocol (qemu's rule: a colon before
/// any slash), or is a `json:` description.
fn has_protocol(name: &[u8]) -> bool {
    let before_slash = name.split(|&b| b == b'/').next().unwrap_or_default();
    before_slash.contains(&b':')
}

impl Chain<'_> {
    /// The backing file of the top image `h`, if it uses one.
    pub fn open_top(&mut self, h: &Header) -> Result<Option<Backing>> {
        if self.policy.ignore {
            return Ok(None);
        }
        let (name, recorded) = match &self.policy.file {
            Some(f) => (f.clone(), None),
            None => match &h.backing_file {
                Some(n) => (n.clone(), h.backing_format.as_deref()),
                None => return Ok(None),
            },
        };
        let format = self.format(&name, recorded, true)?;
        if self.policy.file.is_none() && self.image_file.is_none() && self.policy.dir.is_none() {
            return Err(Error::Invalid(format!(
                "the image names the backing file {}, but it is not a local file: \
                 backing files are read only with backing-dir= or backing-file= \
                 (or served as zeroes with backing=off)",
                name.display()
            )));
        }
        let base = self
            .image_file
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let mut seen = HashSet::new();
        if let Some(f) = self.image_file.and_then(|f| f.canonicalize().ok()) {
            seen.insert(f);
        }
        let explicit = self.policy.file.is_some();
        self.open(&name, format, base.as_deref(), explicit, 1, &mut seen)
            .map(Some)
    }

    /// The format to open `name` as: the one recorded, or the one given.
    fn format(&self, name: &Path, recorded: Option<&str>, top: bool) -> Result<Format> {
        match (recorded, top.then_some(self.policy.format).flatten()) {
            (_, Some(given)) => Ok(given),
            (Some(r), None) => Format::parse(r),
            (None, None) => Err(Error::Invalid(format!(
                "the backing file {} has no recorded format, and formats are never probed: \
                 record it with qemu-img rebase -u -F raw|qcow2 -b {} IMAGE, \
                 or give backing-format=",
                name.display(),
                name.display()
            ))),
        }
    }

    /// Where `name`, named by an image in `base` (the directory of the
    /// image naming it, if local), is; checked against the policy.
    fn resolve(&self, name: &Path, base: Option<&Path>, explicit: bool) -> Result<PathBuf> {
        let bytes = name.as_os_str().as_bytes();
        if !explicit && (bytes.starts_with(b"json:") || has_protocol(bytes)) {
            return Err(Error::Invalid(format!(
                "the backing file name '{}' is a protocol or json: description; \
                 only local file names are followed",
                name.display()
            )));
        }
        let path = if name.is_absolute() {
            name.to_path_buf()
        } else {
            let dir = base.or(self.policy.dir.as_deref()).ok_or_else(|| {
                Error::Invalid(format!(
                    "the relative backing file name {} has no directory to resolve against",
                    name.display()
                ))
            })?;
            dir.join(name)
        };
        let real = path
            .canonicalize()
            .map_err(|e| Error::Invalid(format!("backing file {}: {e}", path.display())))?;
        if let Some(dir) = &self.policy.dir {
            if !real.starts_with(dir) {
                return Err(Error::Invalid(format!(
                    "backing file {} is outside backing-dir {}",
                    real.display(),
                    dir.display()
                )));
            }
        }
        Ok(real)
    }

    fn open(
        &mut self,
        name: &Path,
        format: Format,
        base: Option<&Path>,
        explicit: bool,
        depth: usize,
        seen: &mut HashSet<PathBuf>,
    ) -> Result<Backing> {
        if depth > MAX_DEPTH {
            return Err(Error::Unsupported(format!(
                "the backing chain is deeper than {MAX_DEPTH} images"
            )));
        }
        let path = self.resolve(name, base, explicit)?;
        if !seen.insert(path.clone()) {
            return Err(Error::corrupt(format!(
                "the backing chain loops back to {}",
                path.display()
            )));
        }
        let lock = if self.locking {
            Some(ImageLock::take(&path, Access::Read)?)
        } else {
            None
        };
        let file = File::open(&path)
            .map_err(|e| Error::Invalid(format!("backing file {}: {e}", path.display())))?;
        let io = FileIo::new(file, path.display().to_string());
        match format {
            Format::Raw => {
                let size = io.size()?;
                Ok(Backing::Raw {
                    io,
                    size,
                    _lock: lock,
                })
            }
            Format::Qcow2 => {
                let (h, first) = Image::read_header(&io)
                    .map_err(|e| Error::Invalid(format!("backing file {}: {e}", path.display())))?;
                let backing = match &h.backing_file {
                    Some(n) => {
                        let f = self.format(n, h.backing_format.as_deref(), false)?;
                        Some(self.open(n, f, path.parent(), false, depth + 1, seen)?)
                    }
                    None => None,
                };
                let crypto = match h.encryption {
                    Encryption::None => None,
                    Encryption::Luks { offset, length } => {
                        let secret = self.secret.ok_or_else(|| {
                            Error::Invalid(format!(
                                "backing file {} is encrypted and no passphrase was given",
                                path.display()
                            ))
                        })?;
                        let crypto = Crypto::unlock(&io, offset, length, secret, self.log)?;
                        self.used_secret = true;
                        Some(crypto)
                    }
                };
                let image = Image::open(
                    &io,
                    h,
                    &first,
                    self.opts.clone(),
                    backing.map(|b| std::sync::Arc::new(b) as std::sync::Arc<dyn Beneath>),
                    crypto.map(std::sync::Arc::new),
                )?;
                Ok(Backing::Qcow2 {
                    image: Box::new(image),
                    io,
                    _lock: lock,
                })
            }
        }
    }
}

impl Backing {
    /// The size of the disk the backing file holds.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2 { image, .. } => image.size(),
        }
    }
}

impl Beneath for Backing {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inside = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Raw { io, .. } => io.read_at(head, offset),
            Backing::Qcow2 { image, io, .. } => image.read(io, head, offset),
        }
    }

    /// As [`Image::extents`] gives it, past the end as holes.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        use crate::image::{HOLE, ZERO};
        let mut out = Vec::new();
        let end = offset + len;
        let inside_end = end.min(self.size());
        let mut at = offset;
        while at < inside_end {
            let runs = match self {
                Backing::Raw { io, .. } => io
                    .holes(at, inside_end - at)?
                    .into_iter()
                    .map(|(_, l, zero)| (l, if zero { HOLE | ZERO } else { 0 }))
                    .collect(),
                Backing::Qcow2 { image, io, .. } => {
                    image.extents(io, at, inside_end - at, false)?
                }
            };
            if runs.is_empty() {
                break;
            }
            for (l, f) in runs {
                let l = l.min(inside_end - at);
                out.push((l, f));
                at += l;
                if at >= inside_end {
                    break;
                }
            }
        }
        if at < end {
            out.push((end - at, HOLE | ZERO));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_are_those_with_a_colon_before_any_slash() {
        assert!(has_protocol(b"nbd://host/x"));
        assert!(has_protocol(b"json:{}"));
        assert!(has_protocol(b"file:base.img"));
        assert!(!has_protocol(b"./a:b"));
        assert!(!has_protocol(b"/var/lib/a:b.qcow2"));
        assert!(!has_protocol(b"base.qcow2"));
    }
}
