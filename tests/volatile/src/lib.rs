//! The `volatile` plugin: a file behind a write-back cache that a power
//! cut empties, so the crash tests can see what a format filter left
//! durable and what it only believed it had. Not installed; built only
//! for the test suite.
//!
//! The model, in 512-byte blocks (a disk's sectors: a block is written
//! whole or not at all, and nothing smaller is atomic):
//!
//! - Reads see the file overlaid with every dirty block, whichever
//!   connection wrote it (one cache, as the page cache is one).
//! - Writes, zero writes and trims change only the cache: each block they
//!   touch becomes dirty, holding its whole new content, and remembers
//!   which connections wrote it. A write past the end of the file makes
//!   the disk longer at once for reads; the file grows only when blocks
//!   reach it.
//! - FLUSH writes the dirty blocks back in a random order (or, with
//!   `order=ascending` or `descending`, by offset: a format that grows at
//!   the end of the file usually points from low offsets to high ones,
//!   so ascending order is the cruel one for a pointer written before
//!   what it points to), then `fdatasync`s. With `multi-conn=true` (the default, and what is
//!   advertised) a flush writes back every dirty block; with
//!   `multi-conn=false` only the blocks the flushing connection wrote (a
//!   block another connection wrote too goes back whole, as a page would).
//! - FUA makes its own request durable and nothing else: the bytes of a
//!   FUA write (zeroes, for a FUA zero or trim) go to the file at once,
//!   exactly those bytes and not the rest of the blocks they fall in,
//!   then `fdatasync`. Earlier unflushed writes, even to the same blocks,
//!   stay as volatile as they were (the cache keeps its copies, updated
//!   with the FUA bytes, so a later write-back cannot undo them). Writing
//!   back whole blocks here would make other writes durable early and
//!   hide a missing flush; writing nothing would make FUA a lie.
//! - `crash-after=N`: the N-th call that writes, zeroes, trims or flushes
//!   (counted over all connections from 1) is where the power fails. If
//!   it is a flush, a random part of its write-back reaches the file
//!   first (a random prefix of the order: anything from none to all of
//!   it); any other call changes nothing. Then every dirty block
//!   is dropped, the call fails with `EIO`, and so does every later call
//!   of any kind: the file holds exactly what was durable. `seed=S`
//!   chooses the orders and the prefix, so a run can be repeated.
//! - A clean exit, without a power cut, writes everything back, as the
//!   kernel would: connections may close without flushing.
//! - `trace=FILE` appends a line per counted call (`N write OFFSET LEN
//!   [fua]`, `N flush BLOCKS` with the number of blocks it writes back,
//!   …, and the crash), so a test can run once to see which call numbers
//!   are flushes with something to write and then crash at them.
//!
//! Every call holds one lock: this plugin is for correctness, not speed.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nbdhost_plugin_api::host::LogLevel;
use nbdhost_plugin_api::{
    callbacks, host, nbdhost_plugin, Error, Flags, Handle, Plugin, Result, Support,
};

/// The unit the cache writes back, and of atomicity.
const BLOCK: u64 = 512;

/// The order a flush writes blocks back in.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Order {
    #[default]
    Random,
    Ascending,
    Descending,
}

/// Configuration, then the disk once configured.
#[derive(Default)]
pub struct Volatile {
    path: Option<PathBuf>,
    seed: u64,
    order: Order,
    crash_after: Option<u64>,
    single_conn: bool,
    trace: Option<PathBuf>,
    disk: Option<Arc<Disk>>,
}

/// The file, its cache, and the crash.
struct Disk {
    file: File,
    multi_conn: bool,
    order: Order,
    next_conn: AtomicU64,
    state: Mutex<State>,
}

/// A block of the cache not yet in the file.
struct Dirty {
    data: Box<[u8]>,
    /// The connections that wrote to it since it was last written back.
    writers: Vec<u64>,
}

struct State {
    /// The disk's size as reads see it.
    size: u64,
    /// The file's length.
    file_len: u64,
    /// By block number.
    dirty: BTreeMap<u64, Dirty>,
    /// Counted calls so far.
    calls: u64,
    crash_after: Option<u64>,
    crashed: bool,
    rng: Rng,
    trace: Option<File>,
}

