//! The qcow2 engine writing an image in memory, against a model of the
//! guest disk. The first byte picks a template made by qemu-img
//! (`fuzz/qcow2-seeds`: clusters of 512 B to 64 KiB, 1- to 64-bit
//! refcounts, versions 2 and 3, extended L2 entries, some with data,
//! compressed clusters and zero clusters written by qemu-io, some with an
//! internal snapshot sharing clusters with the active image); the next
//! picks the cache sizes and the I/O options, the third the flushes
//! crashes are simulated at (below); the rest is a sequence of
//! writes (some FUA), write-zeroes (with and without unmap, fast or not),
//! trims, flushes, reads and block-status calls at offsets and lengths
//! of every alignment.
//!
//! Checked, besides no panic and no error but a fast zero's "not fast":
//!
//! - every read returns what the model says: written bytes, zeroes after
//!   a write-zeroes, and after a trim zeroes over whole units
//!   (subclusters, or clusters) and the old bytes elsewhere, as
//!   `image/discard.rs` does it without a backing file (a compressed
//!   cluster only partly trimmed keeps its data); a failed fast zero
//!   leaves each byte old or zero, and the next read decides;
//! - block status never calls non-zero bytes zero;
//! - after every step, the image as it lies in memory (every write the
//!   engine made, flushed or not) passes the refcount check with no
//!   corruption: the metadata order leaves leaks at worst;
//! - so does the image a crash at a flush would leave (every fourth
//!   flush, which ones the third byte picks): what was durable, plus any
//!   of the writes since, each whole, dropped or torn into some of its
//!   512-byte sectors;
//! - after a flush (after every step, or only where the input asks, so
//!   that changes also pile up in the caches between flushes), no leak
//!   either;
//! - at the end, the image reopened from its bytes reads as the model,
//!   and passes the check clean.

#![no_main]

#[path = "qcow2_io/mod.rs"]
mod qcow2_io;

use std::cell::{Cell, RefCell};

use libfuzzer_sys::fuzz_target;
use qcow2_io::MemIo;
use qcow2filter::check::{self, Report};
use qcow2filter::error::Error;
use qcow2filter::image::{Image, Options};
use qcow2filter::io::Io;

/// `(name, image, written)`: the images `fuzz/qcow2-seeds` makes, in its
/// order; `written` ones hold [`WRITES`].
const TEMPLATES: &[(&str, &[u8], bool)] = &[
    (
        "v3-64k",
        include_bytes!("../templates/qcow2/v3-64k.qcow2"),
        false,
    ),
    (
        "v3-4k",
        include_bytes!("../templates/qcow2/v3-4k.qcow2"),
        false,
    ),
    (
        "v3-512",
        include_bytes!("../templates/qcow2/v3-512.qcow2"),
        false,
    ),
    (
        "v3-512-rc1",
        include_bytes!("../templates/qcow2/v3-512-rc1.qcow2"),
        false,
    ),
    (
        "v3-4k-rc64",
        include_bytes!("../templates/qcow2/v3-4k-rc64.qcow2"),
        false,
    ),
    (
        "v2-4k",
        include_bytes!("../templates/qcow2/v2-4k.qcow2"),
        false,
    ),
    (
        "v2-512",
        include_bytes!("../templates/qcow2/v2-512.qcow2"),
        false,
    ),
    (
        "ext-16k",
        include_bytes!("../templates/qcow2/ext-16k.qcow2"),
        false,
    ),
    (
        "ext-64k",
        include_bytes!("../templates/qcow2/ext-64k.qcow2"),
        false,
    ),
    (
        "v3-4k-data",
        include_bytes!("../templates/qcow2/v3-4k-data.qcow2"),
        true,
    ),
    (
        "v2-4k-data",
        include_bytes!("../templates/qcow2/v2-4k-data.qcow2"),
        true,
    ),
    (
        "ext-16k-data",
        include_bytes!("../templates/qcow2/ext-16k-data.qcow2"),
        true,
    ),
    (
        "v3-4k-snap",
        include_bytes!("../templates/qcow2/v3-4k-snap.qcow2"),
        true,
    ),
    (
        "ext-16k-snap",
        include_bytes!("../templates/qcow2/ext-16k-snap.qcow2"),
        true,
    ),
    (
        "v3-512-rc16-snap",
        include_bytes!("../templates/qcow2/v3-512-rc16-snap.qcow2"),
        true,
    ),
    (
        "v3-4k-zstd-data",
        include_bytes!("../templates/qcow2/v3-4k-zstd-data.qcow2"),
        true,
    ),
];

