//! Recovery from the intent log at a read-write open (see
//! qcow2/intent.rs). A bitmap found `in_use` that the log vouches for was
//! being kept when the writer stopped without a clean close: it becomes
//! its stored bits plus every granule of every zone the log marked (for a
//! recording bitmap; a disabled one is exact as stored), and is stored
//! back cleanly, usable at once. What recovery added is kept for `info`
//! and query-named-block-nodes.

use super::load::{load_bitmap, load_forced};
use super::store::{store, StoreMode};
use super::{Stored, StoredBitmap};
use crate::bitmap::DirtyBitmap;
use crate::block::qcow2::header::Header;
use crate::block::qcow2::intent::{self, Payload, AUTOCLEAR_INTENT, EXT_TIDEMARK_INTENT};
use crate::block::qcow2::io::HostFile;
use crate::block::qcow2::meta::Meta;
use crate::block::qcow2::Qcow2Node;
use crate::block::BlockResult;

/// The intent log in `header`, if it is current: present, readable, and
/// its autoclear bit still set (qemu has not written the image since).
pub fn current_log(header: &Header) -> Option<Payload> {
    if header.autoclear & AUTOCLEAR_INTENT == 0 {
        return None;
    }
    Payload::decode(header.extension(EXT_TIDEMARK_INTENT)?, header.size)
}

/// Every bitmap as recovery makes it, and per recovered bitmap its name
/// and the bytes recovery added.
pub type Plan = (Vec<DirtyBitmap>, Vec<(String, u64)>);

/// What recovery would do to the bitmaps of an image whose `header` and
/// `stored` directory are as given: every bitmap (recovered ones with the
/// zones added) and, per recovered bitmap, the bytes added. `None` when
/// the log is not current or covers no bitmap left in use.
pub fn plan(f: &HostFile, header: &Header, stored: &Stored) -> BlockResult<Option<Plan>> {
    let Some(log) = current_log(header) else {
        return Ok(None);
    };
    let trusted =
        |b: &StoredBitmap| !log.untrusted.contains(&b.entry.name) && !b.entry.unusable_extra_data();
    if !stored
        .bitmaps
        .iter()
        .any(|b| b.entry.in_use() && trusted(b))
    {
        return Ok(None);
    }
    let zones = intent::zone_ranges(log.shift, &log.map, header.size);
    let mut list = Vec::with_capacity(stored.bitmaps.len());
    let mut report = Vec::new();
    for sb in &stored.bitmaps {
        if !trusted(sb) {
            list.push(load_bitmap(f, header, sb, false)?);
            continue;
        }
        let mut b = load_forced(f, header, sb)?;
        if sb.entry.in_use() {
            let before = b.count();
            if sb.entry.auto() {
                for &(at, len) in &zones {
                    // Zones lie within the disk, as the bitmap does.
                    let _ = b.set_range(at, len);
                }
            }
            report.push((sb.entry.name.clone(), b.count() - before));
        }
        list.push(b);
    }
    Ok(Some((list, report)))
}

impl Qcow2Node {
    /// Recovers the bitmaps a crash left in use, if the log covers them,
    /// and stores them back cleanly; the log leaves the header with that
    /// store (a fresh one is made before the bitmaps are marked in use
    /// again). Runs with `meta` locked.
    pub(in crate::block::qcow2) fn recover_from_log(&self, meta: &mut Meta) -> BlockResult<()> {
        if !intent::enabled() {
            return Ok(());
        }
        let mut stored = self.lock_stored()?;
        let Some((list, report)) = plan(&self.f, &meta.header, &stored)? else {
            return Ok(());
        };
        let refs: Vec<&DirtyBitmap> = list.iter().collect();
        let mut drop_log = |h: &mut Header| {
            h.set_own_extension(EXT_TIDEMARK_INTENT, None);
            h.autoclear &= !AUTOCLEAR_INTENT;
        };
        let mode = StoreMode {
            in_use: false,
            header: &mut drop_log,
        };
        store(&self.f, meta, &mut stored, &refs, mode)?;
        for (name, added) in &report {
            tracing::warn!(
                image = %self.f.path.display(),
                bitmap = %name,
                over_approximation_bytes = added,
                "bitmap recovered from the intent log after an unclean stop"
            );
        }
        *self.recovered.lock().unwrap_or_else(|p| p.into_inner()) = report;
        Ok(())
    }

    /// What recovery would add, per bitmap, if the image were opened for
    /// writing now (`tidemark info` of an image a crash left behind).
    pub fn recoverable(&self) -> Vec<(String, u64)> {
        if !intent::enabled() {
            return Vec::new();
        }
        let header = self.header();
        let Ok(stored) = self.lock_stored().map(|s| s.clone()) else {
            return Vec::new();
        };
        match plan(&self.f, &header, &stored) {
            Ok(Some((_, report))) => report,
            _ => Vec::new(),
        }
    }
}
