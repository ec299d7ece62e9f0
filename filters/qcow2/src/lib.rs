//! The qcow2 filter: serve the guest disk of a qcow2 image that the layer
//! below holds (a file, a Ceph image, memory, a web server), reading and
//! writing it as qemu does, with its backing chain, compressed clusters,
//! subclusters, internal snapshots (copied on write) and LUKS encryption.
//!
//! The format lives in [`image`] (an engine over [`io::Io`], free of the
//! plugin ABI, so fuzzing and tests drive it directly); this file is the
//! filter around it. One image serves every connection to the export:
//! the first connection opens it (taking qemu's image locks on a local
//! file), later ones share it, and the last one to leave writes its
//! metadata back and lets it go, so a reload or a qemu process can take
//! it over. What does not change between connections (the key, the
//! backing chain) is opened once, at start-up, where a mistake stops the
//! server with a message.

#![forbid(unsafe_code)]

pub mod backing;
pub mod check;
pub mod compress;
pub mod crypto;
pub mod error;
pub mod header;
pub mod image;
pub mod io;
pub mod layout;
pub mod lock;
pub mod refcount;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nbdhost_plugin_api::host::LogLevel;
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, BlockSize, Error, ExportList, ExtentList, Filter,
    FilterHandle, Flags, Next, NextExports, NextOpener, Result, Support,
};
use zeroize::Zeroizing;

use crate::backing::{Backing, Chain, Format, Policy};
use crate::crypto::Crypto;
use crate::header::Encryption;
use crate::image::{Image, Options};
use crate::io::{Beneath, Io};
use crate::lock::{Access, ImageLock};

fn einval(msg: impl Into<String>) -> Error {
    Error::new(libc::EINVAL, msg)
}

/// The filter: configuration, what start-up opened, and the image while
/// connections use it.
#[derive(Default)]
pub struct Qcow2 {
    secret: Mutex<Option<Zeroizing<Vec<u8>>>>,
    policy: Policy,
    opts: Options,
    locking: Option<bool>,
    shared: Arc<Shared>,
}

/// What connections share.
#[derive(Default)]
struct Shared {
    /// The key and the backing chain, from start-up.
    fixed: Mutex<Option<Fixed>>,
    /// The open image and how many prepared connections use it.
    slot: Mutex<Slot>,
    locking: AtomicBool,
    opts: Mutex<Options>,
}

/// What start-up opens once for every activation of the image.
#[derive(Clone)]
struct Fixed {
    crypto: Option<Arc<Crypto>>,
    backing: Option<Arc<dyn Beneath>>,
    /// The backing name and format the header had then.
    named: (Option<PathBuf>, Option<String>),
}

#[derive(Default)]
struct Slot {
    active: Option<Arc<Active>>,
    users: usize,
}

/// The image while connections use it, with its locks.
struct Active {
    image: Image,
    lock: Mutex<Option<ImageLock>>,
}

/// The layer below as the engine's [`Io`].
struct Below<'a>(&'a Next);

impl Io for Below<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> error::Result<()> {
        Ok(self.0.pread(buf, offset, Flags::empty())?)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> error::Result<()> {
        let flags = if fua { Flags::FUA } else { Flags::empty() };
        Ok(self.0.pwrite(buf, offset, flags)?)
    }
    fn flush(&self) -> error::Result<()> {
        Ok(self.0.flush(Flags::empty())?)
    }
    fn zero(&self, len: u64, offset: u64) -> error::Result<()> {
        Ok(self.0.zero(len, offset, Flags::MAY_TRIM)?)
    }
    fn size(&self) -> error::Result<u64> {
        Ok(self.0.get_size()?)
    }
    fn holes(&self, offset: u64, len: u64) -> error::Result<Vec<(u64, u64, bool)>> {
        if !self.0.can_extents()? {
            return Ok(vec![(offset, len, false)]);
        }
        let end = offset + len;
        Ok(self
            .0
            .extents(len, offset, Flags::empty())?
            .into_iter()
            .filter(|&(o, l, _)| o < end && o + l > offset)
            .map(|(o, l, t)| {
                let (from, to) = (o.max(offset), (o + l).min(end));
                (
                    from,
                    to - from,
                    t & nbdhost_plugin_api::abi::EXTENT_ZERO != 0,
                )
            })
            .collect())
    }
}

/// The engine's error for the client and the log.
fn to_abi(e: error::Error) -> Error {
    e.into()
}

