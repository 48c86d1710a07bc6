//! A bounded write-back cache of one-cluster metadata tables (L2 tables,
//! refcount blocks), keyed by host offset. Memory stays bounded whatever
//! the image size; the least recently used clean or dirty table is evicted,
//! and the caller writes back a dirty victim.

use std::collections::HashMap;

pub struct Slot {
    pub data: Vec<u8>,
    pub dirty: bool,
    used: u64,
}

pub struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    tick: u64,
}

impl TableCache {
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    pub fn contains(&self, off: u64) -> bool {
        self.slots.contains_key(&off)
    }

    /// The table at `off`, marked as just used.
    pub fn get(&mut self, off: u64) -> Option<&mut Slot> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.get_mut(&off)?;
        slot.used = tick;
        Some(slot)
    }

    /// Inserts a table. When the cache is full, returns the evicted
    /// (offset, slot) so the caller can write it back if dirty.
    #[must_use]
    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) -> Option<(u64, Slot)> {
        self.tick += 1;
        let mut victim = None;
        if !self.slots.contains_key(&off) && self.slots.len() >= self.capacity {
            let lru = self
                .slots
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(&k, _)| k);
            if let Some(k) = lru {
                victim = self.slots.remove(&k).map(|s| (k, s));
            }
        }
        self.slots.insert(
            off,
            Slot {
                data,
                dirty,
                used: self.tick,
            },
        );
        victim
    }

    /// Offsets of dirty tables, in ascending order (sequential write-back).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, _)| k)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_least_recently_used() {
        let mut c = TableCache::new(2);
        assert!(c.insert(1, vec![1], false).is_none());
        assert!(c.insert(2, vec![2], true).is_none());
        c.get(1);
        let (off, slot) = c.insert(3, vec![3], false).expect("evicts");
        assert_eq!(off, 2);
        assert!(slot.dirty);
        assert!(c.contains(1) && c.contains(3));
    }
}
