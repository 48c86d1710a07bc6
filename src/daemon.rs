//! The shared state of a running daemon and its invariants: the block
//! graph (named nodes; their edges live in the drivers, see
//! [`crate::block::link`]), the roots that exports hold, the exports, the
//! one NBD server, and the event channel.
//!
//! Every front (QMP, the qsd-style command line, `serve`) changes the
//! state through these methods, so a rule such as "a node in use by an
//! export cannot be deleted" lives here once. "In use" is always a
//! question asked of the graph (parents and roots), never of a reference
//! count. Error texts are qemu's, word for word.
//!
//! Lock order: `state` is never held while a link is drained or a node
//! does I/O; bitmap locks are taken inside node operations only, in the
//! order of [`crate::bitmap::set::lock_all`].

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::bitmap::set::SharedBitmap;
use crate::block::link::{Child, ChildRole, Drained, Gate, Link, Root};
use crate::block::lock::LockMode;
use crate::block::node::Node;
use crate::block::open::Driver;
use crate::block::BlockNode;
use crate::event::{Event, EventKind};
use crate::job::Job;
use crate::nbd::budget::Pool;
use crate::nbd::export::{Export, ExportTable};
use crate::nbd::server::{Address, NbdServer};
use crate::qmp::error::{QmpError, QmpResult};
use crate::store_point::BitmapPolicy;

/// What a command is about to do with a node, for [`Daemon::check_op`]
/// (qemu's BlockOpType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    Snapshot,
    MirrorSource,
    MirrorTarget,
    CommitSource,
    CommitTarget,
    Stream,
    Replace,
    BackupSource,
    BackupTarget,
    Delete,
}

/// How long nbd-server-stop waits for the old server to let go of its
/// sockets before a new one may bind them.
const NBD_STOP_LIMIT: Duration = Duration::from_secs(10);

/// Events a lagging client may fall behind by before it loses some.
const EVENT_BACKLOG: usize = 1024;

/// One named node of the block graph.
pub struct GraphNode {
    /// The node (its name is the graph's name for it).
    pub node: Arc<Node>,
    pub driver: Driver,
    /// Its place in the graph's order (see [`Daemon::reserve_slot`]).
    pub slot: u64,
    /// qemu's `auto_backing_file`: the backing name the node's image
    /// stands for. A chain opened from the header stands for the layer it
    /// opened (its file name); a backing the user chose (a node, `null`)
    /// leaves the header's name as written. Where the actual backing's
    /// name differs, qemu describes the node by its options (a `json:`
    /// filename).
    pub auto_backing: Option<String>,
    /// Created by the user (blockdev-add, --blockdev) rather than implicitly
    /// (a nested child, a layer of a backing chain opened from the header):
    /// only those may be deleted with blockdev-del.
    pub monitor_owned: bool,
    /// qemu names the node by its options (`json:{...}`) even where its
    /// child's file name would do: a copy-on-read filter given a name.
    pub named_by_options: bool,
    /// A job's filter the user did not name (qemu's `implicit` node):
    /// descriptions of the nodes above it look through it.
    pub implicit_filter: bool,
    /// Format details for query-named-block-nodes' `image` (cluster-size,
    /// format-specific, backing names), read when the node was opened.
    pub image_extra: Option<Value>,
    /// The bitmaps loaded from the image at open: those qemu shows as
    /// stored in the image (new ones are written only at close).
    pub loaded_bitmaps: Vec<SharedBitmap>,
}

impl GraphNode {
    pub fn name(&self) -> &str {
        self.node.name()
    }
}

/// One block export, as query-block-exports lists it.
pub struct ExportRecord {
    pub id: String,
    /// The NBD export name clients ask for.
    pub name: String,
    pub export: Arc<Export>,
}

struct NbdRunning {
    stop: watch::Sender<bool>,
    /// The accepting task, once started.
    task: Option<tokio::task::JoinHandle<()>>,
    /// A server bound but not yet accepting (see [`Daemon::start_nbd`]).
    pending: Option<(NbdServer, watch::Receiver<bool>)>,
}

#[derive(Default)]
struct State {
    /// In creation order; queries list the newest first, as qemu.
    nodes: Vec<GraphNode>,
    /// Every root handed out; dead ones are pruned as they are found.
    roots: Vec<Weak<Root>>,
    /// In creation order; queries list the newest first, as qemu.
    exports: Vec<ExportRecord>,
    /// Counter for implicit node names (`#block001`).
    next_auto: u64,
    /// Counter for [`GraphNode::slot`].
    next_slot: u64,
    /// The running server's connection limit, when one runs.
    nbd_max_connections: Option<Option<usize>>,
    /// How clients reach the running server: its first address as an NBD
    /// URI prefix (`nbd+unix:///` + name + `?socket=...`, `nbd://host:port/`).
    nbd_uri: Option<(String, String)>,
    /// Set when the daemon is closing: no command may change anything.
    closing: bool,
}

