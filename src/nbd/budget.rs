//! Memory for in-flight requests: one pool for the whole daemon, shared by
//! every connection, and a share that each connection may not exceed.
//!
//! A request is charged before it runs: a read its reply, a write its
//! payload, a block status its largest reply. The charge comes from the
//! connection's share first and then from the pool, and returns once the
//! reply is on the wire (see [`super::sink`]). A client that stops reading
//! its replies therefore pins at most its share (and, in the kernel, what
//! its socket holds: 2 MiB on a unix socket), and only its own requests
//! wait on it; the pool bounds what all clients together can pin. Long
//! reads are answered in pieces, each charged on its own (see
//! [`super::session`]), so a share is smaller than the largest request.
//!
//! Lock order: a connection's share, then the pool (never the other way
//! round, so a connection waits on itself before it waits on others).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The pool's default size. With the daemon's own memory (tens of MiB),
/// the server's RSS stays under 256 MiB whatever its clients do.
pub const DEFAULT_POOL: usize = 192 << 20;
/// The smallest pool: one request of the largest size must fit.
pub const MIN_POOL: usize = 64 << 20;
/// What one connection may hold: the replies of a client that does not
/// read them, and how much a fast client can pipeline. A full block-status
/// reply of one context (qemu's 131072 descriptors) fits.
pub const CONN_SHARE: usize = (2 << 20) + 4096;
/// Requests one connection may have in flight, whatever their size.
pub const CONN_REQUESTS: usize = 32;

/// The daemon-wide pool, in bytes.
#[derive(Clone, Debug)]
pub struct Pool {
    sem: Arc<Semaphore>,
    size: usize,
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        let size = size.max(MIN_POOL);
        Pool {
            sem: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// A new connection's budget.
    pub fn connection(&self) -> ConnBudget {
        ConnBudget {
            pool: self.clone(),
            share: Arc::new(Semaphore::new(CONN_SHARE)),
            requests: Arc::new(Semaphore::new(CONN_REQUESTS)),
        }
    }
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new(DEFAULT_POOL)
    }
}

/// One connection's view of the budget.
pub struct ConnBudget {
    pool: Pool,
    share: Arc<Semaphore>,
    requests: Arc<Semaphore>,
}

/// Memory held by a reply until it is written, and possibly the request
/// slot it answers.
pub struct Charge {
    share: OwnedSemaphorePermit,
    pool: OwnedSemaphorePermit,
    slot: Option<OwnedSemaphorePermit>,
}

impl ConnBudget {
    /// A slot for one more request in flight; `None` once the connection
    /// is closing.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.requests.clone().acquire_owned().await.ok()
    }

    /// `bytes` of memory. A charge above the share takes the whole share
    /// (the request runs alone) and the rest from the pool.
    pub async fn charge(&self, bytes: usize) -> Option<Charge> {
        let from_share = bytes.min(CONN_SHARE) as u32;
        let share = self
            .share
            .clone()
            .acquire_many_owned(from_share)
            .await
            .ok()?;
        let from_pool = bytes.min(self.pool.size) as u32;
        let pool = self
            .pool
            .sem
            .clone()
            .acquire_many_owned(from_pool)
            .await
            .ok()?;
        Some(Charge {
            share,
            pool,
            slot: None,
        })
    }

    /// Waits until every request has been answered (or dropped).
    pub async fn idle(&self) {
        let _ = self.requests.acquire_many(CONN_REQUESTS as u32).await;
    }
}

impl Charge {
    /// The charge also frees `slot` when it returns.
    pub fn with_slot(mut self, slot: OwnedSemaphorePermit) -> Charge {
        self.slot = Some(slot);
        self
    }

    /// Gives back what a reply of `bytes` does not need: charges are made
    /// for the largest reply, and most are smaller.
    pub fn settle(&mut self, bytes: usize) {
        for p in [&mut self.share, &mut self.pool] {
            let held = p.num_permits();
            if held > bytes {
                drop(p.split(held - bytes));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_holds_at_most_its_share_and_settles_down() {
        let pool = Pool::new(MIN_POOL);
        let conn = pool.connection();
        let mut big = conn.charge(32 << 20).await.expect("charge");
        assert_eq!(conn.share.available_permits(), 0);
        assert_eq!(pool.sem.available_permits(), MIN_POOL - (32 << 20));
        // A second request of the same connection waits for the share.
        let waiting = tokio::time::timeout(Duration::from_millis(1), conn.charge(1)).await;
        assert!(waiting.is_err());
        big.settle(1000);
        assert_eq!(conn.share.available_permits(), CONN_SHARE - 1000);
        assert_eq!(pool.sem.available_permits(), MIN_POOL - 1000);
        // Another connection is not held up by the first one's share.
        let other = pool.connection();
        assert!(other.charge(1 << 20).await.is_some());
    }

    use std::time::Duration;
}
