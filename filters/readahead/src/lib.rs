//! The readahead filter: after each read, ask the layer below to cache
//! what follows it, from a background job of the connection, so that a
//! client reading sequentially finds the next blocks already fetched.
//! The prefetch window grows while reads keep outrunning it and falls
//! back to its minimum when they stop moving forward.
//!
//! It does something only over a layer that caches natively (such as
//! the cache filter) and allows parallel calls; otherwise it says so and
//! passes reads through.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nbdhost_plugin_api::{
    callbacks, host, host::LogLevel, nbdhost_filter, Filter, FilterHandle, Flags, Next, NextOpener,
    ReadRequest, Result, Support,
};

/// The window's bounds, as nbdkit's readahead filter.
const MIN_WINDOW: u64 = 32 * 1024;
const MAX_WINDOW: u64 = 4 * 1024 * 1024;
/// Prefetches waiting for the background job; more are dropped, since
/// falling that far behind the client makes them useless.
const MAX_PENDING: usize = 64;
/// How often an idle background job looks whether its connection is
/// closing (the close waits for it).
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// The prefetch window, shared by every connection as in nbdkit.
#[derive(Debug)]
struct Window {
    size: u64,
    last_offset: u64,
    last_end: u64,
}

impl Default for Window {
    fn default() -> Window {
        Window {
            size: MIN_WINDOW,
            last_offset: 0,
            last_end: 0,
        }
    }
}

impl Window {
    /// A read of `count` bytes at `offset` of a disk of `disk` bytes: the
    /// range to prefetch after it, if any is left on the disk. The window
    /// doubles when the read starts beyond the last prefetch, stays while
    /// reads move forward, and shrinks to its minimum otherwise.
    fn after_read(&mut self, offset: u64, count: u64, disk: u64) -> Option<(u64, u64)> {
        let start = offset + count;
        let ahead = (start < disk).then(|| (start, self.size.min(disk - start)));
        if self.last_end < offset {
            self.size = (self.size * 2).min(MAX_WINDOW);
        } else if self.last_offset >= offset {
            self.size = MIN_WINDOW;
        }
        self.last_offset = offset;
        self.last_end = ahead.map_or(start, |(o, n)| o + n);
        ahead
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain numbers and a queue: a panic leaves nothing half-changed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The window every connection shares.
#[derive(Default)]
pub struct Readahead {
    window: Arc<Mutex<Window>>,
}

#[callbacks]
impl Filter for Readahead {
    const NAME: &'static str = "readahead";
    const DESCRIPTION: &'static str = "prefetch what follows sequential reads";
    type Handle = Layer;

    fn nonblocking(&self) -> bool {
        // A read only notes its range under a short lock and queues a
        // prefetch; the waiting is the background job's.
        true
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Layer> {
        next.open(readonly, export_name)?;
        Ok(Layer {
            window: self.window.clone(),
            disk: OnceLock::new(),
            queue: Arc::default(),
        })
    }
}

/// Prefetches for one connection's background job.
#[derive(Default)]
struct Queue {
    pending: Mutex<VecDeque<(u64, u64)>>,
    wake: Condvar,
}

impl Queue {
    fn push(&self, range: (u64, u64)) {
        let mut p = lock(&self.pending);
        if p.len() < MAX_PENDING {
            p.push_back(range);
            self.wake.notify_one();
        }
    }

    /// The next prefetch, or `None` after a while without one.
    fn pop(&self) -> Option<(u64, u64)> {
        let mut p = lock(&self.pending);
        if p.is_empty() {
            p = self
                .wake
                .wait_timeout(p, IDLE_CHECK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        p.pop_front()
    }

    /// Prefetch below until the connection closes. Errors are ignored:
    /// a prefetch is advice, and the client's own read will meet them.
    fn run(&self, next: &Next) {
        while !next.closing() {
            if let Some((offset, count)) = self.pop() {
                let _ = next.cache(count, offset, Flags::empty());
            }
        }
    }
}

/// One connection: the disk's size once its background job runs.
pub struct Layer {
    window: Arc<Mutex<Window>>,
    /// Set only when prefetching works for this connection.
    disk: OnceLock<u64>,
    queue: Arc<Queue>,
}

impl Layer {
    fn note_read(&self, offset: u64, count: u64) {
        if let Some(&disk) = self.disk.get() {
            let ahead = lock(&self.window).after_read(offset, count, disk);
            if let Some(range) = ahead {
                self.queue.push(range);
            }
        }
    }
}

#[callbacks]
impl FilterHandle for Layer {
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        if next.can_cache()? != Support::Native {
            host::log(
                LogLevel::Warning,
                "readahead: the layer below does not cache natively, so this filter \
                 does nothing; try adding --filter=cache after this filter",
            );
            return Ok(());
        }
        let disk = next.get_size()?;
        let queue = self.queue.clone();
        match next.background(move |next| queue.run(next)) {
            Ok(()) => {
                let _ = self.disk.set(disk);
            }
            Err(e) => host::log(
                LogLevel::Warning,
                &format!("readahead: no background prefetching, so this filter does nothing: {e}"),
            ),
        }
        Ok(())
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.note_read(offset, buf.len() as u64);
        next.pread(buf, offset, flags)
    }

    fn async_pread(&self, next: &Next, req: ReadRequest) {
        self.note_read(req.offset(), req.len() as u64);
        next.async_pread(req)
    }
}

nbdhost_filter!(Readahead);

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: u64 = 100 << 20;

    #[test]
    fn a_read_prefetches_the_window_after_it() {
        let mut w = Window::default();
        assert_eq!(w.after_read(0, 4096, DISK), Some((4096, MIN_WINDOW)));
    }

    #[test]
    fn reads_that_start_past_the_prefetch_double_the_window_up_to_its_maximum() {
        let mut w = Window::default();
        let mut sizes = Vec::new();
        for i in 0..10 {
            let (_, n) = w.after_read(i << 23, 4096, DISK).unwrap();
            sizes.push(n >> 10);
        }
        assert_eq!(sizes, [32, 32, 64, 128, 256, 512, 1024, 2048, 4096, 4096]);
    }

    #[test]
    fn sequential_reads_within_the_prefetch_keep_the_window() {
        let mut w = Window::default();
        w.after_read(0, 1 << 20, DISK);
        w.after_read(2 << 20, 1 << 20, DISK);
        assert_eq!(w.size, 2 * MIN_WINDOW);
        // The next read starts inside the last prefetch: no doubling.
        let last = w.last_end;
        assert_eq!(
            w.after_read(last - 4096, 4096, DISK),
            Some((last, 2 * MIN_WINDOW))
        );
    }

    #[test]
    fn a_read_that_goes_back_resets_the_window() {
        let mut w = Window::default();
        w.after_read(0, 1 << 20, DISK);
        w.after_read(4 << 20, 1 << 20, DISK);
        w.after_read(1 << 20, 4096, DISK);
        assert_eq!(w.size, MIN_WINDOW);
    }

    #[test]
    fn nothing_is_prefetched_past_the_end_and_the_last_window_is_cut() {
        let mut w = Window::default();
        assert_eq!(w.after_read(DISK - 4096, 4096, DISK), None);
        assert_eq!(
            w.after_read(DISK - 8192, 4096, DISK),
            Some((DISK - 4096, 4096))
        );
    }
}
