//! The LUKS header parsers. With the first byte even, the rest is a disk
//! whose start is parsed as is (LUKS1, or LUKS2 behind its checksum); odd,
//! the rest is LUKS2 JSON metadata, wrapped in a binary header with a
//! correct checksum so that the parser behind the checksum sees it.
//!
//! Checked: an error or a header, never a panic, and no read outside the
//! disk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use luks_crypto::header;
use luks_crypto::kdf::Hash;

/// Binary header size and the header area of the wrapped LUKS2 disk.
const BINARY: usize = 4096;
const AREA: usize = 16384;

/// Two LUKS2 header copies around `json`, checksummed with SHA-256.
fn luks2_disk(json: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; AREA * 2];
    for (at, magic) in [(0usize, b"LUKS\xba\xbe"), (AREA, b"SKUL\xba\xbe")] {
        let h = &mut d[at..at + AREA];
        h[..6].copy_from_slice(magic);
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        h[8..16].copy_from_slice(&(AREA as u64).to_be_bytes());
        h[16..24].copy_from_slice(&1u64.to_be_bytes());
        h[72..78].copy_from_slice(b"sha256");
        h[256..264].copy_from_slice(&(at as u64).to_be_bytes());
        let n = json.len().min(AREA - BINARY);
        h[BINARY..BINARY + n].copy_from_slice(&json[..n]);
        let sum = Hash::Sha256.digest(&[h]);
        h[448..480].copy_from_slice(&sum);
    }
    d
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let disk = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        luks2_disk(rest)
    };
    let mut read = |buf: &mut [u8], at: u64| -> std::io::Result<()> {
        let start = usize::try_from(at).map_err(|_| std::io::Error::other("offset"))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| std::io::Error::other("length"))?;
        let src = disk
            .get(start..end)
            .ok_or_else(|| std::io::Error::other("beyond the disk"))?;
        buf.copy_from_slice(src);
        Ok(())
    };
    if let Ok(h) = header::read(&mut read) {
        assert!(h.version == 1 || h.version == 2);
        assert!(h.key_bytes > 0);
    }
});
