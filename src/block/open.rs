//! Opening an image by path: probe the format, pick the driver.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::{BlockError, BlockNode, BlockResult};

/// Image formats tidemark understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Guesses the format from the first bytes, as qemu does: a qcow magic means
/// qcow2, anything else is raw.
pub fn probe(path: &Path) -> BlockResult<Format> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path)
        .map_err(|e| BlockError::io(format!("Could not open '{}'", path.display()), e))?;
    let n = f
        .read(&mut magic)
        .map_err(|e| BlockError::io(format!("Could not read '{}'", path.display()), e))?;
    Ok(if n == 4 && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Opens `path` as `format` (probed when `None`).
pub fn open_image(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
) -> BlockResult<Arc<dyn BlockNode>> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    super::chain::open_chain(path, Some(format), read_only)
}

/// The kind of a node of the block graph, by qemu's driver name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    File,
    Raw,
    Qcow2,
    /// tidemark's pass-through filter (a test hook for graph changes).
    Passthrough,
    /// The copy-before-write filter (a backup job's, or one of its own for
    /// fleecing).
    CopyBeforeWrite,
    /// The point-in-time view over a copy-before-write node.
    SnapshotAccess,
    /// The filters of mirror (and active commit), commit and stream.
    MirrorTop,
    CommitTop,
    CopyOnRead,
    /// qemu's null-co: a sink that stores nothing (benchmarks).
    NullCo,
    /// qemu's blkdebug: a filter that injects I/O errors (tests).
    Blkdebug,
}

impl Driver {
    /// The filters of [`crate::block::filter`] (their child is `file` in
    /// qemu's descriptions).
    pub fn is_filter(self) -> bool {
        matches!(
            self,
            Driver::Passthrough | Driver::MirrorTop | Driver::CommitTop | Driver::CopyOnRead
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::File => "file",
            Driver::Raw => "raw",
            Driver::Qcow2 => "qcow2",
            Driver::Passthrough => "x-tidemark-passthrough",
            Driver::CopyBeforeWrite => "copy-before-write",
            Driver::SnapshotAccess => "snapshot-access",
            Driver::MirrorTop => "mirror_top",
            Driver::CommitTop => "commit_top",
            Driver::CopyOnRead => "copy-on-read",
            Driver::NullCo => "null-co",
            Driver::Blkdebug => "blkdebug",
        }
    }
}

impl Format {
    pub fn driver(self) -> Driver {
        match self {
            Format::Raw => Driver::Raw,
            Format::Qcow2 => Driver::Qcow2,
        }
    }
}
