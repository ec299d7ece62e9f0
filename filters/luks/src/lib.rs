//! The luks filter: serve the decrypted contents of a LUKS1 or LUKS2 disk,
//! encrypting writes on their way down.
//!
//! The key is unlocked once, at start-up (from `header=FILE` in
//! `get_ready`, otherwise from the disk itself in `startup`), so a wrong
//! passphrase stops the server instead of failing each client, and the
//! costly key derivation is paid once. The passphrase is wiped as soon as
//! it has been used; only the expanded AES keys stay, and they are wiped
//! when the filter unloads.
//!
//! The LUKS formats themselves (headers, key derivation, keyslots and the
//! sector ciphers) are the `nbdhost-luks-crypto` crate's, which the qcow2
//! filter shares; this crate is the filter around them.

#![forbid(unsafe_code)]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};

use luks_crypto::header::{self, Header, ReadAt};
use luks_crypto::sector::{self, SectorCipher};
use luks_crypto::unlock;
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, BlockSize, Error, ExtentList, Filter, FilterHandle, Flags,
    Next, NextOpener, ReadRequest, Result, WriteRequest,
};
use zeroize::Zeroizing;

/// Largest piece a zero request is written in.
const ZERO_CHUNK: usize = 1 << 20;

/// Configuration, and the volume once unlocked.
#[derive(Default)]
pub struct Luks {
    /// Passphrase or key-file contents until the unlock consumes them.
    secret: Mutex<Option<Zeroizing<Vec<u8>>>>,
    keyslot: Option<u32>,
    header_file: Option<PathBuf>,
    volume: OnceLock<Arc<Volume>>,
}

/// An unlocked volume: the data cipher and where the data lives.
struct Volume {
    cipher: Box<dyn SectorCipher>,
    sector_size: u64,
    payload_offset: u64,
    payload_size: Option<u64>,
    /// dm-crypt's IV offset, in 512-byte sectors.
    iv_tweak: u64,
    /// The header that was unlocked and its offset, when it lives on the
    /// disk itself: each connection checks that its export carries it.
    header: Option<(u64, Vec<u8>)>,
    /// Held shared by aligned writes and exclusively by read-modify-write,
    /// so an unaligned write cannot resurrect the old contents of a sector
    /// that another write changed meanwhile.
    rmw: RwLock<()>,
    /// Aligned writes started asynchronously and not yet answered: they
    /// hold no lock while in flight, so a read-modify-write, once it holds
    /// `rmw` exclusively, waits for this to drain.
    in_flight: (Mutex<usize>, Condvar),
}

/// A configuration or header error, or one of the crypto crate's: all are
/// `EINVAL` to the server, with their message.
fn einval(msg: impl std::fmt::Display) -> Error {
    Error::new(libc::EINVAL, msg.to_string())
}

#[callbacks]
impl Filter for Luks {
    const NAME: &'static str = "luks";
    const DESCRIPTION: &'static str = "read and write LUKS1 and LUKS2 encrypted disks";
    const CONFIG_HELP: &'static str =
        "passphrase=<SECRET>  Passphrase: literal, +FILE, -FD or - to prompt.
key-file=<FILE>      Binary key file (as cryptsetup --key-file), instead.
keyslot=<N>          Try only this keyslot.
header=<FILE>        Detached LUKS header.";
    type Handle = Connection;

    fn startup(&self, next: &Next) -> Result<()> {
        self.unlock_from_disk(next)
    }

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
                let mut slot = self.secret.lock().unwrap();
                if slot.is_some() {
                    return Err(einval("give passphrase= or key-file= once"));
                }
                *slot = Some(secret);
            }
            "keyslot" => {
                self.keyslot = Some(
                    value
                        .parse()
                        .map_err(|_| einval(format!("keyslot={value}: not a keyslot number")))?,
                )
            }
            "header" => self.header_file = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.secret.lock().unwrap().is_none() {
            return Err(einval("passphrase= or key-file= is required"));
        }
        Ok(())
    }

    fn get_ready(&self) -> Result<()> {
        let Some(path) = &self.header_file else {
            return Ok(());
        };
        let file = std::fs::File::open(path)
            .map_err(|e| einval(format!("header {}: {e}", path.display())))?;
        let mut read = |buf: &mut [u8], off: u64| {
            file.read_exact_at(buf, off).map_err(|e| {
                std::io::Error::new(e.kind(), format!("header {}: {e}", path.display()))
            })
        };
        self.unlock(&mut read, false)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Connection> {
        let volume = self
            .volume
            .get()
            .ok_or_else(|| Error::new(libc::EIO, "the volume was not unlocked"))?
            .clone();
        next.open(readonly, export_name)?;
        Ok(Connection { volume })
    }
}

