//! A fixed set of threads that carry out NBD requests: the block work that
//! may wait on the disk (see [`super::exec`]).
//!
//! Why not tokio's blocking pool: it starts a new thread whenever all of its
//! threads are busy (up to its maximum) and keeps idle ones for ten seconds,
//! so under pipelining clients it grows with the requests in flight, and
//! the process's memory with it (each thread's stack and malloc arena).
//! Measured on 2 cores: 27 threads for 4 connections pipelining reads and
//! writes on a qcow2 image (tests/nbd_threads.rs), 51 in the qcow2
//! pull. Here the threads start once and take jobs from one queue, in order.
//!
//! The queue has no bound of its own: every job holds a request slot and
//! its memory from its connection's budget until its reply is written (see
//! [`super::budget`]), so what waits here is bounded by that budget. A job
//! never waits on a client: it hands its reply to the connection's sink,
//! which never blocks (see [`super::sink`]), so a client that stops reading
//! costs its own budget, not a thread.
//!
//! How many: twice the cores less one, 2 to 16. A job is either a copy
//! through the page cache (CPU) or a wait on the disk or an image lock (no
//! CPU); about twice the cores keeps every core busy while half the threads
//! wait, without a thread per request. The one less is for the thread
//! budget of 4 per core: with the runtime's worker per core, the main
//! thread and the one control-plane blocking thread (main.rs; timers are
//! tasks, see `Daemon::every`), the process has 3 × cores + 1 threads,
//! within 4 × cores from 2 cores up. Measured on 2 cores (3 I/O threads):
//! 7 threads in all under that load.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job: a new job wakes one only if some wait,
    /// so a busy pool takes jobs without a wake-up call each.
    waiting: usize,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A job runs outside the lock: a poisoned queue is still whole.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Workers {
    shared: Arc<Shared>,
    threads: usize,
}

/// The number of threads for a machine of `cores` cores (see above).
pub fn threads_for(cores: usize) -> usize {
    (2 * cores).saturating_sub(1).clamp(2, 16)
}

/// The process's cores, as the runtime counts them.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Workers {
    /// Starts `n` threads. If the system refuses some, the pool runs with
    /// those it got; with none, jobs fall back to tokio's blocking pool.
    pub fn start(n: usize) -> Workers {
        let shared = Arc::new(Shared::default());
        let mut threads = 0;
        for i in 0..n {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-io-{i}"))
                .spawn(move || work(&s));
            match spawned {
                Ok(_) => threads += 1,
                Err(e) => tracing::error!(error = %e, "could not start an NBD I/O thread"),
            }
        }
        Workers { shared, threads }
    }

    /// The daemon's pool, started on first use.
    pub fn global() -> &'static Workers {
        static POOL: OnceLock<Workers> = OnceLock::new();
        POOL.get_or_init(|| Workers::start(threads_for(cores())))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `job`; one of the threads runs it. Never blocks (beyond the
    /// queue's lock, held only to push).
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        if self.threads == 0 {
            drop(tokio::task::spawn_blocking(job));
            return;
        }
        let mut q = self.shared.lock();
        q.jobs.push_back(Box::new(job));
        // A busy thread takes the next job when it is done: wake another
        // only when the queue is longer than the threads at work (a
        // wake-up per 4 KiB write was a tenth of raw random-write IOPS).
        // So a job may wait behind a slow one until the next job comes;
        // it may never wait *for* a queued job (none does: jobs wait only
        // on locks that running jobs hold), or this would not end.
        let busy = self.threads - q.waiting;
        let wake = q.waiting > 0 && q.jobs.len() > busy;
        drop(q);
        if wake {
            self.shared.ready.notify_one();
        }
    }

    /// Runs `f` on a pool thread and waits for its result; `None` if it
    /// panicked.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move || {
            let _ = tx.send(f());
        });
        rx.await.ok()
    }
}

/// A pool thread: runs jobs in order, waits when there are none.
fn work(shared: &Shared) {
    let mut q = shared.lock();
    loop {
        if let Some(job) = q.jobs.pop_front() {
            drop(q);
            // A panicking job loses its own reply (its budget is returned
            // as it unwinds), not the thread.
            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                tracing::error!("an NBD request panicked");
            }
            q = shared.lock();
            continue;
        }
        q.waiting += 1;
        q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        q.waiting -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::mpsc;

    #[test]
    fn the_thread_count_follows_the_cores_within_bounds() {
        assert_eq!(threads_for(1), 2);
        assert_eq!(threads_for(2), 3);
        assert_eq!(threads_for(4), 7);
        assert_eq!(threads_for(8), 15);
        assert_eq!(threads_for(64), 16);
        // Within the budget of 4 threads a core (see above).
        for cores in 2..=64 {
            assert!(threads_for(cores) + cores + 3 <= 4 * cores, "{cores} cores");
        }
    }

    #[test]
    fn a_panicking_job_costs_no_thread() {
        let pool = Workers::start(1);
        pool.submit(|| panic!("a failing job"));
        let (tx, rx) = mpsc::channel();
        pool.submit(move || {
            let _ = tx.send(());
        });
        assert!(rx.recv().is_ok(), "the one thread runs the next job");
    }

    #[test]
    fn many_jobs_run_on_the_fixed_threads() {
        let pool = Workers::start(3);
        let (tx, rx) = mpsc::channel();
        for i in 0..1000 {
            let tx = tx.clone();
            pool.submit(move || {
                let _ = tx.send((i, std::thread::current().id()));
            });
        }
        drop(tx);
        let got: Vec<_> = rx.iter().collect();
        assert_eq!(got.len(), 1000);
        let threads: HashSet<_> = got.iter().map(|g| g.1).collect();
        assert!(threads.len() <= 3, "{} threads ran jobs", threads.len());
    }

    #[tokio::test]
    async fn run_returns_the_result_to_async_code() {
        let pool = Workers::start(2);
        assert_eq!(pool.run(|| 6 * 7).await, Some(42));
        assert_eq!(pool.run(|| -> u8 { panic!("no result") }).await, None);
    }
}
