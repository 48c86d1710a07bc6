//! The mutable metadata of one open image: L1 table, cached L2 tables and
//! refcounts. All of it sits behind the node's one mutex; data I/O never
//! happens under it (see write.rs for allocating writes).
//!
//! Write-back order, the rule that keeps a crash from leaving an L2 entry
//! pointing at a cluster with refcount 0: dirty refcount blocks are written
//! and synced before any dirty L2 table, and L2 tables before the L1 table.
//! Freeing goes the other way (L2 first, synced, then the refcount drop),
//! see [`Meta::free_after_unmap`].

use std::collections::HashSet;

use super::cache::TableCache;
use super::header::Header;
use super::io::HostFile;
use super::refcount::Refcounts;
use super::tables::{get_be64, l1_l2_offset, put_be64, Geometry, Mapping, COPIED};
use crate::block::{BlockError, BlockResult};

/// qemu refuses L1 tables larger than this.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Memory given to cached L2 tables and to cached refcount blocks.
const L2_CACHE_BYTES: u64 = 16 << 20;
const REFCOUNT_CACHE_BYTES: u64 = 1 << 20;

pub struct Meta {
    pub geo: Geometry,
    /// The header as it is on disk now (table moves are kept in step), so
    /// it can be serialised and rewritten (e.g. by the bitmaps layer).
    pub header: Header,
    pub l1: Vec<u64>,
    l1_dirty: bool,
    l2: TableCache,
    pub refs: Refcounts,
    /// Set when corruption was found: no more writes.
    pub corrupt: bool,
    /// Host offsets of the active L2 tables (for the overlap check).
    l2_tables: HashSet<u64>,
    /// New clusters' data was written (without this lock) since the last
    /// sync, and L2 entries point at it: see [`Meta::before_l2_write`].
    new_data: bool,
}

