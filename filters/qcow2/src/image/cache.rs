//! A bounded cache of metadata tables (L2 tables, refcount blocks), each
//! one cluster, keyed by its offset in the image. Dirty tables stay until
//! the flush sequence has written them; pinned ones while a request that
//! will change them is waiting for its data to be written.

use std::collections::HashMap;

/// One cached table.
pub struct Table {
    /// The table as it is on disk (big-endian entries).
    pub data: Box<[u8]>,
    /// The change count when last changed and not yet written, if dirty.
    pub dirty: Option<u64>,
    pins: u32,
    used: u64,
}

/// Tables by offset, at most about `capacity` of them.
pub struct Cache {
    tables: HashMap<u64, Table>,
    capacity: usize,
    tick: u64,
}

impl Cache {
    /// A cache of `capacity` tables (at least 2: a request may need a
    /// table and its copy at once).
    pub fn new(capacity: usize) -> Cache {
        let capacity = capacity.max(2);
        Cache {
            tables: HashMap::with_capacity(capacity + 1),
            capacity,
            tick: 0,
        }
    }

    /// The table at `offset`, marked as just used.
    pub fn get(&mut self, offset: u64) -> Option<&mut Table> {
        self.tick += 1;
        let tick = self.tick;
        let t = self.tables.get_mut(&offset)?;
        t.used = tick;
        Some(t)
    }

    /// Whether the table at `offset` is here, without touching it.
    pub fn contains(&self, offset: u64) -> bool {
        self.tables.contains_key(&offset)
    }

    /// Add a table (clean, or dirty as of change `dirty`), making room by
    /// dropping the least recently used clean, unpinned tables. Returns
    /// whether the cache is still over its capacity (everything in it is
    /// dirty or pinned): the caller should flush.
    pub fn insert(&mut self, offset: u64, data: Box<[u8]>, dirty: Option<u64>) -> bool {
        self.tick += 1;
        self.tables.insert(
            offset,
            Table {
                data,
                dirty,
                pins: 0,
                used: self.tick,
            },
        );
        while self.tables.len() > self.capacity {
            let victim = self
                .tables
                .iter()
                .filter(|(&o, t)| o != offset && t.dirty.is_none() && t.pins == 0)
                .min_by_key(|(_, t)| t.used)
                .map(|(&o, _)| o);
            match victim {
                Some(o) => {
                    self.tables.remove(&o);
                }
                None => return true,
            }
        }
        false
    }

    /// Keep the table at `offset` from being dropped until [`Cache::unpin`].
    pub fn pin(&mut self, offset: u64) {
        if let Some(t) = self.tables.get_mut(&offset) {
            t.pins += 1;
        }
    }

    /// Undo one [`Cache::pin`].
    pub fn unpin(&mut self, offset: u64) {
        if let Some(t) = self.tables.get_mut(&offset) {
            t.pins = t.pins.saturating_sub(1);
        }
    }

    /// Copies of the dirty tables, with the change count each was taken
    /// at, for the flush sequence.
    pub fn dirty(&self) -> Vec<(u64, u64, Box<[u8]>)> {
        self.tables
            .iter()
            .filter_map(|(&o, t)| t.dirty.map(|g| (o, g, t.data.clone())))
            .collect()
    }

    /// How many tables are dirty.
    pub fn dirty_count(&self) -> usize {
        self.tables.values().filter(|t| t.dirty.is_some()).count()
    }

    /// The table at `offset` was written as of change `gen`: clean, unless
    /// changed again since.
    pub fn written(&mut self, offset: u64, gen: u64) {
        if let Some(t) = self.tables.get_mut(&offset) {
            if t.dirty == Some(gen) {
                t.dirty = None;
            }
        }
    }

    /// The capacity, in tables.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Box<[u8]> {
        vec![0u8; 8].into_boxed_slice()
    }

    #[test]
    fn the_least_recently_used_clean_table_goes_first() {
        let mut c = Cache::new(2);
        c.insert(1, table(), None);
        c.insert(2, table(), None);
        c.get(1);
        assert!(!c.insert(3, table(), None));
        assert!(c.contains(1) && c.contains(3) && !c.contains(2));
    }

    #[test]
    fn dirty_and_pinned_tables_stay_and_ask_for_a_flush() {
        let mut c = Cache::new(2);
        c.insert(1, table(), Some(1));
        c.insert(2, table(), None);
        c.pin(2);
        assert!(c.insert(3, table(), None), "over capacity");
        assert!(c.contains(1) && c.contains(2) && c.contains(3));
        c.written(1, 1);
        c.unpin(2);
        assert!(!c.insert(4, table(), None));
        assert_eq!(c.dirty_count(), 0);
    }

    #[test]
    fn a_table_changed_again_while_being_written_stays_dirty() {
        let mut c = Cache::new(4);
        c.insert(1, table(), Some(5));
        c.get(1).unwrap().dirty = Some(6);
        c.written(1, 5);
        assert_eq!(c.dirty_count(), 1);
    }
}
