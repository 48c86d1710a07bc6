//! Backing chains: open an image and, layer by layer, the backing files it
//! names. Relative backing names are relative to the directory of the image
//! that names them (as in qemu); the backing format comes from the image's
//! backing-format extension or else is probed. Backing layers are opened
//! read-only. A chain deeper than [`MAX_CHAIN_DEPTH`] or one that names the
//! same file twice is refused.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::file::FileNode;
use super::open::{probe, Format};
use super::qcow2::Qcow2Node;
use super::{BlockError, BlockNode, BlockResult};

/// Layers below the top image at most.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Opens `path` (format probed when `None`) with its whole backing chain.
pub fn open_chain(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
) -> BlockResult<Arc<dyn BlockNode>> {
    let mut seen = Vec::new();
    open_layer(path, format, read_only, 0, &mut seen)
}

fn open_layer(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
) -> BlockResult<Arc<dyn BlockNode>> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(BlockError::invalid(format!(
            "'{}': the backing chain is deeper than {} layers",
            path.display(),
            MAX_CHAIN_DEPTH
        )));
    }
    let md = std::fs::metadata(path)
        .map_err(|e| BlockError::io(format!("Could not open '{}'", path.display()), e))?;
    let id = (md.dev(), md.ino());
    if seen.contains(&id) {
        return Err(BlockError::invalid(format!(
            "Backing file loop: '{}' is already part of the chain",
            path.display()
        )));
    }
    seen.push(id);
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    match format {
        Format::Raw => Ok(Arc::new(FileNode::open(path, read_only)?)),
        Format::Qcow2 => {
            let mut node = Qcow2Node::open(path, read_only)?;
            if let Some(bpath) = node.backing_path() {
                let bfmt = match node.backing_format().as_deref() {
                    None => None,
                    Some("raw") => Some(Format::Raw),
                    Some("qcow2") => Some(Format::Qcow2),
                    Some(other) => {
                        return Err(BlockError::not_supported(format!(
                            "'{}': backing format '{}' is not supported",
                            path.display(),
                            other
                        )))
                    }
                };
                let backing =
                    open_layer(&bpath, bfmt, true, depth + 1, seen).map_err(|e| BlockError {
                        context: format!("Could not open backing file: {}", e.context),
                        ..e
                    })?;
                node.set_backing(Some(backing));
            }
            Ok(Arc::new(node))
        }
    }
}
