//! qemu's `null-co` driver: a node of a given size that stores nothing.
//! Writes are dropped, reads come back as zeroes, block status says
//! "not allocated" (and "reads as zero" with `read-zeroes`). It is the sink
//! of backup benchmarks: what it costs is the cost of everything above it,
//! so no request allocates, locks or touches a file.
//!
//! One difference on purpose: with `read-zeroes=false` (qemu 10's default)
//! qemu leaves the read buffer as it was, so a client sees whatever memory
//! the server had there (qsd sent stale bytes in our runs). tidemark zeroes
//! the buffer anyway: a memset costs nothing next to handing out old
//! memory. Block status still differs as in qemu: without `read-zeroes` the
//! range is only a hole, not a known-zero hole.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{BlockError, BlockNode, BlockResult, ErrorKind, Extent, ZeroFlags};
use super::{STATE_HOLE, STATE_ZERO};

/// qemu's default size: 1 GiB.
const DEFAULT_SIZE: u64 = 1 << 30;
const SECTOR: u64 = 512;
/// qemu's BDRV_MAX_LENGTH: the largest node length, in whole requests of
/// its largest request size (INT_MAX rounded down to a sector).
const MAX_LENGTH: u64 = (i64::MAX as u64) / MAX_REQUEST * MAX_REQUEST;
const MAX_REQUEST: u64 = (i32::MAX as u64) / SECTOR * SECTOR;

pub struct NullNode {
    size: u64,
    /// Every read, write and flush waits this long first (qemu's
    /// `latency-ns`): a slow disk without a disk.
    latency: Option<Duration>,
    read_zeroes: bool,
    read_only: AtomicBool,
}

impl NullNode {
    /// A null node of `size` bytes (rounded up to whole sectors, as qemu
    /// measures nodes).
    pub fn new(size: u64, read_zeroes: bool, read_only: bool) -> NullNode {
        NullNode {
            size: size.next_multiple_of(SECTOR),
            latency: None,
            read_zeroes,
            read_only: AtomicBool::new(read_only),
        }
    }

    /// Makes every request wait `latency` first.
    pub fn with_latency(mut self, latency: Duration) -> NullNode {
        self.latency = (!latency.is_zero()).then_some(latency);
        self
    }

    fn wait(&self) {
        if let Some(l) = self.latency {
            std::thread::sleep(l);
        }
    }

    fn writable(&self) -> BlockResult<()> {
        if self.read_only() {
            return Err(BlockError::new(ErrorKind::Permission, "Node is read-only"));
        }
        Ok(())
    }
}

/// Opens a `null-co` node from blockdev-add options (`size`,
/// `latency-ns`, `read-zeroes`), with qemu's checks and texts.
pub fn from_options(opts: &Map<String, Value>, read_only: bool) -> BlockResult<Arc<dyn BlockNode>> {
    let size = match opts.get("size") {
        None => DEFAULT_SIZE,
        Some(v) => match v.as_u64() {
            Some(n) => n,
            // qsd 10.0.2 aborts on a negative size; refuse it in the
            // words qemu uses for its other negative sizes.
            None => {
                return Err(BlockError::invalid(format!(
                    "Value '{v}' is out of range for parameter 'size'"
                )))
            }
        },
    };
    if size.next_multiple_of(SECTOR) > MAX_LENGTH {
        return Err(BlockError::invalid(
            "Could not refresh total sector count: File too large",
        ));
    }
    // The schema lets a negative number through as uint64 (two's
    // complement); qemu reads the option as a signed number and refuses it.
    let latency = match opts.get("latency-ns") {
        None => 0,
        Some(v) => match v.as_u64().filter(|&n| n <= i64::MAX as u64) {
            Some(n) => n,
            None => return Err(BlockError::invalid("latency-ns is invalid")),
        },
    };
    let read_zeroes = opts
        .get("read-zeroes")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let node =
        NullNode::new(size, read_zeroes, read_only).with_latency(Duration::from_nanos(latency));
    Ok(Arc::new(node))
}