/// What qemu-io wrote to the written templates: `(pattern, offset,
/// length, compressed)`, `None` for `write -z` (as `WRITES` in
/// fuzz/qcow2-seeds).
const WRITES: &[(Option<u8>, u64, u64, bool)] = &[
    (Some(0x5a), 0, 100 << 10, false),
    (Some(0xc3), 1024 << 10, 64 << 10, true),
    (None, 1536 << 10, 64 << 10, false),
    (Some(0x77), 1800 << 10, 4 << 10, false),
];

/// Work the check may do per call: far more than a template needs.
const CHECK_WORK: u64 = 1 << 26;

/// Whether a guest cluster holds compressed data (a trim that covers
/// only part of it leaves it alone with extended L2 entries).
#[derive(Clone, Copy, PartialEq)]
enum Compressed {
    No,
    Yes,
    Maybe,
}

/// The guest disk as it should read.
struct Model {
    data: Vec<u8>,
    /// The byte may also read as zero (a fast zero failed part-way).
    maybe_zero: Vec<bool>,
    compressed: Vec<Compressed>,
    cluster: u64,
    /// What a trim clears whole: a subcluster, or a cluster.
    unit: u64,
    extended: bool,
}

impl Model {
    fn clusters(&self, at: u64, len: u64) -> std::ops::Range<usize> {
        (at / self.cluster) as usize..(at + len).div_ceil(self.cluster) as usize
    }

    fn set(&mut self, at: u64, bytes: &[u8]) {
        let r = at as usize..at as usize + bytes.len();
        self.data[r.clone()].copy_from_slice(bytes);
        self.maybe_zero[r].fill(false);
        for c in self.clusters(at, bytes.len() as u64) {
            self.compressed[c] = Compressed::No;
        }
    }

    fn zero(&mut self, at: u64, len: u64) {
        let r = at as usize..(at + len) as usize;
        self.data[r.clone()].fill(0);
        self.maybe_zero[r].fill(false);
        for c in self.clusters(at, len) {
            self.compressed[c] = Compressed::No;
        }
    }

    /// The whole units of `[at, at + len)`.
    fn units(&self, at: u64, len: u64) -> Option<(u64, u64)> {
        let (u0, u1) = (
            at.div_ceil(self.unit) * self.unit,
            (at + len) / self.unit * self.unit,
        );
        (u0 < u1).then_some((u0, u1))
    }

    /// A trim: whole units read as zeroes, except in a compressed cluster
    /// that is not trimmed whole.
    fn trim(&mut self, at: u64, len: u64) {
        let Some((u0, u1)) = self.units(at, len) else {
            return;
        };
        let cs = self.cluster;
        let mut c0 = u0 / cs * cs;
        while c0 < u1 {
            let (a, b) = (u0.max(c0), u1.min(c0 + cs));
            let ci = (c0 / cs) as usize;
            let whole = (a, b) == (c0, c0 + cs);
            match self.compressed[ci] {
                Compressed::Yes if self.extended && !whole => {}
                Compressed::Maybe if self.extended && !whole => {
                    self.maybe_zero[a as usize..b as usize].fill(true);
                }
                _ => {
                    self.data[a as usize..b as usize].fill(0);
                    self.maybe_zero[a as usize..b as usize].fill(false);
                    if whole {
                        self.compressed[ci] = Compressed::No;
                    }
                }
            }
            c0 += cs;
        }
    }

