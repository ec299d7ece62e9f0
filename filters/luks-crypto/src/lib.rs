//! The LUKS code that is not a filter: reading LUKS1 and LUKS2 headers,
//! opening a keyslot with a passphrase, and the per-sector data ciphers.
//!
//! It is shared by the filters that read LUKS-encrypted data: `luks`
//! (a LUKS1 or LUKS2 disk) and `qcow2` (qcow2 images encrypted with a
//! LUKS header), so both accept the same headers and ciphers and refuse
//! the same things. It does no I/O of its own: the caller passes a
//! [`header::ReadAt`] that reads the header device.
//!
//! The steps, in order:
//!
//! 1. [`header::read`] parses the header into a [`header::Header`];
//! 2. [`unlock::unlock`] tries its keyslots with a passphrase and returns
//!    the volume key and the slot that opened;
//! 3. [`sector::new`] builds the [`sector::SectorCipher`] named by
//!    [`header::Header::cipher`] with that key, which encrypts and
//!    decrypts whole sectors in place.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod header;
pub mod kdf;
pub mod sector;
pub mod unlock;

/// `a ^= b`, byte by byte, over the shorter of the two.
fn xor(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}
