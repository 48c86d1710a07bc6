//! A record of every write and flush made to an image file, for tests
//! that rebuild what a power cut would have left (tests/bitmap_power_cut).
//! Off unless `TIDEMARK_IO_TRACE` names a directory: then each file opened
//! for writing appends to `DIR/<file name>.trace`, records in the order the
//! operations completed:
//!
//! `op: u8` (1 write, 2 zeroes, 3 discard, 4 flush), `offset: u64 LE`,
//! `len: u64 LE`, then `len` bytes of data for a write.
//!
//! A flush is recorded once it returned: every operation before it is on
//! the disk; those after it may or may not be.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

pub const OP_WRITE: u8 = 1;
pub const OP_ZEROES: u8 = 2;
pub const OP_DISCARD: u8 = 3;
pub const OP_FLUSH: u8 = 4;

fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("TIDEMARK_IO_TRACE").map(PathBuf::from))
        .as_ref()
}

pub struct Trace(Mutex<File>);

impl Trace {
    /// The trace of image file `path`, when tracing is on.
    pub fn open_for(path: &Path) -> Option<Trace> {
        let name = format!("{}.trace", path.file_name()?.to_string_lossy());
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir()?.join(name));
        match file {
            Ok(f) => Some(Trace(Mutex::new(f))),
            Err(e) => {
                tracing::error!(error = %e, "could not open the I/O trace");
                None
            }
        }
    }

    pub fn record(&self, op: u8, offset: u64, len: u64, data: &[u8]) {
        let mut rec = Vec::with_capacity(17 + data.len());
        rec.push(op);
        rec.extend_from_slice(&offset.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(data);
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&rec) {
            tracing::error!(error = %e, "could not write the I/O trace");
        }
    }
}
