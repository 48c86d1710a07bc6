//! The block graph over QMP: blockdev-add (file, raw and qcow2 nodes; the
//! `file` and `backing` children given by name, nested, `null`, or, for
//! `backing`, opened from the image header), blockdev-del, blockdev-reopen,
//! the queries, and the test hooks that insert and remove a pass-through
//! filter (the graph's replacement path).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::bitmap::set::lock;
use crate::block::chain::{self, Layers};
use crate::block::file::FileNode;
use crate::block::filter::{Filter, FilterKind};
use crate::block::link::ChildRole;
use crate::block::node::Node;
use crate::block::open::Driver;
use crate::block::qcow2::create::{create_qcow2, create_raw, CreateOptions};
use crate::block::qcow2::Qcow2Node;
use crate::block::raw::RawFormat;
use crate::block::{BlockNode, BlockResult};
use crate::daemon::{Daemon, GraphNode};
use crate::qmp::error::{QmpError, QmpResult};

pub fn blockdev_add(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let mut op = Opening {
        d,
        created: Vec::new(),
    };
    // The image locks follow the new node's needs; another process
    // holding a conflicting lock makes the whole add fail.
    let added = op.open_node(&args, true, false).and_then(|n| {
        d.refresh_locks()
            .inspect_err(|_| {
                let _ = d.delete_node(n.name());
            })
            .map(|_| n)
    });
    match added {
        Ok(n) => {
            super::session::roll_back_pending(d, &n);
            Ok(json!({}))
        }
        Err(e) => {
            // Implicit nodes made for this node go with it, newest first.
            for n in op.created.iter().rev() {
                d.delete_implicit(n);
            }
            Err(e)
        }
    }
}

/// One blockdev-add in progress: the implicit nodes it has made so far.
struct Opening<'a> {
    d: &'a Daemon,
    created: Vec<Arc<Node>>,
}

/// A node opened but not yet in the graph.
struct Opened {
    driver: Driver,
    drv: Arc<dyn BlockNode>,
    image_extra: Option<Value>,
    auto_backing: Option<String>,
}

impl Opened {
    fn new(driver: Driver, drv: Arc<dyn BlockNode>) -> Opened {
        Opened {
            driver,
            drv,
            image_extra: None,
            auto_backing: None,
        }
    }
}

impl Layers for Opening<'_> {
    fn reserve(&mut self) -> u64 {
        self.d.reserve_slot()
    }

    fn open_file(&mut self, path: &Path, read_only: bool) -> BlockResult<FileNode> {
        FileNode::open_unlocked(path, read_only)
    }

    fn add(
        &mut self,
        kind: Driver,
        driver: Arc<dyn BlockNode>,
        slot: u64,
    ) -> BlockResult<Arc<Node>> {
        let name = self.d.auto_node_name();
        let mut opened = Opened::new(kind, driver);
        opened.image_extra = opened.drv.image_info();
        // A layer of a chain opened from the header stands for the layer
        // it opened below it.
        opened.auto_backing = opened
            .drv
            .children()
            .iter()
            .find(|c| c.role == ChildRole::Backing)
            .and_then(|c| c.node().filename())
            .map(|p| p.display().to_string());
        self.register(name, opened, false, slot)
            .map_err(|e| crate::block::BlockError::invalid(e.desc))
    }
}