    /// A fast zero that failed: its whole units may have been cleared.
    fn maybe_zeroed(&mut self, at: u64, len: u64) {
        let Some((u0, u1)) = self.units(at, len) else {
            return;
        };
        self.maybe_zero[u0 as usize..u1 as usize].fill(true);
        for c in self.clusters(u0, u1 - u0) {
            if self.compressed[c] == Compressed::Yes {
                self.compressed[c] = Compressed::Maybe;
            }
        }
    }

    /// Compare what was read at `at` and learn what a failed fast zero
    /// did.
    fn compare(&mut self, got: &[u8], at: u64, what: &str) {
        let r = at as usize..at as usize + got.len();
        if got == &self.data[r.clone()] {
            self.maybe_zero[r].fill(false);
            return;
        }
        for (i, &g) in got.iter().enumerate() {
            let j = at as usize + i;
            let ok = g == self.data[j] || (self.maybe_zero[j] && g == 0);
            assert!(
                ok,
                "{what}: byte {j} reads {g:#x}, the model has {:#x}{}",
                self.data[j],
                if self.maybe_zero[j] { " or 0" } else { "" }
            );
            self.data[j] = g;
            self.maybe_zero[j] = false;
        }
    }
}

/// The bytes a write puts at guest offset `at`: each 512-byte sector
/// different, so a misplaced sector shows.
fn pattern(p: u8, at: u64, len: u64) -> Vec<u8> {
    (at..at + len)
        .map(|g| p.wrapping_add((g >> 9) as u8).wrapping_mul(3) ^ (g as u8 & 7))
        .collect()
}

/// A byte-oriented reader of the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..4 {
            v = v << 8 | u32::from(self.byte()?);
        }
        Some(v)
    }

    /// An offset and a length inside a disk of `size`, both multiples of
    /// a unit the input picks (1 B to 64 KiB), the length at most `max`.
    fn range(&mut self, size: u64, max: u64) -> Option<(u64, u64)> {
        const UNITS: [u64; 6] = [1, 512, 4096, 16384, 65536, 3 * 512];
        let unit = UNITS[usize::from(self.byte()?) % UNITS.len()];
        let at = u64::from(self.u32()?) % (size / unit) * unit;
        let len = (u64::from(self.u32()?) % (max / unit) + 1) * unit;
        Some((at, len.min(size - at)))
    }
}

/// The image over a disk with a volatile write cache: the writes since
/// the last flush are kept aside, so that at every fourth flush (which
/// ones, the input picks) the image can be made as a crash there could
/// leave it: what the previous flush made durable, plus any of the
/// writes since (each whole, dropped, or torn into some of its 512-byte
/// sectors, as the input picks).
struct CrashIo {
    mem: MemIo,
    /// Writes since the last flush.
    pending: RefCell<Vec<Pending>>,
    flushes: Cell<u32>,
    /// Crash at the flushes `n` with `(n + crash_at) % 4 == 0`, keeping
    /// the writes `keep` (and `n`) pick.
    crash_at: u32,
    keep: u64,
    /// The images those crashes left, by flush.
    crashed: RefCell<Vec<(u32, Vec<u8>)>>,
}

/// A write not yet flushed: where, the bytes it replaced (those inside
/// the image then) and the image's size then, and its own bytes.
struct Pending {
    offset: u64,
    old: Vec<u8>,
    size_before: u64,
    new: Vec<u8>,
}

impl CrashIo {
    fn record(&self, offset: u64, new: Vec<u8>) {
        let size_before = self.mem.size().expect("memory");
        let inside = size_before.saturating_sub(offset).min(new.len() as u64);
        let mut old = vec![0u8; inside as usize];
        if inside > 0 {
            self.mem.read_at(&mut old, offset).expect("inside");
        }
        self.pending.borrow_mut().push(Pending {
            offset,
            old,
            size_before,
            new,
        });
    }

