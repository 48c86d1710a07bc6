//! What a server offers: named exports over block nodes, and the table the
//! handshake looks them up in. The table is shared with the control plane,
//! which adds and removes exports at run time.

use std::sync::{Arc, RwLock};

use super::context::{AllocationDepth, BaseAllocation, Contexts, MetaContext};
use super::proto::*;
use crate::block::link::Root;
use crate::block::BlockNode;

pub struct Export {
    pub name: String,
    pub description: Option<String>,
    /// The export's handle on its node: follows the node when the graph
    /// replaces it (a filter inserted above, a snapshot, a mirror pivot).
    pub root: Arc<Root>,
    /// The export's view: read-only even when the node is writable.
    pub read_only: bool,
    /// Whether several connections may be used as one (CAN_MULTI_CONN).
    pub multi_conn: bool,
    /// What BLOCK_STATUS can report, with qemu's IDs.
    pub contexts: Contexts,
    /// Turns true when the export is removed by force (QMP
    /// block-export-del mode=hard): its connections end, as in qemu.
    closed: tokio::sync::watch::Sender<bool>,
    /// Bytes clients asked to read (a backup session's progress).
    read_bytes: std::sync::atomic::AtomicU64,
    /// Connections attached now (see [`Export::attach`]), and the signal
    /// that one left.
    conns: std::sync::Mutex<usize>,
    left: std::sync::Condvar,
}

/// A connection's hold on its export: counted while it lives.
pub struct Attachment(Arc<Export>);

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut n = self.0.conns.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        self.0.left.notify_all();
    }
}

/// What an export is built from; the rest is derived.
pub struct ExportConfig {
    pub name: String,
    pub description: Option<String>,
    pub read_only: bool,
    pub multi_conn: bool,
    pub allocation_depth: bool,
    /// The dirty-bitmap contexts, in the export's order: the `i`-th has ID
    /// 2 + `i` (see [`Contexts`]).
    pub bitmap_contexts: Vec<Arc<dyn MetaContext>>,
}

impl Export {
    pub fn new(root: Arc<Root>, cfg: ExportConfig) -> Export {
        let depth = cfg
            .allocation_depth
            .then(|| -> Arc<dyn MetaContext> { Arc::new(AllocationDepth(root.clone())) });
        let contexts = Contexts::new(
            Arc::new(BaseAllocation(root.clone())),
            depth,
            cfg.bitmap_contexts,
        );
        let read_only = cfg.read_only || root.get().read_only();
        Export {
            name: cfg.name,
            description: cfg.description,
            read_only,
            multi_conn: cfg.multi_conn,
            root,
            contexts,
            closed: tokio::sync::watch::channel(false).0,
            read_bytes: Default::default(),
            conns: std::sync::Mutex::new(0),
            left: std::sync::Condvar::new(),
        }
    }

    /// Ends every connection to this export (after their in-flight
    /// requests are answered).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Fires when [`Export::close`] is called.
    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.subscribe()
    }

    pub fn size(&self) -> u64 {
        self.root.get().size()
    }

    /// A connection attaches for as long as it serves requests.
    pub fn attach(self: &Arc<Self>) -> Attachment {
        *self.conns.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Attachment(self.clone())
    }

    /// Connections attached now.
    pub fn connections(&self) -> usize {
        *self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `limit` for every connection to go; whether they did.
    /// (A client that just hung up may take a moment to be noticed.)
    pub fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let n = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let (n, _) = self
            .left
            .wait_timeout_while(n, limit, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *n == 0
    }

    /// Counts a read request of `len` bytes.
    pub fn note_read(&self, len: u64) {
        self.read_bytes
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes clients asked to read so far.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Transmission flags, as qemu computes them for the same export.
    pub fn flags(&self, mode: Mode) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        // DF only means something with structured replies (qemu does the same).
        if mode >= Mode::Structured {
            f |= FLAG_SEND_DF;
        }
        if self.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if self.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        if mode == Mode::Extended {
            f |= FLAG_BLOCK_STAT_PAYLOAD;
        }
        f
    }
}

/// The exports a server offers, in the order they were added (NBD_OPT_LIST
/// order).
#[derive(Default, Clone)]
pub struct ExportTable {
    inner: Arc<RwLock<Vec<Arc<Export>>>>,
}

impl ExportTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let t = self.inner.read().unwrap_or_else(|p| p.into_inner());
        t.iter().find(|e| e.name == name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Export>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds an export; fails if the name is taken.
    pub fn add(&self, export: Export) -> Result<Arc<Export>, String> {
        let mut t = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if t.iter().any(|e| e.name == export.name) {
            return Err(format!("export '{}' already exists", export.name));
        }
        let e = Arc::new(export);
        t.push(e.clone());
        Ok(e)
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut t = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let i = t.iter().position(|e| e.name == name)?;
        Some(t.remove(i))
    }
}
