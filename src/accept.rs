//! What a listening socket does when `accept` fails: the one policy for
//! the NBD and QMP listeners.
//!
//! The failures that matter are lasting ones: a full descriptor table
//! (EMFILE, ENFILE) or no kernel memory. Retrying at once spins a core and
//! floods the log, so the listener waits, longer each time, and logs once
//! when the trouble starts and once when it ends. A connection that closes
//! frees a descriptor, so a caller may cut the wait short.

use std::io;
use std::time::Duration;

use tracing::{info, warn};

const FIRST_WAIT: Duration = Duration::from_millis(10);
const LONGEST_WAIT: Duration = Duration::from_secs(1);

/// The state of one listener's accept failures.
pub struct AcceptBackoff {
    what: &'static str,
    wait: Option<Duration>,
    failures: u64,
}

impl AcceptBackoff {
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            wait: None,
            failures: 0,
        }
    }

    /// An accept succeeded: the episode, if any, is over.
    pub fn accepted(&mut self) {
        if self.wait.take().is_some() {
            info!(
                listener = self.what,
                failures = self.failures,
                "accepting connections again"
            );
            self.failures = 0;
        }
    }

    /// An accept failed: how long to wait before the next one. Errors that
    /// belong to one aborted connection are retried at once.
    pub fn failed(&mut self, e: &io::Error) -> Option<Duration> {
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) {
            return None;
        }
        self.failures += 1;
        let wait = match self.wait {
            None => {
                warn!(
                    listener = self.what,
                    error = %e,
                    "cannot accept connections; retrying with back-off until one succeeds"
                );
                FIRST_WAIT
            }
            Some(w) => (w * 2).min(LONGEST_WAIT),
        };
        self.wait = Some(wait);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_a_ceiling_and_reset_on_success() {
        let mut b = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<_> = (0..10).map(|_| b.failed(&emfile)).collect();
        assert_eq!(waits[0], Some(FIRST_WAIT));
        assert_eq!(waits[1], Some(FIRST_WAIT * 2));
        assert_eq!(waits[9], Some(LONGEST_WAIT));
        b.accepted();
        assert_eq!(b.failed(&emfile), Some(FIRST_WAIT));
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(b.failed(&aborted), None);
    }
}
