//! A connection's queued output: small encoded pieces (headers, option
//! replies) packed back to back in one buffer, with large data (read
//! replies, TLS records) queued beside them by ownership, never copied.
//! The socket side takes it all as one vectored write.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::Bytes;

use super::buffers::PooledBuf;

/// Data queued by ownership.
#[derive(Debug)]
pub enum Data {
    /// `buf[start..end]` of a read buffer.
    Pooled {
        buf: PooledBuf,
        start: usize,
        end: usize,
    },
    /// Part of a shared buffer.
    Bytes(Bytes),
}

impl Data {
    fn as_slice(&self) -> &[u8] {
        match self {
            Data::Pooled { buf, start, end } => &buf.as_slice()[*start..*end],
            Data::Bytes(b) => b,
        }
    }
}

#[derive(Debug)]
enum Chunk {
    /// `inline[start..end]`.
    Inline {
        start: usize,
        end: usize,
    },
    Data(Data),
}

/// Small inline bytes worth moving to the front of their buffer once this
/// many of them have been sent.
const COMPACT_AT: usize = 64 * 1024;

/// Output waiting for the socket, in wire order.
#[derive(Debug, Default)]
pub struct OutQueue {
    inline: Vec<u8>,
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_sent: usize,
    /// Bytes not yet written.
    len: usize,
}

impl Chunk {
    fn bytes<'a>(&'a self, inline: &'a [u8]) -> &'a [u8] {
        match self {
            Chunk::Inline { start, end } => &inline[*start..*end],
            Chunk::Data(d) => d.as_slice(),
        }
    }
}

impl OutQueue {
    /// Append small encoded bytes: `f` writes them to the end of the inline
    /// buffer.
    // Every reply's header passes here: once LLVM stopped inlining it into
    // `Session::complete` after an unrelated change, it cost about 20
    // instructions per request (bench/instructions).
    #[inline]
    pub fn encode<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let start = self.inline.len();
        let r = f(&mut self.inline);
        let end = self.inline.len();
        if end > start {
            self.len += end - start;
            match self.chunks.back_mut() {
                Some(Chunk::Inline { end: last, .. }) if *last == start => *last = end,
                _ => self.chunks.push_back(Chunk::Inline { start, end }),
            }
        }
        r
    }

    /// Append data by ownership.
    pub fn push(&mut self, data: Data) {
        let n = data.as_slice().len();
        if n > 0 {
            self.len += n;
            self.chunks.push_back(Chunk::Data(data));
        }
    }

    /// Bytes not yet written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Point `iov` at the unwritten output, front first; returns how many
    /// slots were filled.
    pub fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            if n == iov.len() {
                break;
            }
            let b = c.bytes(&self.inline);
            iov[n] = IoSlice::new(if i == 0 { &b[self.front_sent..] } else { b });
            n += 1;
        }
        n
    }

    /// Hand every unwritten piece, in order, to `f` (for encryption), then
    /// forget them all.
    pub fn drain<E>(&mut self, mut f: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        for (i, c) in self.chunks.iter().enumerate() {
            let b = c.bytes(&self.inline);
            f(if i == 0 { &b[self.front_sent..] } else { b })?;
        }
        self.clear();
        Ok(())
    }

    /// `n` bytes from the front were written.
    pub fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.bytes(&self.inline).len() - self.front_sent;
            if n < left {
                self.front_sent += n;
                return;
            }
            n -= left;
            self.front_sent = 0;
            self.chunks.pop_front();
        }
        self.compact();
    }

    /// Drop everything unwritten.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.inline.clear();
        self.front_sent = 0;
        self.len = 0;
    }

    /// Release memory kept from busier times.
    pub fn shrink(&mut self) {
        if self.chunks.is_empty() {
            self.inline = Vec::new();
            self.chunks = VecDeque::new();
        }
    }

    /// Keep the inline buffer from growing while output keeps flowing: move
    /// what is left of it to the front once enough of it has been sent.
    fn compact(&mut self) {
        let first = self.chunks.iter().find_map(|c| match c {
            Chunk::Inline { start, .. } => Some(*start),
            Chunk::Data(_) => None,
        });
        match first {
            None => self.inline.clear(),
            Some(first) if first >= COMPACT_AT && first * 2 >= self.inline.len() => {
                self.inline.drain(..first);
                for c in &mut self.chunks {
                    if let Chunk::Inline { start, end } = c {
                        *start -= first;
                        *end -= first;
                    }
                }
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::buffers::BufPool;

    fn gather(q: &OutQueue) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); 16];
        let n = q.slices(&mut iov);
        iov[..n].iter().flat_map(|s| s.to_vec()).collect()
    }

    #[test]
    fn pieces_come_out_in_order_and_adjacent_inline_bytes_merge() {
        let pool = BufPool::new(0);
        let mut q = OutQueue::default();
        q.encode(|b| b.extend_from_slice(b"ab"));
        q.encode(|b| b.extend_from_slice(b"cd"));
        let mut d = pool.get(3);
        d.as_mut_slice().copy_from_slice(b"xyz");
        q.push(Data::Pooled {
            buf: d,
            start: 0,
            end: 3,
        });
        q.encode(|b| b.extend_from_slice(b"e"));
        let mut iov = [IoSlice::new(&[]); 16];
        assert_eq!(q.slices(&mut iov), 3);
        assert_eq!(gather(&q), b"abcdxyze");
        assert_eq!(q.len(), 8);
    }

    #[test]
    fn partial_writes_resume_mid_chunk() {
        let mut q = OutQueue::default();
        q.encode(|b| b.extend_from_slice(b"hello"));
        q.push(Data::Bytes(Bytes::from_static(b"world")));
        q.advance(3);
        assert_eq!(gather(&q), b"loworld");
        q.advance(4);
        assert_eq!(gather(&q), b"rld");
        q.advance(3);
        assert!(q.is_empty());
        assert!(q.inline.is_empty(), "a drained queue reuses its buffer");
    }

    #[test]
    fn inline_bytes_are_compacted_while_output_keeps_flowing() {
        let mut q = OutQueue::default();
        for i in 0..100_000u32 {
            q.encode(|b| b.extend_from_slice(&i.to_be_bytes()));
            q.push(Data::Bytes(Bytes::from_static(b"-")));
            let keep = 5 * 3;
            if q.len() > keep {
                q.advance(q.len() - keep);
            }
        }
        assert!(q.inline.len() < 2 * COMPACT_AT + 64);
        let tail = gather(&q);
        assert_eq!(&tail[tail.len() - 5..], &[0, 1, 0x86, 0x9f, b'-']);
    }
}