impl State {
    fn find(&self, name: &str) -> Option<&GraphNode> {
        self.nodes.iter().find(|n| n.name() == name)
    }

    fn live_roots(&mut self) -> Vec<Arc<Root>> {
        self.roots.retain(|r| r.strong_count() > 0);
        self.roots.iter().filter_map(Weak::upgrade).collect()
    }

    /// The graph nodes with a child edge to `node`, with the edge's role.
    fn parents(&self, node: &Arc<Node>) -> Vec<(Arc<Node>, ChildRole)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            for c in n.node.children() {
                if c.link.points_at(node) {
                    out.push((n.node.clone(), c.role));
                }
            }
        }
        out
    }
}

pub struct Daemon {
    state: Mutex<State>,
    nbd: tokio::sync::Mutex<Option<NbdRunning>>,
    /// Serialises commands across all monitors, as qemu's big lock does: a
    /// transaction sees no other command between its prepare and commit,
    /// and no command runs once the daemon is closing.
    pub command_lock: Arc<tokio::sync::Mutex<()>>,
    exports: ExportTable,
    /// Jobs, newest first (query-jobs' order). Never held with `state`.
    jobs: Mutex<Vec<Arc<Job>>>,
    events: broadcast::Sender<Event>,
    quit: watch::Sender<bool>,
    /// The drain of every root (see [`Gate`]).
    gate: Arc<Gate>,
    /// Pull-backup sessions (tidemark's extension).
    sessions: crate::qmp::commands::session::Sessions,
    /// Itself, for what must outlive a command (a job's thread).
    me: Weak<Daemon>,
    /// Seconds between periodic store points (crate::store_point).
    store_interval: std::sync::atomic::AtomicU64,
    /// `--nbd-memory`: the NBD server's pool for in-flight requests.
    nbd_memory: std::sync::atomic::AtomicUsize,
    /// object-add's objects: secrets, TLS credentials, authorization.
    pub objects: Arc<crate::object::Objects>,
}

/// How long a safe block-export-del waits for connections that are
/// winding down.
const EXPORT_IDLE_GRACE: Duration = Duration::from_secs(1);

fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

impl Daemon {
    pub fn new() -> Arc<Daemon> {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (quit, _) = watch::channel(false);
        let d = Arc::new_cyclic(|me| Daemon {
            me: me.clone(),
            gate: Arc::new(Gate::default()),
            sessions: Default::default(),
            state: Mutex::new(State::default()),
            nbd: tokio::sync::Mutex::new(None),
            command_lock: Default::default(),
            exports: ExportTable::new(),
            jobs: Mutex::new(Vec::new()),
            events,
            quit,
            store_interval: crate::store_point::DEFAULT_STORE_INTERVAL.into(),
            nbd_memory: crate::nbd::budget::DEFAULT_POOL.into(),
            objects: Default::default(),
        });
        crate::store_point::start_timer(&d);
        crate::qmp::commands::session::sweep_stale_scratch();
        d
    }

    /// Sets how persistent bitmaps are kept; before images are opened.
    pub fn set_bitmap_policy(&self, p: BitmapPolicy) {
        crate::block::qcow2::intent::set_enabled(p.intent_log);
        self.store_interval
            .store(p.store_interval, std::sync::atomic::Ordering::Relaxed);
    }

