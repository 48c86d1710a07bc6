//! Edges of the block graph: a [`Link`] is how anything reaches a node:
//! a parent through one of its children (qemu's BdrvChild), or an export or
//! job through its root (qemu's BlockBackend). Because every user goes
//! through a link, replacing a node (a filter inserted above it, an overlay
//! put on top, a mirror pivot) is one change per link, made while no
//! request is inside.
//!
//! The drain: a request holds the link's read side for as long as it runs
//! inside the node ([`Link::get`]); a graph change takes the write side of
//! every link into the node ([`Link::write`]), which waits until the
//! requests already in flight have left and holds new ones back until the
//! change is complete. So this one lock *is* held across I/O, on purpose:
//! it is the in-flight count of the edge, not a lock on data. Requests take
//! links top-down (root, then child links), and a graph change only takes
//! links that point at the same node, so the two cannot wait on each other.

use std::ops::Deref;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use super::node::Node;

/// The role of a child edge, with qemu's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildRole {
    /// The storage a format node reads and writes (`file`).
    File,
    /// The layer below a copy-on-write image (`backing`).
    Backing,
    /// The node a filter passes requests to (`file` in qemu's QMP views,
    /// "filtered" in its permission model).
    Filtered,
    /// Where a job or filter copies to (`target`).
    Target,
}

/// A swappable, drainable reference to a node.
pub struct Link {
    node: RwLock<Arc<Node>>,
}

/// A request inside the linked node; the link cannot change meanwhile.
pub struct Active<'a>(RwLockReadGuard<'a, Arc<Node>>);

impl Deref for Active<'_> {
    type Target = Arc<Node>;
    fn deref(&self) -> &Arc<Node> {
        &self.0
    }
}

/// A drained link: no request is inside, and none enters until dropped.
pub struct Drained<'a>(RwLockWriteGuard<'a, Arc<Node>>);

impl Drained<'_> {
    /// Points the link at `node`; requests that were held back go there.
    pub fn set(&mut self, node: Arc<Node>) {
        *self.0 = node;
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.0
    }
}

impl Link {
    pub fn new(node: Arc<Node>) -> Link {
        Link {
            node: RwLock::new(node),
        }
    }

    /// Enters the node for one request (waits while the link is drained).
    pub fn get(&self) -> Active<'_> {
        Active(self.node.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Enters the node only if that needs no waiting: for callers on an
    /// async worker, which must not block behind a graph change.
    pub fn try_get(&self) -> Option<Active<'_>> {
        match self.node.try_read() {
            Ok(g) => Some(Active(g)),
            Err(TryLockError::Poisoned(p)) => Some(Active(p.into_inner())),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The node the link points at now (for looking, not for I/O: a
    /// request must hold [`Link::get`] while it runs).
    pub fn node(&self) -> Arc<Node> {
        self.get().clone()
    }

    /// Drains the link: waits for the requests inside, holds new ones back.
    /// Blocks: never call it on an async worker.
    pub fn write(&self) -> Drained<'_> {
        Drained(self.node.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the link points at `node`.
    pub fn points_at(&self, node: &Arc<Node>) -> bool {
        Arc::ptr_eq(&self.get(), node)
    }
}

/// A child edge: a role and the link to the child.
pub struct Child {
    pub role: ChildRole,
    pub link: Link,
}

impl Child {
    /// A new edge; shared, so a graph walk can hold it while the parent
    /// swaps an optional child (a backing file attached or removed).
    pub fn new(role: ChildRole, node: Arc<Node>) -> Arc<Child> {
        Arc::new(Child {
            role,
            link: Link::new(node),
        })
    }

    pub fn get(&self) -> Active<'_> {
        self.link.get()
    }

    pub fn node(&self) -> Arc<Node> {
        self.link.node()
    }
}

/// The daemon-wide drain (qemu's bdrv_drain_all): every request through a
/// root holds its read side, and a QMP transaction holds the write side
/// from its first prepare to its last commit, so no client request runs
/// between the steps of one transaction (a snapshot, then a bitmap on the
/// new overlay: no write falls between them). Lock order: the gate before
/// any link.
#[derive(Default)]
pub struct Gate(RwLock<()>);

impl Gate {
    /// Waits for the requests in flight, holds new ones back until
    /// dropped. Blocks: never on an async worker.
    pub fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request inside a root's node: through the gate, then the link.
pub struct Entered<'a> {
    active: Active<'a>,
    _gate: RwLockReadGuard<'a, ()>,
}

impl Deref for Entered<'_> {
    type Target = Arc<Node>;
    fn deref(&self) -> &Arc<Node> {
        &self.active
    }
}

/// A user's handle on a node (qemu's BlockBackend): exports and jobs hold
/// one, and the graph moves it when the node it points at is replaced.
pub struct Root {
    pub link: Link,
    /// Whether its user writes (a writable export): the node must then
    /// stay writable, and its image write-locked.
    pub writable: bool,
    gate: Arc<Gate>,
}

impl Root {
    pub fn new(node: Arc<Node>, writable: bool, gate: Arc<Gate>) -> Arc<Root> {
        Arc::new(Root {
            link: Link::new(node),
            writable,
            gate,
        })
    }

    /// Enters the node for one request (waits while the daemon or the
    /// link is drained).
    pub fn get(&self) -> Entered<'_> {
        let gate = self.gate.0.read().unwrap_or_else(|p| p.into_inner());
        Entered {
            active: self.link.get(),
            _gate: gate,
        }
    }

    /// Enters only if that needs no waiting (async workers).
    pub fn try_get(&self) -> Option<Entered<'_>> {
        let gate = match self.gate.0.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Entered {
            active: self.link.try_get()?,
            _gate: gate,
        })
    }

    pub fn node(&self) -> Arc<Node> {
        self.link.node()
    }
}
