//! Reusable read buffers, so that serving a read allocates nothing in
//! steady state and never zero-fills a buffer the plugin is about to
//! overwrite.
//!
//! Buffers come in power-of-two classes from 4 KiB to 1 MiB and go back to
//! their pool when dropped, from whichever thread drops them. Larger reads
//! are rare and get a buffer of their own. What a pool keeps is bounded in
//! bytes.
//!
//! Every buffer starts on a page boundary, so that a plugin reading with
//! `O_DIRECT` (the file plugin's `cache=none`) can read into it as it is,
//! without a bounce buffer and a copy.

use std::sync::{Arc, Mutex};

const MIN_CLASS: usize = 12; // 4 KiB
const MAX_CLASS: usize = 20; // 1 MiB
const CLASSES: usize = MAX_CLASS - MIN_CLASS + 1;

/// A pool of read buffers; clones share the pool.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Most bytes of idle buffers kept.
    limit: usize,
}

struct State {
    /// Idle buffers of each class, with where their aligned bytes start.
    free: [Vec<(Vec<u8>, usize)>; CLASSES],
    kept: usize,
}

fn class_of(len: usize) -> Option<usize> {
    let bits = len.max(1).next_power_of_two().trailing_zeros() as usize;
    (bits <= MAX_CLASS).then(|| bits.max(MIN_CLASS) - MIN_CLASS)
}

fn class_size(class: usize) -> usize {
    1 << (class + MIN_CLASS)
}

/// The alignment of every buffer's first byte.
const PAGE: usize = 4096;

/// Storage for `size` bytes starting on a page boundary: the vector and
/// where in it they start. Over-allocating by a page keeps this safe code;
/// should the platform not say where the boundary is, the bytes start at
/// the beginning, unaligned, which is correct, only slower for `O_DIRECT`.
fn page_aligned(size: usize) -> (Vec<u8>, usize) {
    let data = vec![0; size + PAGE];
    let start = data.as_ptr().align_offset(PAGE);
    (data, if start < PAGE { start } else { 0 })
}

impl BufPool {
    /// A pool keeping at most `limit` bytes of idle buffers.
    pub fn new(limit: usize) -> BufPool {
        BufPool {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    free: Default::default(),
                    kept: 0,
                }),
                limit,
            }),
        }
    }

    /// A buffer of exactly `len` bytes. Its contents are whatever a
    /// previous user left (zeroes when new): callers overwrite all of it.
    pub fn get(&self, len: usize) -> PooledBuf {
        let Some(class) = class_of(len) else {
            let (data, start) = page_aligned(len);
            return PooledBuf {
                data,
                start,
                len,
                home: None,
            };
        };
        let reused = {
            let mut st = self.inner.lock();
            let v = st.free[class].pop();
            if let Some((v, _)) = &v {
                st.kept -= v.len();
            }
            v
        };
        let (data, start) = reused.unwrap_or_else(|| page_aligned(class_size(class)));
        PooledBuf {
            data,
            start,
            len,
            home: Some(self.inner.clone()),
        }
    }

    /// Bytes of idle buffers the pool holds now.
    pub fn kept(&self) -> usize {
        self.inner.lock().kept
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A buffer from a [`BufPool`]; it returns there when dropped.
pub struct PooledBuf {
    data: Vec<u8>,
    /// Where the page-aligned bytes start in `data`.
    start: usize,
    len: usize,
    home: Option<Arc<Inner>>,
}

impl PooledBuf {
    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data[self.start..][..self.len]
    }

    /// The buffer's bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[self.start..][..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuf({} bytes)", self.len)
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let Some(home) = self.home.take() else { return };
        let size = self.data.len();
        let Some(class) = class_of(size - PAGE) else {
            return;
        };
        let mut st = home.lock();
        if st.kept + size <= home.limit {
            st.kept += size;
            st.free[class].push((std::mem::take(&mut self.data), self.start));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_reused_without_being_cleared() {
        let pool = BufPool::new(1 << 20);
        let mut b = pool.get(4096);
        b.as_mut_slice().fill(7);
        let addr = b.as_slice().as_ptr();
        drop(b);
        let b = pool.get(3000);
        assert_eq!(b.as_slice().as_ptr(), addr);
        assert_eq!(b.len(), 3000);
        assert!(b.as_slice().iter().all(|&x| x == 7));
    }

    #[test]
    fn what_the_pool_keeps_is_bounded() {
        let pool = BufPool::new(64 * 1024);
        let bufs: Vec<_> = (0..100).map(|_| pool.get(4096)).collect();
        drop(bufs);
        assert!(pool.kept() <= 64 * 1024);
        assert!(pool.kept() > 56 * 1024);
    }

    #[test]
    fn buffers_start_on_a_page_boundary() {
        let pool = BufPool::new(1 << 20);
        for len in [1, 512, 4096, 5000, 1 << 20, 3 << 20] {
            let b = pool.get(len);
            assert_eq!(b.as_slice().as_ptr() as usize % PAGE, 0, "{len} bytes");
            assert_eq!(b.len(), len);
        }
    }

    #[test]
    fn large_buffers_are_not_pooled() {
        let pool = BufPool::new(1 << 30);
        drop(pool.get(32 << 20));
        assert_eq!(pool.kept(), 0);
        assert_eq!(class_of(1 << 20), Some(CLASSES - 1));
        assert_eq!(class_of(1), Some(0));
    }
}
