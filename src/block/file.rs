//! A raw host file: bytes at offset N of the image are bytes at offset N of
//! the file. Holes are found with SEEK_DATA/SEEK_HOLE, zeroes are written
//! with fallocate where the filesystem can, flush is fdatasync.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::buffer::spare_capacity;
use rustix::fs::{fadvise, fallocate, seek, Advice, FallocateFlags, SeekFrom};
use rustix::io::{preadv2, pwritev2, Errno, IoSlice, IoSliceMut, ReadWriteFlags};
use rustix::pipe::{splice, SpliceFlags};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::lock::{ImageLock, LockMode};
use super::{BlockError, BlockNode, BlockResult, DepthExtent, ErrorKind, Extent, ZeroFlags};
use super::{STATE_HOLE, STATE_ZERO};

/// Largest zero buffer written at once when the filesystem cannot zero a
/// range itself.
const ZERO_CHUNK: u64 = 1 << 20;

pub struct FileNode {
    file: File,
    path: PathBuf,
    read_only: AtomicBool,
    /// qemu's locks on `file`, switched by a reopen.
    lock: Mutex<ImageLock>,
    /// The image size: the file's length rounded up to 512 bytes, as qemu
    /// sees raw files; the tail past EOF reads as zeroes. Grows when a
    /// format above writes past the end.
    size: AtomicU64,
    /// RWF_NOWAIT turned out not to work here for reads / for writes
    /// (ext4 takes it for buffered reads only); don't ask again.
    nowait_read_unsupported: AtomicBool,
    nowait_write_unsupported: AtomicBool,
    /// splice() from this file failed as unsupported: read_to_pipe declines.
    splice_unsupported: AtomicBool,
    holes: HoleHints,
    /// Tests only: every write and flush, recorded (see io_trace.rs).
    trace: Option<super::io_trace::Trace>,
}

const SECTOR: u64 = 512;

/// Holes kept in [`HoleHints`]: two 128 MiB map requests' worth on a
/// 1%-allocated image, so reads that follow a walk still find theirs.
const HOLE_HINTS: usize = 64;

/// Holes of the file seen lately, as `[start, end)` (an end of `start + 1`
/// where only the start is known). A status query that starts in one of
/// them asks SEEK_DATA alone; any other is taken to start in data and
/// asks SEEK_HOLE alone. A map walk, and the reads that follow it, thus
/// cost one lseek per boundary; a wrong guess (a file that changed since)
/// costs one more call, never a wrong answer.
struct HoleHints(Mutex<([(u64, u64); HOLE_HINTS], usize)>);

