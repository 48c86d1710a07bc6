//! Writes, write-zeroes and discard.
//!
//! A write to clusters that are already allocated with refcount 1 goes in
//! place, outside the metadata lock. Anything else allocates new clusters
//! under the lock, fills the parts of the first and last cluster that the
//! request does not cover from what they read as before (backing file,
//! zeroes or the old cluster: copy-on-write), writes the data, and only
//! then points the L2 entries at it.

use super::meta::Meta;
use super::read::Piece;
use super::tables::{Mapping, COMPRESSED, COPIED, ZERO};
use super::Qcow2Node;
use crate::block::{BlockError, BlockNode, BlockResult, ErrorKind, ZeroFlags, STATE_ZERO};

/// Largest data buffer one allocating step builds.
const MAX_ALLOC_BYTES: u64 = 8 << 20;
const ZERO_CHUNK: usize = 1 << 20;

impl Qcow2Node {
    pub(super) fn write_range(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        self.check_writable()?;
        // Overwriting compressed or shared clusters frees them: that must
        // not happen under a concurrent reader of those clusters. Writes
        // can only turn other states into data, so this check cannot go stale.
        let frees = self.plan(offset, buf.len() as u64)?.iter().any(|p| {
            matches!(
                p.map,
                Mapping::Compressed { .. } | Mapping::Data { copied: false, .. }
            )
        });
        if frees {
            let _guard = self.free_lock.write().map_err(poisoned)?;
            self.write_inner(buf, offset)
        } else {
            let _guard = self.free_lock.read().map_err(poisoned)?;
            self.write_inner(buf, offset)
        }
    }

