//! Reading: guest ranges mapped, under the metadata lock, into runs of
//! what they read as (host data, zeroes, the backing file, a compressed
//! cluster), then read without the lock. Block status maps the same way.

use crate::error::{Error, Result};
use crate::io::Io;
use crate::layout::{self, Cluster, Sub};

use super::{Image, Meta, Pass};

/// What a run of guest bytes reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Host bytes starting here.
    Host(u64),
    /// Zeroes.
    Zero,
    /// The backing file at the same guest offset (zeroes without one).
    Backing,
    /// A compressed cluster, from `skip` bytes into its guest cluster.
    Compressed { offset: u64, bytes: u64, skip: u64 },
}

/// A run of guest bytes and what it reads as.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub len: u64,
    pub src: Source,
}

/// Runs mapped in one go: enough for a request to cover many clusters
/// per lookup without allocating.
pub(crate) const RUNS: usize = 64;

/// A fixed set of runs.
pub(crate) struct Runs {
    pub runs: [Run; RUNS],
    pub n: usize,
}

impl Runs {
    pub fn new() -> Runs {
        Runs {
            runs: [Run {
                len: 0,
                src: Source::Zero,
            }; RUNS],
            n: 0,
        }
    }

    /// Append `len` bytes of `src`, merging with the last run where the
    /// bytes continue it; false when full.
    fn push(&mut self, len: u64, src: Source) -> bool {
        if let Some(last) = self.n.checked_sub(1).map(|i| &mut self.runs[i]) {
            let merged = match (last.src, src) {
                (Source::Host(a), Source::Host(b)) => a + last.len == b,
                (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
                _ => false,
            };
            if merged {
                last.len += len;
                return true;
            }
        }
        if self.n == RUNS {
            return false;
        }
        self.runs[self.n] = Run { len, src };
        self.n += 1;
        true
    }

    /// Append host bytes (see `push`).
    pub fn push_host(&mut self, len: u64, host: u64) -> bool {
        self.push(len, Source::Host(host))
    }

    pub fn as_slice(&self) -> &[Run] {
        &self.runs[..self.n]
    }
}

impl Image {
    /// Map `len` bytes at `guest`, within one L2 table, into `runs`, with
    /// the table (0: none) cached and the lock held. Returns the bytes
    /// mapped, which may be fewer when `runs` fills up.
    pub(crate) fn map(
        &self,
        m: &mut Meta,
        table: u64,
        guest: u64,
        len: u64,
        runs: &mut Runs,
    ) -> Result<u64> {
        let geo = &self.geo;
        let unallocated = if self.backing.is_some() {
            Source::Backing
        } else {
            Source::Zero
        };
        if table == 0 {
            runs.push(len, unallocated);
            return Ok(len);
        }
        let data = &m.l2.get(table).expect("the caller loaded the table").data;
        let sc_size = geo.subcluster_size();
        let mut done = 0u64;
        while done < len {
            let at = guest + done;
            let (entry, bitmap) = self.l2_entry(data, geo.l2_index(at));
            let cluster = Cluster::decode(geo, entry)?;
            let in_cluster = at & (geo.cluster_size() - 1);
            let sc = (in_cluster >> geo.subcluster_bits) as u32;
            let in_sub = in_cluster & (sc_size - 1);
            let n = (sc_size - in_sub).min(len - done);
            let src = match layout::subcluster(geo, cluster, bitmap, sc)? {
                Sub::Data(host) => Source::Host(host + in_sub),
                Sub::Zero => Source::Zero,
                Sub::Unallocated => unallocated,
                Sub::Compressed { offset, bytes } => Source::Compressed {
                    offset,
                    bytes,
                    skip: in_cluster,
                },
            };
            // A compressed cluster is one subcluster of the cluster's size.
            let n = match src {
                Source::Compressed { .. } => (geo.cluster_size() - in_cluster).min(len - done),
                _ => n,
            };
            if !runs.push(n, src) {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// The bytes from `guest` to the end of its L2 table's span, at most
    /// `len`.
    pub(crate) fn in_table(&self, guest: u64, len: u64) -> u64 {
        let span = self.geo.l2_span();
        (span - (guest & (span - 1))).min(len)
    }

    /// Look up up to `len` bytes at `guest` (within one L2 table) and
    /// count the caller's I/O: the runs, the bytes mapped, and the pass.
    fn lookup(
        &self,
        io: &dyn Io,
        guest: u64,
        len: u64,
        runs: &mut Runs,
    ) -> Result<(u64, Pass<'_>)> {
        let (mut m, table) = self.lock_l2(io, self.geo.l1_index(guest))?;
        let n = self.map(&mut m, table, guest, len, runs)?;
        let pass = self.pass(&m);
        Ok((n, pass))
    }

    /// Read the guest disk.
    pub fn read(&self, io: &dyn Io, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        let mut runs = Runs::new();
        while done < buf.len() {
            let guest = offset + done as u64;
            let want = self.in_table(guest, (buf.len() - done) as u64);
            runs.n = 0;
            let (n, _pass) = self.lookup(io, guest, want, &mut runs)?;
            let mut at = guest;
            for run in runs.as_slice() {
                let part = &mut buf[(at - offset) as usize..][..run.len as usize];
                self.read_run(io, part, at, run.src)?;
                at += run.len;
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Read one run into `buf` (`guest` is where it starts).
    pub(crate) fn read_run(
        &self,
        io: &dyn Io,
        buf: &mut [u8],
        guest: u64,
        src: Source,
    ) -> Result<()> {
        match src {
            Source::Host(host) => {
                self.read_host(io, buf, host)?;
                if let Some(c) = &self.crypto {
                    c.decrypt(buf, host)?;
                }
                Ok(())
            }
            Source::Zero => {
                buf.fill(0);
                Ok(())
            }
            Source::Backing => self.read_backing(buf, guest),
            Source::Compressed {
                offset,
                bytes,
                skip,
            } => {
                if self.crypto.is_some() {
                    return Err(Error::corrupt("a compressed cluster in an encrypted image"));
                }
                self.decompressor
                    .read(offset, bytes, skip, buf, |b, at| self.read_host(io, b, at))
            }
        }
    }

    /// Read what the backing file holds at `guest`: zeroes without one,
    /// or past its end.
    pub(crate) fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read(buf, guest),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Refuse ranges past the guest disk.
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{len} bytes at {offset} run past the end of the disk ({} bytes)",
                self.geo.size
            ))),
        }
    }

    /// Block status of the guest disk from `offset`: `(length, flags)`
    /// runs in order (flags as NBD's: 1 a hole, 2 reads as zeroes),
    /// covering at least the first byte and at most one L2 table's span,
    /// or one run with `one`.
    pub fn extents(
        &self,
        io: &dyn Io,
        offset: u64,
        len: u64,
        one: bool,
    ) -> Result<Vec<(u64, u32)>> {
        self.check_range(offset, len)?;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut runs = Runs::new();
        let want = self.in_table(offset, len);
        {
            let (mut m, table) = self.lock_l2(io, self.geo.l1_index(offset))?;
            self.map(&mut m, table, offset, want, &mut runs)?;
        }
        let mut at = offset;
        for run in runs.as_slice() {
            match run.src {
                Source::Zero => push(&mut out, run.len, HOLE | ZERO),
                Source::Compressed { .. } => push(&mut out, run.len, 0),
                Source::Backing => match &self.backing {
                    Some(b) => {
                        for (l, f) in b.extents(at, run.len)? {
                            push(&mut out, l, f);
                        }
                    }
                    None => push(&mut out, run.len, HOLE | ZERO),
                },
                // Allocated here, but where the layer below holds nothing
                // it reads as zeroes (a preallocated image) — except
                // encrypted, where nothing decrypts to noise.
                Source::Host(host) if self.crypto.is_none() => {
                    let mut covered = 0;
                    while covered < run.len {
                        let before = covered;
                        for (_, l, zero) in io.holes(host + covered, run.len - covered)? {
                            let l = l.min(run.len - covered);
                            push(&mut out, l, if zero { ZERO } else { 0 });
                            covered += l;
                            if covered == run.len {
                                break;
                            }
                        }
                        if covered == before {
                            push(&mut out, run.len - covered, 0);
                            covered = run.len;
                        }
                    }
                }
                Source::Host(_) => push(&mut out, run.len, 0),
            }
            at += run.len;
            if one && !out.is_empty() {
                break;
            }
        }
        if one {
            out.truncate(1);
        }
        Ok(out)
    }
}

/// Append a block-status run, merging it with the last of the same kind.
fn push(out: &mut Vec<(u64, u32)>, len: u64, flags: u32) {
    match out.last_mut() {
        Some(last) if last.1 == flags => last.0 += len,
        _ => out.push((len, flags)),
    }
}

/// NBD's block-status flag: unallocated.
pub const HOLE: u32 = 1;
/// NBD's block-status flag: reads as zeroes.
pub const ZERO: u32 = 2;
