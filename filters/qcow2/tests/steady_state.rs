//! Requests that hit the L2 cache allocate nothing: once a cluster's
//! table is cached, reads of it and writes in place into it make no heap
//! allocation at all, counted by a global allocator on the test's thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::Command;

use qcow2filter::image::{Image, Options};

#[path = "../../../fuzz/fuzz_targets/qcow2_io/mod.rs"]
mod qcow2_io;
use qcow2_io::MemIo;

thread_local! {
    /// Allocations made by this thread while counting is on.
    static COUNTED: Cell<Option<u64>> = const { Cell::new(None) };
}

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; the
// thread-local counter is const-initialised, so touching it never
// allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNTED.try_with(|c| c.set(c.get().map(|n| n + 1)));
        // SAFETY: the caller's layout, as GlobalAlloc requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    COUNTED.with(|c| c.set(Some(0)));
    f();
    COUNTED.with(|c| c.take()).unwrap_or(0)
}

/// A fresh 64 MiB image from qemu-img, or None (saying why).
fn fresh_image() -> Option<Vec<u8>> {
    // One directory per call: the tests run in parallel.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("qcow2-steady-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .status();
    let bytes = match made {
        Ok(st) if st.success() => std::fs::read(&path).ok(),
        _ => {
            eprintln!("SKIP: qemu-img is not installed (scripts/install-deps installs it)");
            None
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// The image open and writable over memory, with `len` bytes at `at`
/// already written (so allocated and their table cached).
fn opened(bytes: Vec<u8>, at: u64, len: usize) -> (MemIo, Image) {
    let io = MemIo::new(bytes, true);
    let (h, first) = Image::read_header(&io).unwrap();
    let image = Image::open(&io, h, &first, Options::default(), None, None).unwrap();
    image.make_writable(&io).unwrap();
    image.write(&io, &vec![0x5a; len], at, false).unwrap();
    (io, image)
}

#[test]
fn cached_reads_allocate_nothing() {
    let Some(bytes) = fresh_image() else { return };
    let (io, image) = opened(bytes, 1 << 20, 256 << 10);
    let mut buf = vec![0u8; 4096];
    let n = allocations(|| {
        for i in 0..64u64 {
            image.read(&io, &mut buf, (1 << 20) + i * 4096).unwrap();
        }
    });
    assert_eq!(buf, vec![0x5a; 4096]);
    assert_eq!(n, 0, "64 cached reads allocated {n} times");
}

#[test]
fn writes_in_place_allocate_nothing() {
    let Some(bytes) = fresh_image() else { return };
    let (io, image) = opened(bytes, 1 << 20, 256 << 10);
    let buf = vec![0xa5u8; 4096];
    let n = allocations(|| {
        for i in 0..64u64 {
            image.write(&io, &buf, (1 << 20) + i * 4096, false).unwrap();
        }
    });
    assert_eq!(n, 0, "64 writes in place allocated {n} times");
}

#[test]
fn reads_of_unallocated_clusters_in_a_cached_table_allocate_nothing() {
    let Some(bytes) = fresh_image() else { return };
    let (io, image) = opened(bytes, 1 << 20, 64 << 10);
    let mut buf = vec![1u8; 4096];
    let n = allocations(|| {
        for i in 0..64u64 {
            image.read(&io, &mut buf, (4 << 20) + i * 4096).unwrap();
        }
    });
    assert_eq!(buf, vec![0; 4096]);
    assert_eq!(n, 0, "64 reads of holes allocated {n} times");
}
