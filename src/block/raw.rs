//! Pass-through layers the daemon's block graph needs to have qemu's shape.
//!
//! - [`RawFormat`]: the raw format over a child: bytes pass through
//!   unchanged. Over a child `Node`, writes go through that node, which
//!   marks the child's own dirty bitmaps too; the layer may be read-only
//!   over a writable child (also used so two `file` nodes of one daemon
//!   can share one open, locked host file, one of them read-only).
//! - [`FileView`]: the `file` node under a format driver that opened the
//!   image itself (qcow2): the host file, read-only and without taking
//!   locks, since the format driver above holds them for this process.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BlockError, BlockNode, BlockResult, DepthExtent, ErrorKind, Extent, ZeroFlags};

pub struct RawFormat {
    child: Arc<dyn BlockNode>,
    read_only: bool,
}

impl RawFormat {
    pub fn new(child: Arc<dyn BlockNode>, read_only: bool) -> RawFormat {
        let read_only = read_only || child.read_only();
        RawFormat { child, read_only }
    }

    fn writable(&self) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::new(ErrorKind::Permission, "Node is read-only"));
        }
        Ok(())
    }
}

impl BlockNode for RawFormat {
    fn size(&self) -> u64 {
        self.child.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.child.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.writable()?;
        self.child.write_at(buf, offset, fua)
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.child.try_read_nowait(buf, offset)
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        !self.read_only && self.child.try_write_nowait(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.writable()?;
        self.child.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable()?;
        self.child.discard(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        self.child.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.child.block_status(offset, len)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        self.child.allocation_depth(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.child.cache(offset, len)
    }

    fn discard_zeroes(&self) -> bool {
        self.child.discard_zeroes()
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn cluster_size(&self) -> u64 {
        self.child.cluster_size()
    }

    fn backing_layer(&self) -> Option<Arc<dyn BlockNode>> {
        self.child.backing_layer()
    }
}

pub struct FileView {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl FileView {
    /// Opens `path` for reading, without locks. `read_only` is what the
    /// node reports (the format node above decides what is written).
    pub fn open(path: &Path, read_only: bool) -> BlockResult<FileView> {
        let file = File::open(path)
            .map_err(|e| BlockError::io(format!("Could not open '{}'", path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| BlockError::io(format!("Could not stat '{}'", path.display()), e))?
            .len();
        Ok(FileView {
            file,
            path: path.to_owned(),
            size,
            read_only,
        })
    }

    fn refuse(&self) -> BlockError {
        BlockError::new(
            ErrorKind::Permission,
            format!(
                "'{}' is written through the format node above it",
                self.path.display()
            ),
        )
    }
}

impl BlockNode for FileView {
    fn size(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(self.size)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            BlockError::io(
                format!("read at offset {offset} of '{}'", self.path.display()),
                e,
            )
        })
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> BlockResult<()> {
        Err(self.refuse())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> BlockResult<()> {
        Err(self.refuse())
    }

    fn discard(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Err(self.refuse())
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    /// Everything reads as data: the format above knows what is allocated.
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        Ok(Extent {
            len: len.min(self.size().saturating_sub(offset)).max(1),
            flags: 0,
        })
    }

    fn format_name(&self) -> &'static str {
        "file"
    }
}