impl HoleHints {
    fn new() -> HoleHints {
        HoleHints(Mutex::new(([(0, 0); HOLE_HINTS], 0)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ([(u64, u64); HOLE_HINTS], usize)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_hole(&self, at: u64) -> bool {
        self.lock().0.iter().any(|&(a, b)| a <= at && at < b)
    }

    fn add(&self, start: u64, end: u64) {
        let mut g = self.lock();
        let i = g.1;
        g.0[i] = (start, end);
        g.1 = (i + 1) % HOLE_HINTS;
    }
}

impl FileNode {
    fn traced(&self, op: u8, offset: u64, len: u64, data: &[u8]) {
        if let Some(t) = &self.trace {
            t.record(op, offset, len, data);
        }
    }

    pub fn open(path: &Path, read_only: bool) -> BlockResult<Self> {
        Self::open_with(path, read_only, false)
    }

    /// Opens read-only without taking the image locks, as qemu-img's `-U`
    /// (force share): what it reads may be changing.
    pub fn open_force_share(path: &Path) -> BlockResult<Self> {
        Self::open_with(path, true, true)
    }

    /// Opens without locks: a node of the block graph takes them when its
    /// users are known ([`BlockNode::set_image_locks`]).
    pub fn open_unlocked(path: &Path, read_only: bool) -> BlockResult<Self> {
        let file = ImageLock::open_file(path, read_only, false)?;
        Self::with_file(file, path, read_only, ImageLock::unlocked())
    }

    fn open_with(path: &Path, read_only: bool, share: bool) -> BlockResult<Self> {
        // qemu-compatible image locks; they live as long as `file`.
        let (file, lock) = ImageLock::open(path, read_only, share)?;
        Self::with_file(file, path, read_only, lock)
    }

    fn with_file(file: File, path: &Path, read_only: bool, lock: ImageLock) -> BlockResult<Self> {
        let size = file
            .metadata()
            .map_err(|e| BlockError::io(format!("Could not stat '{}'", path.display()), e))?
            .len()
            .next_multiple_of(SECTOR);
        Ok(FileNode {
            file,
            path: path.to_owned(),
            read_only: AtomicBool::new(read_only),
            lock: Mutex::new(lock),
            size: AtomicU64::new(size),
            nowait_read_unsupported: AtomicBool::new(false),
            nowait_write_unsupported: AtomicBool::new(false),
            splice_unsupported: AtomicBool::new(false),
            holes: HoleHints::new(),
            trace: match read_only {
                true => None,
                false => super::io_trace::Trace::open_for(path),
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying host file, for formats layered on top of it.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn err(&self, what: &str, offset: u64, e: std::io::Error) -> BlockError {
        BlockError::io(
            format!("{} at offset {} of '{}'", what, offset, self.path.display()),
            e,
        )
    }

    fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// After a write that may have extended the file.
    fn grew_to(&self, end: u64) {
        self.size
            .fetch_max(end.next_multiple_of(SECTOR), Ordering::AcqRel);
    }

    fn check_writable(&self) -> BlockResult<()> {
        if self.is_read_only() {
            return Err(BlockError::new(
                ErrorKind::Permission,
                format!("'{}' is opened read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    fn falloc(&self, flags: FallocateFlags, offset: u64, len: u64) -> Result<(), Errno> {
        fallocate(&self.file, flags, offset, len)
    }

    /// Writes real zero buffers: the fallback when fallocate cannot help.
    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> BlockResult<()> {
        let end = offset + len;
        let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK) as usize;
            self.file
                .write_all_at(&zeroes[..n], offset)
                .map_err(|e| self.err("Could not write zeroes", offset, e))?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Fills the pipe with zeroes from `done` towards `len` bytes of a read
    /// at `offset` (past EOF a read returns zeroes): how far it got before
    /// the pipe was full.
    fn zeroes_to_pipe(
        &self,
        pipe: BorrowedFd<'_>,
        offset: u64,
        mut done: usize,
        len: usize,
    ) -> BlockResult<usize> {
        const ZEROES: [u8; 4096] = [0; 4096];
        while done < len {
            let n = (len - done).min(ZEROES.len());
            match rustix::io::write(pipe, &ZEROES[..n]) {
                Ok(k) => done += k,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => break,
                Err(e) => {
                    let at = offset + done as u64;
                    return Err(self.err("Could not read", at, errno_io(e)));
                }
            }
        }
        Ok(done)
    }

    /// The offset of the next data at or after `offset`, or `None` at EOF.
    fn seek_data(&self, offset: u64) -> Result<Option<u64>, Errno> {
        match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(o) => Ok(Some(o)),
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Whether a RWF_NOWAIT transfer did the whole job; remembers in
/// `unsupported` when the kernel or filesystem does not take the flag.
fn nowait_done(r: Result<usize, Errno>, len: usize, unsupported: &AtomicBool) -> bool {
    match r {
        Ok(n) => n == len,
        Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) | Err(Errno::NOSYS) => {
            unsupported.store(true, Ordering::Relaxed);
            false
        }
        Err(_) => false,
    }
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

impl BlockNode for FileNode {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.is_read_only()
    }

    /// Only the node's own read-only flag: the locks follow the users
    /// (see [`BlockNode::set_write_locks`]).
    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        if read_only {
            self.flush()?;
        } else {
            let fl = rustix::fs::fcntl_getfl(&self.file)
                .map_err(|e| self.err("Could not reopen read-write", 0, errno_io(e)))?;
            if !fl.contains(rustix::fs::OFlags::RDWR) {
                return Err(BlockError::new(
                    ErrorKind::Permission,
                    format!(
                        "Could not reopen '{}' read-write: the file is not writable",
                        self.path.display()
                    ),
                ));
            }
        }
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }

    fn set_image_locks(&self, mode: Option<LockMode>) -> BlockResult<()> {
        let mut lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        lock.switch(&self.file, &self.path, mode)
    }

    fn filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    fn allocated_size(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn file_length(&self) -> BlockResult<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| BlockError::io(format!("Could not stat '{}'", self.path.display()), e))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // Past EOF (the sector padding, or a file truncated under
                // us) reads as zeroes, as in qemu.
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("Could not read", offset, e)),
            }
        }
        Ok(())
    }

    /// Reads into `out`'s spare capacity: no zero-fill first. rustix may
    /// fill all the spare room, so what is read past `len` is dropped.
    fn read_append(&self, out: &mut Vec<u8>, offset: u64, len: usize) -> BlockResult<()> {
        let end = out.len() + len;
        out.reserve(len);
        while out.len() < end {
            let at = offset + (out.len() + len - end) as u64;
            match rustix::io::pread(&self.file, spare_capacity(out), at) {
                // Past EOF reads as zeroes, as in read_at.
                Ok(0) => out.resize(end, 0),
                Ok(_) => {}
                Err(Errno::INTR) => {}
                Err(e) => return Err(self.err("Could not read", at, errno_io(e))),
            }
        }
        out.truncate(end);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.check_writable()?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.err("Could not write", offset, e))?;
        self.traced(super::io_trace::OP_WRITE, offset, buf.len() as u64, buf);
        self.grew_to(offset + buf.len() as u64);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        if flags.may_unmap {
            let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            if self.falloc(punch, offset, len).is_ok() {
                self.traced(super::io_trace::OP_ZEROES, offset, len, &[]);
                return Ok(());
            }
        }
        match self.falloc(FallocateFlags::ZERO_RANGE, offset, len) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) if flags.fast => {
                return Err(BlockError::not_supported(
                    "the filesystem cannot zero ranges quickly",
                ))
            }
            Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => self.write_zero_buffers(offset, len)?,
            Err(e) => return Err(self.err("Could not zero", offset, errno_io(e))),
        }
        self.traced(super::io_trace::OP_ZEROES, offset, len, &[]);
        self.grew_to(offset + len);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match self.falloc(punch, offset, len) {
            Ok(()) => {
                self.traced(super::io_trace::OP_DISCARD, offset, len, &[]);
                Ok(())
            }
            // Discard is advisory: a filesystem that cannot punch keeps the data.
            Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => Ok(()),
            Err(e) => Err(self.err("Could not discard", offset, errno_io(e))),
        }
    }

    fn flush(&self) -> BlockResult<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| self.err("Could not flush", 0, e))?;
        self.traced(super::io_trace::OP_FLUSH, 0, 0, &[]);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let size = self.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Err(BlockError::invalid(
                "block status past the end of the image",
            ));
        }
        let status = |e: Errno| self.err("Could not query allocation", offset, errno_io(e));
        let data_run = |hole: u64| {
            self.holes.add(hole, hole + 1);
            Extent {
                len: hole.min(end) - offset,
                flags: 0,
            }
        };
        if !self.holes.in_hole(offset) {
            match seek(&self.file, SeekFrom::Hole(offset)) {
                Ok(hole) if hole > offset => return Ok(data_run(hole)),
                // A hole, or past EOF.
                Ok(_) | Err(Errno::NXIO) => {}
                Err(e) => return Err(status(e)),
            }
        }
        match self.seek_data(offset).map_err(status)? {
            // A stale hint: data after all.
            Some(data) if data <= offset => {
                let hole = seek(&self.file, SeekFrom::Hole(offset)).map_err(status)?;
                Ok(data_run(hole.max(offset + 1)))
            }
            next => {
                self.holes.add(offset, next.unwrap_or(u64::MAX));
                let data = next.unwrap_or(end);
                Ok(Extent {
                    len: data.min(end) - offset,
                    flags: STATE_HOLE | STATE_ZERO,
                })
            }
        }
    }

    /// qemu counts every byte of a raw image as allocated in its layer,
    /// holes included: depth 1 everywhere (as `qemu-nbd -A` reports).
    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        let size = self.size();
        if offset >= size || len == 0 {
            return Err(BlockError::invalid(
                "allocation depth past the end of the image",
            ));
        }
        Ok(DepthExtent {
            len: len.min(size - offset),
            depth: 1,
        })
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        let len = buf.len();
        let unsupported = &self.nowait_read_unsupported;
        if unsupported.load(Ordering::Relaxed) {
            return false;
        }
        let mut iov = [IoSliceMut::new(buf)];
        let r = preadv2(&self.file, &mut iov, offset, ReadWriteFlags::NOWAIT);
        nowait_done(r, len, unsupported)
    }

