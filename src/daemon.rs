//! The shared state of a running daemon and its invariants: the named block
//! nodes (qemu's blockdev graph, kept simple: a format node knows its `file`
//! child by name), the exports, the one NBD server, and the event channel.
//!
//! Every front (QMP, the qsd-style command line) changes the state through
//! these methods, so a rule such as "a node in use by an export cannot be
//! deleted" lives here once. Error texts are qemu's, word for word.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::bitmap::set::{lock, SharedBitmap};
use crate::block::node::Node;
use crate::block::BlockNode;
use crate::nbd::export::{Export, ExportTable};
use crate::nbd::server::{Address, NbdServer};
use crate::qmp::error::{QmpError, QmpResult};

/// How long nbd-server-stop waits for the old server to let go of its
/// sockets before a new one may bind them.
const NBD_STOP_LIMIT: Duration = Duration::from_secs(10);

/// Events a lagging client may fall behind by before it loses some.
const EVENT_BACKLOG: usize = 1024;

/// One named node of the block graph.
pub struct BlockDev {
    pub name: String,
    /// qemu's driver name: "file", "raw" or "qcow2".
    pub driver: &'static str,
    /// The host file at the bottom of this node.
    pub filename: PathBuf,
    /// The node-name of the `file` child of a format node.
    pub file_child: Option<String>,
    pub node: Arc<Node>,
    /// Created by the user (blockdev-add, --blockdev) rather than implicitly
    /// as a nested child: only those may be deleted with blockdev-del.
    pub monitor_owned: bool,
    /// For a `file` node that holds its host file open (and locked): the
    /// file's (device, inode), so another node of this daemon on the same
    /// file shares the open file instead of fighting over its locks.
    pub file_id: Option<(u64, u64)>,
    /// Format details for query-named-block-nodes' `image` (cluster-size,
    /// format-specific, backing names), read when the node was opened.
    pub image_extra: Option<Value>,
    /// The bitmaps loaded from the image at open: those qemu shows as
    /// stored in the image (new ones are written only at close).
    pub loaded_bitmaps: Vec<SharedBitmap>,
}

/// One block export, as query-block-exports lists it.
pub struct ExportRecord {
    pub id: String,
    /// The NBD export name clients ask for.
    pub name: String,
    pub node_name: String,
    pub export: Arc<Export>,
    /// Bitmaps made busy by this export; released when it goes.
    pub bitmaps: Vec<SharedBitmap>,
}

/// An event for every negotiated QMP client.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub seconds: u64,
    pub microseconds: u32,
}

impl Event {
    pub fn to_json(&self) -> Value {
        json!({
            "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
            "event": self.name,
            "data": self.data,
        })
    }
}

struct NbdRunning {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// In creation order; queries list the newest first, as qemu.
    nodes: Vec<BlockDev>,
    /// In creation order; queries list the newest first, as qemu.
    exports: Vec<ExportRecord>,
    /// Counter for implicit node names (`#block001`).
    next_auto: u64,
    /// The running server's connection limit, when one runs.
    nbd_max_connections: Option<Option<usize>>,
}

pub struct Daemon {
    state: Mutex<State>,
    nbd: tokio::sync::Mutex<Option<NbdRunning>>,
    /// Serialises commands across all monitors, as qemu's big lock does: a
    /// transaction sees no other command between its prepare and commit.
    pub command_lock: tokio::sync::Mutex<()>,
    exports: ExportTable,
    events: broadcast::Sender<Event>,
    quit: watch::Sender<bool>,
}