#[callbacks]
impl Filter for Qcow2 {
    const NAME: &'static str = "qcow2";
    const DESCRIPTION: &'static str = "read and write qcow2 images, with backing files";
    const CONFIG_HELP: &'static str =
        "passphrase=<SECRET>   Of an encrypted image: literal, +FILE, -FD or - to prompt.
key-file=<FILE>        Or the whole file as the key.
backing=on|off         off: no backing file; what it held reads as zeroes.
backing-file=<FILE>    Use FILE as the image's backing file.
backing-format=raw|qcow2   Its format (needed with backing-file=; else overrides the image's).
backing-dir=<DIR>      Open backing files only inside DIR.
l2-cache-size=<SIZE>   L2 tables kept in memory (default 32M).
refcount-cache-size=<SIZE>  Refcount blocks kept in memory (default 1M).
locking=on|off         qemu's image locks on a local file (default on).";
    type Handle = Connection;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "passphrase" | "key-file" => {
                let secret = if key == "passphrase" {
                    Zeroizing::new(host::read_secret(value)?.as_bytes().to_vec())
                } else {
                    Zeroizing::new(
                        std::fs::read(value)
                            .map_err(|e| einval(format!("key-file {value}: {e}")))?,
                    )
                };
                let mut slot = self.secret.lock().expect("secret lock");
                if slot.is_some() {
                    return Err(einval("give passphrase= or key-file= once"));
                }
                *slot = Some(secret);
            }
            "backing" => self.policy.ignore = !host::parse_bool(key, value)?,
            "backing-file" => {
                let p = std::path::absolute(value)
                    .map_err(|e| einval(format!("backing-file={value}: {e}")))?;
                self.policy.file = Some(p);
            }
            "backing-format" => {
                self.policy.format = Some(Format::parse(value).map_err(to_abi)?);
            }
            "backing-dir" => {
                let d = std::fs::canonicalize(value)
                    .map_err(|e| einval(format!("backing-dir={value}: {e}")))?;
                self.policy.dir = Some(d);
            }
            "l2-cache-size" => self.opts.l2_cache = host::parse_size(value)?,
            "refcount-cache-size" => self.opts.refcount_cache = host::parse_size(value)?,
            "locking" => self.locking = Some(host::parse_bool(key, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.policy.ignore && (self.policy.file.is_some() || self.policy.dir.is_some()) {
            return Err(einval(
                "backing=off cannot go with backing-file= or backing-dir=",
            ));
        }
        self.shared
            .locking
            .store(self.locking.unwrap_or(true), Ordering::Relaxed);
        *self.shared.opts.lock().expect("opts lock") = self.opts.clone();
        Ok(())
    }

    fn startup(&self, next: &Next) -> Result<()> {
        let io = Below(next);
        let local = next.local_file()?;
        let (h, _) = Image::read_header(&io).map_err(to_abi)?;
        let secret = self.secret.lock().expect("secret lock").take();
        let crypto = match (h.encryption, &secret) {
            // The secret may be a backing file's (checked below).
            (Encryption::None, _) => None,
            (Encryption::Luks { .. }, None) => return Err(einval(
                "the image is encrypted (encrypt.format=luks): passphrase= or key-file= is needed",
            )),
            (Encryption::Luks { offset, length }, Some(s)) => Some(Arc::new(
                Crypto::unlock(&io, offset, length, s, &mut |m| host::debug(m)).map_err(to_abi)?,
            )),
        };
        let mut chain = Chain {
            policy: &self.policy,
            opts: &self.opts,
            image_file: local.as_deref(),
            locking: self.locking.unwrap_or(true),
            secret: secret.as_deref().map(Vec::as_slice),
            log: &mut |m| host::debug(m),
            used_secret: false,
        };
        let backing = chain.open_top(&h).map_err(to_abi)?;
        if secret.is_some() && crypto.is_none() && !chain.used_secret {
            return Err(einval(
                "passphrase= was given, but neither the image nor its backing files are encrypted",
            ));
        }
        describe(&h, local.as_deref(), backing.as_ref());
        *self.shared.fixed.lock().expect("fixed lock") = Some(Fixed {
            crypto,
            backing: backing.map(|b| Arc::new(b) as Arc<dyn Beneath>),
            named: (h.backing_file.clone(), h.backing_format.clone()),
        });
        Ok(())
    }

    fn list_exports(
        &self,
        next: &NextExports,
        readonly: bool,
        is_tls: bool,
        exports: &mut ExportList,
    ) -> Result<()> {
        exports.add(&next.default_export(readonly, is_tls)?, None)
    }

    fn open(&self, next: &NextOpener, readonly: bool, _export_name: &str) -> Result<Connection> {
        // One image per filter, the one start-up read: every connection
        // opens the layer below's default export, whatever name it asked
        // for, or it would read another export's bytes through this
        // image's metadata.
        next.open(readonly, "")?;
        Ok(Connection {
            shared: self.shared.clone(),
            active: Mutex::new(None),
            writable: AtomicBool::new(false),
        })
    }
}

/// Log what was opened, and what the image's state means for writers.
fn describe(h: &header::Header, local: Option<&Path>, backing: Option<&Backing>) {
    let chain = match backing {
        Some(b) => format!(
            ", backing file of {} bytes ({})",
            b.size(),
            match b {
                Backing::Raw { .. } => "raw",
                Backing::Qcow2 { .. } => "qcow2",
            }
        ),
        None => String::new(),
    };
    host::debug(&format!(
        "qcow2: {} version {}, {}-byte clusters, {} bytes{}{}{}",
        local.map_or_else(|| "image".into(), |p| p.display().to_string()),
        h.version,
        h.cluster_size(),
        h.size,
        if h.extended_l2() { ", subclusters" } else { "" },
        if h.encryption != Encryption::None {
            ", encrypted"
        } else {
            ""
        },
        chain
    ));
    if h.corrupt() {
        host::log(
            LogLevel::Warning,
            "qcow2: qemu marked the image corrupt: it is served read-only",
        );
    }
    if h.dirty() {
        host::log(
            LogLevel::Warning,
            "qcow2: the image was not closed cleanly and its lazy refcounts are stale: \
             it is served read-only until `qemu-img check -r all` repairs it",
        );
    }
}

impl Shared {
    /// Join the image as a connection that may (`!readonly`) write,
    /// opening it if nobody has it open.
    fn join(&self, next: &Next, readonly: bool) -> error::Result<(Arc<Active>, bool)> {
        let io = Below(next);
        let mut slot = self.slot.lock().expect("slot lock");
        let active = match &slot.active {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(self.activate(next, &io)?);
                slot.active = Some(a.clone());
                a
            }
        };
        let mut writable = false;
        if !readonly && next.can_write()? {
            writable = match self.upgrade(&active, &io) {
                Ok(()) => true,
                Err(e @ error::Error::ReadOnly(_)) if !active.image.writable() => {
                    host::log(LogLevel::Warning, &format!("qcow2: serving read-only: {e}"));
                    false
                }
                Err(e) => {
                    if slot.users == 0 {
                        slot.active = None;
                    }
                    return Err(e);
                }
            };
        }
        slot.users += 1;
        Ok((active, writable))
    }

    /// Open the image for a first connection: lock it, read its metadata.
    fn activate(&self, next: &Next, io: &Below) -> error::Result<Active> {
        let fixed = self
            .fixed
            .lock()
            .expect("fixed lock")
            .clone()
            .ok_or_else(|| error::Error::Invalid("the filter did not start up".into()))?;
        let lock = match next.local_file()? {
            Some(path) if self.locking.load(Ordering::Relaxed) => {
                Some(ImageLock::take(&path, Access::Read)?)
            }
            _ => None,
        };
        let (h, first) = Image::read_header(io)?;
        if (h.backing_file.clone(), h.backing_format.clone()) != fixed.named {
            return Err(error::Error::Invalid(
                "the image names another backing file than at start-up: restart or reload the server"
                    .into(),
            ));
        }
        let mut opts = self.opts.lock().expect("opts lock").clone();
        opts.align = next
            .block_size()?
            .map_or(1, |b| u64::from(b.minimum.max(1)));
        opts.shared_flush = next.can_multi_conn()?;
        let image = Image::open(io, h, &first, opts, fixed.backing, fixed.crypto)?;
        Ok(Active {
            image,
            lock: Mutex::new(lock),
        })
    }

    /// Let the image be written (qemu's write lock first).
    fn upgrade(&self, active: &Active, io: &Below) -> error::Result<()> {
        if active.image.writable() {
            return Ok(());
        }
        // The image's own state first: a corrupt image needs no write lock.
        active.image.check_can_write()?;
        if let Some(lock) = active.lock.lock().expect("lock lock").as_mut() {
            lock.set(Access::Write)?;
        }
        active.image.make_writable(io)
    }

    /// A prepared connection is done: the last one writes the metadata
    /// back and closes the image (`io` is `None` when it cannot).
    fn leave(&self, io: Option<&Below>) -> error::Result<()> {
        let mut slot = self.slot.lock().expect("slot lock");
        slot.users -= 1;
        if slot.users > 0 {
            return Ok(());
        }
        let Some(active) = slot.active.take() else {
            return Ok(());
        };
        match io {
            Some(io) => active.image.flush(io),
            None if active.image.writable() => Err(error::Error::Invalid(
                "the last connection closed without finalize: metadata may be lost".into(),
            )),
            None => Ok(()),
        }
    }
}

/// One connection: the shared image, once prepared.
pub struct Connection {
    shared: Arc<Shared>,
    active: Mutex<Option<Arc<Active>>>,
    writable: AtomicBool,
}

impl Connection {
    fn image(&self) -> Result<Arc<Active>> {
        self.active
            .lock()
            .expect("active lock")
            .clone()
            .ok_or_else(|| Error::new(libc::EIO, "qcow2: the connection was not prepared"))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.active.get_mut().expect("active lock").take().is_some() {
            if let Err(e) = self.shared.leave(None) {
                host::log(LogLevel::Warning, &format!("qcow2: {e}"));
            }
        }
    }
}

#[callbacks]
impl FilterHandle for Connection {
    fn prepare(&self, next: &Next, readonly: bool) -> Result<()> {
        let (active, writable) = self.shared.join(next, readonly).map_err(to_abi)?;
        self.writable.store(writable, Ordering::Relaxed);
        *self.active.lock().expect("active lock") = Some(active);
        Ok(())
    }