impl Meta {
    pub fn load(f: &HostFile, header: Header, geo: Geometry) -> BlockResult<Meta> {
        let cs = geo.cluster_size();
        let file_len = f.len()?;
        let l1_bytes = u64::from(header.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(BlockError::corrupt(format!(
                "Active L1 table too large ({} entries)",
                header.l1_size
            )));
        }
        let clusters = header.size.div_ceil(cs);
        let needed = clusters.div_ceil(geo.l2_entries());
        if needed > u64::from(header.l1_size) {
            return Err(BlockError::corrupt(format!(
                "L1 table is too small ({} entries) for the virtual size {}",
                header.l1_size, header.size
            )));
        }
        let l1_off = header.l1_table_offset;
        if header.l1_size > 0
            && (l1_off & (cs - 1) != 0 || l1_off == 0 || l1_off.saturating_add(l1_bytes) > file_len)
        {
            return Err(BlockError::corrupt(format!(
                "L1 table offset {:#x} is invalid (zero, unaligned or past the end of the file)",
                l1_off
            )));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        if !raw.is_empty() {
            f.read(&mut raw, l1_off, "L1 table")?;
        }
        let l1: Vec<u64> = (0..header.l1_size as usize)
            .map(|i| get_be64(&raw, i))
            .collect();
        let mut l2_tables = HashSet::new();
        for (i, &e) in l1.iter().enumerate() {
            let off = l1_l2_offset(e, cs, i)?;
            if off != 0 {
                l2_tables.insert(off);
            }
            if off != 0 && off.saturating_add(cs) > file_len.div_ceil(cs) * cs {
                return Err(BlockError::corrupt(format!(
                    "L1 entry {} points to an L2 table at {:#x}, past the end of the file",
                    i, off
                )));
            }
        }
        let refs = Refcounts::load(
            f,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            header.refcount_order,
            geo.cluster_bits,
            file_len,
            (REFCOUNT_CACHE_BYTES / cs).clamp(4, 256) as usize,
        )?;
        Ok(Meta {
            geo,
            header,
            l1,
            l1_dirty: false,
            l2: TableCache::new((L2_CACHE_BYTES / cs).clamp(16, 1024) as usize),
            refs,
            corrupt: false,
            new_data: false,
            l2_tables,
        })
    }

    fn cs(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Makes sure the L2 table at `off` is cached.
    fn load_l2(&mut self, f: &HostFile, off: u64) -> BlockResult<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        let mut data = vec![0u8; self.cs() as usize];
        f.read(&mut data, off, "L2 table")?;
        self.cache_l2(f, off, data, false)
    }

    fn cache_l2(&mut self, f: &HostFile, off: u64, data: Vec<u8>, dirty: bool) -> BlockResult<()> {
        if let Some((voff, victim)) = self.l2.insert(off, data, dirty) {
            if victim.dirty {
                // One refcount sync pays for writing back every dirty
                // table, so the next evictions are cheap.
                self.before_l2_write(f)?;
                f.write(&victim.data, voff, "L2 table")?;
                for off in self.l2.dirty_offsets() {
                    if let Some(slot) = self.l2.get(off) {
                        f.write(&slot.data, off, "L2 table")?;
                        slot.dirty = false;
                    }
                }
            }
        }
        Ok(())
    }

    /// Refcount blocks must be stable before an L2 table that may reference
    /// newly counted clusters reaches the disk, and so must the data of new
    /// clusters it points at: an allocating write fills its clusters
    /// without this lock, so another thread's sync may come between the
    /// allocation and the data (a power cut would then find the L2 entry
    /// pointing past the end of the file, or at garbage).
    fn before_l2_write(&mut self, f: &HostFile) -> BlockResult<()> {
        if self.refs.flush(f)? || self.new_data {
            f.sync()?;
            self.new_data = false;
        }
        Ok(())
    }

    /// Points guest clusters `first..` at `n` new clusters from `host`,
    /// whose data the caller wrote (and finished) before taking the lock:
    /// the next L2 write-back syncs first. Returns the previous entries.
    pub fn map_new(
        &mut self,
        f: &HostFile,
        first: u64,
        host: u64,
        n: u64,
    ) -> BlockResult<Vec<u64>> {
        self.new_data = true;
        let cs = self.cs();
        (0..n)
            .map(|i| self.set_entry(f, first + i, (host + i * cs) | COPIED))
            .collect()
    }

    pub fn l2_offset(&self, l1_index: u64) -> BlockResult<u64> {
        let e = self.l1.get(l1_index as usize).copied().unwrap_or(0);
        l1_l2_offset(e, self.cs(), l1_index as usize)
    }

    /// Whether every L2 table `[guest, guest + len)` needs is cached (or
    /// absent): then [`Meta::mapping`] does no I/O.
    pub fn tables_cached(&self, guest: u64, len: u64) -> bool {
        let span = self.cs() * self.geo.l2_entries();
        let last = (guest + len.max(1) - 1) / span;
        (guest / span..=last).all(|i| match self.l2_offset(i) {
            Ok(0) => true,
            Ok(off) => self.l2.contains(off),
            Err(_) => false,
        })
    }

    /// The raw entry (and extended bitmap) of guest cluster `gc`.
    pub fn entry(&mut self, f: &HostFile, gc: u64) -> BlockResult<(u64, u64)> {
        let per = self.geo.l2_entries();
        let off = self.l2_offset(gc / per)?;
        if off == 0 {
            return Ok((0, 0));
        }
        self.load_l2(f, off)?;
        let ext = self.geo.extended_l2;
        let slot = self
            .l2
            .get(off)
            .ok_or_else(|| BlockError::corrupt("L2 table vanished from the cache"))?;
        let i = (gc % per) as usize;
        if ext {
            Ok((get_be64(&slot.data, 2 * i), get_be64(&slot.data, 2 * i + 1)))
        } else {
            Ok((get_be64(&slot.data, i), 0))
        }
    }

    /// What `guest` maps to and for how many bytes (at most `max`) the same
    /// mapping continues: contiguous data clusters, zero runs and
    /// unallocated runs are merged; a whole missing L2 table is skipped at once.
    pub fn mapping(&mut self, f: &HostFile, guest: u64, max: u64) -> BlockResult<(Mapping, u64)> {
        let cs = self.cs();
        let per = self.geo.l2_entries();
        let geo = self.geo;
        let (mut m, mut len) = self.one(f, guest)?;
        len = len.min(max);
        'outer: while len < max {
            let at = guest + len;
            let gc = at / cs;
            if !at.is_multiple_of(cs) || geo.extended_l2 {
                let (next, nlen) = self.one(f, at)?;
                if !joins(&mut m, len, next) {
                    break;
                }
                len += nlen.min(max - len);
                continue;
            }
            let off = self.l2_offset(gc / per)?;
            if off == 0 {
                if m != Mapping::Unallocated {
                    break;
                }
                len += ((gc / per + 1) * per * cs - at).min(max - len);
                continue;
            }
            // Scan the rest of this L2 table in place: one cache lookup
            // per table, not per cluster (maps of huge images).
            self.load_l2(f, off)?;
            let slot = self
                .l2
                .get(off)
                .ok_or_else(|| BlockError::corrupt("L2 table vanished from the cache"))?;
            for i in gc % per..per {
                if len >= max {
                    break 'outer;
                }
                let next = geo.decode(get_be64(&slot.data, i as usize))?;
                if !joins(&mut m, len, next) {
                    break 'outer;
                }
                len += cs.min(max - len);
            }
        }
        Ok((m, len))
    }

