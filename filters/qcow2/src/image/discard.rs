//! Zeroing and trimming: whole clusters (whole subclusters, with extended
//! entries) by their L2 entries alone (the zero flag, or nothing at all
//! where nothing lies beneath), the rest by writing zeroes. Over a backing
//! file a cleared range reads as zeroes, never as the backing file's data.
//! Version 2 images have no zero flag: zeroing there writes zeroes,
//! allocating clusters where a backing file would show through.

use crate::error::{Error, Result};
use crate::io::Io;
use crate::layout::{self, Cluster, ALLOC_BITS, COPIED, ZERO};

use super::Image;

/// Which request clears the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clear {
    /// TRIM: advisory; only whole units are cleared.
    Trim,
    /// WRITE_ZEROES; `unmap` (NBD's may-trim) lets allocations go,
    /// `fast` asks for failure rather than data writes.
    Zero { unmap: bool, fast: bool },
}

/// What clearing does to one cluster.
enum Action {
    /// A new L2 entry (and bitmap), freeing the old allocation or not.
    Entry {
        index: usize,
        entry: u64,
        bitmap: u64,
        free: bool,
    },
    /// Zeroes written in place at this host range.
    ZeroHost(u64, u64),
    /// Zeroes written through the write path (which allocates).
    WriteZeroes(u64, u64),
}

impl Image {
    /// Zero `len` bytes at `offset`; with `fua`, durably.
    pub fn zero(
        &self,
        io: &dyn Io,
        offset: u64,
        len: u64,
        unmap: bool,
        fast: bool,
        fua: bool,
    ) -> Result<()> {
        self.clear(io, offset, len, Clear::Zero { unmap, fast }, fua)
    }

    /// Trim `len` bytes at `offset`; with `fua`, durably.
    pub fn trim(&self, io: &dyn Io, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.clear(io, offset, len, Clear::Trim, fua)
    }

    fn clear(&self, io: &dyn Io, offset: u64, len: u64, how: Clear, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let unit = self.geo.subcluster_size();
        let end = offset + len;
        let (u0, u1) = (offset.div_ceil(unit) * unit, end / unit * unit);
        let partial: Vec<(u64, u64)> = if u0 >= u1 {
            vec![(offset, end)]
        } else {
            [(offset, u0), (u1, end)]
                .into_iter()
                .filter(|(a, b)| a < b)
                .collect()
        };
        if let Clear::Zero { fast, .. } = how {
            if fast && !partial.is_empty() {
                return Err(Error::NotFast);
            }
        }
        if u0 < u1 {
            // A fast zero that cannot be done must fail before any table
            // changes, so look at every table first.
            let passes: &[bool] = match how {
                Clear::Zero { fast: true, .. } => &[true, false],
                _ => &[false],
            };
            for &dry in passes {
                let mut at = u0;
                while at < u1 {
                    let n = self.in_table(at, u1 - at);
                    if self.clear_in_table(io, at, n, how, dry)? {
                        return Err(Error::NotFast);
                    }
                    at += n;
                }
            }
        }
        if matches!(how, Clear::Zero { .. }) {
            for (a, b) in partial {
                self.write_zeroes(io, a, b - a)?;
            }
        }
        self.flush_if_needed(io)?;
        if fua {
            self.flush_metadata(io)?;
        }
        Ok(())
    }

