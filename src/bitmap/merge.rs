//! Merging (OR) one bitmap into another, as `block-dirty-bitmap-merge`.
//!
//! QEMU's rules, checked against qemu-storage-daemon 10.0.2:
//! - the target must pass the DEFAULT checks (not busy, not read-only, not
//!   inconsistent), the source the ALLOW_RO checks (not busy, consistent);
//! - both must cover the same disk size, else "Bitmaps are of different
//!   sizes (destination size is D, source size is S) and can't be merged";
//! - granularities may differ: every target granule that overlaps a dirty
//!   source granule becomes dirty.

use super::dirty::DirtyBitmap;
use super::error::{BitmapError, BitmapErrorKind, BitmapResult};
use super::state::Checks;

impl DirtyBitmap {
    /// `self |= src` after QEMU's checks. On error nothing changes.
    ///
    /// Merging a bitmap into itself is a no-op in QEMU; with Rust's borrows
    /// the caller cannot pass the same bitmap twice, and should skip it.
    pub fn merge(&mut self, src: &DirtyBitmap) -> BitmapResult<()> {
        self.check(Checks::DEFAULT)?;
        src.check(Checks::ALLOW_RO)?;
        self.merge_bits(src)
    }

    /// `self |= src` without the state checks, for internal users such as
    /// a job's copy bitmap (QEMU's bdrv_dirty_bitmap_merge_internal). The
    /// sizes must still match.
    pub fn merge_bits(&mut self, src: &DirtyBitmap) -> BitmapResult<()> {
        if src.size() != self.size() {
            return Err(BitmapError::new(
                BitmapErrorKind::Incompatible,
                format!(
                    "Bitmaps are of different sizes (destination size is {}, source size \
                     is {}) and can't be merged",
                    self.size(),
                    src.size()
                ),
            ));
        }
        if src.granularity_shift() == self.granularity_shift() {
            *self.bits_mut() |= src.bits();
            return Ok(());
        }
        // Different granularities: walk the source's dirty areas (a word at
        // a time) and mark them in bytes, which rounds outwards to our
        // granules. Sizes are equal, so every area lies within our disk.
        let size = self.size();
        let mut pos = 0;
        while let Some((start, len)) = src.next_dirty_area(pos, size) {
            self.set_range(start, len)?;
            pos = start + len;
        }
        Ok(())
    }
}