    /// The mapping at `guest` within its cluster (or subcluster run). Data
    /// hosts are adjusted to `guest` itself.
    fn one(&mut self, f: &HostFile, guest: u64) -> BlockResult<(Mapping, u64)> {
        let cs = self.cs();
        let gc = guest / cs;
        let in_cluster = guest % cs;
        let (entry, bitmap) = self.entry(f, gc)?;
        let (m, end) = if self.geo.extended_l2 {
            let sc_size = self.geo.subcluster_size();
            let sc = (in_cluster / sc_size) as u32;
            let (m, n) = self.geo.decode_extended(entry, bitmap, sc)?;
            (m, u64::from(sc + n) * sc_size)
        } else {
            (self.geo.decode(entry)?, cs)
        };
        let m = match m {
            Mapping::Data { host, copied } => Mapping::Data {
                host: host + in_cluster,
                copied,
            },
            other => other,
        };
        Ok((m, end - in_cluster))
    }

    /// Sets guest cluster `gc`'s entry, allocating (or un-sharing) its L2
    /// table when needed. Returns the previous entry.
    pub fn set_entry(&mut self, f: &HostFile, gc: u64, entry: u64) -> BlockResult<u64> {
        let cs = self.cs();
        let per = self.geo.l2_entries();
        let l1i = gc / per;
        if l1i >= self.l1.len() as u64 {
            self.grow_l1(f, l1i + 1)?;
        }
        let l1e = self.l1[l1i as usize];
        let mut off = l1_l2_offset(l1e, cs, l1i as usize)?;
        if off == 0 || l1e & COPIED == 0 {
            let data = if off == 0 {
                vec![0u8; cs as usize]
            } else {
                // A shared L2 table (internal snapshots) is copied first.
                self.load_l2(f, off)?;
                self.l2.get(off).map(|s| s.data.clone()).unwrap_or_default()
            };
            let new = self.alloc(f, 1)?;
            self.cache_l2(f, new, data, true)?;
            if off != 0 {
                self.refs.update(f, off / cs, -1)?;
                self.l2_tables.remove(&off);
            }
            self.l2_tables.insert(new);
            off = new;
            self.l1[l1i as usize] = new | COPIED;
            self.l1_dirty = true;
        }
        self.load_l2(f, off)?;
        let slot = self
            .l2
            .get(off)
            .ok_or_else(|| BlockError::corrupt("L2 table vanished from the cache"))?;
        let i = (gc % per) as usize;
        let old = get_be64(&slot.data, i);
        put_be64(&mut slot.data, i, entry);
        slot.dirty = true;
        Ok(old)
    }

    /// Allocates `n` contiguous clusters; returns the host offset.
    pub fn alloc(&mut self, f: &HostFile, n: u64) -> BlockResult<u64> {
        let cs = self.cs();
        let c = self.refs.alloc(f, n)?;
        // The table may have moved; keep the header copy in step with disk.
        self.header.refcount_table_offset = self.refs.table_offset;
        self.header.refcount_table_clusters = self.refs.table_clusters;
        let off = c * cs;
        self.check_overlap(off, n * cs)?;
        Ok(off)
    }

    /// Refuses data I/O to space that holds metadata (qemu's overlap check):
    /// a cluster allocated or mapped there means the image is corrupt.
    pub fn check_overlap(&mut self, off: u64, len: u64) -> BlockResult<()> {
        let cs = self.cs();
        let overlaps = |start: u64, size: u64| off < start + size && start < off + len;
        let l1_bytes = (self.l1.len() as u64 * 8).div_ceil(cs) * cs;
        let rt_bytes = u64::from(self.refs.table_clusters) * cs;
        let clusters = (off / cs)..(off + len).div_ceil(cs);
        let table_hit = clusters
            .clone()
            .any(|c| self.l2_tables.contains(&(c * cs)) || self.refs.blocks.contains(&(c * cs)));
        if table_hit
            || overlaps(0, cs)
            || (l1_bytes > 0 && overlaps(self.header.l1_table_offset, l1_bytes))
            || overlaps(self.refs.table_offset, rt_bytes)
        {
            return Err(BlockError::corrupt(format!(
                "Preventing invalid write at {:#x}: it overlaps image metadata \
                 (the image is corrupt; run 'qemu-img check -r all')",
                off
            )));
        }
        Ok(())
    }