/// splitmix64: small, and the same sequence for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn eio(msg: impl Into<String>) -> Error {
    Error::new(libc::EIO, msg)
}

/// What a counted call does to the cache.
enum Change<'a> {
    Data(&'a [u8]),
    Zeroes(u64),
}

impl Change<'_> {
    fn len(&self) -> u64 {
        match self {
            Change::Data(b) => b.len() as u64,
            Change::Zeroes(n) => *n,
        }
    }
}

impl Disk {
    fn open(
        path: &std::path::Path,
        seed: u64,
        order: Order,
        crash_after: Option<u64>,
        multi_conn: bool,
        trace: Option<File>,
    ) -> Result<Disk> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::new(libc::EINVAL, format!("{}: {e}", path.display())))?;
        let len = file.metadata()?.len();
        Ok(Disk {
            file,
            multi_conn,
            order,
            next_conn: AtomicU64::new(1),
            state: Mutex::new(State {
                size: len,
                file_len: len,
                dirty: BTreeMap::new(),
                calls: 0,
                crash_after,
                crashed: false,
                rng: Rng(seed),
                trace,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fail if the power is already off.
    fn alive(st: &State) -> Result<()> {
        if st.crashed {
            return Err(eio("volatile: the simulated power cut happened"));
        }
        Ok(())
    }

    /// Count a call that changes or syncs the disk; `true` if the power
    /// fails during it.
    fn count(st: &mut State, what: std::fmt::Arguments) -> Result<bool> {
        Self::alive(st)?;
        st.calls += 1;
        let n = st.calls;
        let crash = st.crash_after == Some(n);
        if let Some(t) = &mut st.trace {
            let _ = writeln!(t, "{n} {what}{}", if crash { " crash" } else { "" });
        }
        Ok(crash)
    }

    /// Cut the power: drop the cache; from now on every call fails.
    fn crash(&self, st: &mut State, note: &str) -> Error {
        let lost = st.dirty.len();
        st.dirty.clear();
        st.crashed = true;
        let msg = format!(
            "volatile: power cut at call {}{note}; {lost} unflushed blocks lost",
            st.calls
        );
        host::log(LogLevel::Warning, &msg);
        if let Some(t) = &mut st.trace {
            let _ = writeln!(t, "# {msg}");
            let _ = t.flush();
        }
        eio(msg)
    }

    /// Read the file's bytes at `offset`; past its end, zeroes.
    fn read_file(&self, st: &State, buf: &mut [u8], offset: u64) -> Result<()> {
        let inside = st.file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file.read_exact_at(&mut buf[..inside], offset)?;
        buf[inside..].fill(0);
        Ok(())
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let st = self.lock();
        Self::alive(&st)?;
        let end = offset + buf.len() as u64;
        if end > st.size {
            return Err(eio(format!(
                "read of {} bytes at {offset}: past the end ({})",
                buf.len(),
                st.size
            )));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.read_file(&st, buf, offset)?;
        for (&b, d) in st.dirty.range(offset / BLOCK..=(end - 1) / BLOCK) {
            let (from, to) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&d.data[(from - b * BLOCK) as usize..(to - b * BLOCK) as usize]);
        }
        Ok(())
    }

    /// Apply a change to the cache, as connection `conn`.
    fn cache(&self, st: &mut State, conn: u64, change: &Change, offset: u64) -> Result<()> {
        let end = offset + change.len();
        if change.len() == 0 {
            return Ok(());
        }
        for b in offset / BLOCK..=(end - 1) / BLOCK {
            if !st.dirty.contains_key(&b) {
                let mut data = vec![0u8; BLOCK as usize].into_boxed_slice();
                self.read_file(st, &mut data, b * BLOCK)?;
                st.dirty.insert(
                    b,
                    Dirty {
                        data,
                        writers: Vec::new(),
                    },
                );
            }
            let d = st.dirty.get_mut(&b).expect("inserted above");
            let (from, to) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
            let dst = &mut d.data[(from - b * BLOCK) as usize..(to - b * BLOCK) as usize];
            match change {
                Change::Data(buf) => {
                    dst.copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize])
                }
                Change::Zeroes(_) => dst.fill(0),
            }
            if !d.writers.contains(&conn) {
                d.writers.push(conn);
            }
        }
        Ok(())
    }

    /// Write `buf` to the file itself.
    fn write_file(&self, st: &mut State, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset)?;
        st.file_len = st.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    /// A FUA request's own bytes, durably: exactly them, not the rest of
    /// their blocks.
    fn write_through(&self, st: &mut State, change: &Change, offset: u64) -> Result<()> {
        match change {
            Change::Data(buf) => self.write_file(st, buf, offset)?,
            Change::Zeroes(n) => {
                // Past the file's end it reads as zeroes already.
                let n = (*n).min(st.file_len.saturating_sub(offset));
                if n > 0 {
                    self.write_file(st, &vec![0u8; n as usize], offset)?;
                }
            }
        }
        self.file.sync_data()?;
        Ok(())
    }

    /// A write, zero write or trim from connection `conn`.
    fn change(&self, conn: u64, kind: &str, change: Change, offset: u64, fua: bool) -> Result<()> {
        let mut st = self.lock();
        let len = change.len();
        let fua_note = if fua { " fua" } else { "" };
        if Self::count(&mut st, format_args!("{kind} {offset} {len}{fua_note}"))? {
            return Err(self.crash(&mut st, &format!(" ({kind} {offset} {len}: not applied)")));
        }
        // Zero writes and trims do not make the disk longer.
        let change = match change {
            Change::Zeroes(n) => Change::Zeroes(n.min(st.size.saturating_sub(offset))),
            data => data,
        };
        self.cache(&mut st, conn, &change, offset)?;
        if let Change::Data(b) = change {
            st.size = st.size.max(offset + b.len() as u64);
        }
        if fua {
            self.write_through(&mut st, &change, offset)?;
        }
        Ok(())
    }

    /// Write the dirty blocks back (those `conn` wrote, without
    /// multi-conn) in the configured order, and sync.
    fn flush(&self, conn: u64) -> Result<()> {
        let mut st = self.lock();
        let mut order: Vec<u64> = st
            .dirty
            .iter()
            .filter(|(_, d)| self.multi_conn || d.writers.contains(&conn))
            .map(|(&b, _)| b)
            .collect();
        let crash = Self::count(&mut st, format_args!("flush {}", order.len()))?;
        match self.order {
            Order::Random => {
                for i in (1..order.len()).rev() {
                    let j = st.rng.below(i as u64 + 1) as usize;
                    order.swap(i, j);
                }
            }
            Order::Ascending => {}
            Order::Descending => order.reverse(),
        }
        let count = if crash {
            st.rng.below(order.len() as u64 + 1) as usize
        } else {
            order.len()
        };
        for &b in &order[..count] {
            let d = st.dirty.remove(&b).expect("listed above");
            // The block's bytes up to the disk's end, not past it.
            let n = (st.size - b * BLOCK).min(BLOCK) as usize;
            self.write_file(&mut st, &d.data[..n], b * BLOCK)?;
        }
        self.file.sync_data()?;
        if crash {
            let note = format!(" (flush: {count} of {} blocks written back)", order.len());
            return Err(self.crash(&mut st, &note));
        }
        Ok(())
    }

    /// A clean exit is no power cut: the cache reaches the file, as the
    /// kernel's would (whatever no connection flushed included).
    fn write_back_all(&self) -> Result<()> {
        let mut st = self.lock();
        if st.crashed || st.dirty.is_empty() {
            return Ok(());
        }
        let dirty = std::mem::take(&mut st.dirty);
        for (b, d) in dirty {
            let n = (st.size - b * BLOCK).min(BLOCK) as usize;
            self.write_file(&mut st, &d.data[..n], b * BLOCK)?;
        }
        self.file.sync_data()?;
        Ok(())
    }

    fn size(&self) -> Result<u64> {
        let st = self.lock();
        Self::alive(&st)?;
        Ok(st.size)
    }
}

#[callbacks]
impl Plugin for Volatile {
    const NAME: &'static str = "volatile";
    const DESCRIPTION: &'static str =
        "a file behind a write-back cache lost in a simulated power cut (for tests)";
    const CONFIG_HELP: &'static str = "file=<PATH>        (required) The file.
seed=<N>           Seeds the write-back order and the crash (default 0).
order=random|ascending|descending  Of blocks written back (default random).
crash-after=<N>    The power fails during the N-th write, zero, trim or flush.
multi-conn=<BOOL>  A flush writes back every connection's writes (default true).
trace=<FILE>       Append a line to FILE for each of those calls.";
    const MAGIC_CONFIG_KEY: Option<&'static str> = Some("file");
    type Handle = VolatileHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<()> {
        let num = || {
            value
                .parse::<u64>()
                .map_err(|e| Error::new(libc::EINVAL, format!("{key}={value}: {e}")))
        };
        match key {
            "file" => self.path = Some(PathBuf::from(value)),
            "seed" => self.seed = num()?,
            "order" => {
                self.order = match value {
                    "random" => Order::Random,
                    "ascending" => Order::Ascending,
                    "descending" => Order::Descending,
                    _ => {
                        return Err(Error::new(
                            libc::EINVAL,
                            format!("order={value}: random, ascending or descending"),
                        ))
                    }
                }
            }
            "crash-after" => self.crash_after = Some(num()?),
            "multi-conn" => self.single_conn = !host::parse_bool(key, value)?,
            "trace" => self.trace = Some(PathBuf::from(value)),
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("unknown parameter '{key}'"),
                ))
            }
        }
        Ok(())
    }

    fn config_complete(&mut self) -> Result<()> {
        let path = self
            .path
            .clone()
            .ok_or_else(|| Error::new(libc::EINVAL, "file= is required"))?;
        let trace = match &self.trace {
            Some(t) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(t)
                    .map_err(|e| Error::new(libc::EINVAL, format!("{}: {e}", t.display())))?,
            ),
            None => None,
        };
        self.disk = Some(Arc::new(Disk::open(
            &path,
            self.seed,
            self.order,
            self.crash_after,
            !self.single_conn,
            trace,
        )?));
        Ok(())
    }

    fn unload(&mut self) {
        if let Some(d) = &self.disk {
            if let Err(e) = d.write_back_all() {
                host::log(
                    LogLevel::Error,
                    &format!("volatile: writing back at exit: {e:?}"),
                );
            }
        }
    }

    fn open(&self, _readonly: bool) -> Result<VolatileHandle> {
        let disk = self
            .disk
            .clone()
            .ok_or_else(|| Error::new(libc::EINVAL, "not configured"))?;
        let conn = disk.next_conn.fetch_add(1, Ordering::Relaxed);
        Ok(VolatileHandle { disk, conn })
    }
}