    /// The image after a crash now, keeping what `keep` picks of the
    /// pending writes.
    fn crash_image(&self, keep: u64) -> Vec<u8> {
        let pending = self.pending.borrow();
        let mut img = self.mem.bytes();
        for p in pending.iter().rev() {
            let at = p.offset as usize;
            img[at..at + p.old.len()].copy_from_slice(&p.old);
            img.truncate(p.size_before as usize);
        }
        let mut x = keep | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for p in pending.iter() {
            let mode = next() % 4;
            if mode == 0 {
                continue;
            }
            let end = p.offset as usize + p.new.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            let mut at = p.offset as usize;
            while at < end {
                let sector_end = ((at / 512 + 1) * 512).min(end);
                if mode != 3 || next() & 1 == 1 {
                    let from = at - p.offset as usize;
                    img[at..sector_end].copy_from_slice(&p.new[from..from + sector_end - at]);
                }
                at = sector_end;
            }
        }
        img
    }
}

impl Io for CrashIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2filter::error::Result<()> {
        self.mem.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> qcow2filter::error::Result<()> {
        self.record(offset, buf.to_vec());
        self.mem.write_at(buf, offset, fua)
    }

    fn flush(&self) -> qcow2filter::error::Result<()> {
        let n = self.flushes.get() + 1;
        self.flushes.set(n);
        if (n + self.crash_at) % 4 == 0 {
            let keep = self.keep ^ u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let img = self.crash_image(keep);
            self.crashed.borrow_mut().push((n, img));
        }
        self.pending.borrow_mut().clear();
        self.mem.flush()
    }

    fn zero(&self, len: u64, offset: u64) -> qcow2filter::error::Result<()> {
        let size = self.mem.size()?;
        let inside = size.saturating_sub(offset).min(len);
        if inside > 0 {
            self.record(offset, vec![0u8; inside as usize]);
        }
        self.mem.zero(len, offset)
    }

    fn size(&self) -> qcow2filter::error::Result<u64> {
        self.mem.size()
    }

    fn holes(&self, offset: u64, len: u64) -> qcow2filter::error::Result<Vec<(u64, u64, bool)>> {
        self.mem.holes(offset, len)
    }
}

