//! The intent log (tidemark's): persistent bitmaps that survive a crash.
//!
//! qemu stores persistent bitmaps only when it closes an image, so after a
//! crash every one is `in_use`, inconsistent, and the next backup is a
//! full one. Here the disk is cut into coarse zones, and the first write
//! into a zone since the last store point marks the zone in an on-disk map
//! *before* the write is issued (write-ahead). After a crash a recording
//! bitmap is its last stored bits plus every granule of every marked zone:
//! a superset of the true changes, larger by at most the zones first
//! written since the last store point.
//!
//! On disk: header extension [`EXT_TIDEMARK_INTENT`] (version, zone size,
//! one bit per zone, LSB first), guarded by autoclear bit
//! [`AUTOCLEAR_INTENT`]. qemu clears unknown autoclear bits when it opens
//! an image read-write, so a log found with the bit clear was left behind
//! before qemu wrote the image: it is dropped and qemu's semantics hold.
//! A mark is an in-place write of the map bytes plus a flush: the header
//! fields around it are not rewritten. A store point clears the map in the
//! same header write that switches the bitmap directory.
//!
//! Epochs: a store point copies the bitmaps (under their locks) and starts
//! a new epoch at that instant. A write marks the bitmaps in memory first,
//! then makes sure its zones are durable *in the current epoch*; the
//! previous epoch's zones stay on disk until the directory switch, which
//! writes only the new epoch's. So a write is always covered by the copy
//! being stored, or by a zone that survives the switch.
//!
//! Lock order: the node's `meta` mutex, then its `stored` directory, then
//! [`IntentLog::disk`]; the `state` mutex is never held while any of them
//! is taken. A store point holds none of them while it writes the
//! bitmaps' bytes (bitmaps/store.rs: prepare, write, switch).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::block::BlockResult;

/// "tdmi": the zone map.
pub const EXT_TIDEMARK_INTENT: u32 = 0x7464_6d69;
/// The autoclear bit that says the zone map is current (qemu clears it).
pub const AUTOCLEAR_INTENT: u64 = 1 << 60;
const VERSION: u32 = 1;
/// Version (4 bytes), zone shift (1), reserved (3); the map follows.
pub const MAP_START: usize = 8;
/// Smallest zone: 64 MiB (1 bit per 64 MiB: 2 KiB of map per TiB).
pub const MIN_ZONE_SHIFT: u32 = 26;
/// Most map bytes: zones grow for larger disks so the map stays small
/// enough to share the header cluster.
const MAX_MAP_BYTES: u64 = 4096;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the intent log on or off for this process (`--bitmap-intent-log`).
/// Off gives exactly qemu's semantics: bitmaps are inconsistent after a
/// crash.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Release);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// The zone size (log2) for a disk of `size` in an image of `cluster_size`
/// clusters: at least 64 MiB, more when the map would not fit.
pub fn zone_shift(size: u64, cluster_size: u64) -> u32 {
    let max_bytes = MAX_MAP_BYTES.min(cluster_size / 4).max(8);
    let mut shift = MIN_ZONE_SHIFT;
    while size.div_ceil(1 << shift).div_ceil(8) > max_bytes {
        shift += 1;
    }
    shift
}

/// What the extension holds: the zone size, the map, and the names of
/// the bitmaps that were inconsistent already when the log took over
/// (their `in_use` flag is not the log's: recovery leaves them alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub shift: u32,
    pub map: Vec<u8>,
    pub untrusted: Vec<String>,
}

