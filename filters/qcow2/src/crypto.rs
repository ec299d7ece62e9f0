//! Encrypted images (`encrypt.format=luks`): a LUKS header stored inside
//! the image (where the encryption header extension points), opened with
//! the LUKS code the luks filter uses, and guest data encrypted in
//! 512-byte sectors whose IVs count host sectors, as qcow2.txt says ("the
//! physical disk sector as the input tweak"). A cluster moved by copy on
//! write is therefore decrypted and encrypted again.

use luks_crypto::sector::SectorCipher;
use luks_crypto::{header, sector, unlock};

use crate::error::{Error, Result};
use crate::io::Io;

/// The encryption sector: qemu's LUKS in qcow2 is always 512 bytes.
pub const SECTOR: u64 = 512;

/// An unlocked image's data cipher.
pub struct Crypto {
    cipher: Box<dyn SectorCipher>,
}

impl Crypto {
    /// Open the LUKS header of `length` bytes at `offset` in the image
    /// behind `io` with `secret`; `log` hears which keyslot opened.
    pub fn unlock(
        io: &dyn Io,
        offset: u64,
        length: u64,
        secret: &[u8],
        log: &mut dyn FnMut(&str),
    ) -> Result<Crypto> {
        let mut read = |buf: &mut [u8], at: u64| -> std::io::Result<()> {
            if at + buf.len() as u64 > length {
                return Err(std::io::Error::other(format!(
                    "the LUKS header reads past its {length} bytes in the image"
                )));
            }
            io.read_at(buf, offset + at).map_err(std::io::Error::other)
        };
        let h = header::read(&mut read).map_err(|e| Error::Invalid(format!("LUKS header: {e}")))?;
        if u64::from(h.sector_size) != SECTOR {
            return Err(Error::Unsupported(format!(
                "a LUKS header with {}-byte sectors in a qcow2 image",
                h.sector_size
            )));
        }
        let unlocked = unlock::unlock(&h, secret, None, &mut read, log)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        log(&format!(
            "qcow2: LUKS{} {} with a {}-bit key from keyslot {}",
            h.version,
            h.cipher,
            unlocked.key.len() * 8,
            unlocked.slot
        ));
        let cipher =
            sector::new(&h.cipher, &unlocked.key).map_err(|e| Error::Unsupported(e.to_string()))?;
        Ok(Crypto { cipher })
    }

    fn check(data: &[u8], host: u64) -> Result<()> {
        if host % SECTOR != 0 || data.len() as u64 % SECTOR != 0 {
            return Err(Error::Invalid(format!(
                "{} bytes at {host}: encrypted images take whole 512-byte sectors",
                data.len()
            )));
        }
        Ok(())
    }

    /// Decrypt whole sectors read from host offset `host`.
    pub fn decrypt(&self, data: &mut [u8], host: u64) -> Result<()> {
        Self::check(data, host)?;
        self.cipher.decrypt(data, SECTOR as usize, host / SECTOR);
        Ok(())
    }

    /// Encrypt whole sectors to be written at host offset `host`.
    pub fn encrypt(&self, data: &mut [u8], host: u64) -> Result<()> {
        Self::check(data, host)?;
        self.cipher.encrypt(data, SECTOR as usize, host / SECTOR);
        Ok(())
    }
}
