//! When persistent bitmaps reach the image while it is open (tidemark's;
//! see block/qcow2/intent.rs): the bitmap policy of a daemon, and the
//! timer that makes a store point on every node whose intent log has
//! marks, once per interval. Bitmap commands make their own store points
//! (qmp/commands/transaction.rs); a clean close stores as qemu does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::Daemon;

/// `--bitmap-intent-log on|off` and `--bitmap-store-interval SECS`, for
/// `serve` and `daemon` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapPolicy {
    /// Off: qemu's semantics exactly (bitmaps are inconsistent after a
    /// crash), and no store points.
    pub intent_log: bool,
    /// Seconds between periodic store points; 0 for none. The
    /// over-approximation after a crash is bounded by the zones first
    /// written since the last one.
    pub store_interval: u64,
}

/// The default interval between store points, in seconds.
pub const DEFAULT_STORE_INTERVAL: u64 = 30;

impl Default for BitmapPolicy {
    fn default() -> Self {
        BitmapPolicy {
            intent_log: true,
            store_interval: DEFAULT_STORE_INTERVAL,
        }
    }
}

impl BitmapPolicy {
    pub fn parse_switch(text: &str) -> Result<bool, String> {
        match text {
            "on" | "yes" | "true" => Ok(true),
            "off" | "no" | "false" => Ok(false),
            _ => Err(format!(
                "--bitmap-intent-log: expected 'on' or 'off', not '{text}'"
            )),
        }
    }

    pub fn parse_interval(text: &str) -> Result<u64, String> {
        text.parse().map_err(|_| {
            format!("--bitmap-store-interval: expected a number of seconds, not '{text}'")
        })
    }
}

/// How often the timer looks at the clock.
const TICK: Duration = Duration::from_millis(500);

/// Starts the store-point timer of `d` (it ends with the daemon). Nodes
/// without an intent log, or with the log off, have no marks to clear.
pub fn start_timer(d: &Arc<Daemon>) {
    let mut last = Instant::now();
    d.every("store points".into(), TICK, move |d| {
        let interval = d.store_interval();
        if interval > 0 && last.elapsed() >= Duration::from_secs(interval) {
            last = Instant::now();
            store_marked(d);
        }
        true
    });
}

/// A store point on every node whose intent log has marks.
fn store_marked(d: &Daemon) {
    let nodes = d.with_nodes(|it| it.map(|g| g.node.clone()).collect::<Vec<_>>());
    for n in nodes {
        if n.driver().intent_marked() {
            if let Err(e) = n.store_point() {
                tracing::error!(node = n.name(), error = %e, "periodic store point failed");
            }
        }
    }
}
