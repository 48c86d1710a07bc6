//! A named node of the block graph: a format driver plus the dirty bitmaps
//! that watch it. Every write through a `Node` marks the node's recording
//! bitmaps before it reaches the driver, so no acknowledged write can be
//! missing from a bitmap, even after a crash mid-write.

use std::sync::Arc;

use super::{BlockError, BlockNode, BlockResult, DepthExtent, Extent, ZeroFlags};
use crate::bitmap::set::{lock, BitmapSet};
use crate::bitmap::DirtyBitmap;

pub struct Node {
    name: String,
    driver: Arc<dyn BlockNode>,
    bitmaps: Arc<BitmapSet>,
}

impl Node {
    /// Wraps `driver`, loading the bitmaps its image stores.
    pub fn open(name: impl Into<String>, driver: Arc<dyn BlockNode>) -> BlockResult<Node> {
        let bitmaps = BitmapSet::new();
        for b in driver.load_bitmaps()? {
            let name = b.name().to_owned();
            bitmaps.add(b).map_err(|e| {
                BlockError::corrupt(format!("bitmap '{name}' stored twice: {}", e.message))
            })?;
        }
        Ok(Node {
            name: name.into(),
            driver,
            bitmaps: Arc::new(bitmaps),
        })
    }

    /// Stores the persistent bitmaps in the image (a clean close, or an
    /// explicit store point), then flushes.
    pub fn store_bitmaps(&self) -> BlockResult<()> {
        let all = self.bitmaps.all();
        let guards: Vec<_> = all.iter().map(lock).collect();
        let persistent: Vec<&DirtyBitmap> = guards
            .iter()
            .filter(|b| b.state.persistent)
            .map(|b| &**b)
            .collect();
        if !self.driver.read_only() {
            self.driver.store_bitmaps(&persistent)?;
        }
        self.driver.flush()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bitmaps(&self) -> &Arc<BitmapSet> {
        &self.bitmaps
    }

    pub fn driver(&self) -> &Arc<dyn BlockNode> {
        &self.driver
    }
}

impl BlockNode for Node {
    fn size(&self) -> u64 {
        self.driver.size()
    }

    fn read_only(&self) -> bool {
        self.driver.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.driver.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.bitmaps.mark(offset, buf.len() as u64);
        self.driver.write_at(buf, offset, fua)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.driver.try_read_nowait(buf, offset)
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        // Marking first keeps the rule; if the fast path declines, the
        // slow path marks the same range again, which changes nothing.
        self.bitmaps.mark(offset, buf.len() as u64);
        self.driver.try_write_nowait(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.bitmaps.mark(offset, len);
        self.driver.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.bitmaps.mark(offset, len);
        self.driver.discard(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        self.driver.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.driver.block_status(offset, len)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        self.driver.allocation_depth(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.driver.cache(offset, len)
    }

    fn discard_zeroes(&self) -> bool {
        self.driver.discard_zeroes()
    }

    fn format_name(&self) -> &'static str {
        self.driver.format_name()
    }
}