    /// Write zeroes through the write path.
    fn write_zeroes(&self, io: &dyn Io, offset: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.write(io, &zeroes[..n as usize], offset + done, false)?;
            done += n;
        }
        Ok(())
    }

    /// Clear whole units `[at, at + len)` within one L2 table; with
    /// `dry`, change nothing. Returns whether a fast zero would have to
    /// write data, and so must fail.
    fn clear_in_table(
        &self,
        io: &dyn Io,
        at: u64,
        len: u64,
        how: Clear,
        dry: bool,
    ) -> Result<bool> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        let l1_index = geo.l1_index(at);
        let end = at + len;
        let (mut m, mut table) = loop {
            let (m, table) = self.lock_l2(io, l1_index)?;
            if ((at >> cb)..=((end - 1) >> cb)).any(|c| m.in_flight.contains(&c)) {
                drop(self.wait(m));
                continue;
            }
            break (m, table);
        };
        let mut actions = Vec::new();
        for cluster in (at >> cb)..=((end - 1) >> cb) {
            let start = cluster << cb;
            let (a, b) = (
                at.max(start) - start,
                end.min(start + geo.cluster_size()) - start,
            );
            let index = geo.l2_index(start);
            let (entry, bitmap) = match table {
                0 => (0, 0),
                t => self.l2_entry(&m.l2.get(t).expect("loaded").data, index),
            };
            let old = Cluster::decode(&geo, entry)?;
            if let Some(action) = self.clear_cluster(index, start, a, b, old, entry, bitmap, how) {
                actions.push(action);
            }
        }
        let data_work = actions.iter().any(|a| !matches!(a, Action::Entry { .. }));
        if data_work && matches!(how, Clear::Zero { fast: true, .. }) {
            return Ok(true);
        }
        if dry {
            return Ok(false);
        }
        if actions.iter().any(|a| matches!(a, Action::Entry { .. })) {
            table = self.own_l2(&mut m, io, l1_index, table)?;
        }
        let gen = m.change();
        let mut in_place = Vec::new();
        let mut rewrite = Vec::new();
        for action in actions {
            match action {
                Action::Entry {
                    index,
                    entry,
                    bitmap,
                    free,
                } => {
                    let t = m.l2.get(table).expect("owned just now");
                    let (old_entry, _) = self.l2_entry(&t.data, index);
                    self.set_l2_entry(&mut t.data, index, entry, bitmap);
                    t.dirty = Some(gen);
                    if free {
                        if let Some(old) = Cluster::decode(&geo, old_entry)?.allocation(&geo) {
                            m.frees.push(old);
                        }
                    }
                }
                Action::ZeroHost(host, n) => in_place.push((host, n)),
                Action::WriteZeroes(guest, n) => rewrite.push((guest, n)),
            }
        }
        if !in_place.is_empty() {
            let _pass = self.pass(&m);
            drop(m);
            for (host, n) in in_place {
                io.zero(n, host)?;
            }
        } else {
            drop(m);
        }
        // Through the write path, which takes its own passes (holding one
        // here could stall a flush that write path starts).
        for (guest, n) in rewrite {
            self.write_zeroes(io, guest, n)?;
        }
        Ok(false)
    }

    /// What clearing bytes `[a, b)` (whole units) of the guest cluster at
    /// `start`, whose entry is `entry`, does; `None` when nothing changes.
    #[allow(clippy::too_many_arguments)]
    fn clear_cluster(
        &self,
        index: usize,
        start: u64,
        a: u64,
        b: u64,
        old: Cluster,
        entry: u64,
        bitmap: u64,
        how: Clear,
    ) -> Option<Action> {
        let cs = self.geo.cluster_size();
        let backing = self.backing.is_some();
        let whole = (a, b) == (0, cs);
        let set = |entry: u64, bitmap: u64, free: bool| Action::Entry {
            index,
            entry,
            bitmap,
            free,
        };
        let unmap = match how {
            Clear::Trim => true,
            Clear::Zero { unmap, .. } => unmap,
        };
        if self.geo.extended {
            let sb = self.geo.subcluster_bits;
            let subs = layout::bits((a >> sb) as u32, ((b - a) >> sb) as u32, 0);
            let zero_bits = if backing { subs << 32 } else { 0 };
            return match old {
                Cluster::Compressed { .. } if !whole => match how {
                    Clear::Trim => None,
                    Clear::Zero { .. } => Some(Action::WriteZeroes(start + a, b - a)),
                },
                Cluster::Normal { host, copied: true } if whole && !unmap => {
                    Some(set(host | COPIED, ALLOC_BITS << 32, false))
                }
                Cluster::Normal { .. } | Cluster::Compressed { .. } if whole => {
                    Some(set(0, if backing { ALLOC_BITS << 32 } else { 0 }, true))
                }
                _ => {
                    let new = (bitmap & !subs) | zero_bits;
                    (new != bitmap).then(|| set(entry, new, false))
                }
            };
        }
        if self.geo.version < 3 {
            return match (how, old) {
                (Clear::Trim, _) if backing => None,
                (Clear::Trim, Cluster::Unallocated) => None,
                (Clear::Trim, _) => Some(set(0, 0, true)),
                // Zeroes below would decrypt to noise.
                (Clear::Zero { .. }, Cluster::Normal { host, copied: true })
                    if self.crypto.is_none() =>
                {
                    Some(Action::ZeroHost(host, cs))
                }
                (Clear::Zero { .. }, Cluster::Unallocated) if !backing => None,
                (Clear::Zero { .. }, _) => Some(Action::WriteZeroes(start, cs)),
            };
        }
        let cleared = if backing { ZERO } else { 0 };
        match old {
            Cluster::Normal { host, copied: true } if !unmap => {
                Some(set(host | ZERO | COPIED, 0, false))
            }
            Cluster::Zero { host, .. } if !unmap && host != 0 => None,
            // Reads as zeroes, and holds nothing.
            Cluster::Zero { host: 0, .. } => None,
            Cluster::Unallocated if !backing => None,
            Cluster::Unallocated => Some(set(ZERO, 0, false)),
            _ => Some(set(cleared, 0, true)),
        }
    }
}