impl Opening<'_> {
    /// Opens the node `opts` describes (and its nested children), adds it
    /// to the graph and returns it. A child inherits read-only from its
    /// parent unless it says otherwise.
    fn open_node(
        &mut self,
        opts: &Map<String, Value>,
        root: bool,
        inherited_ro: bool,
    ) -> QmpResult<Arc<Node>> {
        let driver = opts.get("driver").and_then(Value::as_str).unwrap_or("");
        let read_only = opts
            .get("read-only")
            .and_then(Value::as_bool)
            .unwrap_or(inherited_ro);
        let name = match opts.get("node-name").and_then(Value::as_str) {
            Some(n) => {
                self.d.check_new_node_name(n)?;
                n.to_owned()
            }
            None if root => {
                return Err(QmpError::generic(
                    "'node-name' must be specified for the root node",
                ))
            }
            None => self.d.auto_node_name(),
        };
        let (opened, slot) = match driver {
            "file" => {
                let filename = opts.get("filename").and_then(Value::as_str).unwrap_or("");
                let slot = self.d.reserve_slot();
                // Its locks come with its users (see Daemon::refresh_locks).
                let f = FileNode::open_unlocked(Path::new(filename), read_only)?;
                (Opened::new(Driver::File, Arc::new(f)), slot)
            }
            "raw" => {
                let file = self.child(opts.get("file"), read_only)?;
                let slot = self.d.reserve_slot();
                let drv = Arc::new(RawFormat::new(file, read_only));
                (Opened::new(Driver::Raw, drv), slot)
            }
            "qcow2" => {
                let file = self.child(opts.get("file"), read_only)?;
                let slot = self.d.reserve_slot();
                let mut q = Qcow2Node::open_on(file, read_only)?;
                let auto_backing = self.backing(&mut q, opts.get("backing"))?;
                let mut o = Opened::new(Driver::Qcow2, Arc::new(q));
                o.image_extra = o.drv.image_info();
                o.auto_backing = auto_backing;
                (o, slot)
            }
            "null-co" => {
                let slot = self.d.reserve_slot();
                let drv = crate::block::null::from_options(opts, read_only)?;
                (Opened::new(Driver::NullCo, drv), slot)
            }
            "copy-before-write" => {
                let slot = self.d.reserve_slot();
                let file = self.child(opts.get("file"), read_only)?;
                let target = self.child_named("target", opts.get("target"), false)?;
                let drv = cbw_from_options(self.d, opts, file, target)?;
                (Opened::new(Driver::CopyBeforeWrite, drv), slot)
            }
            "snapshot-access" => {
                let slot = self.d.reserve_slot();
                let file = self.child(opts.get("file"), true)?;
                let drv = crate::block::snapshot_access::SnapshotAccess::new(file)?;
                (Opened::new(Driver::SnapshotAccess, Arc::new(drv)), slot)
            }
            "blkdebug" => {
                // A filter driver opens its child itself, after qemu named
                // the node: its place comes first.
                let slot = self.d.reserve_slot();
                let image = self.child(opts.get("image"), read_only)?;
                let drv = crate::block::blkdebug::from_options(opts, image, read_only)?;
                (Opened::new(Driver::Blkdebug, drv), slot)
            }
            other => {
                return Err(QmpError::generic(format!(
                    "Parameter 'driver' does not accept value '{other}'"
                )))
            }
        };
        self.register(name, opened, root, slot)
    }

    fn register(&mut self, name: String, o: Opened, root: bool, slot: u64) -> QmpResult<Arc<Node>> {
        let node = Arc::new(Node::open(name, o.drv)?);
        self.d.insert_node(GraphNode {
            node: node.clone(),
            driver: o.driver,
            slot,
            auto_backing: o.auto_backing,
            monitor_owned: root,
            named_by_options: false,
            implicit_filter: false,
            image_extra: o.image_extra,
            loaded_bitmaps: node.bitmaps().all(),
        })?;
        if !root {
            self.created.push(node.clone());
        }
        Ok(node)
    }

    /// Resolves a `file` member: a node-name, or a nested definition
    /// opened now.
    fn child(&mut self, file: Option<&Value>, read_only: bool) -> QmpResult<Arc<Node>> {
        self.child_named("file", file, read_only)
    }

    /// Resolves a child member `key`: a node-name, or a nested definition
    /// opened now.
    fn child_named(
        &mut self,
        key: &str,
        v: Option<&Value>,
        read_only: bool,
    ) -> QmpResult<Arc<Node>> {
        match v {
            Some(Value::String(name)) => self.d.node(name),
            Some(Value::Object(m)) => self.open_node(m, false, read_only),
            _ => Err(QmpError::generic(format!("Parameter '{key}' is missing"))),
        }
    }

    /// Attaches the `backing` member: absent opens the chain the header
    /// names (every layer a node), `null` means none, a string names a
    /// node, an object is a nested definition (read-only by default, as
    /// qemu opens backing files). Returns qemu's `auto_backing_file`: the
    /// opened layer's name for a chain from the header, else the header's
    /// name as written.
    fn backing(&mut self, q: &mut Qcow2Node, backing: Option<&Value>) -> QmpResult<Option<String>> {
        match backing {
            None => {
                chain::open_backing(q, self)?;
                let opened = q.below_node().and_then(|b| b.filename());
                return Ok(opened.map(|p| p.display().to_string()));
            }
            Some(Value::Null) => return Ok(q.backing_file()),
            Some(Value::String(name)) => {
                let b = self.d.node(name)?;
                check_backing(q, &b)?;
                q.attach_backing(Some(b));
            }
            Some(Value::Object(m)) => {
                let b = self.open_node(m, false, true)?;
                q.attach_backing(Some(b));
            }
            Some(_) => return Err(QmpError::generic("Invalid parameter type for 'backing'")),
        }
        Ok(q.backing_file())
    }
}

