//! Recovery from the intent log at a read-write open (see
//! qcow2/intent.rs). A bitmap found `in_use` that the log vouches for was
//! being kept when the writer stopped without a clean close: it becomes
//! its stored bits plus every granule of every zone the log marked (for a
//! recording bitmap; a disabled one is exact as stored), and is stored
//! back cleanly, usable at once. What recovery added is kept for `info`
//! and query-named-block-nodes.

use super::load::{load_bitmap, load_forced};
use super::store::{store, StoreMode};
use crate::block::qcow2::header::Header;
use crate::block::qcow2::intent::{self, Payload, AUTOCLEAR_INTENT, EXT_TIDEMARK_INTENT};
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

impl Qcow2Node {
    /// Recovers the bitmaps a crash left in use, if the log covers them;
    /// then the log leaves the header (a fresh one is made at the next
    /// write). Runs with `meta` locked, before the bitmaps are marked in
    /// use again.
    pub(in crate::block::qcow2) fn recover_from_log(&self, meta: &mut Meta) -> BlockResult<()> {
        if !intent::enabled() {
            return Ok(());
        }
        let Some(log) = current_log(&meta.header) else {
            return Ok(());
        };
        let mut stored = self.lock_stored()?;
        let trusted = |b: &super::StoredBitmap| {
            !log.untrusted.contains(&b.entry.name) && !b.entry.unusable_extra_data()
        };
        if !stored
            .bitmaps
            .iter()
            .any(|b| b.entry.in_use() && trusted(b))
        {
            return Ok(());
        }
        let size = meta.header.size;
        let zones = intent::zone_ranges(log.shift, &log.map, size);
        let header = meta.header.clone();
        let mut list = Vec::with_capacity(stored.bitmaps.len());
        let mut report = Vec::new();
        for sb in &stored.bitmaps {
            if !trusted(sb) {
                list.push(load_bitmap(&self.f, &header, sb, false)?);
                continue;
            }
            let mut b = load_forced(&self.f, &header, sb)?;
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
        let refs: Vec<&crate::bitmap::DirtyBitmap> = list.iter().collect();
        let mut drop_log = |h: &mut Header| {
            h.set_extension(EXT_TIDEMARK_INTENT, None);
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
}