    fn finalize(&self, next: &Next) -> Result<()> {
        if self.active.lock().expect("active lock").take().is_none() {
            return Ok(());
        }
        self.shared.leave(Some(&Below(next))).map_err(to_abi)
    }

    fn get_size(&self, _next: &Next) -> Result<u64> {
        Ok(self.image()?.image.size())
    }

    fn block_size(&self, next: &Next) -> Result<Option<BlockSize>> {
        let a = self.image()?;
        let below = next.block_size()?;
        let sector = if a.image.encrypted() {
            crypto::SECTOR as u32
        } else {
            1
        };
        let minimum = below.map_or(1, |b| b.minimum).max(sector);
        let cluster = a.image.geometry().cluster_size() as u32;
        Ok(Some(BlockSize {
            minimum,
            preferred: below
                .map_or(4096, |b| b.preferred)
                .max(minimum)
                .max(4096.min(cluster)),
            maximum: below.map_or(32 << 20, |b| b.maximum).max(minimum),
        }))
    }

    fn can_write(&self, _next: &Next) -> Result<bool> {
        Ok(self.writable.load(Ordering::Relaxed))
    }
    fn can_trim(&self, next: &Next) -> Result<bool> {
        self.can_write(next)
    }
    fn can_zero(&self, next: &Next) -> Result<bool> {
        self.can_write(next)
    }
    fn can_fast_zero(&self, next: &Next) -> Result<bool> {
        self.can_write(next)
    }
    fn can_fua(&self, next: &Next) -> Result<Support> {
        Ok(if next.can_flush()? {
            Support::Native
        } else {
            Support::None
        })
    }
    fn can_cache(&self, _next: &Next) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn can_extents(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }
    fn local_file(&self, _next: &Next) -> Result<Option<PathBuf>> {
        // The guest disk is not the file's bytes in place.
        Ok(None)
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.image()?
            .image
            .read(&Below(next), buf, offset)
            .map_err(to_abi)
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let fua = flags.contains(Flags::FUA);
        self.image()?
            .image
            .write(&Below(next), buf, offset, fua)
            .map_err(to_abi)
    }

    fn flush(&self, next: &Next, _flags: Flags) -> Result<()> {
        self.image()?.image.flush(&Below(next)).map_err(to_abi)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let fua = flags.contains(Flags::FUA);
        self.image()?
            .image
            .trim(&Below(next), offset, count, fua)
            .map_err(to_abi)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.image()?
            .image
            .zero(
                &Below(next),
                offset,
                count,
                flags.contains(Flags::MAY_TRIM),
                flags.contains(Flags::FAST_ZERO),
                flags.contains(Flags::FUA),
            )
            .map_err(to_abi)
    }

    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        let one = flags.contains(Flags::REQ_ONE);
        let runs = self
            .image()?
            .image
            .extents(&Below(next), offset, count, one)
            .map_err(to_abi)?;
        let mut at = offset;
        for (len, typ) in runs {
            list.add(at, len, typ)?;
            at += len;
        }
        Ok(())
    }
}

nbdhost_filter!(Qcow2);