/// One connection: the shared disk, and who is writing.
pub struct VolatileHandle {
    disk: Arc<Disk>,
    conn: u64,
}

#[callbacks]
impl Handle for VolatileHandle {
    fn get_size(&self) -> Result<u64> {
        self.disk.size()
    }
    fn can_write(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(self.disk.multi_conn)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.disk.read(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let fua = flags.contains(Flags::FUA);
        self.disk
            .change(self.conn, "write", Change::Data(buf), offset, fua)
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        self.disk.flush(self.conn)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let fua = flags.contains(Flags::FUA);
        self.disk
            .change(self.conn, "trim", Change::Zeroes(count), offset, fua)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let fua = flags.contains(Flags::FUA);
        self.disk
            .change(self.conn, "zero", Change::Zeroes(count), offset, fua)
    }
}

nbdhost_plugin!(Volatile);

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes holding `fill`, removed on drop.
    struct Temp(PathBuf);
    impl Temp {
        fn new(tag: &str, len: usize, fill: u8) -> Temp {
            let p =
                std::env::temp_dir().join(format!("nbdhost-volatile-{tag}-{}", std::process::id()));
            std::fs::write(&p, vec![fill; len]).unwrap();
            Temp(p)
        }
        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn disk(t: &Temp, crash_after: Option<u64>, multi_conn: bool) -> Disk {
        Disk::open(&t.0, 7, Order::Random, crash_after, multi_conn, None).unwrap()
    }

