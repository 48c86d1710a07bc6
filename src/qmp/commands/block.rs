//! The block graph over QMP: blockdev-add (file, raw and qcow2 nodes, the
//! `file` child given by name or nested), blockdev-del, and the queries.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::bitmap::set::lock;
use crate::block::file::FileNode;
use crate::block::node::Node;
use crate::block::open::{open_image, Format};
use crate::block::raw::{FileView, RawFormat};
use crate::block::BlockNode;
use crate::daemon::{allocated_size, BlockDev, Daemon};
use crate::qmp::error::{QmpError, QmpResult};

pub fn blockdev_add(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    open_node(d, &args, true, false)?;
    Ok(json!({}))
}

/// Opens the node `opts` describes (and its nested children), adds it to
/// the graph and returns its name. A child inherits read-only from its
/// parent unless it says otherwise.
fn open_node(
    d: &Daemon,
    opts: &Map<String, Value>,
    root: bool,
    inherited_ro: bool,
) -> QmpResult<String> {
    let driver = opts.get("driver").and_then(Value::as_str).unwrap_or("");
    let read_only = opts
        .get("read-only")
        .and_then(Value::as_bool)
        .unwrap_or(inherited_ro);
    let name = match opts.get("node-name").and_then(Value::as_str) {
        Some(n) => {
            d.check_new_node_name(n)?;
            n.to_owned()
        }
        None if root => {
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ))
        }
        None => d.auto_node_name(),
    };
    let (driver_name, filename, file_child, node, file_id, image_extra) = match driver {
        "file" => {
            let filename =
                PathBuf::from(opts.get("filename").and_then(Value::as_str).unwrap_or(""));
            let (file, id) = open_file(d, &filename, read_only)?;
            let node = Node::open(&name, file)?;
            ("file", filename, None, node, id, None)
        }
        "raw" | "qcow2" => {
            let (child, created) = child(d, opts.get("file"), read_only)?;
            let opened = if driver == "raw" {
                open_raw(d, &name, &child, read_only)
            } else {
                open_qcow2(d, &name, &child, read_only)
            };
            match opened {
                Ok((drv, filename, node, extra)) => (drv, filename, Some(child), node, None, extra),
                Err(e) => {
                    if created {
                        // The nested child was only for this node.
                        let _ = d.delete_implicit(&child);
                    }
                    return Err(e);
                }
            }
        }
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'driver' does not accept value '{other}'"
            )))
        }
    };
    let loaded_bitmaps = node.bitmaps().all();
    d.insert_node(BlockDev {
        name: name.clone(),
        driver: driver_name,
        filename,
        file_child,
        node: Arc::new(node),
        monitor_owned: root,
        file_id,
        image_extra,
        loaded_bitmaps,
    })?;
    Ok(name)
}