impl BlockNode for NullNode {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        // Nothing to lock or store: the flag is all there is.
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], _offset: u64) -> BlockResult<()> {
        self.wait();
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> BlockResult<()> {
        self.writable()?;
        self.wait();
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.writable()?;
        if flags.fast {
            // qemu's null-co has no write-zeroes of its own, so a fast zero
            // (no fallback to writing buffers) is refused: qsd answers
            // ENOTSUP although it advertises fast zero.
            return Err(BlockError::not_supported("Operation not supported"));
        }
        // qemu's generic fallback writes zero buffers, which wait.
        self.wait();
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        self.writable()
    }

    fn flush(&self) -> BlockResult<()> {
        self.wait();
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let len = len.min(self.size.saturating_sub(offset));
        let flags = if self.read_zeroes {
            STATE_HOLE | STATE_ZERO
        } else {
            STATE_HOLE
        };
        Ok(Extent { len, flags })
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        // Without latency a read never waits: skip the I/O threads.
        self.latency.is_none() && self.read_at(buf, offset).is_ok()
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        self.latency.is_none() && self.write_at(buf, offset, false).is_ok()
    }

    fn discard_zeroes(&self) -> bool {
        self.read_zeroes
    }

    fn format_name(&self) -> &'static str {
        crate::block::open::Driver::NullCo.name()
    }

    fn allocated_size(&self) -> Option<u64> {
        // qemu shows "actual-size": 0.
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::node::Node;
    use serde_json::json;

    fn opts(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn open(v: Value) -> BlockResult<Arc<dyn BlockNode>> {
        from_options(&opts(v), false)
    }

    #[test]
    fn defaults_are_qemus_one_gib_without_read_zeroes() {
        let n = open(json!({"driver": "null-co"})).expect("open");
        assert_eq!(n.size(), 1 << 30);
        assert!(!n.read_only());
        assert_eq!(
            n.block_status(0, 1 << 30).expect("status"),
            Extent {
                len: 1 << 30,
                flags: STATE_HOLE
            }
        );
        assert_eq!(n.format_name(), "null-co");
    }

    #[test]
    fn size_is_rounded_up_to_sectors_as_qsd_reports_it() {
        let n = open(json!({"size": 1000})).expect("open");
        assert_eq!(n.size(), 1024);
        let n = open(json!({"size": 0})).expect("open");
        assert_eq!(n.size(), 0);
    }

    #[test]
    fn bad_sizes_and_latencies_are_refused_with_qemu_texts() {
        let e = open(json!({"size": -1})).err().expect("refused");
        assert_eq!(e.context, "Value '-1' is out of range for parameter 'size'");
        let e = open(json!({"size": i64::MAX})).err().expect("refused");
        assert_eq!(
            e.context,
            "Could not refresh total sector count: File too large"
        );
        assert!(open(json!({"size": 1u64 << 62})).is_ok());
        // A negative latency arrives as a huge uint64.
        let e = open(json!({"latency-ns": u64::MAX}))
            .err()
            .expect("refused");
        assert_eq!(e.context, "latency-ns is invalid");
    }

    #[test]
    fn writes_are_dropped_and_reads_are_zero() {
        let n = Node::open(
            "n",
            open(json!({"size": 1 << 20, "read-zeroes": true})).expect("open"),
        )
        .expect("node");
        n.write_at(&[7u8; 4096], 0, true).expect("write");
        let mut buf = vec![9u8; 4096];
        n.read_at(&mut buf, 0).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        n.write_zeroes(0, 4096, ZeroFlags::default()).expect("zero");
        n.discard(0, 4096).expect("discard");
        n.flush().expect("flush");
        assert_eq!(
            n.block_status(4096, 1 << 30).expect("status"),
            Extent {
                len: (1 << 20) - 4096,
                flags: STATE_HOLE | STATE_ZERO
            }
        );
        assert_eq!(n.allocation_depth(0, 512).expect("depth").depth, 0);
    }

    #[test]
    fn reads_without_read_zeroes_still_give_zeroes() {
        let n = open(json!({})).expect("open");
        let mut buf = vec![0xffu8; 512];
        assert!(n.try_read_nowait(&mut buf, 0));
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn fast_zero_is_refused_as_in_qsd() {
        let n = open(json!({})).expect("open");
        let fast = ZeroFlags {
            may_unmap: true,
            fast: true,
        };
        let e = n.write_zeroes(0, 4096, fast).expect_err("refused");
        assert_eq!(e.kind, ErrorKind::NotSupported);
    }

    #[test]
    fn a_read_only_node_refuses_writes_until_reopened() {
        let n = from_options(&opts(json!({})), true).expect("open");
        let e = n.write_at(&[1u8; 512], 0, false).expect_err("refused");
        assert_eq!(e.kind, ErrorKind::Permission);
        assert!(!n.try_write_nowait(&[1u8; 512], 0));
        n.reopen(false).expect("reopen");
        n.write_at(&[1u8; 512], 0, false).expect("write");
    }

    #[test]
    fn latency_delays_each_request() {
        let n = open(json!({"latency-ns": 20_000_000})).expect("open");
        let mut buf = [0u8; 512];
        assert!(
            !n.try_read_nowait(&mut buf, 0),
            "a slow node takes the pool"
        );
        let t = std::time::Instant::now();
        n.read_at(&mut buf, 0).expect("read");
        n.flush().expect("flush");
        assert!(t.elapsed() >= Duration::from_millis(40));
    }
}
