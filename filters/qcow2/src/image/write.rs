//! Writing: in place where a cluster is this image's alone and its
//! subclusters are allocated; otherwise by allocating (a new cluster,
//! copying on write what the write does not cover from the old cluster,
//! the backing file, a compressed cluster or a snapshot's shared one) and
//! then pointing the L2 entry at it once the data is written.

use std::cell::RefCell;

use crate::error::Result;
use crate::io::Io;
use crate::layout::{self, Cluster, Sub, ALLOC_BITS, COPIED};

use super::map::{Runs, Source};
use super::{Image, Meta};

thread_local! {
    /// Bounce buffer for encrypting a client's data before it is written.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What one write does to one guest cluster.
struct Plan {
    /// The guest cluster.
    cluster: u64,
    /// Its index in the L2 table.
    index: usize,
    /// The bytes of the cluster the client's data covers.
    a: u64,
    b: u64,
    /// The old entry, as decoded, and its bitmap.
    old: Cluster,
    bitmap: u64,
    /// Where the cluster's data goes; 0 until allocated.
    host: u64,
    /// The old allocation stays (in place) or is freed once the new
    /// entry is durable.
    replace: bool,
    /// A new cluster whose old content is all zeroes and which reads as
    /// zeroes already.
    fresh: bool,
}

/// A write to the layer below: where, and the bytes (the client's
/// buffer, by range, or a buffer of its own).
enum Op {
    Client { host: u64, from: usize, to: usize },
    Owned { host: u64, data: Vec<u8> },
}

impl Image {
    /// Write to the guest disk; with `fua`, durably.
    pub fn write(&self, io: &dyn Io, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let n = self.in_table(guest, (buf.len() - done) as u64) as usize;
            self.write_in_table(io, &buf[done..done + n], guest)?;
            done += n;
        }
        self.flush_if_needed(io)?;
        if fua {
            self.flush_metadata(io)?;
        }
        Ok(())
    }

    /// Write `buf` at `guest`, all within one L2 table's span.
    pub(crate) fn write_in_table(&self, io: &dyn Io, buf: &[u8], guest: u64) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let l1_index = self.geo.l1_index(guest);
        let end = guest + buf.len() as u64;
        let mut done = 0u64;
        let mut runs = Runs::new();
        while guest + done < end {
            let at = guest + done;
            let (mut m, table) = self.lock_l2(io, l1_index)?;
            if ((at >> cb)..=((end - 1) >> cb)).any(|c| m.in_flight.contains(&c)) {
                drop(self.wait(m));
                continue;
            }
            runs.n = 0;
            let n = if table == 0 {
                0
            } else {
                self.map_in_place(&mut m, table, at, end - at, &mut runs)?
            };
            if n > 0 {
                let _pass = self.pass(&m);
                drop(m);
                let mut host_at = at;
                for run in runs.as_slice() {
                    let Source::Host(host) = run.src else {
                        unreachable!("map_in_place maps only host runs")
                    };
                    let from = (host_at - guest) as usize;
                    self.write_data(io, &buf[from..from + run.len as usize], host)?;
                    host_at += run.len;
                }
                done += n;
                continue;
            }
            done += self.write_allocating(io, m, table, &buf[done as usize..], at)?;
        }
        Ok(())
    }

    /// Like `map`, but only the bytes that can be written in place, up to
    /// the first that cannot.
    fn map_in_place(
        &self,
        m: &mut Meta,
        table: u64,
        guest: u64,
        len: u64,
        runs: &mut Runs,
    ) -> Result<u64> {
        let geo = self.geo;
        let data = &m.l2.get(table).expect("the caller loaded the table").data;
        let mut done = 0u64;
        while done < len {
            let at = guest + done;
            let (entry, bitmap) = self.l2_entry(data, geo.l2_index(at));
            let Cluster::Normal { copied: true, .. } = Cluster::decode(&geo, entry)? else {
                break;
            };
            let in_cluster = at & (geo.cluster_size() - 1);
            let sc = (in_cluster >> geo.subcluster_bits) as u32;
            let in_sub = in_cluster & (geo.subcluster_size() - 1);
            let Sub::Data(host) =
                layout::subcluster(&geo, Cluster::decode(&geo, entry)?, bitmap, sc)?
            else {
                break;
            };
            let n = (geo.subcluster_size() - in_sub).min(len - done);
            if !runs.push_host(n, host + in_sub) {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// Write the clusters from `at` on (to the end of `buf`, within one L2
    /// table) that need their L2 entries changed; returns the bytes done.
    fn write_allocating(
        &self,
        io: &dyn Io,
        mut m: std::sync::MutexGuard<'_, Meta>,
        table: u64,
        buf: &[u8],
        at: u64,
    ) -> Result<u64> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let table = self.own_l2(&mut m, io, geo.l1_index(at), table)?;
        let end = at + buf.len() as u64;
        let mut plans = Vec::new();
        for cluster in (at >> geo.cluster_bits)..=((end - 1) >> geo.cluster_bits) {
            let start = cluster << geo.cluster_bits;
            let a = at.max(start) - start;
            let b = end.min(start + cs) - start;
            let index = geo.l2_index(start);
            let data = &m.l2.get(table).expect("owned just now").data;
            let (entry, bitmap) = self.l2_entry(data, index);
            let old = Cluster::decode(&geo, entry)?;
            let (host, replace) = match old {
                Cluster::Normal { host, copied: true } => (host, false),
                Cluster::Zero { host, copied: true } if host != 0 => (host, false),
                _ => (0, true),
            };
            plans.push(Plan {
                cluster,
                index,
                a,
                b,
                old,
                bitmap,
                host,
                replace,
                fresh: false,
            });
        }
        let mut left = plans.iter().filter(|p| p.replace).count() as u64;
        let mut wanting = plans.iter_mut().filter(|p| p.replace);
        while left > 0 {
            let (first, count, fresh) = self.alloc_run(&mut m, io, left)?;
            left -= count;
            for (i, p) in wanting.by_ref().take(count as usize).enumerate() {
                p.host = first + i as u64 * cs;
                p.fresh = fresh;
            }
        }
        for p in &plans {
            m.in_flight.insert(p.cluster);
        }
        m.l2.pin(table);
        let pass = self.pass(&m);
        drop(m);

        let written = self.write_plans(io, &plans, buf, at);
        let written = written.and_then(|()| {
            if self.opts.shared_flush {
                Ok(())
            } else {
                io.flush()
            }
        });
        drop(pass);

        let mut m = self.lock();
        for p in &plans {
            m.in_flight.remove(&p.cluster);
        }
        m.l2.unpin(table);
        self.changed.notify_all();
        if let Err(e) = written {
            // Nothing points at the new clusters: give them back now (a
            // failure here only leaks them).
            for p in plans.iter().filter(|p| p.replace) {
                let _ = self.adjust(&mut m, io, p.host >> geo.cluster_bits, false);
            }
            return Err(e);
        }
        let gen = m.change();
        for p in &plans {
            let (entry, bitmap) = self.new_entry(p);
            let t = m.l2.get(table).expect("pinned");
            self.set_l2_entry(&mut t.data, p.index, entry, bitmap);
            t.dirty = Some(gen);
            if p.replace {
                if let Some(old) = p.old.allocation(&geo) {
                    m.frees.push(old);
                }
            }
        }
        Ok(buf.len() as u64)
    }

    /// The L2 entry (and bitmap) a written cluster gets.
    fn new_entry(&self, p: &Plan) -> (u64, u64) {
        let entry = p.host | COPIED;
        if !self.geo.extended {
            return (entry, 0);
        }
        let (s0, s1) = self.touched(p);
        let touched = layout::bits(s0, s1 - s0, 0);
        let bitmap = match p.old {
            // The whole cluster was rewritten.
            Cluster::Compressed { .. } => ALLOC_BITS,
            _ => (p.bitmap | touched) & !(touched << 32),
        };
        (entry, bitmap)
    }

    /// The subclusters `[s0, s1)` a plan's bytes touch.
    fn touched(&self, p: &Plan) -> (u32, u32) {
        let sb = self.geo.subcluster_bits;
        ((p.a >> sb) as u32, p.b.div_ceil(1 << sb) as u32)
    }

    /// The bytes of the cluster a plan writes: just the client's where
    /// nothing else is needed, otherwise whole subclusters (extended
    /// entries) or the whole cluster, filled with what it read as before.
    fn window(&self, p: &Plan) -> (u64, u64) {
        let cs = self.geo.cluster_size();
        let old_reads_zero = match p.old {
            Cluster::Zero { .. } => true,
            Cluster::Unallocated => self.backing.is_none(),
            _ => false,
        };
        let in_place = !p.replace && matches!(p.old, Cluster::Normal { .. });
        if self.geo.extended {
            let ss = self.geo.subcluster_size();
            match p.old {
                Cluster::Compressed { .. } => (0, cs),
                // A snapshot's cluster: copy what this image keeps of it.
                Cluster::Normal { .. } if p.replace => (0, cs),
                _ => (p.a / ss * ss, p.b.div_ceil(ss) * ss),
            }
        } else if in_place || (p.fresh && old_reads_zero && self.crypto.is_none()) {
            // (Unwritten bytes of a fresh cluster read as zeroes, which an
            // encrypted image must store encrypted, like any others.)
            (p.a, p.b)
        } else {
            (0, cs)
        }
    }

    /// Do the data I/O of a set of plans.
    fn write_plans(&self, io: &dyn Io, plans: &[Plan], buf: &[u8], at: u64) -> Result<()> {
        let mut ops: Vec<Op> = Vec::with_capacity(plans.len());
        for p in plans {
            let start = p.cluster << self.geo.cluster_bits;
            let from = (start + p.a - at) as usize;
            let to = (start + p.b - at) as usize;
            let (w0, w1) = self.window(p);
            if (w0, w1) == (p.a, p.b) {
                let host = p.host + p.a;
                match ops.last_mut() {
                    Some(Op::Client {
                        host: h,
                        from: f,
                        to: t,
                    }) if *t == from && *h + (*t - *f) as u64 == host => {
                        *t = to;
                    }
                    _ => ops.push(Op::Client { host, from, to }),
                }
                continue;
            }
            let mut data = vec![0u8; (w1 - w0) as usize];
            let (head, rest) = data.split_at_mut((p.a - w0) as usize);
            let (mid, tail) = rest.split_at_mut((p.b - p.a) as usize);
            self.read_old(io, p, start + w0, head)?;
            self.read_old(io, p, start + p.b, tail)?;
            mid.copy_from_slice(&buf[from..to]);
            ops.push(Op::Owned {
                host: p.host + w0,
                data,
            });
        }
        for op in ops {
            match op {
                Op::Client { host, from, to } => self.write_data(io, &buf[from..to], host)?,
                Op::Owned { host, mut data } => {
                    if let Some(c) = &self.crypto {
                        c.encrypt(&mut data, host)?;
                    }
                    self.write_host(io, &data, host)?;
                }
            }
        }
        Ok(())
    }

    /// Fill `out` with what the plan's cluster read as before, from guest
    /// offset `guest`.
    fn read_old(&self, io: &dyn Io, p: &Plan, guest: u64, out: &mut [u8]) -> Result<()> {
        let geo = &self.geo;
        let mut done = 0usize;
        while done < out.len() {
            let at = guest + done as u64;
            let in_cluster = at & (geo.cluster_size() - 1);
            let sc = (in_cluster >> geo.subcluster_bits) as u32;
            let in_sub = in_cluster & (geo.subcluster_size() - 1);
            let (src, n) = match layout::subcluster(geo, p.old, p.bitmap, sc)? {
                Sub::Data(host) => (Source::Host(host + in_sub), geo.subcluster_size() - in_sub),
                Sub::Zero => (Source::Zero, geo.subcluster_size() - in_sub),
                Sub::Unallocated if self.backing.is_some() => {
                    (Source::Backing, geo.subcluster_size() - in_sub)
                }
                Sub::Unallocated => (Source::Zero, geo.subcluster_size() - in_sub),
                Sub::Compressed { offset, bytes } => (
                    Source::Compressed {
                        offset,
                        bytes,
                        skip: in_cluster,
                    },
                    geo.cluster_size() - in_cluster,
                ),
            };
            let n = (n as usize).min(out.len() - done);
            self.read_run(io, &mut out[done..done + n], at, src)?;
            done += n;
        }
        Ok(())
    }

    /// Write a client's bytes at `host`, encrypted if the image is.
    fn write_data(&self, io: &dyn Io, data: &[u8], host: u64) -> Result<()> {
        let Some(c) = &self.crypto else {
            return self.write_host(io, data, host);
        };
        BOUNCE.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            b.extend_from_slice(data);
            c.encrypt(&mut b, host)?;
            self.write_host(io, &b, host)
        })
    }
}
