//! Random bytes from the operating system, for keys, serial numbers,
//! salts and temporary file names.

use crate::error::Error;

/// `N` bytes from the kernel's random source.
pub fn bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(b)
}
