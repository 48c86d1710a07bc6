//! Errors of the block layer, with the kind a protocol needs to pick its
//! error code and the context a user needs to understand it.

use std::io;

/// What went wrong, in the terms a protocol can translate (NBD errno,
/// QMP error class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An I/O error from the host (EIO).
    Io,
    /// No space left on the host (ENOSPC).
    NoSpace,
    /// The operation cannot be done this way (ENOTSUP), e.g. a fast zero
    /// that would need a slow fallback.
    NotSupported,
    /// Bad argument: range outside the image, bad size (EINVAL).
    Invalid,
    /// The node is read-only or locked (EPERM).
    Permission,
    /// The image metadata is inconsistent; the image must not be written.
    Corrupt,
}

#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct BlockError {
    pub kind: ErrorKind,
    pub context: String,
    #[source]
    pub source: Option<io::Error>,
}

pub type BlockResult<T> = Result<T, BlockError>;

impl BlockError {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        BlockError {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// Wraps a host error, choosing the kind from its errno.
    pub fn io(context: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::EOPNOTSUPP) => ErrorKind::NotSupported,
            Some(libc::EINVAL) => ErrorKind::Invalid,
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => ErrorKind::Permission,
            _ => ErrorKind::Io,
        };
        let context = format!("{}: {}", context.into(), err);
        BlockError {
            kind,
            context,
            source: Some(err),
        }
    }

    pub fn corrupt(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, context)
    }

    pub fn invalid(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, context)
    }

    pub fn not_supported(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotSupported, context)
    }
}
