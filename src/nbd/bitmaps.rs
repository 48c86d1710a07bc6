//! Which dirty bitmaps an export may offer as `qemu:dirty-bitmap:NAME`,
//! with qemu's rules and texts (measured with qemu-nbd 10.0.2 `-B`):
//! - a bitmap is looked up on the export's node, then down its backing
//!   chain ("Bitmap 'X' is not found");
//! - a busy or inconsistent bitmap is refused ("Bitmap 'X' is inconsistent
//!   and cannot be used");
//! - a recording bitmap cannot back a read-only export of a writable node
//!   (its bits would keep changing under a reader that expects a snapshot);
//! - every bitmap is checked before any is taken, then all are busy for
//!   as long as the export lives, so nobody clears or removes them under
//!   a backup reader;
//! - qemu-nbd lists the contexts in the reverse order of its `-B` options.

use std::sync::Arc;

use super::context::{Descriptor, DirtyBitmapContext, MetaContext};
use crate::bitmap::set::{lock, SharedBitmap};
use crate::bitmap::{BitmapError, BitmapResult, Checks, DirtyBitmap};
use crate::block::node::Node;
use crate::block::{BlockNode, BlockResult};

/// A dirty-bitmap context that holds its bitmap busy until dropped.
pub struct ExportedBitmap {
    ctx: DirtyBitmapContext,
    bitmap: SharedBitmap,
}

impl Drop for ExportedBitmap {
    fn drop(&mut self) {
        lock(&self.bitmap).state.busy = false;
    }
}

impl MetaContext for ExportedBitmap {
    fn name(&self) -> &str {
        self.ctx.name()
    }

    fn in_memory(&self) -> bool {
        true
    }

    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Descriptor>,
    ) -> BlockResult<()> {
        self.ctx.extents(offset, len, max, out)
    }
}

/// Whether `bitmap` may back a `qemu:dirty-bitmap` context of an export:
/// the one home of this rule, for `serve -B` and QMP `block-export-add`.
pub fn check_exportable(
    bitmap: &DirtyBitmap,
    read_only_export: bool,
    node_writable: bool,
) -> BitmapResult<()> {
    bitmap.check(Checks::ALLOW_RO)?;
    if read_only_export && node_writable && bitmap.state.recording {
        return Err(BitmapError::invalid(format!(
            "Enabled bitmap '{}' incompatible with readonly export",
            bitmap.name()
        )));
    }
    Ok(())
}

/// The contexts for bitmaps `names` (in `-B` order) on an export of
/// `node`; the error is qemu-nbd's text.
pub fn bitmap_contexts(
    node: &Node,
    names: &[String],
    read_only_export: bool,
) -> Result<Vec<Arc<dyn MetaContext>>, String> {
    let mut found = Vec::with_capacity(names.len());
    for name in names {
        let b = node
            .find_bitmap(name)
            .ok_or_else(|| format!("Bitmap '{name}' is not found"))?;
        check_exportable(&lock(&b), read_only_export, !node.read_only()).map_err(|e| e.message)?;
        found.push((name.clone(), b));
    }
    let mut out: Vec<Arc<dyn MetaContext>> = Vec::with_capacity(found.len());
    for (name, b) in found.into_iter().rev() {
        lock(&b).state.busy = true;
        out.push(Arc::new(ExportedBitmap {
            ctx: DirtyBitmapContext::new(&name, b.clone()),
            bitmap: b,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::DirtyBitmap;
    use crate::block::open::open_image;
    use crate::block::qcow2::create::{create_qcow2, CreateOptions};

    fn node(dir: &std::path::Path) -> Node {
        let path = dir.join("n.qcow2");
        let opts = CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        };
        create_qcow2(&path, &opts).expect("create");
        let node = Node::open("n", open_image(&path, None, false).expect("open")).expect("node");
        for name in ["on", "off"] {
            let mut b = DirtyBitmap::new(name, 1 << 20, 65536).expect("bitmap");
            b.state.recording = name == "on";
            node.bitmaps().add(b).expect("add");
        }
        node
    }

    fn err(r: Result<Vec<Arc<dyn MetaContext>>, String>) -> String {
        r.err().expect("refused")
    }

    #[test]
    fn export_rules_and_texts_match_qemu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path());
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            err(bitmap_contexts(&node, &names(&["nope"]), false)),
            "Bitmap 'nope' is not found"
        );
        assert_eq!(
            err(bitmap_contexts(&node, &names(&["off", "on"]), true)),
            "Enabled bitmap 'on' incompatible with readonly export"
        );
        // Nothing was taken by the refused export.
        let on = node.find_bitmap("on").expect("on");
        assert!(!lock(&on).state.busy);
        let ctxs = bitmap_contexts(&node, &names(&["on", "off"]), false).expect("export");
        let order: Vec<&str> = ctxs.iter().map(|c| c.name()).collect();
        assert_eq!(order, ["qemu:dirty-bitmap:off", "qemu:dirty-bitmap:on"]);
        assert!(lock(&on).state.busy);
        assert_eq!(
            err(bitmap_contexts(&node, &names(&["on"]), false)),
            "Bitmap 'on' is currently in use by another operation and cannot be used"
        );
        drop(ctxs);
        assert!(!lock(&on).state.busy);
    }
}
