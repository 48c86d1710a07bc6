//! Image locking compatible with qemu's (block/file-posix): shared OFD
//! byte-range locks on the image file. Byte 100 + p says "I use permission
//! p"; byte 200 + p says "I do not let others use permission p". A process
//! may take p only if nobody holds 200 + p, and may forbid p only if nobody
//! holds 100 + p. Permission bits: 0 consistent read, 1 write, 2 write
//! unchanged, 3 resize.
//!
//! Like qemu-io, a writer uses {read, write, resize} and forbids {write,
//! resize}; a reader uses {read} and forbids {write, resize}. So qemu and
//! tidemark never write the same image at once, and nobody writes an image
//! someone reads.
//!
//! The locks belong to the open file description, so they last exactly as
//! long as the file handle they were taken on.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{BlockError, BlockResult, ErrorKind};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;

/// Ordered: `Write` needs more than `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LockMode {
    Read,
    Write,
}

/// Which locks are held on a file (they go with it); `None`: none.
#[derive(Debug)]
pub struct ImageLock {
    pub mode: Option<LockMode>,
}

fn perm_name(p: i64) -> &'static str {
    match p {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        3 => "resize",
        _ => "unknown",
    }
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

fn set(file: &File, kind: i32, byte: i64) -> std::io::Result<()> {
    let mut fl = flock(kind, byte);
    // SAFETY: valid fd owned by `file`, valid pointer to a flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// True if another open file description holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: as above; F_OFD_GETLK only fills in the struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// The lock bytes a mode holds: the permissions it uses, and those it
/// does not let others use.
fn bytes_of(mode: Option<LockMode>) -> (&'static [i64], &'static [i64]) {
    match mode {
        None => (&[], &[]),
        Some(LockMode::Read) => (&[PERM_READ], &[PERM_WRITE, PERM_RESIZE]),
        Some(LockMode::Write) => (
            &[PERM_READ, PERM_WRITE, PERM_RESIZE],
            &[PERM_WRITE, PERM_RESIZE],
        ),
    }
}

fn lock_bytes(mode: Option<LockMode>) -> Vec<i64> {
    let (perms, unshared) = bytes_of(mode);
    perms
        .iter()
        .map(|p| PERM_BASE + p)
        .chain(unshared.iter().map(|p| SHARED_BASE + p))
        .collect()
}

impl ImageLock {
    /// Opens an image file for reading, and for writing where it may (a
    /// read-only node may become writable by a reopen, which then only has
    /// to change the locks: they belong to this open file), and takes
    /// qemu's locks for `read_only`'s use; with `share` takes none and
    /// never writes (qemu-img -U).
    pub fn open(path: &Path, read_only: bool, share: bool) -> BlockResult<(File, ImageLock)> {
        let file = Self::open_file(path, read_only, share)?;
        let mut lock = ImageLock::unlocked();
        if !share {
            let mode = if read_only {
                LockMode::Read
            } else {
                LockMode::Write
            };
            lock.switch(&file, path, Some(mode))?;
        }
        Ok((file, lock))
    }

    /// Opens an image file as [`ImageLock::open`] does, taking no locks
    /// yet: a node of the block graph takes them once its users are known
    /// (as qemu derives them from its parents' permissions).
    pub fn open_file(path: &Path, read_only: bool, share: bool) -> BlockResult<File> {
        let io = |e| BlockError::io(format!("Could not open '{}'", path.display()), e);
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) if !share => Ok(f),
            Err(e) if !read_only => Err(io(e)),
            _ => File::open(path).map_err(io),
        }
    }

    /// No locks held (yet).
    pub fn unlocked() -> ImageLock {
        ImageLock { mode: None }
    }

    pub fn acquire(file: &File, path: &Path, mode: LockMode) -> BlockResult<ImageLock> {
        let mut lock = ImageLock::unlocked();
        lock.switch(file, path, Some(mode))?;
        Ok(lock)
    }

    /// Moves the locks held on `file` from `self.mode` to `mode`, or
    /// fails with qemu's message if another open file's locks conflict;
    /// then the locks stay as they were.
    pub fn switch(&mut self, file: &File, path: &Path, mode: Option<LockMode>) -> BlockResult<()> {
        if mode == self.mode {
            return Ok(());
        }
        let old = lock_bytes(self.mode);
        let new = lock_bytes(mode);
        let mut taken = Vec::new();
        for &byte in new.iter().filter(|b| !old.contains(b)) {
            match set(file, libc::F_RDLCK, byte) {
                Ok(()) => taken.push(byte),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => {
                    // As qemu: a filesystem without OFD locks is used unlocked.
                    tracing::warn!("'{}': image locking unavailable: {}", path.display(), e);
                    release(file, &taken);
                    self.mode = mode;
                    return Ok(());
                }
                Err(e) => {
                    release(file, &taken);
                    return Err(lock_error(path, format!("Failed to lock byte {}", byte), e));
                }
            }
        }
        let (perms, unshared) = bytes_of(mode);
        let check = || -> BlockResult<()> {
            let io = |e| lock_error(path, "Failed to query image locks".into(), e);
            for &p in perms {
                if held_by_other(file, SHARED_BASE + p).map_err(io)? {
                    return Err(conflict(
                        path,
                        format!("Failed to get \"{}\" lock", perm_name(p)),
                    ));
                }
            }
            for &p in unshared {
                if held_by_other(file, PERM_BASE + p).map_err(io)? {
                    return Err(conflict(
                        path,
                        format!("Failed to get shared \"{}\" lock", perm_name(p)),
                    ));
                }
            }
            Ok(())
        };
        if let Err(e) = check() {
            release(file, &taken);
            return Err(e);
        }
        let dropped: Vec<i64> = old.into_iter().filter(|b| !new.contains(b)).collect();
        release(file, &dropped);
        self.mode = mode;
        Ok(())
    }
}

fn release(file: &File, bytes: &[i64]) {
    for &b in bytes {
        let _ = set(file, libc::F_UNLCK, b);
    }
}

fn conflict(path: &Path, what: String) -> BlockError {
    BlockError::new(
        ErrorKind::Permission,
        format!(
            "{}\nIs another process using the image [{}]?",
            what,
            path.display()
        ),
    )
}

fn lock_error(path: &Path, what: String, e: std::io::Error) -> BlockError {
    BlockError::io(format!("'{}': {}", path.display(), what), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_and_readers_share() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).expect("write");
        let open = || {
            File::options()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open")
        };
        let (a, b, c) = (open(), open(), open());
        let _w = ImageLock::acquire(&a, &path, LockMode::Write).expect("first writer");
        let e = ImageLock::acquire(&b, &path, LockMode::Write).expect_err("second writer");
        assert!(e.context.contains("Failed to get \"write\" lock"), "{}", e);
        let e =
            ImageLock::acquire(&c, &path, LockMode::Read).expect_err("reader of a written image");
        assert!(e.context.contains("shared \"write\""), "{}", e);
        drop(a);
        let _r1 = ImageLock::acquire(&b, &path, LockMode::Read).expect("reader");
        let _r2 = ImageLock::acquire(&c, &path, LockMode::Read).expect("second reader");
    }
}
