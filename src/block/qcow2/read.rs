//! Reads: map the range under the metadata lock, then do the data I/O
//! without it; or, on an async worker, both without waiting at all.

use std::sync::MutexGuard;

use super::compress::decompress;
use super::io::HostFile;
use super::meta::Meta;
use super::tables::Mapping;
use super::Qcow2Node;
use crate::block::{BlockError, BlockNode, BlockResult};

/// One piece of a request: `len` guest bytes at `guest` mapped as `map`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    pub guest: u64,
    pub len: u64,
    pub map: Mapping,
}

impl Qcow2Node {
    /// The pieces `[offset, offset + len)` is made of, in order.
    pub(super) fn plan(&self, offset: u64, len: u64) -> BlockResult<Vec<Piece>> {
        self.check_span(offset, len)?;
        let mut meta = self.lock_meta()?;
        pieces(&mut meta, &self.f, offset, len)
    }

    /// [`Qcow2Node::plan`] without waiting, if every piece passes `fit`:
    /// `None` if the metadata lock is taken, a table would have to be
    /// read, or a piece does not fit.
    pub(super) fn plan_nowait(
        &self,
        offset: u64,
        len: u64,
        mut fit: impl FnMut(&mut Meta, &Piece) -> bool,
    ) -> Option<Vec<Piece>> {
        self.check_span(offset, len).ok()?;
        let mut meta = self.meta_nowait(offset, len)?;
        let pieces = pieces(&mut meta, &self.f, offset, len).ok()?;
        pieces.iter().all(|p| fit(&mut meta, p)).then_some(pieces)
    }

    /// The metadata, if it is free and maps `[offset, offset + len)`
    /// without reading a table.
    pub(super) fn meta_nowait(&self, offset: u64, len: u64) -> Option<MutexGuard<'_, Meta>> {
        let meta = self.meta.try_lock().ok()?;
        (!meta.corrupt && meta.tables_cached(offset, len)).then_some(meta)
    }

    pub(super) fn check_span(&self, offset: u64, len: u64) -> BlockResult<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.vsize()) {
            return Err(BlockError::invalid(format!(
                "request at {} (+{}) is past the end of the image ({})",
                offset,
                len,
                self.vsize()
            )));
        }
        Ok(())
    }

    /// A read served on the caller's thread only if nothing needs waiting
    /// for: tables cached, metadata lock free, data in the page cache
    /// (here and down the backing chain). False: use [`BlockNode::read_at`].
    pub(super) fn read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        let Ok(_guard) = self.free_lock.try_read() else {
            return false;
        };
        let Some(pieces) = self.plan_nowait(offset, buf.len() as u64, |_, _| true) else {
            return false;
        };
        pieces.into_iter().all(|p| {
            let start = (p.guest - offset) as usize;
            let out = &mut buf[start..start + p.len as usize];
            match p.map {
                Mapping::Zero { .. } => {
                    out.fill(0);
                    true
                }
                Mapping::Data { host, .. } => self.f.try_read_nowait(out, host),
                Mapping::Unallocated => self.read_backing_nowait(out, p.guest),
                Mapping::Compressed { .. } => false,
            }
        })
    }

    fn read_backing_nowait(&self, buf: &mut [u8], guest: u64) -> bool {
        let Ok(edge) = self.backing.try_read() else {
            return false;
        };
        let Some(child) = edge.as_ref() else {
            buf.fill(0);
            return true;
        };
        let Some(b) = child.link.try_get() else {
            return false;
        };
        let n = (buf.len() as u64).min(b.size().saturating_sub(guest)) as usize;
        if n > 0 && !b.try_read_nowait(&mut buf[..n], guest) {
            return false;
        }
        buf[n..].fill(0);
        true
    }

    pub(super) fn read_range(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let _guard = self
            .free_lock
            .read()
            .map_err(|_| BlockError::corrupt("qcow2 free lock poisoned"))?;
        let pieces = self.plan(offset, buf.len() as u64)?;
        for p in pieces {
            let start = (p.guest - offset) as usize;
            self.read_piece(&mut buf[start..start + p.len as usize], p)?;
        }
        Ok(())
    }

    /// Fills `buf` with what this layer (and below it, the chain) holds
    /// for the piece.
    pub(super) fn read_piece(&self, buf: &mut [u8], p: Piece) -> BlockResult<()> {
        match p.map {
            Mapping::Unallocated => self.read_backing(buf, p.guest),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => {
                self.f.debug_event(crate::block::DebugEvent::ReadAio);
                self.f.read(buf, host, "data cluster")
            }
            Mapping::Compressed { host, len } => {
                let cluster = self.read_compressed(host, len)?;
                let at = (p.guest % self.geo.cluster_size()) as usize;
                buf.copy_from_slice(&cluster[at..at + buf.len()]);
                Ok(())
            }
        }
    }

    /// Reads from the backing node, with zeroes past its end.
    pub(super) fn read_backing(&self, buf: &mut [u8], guest: u64) -> BlockResult<()> {
        let backing = self.backing();
        let n = match backing.as_ref().map(|c| c.get()) {
            Some(b) => {
                let n = (buf.len() as u64).min(b.size().saturating_sub(guest)) as usize;
                if n > 0 {
                    b.read_at(&mut buf[..n], guest)?;
                }
                n
            }
            None => 0,
        };
        buf[n..].fill(0);
        Ok(())
    }

    /// One whole decompressed cluster.
    pub(super) fn read_compressed(&self, host: u64, len: u64) -> BlockResult<Vec<u8>> {
        let cs = self.geo.cluster_size();
        // The descriptor can claim at most about two clusters of input.
        if len > 2 * cs + 512 {
            return Err(BlockError::corrupt(format!(
                "compressed cluster at {:#x} claims {} bytes",
                host, len
            )));
        }
        let mut input = vec![0u8; len as usize];
        // The last sector may be cut short by the end of the file.
        self.f.read_partial(&mut input, host)?;
        let mut out = vec![0u8; cs as usize];
        decompress(self.compression, &input, &mut out).map_err(|e| BlockError {
            context: format!(
                "'{}': {} (at {:#x})",
                self.f.path.display(),
                e.context,
                host
            ),
            ..e
        })?;
        Ok(out)
    }
}

/// The pieces of `[offset, offset + len)` as `meta` maps them.
pub(super) fn pieces(
    meta: &mut Meta,
    f: &HostFile,
    offset: u64,
    len: u64,
) -> BlockResult<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut at = offset;
    while at < offset + len {
        let (map, n) = meta.mapping(f, at, offset + len - at)?;
        pieces.push(Piece {
            guest: at,
            len: n,
            map,
        });
        at += n;
    }
    Ok(pieces)
}