    fn read(d: &Disk, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        d.read(&mut v, offset).unwrap();
        v
    }

    #[test]
    fn writes_are_seen_at_once_and_reach_the_file_only_at_a_flush() {
        let t = Temp::new("flush", 4096, 1);
        let d = disk(&t, None, true);
        d.change(1, "write", Change::Data(&[2; 100]), 1000, false)
            .unwrap();
        d.change(1, "zero", Change::Zeroes(10), 1050, false)
            .unwrap();
        assert_eq!(read(&d, 1000, 50), vec![2; 50]);
        assert_eq!(read(&d, 1050, 10), vec![0; 10]);
        assert_eq!(t.bytes(), vec![1; 4096]);
        d.flush(1).unwrap();
        let f = t.bytes();
        assert_eq!(&f[1000..1050], &[2; 50]);
        assert_eq!(&f[1050..1060], &[0; 10]);
        assert_eq!(&f[1060..1100], &[2; 40]);
        assert_eq!(f[999], 1);
        assert_eq!(f[1100], 1);
    }

    #[test]
    fn fua_makes_only_its_own_bytes_durable() {
        let t = Temp::new("fua", 4096, 1);
        let d = disk(&t, None, true);
        d.change(1, "write", Change::Data(&[2; 512]), 0, false)
            .unwrap();
        d.change(1, "write", Change::Data(&[3; 10]), 100, true)
            .unwrap();
        let f = t.bytes();
        assert_eq!(&f[100..110], &[3; 10]);
        assert_eq!(&f[..100], &[1; 100][..]);
        assert_eq!(&f[110..512], &[1; 402][..]);
        assert_eq!(read(&d, 95, 20), [&[2; 5][..], &[3; 10], &[2; 5]].concat());
    }