type Opened = (&'static str, PathBuf, Node, Option<Value>);

/// A host file's (device, inode).
type FileId = (u64, u64);

/// Opens a host file for a `file` node. A file another node of this daemon
/// already holds is shared (qemu-storage-daemon lets several nodes open one
/// file; tidemark's image locks would otherwise refuse the second open).
fn open_file(
    d: &Daemon,
    path: &std::path::Path,
    read_only: bool,
) -> QmpResult<(Arc<dyn BlockNode>, Option<FileId>)> {
    use std::os::unix::fs::MetadataExt;
    let id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    if let Some((shared, shared_ro)) = id.and_then(|id| d.open_file(id)) {
        if read_only || !shared_ro {
            return Ok((Arc::new(RawFormat::new(shared, read_only)), None));
        }
    }
    let f = FileNode::open(path, read_only)?;
    Ok((Arc::new(f), id))
}

fn open_raw(d: &Daemon, name: &str, child: &str, read_only: bool) -> QmpResult<Opened> {
    let (filename, child_node) = d.child_info(child)?;
    let driver = Arc::new(RawFormat::new(child_node, read_only));
    Ok(("raw", filename, Node::open(name, driver)?, None))
}

/// qcow2 opens (and locks) the image itself, so the `file` child's own
/// open file is closed first and the child becomes an unlocked read-only
/// view of the same file; if the qcow2 open fails, the child gets its file
/// back.
fn open_qcow2(d: &Daemon, name: &str, child: &str, read_only: bool) -> QmpResult<Opened> {
    let (filename, child_ro) = {
        let (f, n) = d.child_info(child)?;
        (f, n.read_only())
    };
    let view = Node::open(child, Arc::new(FileView::open(&filename, child_ro)?))?;
    let old = d.replace_node(child, Arc::new(view))?;
    drop(old);
    // Read while nothing holds the image: the header details that
    // query-named-block-nodes shows, in qemu-img info's form.
    let extra = crate::info::image_info(&filename, Some(Format::Qcow2))
        .ok()
        .and_then(|i| serde_json::to_value(i).ok());
    match open_image(&filename, Some(Format::Qcow2), read_only) {
        Ok(driver) => Ok(("qcow2", filename.clone(), Node::open(name, driver)?, extra)),
        Err(e) => {
            let restored = FileNode::open(&filename, child_ro)
                .map_err(QmpError::from)
                .and_then(|f| Node::open(child, Arc::new(f)).map_err(QmpError::from))
                .and_then(|n| d.replace_node(child, Arc::new(n)));
            if let Err(r) = restored {
                tracing::warn!(node = child, error = %r, "could not reopen the file node");
            }
            Err(e.into())
        }
    }
}

/// Resolves a `file` member: a node-name, or a nested definition opened
/// now. Returns the child's name and whether it was created here.
fn child(d: &Daemon, file: Option<&Value>, read_only: bool) -> QmpResult<(String, bool)> {
    match file {
        Some(Value::String(name)) => {
            d.node(name)?;
            Ok((name.clone(), false))
        }
        Some(Value::Object(m)) => Ok((open_node(d, m, false, read_only)?, true)),
        _ => Err(QmpError::generic("Parameter 'file' is missing")),
    }
}

pub fn blockdev_del(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let name = args.get("node-name").and_then(Value::as_str).unwrap_or("");
    d.delete_node(name)?;
    Ok(json!({}))
}

/// query-named-block-nodes: every node, newest first, with the fields
/// qemu-storage-daemon shows for the same node (throttling is always 0:
/// tidemark has none).
pub fn query_named_block_nodes(d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    let list = d.with_nodes(|nodes| nodes.map(node_info).collect::<Vec<_>>());
    Ok(Value::Array(list))
}

fn node_info(dev: &BlockDev) -> Value {
    let filename = dev.filename.display().to_string();
    let format = dev.driver;
    // qemu measures protocol and raw nodes in whole sectors.
    let virtual_size = match format {
        "qcow2" => dev.node.size(),
        _ => dev.node.size().div_ceil(512) * 512,
    };
    let mut image = json!({
        "virtual-size": virtual_size,
        "filename": filename,
        "format": format,
        "dirty-flag": false,
    });
    if let Some(a) = allocated_size(&dev.filename) {
        image["actual-size"] = json!(a);
    }
    if format == "file" {
        image["format-specific"] = json!({"type": "file", "data": {}});
    }
    for key in [
        "cluster-size",
        "format-specific",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
    ] {
        if let Some(v) = dev.image_extra.as_ref().and_then(|e| e.get(key)) {
            image[key] = v.clone();
        }
    }
    on_disk_bitmaps(dev, &mut image);
    let mut info = json!({
        "iops_rd": 0, "detect_zeroes": "off", "active": true, "image": image,
        "iops_wr": 0, "ro": dev.node.read_only(), "node-name": dev.name,
        "backing_file_depth": 0, "drv": format, "iops": 0, "bps_wr": 0,
        "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": false, "direct": false, "writeback": true},
        "file": filename,
    });
    let bitmaps: Vec<Value> = dev
        .node
        .bitmaps()
        .all()
        .iter()
        .rev()
        .map(|b| {
            let g = lock(b);
            let mut v = json!({
                "name": g.name(), "recording": g.state.recording,
                "persistent": g.state.persistent, "busy": g.state.busy,
                "granularity": g.granularity(), "count": g.count(),
            });
            if g.state.inconsistent {
                v["inconsistent"] = json!(true);
            }
            v
        })
        .collect();
    if !bitmaps.is_empty() {
        info["dirty-bitmaps"] = Value::Array(bitmaps);
    }
    info
}

/// qcow2's `format-specific.bitmaps` is the image's bitmap directory. It
/// was read before the node opened; what qemu shows since: a read-write
/// open marks every stored bitmap in use, a removed one is gone, and one
/// added since is only written at close.
fn on_disk_bitmaps(dev: &BlockDev, image: &mut Value) {
    // `get_mut`, not indexing: IndexMut would insert the missing keys.
    let Some(list) = image
        .get_mut("format-specific")
        .and_then(|f| f.get_mut("data"))
        .and_then(|d| d.get_mut("bitmaps"))
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let live = dev.node.bitmaps();
    list.retain(|b| {
        let live = b["name"].as_str().and_then(|n| live.get(n));
        live.is_some_and(|l| dev.loaded_bitmaps.iter().any(|x| Arc::ptr_eq(x, &l)))
    });
    if !dev.node.read_only() {
        for b in list.iter_mut() {
            if let Some(flags) = b["flags"].as_array_mut() {
                if !flags.iter().any(|f| f == "in-use") {
                    flags.insert(0, json!("in-use"));
                }
            }
        }
    }
    if list.is_empty() {
        if let Some(data) = image
            .get_mut("format-specific")
            .and_then(|f| f.get_mut("data"))
            .and_then(Value::as_object_mut)
        {
            data.remove("bitmaps");
        }
    }
}

/// query-block lists BlockBackends with a device name; a storage daemon
/// has none (qemu-storage-daemon returns an empty list too).
pub fn query_block(_d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    Ok(json!([]))
}