impl Payload {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAP_START + self.map.len() + 4);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.push(self.shift as u8);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.map);
        out.extend_from_slice(&(self.untrusted.len() as u32).to_be_bytes());
        for n in &self.untrusted {
            out.extend_from_slice(&(n.len() as u16).to_be_bytes());
            out.extend_from_slice(n.as_bytes());
        }
        out
    }

    /// The payload, if it is one this version reads and it fits a disk
    /// of `size`.
    pub fn decode(data: &[u8], size: u64) -> Option<Payload> {
        if data.len() < MAP_START || data[..4] != VERSION.to_be_bytes() {
            return None;
        }
        let shift = u32::from(data[4]);
        if !(MIN_ZONE_SHIFT..=62).contains(&shift) {
            return None;
        }
        let len = size.div_ceil(1 << shift).div_ceil(8) as usize;
        let map = data.get(MAP_START..MAP_START + len)?.to_vec();
        let mut rest = &data[MAP_START + len..];
        let take = |rest: &mut &[u8], n: usize| -> Option<Vec<u8>> {
            let (a, b) = (rest.get(..n)?.to_vec(), rest.get(n..)?);
            *rest = b;
            Some(a)
        };
        let count = u32::from_be_bytes(take(&mut rest, 4)?.try_into().ok()?);
        let mut untrusted = Vec::new();
        for _ in 0..count {
            let n = u16::from_be_bytes(take(&mut rest, 2)?.try_into().ok()?);
            untrusted.push(String::from_utf8(take(&mut rest, n.into())?).ok()?);
        }
        Some(Payload {
            shift,
            map,
            untrusted,
        })
    }
}

/// The zones set in `map`, as byte ranges `(offset, len)` of a disk of
/// `size`, adjacent zones joined.
pub fn zone_ranges(shift: u32, map: &[u8], size: u64) -> Vec<(u64, u64)> {
    let zone = 1u64 << shift;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for z in 0..(map.len() as u64 * 8) {
        if map[(z / 8) as usize] & (1 << (z % 8)) == 0 || z * zone >= size {
            continue;
        }
        let (at, len) = (z * zone, zone.min(size - z * zone));
        match out.last_mut() {
            Some(last) if last.0 + last.1 == at => last.1 += len,
            _ => out.push((at, len)),
        }
    }
    out
}

fn set_bit(map: &mut [u8], z: u64) {
    map[(z / 8) as usize] |= 1 << (z % 8);
}

fn has_bit(map: &[u8], z: u64) -> bool {
    map[(z / 8) as usize] & (1 << (z % 8)) != 0
}

/// The map as it is (or is being made) on disk: zones of the epoch before
/// the last store point's copy, and of the current one.
#[derive(Default)]
pub struct DiskMaps {
    /// Whether the extension and its autoclear bit are in the header.
    pub installed: bool,
    /// Inconsistent bitmaps the log does not vouch for.
    pub untrusted: Vec<String>,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
}

impl DiskMaps {
    /// What the extension holds now: both epochs.
    pub fn combined(&self, shift: u32) -> Payload {
        Payload {
            shift,
            map: self.old.iter().zip(&self.new).map(|(a, b)| a | b).collect(),
            untrusted: self.untrusted.clone(),
        }
    }

    /// What it holds after a store point's switch: the current epoch.
    pub fn after_switch(&self, shift: u32) -> Payload {
        Payload {
            shift,
            map: self.new.clone(),
            untrusted: self.untrusted.clone(),
        }
    }
}

struct State {
    epoch: u64,
    /// Zones durable in the current epoch (the fast path's answer).
    durable: Vec<u8>,
    /// Zones writers wait to see durable.
    wanted: Vec<u8>,
    /// A writer is making a batch durable.
    writing: bool,
}

/// One image's intent log (in memory).
pub struct IntentLog {
    pub shift: u32,
    zones: u64,
    state: Mutex<State>,
    done: Condvar,
    /// Locked after the node's meta mutex (and its stored directory).
    pub disk: Mutex<DiskMaps>,
}

impl IntentLog {
    pub fn new(size: u64, cluster_size: u64) -> IntentLog {
        let shift = zone_shift(size, cluster_size);
        let zones = size.div_ceil(1 << shift).max(1);
        let bytes = zones.div_ceil(8) as usize;
        IntentLog {
            shift,
            zones,
            state: Mutex::new(State {
                epoch: 0,
                durable: vec![0; bytes],
                wanted: vec![0; bytes],
                writing: false,
            }),
            done: Condvar::new(),
            disk: Mutex::new(DiskMaps {
                installed: false,
                untrusted: Vec::new(),
                old: vec![0; bytes],
                new: vec![0; bytes],
            }),
        }
    }

