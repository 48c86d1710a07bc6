//! Refcounts and the cluster allocator.
//!
//! The refcount table lives in memory (qemu keeps it too; its size is a
//! fraction of the file size); refcount blocks go through a bounded
//! write-back cache. Any entry width (refcount_order 0..6) is read and
//! written. New refcount blocks are written to disk before the table entry
//! that points to them, and the table grows into fresh space at the end of
//! the file with the header switched over only once the new table is stable.

use std::collections::HashSet;

use super::cache::{Slot, TableCache};
use super::io::HostFile;
use super::tables::{get_be64, put_be64, OFFSET_MASK};
use crate::block::{BlockError, BlockResult};

/// qemu refuses refcount tables larger than this.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

pub struct Refcounts {
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u32,
    order: u32,
    cluster_bits: u32,
    cache: TableCache,
    /// No cluster below this index is free (allocation starts its scan here).
    free_hint: u64,
    /// One past the highest cluster in use or allocated, written or not
    /// (new L2 tables may still sit only in the cache).
    end: u64,
    /// Host offsets of all refcount blocks (for the metadata overlap check).
    pub blocks: HashSet<u64>,
}

fn set_entry(block: &mut [u8], order: u32, i: u64, v: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        let bytes = v.to_be_bytes();
        block[at..at + n].copy_from_slice(&bytes[8 - n..]);
    } else {
        let bit = i * bits;
        let byte = (bit / 8) as usize;
        let shift = bit % 8;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        block[byte] = (block[byte] & !mask) | (((v as u8) << shift) & mask);
    }
}

fn get_entry(block: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        let mut bytes = [0u8; 8];
        bytes[8 - n..].copy_from_slice(&block[at..at + n]);
        u64::from_be_bytes(bytes)
    } else {
        let bit = i * bits;
        let byte = (bit / 8) as usize;
        ((block[byte] >> (bit % 8)) as u64) & ((1u64 << bits) - 1)
    }
}

