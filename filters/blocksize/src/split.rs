//! The arithmetic of the blocksize filter, apart from any I/O: the limits a
//! connection applies, how a request is cut into pieces the layer below
//! accepts, and how extents are aligned to blocks.

use nbdhost_plugin_api::BlockSize;

/// Default `maxdata`.
const DEFAULT_MAXDATA: u32 = 64 * 1024 * 1024;

/// The limits one connection applies, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Alignment of every request passed down.
    pub minblock: u64,
    /// Largest request with data.
    pub maxdata: u64,
    /// Largest trim, zero or block status.
    pub maxlen: u64,
}

impl Limits {
    /// Combine the configuration with the constraints of the layer below,
    /// as nbdkit does: unset values follow the layer below, and the
    /// stricter of the two wins.
    pub fn new(
        minblock: Option<u32>,
        maxdata: Option<u32>,
        maxlen: Option<u32>,
        below: Option<BlockSize>,
    ) -> Limits {
        let (bmin, bmax) = below.map_or((1, 0), |b| (b.minimum.max(1), b.maximum));
        let minblock = minblock.unwrap_or(1).max(bmin);
        let mut maxdata =
            maxdata.unwrap_or_else(|| maxlen.map_or(DEFAULT_MAXDATA, |l| l.min(DEFAULT_MAXDATA)));
        if bmax != 0 {
            maxdata = maxdata.min(bmax);
        }
        let maxdata = (maxdata - maxdata % minblock).max(minblock);
        let maxlen = match maxlen {
            Some(l) => (l - l % minblock).max(minblock),
            None => u32::MAX - minblock + 1,
        };
        Limits {
            minblock: u64::from(minblock),
            maxdata: u64::from(maxdata),
            maxlen: u64::from(maxlen),
        }
    }

    /// `v` rounded down to a block.
    pub fn down(&self, v: u64) -> u64 {
        v - v % self.minblock
    }

    /// `v` rounded up to a block.
    pub fn up(&self, v: u64) -> u64 {
        v.next_multiple_of(self.minblock)
    }

    /// Bytes of a request at `offset` before the first aligned offset.
    pub fn head(&self, offset: u64, count: u64) -> u64 {
        match offset % self.minblock {
            0 => 0,
            r => (self.minblock - r).min(count),
        }
    }
}

/// One piece of a request, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Part of one block: served by reading (and for writes, writing back)
    /// the whole block.
    Partial { offset: u64, len: u64 },
    /// Whole blocks, at most the limit asked for: passed down as is.
    Whole { offset: u64, len: u64 },
}

/// Cut `count` bytes at `offset` into an unaligned head, runs of whole
/// blocks of at most `max` bytes (a multiple of the block size), and an
/// unaligned tail.
pub fn pieces(l: &Limits, offset: u64, count: u64, max: u64) -> impl Iterator<Item = Piece> + '_ {
    let head = l.head(offset, count);
    let mut off = offset + head;
    let mut rest = count - head;
    let mut first = (head > 0).then_some(Piece::Partial { offset, len: head });
    std::iter::from_fn(move || {
        if let Some(p) = first.take() {
            return Some(p);
        }
        if rest >= l.minblock {
            let n = max.min(l.down(rest));
            let p = Piece::Whole {
                offset: off,
                len: n,
            };
            off += n;
            rest -= n;
            return Some(p);
        }
        if rest > 0 {
            let p = Piece::Partial {
                offset: off,
                len: rest,
            };
            rest = 0;
            return Some(p);
        }
        None
    })
}