    /// Replaces the L1 table with a larger copy in new clusters.
    pub fn grow_l1(&mut self, f: &HostFile, min_entries: u64) -> BlockResult<()> {
        let cs = self.cs();
        let new_len = min_entries.max(self.l1.len() as u64 * 3 / 2);
        let bytes = new_len * 8;
        if bytes > MAX_L1_BYTES {
            return Err(BlockError::invalid("the L1 table would exceed 32 MiB"));
        }
        let clusters = bytes.div_ceil(cs);
        let new_off = self.alloc(f, clusters)?;
        let mut l1 = self.l1.clone();
        l1.resize(new_len as usize, 0);
        // Everything the new table points to must be on disk first.
        self.write_back(f)?;
        self.write_l1_at(f, &l1, new_off, clusters * cs)?;
        self.before_l2_write(f)?;
        f.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(new_len as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        f.write(&hdr, 36, "header")?;
        f.sync()?;
        let old_off = self.header.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.l1 = l1;
        self.header.l1_size = new_len as u32;
        self.header.l1_table_offset = new_off;
        if old_off != 0 && old_clusters > 0 {
            self.refs.free_range(f, old_off, old_clusters * cs)?;
        }
        Ok(())
    }

    fn write_l1_at(&self, f: &HostFile, l1: &[u64], off: u64, pad_to: u64) -> BlockResult<()> {
        let mut raw = vec![0u8; (l1.len() * 8).max(pad_to as usize)];
        for (i, &e) in l1.iter().enumerate() {
            put_be64(&mut raw, i, e);
        }
        f.write(&raw, off, "L1 table")
    }

    /// Writes every dirty table in the safe order. Does not sync the end.
    pub fn write_back(&mut self, f: &HostFile) -> BlockResult<()> {
        if self.l2.has_dirty() || self.l1_dirty {
            self.before_l2_write(f)?;
        } else {
            self.refs.flush(f)?;
        }
        for off in self.l2.dirty_offsets() {
            if let Some(slot) = self.l2.get(off) {
                f.write(&slot.data, off, "L2 table")?;
                slot.dirty = false;
            }
        }
        if self.l1_dirty {
            // New L2 tables must be stable before the L1 points to them.
            f.sync()?;
            let l1 = std::mem::take(&mut self.l1);
            let r = self.write_l1_at(f, &l1, self.header.l1_table_offset, 0);
            self.l1 = l1;
            r?;
            self.l1_dirty = false;
        }
        Ok(())
    }

    /// Drops the references of clusters whose L2 entries were just cleared:
    /// the cleared tables reach the disk (synced) before any refcount drops,
    /// so a crash cannot leave a referenced cluster free for reuse.
    pub fn free_after_unmap(&mut self, f: &HostFile, freed: &[(u64, u64)]) -> BlockResult<()> {
        if freed.is_empty() {
            return Ok(());
        }
        self.write_back(f)?;
        f.sync()?;
        let cs = self.cs();
        let mut now_free = Vec::new();
        for &(off, len) in freed {
            now_free.extend(self.refs.free_range(f, off, len)?);
        }
        // Give the space back to the host, as qemu passes discards down,
        // one call per contiguous run.
        now_free.sort_unstable();
        let mut i = 0;
        while i < now_free.len() {
            let mut j = i + 1;
            while j < now_free.len() && now_free[j] == now_free[j - 1] + 1 {
                j += 1;
            }
            f.punch(now_free[i] * cs, (j - i) as u64 * cs);
            i = j;
        }
        Ok(())
    }
}

/// Whether `next` (at `len` bytes into a run mapped as `m`) continues the
/// run: unallocated and zero runs merge, data runs while contiguous.
fn joins(m: &mut Mapping, len: u64, next: Mapping) -> bool {
    let joined = match (*m, next) {
        (Mapping::Unallocated, Mapping::Unallocated) => true,
        (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
        (
            Mapping::Data { host, copied },
            Mapping::Data {
                host: h2,
                copied: c2,
            },
        ) => h2 == host + len && copied == c2,
        _ => false,
    };
    if joined {
        if let Mapping::Zero { .. } = m {
            // Merged zero runs have no single preallocated host.
            *m = Mapping::Zero { host: 0 };
        }
    }
    joined
}
