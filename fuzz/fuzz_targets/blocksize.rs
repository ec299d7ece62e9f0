//! The blocksize filter's arithmetic: the limits a connection applies, how
//! a request is cut into pieces, and how extents are aligned to blocks.
//!
//! Checked: the pieces cover the request exactly and in order; a partial
//! piece lies inside one block; a whole piece is aligned and within the
//! limit; aligned extents start where asked, are contiguous, aligned, and
//! claim no property every byte of their block does not have.

#![no_main]

use arbitrary::Arbitrary;
use blocksizefilter::split::{align, pieces, Limits, Piece};
use libfuzzer_sys::fuzz_target;
use nbdhost_plugin_api::BlockSize;

#[derive(Arbitrary, Debug)]
struct Input {
    minblock_shift: Option<u8>,
    maxdata: Option<u32>,
    maxlen: Option<u32>,
    below: Option<(u8, u8, u32)>,
    offset: u32,
    count: u32,
    extents: Vec<(u16, u8)>,
}

fuzz_target!(|i: Input| {
    // As the filter's parameters and the server's block-size check allow.
    let minblock = i.minblock_shift.map(|s| 1u32 << (s % 17));
    let below = i.below.map(|(min, pref, max)| {
        let minimum = 1u32 << (min % 17);
        let preferred = (1u32 << (pref % 26)).max(minimum);
        BlockSize {
            minimum,
            preferred,
            maximum: max.max(preferred),
        }
    });
    // Limits of at least 4 KiB and requests of at most 4 MiB keep a
    // request to a few thousand pieces; smaller limits only make more.
    let maxdata = i.maxdata.map(|v| v.max(4096));
    let maxlen = i.maxlen.map(|v| v.max(4096));
    let l = Limits::new(minblock, maxdata, maxlen, below);
    assert!(l.minblock.is_power_of_two());
    assert_eq!((l.maxdata % l.minblock, l.maxlen % l.minblock), (0, 0));

    let (offset, count) = (u64::from(i.offset), u64::from(i.count % (4 << 20)));
    for max in [l.maxdata, l.maxlen] {
        let mut at = offset;
        for p in pieces(&l, offset, count, max) {
            match p {
                Piece::Partial { offset: o, len } => {
                    assert_eq!(o, at);
                    assert!(len > 0 && len < l.minblock);
                    assert_eq!(l.down(o), l.down(o + len - 1), "one block");
                    at += len;
                }
                Piece::Whole { offset: o, len } => {
                    assert_eq!(o, at);
                    assert!(len > 0 && len <= max);
                    assert_eq!((o % l.minblock, len % l.minblock), (0, 0));
                    at += len;
                }
            }
        }
        assert_eq!(at, offset + count);
    }

    // Contiguous extents from the start of a block, as a layer reports.
    let block = l.minblock;
    let start = l.down(offset);
    let mut ext = Vec::new();
    let mut o = start;
    for (len, kind) in i.extents.iter().take(64) {
        let n = u64::from(*len) + 1;
        ext.push((o, n, u32::from(kind & 3)));
        o += n;
    }
    if ext.is_empty() {
        return;
    }
    let out = align(&ext, block);
    assert!(!out.is_empty());
    assert_eq!(out[0].0, start);
    for w in out.windows(2) {
        assert_eq!(w[0].0 + w[0].1, w[1].0, "contiguous");
    }
    for &(o, n, t) in &out {
        assert_eq!((o % block, n % block), (0, 0));
        // Every input extent overlapping the output one has its bits.
        for &(eo, en, et) in &ext {
            if eo < o + n && o < eo + en {
                assert_eq!(t & !et, 0, "claims {t} over {et}");
            }
        }
    }
});
