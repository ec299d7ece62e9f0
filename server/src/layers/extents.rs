//! The list behind `struct nbdhost_extents`, which plugins and filters
//! fill through `host->add_extent` and filters read back through
//! `host->extents_get`.

use nbdhost_plugin_api::{abi, Error, Result};

use crate::protocol::export::Extent;

/// Most extents one extents call may return; more would only bloat the
/// reply (the protocol lets the server stop early).
const MAX_EXTENTS: usize = 1 << 20;

/// Checks that a layer adds extents in order and without gaps, and merges
/// neighbours of one type.
pub struct ExtentCollector {
    next: u64,
    items: Vec<Extent>,
}

impl ExtentCollector {
    /// An empty list for a range starting at `start`.
    pub fn new(start: u64) -> Self {
        ExtentCollector {
            next: start,
            items: Vec::new(),
        }
    }

    /// The extents gathered so far.
    pub fn extents(&self) -> &[Extent] {
        &self.items
    }

    /// The extents gathered, by value.
    pub fn into_extents(self) -> Vec<Extent> {
        self.items
    }

    /// The list as the opaque pointer the ABI passes around.
    pub fn as_abi(&mut self) -> *mut abi::Extents {
        (self as *mut ExtentCollector).cast()
    }

    /// Append one extent, as `host->add_extent` does.
    pub fn add(&mut self, offset: u64, length: u64, typ: u32) -> Result<()> {
        let end = offset
            .checked_add(length)
            .ok_or_else(|| Error::new(libc::EINVAL, "extent overflows"))?;
        if end <= self.next {
            // Wholly before the request or already covered: ignore.
            return Ok(());
        }
        if offset > self.next {
            return Err(Error::new(
                libc::EINVAL,
                format!(
                    "extents must be contiguous: expected offset {}, got {offset}",
                    self.next
                ),
            ));
        }
        let flags = typ & (abi::EXTENT_HOLE | abi::EXTENT_ZERO);
        let full = self.items.len() >= MAX_EXTENTS;
        match self.items.last_mut() {
            Some(last) if last.flags == flags => last.length += end - self.next,
            _ if full => return Ok(()),
            _ => self.items.push(Extent {
                offset: self.next,
                length: end - self.next,
                flags,
            }),
        }
        self.next = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_clips_merges_and_rejects_gaps() {
        let mut c = ExtentCollector::new(100);
        c.add(0, 50, 0).unwrap();
        c.add(50, 100, 0).unwrap();
        c.add(150, 50, 0).unwrap();
        c.add(200, 10, 3).unwrap();
        assert_eq!(
            c.items,
            vec![
                Extent {
                    offset: 100,
                    length: 100,
                    flags: 0
                },
                Extent {
                    offset: 200,
                    length: 10,
                    flags: 3
                }
            ]
        );
        assert!(c.add(300, 1, 0).is_err());
    }
}
