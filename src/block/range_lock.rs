//! Byte ranges held exclusively (qemu's serialising requests): a job's
//! copy of a range and a guest write of the same bytes never interleave,
//! so neither can overwrite the other's newer data. Ranges that do not
//! overlap never wait for each other.

use std::sync::{Condvar, Mutex};

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

impl RangeLock {
    /// Holds `[offset, offset + len)`, waiting while an overlapping range
    /// is held. Blocks: not on an async worker.
    pub fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let range = (offset, offset.saturating_add(len));
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while held.iter().any(|&(s, e)| s < range.1 && range.0 < e) {
            held = self.freed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.push(range);
        RangeGuard { lock: self, range }
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
}