/// A copy-before-write node of its own (qemu's fleecing filter): it copies
/// every cluster, or those of `bitmap`, before a write changes them.
fn cbw_from_options(
    d: &Daemon,
    opts: &Map<String, Value>,
    file: Arc<Node>,
    target: Arc<Node>,
) -> QmpResult<Arc<dyn BlockNode>> {
    use crate::block::cbw::{CopyBeforeWrite, OnCbwError};
    let on_error: OnCbwError = match opts.get("on-cbw-error") {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| QmpError::generic(format!("Invalid parameter 'on-cbw-error': {e}")))?,
        None => OnCbwError::default(),
    };
    // qemu's block-copy cluster: the target's, at least 64 KiB, at least
    // min-cluster-size.
    let min = opts
        .get("min-cluster-size")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if min != 0 && !min.is_power_of_two() {
        return Err(QmpError::generic(
            "Cannot create block-copy-state: min-cluster-size needs to be a power of 2",
        ));
    }
    let cluster = (64u64 << 10).max(target.cluster_size()).max(min);
    let size = file.size();
    let mut todo = crate::bitmap::DirtyBitmap::anonymous(size, cluster)?;
    match opts.get("bitmap") {
        Some(b) => {
            let node = b.get("node").and_then(Value::as_str).unwrap_or("");
            let name = b.get("name").and_then(Value::as_str).unwrap_or("");
            let (_, bm) = super::bitmap::lookup(d, node, name)?;
            todo.merge(&lock(&bm)).map_err(|e| {
                QmpError::generic(format!(
                    "Cannot create block-copy-state: Failed to merge bitmap '{name}' to internal copy-bitmap: {}",
                    e.message
                ))
            })?;
        }
        None => todo.set_range(0, size)?,
    }
    Ok(Arc::new(
        CopyBeforeWrite::new(file, target, todo, false).on_error(on_error),
    ))
}

/// qemu's conditions on an existing node given as `backing`.
fn check_backing(q: &Qcow2Node, b: &Arc<Node>) -> QmpResult<()> {
    if b.filename().as_deref() == Some(q.path()) {
        return Err(QmpError::generic(format!(
            "Making '{}' a backing child of '{}' would create a cycle",
            b.name(),
            q.path().display()
        )));
    }
    Ok(())
}

pub fn blockdev_del(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let name = args.get("node-name").and_then(Value::as_str).unwrap_or("");
    d.delete_node(name)?;
    Ok(json!({}))
}

/// blockdev-reopen: each listed node switches to the `read-only` it is
/// given (qemu resets an absent option to its default: read-write). An
/// implicit `file` child follows its parent; a named one keeps its own
/// option (reopen it in the same call to make it writable). All or
/// nothing: a failure puts back what was changed. The image locks then
/// follow the new read-only states.
pub fn blockdev_reopen(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let list = args
        .get("options")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if list.is_empty() {
        // qsd 10.0.2 aborts on an empty list; refuse it instead.
        return Err(QmpError::generic("Parameter 'options' must not be empty"));
    }
    let mut plan = Vec::new();
    for (i, opts) in list.iter().enumerate() {
        plan.push(reopen_target(d, i, opts)?);
    }
    // Becoming writable goes bottom-up (a format node over a file node
    // reopened in the same call finds it writable), becoming read-only
    // top-down (a file node loses its read-write parent first).
    plan.sort_by_key(|&(_, drv, ro)| (ro, (drv == Driver::File) == ro));
    let mut done: Vec<(Arc<Node>, bool)> = Vec::new();
    let mut result = Ok(());
    for (node, _, read_only) in &plan {
        result = reopen_node(d, node, *read_only, &mut done);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = d.refresh_locks();
    }
    if let Err(e) = result {
        for (node, before) in done.into_iter().rev() {
            let _ = node.reopen(before);
        }
        d.relock();
        return Err(e);
    }
    Ok(json!({}))
}

