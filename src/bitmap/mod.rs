//! In-memory dirty bitmaps: which granules of a disk changed since a point
//! in time, with QEMU's semantics, error texts and hash.
//!
//! Each file does one job:
//! - `limits.rs`: granularity, name and size rules; the default granularity.
//! - `name.rs`: a name as qemu's bytes (modified UTF-8) and back.
//! - `dirty.rs`: `DirtyBitmap` (bits in a `BitVec<u64, Lsb0>`), its
//!   bytes-to-granules mapping, set/reset.
//! - `extents.rs`: next dirty area, next clean byte, extent iterators.
//! - `merge.rs`: OR across granularities, with QEMU's rules.
//! - `state.rs`: recording/busy/inconsistent/persistent/read-only flags and
//!   the rule checks that read them.
//! - `serial.rs`: the qcow2 bitmap data stream.
//! - `sha.rs`: `x-debug-block-dirty-bitmap-sha256`.
//! - `set.rs`: the bitmaps of one node, marked on every write.

mod dirty;
mod error;
mod extents;
mod limits;
mod merge;
pub mod name;
mod serial;
pub mod set;
mod sha;
mod state;

pub use dirty::DirtyBitmap;
pub use error::{BitmapError, BitmapErrorKind, BitmapResult};
pub use extents::{DirtyExtents, Extent, Extents};
pub use limits::{
    check_name, check_name_not_empty, default_granularity, granularity_shift, MAX_DISK_SIZE,
    MAX_GRANULARITY, MAX_NAME_LEN, MIN_GRANULARITY,
};
pub use state::{BitmapState, Checks};

#[cfg(test)]
mod tests;
