//! Which dirty bitmaps an export may offer as `qemu:dirty-bitmap:NAME`,
//! with qemu's rules and texts (measured with qemu-nbd 10.0.2 `-B` and
//! qemu-storage-daemon's block-export-add):
//! - a busy or inconsistent bitmap is refused ("Bitmap 'X' is inconsistent
//!   and cannot be used");
//! - a recording bitmap cannot back a read-only export of a writable node
//!   (its bits would keep changing under a reader that expects a snapshot),
//!   where the export found it by name; one given as `{node, name}` is the
//!   caller's choice, and qemu takes it as it is;
//! - every bitmap is checked before any is taken, then all are busy for
//!   as long as the export lives (each context holds a [`BusyClaim`]), so
//!   nobody clears or removes them under a backup reader.
//!
//! Finding the bitmaps (down the backing chain, or on another node) is the
//! caller's: QMP's block-export-add, which `serve -B` also goes through.

use std::sync::Arc;

use super::context::{DirtyBitmapContext, MetaContext};
use crate::bitmap::set::{lock, BusyClaim, SharedBitmap};
use crate::bitmap::{BitmapError, BitmapResult, Checks, DirtyBitmap};

/// Whether `bitmap` may back a `qemu:dirty-bitmap` context of an export;
/// `frozen` when it must not be recording.
pub fn check_exportable(bitmap: &DirtyBitmap, frozen: bool) -> BitmapResult<()> {
    bitmap.check(Checks::ALLOW_RO)?;
    if frozen && bitmap.state.recording {
        return Err(BitmapError::invalid(format!(
            "Enabled bitmap '{}' incompatible with readonly export",
            bitmap.name()
        )));
    }
    Ok(())
}

/// The contexts for `bitmaps` (in context order), each holding its bitmap
/// busy. All are checked before any is claimed; on error none stays busy.
pub fn bitmap_contexts(
    bitmaps: &[(SharedBitmap, bool)],
) -> BitmapResult<Vec<Arc<dyn MetaContext>>> {
    for (b, frozen) in bitmaps {
        check_exportable(&lock(b), *frozen)?;
    }
    let mut out: Vec<Arc<dyn MetaContext>> = Vec::with_capacity(bitmaps.len());
    let mut claims: Vec<(&SharedBitmap, Arc<BusyClaim>)> = Vec::new();
    for (b, _) in bitmaps {
        // Dropping `out` on error releases the claims taken so far; a
        // bitmap listed twice is one claim.
        let claim = match claims.iter().find(|(x, _)| Arc::ptr_eq(x, b)) {
            Some((_, c)) => c.clone(),
            None => {
                let c = Arc::new(BusyClaim::take(b)?);
                claims.push((b, c.clone()));
                c
            }
        };
        let name = lock(b).name().to_owned();
        out.push(Arc::new(DirtyBitmapContext::new(&name, claim)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::set::BitmapSet;

    fn err(r: BitmapResult<Vec<Arc<dyn MetaContext>>>) -> String {
        r.err().expect("refused").message
    }

    #[test]
    fn export_rules_and_texts_match_qemu() {
        let set = BitmapSet::new();
        for name in ["on", "off"] {
            let mut b = DirtyBitmap::new(name, 1 << 20, 65536).expect("bitmap");
            b.state.recording = name == "on";
            set.add(b).expect("add");
        }
        let on = set.get("on").expect("on");
        let off = set.get("off").expect("off");
        assert_eq!(
            err(bitmap_contexts(&[(off.clone(), true), (on.clone(), true)])),
            "Enabled bitmap 'on' incompatible with readonly export"
        );
        // Nothing was taken by the refused export.
        assert!(!lock(&off).state.busy);
        let ctxs = bitmap_contexts(&[(off.clone(), false), (on.clone(), false)]).expect("export");
        let order: Vec<&[u8]> = ctxs.iter().map(|c| c.name()).collect();
        assert_eq!(
            order,
            [&b"qemu:dirty-bitmap:off"[..], &b"qemu:dirty-bitmap:on"[..]]
        );
        assert!(lock(&on).state.busy);
        assert_eq!(
            err(bitmap_contexts(&[(on.clone(), false)])),
            "Bitmap 'on' is currently in use by another operation and cannot be used"
        );
        drop(ctxs);
        assert!(!lock(&on).state.busy);
    }
}