/// Read the layer below, for the header parser. Its error reads as the
/// layer's message, or the errno's when it gave none.
fn reader(next: &Next) -> impl FnMut(&mut [u8], u64) -> std::io::Result<()> + '_ {
    |buf: &mut [u8], off: u64| {
        next.pread(buf, off, Flags::empty())
            .map_err(std::io::Error::other)
    }
}

impl Luks {
    /// Unlock from the disk's own header, unless `header=FILE` did already.
    fn unlock_from_disk(&self, next: &Next) -> Result<()> {
        if self.volume.get().is_some() {
            return Ok(());
        }
        self.unlock(&mut reader(next), true)
    }

    /// Parse the header behind `read`, open a keyslot with the secret (which
    /// is wiped afterwards), and keep the volume.
    fn unlock(&self, read: &mut ReadAt, on_disk: bool) -> Result<()> {
        let header = header::read(read).map_err(einval)?;
        let secret = self
            .secret
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| einval("no passphrase"))?;
        let unlocked = unlock::unlock(&header, &secret, self.keyslot, read, &mut |m| {
            host::debug(m)
        })
        .map_err(einval)?;
        drop(secret);
        let Header {
            version,
            cipher,
            sector_size,
            payload_offset,
            payload_size,
            iv_tweak,
            raw,
            raw_at,
            ..
        } = header;
        host::debug(&format!(
            "LUKS{version} {cipher} with a {}-bit key from keyslot {}, {sector_size}-byte sectors, data at {payload_offset}",
            unlocked.key.len() * 8,
            unlocked.slot
        ));
        let volume = Volume {
            cipher: sector::new(&cipher, &unlocked.key).map_err(einval)?,
            sector_size: u64::from(sector_size),
            payload_offset,
            payload_size,
            iv_tweak,
            header: on_disk.then_some((raw_at, raw)),
            rmw: RwLock::new(()),
            in_flight: (Mutex::new(0), Condvar::new()),
        };
        self.volume
            .set(Arc::new(volume))
            .map_err(|_| einval("unlocked twice"))
    }
}

impl Volume {
    /// The whole sectors covering `len` bytes at `offset`.
    fn cover(&self, offset: u64, len: usize) -> (u64, u64) {
        let ss = self.sector_size;
        (offset / ss * ss, (offset + len as u64).div_ceil(ss) * ss)
    }

    /// IV number of the sector at data offset `offset`. dm-crypt counts in
    /// 512-byte units whatever the sector size (LUKS2 never activates with
    /// `iv_large_sectors`), so a 4096-byte sector advances the IV by 8.
    fn iv(&self, offset: u64) -> u64 {
        offset / 512 + self.iv_tweak
    }

    fn decrypt(&self, data: &mut [u8], offset: u64) {
        self.cipher
            .decrypt(data, self.sector_size as usize, self.iv(offset));
    }

    fn encrypt(&self, data: &mut [u8], offset: u64) {
        self.cipher
            .encrypt(data, self.sector_size as usize, self.iv(offset));
    }

    /// Read and decrypt whole sectors.
    fn read_sectors(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        next.pread(buf, self.payload_offset + offset, flags)?;
        self.decrypt(buf, offset);
        Ok(())
    }

    /// Wait until no aligned write is in flight.
    fn drain_writes(&self) {
        let (n, cond) = &self.in_flight;
        let mut n = n.lock().unwrap();
        while *n > 0 {
            n = cond.wait(n).unwrap();
        }
    }

    /// An aligned write leaves or enters flight.
    fn flying(&self, delta: isize) {
        let (n, cond) = &self.in_flight;
        let mut n = n.lock().unwrap();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            cond.notify_all();
        }
    }

    fn write(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let (start, end) = self.cover(offset, buf.len());
        if start == offset && end - start == buf.len() as u64 {
            let _shared = self.rmw.read().unwrap();
            let mut sectors = buf.to_vec();
            self.encrypt(&mut sectors, start);
            return next.pwrite(&sectors, self.payload_offset + start, flags);
        }
        let _exclusive = self.rmw.write().unwrap();
        self.drain_writes();
        let mut sectors = vec![0u8; (end - start) as usize];
        self.read_sectors(next, &mut sectors, start, Flags::empty())?;
        sectors[(offset - start) as usize..][..buf.len()].copy_from_slice(buf);
        self.encrypt(&mut sectors, start);
        next.pwrite(&sectors, self.payload_offset + start, flags)
    }
}

/// An aligned write in flight, counted while it lives: dropped with its
/// continuation, called or not, so the count never sticks.
struct Flying(Arc<Volume>);

impl Flying {
    fn new(v: Arc<Volume>) -> Flying {
        v.flying(1);
        Flying(v)
    }
}

impl Drop for Flying {
    fn drop(&mut self) {
        self.0.flying(-1);
    }
}

/// One connection: the shared volume over this connection's next layer.
pub struct Connection {
    volume: Arc<Volume>,
}