/// Make extent boundaries multiples of `block` (the protocol asks that
/// they respect the minimum block size): a block that straddles extents
/// of different kinds gets only the properties all of them share. A
/// partial block left at the end is dropped unless it is all there is,
/// when it is reported as data, which claims nothing.
pub fn align(extents: &[(u64, u64, u32)], block: u64) -> Vec<(u64, u64, u32)> {
    fn push(out: &mut Vec<(u64, u64, u32)>, o: u64, n: u64, t: u32) {
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += n,
            _ => out.push((o, n, t)),
        }
    }
    let mut out = Vec::new();
    // A block only partly covered so far: its start and shared type.
    let mut pending: Option<(u64, u32)> = None;
    for &(o, n, t) in extents {
        let end = o + n;
        let mut from = o;
        if let Some((b, acc)) = pending {
            let acc = acc & t;
            if end < b + block {
                pending = Some((b, acc));
                continue;
            }
            push(&mut out, b, block, acc);
            pending = None;
            from = b + block;
        }
        let whole_end = end - end % block;
        if whole_end > from {
            push(&mut out, from, whole_end - from, t);
        }
        if end > whole_end.max(from) {
            pending = Some((whole_end.max(from), t));
        }
    }
    if let (Some((b, _)), true) = (pending, out.is_empty()) {
        out.push((b, block, 0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_nbdkit_defaults() {
        let l = Limits::new(None, None, None, None);
        assert_eq!(
            (l.minblock, l.maxdata, l.maxlen),
            (1, 64 << 20, u32::MAX as u64)
        );
        let l = Limits::new(Some(512), None, None, None);
        assert_eq!(
            (l.minblock, l.maxdata, l.maxlen),
            (512, 64 << 20, (1 << 32) - 512)
        );
        let l = Limits::new(None, None, Some(1 << 20), None);
        assert_eq!((l.maxdata, l.maxlen), (1 << 20, 1 << 20));
        // The layer below tightens what was not configured.
        let below = BlockSize {
            minimum: 4096,
            preferred: 4096,
            maximum: 1 << 20,
        };
        let l = Limits::new(Some(512), None, None, Some(below));
        assert_eq!((l.minblock, l.maxdata), (4096, 1 << 20));
        let l = Limits::new(None, Some(1000), Some(5000), Some(below));
        assert_eq!((l.maxdata, l.maxlen), (4096, 4096));
    }

    #[test]
    fn head_is_the_unaligned_start() {
        let l = Limits::new(Some(512), None, None, None);
        assert_eq!(l.head(0, 100), 0);
        assert_eq!(l.head(500, 100), 12);
        assert_eq!(l.head(1, 5), 5);
        assert_eq!(l.head(1024, 5), 0);
    }

    #[test]
    fn a_request_is_cut_at_block_boundaries_and_the_limit() {
        let l = Limits::new(Some(512), Some(1024), None, None);
        let p: Vec<Piece> = pieces(&l, 500, 3000, l.maxdata).collect();
        assert_eq!(
            p,
            vec![
                Piece::Partial {
                    offset: 500,
                    len: 12
                },
                Piece::Whole {
                    offset: 512,
                    len: 1024
                },
                Piece::Whole {
                    offset: 1536,
                    len: 1024
                },
                Piece::Whole {
                    offset: 2560,
                    len: 512
                },
                Piece::Partial {
                    offset: 3072,
                    len: 428
                },
            ]
        );
        assert_eq!(
            pieces(&l, 100, 10, l.maxdata).collect::<Vec<_>>(),
            vec![Piece::Partial {
                offset: 100,
                len: 10
            }]
        );
    }

    #[test]
    fn align_merges_straddling_blocks() {
        // Data 0..700, zero hole 700..2048 in 512-byte blocks.
        let e = [(0, 700, 0), (700, 1348, 3)];
        assert_eq!(align(&e, 512), vec![(0, 1024, 0), (1024, 1024, 3)]);
        // Already aligned: unchanged.
        let e = [(0, 512, 3), (512, 512, 0)];
        assert_eq!(align(&e, 512), e.to_vec());
        // Three extents inside one block share only their common bits.
        let e = [(0, 100, 3), (100, 100, 2), (200, 312, 3), (512, 512, 3)];
        assert_eq!(align(&e, 512), vec![(0, 512, 2), (512, 512, 3)]);
        // A partial tail is dropped, unless it is all there is.
        let e = [(0, 1024, 3), (1024, 10, 3)];
        assert_eq!(align(&e, 512), vec![(0, 1024, 3)]);
        let e = [(0, 10, 3)];
        assert_eq!(align(&e, 512), vec![(0, 512, 0)]);
        // Block size 1 changes nothing.
        let e = [(0, 7, 0), (7, 9, 3)];
        assert_eq!(align(&e, 1), e.to_vec());
    }
}