    /// The size of the NBD server's memory pool; before it starts.
    pub fn set_nbd_memory(&self, bytes: usize) {
        self.nbd_memory
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Seconds between periodic store points; 0 for none.
    pub fn store_interval(&self) -> u64 {
        self.store_interval
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` every `period`, under the command lock as a command would,
    /// until it returns false or the daemon closes (a lease, the store
    /// points). A task of the runtime waits out the period and takes the
    /// lock; `f` runs on the blocking pool, as a command does. Not a thread
    /// of its own: every pull session's lease would add one.
    pub fn every(
        self: &Arc<Self>,
        name: String,
        period: Duration,
        f: impl FnMut(&Daemon) -> bool + Send + 'static,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(timer = %name, "no runtime to run a timer on");
            return;
        };
        let d = Arc::downgrade(self);
        rt.spawn(async move {
            let mut f = f;
            loop {
                tokio::time::sleep(period).await;
                let Some(d) = d.upgrade() else {
                    return;
                };
                // Taken here, not on the blocking thread: a command holds
                // it while it waits for that thread.
                let serial = d.command_lock.clone().lock_owned().await;
                let run = tokio::task::spawn_blocking(move || {
                    let _serial = serial;
                    let go = d.check_open().is_ok() && f(&d);
                    (f, go)
                });
                match run.await {
                    Ok((back, true)) => f = back,
                    Ok((_, false)) => return,
                    Err(e) => {
                        tracing::error!(timer = %name, error = %e, "a timer failed");
                        return;
                    }
                }
            }
        });
    }

    /// The daemon as a shared handle.
    pub fn arc(&self) -> Option<Arc<Daemon>> {
        self.me.upgrade()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- events and shutdown -------------------------------------------

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn emit(&self, kind: EventKind) {
        // No receiver is not an error: qemu drops events nobody listens to.
        let _ = self.events.send(Event::now(kind));
    }

    /// Asks the daemon to exit (the `quit` command).
    pub fn request_quit(&self) {
        let _ = self.quit.send(true);
    }

    pub fn quit_requested(&self) -> watch::Receiver<bool> {
        self.quit.subscribe()
    }

    /// Refuses a command once the daemon is closing.
    pub fn check_open(&self) -> QmpResult<()> {
        if self.state().closing {
            return Err(QmpError::generic("The daemon is shutting down"));
        }
        Ok(())
    }

    // ---- nodes ---------------------------------------------------------

    /// Looks a node up by name, with the text qemu gives when a command's
    /// `device`/`node` argument names nothing.
    pub fn node(&self, name: &str) -> QmpResult<Arc<Node>> {
        self.find_node(name).ok_or_else(|| not_found(name))
    }

    /// qemu's bdrv_lookup_bs(device, node-name): a storage daemon has no
    /// named devices, so only `node_name` can match.
    pub fn lookup(&self, device: Option<&str>, node_name: Option<&str>) -> QmpResult<Arc<Node>> {
        node_name.and_then(|n| self.find_node(n)).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.unwrap_or(""),
                node_name.unwrap_or("")
            ))
        })
    }

    pub fn find_node(&self, name: &str) -> Option<Arc<Node>> {
        self.state().find(name).map(|n| n.node.clone())
    }

    /// The driver kind of node `name`.
    pub fn driver_of(&self, name: &str) -> Option<Driver> {
        self.state().find(name).map(|n| n.driver)
    }

    /// Runs `f` on every node, newest first.
    pub fn with_nodes<T>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &GraphNode>) -> T) -> T {
        let st = self.state();
        let mut it = st.nodes.iter().rev();
        f(&mut it)
    }

    /// A fresh implicit node name, as qemu's `#blockNNN`.
    pub fn auto_node_name(&self) -> String {
        let mut st = self.state();
        st.next_auto += 1;
        format!("#block{:03}", st.next_auto)
    }

    /// Checks a user-given node name as qemu does.
    pub fn check_new_node_name(&self, name: &str) -> QmpResult<()> {
        let mut chars = name.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !well_formed {
            return Err(QmpError::generic(format!("Invalid node-name: '{name}'")));
        }
        // qemu keeps node names in a 32-byte buffer.
        if name.len() > 31 {
            return Err(QmpError::generic("Node name too long"));
        }
        if self.find_node(name).is_some() {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        Ok(())
    }

    /// The next place in the graph's order. qemu lists nodes in the order
    /// it started opening them (a format node after its `file` child and
    /// before its backing chain), not the order they finished.
    pub fn reserve_slot(&self) -> u64 {
        let mut st = self.state();
        st.next_slot += 1;
        st.next_slot
    }

    /// Adds an opened node to the graph, at its place.
    pub fn insert_node(&self, entry: GraphNode) -> QmpResult<()> {
        let mut st = self.state();
        if st.find(entry.name()).is_some() {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{}'",
                entry.name()
            )));
        }
        let at = st.nodes.partition_point(|n| n.slot < entry.slot);
        st.nodes.insert(at, entry);
        Ok(())
    }

    /// qemu's qmp_get_root_bs: the node `name`, which must be a root.
    pub fn root_node(&self, name: &str) -> QmpResult<Arc<Node>> {
        let node = self.node(name)?;
        if !self.is_root_node(&node) {
            return Err(QmpError::generic("Need a root block node"));
        }
        Ok(node)
    }

    /// Whether a root other than `mine` uses `node` (an export).
    pub fn has_root_besides(&self, node: &Arc<Node>, mine: Option<&Arc<Root>>) -> bool {
        self.state()
            .live_roots()
            .iter()
            .filter(|r| mine.is_none_or(|m| !Arc::ptr_eq(m, r)))
            .any(|r| r.link.points_at(node))
    }

    /// qemu's bdrv_is_root_node: only roots (exports) use `node`, no
    /// other node and no job.
    pub fn is_root_node(&self, node: &Arc<Node>) -> bool {
        self.state().parents(node).is_empty() && !self.jobs().iter().any(|j| j.blocks(node))
    }

    /// The nodes with a child edge of `role` to `node`.
    pub fn parents_by(&self, node: &Arc<Node>, role: ChildRole) -> Vec<Arc<Node>> {
        self.state()
            .parents(node)
            .into_iter()
            .filter(|(_, r)| *r == role)
            .map(|(p, _)| p)
            .collect()
    }

