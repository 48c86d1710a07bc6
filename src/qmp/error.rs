//! A QMP error: qemu's error class and the human-readable text, exactly as
//! `{"error": {"class": ..., "desc": ...}}` carries them.

use std::fmt;

use crate::bitmap::BitmapError;
use crate::block::BlockError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// `GenericError` for nearly everything; `CommandNotFound` for unknown
    /// commands and commands before negotiation (qemu's only other classes
    /// in use are for devices tidemark does not have).
    pub class: &'static str,
    pub desc: String,
}

pub type QmpResult<T> = Result<T, QmpError>;

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

impl From<BitmapError> for QmpError {
    /// qemu reports every bitmap rule as GenericError; the hint is only for
    /// humans on a command line and is not sent over QMP.
    fn from(e: BitmapError) -> Self {
        QmpError::generic(e.message)
    }
}

impl From<BlockError> for QmpError {
    /// The first line only: what follows is a hint for humans (qemu's
    /// error_append_hint, "Is another process using the image?"), which
    /// qemu does not send over QMP.
    fn from(e: BlockError) -> Self {
        let first = e.context.lines().next().unwrap_or_default();
        QmpError::generic(strip_os_error(first))
    }
}

/// Rust's io::Error appends " (os error N)" to strerror's text; qemu prints
/// strerror alone, and clients match on qemu's text.
pub fn strip_os_error(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_owned(),
        _ => s.to_owned(),
    }
}