/// One entry of blockdev-reopen, checked as qemu checks it: the node, its
/// driver, and its new read-only state.
fn reopen_target(d: &Daemon, i: usize, opts: &Value) -> QmpResult<(Arc<Node>, Driver, bool)> {
    let Some(name) = opts.get("node-name").and_then(Value::as_str) else {
        return Err(QmpError::generic("node-name not specified"));
    };
    let node = d
        .find_node(name)
        .ok_or_else(|| QmpError::generic(format!("Failed to find node with node-name='{name}'")))?;
    let driver = d.driver_of(name).unwrap_or(Driver::File);
    if opts.get("driver").and_then(Value::as_str) != Some(driver.name()) {
        return Err(QmpError::generic("Cannot change the option 'driver'"));
    }
    if driver == Driver::File {
        let filename = opts
            .get("filename")
            .and_then(Value::as_str)
            .map(PathBuf::from);
        if filename != node.filename() {
            return Err(QmpError::generic("Cannot change the option 'filename'"));
        }
    }
    if let Some(file) = node.child(ChildRole::File) {
        match opts.get("file") {
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter 'options[{i}].file' is missing"
                )))
            }
            Some(Value::String(f)) if f == name => {
                return Err(QmpError::generic(format!(
                    "Making '{name}' a file child of '{name}' would create a cycle"
                )))
            }
            Some(Value::String(f)) => {
                let given = d.node(f).map_err(|_| {
                    QmpError::generic(format!("Cannot find device='' nor node-name='{f}'"))
                })?;
                if !Arc::ptr_eq(&given, &file) {
                    return Err(QmpError::generic("Cannot change the option 'file'"));
                }
            }
            Some(_) => {}
        }
    }
    if node.child(ChildRole::Backing).is_some() && opts.get("backing").is_none() {
        return Err(QmpError::generic(format!(
            "backing is missing for '{name}'"
        )));
    }
    let read_only = opts
        .get("read-only")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok((node, driver, read_only))
}

fn reopen_node(
    d: &Daemon,
    node: &Arc<Node>,
    read_only: bool,
    done: &mut Vec<(Arc<Node>, bool)>,
) -> QmpResult<()> {
    if read_only && !node.read_only() {
        d.check_no_writers(node)?;
    }
    reopen_with_file(d, node, read_only, done)
}

/// Reopens `node` (and its implicit `file` child with it), recording in
/// `done` what changed so a caller can put it back.
pub fn reopen_with_file(
    d: &Daemon,
    node: &Arc<Node>,
    read_only: bool,
    done: &mut Vec<(Arc<Node>, bool)>,
) -> QmpResult<()> {
    let file = node.child(ChildRole::File);
    let implicit_file = file.as_ref().filter(|f| d.is_implicit(f));
    if !read_only {
        if let Some(f) = implicit_file {
            reopen_one(f, false, done)?;
        }
        if file.as_ref().is_some_and(|f| f.read_only()) {
            return Err(QmpError::generic("Block node is read-only"));
        }
    }
    reopen_one(node, read_only, done)?;
    if read_only {
        if let Some(f) = implicit_file {
            if d.check_no_writers(f).is_ok() {
                reopen_one(f, true, done)?;
            }
        }
    }
    Ok(())
}

fn reopen_one(
    node: &Arc<Node>,
    read_only: bool,
    done: &mut Vec<(Arc<Node>, bool)>,
) -> QmpResult<()> {
    let before = node.read_only();
    if before == read_only {
        return Ok(());
    }
    node.reopen(read_only)
        .map_err(|e| QmpError::generic(e.context))?;
    done.push((node.clone(), before));
    Ok(())
}

/// x-tidemark-insert-filter (test hook): puts a pass-through filter named
/// `filter-node-name` above `node`; every parent and export moves onto it.
pub fn insert_filter(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let arg = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or("");
    let node = d.node(arg("node"))?;
    let drv = Arc::new(Filter::new(FilterKind::Passthrough, node.clone()));
    d.insert_filter(
        &node,
        Some(arg("filter-node-name")),
        Driver::Passthrough,
        drv,
        true,
    )?;
    Ok(json!({}))
}

