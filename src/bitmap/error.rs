//! Errors of the bitmap layer, carrying the exact text QEMU gives for the
//! same mistake, so a QMP client sees the message it would search for.

use std::fmt;

/// What kind of rule was broken; the QMP layer reports every kind as
/// `GenericError`, other fronts may pick an errno from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapErrorKind {
    /// A bad argument: granularity, name, range, data length (EINVAL).
    Invalid,
    /// The bitmap is busy: an export or a job is using it (EBUSY).
    Busy,
    /// The bitmap belongs to a read-only image layer (EPERM).
    ReadOnly,
    /// The bitmap was found `in_use` on open; it can only be removed.
    Inconsistent,
    /// Two bitmaps cannot be combined (different disk sizes).
    Incompatible,
    /// Not enough memory for the bits (ENOMEM).
    NoMemory,
}

/// An error with QEMU's message and, where QEMU prints one, its hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapError {
    pub kind: BitmapErrorKind,
    /// The message, word for word as QEMU's `error_setg` text.
    pub message: String,
    /// QEMU's `error_append_hint` text, shown by command-line tools but not
    /// sent over QMP.
    pub hint: Option<String>,
}

pub type BitmapResult<T> = Result<T, BitmapError>;

impl BitmapError {
    pub fn new(kind: BitmapErrorKind, message: impl Into<String>) -> Self {
        BitmapError {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(BitmapErrorKind::Invalid, message)
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BitmapError {}
