//! MBR (with extended partitions) and GPT parsing. The first byte picks the
//! partition asked for; the rest is the disk.
//!
//! Checked: an error or a partition inside the disk, never a panic, and
//! the parser never reads outside the disk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use partitionfilter::table::{self, Disk};

struct Bytes<'a>(&'a [u8]);

impl Disk for Bytes<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = offset as usize;
        let end = start + buf.len();
        assert!(
            offset.checked_add(buf.len() as u64).is_some_and(|e| e <= self.0.len() as u64),
            "read of {} at {offset} outside a disk of {}",
            buf.len(),
            self.0.len()
        );
        buf.copy_from_slice(&self.0[start..end]);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, disk)) = data.split_first() else {
        return;
    };
    let size = disk.len() as u64;
    if let Ok(p) = table::find(&Bytes(disk), size, u32::from(n % 130)) {
        assert!(p.length > 0);
        assert!(p.offset.checked_add(p.length).is_some_and(|e| e <= size));
    }
});