    fn pipe_reads(&self) -> bool {
        !self.splice_unsupported.load(Ordering::Relaxed)
    }

    fn read_to_pipe(
        &self,
        pipe: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> BlockResult<Option<usize>> {
        if !self.pipe_reads() {
            return Ok(None);
        }
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        let mut done = 0;
        while done < len {
            let mut at = offset + done as u64;
            match splice(&self.file, Some(&mut at), pipe, None, len - done, flags) {
                Ok(0) => return self.zeroes_to_pipe(pipe, offset, done, len).map(Some),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                // The pipe is full.
                Err(Errno::AGAIN) => break,
                // A filesystem that cannot splice.
                Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) if done == 0 => {
                    self.splice_unsupported.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
                Err(e) => return Err(self.err("Could not read", at, errno_io(e))),
            }
        }
        Ok(Some(done))
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        let unsupported = &self.nowait_write_unsupported;
        // Traced writes take the slow path, which records them.
        if self.is_read_only() || unsupported.load(Ordering::Relaxed) || self.trace.is_some() {
            return false;
        }
        let r = pwritev2(
            &self.file,
            &[IoSlice::new(buf)],
            offset,
            ReadWriteFlags::NOWAIT,
        );
        // A short write leaves the rest for write_at, which rewrites the
        // whole buffer: the same bytes, so harmless.
        nowait_done(r, buf.len(), unsupported)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        // Best effort: a failed readahead hint is not an error for the client.
        let _ = fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(len),
            Advice::WillNeed,
        );
        Ok(())
    }

