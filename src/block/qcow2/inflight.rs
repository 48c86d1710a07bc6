//! Guest clusters being allocated. An allocating write claims its
//! clusters under the metadata lock (having found them without data),
//! writes the new clusters' data without the lock, then points the L2
//! entries at them under the lock again and lets go of the claim. A
//! write that would fill the same clusters meanwhile waits for the claim
//! to end and looks again: two allocations of one cluster would lose one
//! of them.
//!
//! Lock order: the node's `meta` mutex, then this set; nothing waits for
//! `meta` while holding this set.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
pub struct InFlight {
    /// Claimed guest cluster ranges `[first, end)`.
    ranges: Mutex<Vec<(u64, u64)>>,
    done: Condvar,
}

/// A claim on guest clusters; dropping it ends the claim (also when the
/// allocation failed), waking the writers that wait for it.
pub struct Claim<'a> {
    set: &'a InFlight,
    range: (u64, u64),
}

/// The clusters are claimed by another write: [`Busy::wait`] after
/// letting go of the metadata lock.
pub struct Busy<'a> {
    set: &'a InFlight,
    guard: MutexGuard<'a, Vec<(u64, u64)>>,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims guest clusters `[first, end)` unless a claim overlaps them.
    /// Call with the metadata lock held.
    pub fn claim(&self, first: u64, end: u64) -> Result<Claim<'_>, Busy<'_>> {
        let mut ranges = self.lock();
        if ranges.iter().any(|&(a, b)| a < end && first < b) {
            return Err(Busy {
                set: self,
                guard: ranges,
            });
        }
        ranges.push((first, end));
        Ok(Claim {
            set: self,
            range: (first, end),
        })
    }

    /// Whether any claim overlaps guest clusters `[first, end)`.
    pub fn busy(&self, first: u64, end: u64) -> Option<Busy<'_>> {
        let ranges = self.lock();
        ranges
            .iter()
            .any(|&(a, b)| a < end && first < b)
            .then_some(Busy {
                set: self,
                guard: ranges,
            })
    }
}

impl Busy<'_> {
    /// Waits until some claim ends (the set stays locked from the check
    /// to the wait, so the end cannot be missed).
    pub fn wait(self) {
        let Busy { set, guard } = self;
        drop(set.done.wait(guard).unwrap_or_else(|p| p.into_inner()));
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut ranges = self.set.lock();
        if let Some(i) = ranges.iter().position(|&r| r == self.range) {
            ranges.swap_remove(i);
        }
        drop(ranges);
        self.set.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_claims_wait_for_the_first_to_end() {
        let set = InFlight::default();
        let a = set.claim(4, 8).ok().expect("free");
        assert!(set.claim(7, 9).is_err());
        assert!(set.busy(0, 5).is_some());
        let b = set.claim(8, 10).ok().expect("adjacent is free");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| loop {
                match set.claim(5, 6) {
                    Ok(_) => return,
                    Err(busy) => busy.wait(),
                }
            });
            drop(a);
            waiter.join().expect("waiter");
        });
        drop(b);
        assert!(set.busy(0, 100).is_none());
    }
}
