//! The dirty bitmaps of one block node: the node marks every recording
//! bitmap before a write is acknowledged; exports, jobs and the control
//! plane look bitmaps up here by name.
//!
//! Lock order, the one rule for every holder of these locks:
//! 1. a set's lock before any bitmap's, never a set's lock while a
//!    bitmap's is held;
//! 2. one bitmap at a time, or several only through [`lock_all`] (ascending
//!    address: a merge's source and target, a store's copies);
//! 3. a bitmap lock is held only for work in memory: never across blocking
//!    I/O or an `.await`, and never while waiting for a node's own locks
//!    (`storing`, `remark` in block/node.rs come before it). What must
//!    reach the disk is copied under the lock and written after
//!    (`Node::store_bitmaps`, `Node::store_point`, a merge's intent zones).
//!    The one exception: a store point's epoch switch takes qcow2 `meta`
//!    then the intent log's `disk` under the bitmap locks (qcow2/intent.rs:
//!    the switch must fall between two marks), so it may wait out one
//!    intent-log write; no holder of those locks waits for a bitmap.
//!
//! NBD readers mark bitmaps on tokio workers (the inline write path) and
//! read them there (dirty-bitmap block status); rule 3 is what keeps those
//! waits short.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::{BitmapError, BitmapErrorKind, BitmapResult, DirtyBitmap};

/// A bitmap shared between the write path and its readers.
pub type SharedBitmap = Arc<Mutex<DirtyBitmap>>;

/// Locks a bitmap; a panic elsewhere while it was held does not make its
/// bits less true, so poisoning is ignored.
pub fn lock(b: &SharedBitmap) -> MutexGuard<'_, DirtyBitmap> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// Locks several bitmaps at once, in the one order every holder of more
/// than one bitmap lock uses: ascending address. (A merge that locked
/// source then target, against a store that locked in creation order,
/// could deadlock.) The guards come back in the order of `bitmaps`.
pub fn lock_all(bitmaps: &[SharedBitmap]) -> Vec<MutexGuard<'_, DirtyBitmap>> {
    let mut order: Vec<usize> = (0..bitmaps.len()).collect();
    order.sort_by_key(|&i| Arc::as_ptr(&bitmaps[i]) as usize);
    order.dedup_by_key(|i| Arc::as_ptr(&bitmaps[*i]) as usize);
    let mut guards: Vec<Option<MutexGuard<'_, DirtyBitmap>>> =
        (0..bitmaps.len()).map(|_| None).collect();
    for i in order {
        guards[i] = Some(lock(&bitmaps[i]));
    }
    // A bitmap named twice is locked once: callers pass distinct ones.
    guards.into_iter().flatten().collect()
}

/// A bitmap's "busy" claim (an export reads it, a job owns it): taken
/// with [`BusyClaim::take`], released when dropped. The one way a bitmap
/// becomes busy for longer than a command.
pub struct BusyClaim(SharedBitmap);

impl BusyClaim {
    /// Marks `bitmap` busy; fails with qemu's text if it already is.
    pub fn take(bitmap: &SharedBitmap) -> BitmapResult<BusyClaim> {
        let mut g = lock(bitmap);
        g.check(super::Checks {
            busy: true,
            readonly: false,
            inconsistent: false,
        })?;
        g.state.busy = true;
        Ok(BusyClaim(bitmap.clone()))
    }

    pub fn bitmap(&self) -> &SharedBitmap {
        &self.0
    }
}

impl Drop for BusyClaim {
    fn drop(&mut self) {
        lock(&self.0).state.busy = false;
    }
}

#[derive(Default)]
pub struct BitmapSet {
    bitmaps: RwLock<Vec<SharedBitmap>>,
}

impl BitmapSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `[offset, offset + len)` dirty in every recording bitmap.
    /// Returns whether a persistent one was among them (the write then
    /// goes through the image's intent log first).
    pub fn mark(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let mut persistent = false;
        let all = self.bitmaps.read().unwrap_or_else(|p| p.into_inner());
        for b in all.iter() {
            let mut b = lock(b);
            if b.state.recording && !b.state.frozen {
                persistent |= b.state.persistent;
                // The range was validated against the node's size; a bitmap
                // of another size is a bug we must not turn into a failed write.
                if let Err(e) = b.set_range(offset, len) {
                    tracing::error!(bitmap = b.name(), error = %e.message, "could not mark bitmap");
                }
            }
        }
        persistent
    }

    pub fn get(&self, name: &str) -> Option<SharedBitmap> {
        let all = self.bitmaps.read().unwrap_or_else(|p| p.into_inner());
        all.iter().find(|b| lock(b).name() == name).cloned()
    }

    /// Every bitmap, in creation order (qemu lists the newest first; callers
    /// that report reverse this).
    pub fn all(&self) -> Vec<SharedBitmap> {
        self.bitmaps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds a bitmap; its name must be new on this node.
    pub fn add(&self, bitmap: DirtyBitmap) -> BitmapResult<SharedBitmap> {
        let mut all = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        if all.iter().any(|b| lock(b).name() == bitmap.name()) {
            return Err(BitmapError::new(
                BitmapErrorKind::Invalid,
                format!("Bitmap already exists: {}", bitmap.name()),
            ));
        }
        let shared = Arc::new(Mutex::new(bitmap));
        all.push(shared.clone());
        Ok(shared)
    }

    /// Adds a bitmap without a name (a backup's successor): listed, but
    /// no command can name it.
    pub fn add_anonymous(&self, bitmap: DirtyBitmap) -> SharedBitmap {
        let shared = Arc::new(Mutex::new(bitmap));
        let mut all = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        all.push(shared.clone());
        shared
    }

    /// Removes `bitmap` (by identity, for anonymous ones).
    pub fn remove_shared(&self, bitmap: &SharedBitmap) {
        let mut all = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        all.retain(|b| !Arc::ptr_eq(b, bitmap));
    }

    /// Removes a bitmap by name and returns it.
    pub fn remove(&self, name: &str) -> Option<SharedBitmap> {
        let mut all = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        let i = all.iter().position(|b| lock(b).name() == name)?;
        Some(all.remove(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_recording_bitmaps_are_marked() {
        let set = BitmapSet::new();
        let on = set
            .add(DirtyBitmap::new("on", 1 << 20, 65536).expect("new"))
            .expect("add");
        let mut off = DirtyBitmap::new("off", 1 << 20, 65536).expect("new");
        off.state.recording = false;
        let off = set.add(off).expect("add");
        set.mark(70000, 10);
        assert_eq!(lock(&on).count(), 65536);
        assert_eq!(lock(&off).count(), 0);
        assert!(set
            .add(DirtyBitmap::new("on", 1 << 20, 65536).expect("new"))
            .is_err());
        assert!(set.remove("on").is_some());
        assert!(set.get("on").is_none());
    }
}