    fn discard_zeroes(&self) -> bool {
        true
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_nowait_write_leaves_nowait_reads_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 1 << 20]).expect("write");
        let node = FileNode::open(&path, false).expect("open");
        node.write_at(&[5u8; 4096], 0, false).expect("write");
        // ext4 refuses buffered RWF_NOWAIT writes; others may take them.
        let wrote = node.try_write_nowait(&[6u8; 4096], 4096);
        let mut buf = vec![0u8; 8192];
        assert!(
            node.try_read_nowait(&mut buf, 0),
            "cached data reads without waiting"
        );
        assert_eq!(buf[..4096], [5u8; 4096]);
        assert_eq!(buf[4096], if wrote { 6 } else { 7 });
    }

    #[test]
    fn holes_and_data_are_reported_in_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let f = File::create(&path).expect("create");
        f.set_len(4 << 20).expect("truncate");
        f.write_all_at(&[1u8; 65536], 1 << 20).expect("write");
        drop(f);
        let node = FileNode::open(&path, false).expect("open");
        let first = node.block_status(0, 4 << 20).expect("status");
        assert_eq!(
            first,
            Extent {
                len: 1 << 20,
                flags: 3
            }
        );
        let second = node.block_status(1 << 20, 4 << 20).expect("status");
        assert_eq!(second.flags, 0);
        assert!(second.len >= 65536);
        node.write_zeroes(
            1 << 20,
            65536,
            ZeroFlags {
                may_unmap: true,
                fast: false,
            },
        )
        .expect("zero");
        let mut buf = vec![9u8; 65536];
        node.read_at(&mut buf, 1 << 20).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_stale_hole_hint_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let f = File::create(&path).expect("create");
        f.set_len(8 << 20).expect("truncate");
        f.write_all_at(&[1u8; 65536], 1 << 20).expect("write");
        f.write_all_at(&[1u8; 65536], 4 << 20).expect("write");
        drop(f);
        let node = FileNode::open(&path, false).expect("open");
        let status = |at: u64| node.block_status(at, 8 << 20).expect("status");
        let hole = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            status(0),
            Extent {
                len: 1 << 20,
                flags: hole
            }
        );
        assert_eq!(
            status(1 << 20),
            Extent {
                len: 65536,
                flags: 0
            }
        );
        let end = (1 << 20) + 65536;
        assert!(node.holes.in_hole(end));
        // Data lands where a hole was hinted: the hint is checked.
        node.write_at(&[2u8; 65536], end, false).expect("write");
        assert_eq!(
            status(end),
            Extent {
                len: 65536,
                flags: 0
            }
        );
        node.discard(0, 2 << 20).expect("discard");
        let now = status(1 << 20);
        assert_eq!((now.len, now.flags), (3 << 20, hole));
        assert_eq!(
            status(4 << 20),
            Extent {
                len: 65536,
                flags: 0
            }
        );
        // A hint past a truncated end is not trusted either.
        node.file.set_len(2 << 20).expect("truncate");
        assert_eq!(status(4 << 20).flags, hole);
        assert_eq!(status((4 << 20) + 65536).flags, hole);
    }
}