impl Daemon {
    pub fn new() -> Arc<Daemon> {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (quit, _) = watch::channel(false);
        Arc::new(Daemon {
            state: Mutex::new(State::default()),
            nbd: tokio::sync::Mutex::new(None),
            command_lock: tokio::sync::Mutex::new(()),
            exports: ExportTable::new(),
            events,
            quit,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- events and shutdown -------------------------------------------

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // No receiver is not an error: qemu drops events nobody listens to.
        let _ = self.events.send(Event {
            name: name.to_owned(),
            data,
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        });
    }

    /// Asks the daemon to exit (the `quit` command).
    pub fn request_quit(&self) {
        let _ = self.quit.send(true);
    }

    pub fn quit_requested(&self) -> watch::Receiver<bool> {
        self.quit.subscribe()
    }

    // ---- nodes ---------------------------------------------------------

    /// Looks a node up by name, with the text qemu gives when a command's
    /// `device`/`node` argument names nothing.
    pub fn node(&self, name: &str) -> QmpResult<Arc<Node>> {
        self.find_node(name).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    pub fn find_node(&self, name: &str) -> Option<Arc<Node>> {
        let st = self.state();
        st.nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.node.clone())
    }

    /// Runs `f` on every node, newest first.
    pub fn with_nodes<T>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &BlockDev>) -> T) -> T {
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

    /// Adds an opened node to the graph.
    pub fn insert_node(&self, dev: BlockDev) -> QmpResult<()> {
        let mut st = self.state();
        if st.nodes.iter().any(|n| n.name == dev.name) {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{}'",
                dev.name
            )));
        }
        st.nodes.push(dev);
        Ok(())
    }

    /// The open host file a `file` node already holds for `id`, and
    /// whether that node is read-only.
    pub fn open_file(&self, id: (u64, u64)) -> Option<(Arc<dyn BlockNode>, bool)> {
        let st = self.state();
        st.nodes
            .iter()
            .find(|n| n.file_id == Some(id))
            .map(|n| (n.node.driver().clone(), n.node.read_only()))
    }

    /// Replaces node `name`'s implementation (a `file` node whose image a
    /// format driver opens itself) and returns the old one, which nothing
    /// else may be using: its host file is about to be reopened.
    pub fn replace_node(&self, name: &str, node: Arc<Node>) -> QmpResult<Arc<Node>> {
        let mut st = self.state();
        let dev = st
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                ))
            })?;
        if Arc::strong_count(&dev.node) > 1 || !dev.node.bitmaps().all().is_empty() {
            return Err(QmpError::generic(format!(
                "Node '{name}' is in use and cannot become the file of a qcow2 node"
            )));
        }
        dev.file_id = None;
        Ok(std::mem::replace(&mut dev.node, node))
    }

    /// The `file` child's node-name, filename and node, for a format node
    /// being opened on top of it.
    pub fn child_info(&self, name: &str) -> QmpResult<(PathBuf, Arc<Node>)> {
        let st = self.state();
        st.nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| (n.filename.clone(), n.node.clone()))
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                ))
            })
    }

    /// blockdev-del: removes a user-created node that nothing uses, and its
    /// implicit children.
    pub fn delete_node(&self, name: &str) -> QmpResult<()> {
        let mut st = self.state();
        let Some(i) = st.nodes.iter().position(|n| n.name == name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        if st.exports.iter().any(|e| e.node_name == name) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        if !st.nodes[i].monitor_owned {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if st
            .nodes
            .iter()
            .any(|n| n.file_child.as_deref() == Some(name))
        {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        let mut doomed = vec![st.nodes.remove(i)];
        // Implicit children go with their parent, down the chain.
        while let Some(child) = doomed.last().and_then(|d| d.file_child.clone()) {
            let Some(j) = st
                .nodes
                .iter()
                .position(|n| n.name == child && !n.monitor_owned)
            else {
                break;
            };
            doomed.push(st.nodes.remove(j));
        }
        drop(st);
        for d in doomed {
            close_node(&d);
        }
        Ok(())
    }

    /// Removes an implicit node again (a nested child whose parent failed
    /// to open).
    pub fn delete_implicit(&self, name: &str) -> Option<()> {
        let mut st = self.state();
        let i = st
            .nodes
            .iter()
            .position(|n| n.name == name && !n.monitor_owned)?;
        let dev = st.nodes.remove(i);
        drop(st);
        close_node(&dev);
        Some(())
    }

    /// Stores every node's persistent bitmaps (daemon exit), format nodes
    /// before the files under them.
    pub fn close_all(&self) {
        let nodes = std::mem::take(&mut self.state().nodes);
        for d in nodes.iter().rev() {
            close_node(d);
        }
    }

    // ---- exports -------------------------------------------------------

    pub fn exports(&self) -> &ExportTable {
        &self.exports
    }

    /// query-block-exports: (id, node-name), newest first.
    pub fn export_list(&self) -> Vec<(String, String)> {
        let st = self.state();
        st.exports
            .iter()
            .rev()
            .map(|e| (e.id.clone(), e.node_name.clone()))
            .collect()
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

    /// Registers a built export; its bitmaps must already be marked busy,
    /// and are released again if it cannot be added.
    pub fn insert_export(
        &self,
        id: &str,
        node_name: &str,
        export: Export,
        bitmaps: Vec<SharedBitmap>,
    ) -> QmpResult<()> {
        let mut st = self.state();
        if st.exports.iter().any(|e| e.id == id) {
            release_bitmaps(&bitmaps);
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        let name = export.name.clone();
        let export = match self.exports.add(export) {
            Ok(e) => e,
            Err(_) => {
                release_bitmaps(&bitmaps);
                return Err(QmpError::generic(format!(
                    "NBD server already has export named '{name}'"
                )));
            }
        };
        st.exports.push(ExportRecord {
            id: id.to_owned(),
            name,
            node_name: node_name.to_owned(),
            export,
            bitmaps,
        });
        Ok(())
    }

    /// Whether an NBD export name is taken.
    pub fn nbd_name_taken(&self, name: &str) -> bool {
        self.exports.get(name).is_some()
    }

    /// block-export-del / nbd-server-remove. `by_name` looks the export up
    /// by its NBD name (the legacy command) rather than its id.
    pub fn delete_export(&self, key: &str, by_name: bool, hard: bool) -> QmpResult<()> {
        let mut st = self.state();
        let Some(i) = st
            .exports
            .iter()
            .position(|e| if by_name { e.name == key } else { e.id == key })
        else {
            return Err(QmpError::generic(format!("Export '{key}' is not found")));
        };
        // The table and our record hold one reference each; every open
        // connection holds another.
        if !hard && Arc::strong_count(&st.exports[i].export) > 2 {
            return Err(QmpError::generic(format!(
                "export '{}' still in use",
                st.exports[i].id
            )));
        }
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
        release_bitmaps(&rec.bitmaps);
        info!(id = %rec.id, "export deleted");
        self.emit("BLOCK_EXPORT_DELETED", json!({ "id": rec.id }));
    }

    // ---- the NBD server ------------------------------------------------

    /// nbd-server-start: at most one server, as qemu.
    pub async fn start_nbd(&self, addr: Address, max_connections: Option<usize>) -> QmpResult<()> {
        let mut nbd = self.nbd.lock().await;
        if nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let server = NbdServer::bind(&[addr], self.exports.clone(), max_connections)
            .await
            .map_err(|e| QmpError::generic(crate::qmp::error::strip_os_error(&e.to_string())))?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(server.run(stop_rx));
        *nbd = Some(NbdRunning { stop, task });
        self.state().nbd_max_connections = Some(max_connections);
        Ok(())
    }

    /// nbd-server-stop: every NBD export goes (newest first, each with its
    /// event), then the server.
    pub async fn stop_nbd(&self) -> QmpResult<()> {
        let mut nbd = self.nbd.lock().await;
        let Some(running) = nbd.take() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        let doomed: Vec<ExportRecord> = {
            let mut st = self.state();
            st.nbd_max_connections = None;
            let mut v = std::mem::take(&mut st.exports);
            v.reverse();
            v
        };
        for rec in doomed {
            self.drop_export(rec);
        }
        let _ = running.stop.send(true);
        // Wait until the old server has removed its socket, so a new one
        // may bind the same path at once.
        if tokio::time::timeout(NBD_STOP_LIMIT, running.task)
            .await
            .is_err()
        {
            warn!("the NBD server did not stop in time");
        }
        Ok(())
    }
}

fn release_bitmaps(bitmaps: &[SharedBitmap]) {
    for b in bitmaps {
        lock(b).state.busy = false;
    }
}

fn close_node(d: &BlockDev) {
    if let Err(e) = d.node.store_bitmaps() {
        warn!(node = %d.name, error = %e, "could not store bitmaps on close");
    }
}

/// The allocated size of a host file, as qemu's `actual-size`.
pub fn allocated_size(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}
