//! What a listening socket does when `accept` fails: the one policy for
//! the NBD and QMP listeners.
//!
//! The failures that matter are lasting ones: a full descriptor table
//! (EMFILE, ENFILE) or no kernel memory. Retrying at once spins a core and
//! floods the log, so the listener waits, longer each time, and warns at
//! most once a minute (a full table comes and goes as clients do: each
//! connection that closes lets one more in). A connection that closes
//! frees a descriptor, so a caller may cut the wait short.

use std::io;
use std::time::{Duration, Instant};

use tracing::warn;

const FIRST_WAIT: Duration = Duration::from_millis(10);
const LONGEST_WAIT: Duration = Duration::from_secs(1);
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The state of one listener's accept failures.
pub struct AcceptBackoff {
    what: &'static str,
    wait: Option<Duration>,
    warned: Option<Instant>,
    /// Failures since the last warning.
    unreported: u64,
}

impl AcceptBackoff {
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            wait: None,
            warned: None,
            unreported: 0,
        }
    }

    /// An accept succeeded: the next failure waits the shortest time again.
    pub fn accepted(&mut self) {
        self.wait = None;
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
        self.unreported += 1;
        if self.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            warn!(
                listener = self.what,
                error = %e,
                failures = self.unreported,
                "cannot accept connections; retrying with back-off"
            );
            self.warned = Some(Instant::now());
            self.unreported = 0;
        }
        let wait = self.wait.map_or(FIRST_WAIT, |w| (w * 2).min(LONGEST_WAIT));
        self.wait = Some(wait);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_a_ceiling_reset_on_success_and_warnings_are_rare() {
        let mut b = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<_> = (0..10).map(|_| b.failed(&emfile)).collect();
        assert_eq!(waits[0], Some(FIRST_WAIT));
        assert_eq!(waits[1], Some(FIRST_WAIT * 2));
        assert_eq!(waits[9], Some(LONGEST_WAIT));
        b.accepted();
        assert_eq!(b.failed(&emfile), Some(FIRST_WAIT));
        // One warning for all eleven failures.
        assert_eq!(b.unreported, 10);
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(b.failed(&aborted), None);
    }
}
