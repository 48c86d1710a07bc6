//! Copying a range from one node to another, as the jobs and the
//! copy-before-write filter do it: zero runs written as zeroes, and a
//! failure that says which side failed.

use super::{BlockError, BlockNode, ZeroFlags, STATE_ZERO};

/// Which side of a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

/// A failed copy: the side and the error.
#[derive(Debug)]
pub struct CopyError {
    pub side: Side,
    pub error: BlockError,
}

impl CopyError {
    pub fn source(error: BlockError) -> CopyError {
        CopyError {
            side: Side::Source,
            error,
        }
    }

    pub fn target(error: BlockError) -> CopyError {
        CopyError {
            side: Side::Target,
            error,
        }
    }
}

/// How [`copy_range`] writes zeroes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Zeroes {
    /// Data that turns out to be all zeroes is written as zeroes too (as
    /// qemu's copy-on-read).
    pub detect: bool,
    /// Zeroes may deallocate the target (as qemu's block-copy: a raw
    /// target keeps holes where the source had them).
    pub unmap: bool,
}

impl Zeroes {
    /// Stream, commit and mirror: zero data written as zeroes, which
    /// allocate (a zero cluster masks a backing file).
    pub const JOBS: Zeroes = Zeroes {
        detect: true,
        unmap: false,
    };
}

/// Copies `[offset, offset + len)` from `src` to `dst`, writing zeroes
/// (not data) where the source reads as zero: ranges the source reports
/// as zero are not even read.
pub fn copy_range(
    src: &dyn BlockNode,
    dst: &dyn BlockNode,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
    zeroes: Zeroes,
) -> Result<(), CopyError> {
    let (source, target) = (CopyError::source, CopyError::target);
    let flags = ZeroFlags {
        may_unmap: zeroes.unmap,
        fast: false,
    };
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let e = src.block_status(at, end - at).map_err(source)?;
        let n = e.len.clamp(1, end - at);
        if e.flags & STATE_ZERO != 0 {
            dst.write_zeroes(at, n, flags).map_err(target)?;
        } else {
            buf.resize(n as usize, 0);
            src.read_at(buf, at).map_err(source)?;
            let written = match zeroes.detect && buf.iter().all(|&b| b == 0) {
                true => dst.write_zeroes(at, n, flags),
                false => dst.write_at(buf, at, false),
            };
            written.map_err(target)?;
        }
        at += n;
    }
    Ok(())
}