fn check_image(io: &dyn Io, when: &str, clean: bool) -> Report {
    let r = check::check_bounded(io, CHECK_WORK)
        .unwrap_or_else(|e| panic!("{when}: the check failed: {e}"));
    assert!(r.corruptions == 0, "{when}: corruption:\n{r}");
    if clean {
        assert!(r.is_clean(), "{when}: leaks:\n{r}");
    }
    r
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(t) = input.byte() else {
        return;
    };
    let (name, template, written) = TEMPLATES[usize::from(t) % TEMPLATES.len()];
    let opts_byte = input.byte().unwrap_or(0);
    let crash_at = u32::from(input.byte().unwrap_or(0));
    let io = CrashIo {
        mem: MemIo::new(template.to_vec(), true),
        pending: RefCell::new(Vec::new()),
        flushes: Cell::new(0),
        crash_at,
        keep: data.iter().fold(0x9e37_79b9_7f4a_7c15u64, |a, &b| {
            (a ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }),
        crashed: RefCell::new(Vec::new()),
    };
    let (h, first) = Image::read_header(&io).expect("a template's header");
    let cs = h.cluster_size();
    let opts = Options {
        l2_cache: cs * u64::from(2 + opts_byte % 8),
        refcount_cache: cs * u64::from(2 + (opts_byte >> 3) % 4),
        shared_flush: opts_byte & 0x20 == 0,
        align: if opts_byte & 0x40 != 0 { 512 } else { 1 },
    };
    // Flush after every step, or only at the input's flushes and FUA.
    let flush_often = opts_byte & 0x80 == 0;
    let image = Image::open(&io, h, &first, opts, None, None).expect("a template opens");
    image.make_writable(&io).expect("a template is writable");
    let size = image.size();
    let geo = *image.geometry();
    let mut model = Model {
        data: vec![0; size as usize],
        maybe_zero: vec![false; size as usize],
        compressed: vec![Compressed::No; size.div_ceil(cs) as usize],
        cluster: cs,
        unit: geo.subcluster_size(),
        extended: geo.extended,
    };
    if written {
        for &(p, at, len, compressed) in WRITES {
            match p {
                Some(p) => model.data[at as usize..(at + len) as usize].fill(p),
                None => model.data[at as usize..(at + len) as usize].fill(0),
            }
            if compressed {
                for c in model.clusters(at, len) {
                    model.compressed[c] = Compressed::Yes;
                }
            }
        }
    }

    let mut step = 0;
    while let Some(op) = input.byte() {
        step += 1;
        let what = format!("{name}, step {step}");
        match op % 8 {
            0 | 1 => {
                let Some((at, len)) = input.range(size, 256 << 10) else {
                    break;
                };
                let p = input.byte().unwrap_or(0);
                let fua = op & 0x10 != 0;
                let bytes = pattern(p, at, len);
                image
                    .write(&io, &bytes, at, fua)
                    .unwrap_or_else(|e| panic!("{what}: write {len} at {at}: {e}"));
                model.set(at, &bytes);
            }
            2 => {
                let Some((at, len)) = input.range(size, size) else {
                    break;
                };
                let (unmap, fast, fua) = (op & 0x10 != 0, op & 0x20 != 0, op & 0x40 != 0);
                match image.zero(&io, at, len, unmap, fast, fua) {
                    Ok(()) => model.zero(at, len),
                    Err(Error::NotFast) if fast => model.maybe_zeroed(at, len),
                    Err(e) => {
                        panic!("{what}: zero {len} at {at} (unmap {unmap}, fast {fast}): {e}")
                    }
                }
            }
            3 => {
                let Some((at, len)) = input.range(size, size) else {
                    break;
                };
                image
                    .trim(&io, at, len, op & 0x10 != 0)
                    .unwrap_or_else(|e| panic!("{what}: trim {len} at {at}: {e}"));
                model.trim(at, len);
            }
            4 => {
                image
                    .flush(&io)
                    .unwrap_or_else(|e| panic!("{what}: flush: {e}"));
                check_image(&io, &format!("{what}, its flush"), true);
            }
            5 | 6 => {
                let Some((at, len)) = input.range(size, 256 << 10) else {
                    break;
                };
                let mut buf = vec![0u8; len as usize];
                image
                    .read(&io, &mut buf, at)
                    .unwrap_or_else(|e| panic!("{what}: read {len} at {at}: {e}"));
                model.compare(&buf, at, &format!("{what}: read {len} at {at}"));
            }
            _ => {
                let Some((at, len)) = input.range(size, size) else {
                    break;
                };
                let runs = image
                    .extents(&io, at, len, op & 0x10 != 0)
                    .unwrap_or_else(|e| panic!("{what}: extents {len} at {at}: {e}"));
                assert!(!runs.is_empty(), "{what}: no extents at {at}");
                let mut off = at;
                for (l, flags) in runs {
                    assert!(l > 0 && off + l <= at + len, "{what}: extent {l} at {off}");
                    if flags & qcow2filter::image::ZERO != 0 {
                        let zeroes = vec![0u8; l as usize];
                        model.compare(
                            &zeroes,
                            off,
                            &format!("{what}: extent {l} at {off} said zero"),
                        );
                    }
                    off += l;
                }
            }
        }
        // Every write the engine made has landed: no corruption.
        check_image(&io, &format!("{what}, as written"), false);
        // Nor where a crash at the chosen flush left some of them.
        for (n, img) in io.crashed.take() {
            let crashed = MemIo::new(img, false);
            check_image(&crashed, &format!("{what}, crashed at flush {n}"), false);
        }
        if flush_often {
            image
                .flush(&io)
                .unwrap_or_else(|e| panic!("{what}: flush: {e}"));
            check_image(&io, &format!("{what}, flushed"), true);
        }
    }

    image.flush(&io).expect("the last flush");
    check_image(&io, &format!("{name}, at the end"), true);
    drop(image);

    // Reopened from its bytes, it reads as the model.
    let io = MemIo::new(io.mem.bytes(), false);
    let (h, first) = Image::read_header(&io).expect("the header, reopened");
    let image = Image::open(&io, h, &first, Options::default(), None, None).expect("reopened");
    let mut buf = vec![0u8; size as usize];
    image
        .read(&io, &mut buf, 0)
        .expect("the whole disk, reopened");
    model.compare(&buf, 0, &format!("{name}, reopened"));
});