/// x-tidemark-remove-filter (test hook): takes a pass-through filter out
/// again; its parents and exports move back onto its child.
pub fn remove_filter(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let name = args.get("node").and_then(Value::as_str).unwrap_or("");
    let filter = d.node(name)?;
    if d.driver_of(name) != Some(Driver::Passthrough) {
        return Err(QmpError::generic(format!(
            "Node '{name}' is not a pass-through filter"
        )));
    }
    let child = filter
        .child(ChildRole::Filtered)
        .ok_or_else(|| QmpError::generic(format!("Filter '{name}' has no child")))?;
    d.replace_node(&filter, &child);
    d.delete_node(name)?;
    Ok(json!({}))
}

/// query-named-block-nodes: every node, newest first, with the fields
/// qemu-storage-daemon shows for the same node (throttling is always 0:
/// tidemark has none). `flat` leaves out the nested backing images.
pub fn query_named_block_nodes(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let flat = args.get("flat").and_then(Value::as_bool).unwrap_or(false);
    let list = d.with_nodes(|nodes| {
        let all: Vec<&GraphNode> = nodes.collect();
        all.iter()
            .map(|g| node_info(g, &all, flat))
            .collect::<Vec<_>>()
    });
    Ok(Value::Array(list))
}

fn entry<'a>(all: &[&'a GraphNode], node: &Arc<Node>) -> Option<&'a GraphNode> {
    all.iter().copied().find(|g| Arc::ptr_eq(&g.node, node))
}

/// How qemu names a node: its host file's name when its options are what
/// the image itself implies, else `json:` and its options (drivers and
/// children, keys sorted, no node names), e.g. a qcow2 whose backing was
/// given as another node. Returns the options and whether the plain name
/// stands for them.
fn describe(g: &GraphNode, all: &[&GraphNode]) -> (Value, bool) {
    let child = |role| {
        g.node
            .child(role)
            .and_then(|c| entry(all, &c))
            .map(|c| describe(through_implicit(c, all), all))
    };
    let mut opts = Map::new();
    opts.insert("driver".into(), json!(g.driver.name()));
    let mut plain = !g.named_by_options;
    match g.driver {
        Driver::File => {
            let f = g.node.filename().unwrap_or_default();
            opts.insert("filename".into(), json!(f.display().to_string()));
        }
        _ => {
            let role = if g.driver.is_filter() {
                ChildRole::Filtered
            } else {
                ChildRole::File
            };
            if let Some((o, p)) = child(role) {
                opts.insert("file".into(), o);
                plain &= p;
            }
            if backing_overridden(g, all) {
                let b = child(ChildRole::Backing).map_or(Value::Null, |(o, _)| o);
                opts.insert("backing".into(), b);
                plain = false;
            }
        }
    }
    (Value::Object(opts), plain)
}

