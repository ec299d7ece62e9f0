//! Transmission replies: encoding headers, read chunks and block status
//! into byte buffers. The caller places read data itself, so data is never
//! copied here.

use bytes::BufMut;

use super::export::Extent;
use super::handshake::CONTEXT_BASE_ALLOCATION;
use super::wire::{self, *};

/// Smallest run of zeroes worth a hole chunk inside a read reply.
const HOLE_MIN: usize = 64 * 1024;
/// Granularity at which read data is checked for zeroes.
const ZERO_BLOCK: usize = 4096;

fn is_zero(b: &[u8]) -> bool {
    // Comparing the slice with itself shifted by one lets memcmp do the
    // scan at full speed: all bytes equal the first, and the first is 0.
    b.first()
        .is_none_or(|&f| f == 0 && b[..b.len() - 1] == b[1..])
}

/// One chunk of a structured read reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadChunk {
    /// Where the chunk's bytes lie in the read data.
    pub start: usize,
    pub end: usize,
    /// Sent as a hole (`OFFSET_HOLE`) instead of data.
    pub hole: bool,
    /// The final chunk of the reply (carries `DONE`).
    pub last: bool,
}

/// The chunks a structured reply to a read of `data` is made of.
///
/// Runs of zeroes of at least 64 KiB become hole chunks, unless the client
/// asked for `DF`; shorter runs are cheaper sent as data. Each byte is
/// looked at once at most, and nothing is allocated.
pub fn read_chunks(data: &[u8], df: bool) -> ReadChunks<'_> {
    ReadChunks {
        data,
        df,
        pos: 0,
        started: false,
        data_start: None,
        hole: None,
        ahead: None,
    }
}

/// Iterator returned by [`read_chunks`].
pub struct ReadChunks<'a> {
    data: &'a [u8],
    df: bool,
    /// How far the data has been scanned.
    pos: usize,
    started: bool,
    /// Start of a run of data not yet emitted.
    data_start: Option<usize>,
    /// A hole found right after a data run, emitted next.
    hole: Option<(usize, usize)>,
    /// The segment after the current one, so that the last can be marked.
    ahead: Option<(usize, usize, bool)>,
}

impl ReadChunks<'_> {
    /// The next segment `(start, end, hole)`.
    fn segment(&mut self) -> Option<(usize, usize, bool)> {
        if let Some((s, e)) = self.hole.take() {
            return Some((s, e, true));
        }
        let len = self.data.len();
        if !self.started {
            self.started = true;
            // Asked for one chunk, or too small to hold a hole beside
            // data: one check decides what the single chunk is.
            if self.df || len < 2 * HOLE_MIN {
                self.pos = len;
                return Some((0, len, !self.df && is_zero(self.data)));
            }
        }
        while self.pos < len {
            let start = self.pos;
            let mut end = (start + ZERO_BLOCK).min(len);
            let zero = is_zero(&self.data[start..end]);
            if zero {
                while end < len {
                    let next = (end + ZERO_BLOCK).min(len);
                    if !is_zero(&self.data[end..next]) {
                        break;
                    }
                    end = next;
                }
            }
            self.pos = end;
            if !zero || end - start < HOLE_MIN {
                self.data_start.get_or_insert(start);
                continue;
            }
            return match self.data_start.take() {
                Some(ds) => {
                    self.hole = Some((start, end));
                    Some((ds, start, false))
                }
                None => Some((start, end, true)),
            };
        }
        self.data_start.take().map(|ds| (ds, len, false))
    }
}

impl Iterator for ReadChunks<'_> {
    type Item = ReadChunk;

    fn next(&mut self) -> Option<ReadChunk> {
        let (start, end, hole) = match self.ahead.take() {
            Some(s) => s,
            None => self.segment()?,
        };
        self.ahead = self.segment();
        Some(ReadChunk {
            start,
            end,
            hole,
            last: self.ahead.is_none(),
        })
    }
}