    /// The copy-before-write node filtering `node`, if any (it does not
    /// share writing `node` with other users).
    pub fn cbw_above(&self, node: &Arc<Node>) -> Option<String> {
        let st = self.state();
        st.parents(node).into_iter().find_map(|(p, role)| {
            let kind = st.find(p.name()).map(|g| g.driver);
            (role == ChildRole::Filtered && kind == Some(Driver::CopyBeforeWrite))
                .then(|| p.name().to_owned())
        })
    }

    /// Whether anything uses `node`: a root or a parent.
    pub fn in_use(&self, node: &Arc<Node>) -> bool {
        let mut st = self.state();
        st.live_roots().iter().any(|r| r.link.points_at(node)) || !st.parents(node).is_empty()
    }

    /// Whether `node` was opened implicitly (not by blockdev-add).
    pub fn is_implicit(&self, node: &Arc<Node>) -> bool {
        self.state()
            .nodes
            .iter()
            .any(|n| Arc::ptr_eq(&n.node, node) && !n.monitor_owned)
    }

    /// qemu's op blockers: a node a job works on refuses every operation
    /// ("in use by block job"), and a backing node refuses all but those
    /// that work on a chain's lower layers (commit into it, stream,
    /// backup).
    pub fn check_op(&self, node: &Arc<Node>, op: BlockOp) -> QmpResult<()> {
        if let Some(job) = self.jobs().iter().find(|j| j.blocks(node)) {
            return Err(QmpError::generic(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                node.name(),
                job.job_type.name()
            )));
        }
        let chain_op = matches!(
            op,
            BlockOp::CommitTarget | BlockOp::Stream | BlockOp::BackupSource | BlockOp::BackupTarget
        );
        if !chain_op {
            let parents = self.state().parents(node);
            if let Some((p, _)) = parents.iter().find(|(_, r)| *r == ChildRole::Backing) {
                return Err(QmpError::generic(format!(
                    "Node '{}' is busy: node is used as backing hd of '{}'",
                    node.name(),
                    p.name()
                )));
            }
        }
        Ok(())
    }

    pub fn sessions(&self) -> &crate::qmp::commands::session::Sessions {
        &self.sessions
    }

    /// Holds every client request back until dropped (a transaction).
    pub fn quiesce(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.quiesce()
    }

    /// Registers a root, so graph changes move it with its node.
    pub fn new_root(&self, node: Arc<Node>, writable: bool) -> Arc<Root> {
        let root = Root::new(node, writable, self.gate.clone());
        self.state().roots.push(Arc::downgrade(&root));
        root
    }

    /// qemu's check before a node becomes read-only: nothing that writes
    /// may use it (a writable export, a read-write parent other than an
    /// overlay, which never writes its backing).
    pub fn check_no_writers(&self, node: &Arc<Node>) -> QmpResult<()> {
        let mut st = self.state();
        let writers = st
            .live_roots()
            .iter()
            .any(|r| r.writable && r.link.points_at(node))
            || st
                .parents(node)
                .iter()
                .any(|(p, role)| *role != ChildRole::Backing && !p.read_only());
        if writers {
            return Err(QmpError::generic(format!(
                "Read-only block node '{}' cannot support read-write users",
                node.name()
            )));
        }
        Ok(())
    }

    /// Sets every node's image locks to what its users need now, as qemu
    /// derives them from its permission graph: a writable root needs
    /// write, any other root read; a qcow2 parent needs write while it is
    /// read-write and read otherwise (its metadata must stay consistent);
    /// a raw or filter parent passes on what its own users need. A node
    /// nothing uses holds no locks, so two `file` nodes of one daemon may
    /// open one file, as in qsd, and conflict only when their users do.
    pub fn refresh_locks(&self) -> QmpResult<()> {
        let plan: Vec<(Arc<Node>, Option<LockMode>)> = {
            let mut st = self.state();
            let roots = st.live_roots();
            st.nodes
                .iter()
                .map(|n| (n.node.clone(), need(&st, &roots, &n.node, 0)))
                .collect()
        };
        for (node, mode) in plan {
            node.set_image_locks(mode)?;
        }
        Ok(())
    }

    /// Replaces `old` by `new` in the graph: every root and every parent
    /// edge that points at `old` points at `new` afterwards, except the
    /// edges of `new` itself (a filter or an overlay put above `old` keeps
    /// it as its child). In-flight requests through those edges finish
    /// first, and new ones wait until the change is complete, so no
    /// request sees half of it. Blocks: run it on the blocking pool.
    pub fn replace_node(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.replace_nodes_with(&[(old, new)], || {});
    }

    /// Several replacements at once, with `during` run while every edge
    /// they move is drained (a mirror's last copy: no client request runs
    /// between it and the pivot).
    pub fn replace_nodes_with(&self, pairs: &[(&Arc<Node>, &Arc<Node>)], during: impl FnOnce()) {
        let (roots, edges) = {
            let mut st = self.state();
            let roots = st.live_roots();
            let edges: Vec<(Arc<Node>, Arc<Child>)> = st
                .nodes
                .iter()
                .flat_map(|n| n.node.children().into_iter().map(|c| (n.node.clone(), c)))
                .collect();
            (roots, edges)
        };
        // Each link with the node it moves to; a node's own edges never
        // move onto itself.
        let mut moves: Vec<(&Link, &Arc<Node>)> = Vec::new();
        for (owner, link) in roots
            .iter()
            .map(|r| (None, &r.link))
            .chain(edges.iter().map(|(n, c)| (Some(n), &c.link)))
        {
            let to = pairs.iter().find(|(old, new)| {
                link.points_at(old) && owner.is_none_or(|o| !Arc::ptr_eq(o, new))
            });
            if let Some((_, new)) = to {
                moves.push((link, new));
            }
        }
        // Drain every edge before any moves; then move them all.
        let mut drained: Vec<(Drained<'_>, &Arc<Node>)> =
            moves.into_iter().map(|(l, new)| (l.write(), new)).collect();
        during();
        for (d, new) in &mut drained {
            d.set((*new).clone());
        }
        drop(drained);
        for (old, new) in pairs {
            info!(old = old.name(), new = new.name(), "node replaced");
        }
    }

    /// Puts a filter node above `node` (a job's filter, the test hook):
    /// named `name`, or auto-named; every root and parent of `node` moves
    /// onto it. `monitor_owned`: the user may blockdev-del it.
    pub fn insert_filter(
        &self,
        node: &Arc<Node>,
        name: Option<&str>,
        driver: Driver,
        drv: Arc<dyn BlockNode>,
        monitor_owned: bool,
    ) -> QmpResult<Arc<Node>> {
        let named_by_options = name.is_some() && driver == Driver::CopyOnRead;
        let name = match name {
            Some(n) => {
                // qemu's bdrv_insert_node (stream's filter) words it so.
                self.check_new_node_name(n).map_err(|e| match driver {
                    Driver::CopyOnRead => {
                        QmpError::generic(format!("Could not create node: {}", e.desc))
                    }
                    _ => e,
                })?;
                n.to_owned()
            }
            None => self.auto_node_name(),
        };
        let implicit_filter = name.starts_with('#') && !monitor_owned;
        let filter = Arc::new(Node::open(name, drv)?);
        self.insert_node(GraphNode {
            node: filter.clone(),
            driver,
            slot: self.reserve_slot(),
            auto_backing: None,
            monitor_owned,
            named_by_options,
            implicit_filter,
            image_extra: None,
            loaded_bitmaps: Vec::new(),
        })?;
        self.replace_node(node, &filter);
        self.relock();
        Ok(filter)
    }

    /// Takes a job's filter out again: its users move back onto `child`.
    pub fn remove_filter(&self, filter: &Arc<Node>, child: &Arc<Node>) {
        self.replace_node(filter, child);
        self.forget_node(filter);
        self.relock();
    }

    /// Sets `node`'s backing in the graph (the header stays as it is).
    pub fn set_backing(&self, node: &Arc<Node>, backing: Option<Arc<Node>>) -> QmpResult<()> {
        node.set_backing(backing)
            .map_err(|e| QmpError::generic(e.context))
    }

    /// The end of a stream or commit: `node`'s backing becomes `backing`
    /// in the graph, then in the image header (`name` and `format`).
    pub fn rewrite_backing(
        &self,
        node: &Arc<Node>,
        backing: Option<Arc<Node>>,
        name: Option<&str>,
        format: Option<&str>,
    ) -> QmpResult<()> {
        node.set_backing(backing)
            .map_err(|e| QmpError::generic(e.context))?;
        let written = node
            .change_backing_file(name, format)
            .map_err(|e| QmpError::generic(e.context));
        self.refresh_backing_view(node);
        written
    }

    /// What queries show of `node`'s backing after its header changed:
    /// the header's names (qemu's bdrv_change_backing_file also sets
    /// `auto_backing_file`).
    fn refresh_backing_view(&self, node: &Arc<Node>) {
        let fresh = node.image_info();
        let written = node.backing_file();
        let mut st = self.state();
        let Some(g) = st.nodes.iter_mut().find(|n| Arc::ptr_eq(&n.node, node)) else {
            return;
        };
        g.auto_backing = written;
        if let (Some(Value::Object(extra)), Some(fresh)) = (g.image_extra.as_mut(), fresh) {
            for key in [
                "backing-filename",
                "full-backing-filename",
                "backing-filename-format",
            ] {
                match fresh.get(key) {
                    Some(v) => extra.insert(key.to_owned(), v.clone()),
                    None => extra.remove(key),
                };
            }
        }
    }

    /// Puts `overlay` above `node` (qemu's bdrv_append): `node` becomes
    /// the overlay's backing, and every root and parent of `node` moves
    /// onto the overlay. Undone by [`Daemon::remove_overlay`].
    pub fn append_overlay(&self, node: &Arc<Node>, overlay: &Arc<Node>) -> QmpResult<()> {
        self.set_backing(overlay, Some(node.clone()))?;
        self.replace_node(node, overlay);
        Ok(())
    }

    /// Takes `overlay` off `node` again: its users move back.
    pub fn remove_overlay(&self, node: &Arc<Node>, overlay: &Arc<Node>) {
        self.replace_node(overlay, node);
        let _ = self.set_backing(overlay, None);
    }

    /// blockdev-del: removes a user-created node that nothing uses, and
    /// the implicit nodes below it that nothing else uses.
    pub fn delete_node(&self, name: &str) -> QmpResult<()> {
        let Some(node) = self.find_node(name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let mut st = self.state();
        if st.live_roots().iter().any(|r| r.link.points_at(&node)) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        drop(st);
        self.check_op(&node, BlockOp::Delete)?;
        let mut st = self.state();
        let Some(i) = st.nodes.iter().position(|n| Arc::ptr_eq(&n.node, &node)) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let parents = st.parents(&node);
        if !st.nodes[i].monitor_owned {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !parents.is_empty() {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        let doomed = remove_subtree(&mut st, i);
        drop(st);
        close_nodes(doomed);
        self.relock();
        Ok(())
    }

    /// [`Daemon::refresh_locks`] after a change that can only lower what
    /// users need (or keep it): a failure is logged, not returned.
    pub fn relock(&self) {
        if let Err(e) = self.refresh_locks() {
            warn!(error = %e.desc, "could not update image locks");
        }
    }

    /// Takes `node` alone out of the graph (a job's filter that nothing
    /// points at any more); its children stay.
    pub fn forget_node(&self, node: &Arc<Node>) {
        self.state().nodes.retain(|n| !Arc::ptr_eq(&n.node, node));
    }

    /// Closes the implicit nodes nothing uses any more (qemu frees a node
    /// with its last reference: a snapshot's overlay once its export is
    /// gone, the layers a stream or commit took out of a chain). Nodes the
    /// user added stay until blockdev-del. Runs after every command and
    /// every job's end.
    pub fn prune(&self) {
        let mut st = self.state();
        let roots = st.live_roots();
        let mut doomed = Vec::new();
        loop {
            let unused = st.nodes.iter().position(|n| {
                !n.monitor_owned
                    && st.parents(&n.node).is_empty()
                    && !roots.iter().any(|r| r.link.points_at(&n.node))
            });
            match unused {
                Some(i) => doomed.push(st.nodes.remove(i)),
                None => break,
            }
        }
        drop(st);
        if !doomed.is_empty() {
            close_nodes(doomed);
            self.relock();
        }
    }

    /// Removes an implicit node again, with the implicit nodes below it
    /// (a node whose parent failed to open).
    pub fn delete_implicit(&self, node: &Arc<Node>) {
        let mut st = self.state();
        let Some(i) = st
            .nodes
            .iter()
            .position(|n| Arc::ptr_eq(&n.node, node) && !n.monitor_owned)
        else {
            return;
        };
        let doomed = remove_subtree(&mut st, i);
        drop(st);
        close_nodes(doomed);
    }

    /// Stores every node's persistent bitmaps and closes the graph (daemon
    /// exit), parents before their children. From here on no command runs:
    /// the caller holds the command lock.
    pub fn close_all(&self) {
        let nodes = {
            let mut st = self.state();
            st.closing = true;
            std::mem::take(&mut st.nodes)
        };
        close_nodes(nodes.into_iter().rev().collect());
    }

    // ---- jobs ----------------------------------------------------------

    fn job_list(&self) -> MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.job_list().iter().find(|j| j.id == id).cloned()
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.job_list().clone()
    }

    pub fn add_job(&self, job: Arc<Job>) {
        self.job_list().insert(0, job);
    }

    pub fn remove_job(&self, id: &str) {
        self.job_list().retain(|j| j.id != id);
    }

    // ---- exports -------------------------------------------------------

    pub fn exports(&self) -> &ExportTable {
        &self.exports
    }

    /// query-block-exports: (id, node-name), newest first; the node is
    /// the one the export's root points at now.
    pub fn export_list(&self) -> Vec<(String, String)> {
        let st = self.state();
        st.exports
            .iter()
            .rev()
            .map(|e| (e.id.clone(), e.export.root.node().name().to_owned()))
            .collect()
    }

    /// How many clients are connected to export `id` now.
    pub fn export_clients(&self, id: &str) -> usize {
        let st = self.state();
        st.exports
            .iter()
            .find(|e| e.id == id)
            .map_or(0, |e| e.export.connections())
    }

    /// Bytes clients asked to read from export `id`.
    pub fn export_read_bytes(&self, id: &str) -> u64 {
        let st = self.state();
        st.exports
            .iter()
            .find(|e| e.id == id)
            .map_or(0, |e| e.export.read_bytes())
    }

    pub fn export_id_taken(&self, id: &str) -> bool {
        self.state().exports.iter().any(|e| e.id == id)
    }

    /// The running server's connection limit, or qemu's error when none runs.
    pub fn nbd_max_connections(&self) -> QmpResult<Option<usize>> {
        self.state()
            .nbd_max_connections
            .ok_or_else(|| QmpError::generic("NBD server not running"))
    }

    /// Registers a built export (its bitmap contexts hold their busy
    /// claims, so a refused export releases them as it drops).
    pub fn insert_export(&self, id: &str, export: Export) -> QmpResult<()> {
        let mut st = self.state();
        if st.exports.iter().any(|e| e.id == id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        let name = export.name.clone();
        let export = self.exports.add(export).map_err(|_| {
            QmpError::generic(format!("NBD server already has export named '{name}'"))
        })?;
        st.exports.push(ExportRecord {
            id: id.to_owned(),
            name,
            export,
        });
        drop(st);
        self.relock();
        Ok(())
    }

    /// Whether an NBD export name is taken.
    pub fn nbd_name_taken(&self, name: &str) -> bool {
        self.exports.get(name).is_some()
    }

    /// block-export-del / nbd-server-remove. `by_name` looks the export up
    /// by its NBD name (the legacy command) rather than its id.
    pub fn delete_export(&self, key: &str, by_name: bool, hard: bool) -> QmpResult<()> {
        let matches = |e: &ExportRecord| if by_name { e.name == key } else { e.id == key };
        let not_found = || QmpError::generic(format!("Export '{key}' is not found"));
        let (export, id) = {
            let st = self.state();
            let e = st
                .exports
                .iter()
                .find(|e| matches(e))
                .ok_or_else(not_found)?;
            (e.export.clone(), e.id.clone())
        };
        // A client that has just hung up is still counted until its
        // connection has wound down: it gets a moment (qemu's one thread
        // would have seen the hang-up before this command).
        if !hard && !export.wait_idle(EXPORT_IDLE_GRACE) {
            return Err(QmpError::generic(format!("export '{id}' still in use")));
        }
        drop(export);
        let mut st = self.state();
        let i = st.exports.iter().position(matches).ok_or_else(not_found)?;
        let rec = st.exports.remove(i);
        drop(st);
        if hard {
            rec.export.close();
        }
        self.drop_export(rec);
        Ok(())
    }

    fn drop_export(&self, rec: ExportRecord) {
        self.exports.remove(&rec.name);
        drop(rec.export);
        self.relock();
        info!(id = %rec.id, "export deleted");
        self.emit(EventKind::BlockExportDeleted { id: rec.id.clone() });
    }

    // ---- the NBD server ------------------------------------------------

    /// nbd-server-start: at most one server, as qemu. Without `accept`,
    /// the sockets are bound but connections wait in the backlog until
    /// [`Daemon::accept_nbd`] (so `serve` adds its export first, and no
    /// client finds the server without it).
    /// The check a TLS client's identity must pass: authorization object
    /// `id`, looked up at each connection, as qemu does.
    pub fn authorizer(&self, id: &str) -> crate::nbd::tls::Authorizer {
        let objects = self.objects.clone();
        let id = id.to_owned();
        Arc::new(move |dn| objects.authorize(&id, dn))
    }

    pub async fn start_nbd(
        &self,
        addrs: &[Address],
        max_connections: Option<usize>,
        accept: bool,
        tls: Option<crate::nbd::tls::TlsServer>,
    ) -> QmpResult<()> {
        let mut nbd = self.nbd.lock().await;
        if nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let pool = Pool::new(self.nbd_memory.load(std::sync::atomic::Ordering::Relaxed));
        let tls_on = tls.is_some();
        let server = NbdServer::bind(addrs, self.exports.clone(), max_connections, pool, tls)
            .await
            .map_err(|e| QmpError::generic(crate::qmp::error::strip_os_error(&e.to_string())))?;
        for a in server.tcp_addrs() {
            // The bound address, so `HOST:0` users learn the port.
            info!("listening on tcp {a}");
        }
        for a in addrs {
            if let Address::Unix(p) = a {
                info!("listening on unix {}", p.display());
            }
        }
        // The URI scheme says whether TLS is required (nbds).
        let s = if tls_on { "s" } else { "" };
        let uri = match (addrs.first(), server.tcp_addrs().first()) {
            (Some(Address::Unix(p)), _) => Some((
                format!("nbd{s}+unix:///"),
                format!("?socket={}", p.display()),
            )),
            (Some(Address::Tcp(_)), Some(a)) => Some((format!("nbd{s}://{a}/"), String::new())),
            _ => None,
        };
        let (stop, stop_rx) = watch::channel(false);
        let mut running = NbdRunning {
            stop,
            task: None,
            pending: Some((server, stop_rx)),
        };
        if accept {
            running.accept();
        }
        *nbd = Some(running);
        let mut st = self.state();
        st.nbd_max_connections = Some(max_connections);
        st.nbd_uri = uri;
        Ok(())
    }

    /// The URI of export `name` on the running server.
    pub fn nbd_uri(&self, name: &str) -> Option<String> {
        self.state()
            .nbd_uri
            .as_ref()
            .map(|(head, tail)| format!("{head}{name}{tail}"))
    }

    /// Starts accepting on a server [`Daemon::start_nbd`] bound.
    pub async fn accept_nbd(&self) {
        if let Some(running) = self.nbd.lock().await.as_mut() {
            running.accept();
        }
    }

    /// nbd-server-stop: every NBD export goes (newest first, each with its
    /// event), then the server.
    pub async fn stop_nbd(&self) -> QmpResult<()> {
        let mut nbd = self.nbd.lock().await;
        let Some(mut running) = nbd.take() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        // A server that never accepted still owns its sockets: it removes
        // them as it stops.
        running.accept();
        let doomed: Vec<ExportRecord> = {
            let mut st = self.state();
            st.nbd_max_connections = None;
            st.nbd_uri = None;
            let mut v = std::mem::take(&mut st.exports);
            v.reverse();
            v
        };
        for rec in doomed {
            self.drop_export(rec);
        }
        let _ = running.stop.send(true);
        // Wait until the old server has removed its socket and its
        // connections have ended, so a new one may bind the same path at
        // once and nothing uses the nodes any more.
        if let Some(task) = running.task {
            if tokio::time::timeout(NBD_STOP_LIMIT, task).await.is_err() {
                warn!("the NBD server did not stop in time");
            }
        }
        Ok(())
    }
}

impl NbdRunning {
    fn accept(&mut self) {
        if let Some((server, stop_rx)) = self.pending.take() {
            self.task = Some(tokio::spawn(server.run(stop_rx)));
        }
    }
}

/// What the users of `node` need of its image (see
/// [`Daemon::refresh_locks`]); `depth` bounds the walk up the graph.
fn need(st: &State, roots: &[Arc<Root>], node: &Arc<Node>, depth: usize) -> Option<LockMode> {
    let from_roots = roots.iter().filter(|r| r.link.points_at(node)).map(|r| {
        if r.writable {
            LockMode::Write
        } else {
            LockMode::Read
        }
    });
    let from_parents = st.parents(node).into_iter().filter_map(|(p, role)| {
        let kind = st.nodes.iter().find(|n| Arc::ptr_eq(&n.node, &p))?.driver;
        match kind {
            // A job's filter writes into its target.
            _ if role == ChildRole::Target => Some(LockMode::Write),
            Driver::Qcow2 if p.read_only() => Some(LockMode::Read),
            Driver::Qcow2 => Some(LockMode::Write),
            _ if depth < crate::block::chain::MAX_CHAIN_DEPTH => need(st, roots, &p, depth + 1),
            _ => None,
        }
    });
    from_roots.chain(from_parents).max()
}

/// Takes node `i` out of the graph, with every implicit node below it that
/// has no other parent; returns them parents first.
fn remove_subtree(st: &mut State, i: usize) -> Vec<GraphNode> {
    let mut doomed = vec![st.nodes.remove(i)];
    let mut k = 0;
    while k < doomed.len() {
        let children: Vec<Arc<Node>> = doomed[k].node.children().iter().map(|c| c.node()).collect();
        for child in children {
            let Some(j) = st
                .nodes
                .iter()
                .position(|n| Arc::ptr_eq(&n.node, &child) && !n.monitor_owned)
            else {
                continue;
            };
            let used_elsewhere = !st.parents(&child).is_empty()
                || st.live_roots().iter().any(|r| r.link.points_at(&child));
            if !used_elsewhere {
                doomed.push(st.nodes.remove(j));
            }
        }
        k += 1;
    }
    doomed
}

/// Stores the bitmaps of nodes leaving the graph, parents first (a format
/// node flushes through its file node, which must still be open).
fn close_nodes(nodes: Vec<GraphNode>) {
    for n in &nodes {
        if let Err(e) = n.node.store_bitmaps() {
            warn!(node = %n.name(), error = %e, "could not store bitmaps on close");
        }
        // Closed means other processes may open the image now, even while
        // a job that used it still holds its handle for a moment.
        if let Err(e) = n.node.set_image_locks(None) {
            warn!(node = %n.name(), error = %e, "could not release the image locks on close");
        }
    }
}