    pub fn zone_size(&self) -> u64 {
        1 << self.shift
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lock_disk(&self) -> MutexGuard<'_, DiskMaps> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn zones_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let last = (offset + len.max(1) - 1) >> self.shift;
        (offset >> self.shift)..=last.min(self.zones - 1)
    }

    /// The zones of byte ranges `(offset, len)`.
    fn zone_list(&self, ranges: &[(u64, u64)]) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for &(off, len) in ranges {
            for z in self.zones_of(off, len) {
                if out.last() != Some(&z) {
                    out.push(z);
                }
            }
        }
        out
    }

    /// Whether `[offset, offset + len)` lies in zones already durable in
    /// this epoch (a write there costs nothing extra).
    pub fn is_durable(&self, offset: u64, len: u64) -> bool {
        let st = self.state();
        self.zones_of(offset, len).all(|z| has_bit(&st.durable, z))
    }

    /// Makes the zones of `ranges` durable in the current epoch before
    /// returning. `persist(batch)` adds a batch of zones to the on-disk
    /// map and flushes; concurrent callers share one `persist` (one
    /// flush) for all the zones they wait for.
    pub fn ensure(
        &self,
        ranges: &[(u64, u64)],
        persist: impl Fn(&[u8]) -> BlockResult<()>,
    ) -> BlockResult<()> {
        let mut st = self.state();
        if ranges.len() == 1 {
            let (off, len) = ranges[0];
            if self.zones_of(off, len).all(|z| has_bit(&st.durable, z)) {
                return Ok(());
            }
        }
        let zones = self.zone_list(ranges);
        loop {
            if zones.iter().all(|&z| has_bit(&st.durable, z)) {
                return Ok(());
            }
            for &z in &zones {
                if !has_bit(&st.durable, z) {
                    set_bit(&mut st.wanted, z);
                }
            }
            if st.writing {
                st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.writing = true;
            let n = st.durable.len();
            let batch = std::mem::replace(&mut st.wanted, vec![0; n]);
            let epoch = st.epoch;
            drop(st);
            let r = persist(&batch);
            st = self.state();
            st.writing = false;
            // A store point that started meanwhile began a new epoch: the
            // batch may have gone into the old one, so it is not counted
            // as durable now (the zones are marked again).
            if r.is_ok() && st.epoch == epoch {
                let State {
                    durable, wanted, ..
                } = &mut *st;
                for ((d, w), b) in durable.iter_mut().zip(wanted.iter_mut()).zip(&batch) {
                    *d |= b;
                    // Asked for again meanwhile, and now durable: a stale
                    // wish would mark the zone again in a later epoch.
                    *w &= !*d;
                }
            }
            self.done.notify_all();
            r?;
        }
    }

    /// A store point's copy was taken: a new epoch starts. Call with the
    /// node's meta mutex held (the disk maps move in step) and while the
    /// bitmaps copied are still locked.
    pub fn new_epoch(&self, disk: &mut DiskMaps) {
        for (o, n) in disk.old.iter_mut().zip(disk.new.iter_mut()) {
            *o |= *n;
            *n = 0;
        }
        let mut st = self.state();
        st.epoch += 1;
        st.durable.iter_mut().for_each(|b| *b = 0);
    }

    /// Forgets every mark (the log left the header: a clean store).
    pub fn reset(&self, disk: &mut DiskMaps) {
        disk.installed = false;
        disk.old.iter_mut().for_each(|b| *b = 0);
        disk.new.iter_mut().for_each(|b| *b = 0);
        let mut st = self.state();
        st.epoch += 1;
        st.durable.iter_mut().for_each(|b| *b = 0);
    }

    /// Whether any zone is marked on disk (a store point has work).
    pub fn any_marked(&self) -> bool {
        let d = self.lock_disk();
        d.old.iter().chain(&d.new).any(|&b| b != 0)
    }
}

