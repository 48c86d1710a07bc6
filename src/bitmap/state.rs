//! The flags a bitmap carries besides its bits, and the rules that read
//! them. Each rule is one function returning QEMU's error text, so every
//! command that needs a rule calls the same function (QEMU's
//! bdrv_dirty_bitmap_check and its BDRV_BITMAP_* flags).

use super::dirty::DirtyBitmap;
use super::error::{BitmapError, BitmapErrorKind, BitmapResult};

/// Plain flags, no I/O: what `query-block`'s `dirty-bitmaps` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapState {
    /// Enabled: writes through the node mark the bitmap.
    pub recording: bool,
    /// In use by an export or a job: it cannot be removed, cleared, enabled,
    /// disabled or merged into.
    pub busy: bool,
    /// Found `in_use` in the image on open: its bits cannot be trusted, and
    /// the only thing allowed is removing it.
    pub inconsistent: bool,
    /// Stored in the image on close (qcow2 only).
    pub persistent: bool,
    /// Loaded from a read-only image layer: it cannot be modified.
    pub readonly: bool,
    /// Owned by a backup job, which gave it a successor: writes go to the
    /// successor while this keeps its bits (it still reports recording).
    pub frozen: bool,
}

impl Default for BitmapState {
    /// A new bitmap records, as after `block-dirty-bitmap-add`.
    fn default() -> Self {
        BitmapState {
            recording: true,
            busy: false,
            inconsistent: false,
            persistent: false,
            readonly: false,
            frozen: false,
        }
    }
}

/// Which rules an operation needs, as QEMU's BitmapCheckFlags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    pub busy: bool,
    pub readonly: bool,
    pub inconsistent: bool,
}

impl Checks {
    /// For operations that modify the bitmap (BDRV_BITMAP_DEFAULT).
    pub const DEFAULT: Checks = Checks {
        busy: true,
        readonly: true,
        inconsistent: true,
    };
    /// For operations that only read it, e.g. a merge source
    /// (BDRV_BITMAP_ALLOW_RO).
    pub const ALLOW_RO: Checks = Checks {
        busy: true,
        readonly: false,
        inconsistent: true,
    };
}

impl DirtyBitmap {
    /// Refuses a busy bitmap.
    pub fn check_not_busy(&self) -> BitmapResult<()> {
        if self.state.busy {
            return Err(BitmapError::new(
                BitmapErrorKind::Busy,
                format!(
                    "Bitmap '{}' is currently in use by another operation and cannot be used",
                    self.name()
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a bitmap of a read-only layer.
    pub fn check_writable(&self) -> BitmapResult<()> {
        if self.state.readonly {
            return Err(BitmapError::new(
                BitmapErrorKind::ReadOnly,
                format!(
                    "Bitmap '{}' is readonly and cannot be modified",
                    self.name()
                ),
            ));
        }
        Ok(())
    }

    /// Refuses an inconsistent bitmap (everything but removal calls this).
    pub fn check_consistent(&self) -> BitmapResult<()> {
        if self.state.inconsistent {
            return Err(BitmapError::new(
                BitmapErrorKind::Inconsistent,
                format!(
                    "Bitmap '{}' is inconsistent and cannot be used",
                    self.name()
                ),
            )
            .with_hint("Try block-dirty-bitmap-remove to delete this bitmap from disk"));
        }
        Ok(())
    }

    /// Applies the chosen rules in QEMU's order: busy, read-only,
    /// inconsistent; the first broken one is reported.
    pub fn check(&self, checks: Checks) -> BitmapResult<()> {
        if checks.busy {
            self.check_not_busy()?;
        }
        if checks.readonly {
            self.check_writable()?;
        }
        if checks.inconsistent {
            self.check_consistent()?;
        }
        Ok(())
    }

    /// Marks the bitmap inconsistent, which also stops it recording (as
    /// QEMU's bdrv_dirty_bitmap_set_inconsistent).
    pub fn mark_inconsistent(&mut self) {
        self.state.inconsistent = true;
        self.state.recording = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b0() -> DirtyBitmap {
        DirtyBitmap::new("b0", 1 << 20, 65536).unwrap()
    }

    #[test]
    fn busy_bitmap_is_refused_with_qemu_text() {
        let mut b = b0();
        assert!(b.check(Checks::DEFAULT).is_ok());
        b.state.busy = true;
        let err = b.check(Checks::ALLOW_RO).unwrap_err();
        assert_eq!(err.kind, BitmapErrorKind::Busy);
        assert_eq!(
            err.message,
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        );
    }

    #[test]
    fn readonly_bitmap_can_be_read_not_modified() {
        let mut b = b0();
        b.state.readonly = true;
        assert!(b.check(Checks::ALLOW_RO).is_ok());
        assert_eq!(
            b.check(Checks::DEFAULT).unwrap_err().message,
            "Bitmap 'b0' is readonly and cannot be modified"
        );
    }

    #[test]
    fn inconsistent_bitmap_is_refused_with_hint() {
        let mut b = b0();
        b.state.persistent = true;
        b.mark_inconsistent();
        assert!(!b.state.recording);
        let err = b.check(Checks::ALLOW_RO).unwrap_err();
        assert_eq!(
            err.message,
            "Bitmap 'b0' is inconsistent and cannot be used"
        );
        assert_eq!(
            err.hint.as_deref(),
            Some("Try block-dirty-bitmap-remove to delete this bitmap from disk")
        );
    }

    #[test]
    fn busy_is_reported_before_readonly_and_inconsistent() {
        let mut b = b0();
        b.state = BitmapState {
            recording: false,
            busy: true,
            inconsistent: true,
            persistent: true,
            readonly: true,
            frozen: false,
        };
        assert_eq!(
            b.check(Checks::DEFAULT).unwrap_err().kind,
            BitmapErrorKind::Busy
        );
        b.state.busy = false;
        assert_eq!(
            b.check(Checks::DEFAULT).unwrap_err().kind,
            BitmapErrorKind::ReadOnly
        );
    }
}