#[callbacks]
impl FilterHandle for Connection {
    fn get_size(&self, next: &Next) -> Result<u64> {
        let v = &self.volume;
        if let Some((at, unlocked)) = &v.header {
            let mut here = vec![0u8; unlocked.len()];
            next.pread(&mut here, *at, Flags::empty())?;
            if &here != unlocked {
                return Err(Error::new(
                    libc::EIO,
                    "this export's LUKS header is not the one unlocked at start-up",
                ));
            }
        }
        let size = next.get_size()?;
        let avail = size.checked_sub(v.payload_offset).ok_or_else(|| {
            Error::new(
                libc::EIO,
                format!("disk of {size} bytes ends before the encrypted data starts"),
            )
        })?;
        let data = match v.payload_size {
            Some(s) if s > avail => {
                return Err(Error::new(
                    libc::EIO,
                    format!("LUKS segment of {s} bytes does not fit in the disk"),
                ))
            }
            Some(s) => s,
            None => avail,
        };
        Ok(data / v.sector_size * v.sector_size)
    }

    fn block_size(&self, next: &Next) -> Result<Option<BlockSize>> {
        // Whole sectors avoid read-modify-write; say so to clients that care.
        let ss = self.volume.sector_size as u32;
        Ok(Some(match next.block_size()? {
            Some(b) => BlockSize {
                preferred: b.preferred.max(ss),
                ..b
            },
            None => BlockSize {
                minimum: 1,
                preferred: ss.max(4096),
                maximum: u32::MAX,
            },
        }))
    }

    fn can_trim(&self, _next: &Next) -> Result<bool> {
        // A hole below would read back as noise once decrypted.
        Ok(false)
    }
    fn can_zero(&self, next: &Next) -> Result<bool> {
        next.can_write()
    }
    fn can_fast_zero(&self, _next: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_extents(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let v = &self.volume;
        let (start, end) = v.cover(offset, buf.len());
        if start == offset && end - start == buf.len() as u64 {
            return v.read_sectors(next, buf, offset, flags);
        }
        let mut sectors = vec![0u8; (end - start) as usize];
        v.read_sectors(next, &mut sectors, start, flags)?;
        buf.copy_from_slice(&sectors[(offset - start) as usize..][..buf.len()]);
        Ok(())
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.volume.write(next, buf, offset, flags)
    }

    // On an asynchronous chain no thread waits for the layer below: a read
    // is decrypted, and a write answered, in a continuation on the
    // server's worker threads once the layer below has answered.
    fn async_pread(&self, next: &Next, mut req: ReadRequest) {
        let v = self.volume.clone();
        let offset = req.offset();
        let (start, end) = v.cover(offset, req.len());
        if start == offset && end - start == req.len() as u64 {
            req.set_offset(v.payload_offset + start);
            next.async_pread_then(req, move |_, mut req, r| {
                if r.is_ok() {
                    v.decrypt(req.buf(), start);
                }
                req.complete(r)
            });
            return;
        }
        let sectors = vec![0u8; (end - start) as usize];
        let below = v.payload_offset + start;
        let flags = req.flags();
        next.async_pread_owned(sectors, below, flags, move |_, mut sectors, r| {
            if r.is_ok() {
                v.decrypt(&mut sectors, start);
                let at = (offset - start) as usize;
                let n = req.len();
                req.buf().copy_from_slice(&sectors[at..][..n]);
            }
            req.complete(r)
        });
    }

    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        let v = self.volume.clone();
        let offset = req.offset();
        let (start, end) = v.cover(offset, req.len());
        if start != offset || end - start != req.len() as u64 {
            // A read-modify-write waits for the read, under the lock that
            // keeps other writes out: it runs here, synchronously.
            let r = v.write(next, req.buf(), offset, req.flags());
            return req.complete(r);
        }
        let flying = {
            let _shared = v.rmw.read().unwrap();
            Flying::new(v.clone())
        };
        let mut sectors = req.buf().to_vec();
        v.encrypt(&mut sectors, start);
        let (below, flags) = (v.payload_offset + start, req.flags());
        next.async_pwrite_owned(sectors, below, flags, move |_, _, r| {
            // Answered first, so the write is on the disk (as far as the
            // layer below says) before a waiting RMW reads it.
            req.complete(r);
            drop(flying);
        });
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(count as usize)];
        let mut done = 0u64;
        while done < count {
            let n = zeroes.len().min((count - done) as usize);
            self.volume
                .write(next, &zeroes[..n], offset + done, flags & Flags::FUA)?;
            done += n as u64;
        }
        Ok(())
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let v = &self.volume;
        let (start, end) = v.cover(offset, count as usize);
        next.cache(end - start, v.payload_offset + start, flags)
    }

    fn extents(
        &self,
        _next: &Next,
        count: u64,
        offset: u64,
        _flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        // Holes below are not zeroes above: everything is data.
        list.add(offset, count, 0)
    }
}

nbdhost_filter!(Luks);
