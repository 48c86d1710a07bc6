//! Backing chains: open an image and, layer by layer, the backing files it
//! names, every layer a node (a `file` node and a format node, as qemu
//! opens them). Relative backing names are relative to the directory of
//! the image that names them (as in qemu); the backing format comes from
//! the image's backing-format extension or else is probed. Backing layers
//! are opened read-only. A chain deeper than [`MAX_CHAIN_DEPTH`] or one
//! that names the same file twice is refused.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::file::FileNode;
use super::node::Node;
use super::open::{probe, Driver, Format};
use super::qcow2::Qcow2Node;
use super::raw::RawFormat;
use super::{BlockError, BlockNode, BlockResult};

/// Layers below the top image at most.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Where the nodes a chain opener creates go: a daemon registers each as
/// an implicit node of its graph; offline tools only need them to exist.
pub trait Layers {
    /// Takes the next place in the graph's order: qemu names a node when
    /// it starts opening it, after its `file` child and before its backing
    /// chain, and lists nodes in that order.
    fn reserve(&mut self) -> u64;

    /// Opens a layer's host file (a graph takes the locks later, when it
    /// knows the file's users).
    fn open_file(&mut self, path: &Path, read_only: bool) -> BlockResult<FileNode> {
        FileNode::open(path, read_only)
    }

    /// Names `driver`, wraps it in a node and keeps it at place `slot`.
    fn add(
        &mut self,
        kind: Driver,
        driver: Arc<dyn BlockNode>,
        slot: u64,
    ) -> BlockResult<Arc<Node>>;
}

/// Layers that belong to no graph (offline tools, tests).
pub struct Unregistered;

impl Layers for Unregistered {
    fn reserve(&mut self) -> u64 {
        0
    }

    fn add(
        &mut self,
        _kind: Driver,
        driver: Arc<dyn BlockNode>,
        _slot: u64,
    ) -> BlockResult<Arc<Node>> {
        Ok(Arc::new(Node::open("", driver)?))
    }
}

/// Opens `path` (format probed when `None`) with its whole backing chain;
/// returns the top layer's driver (the caller makes it a node).
pub fn open_chain(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
) -> BlockResult<Arc<dyn BlockNode>> {
    let mut seen = Vec::new();
    let (_, driver, _) = open_layer(path, format, read_only, 0, &mut seen, &mut Unregistered)?;
    Ok(driver)
}

/// Opens the backing chain `top`'s header names, each layer a node of
/// `layers`, and attaches it (qemu's default when `backing` is absent).
pub fn open_backing(top: &mut Qcow2Node, layers: &mut dyn Layers) -> BlockResult<()> {
    let mut seen = Vec::new();
    if let Ok(md) = std::fs::metadata(top.path()) {
        seen.push((md.dev(), md.ino()));
    }
    attach_backing(top, 0, &mut seen, layers)
}

fn open_layer(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
    layers: &mut dyn Layers,
) -> BlockResult<(Format, Arc<dyn BlockNode>, u64)> {
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
    let file_slot = layers.reserve();
    let file = layers.open_file(path, read_only)?;
    let file = layers.add(Driver::File, Arc::new(file), file_slot)?;
    let slot = layers.reserve();
    let driver: Arc<dyn BlockNode> = match format {
        Format::Raw => Arc::new(RawFormat::new(file, read_only)),
        Format::Qcow2 => {
            let mut node = Qcow2Node::open_on(file, read_only)?;
            attach_backing(&mut node, depth, seen, layers)?;
            Arc::new(node)
        }
    };
    Ok((format, driver, slot))
}

fn attach_backing(
    node: &mut Qcow2Node,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
    layers: &mut dyn Layers,
) -> BlockResult<()> {
    let Some(bpath) = node.backing_path() else {
        return Ok(());
    };
    let bfmt = match node.backing_format().as_deref() {
        None => None,
        Some("raw") => Some(Format::Raw),
        Some("qcow2") => Some(Format::Qcow2),
        Some(other) => {
            return Err(BlockError::not_supported(format!(
                "'{}': backing format '{}' is not supported",
                node.path().display(),
                other
            )))
        }
    };
    let (fmt, driver, slot) =
        open_layer(&bpath, bfmt, true, depth + 1, seen, layers).map_err(|e| BlockError {
            context: format!("Could not open backing file: {}", e.context),
            ..e
        })?;
    let backing = layers.add(fmt.driver(), driver, slot)?;
    node.attach_backing(Some(backing));
    Ok(())
}