impl Refcounts {
    /// Loads the refcount table, checking it lies inside the file.
    pub fn load(
        f: &HostFile,
        table_offset: u64,
        table_clusters: u32,
        order: u32,
        cluster_bits: u32,
        file_len: u64,
        cache_tables: usize,
    ) -> BlockResult<Self> {
        let cs = 1u64 << cluster_bits;
        let bytes = u64::from(table_clusters) << cluster_bits;
        if table_offset & (cs - 1) != 0 || table_offset == 0 {
            return Err(BlockError::corrupt(format!(
                "Refcount table offset {:#x} is invalid (zero or not cluster aligned)",
                table_offset
            )));
        }
        if bytes > MAX_REFTABLE_BYTES || table_clusters == 0 {
            return Err(BlockError::corrupt(format!(
                "Reference count table size is invalid ({} clusters)",
                table_clusters
            )));
        }
        if table_offset.saturating_add(bytes) > file_len.div_ceil(cs) * cs {
            return Err(BlockError::corrupt(format!(
                "Refcount table at {:#x} ({} bytes) lies past the end of the file",
                table_offset, bytes
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        f.read_partial(&mut raw, table_offset)?;
        let table: Vec<u64> = (0..raw.len() / 8).map(|i| get_be64(&raw, i)).collect();
        for (i, &e) in table.iter().enumerate() {
            if e & !OFFSET_MASK != 0 || e & (cs - 1) != 0 {
                return Err(BlockError::corrupt(format!(
                    "Refcount table entry {} ({:#x}) is invalid",
                    i, e
                )));
            }
        }
        Ok(Refcounts {
            table_offset,
            table_clusters,
            order,
            cluster_bits,
            cache: TableCache::new(cache_tables),
            free_hint: 0,
            end: file_len.div_ceil(cs),
            blocks: table.iter().copied().filter(|&e| e != 0).collect(),
            table,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Clusters below `end` whose refcount is not zero, counted up to
    /// `limit`. Ranges with no refcount block, or an all-zero one, are
    /// skipped whole: a huge sparse file must not cost a lookup per cluster.
    pub fn count_used(&mut self, f: &HostFile, end: u64, limit: u64) -> BlockResult<u64> {
        let epb = self.epb();
        let mut used = 0;
        let mut zero_blocks = HashSet::new();
        for idx in 0..self.table.len() as u64 {
            let first = idx * epb;
            if first >= end || used >= limit {
                break;
            }
            let off = self.block_offset(idx);
            if off == 0 || zero_blocks.contains(&off) {
                continue;
            }
            let order = self.order;
            let slot = self.loaded(f, off)?;
            if slot.data.iter().all(|&b| b == 0) {
                zero_blocks.insert(off);
                continue;
            }
            for i in 0..epb.min(end - first) {
                if get_entry(&slot.data, order, i) > 0 {
                    used += 1;
                    if used >= limit {
                        break;
                    }
                }
            }
        }
        Ok(used)
    }

    /// Refcount entries per refcount block.
    fn epb(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }

    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << self.order)) - 1
        }
    }

    fn block_offset(&self, idx: u64) -> u64 {
        self.table.get(idx as usize).copied().unwrap_or(0) & OFFSET_MASK
    }

    /// Makes sure the block at `off` is cached.
    fn load_block(&mut self, f: &HostFile, off: u64) -> BlockResult<()> {
        if self.cache.contains(off) {
            return Ok(());
        }
        let mut data = vec![0u8; self.cs() as usize];
        f.read(&mut data, off, "refcount block")?;
        if let Some((voff, victim)) = self.cache.insert(off, data, false) {
            if victim.dirty {
                f.write(&victim.data, voff, "refcount block")?;
            }
        }
        Ok(())
    }

    /// The refcount block at `off`, read into the cache if need be.
    fn loaded(&mut self, f: &HostFile, off: u64) -> BlockResult<&mut Slot> {
        self.load_block(f, off)?;
        self.cache
            .get(off)
            .ok_or_else(|| BlockError::corrupt("refcount block vanished from the cache"))
    }

    pub fn get(&mut self, f: &HostFile, cluster: u64) -> BlockResult<u64> {
        let epb = self.epb();
        let off = self.block_offset(cluster / epb);
        if off == 0 {
            return Ok(0);
        }
        let order = self.order;
        let slot = self.loaded(f, off)?;
        Ok(get_entry(&slot.data, order, cluster % epb))
    }

    /// Adds `delta` (+1 or -1) to a cluster's refcount. The block must
    /// exist for increments (see [`Refcounts::alloc`]).
    pub fn update(&mut self, f: &HostFile, cluster: u64, delta: i64) -> BlockResult<u64> {
        let epb = self.epb();
        let off = self.block_offset(cluster / epb);
        let max = self.max_refcount();
        if off == 0 {
            return Err(BlockError::corrupt(format!(
                "refcount of cluster {} cannot change: it has no refcount block",
                cluster
            )));
        }
        let order = self.order;
        let slot = self.loaded(f, off)?;
        let old = get_entry(&slot.data, order, cluster % epb);
        let new = if delta < 0 {
            old.checked_sub(delta.unsigned_abs())
        } else {
            old.checked_add(delta as u64).filter(|&v| v <= max)
        }
        .ok_or_else(|| {
            BlockError::corrupt(format!(
                "refcount of cluster {} would leave its range (is {})",
                cluster, old
            ))
        })?;
        set_entry(&mut slot.data, order, cluster % epb, new);
        slot.dirty = true;
        if new == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(new)
    }

    /// The first run of `n` free clusters at or after the hint.
    fn find_free(&mut self, f: &HostFile, n: u64) -> BlockResult<u64> {
        let epb = self.epb();
        let mut c = self.free_hint;
        let mut start = c;
        loop {
            if c - start >= n {
                return Ok(start);
            }
            if self.block_offset(c / epb) == 0 {
                // A missing block means its whole range is free.
                c = (c / epb + 1) * epb;
                continue;
            }
            if self.get(f, c)? == 0 {
                c += 1;
            } else {
                if c == self.free_hint {
                    // Keep "nothing below the hint is free" tight.
                    self.free_hint = c + 1;
                }
                c += 1;
                start = c;
            }
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the
    /// index of the first. Refcount blocks they need are created first.
    pub fn alloc(&mut self, f: &HostFile, n: u64) -> BlockResult<u64> {
        let epb = self.epb();
        loop {
            let start = self.find_free(f, n)?;
            let mut created = false;
            for idx in start / epb..=(start + n - 1) / epb {
                if self.block_offset(idx) == 0 {
                    self.create_block(f, idx)?;
                    created = true;
                }
            }
            if created {
                // The new blocks may have taken clusters of the run.
                continue;
            }
            for c in start..start + n {
                self.update(f, c, 1)?;
            }
            if start == self.free_hint {
                self.free_hint = start + n;
            }
            self.end = self.end.max(start + n);
            return Ok(start);
        }
    }

    /// Creates refcount block `idx`, growing the table if needed.
    fn create_block(&mut self, f: &HostFile, idx: u64) -> BlockResult<()> {
        let epb = self.epb();
        let cs = self.cs();
        if idx >= self.table.len() as u64 {
            return self.grow_table(f, idx + 1);
        }
        loop {
            let b = self.find_free(f, 1)?;
            self.check_block_site(b)?;
            let mut data = vec![0u8; cs as usize];
            if b / epb == idx {
                // The block describes itself.
                set_entry(&mut data, self.order, b % epb, 1);
            } else if self.block_offset(b / epb) == 0 {
                self.create_block(f, b / epb)?;
                continue;
            } else {
                self.update(f, b, 1)?;
            }
            f.write(&data, b * cs, "refcount block")?;
            self.end = self.end.max(b + 1);
            if let Some((voff, victim)) = self.cache.insert(b * cs, data, false) {
                if victim.dirty {
                    f.write(&victim.data, voff, "refcount block")?;
                }
            }
            self.table[idx as usize] = b * cs;
            self.blocks.insert(b * cs);
            let entry = (b * cs).to_be_bytes();
            f.write(&entry, self.table_offset + idx * 8, "refcount table entry")?;
            return Ok(());
        }
    }

    /// Refuses to put a new refcount block on cluster `b` when a corrupt
    /// image calls metadata free (qemu: "Preventing invalid allocation of
    /// refcount block at offset 0"): at offset 0 it would overwrite the
    /// header and stay "missing", so allocation would retry it forever.
    fn check_block_site(&self, b: u64) -> BlockResult<()> {
        let cs = self.cs();
        let first = self.table_offset / cs;
        let in_table = (first..first + u64::from(self.table_clusters)).contains(&b);
        if b == 0 || in_table || self.blocks.contains(&(b * cs)) {
            return Err(BlockError::corrupt(format!(
                "Preventing invalid allocation of refcount block at offset {:#x}: \
                 it holds image metadata (the image is corrupt; run 'qemu-img check -r all')",
                b * cs
            )));
        }
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the file,
    /// together with the refcount blocks that describe the new space.
    fn grow_table(&mut self, f: &HostFile, min_entries: u64) -> BlockResult<()> {
        let cs = self.cs();
        let epb = self.epb();
        let old_clusters = u64::from(self.table_clusters);
        let area = f.len()?.div_ceil(cs).max(self.end);
        let mut tc = (min_entries * 8)
            .div_ceil(cs)
            .max(old_clusters + old_clusters / 2 + 1);
        let (nb, missing) = loop {
            // Blocks needed to cover the new area itself (fixed point).
            let mut nb = 0;
            let missing = loop {
                let last = area + nb + tc - 1;
                let missing: Vec<u64> = (area / epb..=last / epb)
                    .filter(|&i| self.block_offset(i) == 0)
                    .collect();
                if missing.len() as u64 == nb {
                    break missing;
                }
                nb = missing.len() as u64;
            };
            let last = area + nb + tc - 1;
            if last / epb < tc * cs / 8 {
                break (nb, missing);
            }
            tc += 1;
        };
        if tc * cs > MAX_REFTABLE_BYTES {
            return Err(BlockError::new(
                crate::block::ErrorKind::NoSpace,
                "the refcount table would exceed qemu's limit of 8 MiB",
            ));
        }
        let mut table = self.table.clone();
        table.resize((tc * cs / 8) as usize, 0);
        let area_end = area + nb + tc;
        for (j, &idx) in missing.iter().enumerate() {
            let at = area + j as u64;
            let mut data = vec![0u8; cs as usize];
            for c in (idx * epb).max(area)..((idx + 1) * epb).min(area_end) {
                set_entry(&mut data, self.order, c % epb, 1);
            }
            f.write(&data, at * cs, "refcount block")?;
            table[idx as usize] = at * cs;
            self.blocks.insert(at * cs);
        }
        // Space of the new area covered by blocks that already exist.
        for c in area..area_end {
            if !missing.contains(&(c / epb)) {
                self.update(f, c, 1)?;
            }
        }
        self.flush(f)?;
        let mut raw = vec![0u8; (tc * cs) as usize];
        for (i, &e) in table.iter().enumerate() {
            put_be64(&mut raw, i, e);
        }
        let table_offset = (area + nb) * cs;
        f.write(&raw, table_offset, "refcount table")?;
        f.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        f.write(&hdr, 48, "header")?;
        f.sync()?;
        let old_offset = self.table_offset;
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = tc as u32;
        self.free_hint = self.free_hint.max(area_end);
        self.end = self.end.max(area_end);
        for c in 0..old_clusters {
            self.update(f, old_offset / cs + c, -1)?;
        }
        Ok(())
    }

    /// Frees the clusters overlapping `[off, off + len)` (one reference each).
    /// Returns the clusters that became free.
    pub fn free_range(&mut self, f: &HostFile, off: u64, len: u64) -> BlockResult<Vec<u64>> {
        let cs = self.cs();
        let mut now_free = Vec::new();
        for c in off / cs..(off + len).div_ceil(cs) {
            if self.update(f, c, -1)? == 0 {
                now_free.push(c);
            }
        }
        Ok(now_free)
    }

    /// Writes every dirty refcount block; true if any was written.
    pub fn flush(&mut self, f: &HostFile) -> BlockResult<bool> {
        let dirty = self.cache.dirty_offsets();
        for off in &dirty {
            if let Some(slot) = self.cache.get(*off) {
                f.write(&slot.data, *off, "refcount block")?;
                slot.dirty = false;
            }
        }
        Ok(!dirty.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_roundtrip() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1u64 << order)) - 1
            };
            set_entry(&mut b, order, 3, max);
            set_entry(&mut b, order, 4, 1);
            assert_eq!(get_entry(&b, order, 3), max, "order {}", order);
            assert_eq!(get_entry(&b, order, 4), 1, "order {}", order);
            assert_eq!(get_entry(&b, order, 2), 0, "order {}", order);
        }
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian() {
        let mut b = vec![0u8; 8];
        set_entry(&mut b, 4, 1, 0x0102);
        assert_eq!(b[2..4], [1, 2]);
    }
}