    #[test]
    fn a_crash_in_a_flush_writes_back_some_whole_blocks_and_then_everything_fails() {
        let t = Temp::new("crash", 64 * 512, 0);
        let d = disk(&t, Some(2), true);
        d.change(1, "write", Change::Data(&[9; 64 * 512]), 0, false)
            .unwrap();
        assert_eq!(d.flush(1).unwrap_err().raw_errno(), libc::EIO);
        let f = t.bytes();
        for block in f.chunks(512) {
            assert!(block == [0; 512] || block == [9; 512]);
        }
        let mut buf = [0u8; 1];
        assert!(d.read(&mut buf, 0).is_err());
        assert!(d.flush(1).is_err());
        assert!(d.size().is_err());
    }

    #[test]
    fn a_crash_in_a_write_applies_nothing() {
        let t = Temp::new("crashw", 1024, 0);
        let d = disk(&t, Some(1), true);
        assert!(d
            .change(1, "write", Change::Data(&[9; 10]), 0, true)
            .is_err());
        assert_eq!(t.bytes(), vec![0; 1024]);
    }

    #[test]
    fn writes_past_the_end_grow_the_disk_and_the_file_only_when_flushed() {
        let t = Temp::new("grow", 1000, 1);
        let d = disk(&t, None, true);
        d.change(1, "write", Change::Data(&[2; 100]), 1500, false)
            .unwrap();
        assert_eq!(d.size().unwrap(), 1600);
        assert_eq!(read(&d, 990, 20), [[1; 10], [0; 10]].concat());
        assert_eq!(t.bytes().len(), 1000);
        d.change(1, "zero", Change::Zeroes(1000), 1550, false)
            .unwrap();
        assert_eq!(d.size().unwrap(), 1600);
        d.flush(1).unwrap();
        let f = t.bytes();
        assert_eq!(f.len(), 1600);
        assert_eq!(&f[1000..1500], &[0; 500][..]);
        assert_eq!(&f[1500..1550], &[2; 50][..]);
    }

    #[test]
    fn without_multi_conn_a_flush_writes_back_only_its_connections_blocks() {
        let t = Temp::new("single", 4096, 0);
        let d = disk(&t, None, false);
        d.change(1, "write", Change::Data(&[1; 512]), 0, false)
            .unwrap();
        d.change(2, "write", Change::Data(&[2; 512]), 512, false)
            .unwrap();
        d.flush(1).unwrap();
        let f = t.bytes();
        assert_eq!(&f[..512], &[1; 512][..]);
        assert_eq!(&f[512..1024], &[0; 512][..]);
        d.flush(2).unwrap();
        assert_eq!(&t.bytes()[512..1024], &[2; 512][..]);
    }
}
