//! Ranges held exclusively (qemu's serialising requests): a job's copy of
//! a range and a guest write of the same bytes never interleave, so
//! neither can overwrite the other's newer data; a qcow2 allocation holds
//! its guest clusters so that no other write allocates them meanwhile.
//! Ranges that do not overlap never wait for each other.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
pub struct RangeLock {
    /// Ranges held now, as (start, end).
    held: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

/// A held range; released when dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

/// An overlapping range is held: [`Busy::wait`] once the caller has let
/// go of whatever the holder may need.
pub struct Busy<'a> {
    lock: &'a RangeLock,
    held: MutexGuard<'a, Vec<(u64, u64)>>,
}

impl RangeLock {
    fn held(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `[offset, offset + len)`, waiting while an overlapping range
    /// is held. Blocks: not on an async worker.
    pub fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        loop {
            match self.try_lock(offset, len) {
                Ok(g) => return g,
                Err(busy) => busy.wait(),
            }
        }
    }

    /// Holds `[offset, offset + len)` unless an overlapping range is held.
    pub fn try_lock(&self, offset: u64, len: u64) -> Result<RangeGuard<'_>, Busy<'_>> {
        let range = (offset, offset.saturating_add(len));
        let mut held = self.held();
        if held.iter().any(|&(s, e)| s < range.1 && range.0 < e) {
            return Err(Busy { lock: self, held });
        }
        held.push(range);
        Ok(RangeGuard { lock: self, range })
    }

    /// Whether a held range overlaps `[offset, offset + len)`.
    pub fn busy(&self, offset: u64, len: u64) -> Option<Busy<'_>> {
        let end = offset.saturating_add(len);
        let held = self.held();
        held.iter()
            .any(|&(s, e)| s < end && offset < e)
            .then_some(Busy { lock: self, held })
    }
}

impl Busy<'_> {
    /// Waits until some range is released (the set stays locked from the
    /// check to the wait, so the release cannot be missed).
    pub fn wait(self) {
        let Busy { lock, held } = self;
        drop(lock.freed.wait(held).unwrap_or_else(|p| p.into_inner()));
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let l = Arc::new(RangeLock::default());
        let g = l.lock(0, 100);
        let _other = l.lock(100, 50);
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            let _g = l2.lock(50, 10);
            tx.send(()).ok();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(50))
            .is_err());
        drop(g);
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("released range is taken");
        t.join().expect("thread");
    }

    #[test]
    fn try_lock_and_busy_do_not_wait() {
        let l = RangeLock::default();
        let g = l.try_lock(0, 10).ok().expect("free");
        assert!(l.try_lock(5, 1).is_err());
        assert!(l.busy(9, 1).is_some());
        assert!(l.busy(10, 5).is_none());
        drop(g);
        assert!(l.try_lock(5, 1).is_ok());
    }
}