/// The header of one structured read chunk of a read at `offset`; a data
/// chunk's bytes follow it on the wire.
pub fn put_read_chunk(out: &mut impl BufMut, hdr: &ReplyHeader, offset: u64, c: &ReadChunk) {
    let flags = if c.last { REPLY_FLAG_DONE } else { 0 };
    let len = (c.end - c.start) as u64;
    if c.hole {
        hdr.put_chunk(out, flags, REPLY_TYPE_OFFSET_HOLE, 12);
        out.put_u64(offset + c.start as u64);
        out.put_u32(len as u32);
    } else {
        hdr.put_chunk(out, flags, REPLY_TYPE_OFFSET_DATA, 8 + len);
        out.put_u64(offset + c.start as u64);
    }
}

/// The reply to a successful block-status request for `len` bytes at
/// `offset`, from extents that cover at least its first byte.
pub fn put_block_status(
    out: &mut impl BufMut,
    hdr: &ReplyHeader,
    offset: u64,
    len: u64,
    req_one: bool,
    extents: &[Extent],
) {
    let end = offset + len;
    let mut out_extents = Vec::with_capacity(extents.len().min(1024));
    for e in extents {
        let s = e.offset.max(offset);
        let t = (e.offset + e.length).min(end);
        if t <= s {
            continue;
        }
        out_extents.push(wire::Extent {
            length: t - s,
            flags: e.flags & (STATE_HOLE | STATE_ZERO),
        });
        if req_one {
            break;
        }
    }
    if out_extents.is_empty() {
        out_extents.push(wire::Extent {
            length: len,
            flags: 0,
        });
    }
    wire::put_block_status(out, hdr, CONTEXT_BASE_ALLOCATION, &out_extents);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8], df: bool) -> Vec<(usize, usize, bool, bool)> {
        read_chunks(data, df)
            .map(|c| (c.start, c.end, c.hole, c.last))
            .collect()
    }

    #[test]
    fn a_small_read_is_one_chunk_data_or_hole() {
        assert_eq!(chunks(&[0; 4096], false), vec![(0, 4096, true, true)]);
        let mut d = vec![0u8; 4096];
        d[4095] = 1;
        assert_eq!(chunks(&d, false), vec![(0, 4096, false, true)]);
    }

    #[test]
    fn df_forces_one_data_chunk() {
        assert_eq!(chunks(&[0; 1 << 20], true), vec![(0, 1 << 20, false, true)]);
    }

    #[test]
    fn long_zero_runs_in_large_reads_become_holes() {
        assert_eq!(chunks(&[0; 1 << 20], false), vec![(0, 1 << 20, true, true)]);
        let mut d = vec![0u8; 256 * 1024];
        d[0] = 1;
        assert_eq!(
            chunks(&d, false),
            vec![(0, 4096, false, false), (4096, 256 * 1024, true, true)]
        );
        let mut d = vec![0u8; 512 * 1024];
        d[0] = 1;
        d[200 * 1024] = 1;
        d[511 * 1024] = 1;
        assert_eq!(
            chunks(&d, false),
            vec![
                (0, 4096, false, false),
                (4096, 200 * 1024, true, false),
                (200 * 1024, 204 * 1024, false, false),
                (204 * 1024, 508 * 1024, true, false),
                (508 * 1024, 512 * 1024, false, true),
            ]
        );
    }

    #[test]
    fn short_zero_runs_stay_inside_data() {
        let mut d = vec![1u8; 256 * 1024];
        d[8192..8192 + 32 * 1024].fill(0);
        assert_eq!(chunks(&d, false), vec![(0, 256 * 1024, false, true)]);
    }

    #[test]
    fn block_status_clips_to_the_request() {
        let hdr = ReplyHeader {
            style: ReplyStyle::Structured,
            cookie: 1,
            offset: 100,
        };
        let ex = [
            Extent {
                offset: 0,
                length: 150,
                flags: 0,
            },
            Extent {
                offset: 150,
                length: 1000,
                flags: 3,
            },
        ];
        let mut b = Vec::new();
        put_block_status(&mut b, &hdr, 100, 200, false, &ex);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(&b[24..32], &[0, 0, 0, 50, 0, 0, 0, 0]);
        assert_eq!(&b[32..40], &[0, 0, 0, 150, 0, 0, 0, 3]);
        b.clear();
        put_block_status(&mut b, &hdr, 100, 200, true, &ex);
        assert_eq!(b.len(), 20 + 4 + 8);
    }
}
