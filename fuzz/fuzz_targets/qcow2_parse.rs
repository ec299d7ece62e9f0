//! The qcow2 header, its extensions, and the L1, L2, refcount and
//! snapshot tables, from an image given whole as the input (seeds: images
//! of every kind qemu-img makes, `fuzz/qcow2-seeds`). The header is read
//! with `Image::read_header`, the image checked with `check::check_header`
//! and opened with `Image::open`; then the start, the end and a range the
//! input picks are read, block status asked there, and, where the check
//! found nothing wrong and the image may be written, a write, a zero and a
//! trim are made and the image flushed twice.
//!
//! Checked, besides no panic and no read outside the image: a header that
//! parses has the limits the parser promises (so what opening allocates
//! is bounded); block status covers what it was asked; and an image that
//! the check passed without corruption still has none after the engine
//! wrote to it and flushed (no leak either, unless it had some, or
//! bitmaps, which a writer other than qemu abandons).

#![no_main]

#[path = "qcow2_io/mod.rs"]
mod qcow2_io;

use libfuzzer_sys::fuzz_target;
use qcow2_io::MemIo;
use qcow2filter::check;
use qcow2filter::header::{MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS};
use qcow2filter::image::{Image, Options};

/// Work one check may do: bounds the time a hostile image takes.
const CHECK_WORK: u64 = 1 << 22;

fuzz_target!(|data: &[u8]| {
    let io = MemIo::new(data.to_vec(), true);
    let Ok((h, first)) = Image::read_header(&io) else {
        return;
    };
    assert!((9..=MAX_CLUSTER_BITS).contains(&h.cluster_bits));
    assert!(u64::from(h.l1_size) * 8 <= MAX_L1_BYTES);
    assert!(u64::from(h.refcount_table_clusters) << h.cluster_bits <= MAX_REFTABLE_BYTES);
    assert!(h.nb_snapshots <= MAX_SNAPSHOTS && h.refcount_order <= 6);
    assert!(first.len() as u64 <= h.cluster_size());

    let before = check::check_header(&io, &h, &first, CHECK_WORK).ok();
    // Writable, the image's bitmaps are given up (their autoclear bit is
    // cleared), and qemu's check, like ours, then finds their clusters
    // leaked.
    let bitmaps = h.autoclear & 1 != 0;
    let opts = Options {
        l2_cache: 4 << h.cluster_bits,
        refcount_cache: 4 << h.cluster_bits,
        ..Options::default()
    };
    let Ok(image) = Image::open(&io, h, &first, opts, None, None) else {
        return;
    };
    let size = image.size();
    let seed = data
        .iter()
        .fold(0u64, |a, &b| a.rotate_left(5) ^ u64::from(b));
    let mid = if size == 0 { 0 } else { seed % size };
    let ranges = [
        (0, size.min(64 << 10)),
        (size.saturating_sub(4096), size.min(4096)),
        (mid, (size - mid).min(1 + (seed >> 32) % (128 << 10))),
    ];
    for &(at, len) in &ranges {
        let mut buf = vec![0u8; len as usize];
        let _ = image.read(&io, &mut buf, at);
        if len > 0 {
            if let Ok(runs) = image.extents(&io, at, len, false) {
                let total: u64 = runs.iter().map(|r| r.0).sum();
                assert!(
                    !runs.is_empty() && total <= len,
                    "extents {runs:?} for {len} at {at}"
                );
            }
        }
    }

    // A consistent image stays consistent when written.
    let Some(before) = before.filter(|r| r.corruptions == 0) else {
        return;
    };
    if image.make_writable(&io).is_err() || size == 0 {
        return;
    }
    let (at, len) = ranges[2];
    let ok = image
        .write(&io, &vec![0xa5; len as usize], at, false)
        .is_ok()
        && image
            .zero(&io, at / 2, len, seed & 1 != 0, false, false)
            .is_ok()
        && image.trim(&io, size / 3, len, false).is_ok()
        && image.flush(&io).is_ok()
        && image.flush(&io).is_ok();
    if !ok {
        // A corrupt image the check cannot see (a bad compressed stream,
        // a table past the end) may fail a request; that is fine.
        return;
    }
    let after = check::check_bounded(&io, CHECK_WORK).expect("the header still parses");
    assert!(
        after.corruptions == 0,
        "the image was consistent before the writes:\n{before}\nand after them:\n{after}"
    );
    if before.is_clean() && !bitmaps {
        assert!(after.is_clean(), "new leaks:\n{after}");
    }
});