    /// The write itself; the caller holds `free_lock` (either way).
    fn write_inner(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            at += self.write_step(&buf[(at - offset) as usize..], at)?;
        }
        Ok(())
    }

    /// Writes the first run of `src` (at guest `at`) that has one mapping;
    /// returns its length. The metadata lock is held only to look up and
    /// update tables: an overwrite goes in place without it, and an
    /// allocation claims its clusters, writes their data without the lock,
    /// then points the L2 entries at them.
    fn write_step(&self, src: &[u8], at: u64) -> BlockResult<u64> {
        let cs = self.geo.cluster_size();
        let mut meta = self.lock_meta()?;
        let (map, n, claim) = loop {
            if meta.corrupt {
                return Err(corrupt_refusal());
            }
            let (map, n) = self.checked(&mut meta, |m| m.mapping(&self.f, at, src.len() as u64))?;
            if let Mapping::Data { host, copied: true } = map {
                self.checked(&mut meta, |m| m.check_overlap(host, n))?;
                drop(meta);
                self.f.debug_event(crate::block::DebugEvent::WriteAio);
                self.f.write(&src[..n as usize], host, "data cluster")?;
                return Ok(n);
            }
            let c0 = at / cs;
            let c1 = (at + n)
                .div_ceil(cs)
                .min(c0 + (MAX_ALLOC_BYTES / cs).max(1));
            match self.allocating.try_lock(c0, c1 - c0) {
                Ok(claim) => break (map, n.min(c1 * cs - at), claim),
                Err(busy) => {
                    drop(meta);
                    busy.wait();
                    meta = self.lock_meta()?;
                }
            }
        };
        if let Mapping::Zero { .. } = map {
            if let Some(n) = self.checked(&mut meta, |m| {
                self.write_prealloc(m, &src[..n as usize], at)
            })? {
                return Ok(n);
            }
        }
        let (c0, c1) = (at / cs, (at + n).div_ceil(cs));
        let host = self.checked(&mut meta, |m| m.alloc(&self.f, c1 - c0))?;
        drop(meta);
        let filled = self.fill_new(map, &src[..n as usize], at, host, (c1 - c0) * cs);
        let mut meta = self.lock_meta()?;
        if let Err(e) = filled {
            // Nothing points at the new clusters yet: give them back.
            let _ = meta.refs.free_range(&self.f, host, (c1 - c0) * cs);
            return Err(e);
        }
        self.checked(&mut meta, |m| {
            let mut freed = Vec::new();
            for old in m.map_new(&self.f, c0, host, c1 - c0)? {
                freed.extend(self.held_by(old)?);
            }
            m.free_after_unmap(&self.f, &freed)
        })?;
        drop(meta);
        drop(claim);
        Ok(n)
    }

    /// Runs `op` on the metadata; a corruption it finds marks the image.
    fn checked<T>(
        &self,
        meta: &mut Meta,
        op: impl FnOnce(&mut Meta) -> BlockResult<T>,
    ) -> BlockResult<T> {
        let r = op(meta);
        if let Err(e) = &r {
            self.signal_corruption(meta, e);
        }
        r
    }

    /// Fills new clusters at `host` (`span` bytes, from the start of the
    /// cluster of `at`) with `src` at `at` and, around it, what the
    /// clusters read as before, mapped as `map` (copy-on-write). Nothing
    /// points at them yet: no lock is needed.
    fn fill_new(&self, map: Mapping, src: &[u8], at: u64, host: u64, span: u64) -> BlockResult<()> {
        let cs = self.geo.cluster_size();
        let c0 = at / cs;
        let n = src.len() as u64;
        let head = (at - c0 * cs) as usize;
        let zero_source = match map {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing().is_none_or(|b| b.get().size() <= c0 * cs),
            _ => false,
        };
        if head == 0 && n == span {
            // The new clusters are written whole: nothing to keep.
            self.f.debug_event(crate::block::DebugEvent::WriteAio);
            return self.f.write(src, host, "data cluster");
        }
        if zero_source && self.f.zero_range(host, span) {
            // The new clusters zeroed by the filesystem (allocated, as
            // qemu does it): only the data itself needs writing.
            self.f.debug_event(crate::block::DebugEvent::WriteAio);
            return self.f.write(src, host + head as u64, "data cluster");
        }
        let mut data = vec![0u8; span as usize];
        // Copy-on-write: the uncovered parts keep what they read as.
        if head > 0 {
            let p = piece_at(map, at, c0 * cs, head as u64);
            self.read_piece(&mut data[..head], p)?;
        }
        let tail = head + n as usize;
        if tail < data.len() {
            let p = piece_at(map, at, at + n, (data.len() - tail) as u64);
            self.read_piece(&mut data[tail..], p)?;
        }
        data[head..tail].copy_from_slice(src);
        self.f.debug_event(crate::block::DebugEvent::WriteAio);
        self.f.write(&data, host, "data cluster")
    }

    /// An overwrite of clusters that hold data (refcount 1) done on the
    /// caller's thread only if nothing needs waiting for: tables cached,
    /// metadata lock free, the page cache takes the data. False: use
    /// [`BlockNode::write_at`] (which may write the same bytes again).
    pub(super) fn write_nowait(&self, buf: &[u8], offset: u64) -> bool {
        if self.is_read_only() {
            return false;
        }
        let Ok(_guard) = self.free_lock.try_read() else {
            return false;
        };
        let Some(pieces) = self.overwrite_plan_nowait(offset, buf.len() as u64) else {
            return false;
        };
        pieces.into_iter().all(|p| {
            let start = (p.guest - offset) as usize;
            match p.map {
                Mapping::Data { host, .. } => self
                    .f
                    .try_write_nowait(&buf[start..start + p.len as usize], host),
                _ => false,
            }
        })
    }

    /// The pieces of an in-place overwrite, if that is what the range
    /// needs and it can be known without waiting.
    fn overwrite_plan_nowait(&self, offset: u64, len: u64) -> Option<Vec<Piece>> {
        self.plan_nowait(offset, len, |meta, p| match p.map {
            Mapping::Data { host, copied: true } => meta.check_overlap(host, p.len).is_ok(),
            _ => false,
        })
    }

    /// Writes one whole cluster compressed (a backup's `compress`), as
    /// qemu's compressed writes: only where nothing is allocated ("can't
    /// overwrite anything"); data that does not shrink goes uncompressed.
    /// The compressed data gets a cluster of its own (valid, if less
    /// dense than qemu's packing of several into one).
    pub(super) fn write_compressed_cluster(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        self.check_writable()?;
        let cs = self.geo.cluster_size();
        let whole = buf.len() as u64 == cs || offset + buf.len() as u64 == self.vsize();
        if !offset.is_multiple_of(cs) || buf.len() as u64 > cs || !whole {
            return Err(BlockError::invalid(
                "compressed writes must cover one whole cluster",
            ));
        }
        let mut data = buf.to_vec();
        data.resize(cs as usize, 0);
        let packed = super::compress::compress(self.compression, &data)?;
        if packed.len() as u64 > cs - 512 {
            return self.write_range(buf, offset);
        }
        let _guard = self.free_lock.read().map_err(poisoned)?;
        let gc = offset / cs;
        let mut meta = self.lock_meta()?;
        // An allocating write of this cluster in progress decides first.
        while let Some(busy) = self.allocating.busy(gc, 1) {
            drop(meta);
            busy.wait();
            meta = self.lock_meta()?;
        }
        let (entry, _) = meta.entry(&self.f, gc)?;
        let free = matches!(
            self.geo.decode(entry)?,
            Mapping::Unallocated | Mapping::Zero { host: 0 }
        );
        if !free {
            return Err(BlockError::new(
                ErrorKind::Io,
                "Compression can't overwrite anything",
            ));
        }
        let host = meta.alloc(&self.f, 1)?;
        let sectors = (packed.len() as u64).div_ceil(512);
        let mut padded = packed;
        padded.resize((sectors * 512) as usize, 0);
        self.f.write(&padded, host, "compressed cluster")?;
        let x = 62 - (self.geo.cluster_bits - 8);
        meta.set_entry(&self.f, gc, COMPRESSED | ((sectors - 1) << x) | host)?;
        Ok(())
    }

    /// Writes into the preallocated cluster of a zero cluster (refcount 1)
    /// at `at`, as qemu does, instead of allocating and freeing. Returns the
    /// bytes consumed, or `None` if the cluster has no usable preallocation.
    fn write_prealloc(&self, meta: &mut Meta, src: &[u8], at: u64) -> BlockResult<Option<u64>> {
        let cs = self.geo.cluster_size();
        let gc = at / cs;
        let (entry, _) = meta.entry(&self.f, gc)?;
        let host = match self.geo.decode(entry)? {
            Mapping::Zero { host } if host != 0 && entry & COPIED != 0 => host,
            _ => return Ok(None),
        };
        meta.check_overlap(host, cs)?;
        let head = (at - gc * cs) as usize;
        let n = (src.len()).min(cs as usize - head);
        let mut data = vec![0u8; cs as usize];
        data[head..head + n].copy_from_slice(&src[..n]);
        self.f.debug_event(crate::block::DebugEvent::WriteAio);
        self.f.write(&data, host, "data cluster")?;
        meta.set_entry(&self.f, gc, host | COPIED)?;
        Ok(Some(n as u64))
    }

    /// The host range an L2 entry holds a reference to, if any.
    fn held_by(&self, entry: u64) -> BlockResult<Option<(u64, u64)>> {
        Ok(match self.geo.decode(entry)? {
            Mapping::Data { host, .. } => Some((host, self.geo.cluster_size())),
            Mapping::Zero { host } if host != 0 => Some((host, self.geo.cluster_size())),
            Mapping::Compressed { host, len } => Some((host & !511, len + (host & 511))),
            _ => None,
        })
    }

    /// Write-zeroes as qemu does it: whole clusters become zero clusters
    /// (v3) or unallocated (v2 without backing); a partial cluster that
    /// already reads as zero throughout is treated as whole; other partial
    /// clusters get zero buffers written.
    pub(super) fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let _guard = self
            .free_lock
            .write()
            .map_err(|_| BlockError::corrupt("qcow2 free lock poisoned"))?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let can_zero = self.geo.version >= 3 || self.backing().is_none();
        let (mut a0, mut a1) = self.aligned_part(offset, len);
        let mut slow = Vec::new();
        if !can_zero {
            slow.push((offset, len));
        } else if a0 > a1 || (a0 == a1 && offset / cs == (end - 1) / cs) {
            // Inside one cluster.
            let c = offset / cs * cs;
            if self.reads_as_zero(c, cs.min(self.vsize() - c))? {
                (a0, a1) = (c, c + cs);
            } else {
                (a0, a1) = (c, c);
                slow.push((offset, len));
            }
        } else {
            if offset < a0 {
                let c = a0 - cs;
                if self.reads_as_zero(c, cs)? {
                    a0 = c;
                } else {
                    slow.push((offset, a0 - offset));
                }
            }
            if a1 < end {
                let tail = cs.min(self.vsize() - a1);
                if self.reads_as_zero(a1, tail)? {
                    a1 += cs;
                } else {
                    slow.push((a1, end - a1));
                }
            }
        }
        if flags.fast && !slow.is_empty() {
            return Err(BlockError::not_supported(
                "zeroing this range would need writing zero buffers",
            ));
        }
        if can_zero && a0 < a1 {
            let mut meta = self.lock_meta()?;
            if meta.corrupt {
                return Err(corrupt_refusal());
            }
            let r = self.zero_clusters(&mut meta, a0, a1, flags.may_unmap);
            if let Err(e) = &r {
                self.signal_corruption(&mut meta, e);
            }
            r?;
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        for (mut o, l) in slow {
            let end = o + l;
            while o < end {
                let n = (end - o).min(zeroes.len() as u64);
                self.write_inner(&zeroes[..n as usize], o)?;
                o += n;
            }
        }
        Ok(())
    }

    fn zero_clusters(&self, meta: &mut Meta, a0: u64, a1: u64, unmap: bool) -> BlockResult<()> {
        let cs = self.geo.cluster_size();
        let v3 = self.geo.version >= 3;
        let mut freed = Vec::new();
        for gc in a0 / cs..a1 / cs {
            let (entry, _) = meta.entry(&self.f, gc)?;
            let new = match self.geo.decode(entry)? {
                Mapping::Zero { host } if host == 0 || !unmap => continue,
                Mapping::Unallocated if !v3 => continue,
                Mapping::Data { host, copied: true } if !unmap && v3 => host | COPIED | ZERO,
                _ if v3 => ZERO,
                _ => 0,
            };
            let old = meta.set_entry(&self.f, gc, new)?;
            if new & !(COPIED | ZERO) == 0 {
                freed.extend(self.held_by(old)?);
            }
        }
        meta.free_after_unmap(&self.f, &freed)
    }

    pub(super) fn discard_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let _guard = self
            .free_lock
            .write()
            .map_err(|_| BlockError::corrupt("qcow2 free lock poisoned"))?;
        let (a0, a1) = self.aligned_part(offset, len);
        // v2 cannot express "zero": discarding would expose the backing file.
        if a0 >= a1 || (self.geo.version < 3 && self.backing().is_some()) {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let mut meta = self.lock_meta()?;
        if meta.corrupt {
            return Err(corrupt_refusal());
        }
        let mut freed = Vec::new();
        let mut result = Ok(());
        let per = self.geo.l2_entries();
        let skip_missing_l2 = self.backing().is_none();
        let (mut gc, end) = (a0 / cs, a1 / cs);
        while gc < end {
            // Without a backing file a missing L2 table has nothing to
            // discard: skip it whole. A whole-disk trim of a sparse 1 TiB
            // image otherwise visits 16 M entries under the metadata lock,
            // for seconds, and a shutdown waits for it.
            if skip_missing_l2 {
                match meta.l2_offset(gc / per) {
                    Ok(0) => {
                        gc = (gc / per + 1) * per;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let r = (|| -> BlockResult<()> {
                let (entry, _) = meta.entry(&self.f, gc)?;
                let held = self.held_by(entry)?;
                let m = self.geo.decode(entry)?;
                let new = match m {
                    Mapping::Zero { host: 0 } => return Ok(()),
                    Mapping::Unallocated if self.backing().is_none() => return Ok(()),
                    _ if self.geo.version >= 3 => ZERO,
                    _ => 0,
                };
                meta.set_entry(&self.f, gc, new)?;
                freed.extend(held);
                Ok(())
            })();
            if r.is_err() {
                result = r;
                break;
            }
            gc += 1;
        }
        let r = result.and_then(|_| meta.free_after_unmap(&self.f, &freed));
        if let Err(e) = &r {
            self.signal_corruption(&mut meta, e);
        }
        r
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.vsize()) {
            return Err(BlockError::invalid(format!(
                "request at {} (+{}) is past the end of the image ({})",
                offset,
                len,
                self.vsize()
            )));
        }
        Ok(())
    }

    /// The whole clusters inside `[offset, offset + len)`; a partial last
    /// cluster of the image counts as whole when the range reaches the end.
    fn aligned_part(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let a0 = offset.div_ceil(cs) * cs;
        let a1 = if end == self.vsize() {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        (a0, a1.max(a0))
    }

    fn reads_as_zero(&self, mut offset: u64, len: u64) -> BlockResult<bool> {
        let end = offset + len;
        while offset < end {
            let e = self.status(offset, end - offset)?;
            if e.flags & STATE_ZERO == 0 {
                return Ok(false);
            }
            offset += e.len;
        }
        Ok(true)
    }
}

/// The piece for `[guest, guest + len)` inside a run mapped as `map` that
/// starts at `run_start` (data hosts shift with the offset).
fn piece_at(map: Mapping, run_start: u64, guest: u64, len: u64) -> Piece {
    let map = match map {
        Mapping::Data { host, copied } => Mapping::Data {
            host: (host + guest).wrapping_sub(run_start),
            copied,
        },
        other => other,
    };
    Piece { guest, len, map }
}

fn poisoned<T>(_: T) -> BlockError {
    BlockError::corrupt("qcow2 free lock poisoned")
}

fn corrupt_refusal() -> BlockError {
    BlockError::new(
        ErrorKind::Corrupt,
        "the image was found corrupt; writes are refused",
    )
}
