//! Positioned I/O on the image file with errors that name the file and the
//! offset. A read that runs past the end of the file is a corrupt image,
//! not a short read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::block::{BlockError, BlockResult};

pub struct HostFile {
    pub file: File,
    pub path: PathBuf,
}

impl HostFile {
    pub fn new(file: File, path: &Path) -> Self {
        HostFile {
            file,
            path: path.to_owned(),
        }
    }

    pub fn len(&self) -> BlockResult<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| BlockError::io(format!("Could not stat '{}'", self.path.display()), e))
    }

    /// Reads exactly `buf.len()` bytes; `what` names the structure read.
    pub fn read(&self, buf: &mut [u8], off: u64, what: &str) -> BlockResult<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    return Err(BlockError::corrupt(format!(
                        "'{}': {} at offset {} (+{} bytes) lies past the end of the file",
                        self.path.display(),
                        what,
                        off,
                        buf.len()
                    )))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(BlockError::io(
                        format!(
                            "Could not read {} at offset {} of '{}'",
                            what,
                            off,
                            self.path.display()
                        ),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Reads what exists of the range and zero-fills the rest (for
    /// compressed data whose last sector may end past EOF).
    pub fn read_partial(&self, buf: &mut [u8], off: u64) -> BlockResult<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(BlockError::io(
                        format!("Could not read offset {} of '{}'", off, self.path.display()),
                        e,
                    ))
                }
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    pub fn write(&self, buf: &[u8], off: u64, what: &str) -> BlockResult<()> {
        self.file.write_all_at(buf, off).map_err(|e| {
            BlockError::io(
                format!(
                    "Could not write {} at offset {} of '{}'",
                    what,
                    off,
                    self.path.display()
                ),
                e,
            )
        })
    }

    /// Whether the file holds data (true) or a hole (false) at `off`, and
    /// for how many bytes of `len` that lasts. Past EOF is a hole. Errors
    /// count as data: this only refines block status, as in qemu.
    pub fn data_run(&self, off: u64, len: u64) -> (bool, u64) {
        use rustix::fs::{seek, SeekFrom};
        use rustix::io::Errno;
        match seek(&self.file, SeekFrom::Data(off)) {
            Ok(d) if d <= off => match seek(&self.file, SeekFrom::Hole(off)) {
                Ok(h) if h > off => (true, (h - off).min(len)),
                _ => (true, len),
            },
            Ok(d) => (false, (d - off).min(len)),
            Err(Errno::NXIO) => (false, len),
            Err(_) => (true, len),
        }
    }

    /// Allocates `[off, off + len)` as zeroes (extending the file), if the
    /// filesystem can do that without writing them; false if it cannot.
    pub fn zero_range(&self, off: u64, len: u64) -> bool {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(&self.file, FallocateFlags::ZERO_RANGE, off, len).is_ok()
    }

    /// Deallocates a range of the host file (best effort: only space is
    /// at stake, the range is free in the image).
    pub fn punch(&self, off: u64, len: u64) {
        use rustix::fs::{fallocate, FallocateFlags};
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let _ = fallocate(&self.file, flags, off, len);
    }

    pub fn sync(&self) -> BlockResult<()> {
        self.file
            .sync_data()
            .map_err(|e| BlockError::io(format!("Could not flush '{}'", self.path.display()), e))
    }
}