/// A job's unnamed filter stands for the node it filters (qemu skips
/// implicit nodes when it describes a chain).
fn through_implicit<'a>(g: &'a GraphNode, all: &[&'a GraphNode]) -> &'a GraphNode {
    let mut g = g;
    for _ in 0..crate::block::chain::MAX_CHAIN_DEPTH {
        if !g.implicit_filter {
            break;
        }
        match g
            .node
            .child(ChildRole::Filtered)
            .and_then(|c| entry(all, &c))
        {
            Some(c) => g = c,
            None => break,
        }
    }
    g
}

/// qemu's `bs->filename` of `node`: what a snapshot, stream or commit
/// writes as a backing file name (a `json:` description where the plain
/// file name does not stand for the node).
pub fn qemu_filename(d: &Daemon, node: &Arc<Node>) -> String {
    d.with_nodes(|nodes| {
        let all: Vec<&GraphNode> = nodes.collect();
        match entry(&all, node) {
            Some(g) => display_name(g, &all),
            None => node
                .filename()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    })
}

/// qemu's bdrv_backing_overridden: the node's backing is not the one its
/// image stands for (then qemu names the node by its options).
fn backing_overridden(g: &GraphNode, all: &[&GraphNode]) -> bool {
    match g.node.child(ChildRole::Backing) {
        Some(b) => {
            let name = entry(all, &b).map(|e| display_name(through_implicit(e, all), all));
            g.auto_backing != name
        }
        None => g.auto_backing.is_some(),
    }
}

/// The name qemu shows as `file` and `image.filename`.
fn display_name(g: &GraphNode, all: &[&GraphNode]) -> String {
    // A filter's name is its child's, unless qemu names it by options.
    if g.driver.is_filter() && !g.named_by_options {
        if let Some(c) = g
            .node
            .child(ChildRole::Filtered)
            .and_then(|c| entry(all, &c))
        {
            return display_name(c, all);
        }
    }
    let (opts, plain) = describe(g, all);
    if plain {
        return g
            .node
            .filename()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
    }
    format!("json:{}", qemu_json(&opts))
}

/// JSON as qemu prints it in `json:` names: keys sorted, ", " and ": ".
fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let items: Vec<String> = keys
                .iter()
                .map(|k| format!("{}: {}", json!(k), qemu_json(&m[*k])))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// Layers below `node` in its backing chain.
fn backing_depth(node: &Arc<Node>) -> u64 {
    let mut depth = 0;
    let mut layer = node.child(ChildRole::Backing);
    while let Some(l) = layer {
        depth += 1;
        layer = l.child(ChildRole::Backing);
    }
    depth
}

fn node_info(g: &GraphNode, all: &[&GraphNode], flat: bool) -> Value {
    let filename = display_name(g, all);
    let image = image_info(g, all, flat);
    // qemu counts the depth only while it builds the nested images.
    let depth = if flat { 0 } else { backing_depth(&g.node) };
    let mut info = json!({
        "iops_rd": 0, "detect_zeroes": "off", "active": true, "image": image,
        "iops_wr": 0, "ro": g.node.read_only(), "node-name": g.name(),
        "backing_file_depth": depth, "drv": g.driver.name(), "iops": 0,
        "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": false, "direct": false, "writeback": true},
        "file": filename,
    });
    if let Some(b) = g
        .node
        .child(ChildRole::Backing)
        .and_then(|b| entry(all, &b))
    {
        info["backing_file"] = json!(display_name(b, all));
    }
    let recovered = g.node.driver().recovered_bitmaps();
    let bitmaps: Vec<Value> = g
        .node
        .bitmaps()
        .all()
        .iter()
        .rev()
        .map(|b| {
            let b = lock(b);
            let mut v = json!({
                "name": b.name(), "recording": b.state.recording,
                "persistent": b.state.persistent, "busy": b.state.busy,
                "granularity": b.granularity(), "count": b.count(),
            });
            if b.state.inconsistent {
                v["inconsistent"] = json!(true);
            }
            // tidemark's: recovered from the intent log at open, and by
            // how many bytes recovery added to what was stored.
            if let Some((_, added)) = recovered.iter().find(|(n, _)| n == b.name()) {
                v["x-tidemark-recovered-bytes"] = json!(added);
            }
            if b.name().is_empty() {
                // A backup's successor: qemu lists it without a name.
                if let Some(o) = v.as_object_mut() {
                    o.remove("name");
                }
            }
            v
        })
        .collect();
    if !bitmaps.is_empty() {
        info["dirty-bitmaps"] = Value::Array(bitmaps);
    }
    info
}

/// The `image` member: qemu-img info's view of the node, with the backing
/// node's as `backing-image` (unless `flat`).
fn image_info(g: &GraphNode, all: &[&GraphNode], flat: bool) -> Value {
    let node = &g.node;
    let filename = display_name(g, all);
    // qemu measures protocol and raw nodes in whole sectors.
    let virtual_size = match g.driver {
        Driver::Qcow2 => node.size(),
        _ => node.size().div_ceil(512) * 512,
    };
    let mut image = json!({
        "virtual-size": virtual_size,
        "filename": filename,
        "format": g.driver.name(),
    });
    if g.driver != Driver::SnapshotAccess {
        // qemu asks the driver; snapshot-access has no answer.
        image["dirty-flag"] = json!(false);
    }
    if let Some(a) = node.allocated_size() {
        image["actual-size"] = json!(a);
    }
    if g.driver == Driver::File {
        image["format-specific"] = json!({"type": "file", "data": {}});
    }
    if g.driver == Driver::CopyBeforeWrite {
        // qemu shows the filtered node's.
        image["cluster-size"] = json!(node.cluster_size());
    }
    for key in [
        "cluster-size",
        "format-specific",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
    ] {
        if let Some(v) = g.image_extra.as_ref().and_then(|e| e.get(key)) {
            image[key] = v.clone();
        }
    }
    on_disk_bitmaps(g, &mut image);
    if !flat {
        if let Some(b) = node.child(ChildRole::Backing).and_then(|b| entry(all, &b)) {
            image["backing-image"] = image_info(b, all, flat);
        }
    }
    image
}

/// qcow2's `format-specific.bitmaps` is the image's bitmap directory. It
/// was read when the node opened; what qemu shows since: a read-write
/// open marks every stored bitmap in use, a removed one is gone, and one
/// added since is only written at close.
fn on_disk_bitmaps(g: &GraphNode, image: &mut Value) {
    // `get_mut`, not indexing: IndexMut would insert the missing keys.
    let Some(list) = image
        .get_mut("format-specific")
        .and_then(|f| f.get_mut("data"))
        .and_then(|d| d.get_mut("bitmaps"))
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let live = g.node.bitmaps();
    list.retain(|b| {
        let live = b["name"].as_str().and_then(|n| live.get(n));
        live.is_some_and(|l| g.loaded_bitmaps.iter().any(|x| Arc::ptr_eq(x, &l)))
    });
    if !g.node.read_only() {
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

/// Opens the image at `path` as implicit nodes (a format node over a
/// `file` node, its backing chain from the header unless `backing` names
/// a node), as qemu opens a target drive-backup created.
/// Creates an image file as qemu's bdrv_img_create does for jobs and
/// snapshots: `format` qcow2 (with `backing`'s name and format as its
/// backing file) or raw, with qemu's refusals.
pub fn create_image(
    d: &Daemon,
    path: &Path,
    format: &str,
    size: u64,
    backing: Option<&Arc<Node>>,
) -> QmpResult<()> {
    let backing_file = backing.map(|b| qemu_filename(d, b));
    match format {
        "qcow2" => {}
        "raw" | "file" if backing.is_none() => return Ok(create_raw(path, size)?),
        "raw" | "file" => {
            return Err(QmpError::generic(format!(
                "Backing file not supported for file format '{format}'"
            )))
        }
        other => return Err(QmpError::generic(format!("Unknown file format '{other}'"))),
    }
    if backing_file.as_deref() == path.to_str() {
        return Err(QmpError::generic(
            "Error: Trying to create an image with the same filename as the backing file",
        ));
    }
    let opts = CreateOptions {
        size: Some(size),
        backing_format: backing
            .and_then(|b| d.driver_of(b.name()))
            .map(|k| k.name().to_owned()),
        backing_file,
        ..CreateOptions::default()
    };
    Ok(create_qcow2(path, &opts)?)
}

/// Opens an image file as an implicit node pair (format over file), as
/// jobs and snapshots open the images they create. `extra` adds
/// blockdev-add options of the format node (`node-name`, else it is
/// auto-named; `backing`, else the chain the header names; `read-only`).
pub fn open_image_node(
    d: &Daemon,
    path: &Path,
    format: Option<&str>,
    extra: Map<String, Value>,
) -> QmpResult<Arc<Node>> {
    let format = match format {
        Some(f) => f.to_owned(),
        None => crate::block::open::probe(path)?.name().to_owned(),
    };
    let opts = json!({
        "driver": format,
        "file": {"driver": "file", "filename": path},
    });
    let mut opts = opts.as_object().cloned().unwrap_or_default();
    opts.extend(extra);
    open_implicit(d, &opts)
}

/// Opens a node from blockdev-add options as an implicit node (pruned
/// once nothing uses it), with the implicit nodes under it.
pub fn open_implicit(d: &Daemon, opts: &Map<String, Value>) -> QmpResult<Arc<Node>> {
    let mut op = Opening {
        d,
        created: Vec::new(),
    };
    let opened = op.open_node(opts, false, false);
    let opened = opened.and_then(|n| d.refresh_locks().map(|_| n));
    if opened.is_err() {
        for n in op.created.iter().rev() {
            d.delete_implicit(n);
        }
    }
    opened
}

/// The image a `serve` names, as blockdev-add options: a format node
/// `drive0` over a `file` node (the one wiring `serve` and `daemon` share).
pub fn serve_options(image: &Path, format: &str, read_only: bool) -> Map<String, Value> {
    let v = json!({
        "driver": format,
        "node-name": "drive0",
        "read-only": read_only,
        "file": {"driver": "file", "filename": PathBuf::from(image)},
    });
    v.as_object().cloned().unwrap_or_default()
}