/// The log's I/O on a qcow2 image.
impl super::Qcow2Node {
    /// Before the persistent recording bitmaps gain `ranges` (a write, a
    /// merge).
    pub(super) fn log_write(&self, ranges: &[(u64, u64)]) -> BlockResult<()> {
        if !enabled() || self.is_read_only() || ranges.is_empty() {
            return Ok(());
        }
        self.intent.ensure(ranges, |batch| self.log_persist(batch))
    }

    /// Adds `batch` to the on-disk map and flushes. The first time, the
    /// extension and its autoclear bit go into the header (a header
    /// rewrite); after that only the map's bytes are written, in place.
    fn log_persist(&self, batch: &[u8]) -> BlockResult<()> {
        let mut meta = self.lock_meta()?;
        let stored = self.lock_stored()?;
        let mut disk = self.intent.lock_disk();
        for (n, b) in disk.new.iter_mut().zip(batch) {
            *n |= *b;
        }
        if !disk.installed {
            disk.untrusted = stored.inconsistent_names();
        }
        drop(stored);
        if disk.installed {
            self.write_map(&mut meta, &disk)?;
            return self.f.sync();
        }
        let payload = disk.combined(self.intent.shift);
        let mut h = meta.header.clone();
        h.set_own_extension(EXT_TIDEMARK_INTENT, Some(payload.encode()));
        h.autoclear |= AUTOCLEAR_INTENT;
        let bytes = h.serialize()?;
        meta.write_back(&self.f)?;
        self.f.write(&bytes, 0, "header")?;
        self.f.sync()?;
        meta.header = h;
        disk.installed = true;
        Ok(())
    }

    /// Writes the map as `disk` has it now in place (only its bytes; the
    /// header around it is not rewritten), keeping the header in memory in
    /// step. No flush: the caller decides.
    pub(super) fn write_map(
        &self,
        meta: &mut super::meta::Meta,
        disk: &DiskMaps,
    ) -> BlockResult<()> {
        let payload = disk.combined(self.intent.shift);
        meta.header
            .set_own_extension(EXT_TIDEMARK_INTENT, Some(payload.encode()));
        let at = meta
            .header
            .extension_offset(EXT_TIDEMARK_INTENT)
            .ok_or_else(|| crate::block::BlockError::corrupt("intent log not in the header"))?;
        self.f
            .write(&payload.map, at + MAP_START as u64, "intent log")
    }

    /// A store point's copy was taken: the maps move to a new epoch.
    pub(super) fn log_new_epoch(&self) {
        let _meta = self.lock_meta();
        let mut disk = self.intent.lock_disk();
        self.intent.new_epoch(&mut disk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_grow_so_the_map_fits() {
        assert_eq!(zone_shift(1 << 40, 65536), 26);
        assert_eq!(zone_shift(64 << 40, 65536), 31);
        // 512-byte clusters: a 128-byte map at most.
        assert_eq!(zone_shift(1 << 40, 512), 30);
        let p = Payload {
            shift: 26,
            map: vec![0b101, 0],
            untrusted: vec!["old".into()],
        };
        assert_eq!(
            Payload::decode(&p.encode(), 16 * (64 << 20)),
            Some(p.clone())
        );
        assert_eq!(Payload::decode(&p.encode(), 1 << 40), None);
        assert_eq!(
            zone_ranges(26, &[0b111], 3 * (64 << 20) - 5),
            vec![(0, 3 * (64 << 20) - 5)]
        );
    }

    #[test]
    fn first_touches_share_a_flush_and_later_ones_cost_nothing() {
        let log = IntentLog::new(1 << 30, 65536);
        let calls = std::sync::atomic::AtomicU32::new(0);
        let persist = |_: &[u8]| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        log.ensure(&[(0, 4096)], persist).expect("mark");
        log.ensure(&[(100, 4096)], persist).expect("again");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(log.is_durable(0, 1 << 26));
        assert!(!log.is_durable(1 << 26, 1));
        let mut disk = log.lock_disk();
        log.new_epoch(&mut disk);
        drop(disk);
        assert!(!log.is_durable(0, 1));
    }
}
