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
use crate::bitmap::Checks;
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
        {
            let g = lock(&b);
            g.check(Checks::ALLOW_RO).map_err(|e| e.message)?;
            if read_only_export && !node.read_only() && g.state.recording {
                return Err(format!(
                    "Enabled bitmap '{name}' incompatible with readonly export"
                ));
            }
        }
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
