//! qemu's `blkdebug` filter: passes requests to its `image` child and
//! fails the ones its rules pick, so tests can see how everything above
//! (formats, exports, jobs) handles I/O errors, ENOSPC above all.
//!
//! The model is qemu's, checked against qemu-storage-daemon 10.0.2:
//!
//! - Rules are *armed* by events and *fire* on requests. An event arms
//!   every `inject-error` rule of that event whose `state` matches (0: any
//!   state); arming replaces the whole armed set, and an event with no
//!   matching inject rule leaves it alone. An armed rule stays armed, and
//!   hits every later request of its `iotype` (default: read, write,
//!   write-zeroes, discard and flush, not block-status) that covers its
//!   `sector` (default -1: any request; a flush covers no sector), until
//!   another event re-arms. Among armed rules the first defined wins.
//! - A fired rule fails the request with `errno` (default EIO) and the
//!   child is not touched; `once` deletes the rule when it fires.
//!   `immediately` only chooses, in qemu, whether the error comes back at
//!   once or after one trip through the event loop; both skip the I/O, so
//!   in a synchronous layer the two are the same.
//! - `set-state` rules move the node from `state` to `new_state` when their
//!   event comes (the first defined wins); the new state counts from the
//!   next event on. The node starts in state 1; event `none` comes once,
//!   when it opens.
//!
//! Which events come when: `pwritev` before and `pwritev_done` after every
//! write, `pwritev_zero`/`pwritev_done` around a write-zeroes: qemu's block
//! layer raises these on the node being written, so they come as in qemu
//! wherever the node sits. `read_aio`, `write_aio`, `flush_to_os` and
//! `flush_to_disk` are raised in qemu by the *parent* (raw and qcow2 raise
//! them on their `file` child for guest data); tidemark's parents raise no
//! events, so this node raises them itself for every read, write and flush
//! it gets. That is qemu's behaviour under a raw node (the way blkdebug is
//! used: `raw` over `blkdebug` over `file`); the differences are where qemu
//! raises none: a blkdebug node used directly by an export or job (qsd
//! never raises `read_aio` there), and a qcow2 parent's metadata I/O. The
//! other qemu events (qcow2 internals, `pwritev_rmw_*`) are accepted and
//! never come. A flush raises its events only after a write since the last
//! successful flush, as qemu's flush skips a node with nothing to flush.
//!
//! `align`, `opt-write-zero`, `max-write-zero`, `opt-discard` and
//! `max-discard` are checked as qemu checks them but do not reshape
//! requests; `max-transfer` splits reads and writes into pieces, each
//! checked on its own (so a write may fail after its first pieces were
//! written, as in qemu). `take-child-perms` and `unshare-child-perms` are
//! accepted and ignored: tidemark's image locks follow the users instead.
//! `config` names a file in qemu's config syntax with more rules.
//!
//! Thread safety: the rules live behind one mutex, taken only to decide
//! (arm, check, count), never across the child's I/O.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};

use super::link::{Active, Child, ChildRole};
use super::node::Node;
use super::{BlockError, BlockNode, BlockResult, DepthExtent, ErrorKind, Extent, ZeroFlags};

/// The events of qemu's BlkdebugEvent, in its order, with its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    L1Update,
    L1GrowAllocTable,
    L1GrowWriteTable,
    L1GrowActivateTable,
    L2Load,
    L2Update,
    L2UpdateCompressed,
    L2AllocCowRead,
    L2AllocWrite,
    ReadAio,
    ReadBackingAio,
    ReadCompressed,
    WriteAio,
    WriteCompressed,
    VmstateLoad,
    VmstateSave,
    CowRead,
    CowWrite,
    ReftableLoad,
    ReftableGrow,
    ReftableUpdate,
    RefblockLoad,
    RefblockUpdate,
    RefblockUpdatePart,
    RefblockAlloc,
    RefblockAllocHookup,
    RefblockAllocWrite,
    RefblockAllocWriteBlocks,
    RefblockAllocWriteTable,
    RefblockAllocSwitchTable,
    ClusterAlloc,
    ClusterAllocBytes,
    ClusterFree,
    FlushToOs,
    FlushToDisk,
    PwritevRmwHead,
    PwritevRmwAfterHead,
    PwritevRmwTail,
    PwritevRmwAfterTail,
    Pwritev,
    PwritevZero,
    PwritevDone,
    EmptyImagePrepare,
    L1ShrinkWriteTable,
    L1ShrinkFreeL2Clusters,
    CorWrite,
    ClusterAllocSpace,
    /// qemu's `none`: raised once, when the node opens.
    Opened,
}

const EVENTS: [(Event, &str); 48] = [
    (Event::L1Update, "l1_update"),
    (Event::L1GrowAllocTable, "l1_grow_alloc_table"),
    (Event::L1GrowWriteTable, "l1_grow_write_table"),
    (Event::L1GrowActivateTable, "l1_grow_activate_table"),
    (Event::L2Load, "l2_load"),
    (Event::L2Update, "l2_update"),
    (Event::L2UpdateCompressed, "l2_update_compressed"),
    (Event::L2AllocCowRead, "l2_alloc_cow_read"),
    (Event::L2AllocWrite, "l2_alloc_write"),
    (Event::ReadAio, "read_aio"),
    (Event::ReadBackingAio, "read_backing_aio"),
    (Event::ReadCompressed, "read_compressed"),
    (Event::WriteAio, "write_aio"),
    (Event::WriteCompressed, "write_compressed"),
    (Event::VmstateLoad, "vmstate_load"),
    (Event::VmstateSave, "vmstate_save"),
    (Event::CowRead, "cow_read"),
    (Event::CowWrite, "cow_write"),
    (Event::ReftableLoad, "reftable_load"),
    (Event::ReftableGrow, "reftable_grow"),
    (Event::ReftableUpdate, "reftable_update"),
    (Event::RefblockLoad, "refblock_load"),
    (Event::RefblockUpdate, "refblock_update"),
    (Event::RefblockUpdatePart, "refblock_update_part"),
    (Event::RefblockAlloc, "refblock_alloc"),
    (Event::RefblockAllocHookup, "refblock_alloc_hookup"),
    (Event::RefblockAllocWrite, "refblock_alloc_write"),
    (
        Event::RefblockAllocWriteBlocks,
        "refblock_alloc_write_blocks",
    ),
    (Event::RefblockAllocWriteTable, "refblock_alloc_write_table"),
    (
        Event::RefblockAllocSwitchTable,
        "refblock_alloc_switch_table",
    ),
    (Event::ClusterAlloc, "cluster_alloc"),
    (Event::ClusterAllocBytes, "cluster_alloc_bytes"),
    (Event::ClusterFree, "cluster_free"),
    (Event::FlushToOs, "flush_to_os"),
    (Event::FlushToDisk, "flush_to_disk"),
    (Event::PwritevRmwHead, "pwritev_rmw_head"),
    (Event::PwritevRmwAfterHead, "pwritev_rmw_after_head"),
    (Event::PwritevRmwTail, "pwritev_rmw_tail"),
    (Event::PwritevRmwAfterTail, "pwritev_rmw_after_tail"),
    (Event::Pwritev, "pwritev"),
    (Event::PwritevZero, "pwritev_zero"),
    (Event::PwritevDone, "pwritev_done"),
    (Event::EmptyImagePrepare, "empty_image_prepare"),
    (Event::L1ShrinkWriteTable, "l1_shrink_write_table"),
    (Event::L1ShrinkFreeL2Clusters, "l1_shrink_free_l2_clusters"),
    (Event::CorWrite, "cor_write"),
    (Event::ClusterAllocSpace, "cluster_alloc_space"),
    (Event::Opened, "none"),
];

impl Event {
    pub fn parse(name: &str) -> Option<Event> {
        EVENTS.iter().find(|(_, n)| *n == name).map(|(e, _)| *e)
    }

    pub fn name(self) -> &'static str {
        EVENTS
            .iter()
            .find(|(e, _)| *e == self)
            .map_or("none", |(_, n)| n)
    }
}

/// The kinds of request a rule may fail (qemu's BlkdebugIOType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

const IO_TYPES: [(IoType, &str); 6] = [
    (IoType::Read, "read"),
    (IoType::Write, "write"),
    (IoType::WriteZeroes, "write-zeroes"),
    (IoType::Discard, "discard"),
    (IoType::Flush, "flush"),
    (IoType::BlockStatus, "block-status"),
];

impl IoType {
    pub fn parse(name: &str) -> Option<IoType> {
        IO_TYPES.iter().find(|(_, n)| *n == name).map(|(t, _)| *t)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// What a rule without `iotype` hits: everything but block status.
const DEFAULT_IO_MASK: u8 = !(1 << IoType::BlockStatus as u8) & 0x3f;

/// One `inject-error` rule.
#[derive(Debug, Clone)]
struct InjectRule {
    event: Event,
    /// 0: any state.
    state: i32,
    io_mask: u8,
    errno: i32,
    /// Byte offset of the sector the request must cover; `None`: any.
    offset: Option<u64>,
    once: bool,
    /// Cleared when a `once` rule has fired: the rule is gone.
    live: bool,
}

/// One `set-state` rule.
#[derive(Debug, Clone)]
struct SetStateRule {
    event: Event,
    state: i32,
    new_state: i32,
}

/// The rule book and where it stands; behind the node's mutex.
#[derive(Debug)]
struct Rules {
    state: i32,
    inject: Vec<InjectRule>,
    set_state: Vec<SetStateRule>,
    /// Indices into `inject` of the armed rules, in definition order.
    /// Reused, so arming allocates nothing after the first time.
    armed: Vec<usize>,
    /// How often each inject rule has failed a request (for tests).
    fired: Vec<u64>,
}

impl Rules {
    fn new(inject: Vec<InjectRule>, set_state: Vec<SetStateRule>) -> Rules {
        let n = inject.len();
        Rules {
            state: 1,
            inject,
            set_state,
            armed: Vec::with_capacity(n),
            fired: vec![0; n],
        }
    }

    fn in_state(&self, state: i32) -> bool {
        state == 0 || state == self.state
    }

    /// `ev` happened: arm its inject rules, then switch state.
    fn event(&mut self, ev: Event) {
        let mut new_state = self.state;
        // qemu walks its newest rule first and the last write wins.
        for r in self.set_state.iter().rev() {
            if r.event == ev && self.in_state(r.state) {
                new_state = r.new_state;
            }
        }
        let mut rearmed = false;
        for (i, r) in self.inject.iter().enumerate() {
            if r.live && r.event == ev && self.in_state(r.state) {
                if !rearmed {
                    self.armed.clear();
                    rearmed = true;
                }
                self.armed.push(i);
            }
        }
        self.state = new_state;
    }

    /// Whether an armed rule fails this request; the errno if so.
    fn check(&mut self, io: IoType, offset: u64, len: u64) -> Option<i32> {
        let covers = |r: &InjectRule| match r.offset {
            None => true,
            Some(o) => len > 0 && o >= offset && o - offset < len,
        };
        let pos = self.armed.iter().position(|&i| {
            let r = &self.inject[i];
            r.io_mask & io.bit() != 0 && covers(r)
        })?;
        let i = self.armed[pos];
        let errno = self.inject[i].errno;
        // qemu: a matching rule with errno 0 ends the search, harmlessly.
        if errno == 0 {
            return None;
        }
        self.fired[i] += 1;
        if self.inject[i].once {
            self.armed.remove(pos);
            self.inject[i].live = false;
        }
        // A negative errno is qemu's positive return: not a failure.
        (errno > 0).then_some(errno)
    }
}

pub struct Blkdebug {
    image: Arc<Child>,
    read_only: AtomicBool,
    rules: Mutex<Rules>,
    /// No rules at all: requests skip the mutex.
    idle: bool,
    /// Largest piece a read or write reaches the child in (0: no limit).
    max_transfer: u64,
    /// Writes started, and the count at the last successful flush: a
    /// flush with nothing new to flush raises no events (qemu's
    /// write_gen / flushed_gen).
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
}

/// The limits qemu checks at open (bytes; 0: the child's).
#[derive(Debug, Default, Clone, Copy)]
struct Limits {
    align: u64,
    max_transfer: u64,
    opt_write_zero: u64,
    max_write_zero: u64,
    opt_discard: u64,
    max_discard: u64,
}

impl Blkdebug {
    fn open(image: Arc<Node>, rules: Rules, limits: Limits, read_only: bool) -> Blkdebug {
        let read_only = read_only || image.read_only();
        let idle = rules.inject.is_empty() && rules.set_state.is_empty();
        let node = Blkdebug {
            image: Child::new(ChildRole::Filtered, image),
            read_only: AtomicBool::new(read_only),
            rules: Mutex::new(rules),
            idle,
            max_transfer: limits.max_transfer,
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
        };
        node.raise(&[Event::Opened]);
        node
    }

    /// How many requests inject-error rule `rule` (its index among the
    /// `config` file's rules, then the `inject-error` list) has failed.
    pub fn fired(&self, rule: usize) -> u64 {
        self.lock().fired.get(rule).copied().unwrap_or(0)
    }

    /// The current state (set-state rules move it).
    pub fn state(&self) -> i32 {
        self.lock().state
    }

    fn lock(&self) -> MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn child(&self) -> Active<'_> {
        self.image.get()
    }

    fn raise(&self, events: &[Event]) {
        if self.idle {
            return;
        }
        let mut r = self.lock();
        for &e in events {
            r.event(e);
        }
    }

    /// Fails the request if an armed rule says so.
    fn check(&self, io: IoType, offset: u64, len: u64) -> BlockResult<()> {
        if self.idle {
            return Ok(());
        }
        match self.lock().check(io, offset, len) {
            Some(errno) => Err(injected(errno)),
            None => Ok(()),
        }
    }

    fn writable(&self) -> BlockResult<()> {
        if self.read_only() {
            return Err(BlockError::new(ErrorKind::Permission, "Node is read-only"));
        }
        Ok(())
    }

    /// The length of the piece at `done` of a request `len` long.
    fn piece(&self, done: usize, len: usize) -> usize {
        let rest = len - done;
        match usize::try_from(self.max_transfer) {
            Ok(m) if m > 0 => rest.min(m),
            _ => rest,
        }
    }

    fn write_pieces(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.piece(done, buf.len());
            let at = offset + done as u64;
            self.check(IoType::Write, at, n as u64)?;
            self.child().write_at(&buf[done..done + n], at, fua)?;
            done += n;
        }
        Ok(())
    }

    /// After a write-type request, successful or not (qemu counts both).
    fn wrote(&self) {
        self.write_gen.fetch_add(1, Ordering::AcqRel);
    }
}

/// The error a rule injects: qemu's strerror text, and the kind qemu's
/// NBD server would turn that errno into (so NBD clients and jobs see the
/// same code: ENOSPC stays ENOSPC).
fn injected(errno: i32) -> BlockError {
    let kind = match errno {
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ErrorKind::NoSpace,
        libc::EPERM | libc::EROFS => ErrorKind::Permission,
        libc::ENOTSUP => ErrorKind::NotSupported,
        // ErrorKind has no ENOMEM, EOVERFLOW or ESHUTDOWN: a host error.
        libc::EIO | libc::ENOMEM | libc::EOVERFLOW | libc::ESHUTDOWN => ErrorKind::Io,
        // qemu's NBD server sends EINVAL for every other errno.
        _ => ErrorKind::Invalid,
    };
    let err = io::Error::from_raw_os_error(errno);
    BlockError {
        kind,
        context: strerror(&err),
        source: Some(err),
    }
}

/// strerror's text: Rust's Display adds " (os error N)".
fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

impl BlockNode for Blkdebug {
    fn size(&self) -> u64 {
        self.child().size()
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        if !read_only && self.child().read_only() {
            return Err(BlockError::new(
                ErrorKind::Permission,
                "the image node is read-only",
            ));
        }
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }

    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.image.clone()]
    }

    fn filename(&self) -> Option<std::path::PathBuf> {
        self.child().filename()
    }

    fn allocated_size(&self) -> Option<u64> {
        // qemu asks a protocol-level filter for its own file size and gets
        // ENOTSUP: qsd shows no actual-size here, nor on a raw node above.
        None
    }

    fn debug_event(&self, event: crate::block::DebugEvent) {
        self.raise(&[match event {
            crate::block::DebugEvent::ReadAio => Event::ReadAio,
            crate::block::DebugEvent::WriteAio => Event::WriteAio,
        }]);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let len = buf.len();
        let mut done = 0;
        while done < len {
            let n = self.piece(done, len);
            let at = offset + done as u64;
            self.check(IoType::Read, at, n as u64)?;
            self.child().read_at(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.writable()?;
        self.raise(&[Event::Pwritev]);
        let r = self.write_pieces(buf, offset, fua);
        self.raise(&[Event::PwritevDone]);
        self.wrote();
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.writable()?;
        self.raise(&[Event::PwritevZero]);
        let r = self
            .check(IoType::WriteZeroes, offset, len)
            .and_then(|()| self.child().write_zeroes(offset, len, flags));
        self.raise(&[Event::PwritevDone]);
        self.wrote();
        r
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable()?;
        let r = self
            .check(IoType::Discard, offset, len)
            .and_then(|()| self.child().discard(offset, len));
        self.wrote();
        r
    }

    fn flush(&self) -> BlockResult<()> {
        let gen = self.write_gen.load(Ordering::Acquire);
        if self.read_only() || gen == self.flushed_gen.load(Ordering::Acquire) {
            // qemu skips this node (no events, no rule check) and goes on
            // to the children.
            return self.child().flush();
        }
        self.raise(&[Event::FlushToOs, Event::FlushToDisk]);
        self.check(IoType::Flush, 0, 0)?;
        self.child().flush()?;
        self.flushed_gen.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.check(IoType::BlockStatus, offset, len)?;
        self.child().block_status(offset, len)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<DepthExtent> {
        self.child().allocation_depth(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.child().cache(offset, len)
    }

    fn discard_zeroes(&self) -> bool {
        self.child().discard_zeroes()
    }

    fn format_name(&self) -> &'static str {
        crate::block::open::Driver::Blkdebug.name()
    }

    fn cluster_size(&self) -> u64 {
        self.child().cluster_size()
    }
}

/// Opens a `blkdebug` node over `image` from blockdev-add options, with
/// qemu's checks and error texts.
pub fn from_options(
    opts: &Map<String, Value>,
    image: Arc<Node>,
    read_only: bool,
) -> BlockResult<Arc<dyn BlockNode>> {
    Ok(Arc::new(open_options(opts, image, read_only)?))
}

/// [`from_options`], keeping the concrete type (tests read the counters).
pub fn open_options(
    opts: &Map<String, Value>,
    image: Arc<Node>,
    read_only: bool,
) -> BlockResult<Blkdebug> {
    let limits = limits(opts)?;
    let mut inject = Vec::new();
    let mut set_state = Vec::new();
    if let Some(path) = opts.get("config").and_then(Value::as_str) {
        read_config(Path::new(path), &mut inject, &mut set_state)?;
    }
    for r in list(opts, "inject-error") {
        inject.push(inject_rule(&|k| r.get(k).map(Opt::Json))?);
    }
    for r in list(opts, "set-state") {
        set_state.push(set_state_rule(&|k| r.get(k).map(Opt::Json))?);
    }
    Ok(Blkdebug::open(
        image,
        Rules::new(inject, set_state),
        limits,
        read_only,
    ))
}

fn list<'a>(
    opts: &'a Map<String, Value>,
    key: &str,
) -> impl Iterator<Item = &'a Map<String, Value>> {
    opts.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

/// A rule option as given: typed JSON from QMP, or text from a config file.
enum Opt<'a> {
    Json(&'a Value),
    Text(&'a str),
}

impl Opt<'_> {
    fn str(&self) -> Option<&str> {
        match self {
            Opt::Json(v) => v.as_str(),
            Opt::Text(s) => Some(s),
        }
    }

    /// A number, truncated to C's int as qemu stores it.
    fn int(&self, key: &str) -> BlockResult<i32> {
        let n = match self {
            Opt::Json(v) => v.as_i64().or_else(|| v.as_u64().map(|u| u as i64)),
            Opt::Text(s) => parse_number(s),
        };
        n.map(|n| n as i32)
            .ok_or_else(|| BlockError::invalid(format!("Parameter '{key}' expects a number")))
    }

    fn int64(&self, key: &str) -> BlockResult<i64> {
        let n = match self {
            Opt::Json(v) => v.as_i64().or_else(|| v.as_u64().map(|u| u as i64)),
            Opt::Text(s) => parse_number(s),
        };
        n.ok_or_else(|| BlockError::invalid(format!("Parameter '{key}' expects a number")))
    }

    fn bool(&self, key: &str) -> BlockResult<bool> {
        let b = match self {
            Opt::Json(v) => v.as_bool(),
            Opt::Text(s) => match *s {
                "on" | "yes" | "true" | "y" => Some(true),
                "off" | "no" | "false" | "n" => Some(false),
                _ => None,
            },
        };
        b.ok_or_else(|| BlockError::invalid(format!("Parameter '{key}' expects 'on' or 'off'")))
    }
}

/// qemu's QEMU_OPT_NUMBER text: decimal, 0x hex or 0 octal, as strtoull
/// (so "-1" wraps).
fn parse_number(s: &str) -> Option<i64> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    let n = if let Some(h) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(h, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    let n = n as i64;
    Some(if neg { n.wrapping_neg() } else { n })
}

type Lookup<'a, 'b> = dyn Fn(&str) -> Option<Opt<'b>> + 'a;

fn event_of(get: &Lookup) -> BlockResult<Event> {
    let Some(name) = get("event") else {
        return Err(BlockError::invalid("Missing event name for rule"));
    };
    let name = name.str().unwrap_or("");
    Event::parse(name).ok_or_else(|| {
        BlockError::invalid(format!("Parameter 'event' does not accept value '{name}'"))
    })
}

fn inject_rule(get: &Lookup) -> BlockResult<InjectRule> {
    let event = event_of(get)?;
    let state = get("state")
        .map(|o| o.int("state"))
        .transpose()?
        .unwrap_or(0);
    let errno = get("errno")
        .map(|o| o.int("errno"))
        .transpose()?
        .unwrap_or(libc::EIO);
    let sector = get("sector")
        .map(|o| o.int64("sector"))
        .transpose()?
        .unwrap_or(-1);
    // qemu keeps sector * 512 as a signed offset and compares it unsigned:
    // any other negative sector is an offset no request reaches.
    let offset = match sector {
        -1 => None,
        s => Some(
            u64::try_from(s)
                .ok()
                .and_then(|s| s.checked_mul(512))
                .unwrap_or(u64::MAX),
        ),
    };
    let once = get("once")
        .map(|o| o.bool("once"))
        .transpose()?
        .unwrap_or(false);
    // Accepted for qemu's sake; see the module comment.
    get("immediately")
        .map(|o| o.bool("immediately"))
        .transpose()?;
    let io_mask = match get("iotype") {
        None => DEFAULT_IO_MASK,
        Some(o) => {
            let name = o.str().unwrap_or("");
            IoType::parse(name)
                .ok_or_else(|| {
                    BlockError::invalid(format!(
                        "Parameter 'iotype' does not accept value '{name}'"
                    ))
                })?
                .bit()
        }
    };
    Ok(InjectRule {
        event,
        state,
        io_mask,
        errno,
        offset,
        once,
        live: true,
    })
}

fn set_state_rule(get: &Lookup) -> BlockResult<SetStateRule> {
    let event = event_of(get)?;
    let state = get("state")
        .map(|o| o.int("state"))
        .transpose()?
        .unwrap_or(0);
    let new_state = get("new_state")
        .map(|o| o.int("new_state"))
        .transpose()?
        .unwrap_or(0);
    Ok(SetStateRule {
        event,
        state,
        new_state,
    })
}

/// Reads rules from a file in qemu's config syntax:
///
/// ```text
/// [inject-error]
/// event = "write_aio"
/// errno = "28"
/// ```
fn read_config(
    path: &Path,
    inject: &mut Vec<InjectRule>,
    set_state: &mut Vec<SetStateRule>,
) -> BlockResult<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BlockError::io("Could not read blkdebug config file", e))?;
    let bad = || BlockError::invalid("Could not parse blkdebug config file");
    // (group, options) in file order.
    let mut groups: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            // `[group]` or `[group "id"]`: the id does not matter here.
            let name = head.split_whitespace().next().unwrap_or("");
            if name != "inject-error" && name != "set-state" {
                return Err(bad());
            }
            groups.push((name.to_owned(), Vec::new()));
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        let value = value
            .trim()
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(bad)?;
        let group = groups.last_mut().ok_or_else(bad)?;
        group.1.push((key.trim().to_owned(), value.to_owned()));
    }
    for (name, opts) in &groups {
        let get = |k: &str| {
            opts.iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| Opt::Text(v.as_str()))
        };
        if name == "inject-error" {
            inject.push(inject_rule(&get)?);
        } else {
            set_state.push(set_state_rule(&get)?);
        }
    }
    Ok(())
}

/// The request-shape options, checked in qemu's order with its texts.
fn limits(opts: &Map<String, Value>) -> BlockResult<Limits> {
    const INT_MAX: u64 = i32::MAX as u64;
    // The schema says `int`; qemu's are int32 (but `align`) and sizes.
    let get = |key: &str, int32: bool| -> BlockResult<u64> {
        let Some(v) = opts.get(key) else {
            return Ok(0);
        };
        let n = v.as_i64().unwrap_or(i64::MAX);
        if int32 && i32::try_from(n).is_err() {
            return Err(BlockError::invalid(format!(
                "Parameter '{key}' expects int32_t"
            )));
        }
        u64::try_from(n).map_err(|_| {
            BlockError::invalid(format!("Value '{n}' is out of range for parameter '{key}'"))
        })
    };
    let l = Limits {
        align: get("align", false)?,
        max_transfer: get("max-transfer", true)?,
        opt_write_zero: get("opt-write-zero", true)?,
        max_write_zero: get("max-write-zero", true)?,
        opt_discard: get("opt-discard", true)?,
        max_discard: get("max-discard", true)?,
    };
    let refuse = |key: &str, n: u64| {
        Err(BlockError::invalid(format!(
            "Cannot meet constraints with {key} {n}"
        )))
    };
    if l.align != 0 && (l.align >= INT_MAX || !l.align.is_power_of_two()) {
        return refuse("align", l.align);
    }
    // The child's own alignment is 1 byte in tidemark.
    let align = l.align.max(1);
    let fits = |n: u64, unit: u64| n == 0 || (n < INT_MAX && n.is_multiple_of(unit));
    if !fits(l.max_transfer, align) {
        return refuse("max-transfer", l.max_transfer);
    }
    if !fits(l.opt_write_zero, align) {
        return refuse("opt-write-zero", l.opt_write_zero);
    }
    if !fits(l.max_write_zero, l.opt_write_zero.max(align)) {
        return refuse("max-write-zero", l.max_write_zero);
    }
    if !fits(l.opt_discard, align) {
        return refuse("opt-discard", l.opt_discard);
    }
    if !fits(l.max_discard, l.opt_discard.max(align)) {
        return refuse("max-discard", l.max_discard);
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::file::FileNode;
    use serde_json::json;

    /// A 1 MiB image of 0xab bytes as a node.
    fn image(dir: &tempfile::TempDir) -> Arc<Node> {
        let path = dir.path().join("img.raw");
        std::fs::write(&path, vec![0xabu8; 1 << 20]).expect("write image");
        let f = FileNode::open_unlocked(&path, false).expect("open file");
        Arc::new(Node::open("file", Arc::new(f)).expect("node"))
    }

    /// A blkdebug node, and a raw node over it: as in qemu's iotests, the
    /// format layer above raises read_aio / write_aio for its requests.
    fn blkdebug(opts: serde_json::Value) -> (tempfile::TempDir, Arc<Blkdebug>, Node) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = opts.as_object().cloned().unwrap_or_default();
        let bd = Arc::new(open_options(&opts, image(&dir), false).expect("open blkdebug"));
        let bd_node = Arc::new(Node::open("bd", bd.clone()).expect("node"));
        let raw = crate::block::raw::RawFormat::new(bd_node, false);
        let node = Node::open("raw", Arc::new(raw)).expect("node");
        (dir, bd, node)
    }

    fn read(n: &Node, offset: u64, len: usize) -> BlockResult<Vec<u8>> {
        let mut buf = vec![0u8; len];
        n.read_at(&mut buf, offset)?;
        Ok(buf)
    }

    #[test]
    fn without_rules_requests_pass_through() {
        let (_d, _bd, n) = blkdebug(json!({}));
        assert_eq!(n.size(), 1 << 20);
        assert_eq!(_bd.format_name(), "blkdebug");
        assert_eq!(read(&n, 0, 16).expect("read"), vec![0xab; 16]);
        n.write_at(&[1u8; 4096], 4096, false).expect("write");
        n.write_zeroes(8192, 4096, ZeroFlags::default())
            .expect("zero");
        n.discard(12288, 4096).expect("discard");
        n.flush().expect("flush");
        assert_eq!(read(&n, 4096, 4).expect("read"), vec![1; 4]);
        assert_eq!(read(&n, 8192, 4).expect("read"), vec![0; 4]);
        assert_eq!(_bd.children().len(), 1);
        assert_eq!(_bd.children()[0].role, ChildRole::Filtered);
    }

    #[test]
    fn enospc_on_write_aio_fails_the_write_as_no_space_and_writes_nothing() {
        let (_d, bd, n) = blkdebug(json!({"inject-error": [{"event": "write_aio", "errno": 28}]}));
        let e = n.write_at(&[1u8; 512], 0, false).expect_err("injected");
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert_eq!(e.context, "No space left on device");
        assert_eq!(bd.fired(0), 1);
        // Armed for every later request of the default kinds, reads too.
        let e = read(&n, 0, 512).expect_err("still armed");
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert_eq!(bd.fired(0), 2);
        // The child was never written.
        let child = bd.children()[0].node();
        assert_eq!(read(&child, 0, 4).expect("read child"), vec![0xab; 4]);
    }

    #[test]
    fn a_rule_is_not_armed_before_its_event() {
        let (_d, bd, n) = blkdebug(json!({"inject-error": [{"event": "write_aio"}]}));
        assert_eq!(read(&n, 0, 512).expect("read"), vec![0xab; 512]);
        assert_eq!(bd.fired(0), 0);
        let e = n.write_at(&[1u8; 512], 0, false).expect_err("injected");
        assert_eq!(
            (e.kind, e.context.as_str()),
            (ErrorKind::Io, "Input/output error")
        );
    }

    #[test]
    fn a_once_rule_fires_once_then_is_gone() {
        let (_d, bd, n) =
            blkdebug(json!({"inject-error": [{"event": "write_aio", "errno": 28, "once": true}]}));
        assert!(n.write_at(&[2u8; 512], 0, false).is_err());
        n.write_at(&[3u8; 512], 0, false).expect("second write");
        n.write_at(&[4u8; 512], 0, false).expect("third write");
        assert_eq!(read(&n, 0, 2).expect("read"), vec![4; 2]);
        assert_eq!(bd.fired(0), 1);
    }

    #[test]
    fn a_sector_rule_hits_only_requests_covering_that_sector() {
        let (_d, bd, n) = blkdebug(json!({"inject-error": [{"event": "write_aio", "sector": 8}]}));
        n.write_at(&[1u8; 4096], 0, false).expect("sectors 0-7");
        assert!(n.write_at(&[1u8; 512], 4096, false).is_err());
        assert!(n.write_at(&[1u8; 1024], 3584, false).is_err());
        // Armed: reads of that sector fail too, others pass.
        assert!(read(&n, 4096, 512).is_err());
        read(&n, 0, 512).expect("other sector");
        // A flush covers no sector.
        n.flush().expect("flush");
        assert_eq!(bd.fired(0), 3);
    }

    #[test]
    fn iotype_narrows_a_rule_to_one_kind_of_request() {
        let (_d, _bd, n) = blkdebug(json!({"inject-error": [
            {"event": "read_aio", "iotype": "read", "errno": 1},
            {"event": "read_aio", "iotype": "block-status", "errno": 22}
        ]}));
        let e = read(&n, 0, 512).expect_err("read fails");
        assert_eq!(e.kind, ErrorKind::Permission);
        n.write_at(&[1u8; 512], 0, false)
            .expect("writes unaffected");
        let e = n.block_status(0, 512).expect_err("block status fails");
        assert_eq!(
            (e.kind, e.context.as_str()),
            (ErrorKind::Invalid, "Invalid argument")
        );
    }

    #[test]
    fn block_status_is_only_hit_when_asked_for() {
        let (_d, _bd, n) = blkdebug(json!({"inject-error": [{"event": "none"}]}));
        // `none` came at open: armed at once.
        n.block_status(0, 512).expect("status passes");
        assert!(read(&n, 0, 512).is_err());
    }

    #[test]
    fn states_gate_rules_and_set_state_moves_them() {
        let (_d, bd, n) = blkdebug(json!({
            "inject-error": [{"event": "read_aio", "state": 2}],
            "set-state": [{"event": "write_aio", "state": 1, "new_state": 2},
                          {"event": "write_aio", "state": 1, "new_state": 3}]
        }));
        assert_eq!(bd.state(), 1);
        read(&n, 0, 512).expect("state 1: rule not armed");
        n.write_at(&[1u8; 512], 0, false).expect("write");
        // The first defined set-state wins, as in qemu.
        assert_eq!(bd.state(), 2);
        assert!(read(&n, 0, 512).is_err());
        assert_eq!(bd.fired(0), 1);
    }

    #[test]
    fn a_new_event_with_rules_replaces_the_armed_set() {
        let (_d, bd, n) = blkdebug(json!({"inject-error": [
            {"event": "read_aio", "sector": 0},
            {"event": "write_aio", "sector": 100}
        ]}));
        assert!(read(&n, 0, 512).is_err());
        // write_aio arms rule 1 only: sector 0 works again.
        n.write_at(&[1u8; 512], 0, false)
            .expect("write of sector 0");
        assert!(read(&n, 0, 512).is_err(), "read_aio re-armed rule 0");
        assert_eq!((bd.fired(0), bd.fired(1)), (2, 0));
    }

    #[test]
    fn the_first_defined_of_two_armed_rules_wins() {
        let (_d, bd, n) = blkdebug(json!({"inject-error": [
            {"event": "write_aio", "errno": 28},
            {"event": "write_aio", "errno": 5}
        ]}));
        let e = n.write_at(&[1u8; 512], 0, false).expect_err("fails");
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert_eq!((bd.fired(0), bd.fired(1)), (1, 0));
    }

    #[test]
    fn errno_zero_matches_without_failing() {
        let (_d, bd, n) = blkdebug(json!({"inject-error": [
            {"event": "write_aio", "errno": 0},
            {"event": "write_aio"}
        ]}));
        n.write_at(&[1u8; 512], 0, false)
            .expect("the first rule shields");
        assert_eq!((bd.fired(0), bd.fired(1)), (0, 0));
    }

    #[test]
    fn flush_rules_fire_only_when_there_is_something_to_flush() {
        let (_d, bd, n) =
            blkdebug(json!({"inject-error": [{"event": "flush_to_disk", "iotype": "flush"}]}));
        n.flush().expect("nothing written yet");
        n.write_at(&[1u8; 512], 0, false).expect("write");
        assert!(n.flush().is_err());
        // A failed flush leaves the data unflushed: the next one tries again.
        assert!(n.flush().is_err());
        assert_eq!(bd.fired(0), 2);
    }

    #[test]
    fn pwritev_comes_on_every_write_and_write_zeroes_has_its_own() {
        let (_d, bd, n) = blkdebug(json!({"inject-error": [
            {"event": "pwritev", "iotype": "write", "once": true},
            {"event": "pwritev_zero", "iotype": "write-zeroes", "errno": 28}
        ]}));
        assert!(n.write_at(&[1u8; 512], 0, false).is_err());
        let e = n
            .write_zeroes(0, 512, ZeroFlags::default())
            .expect_err("zero fails");
        assert_eq!(e.kind, ErrorKind::NoSpace);
        n.write_at(&[1u8; 512], 0, false).expect("once rule gone");
        assert_eq!((bd.fired(0), bd.fired(1)), (1, 1));
    }

    #[test]
    fn max_transfer_checks_each_piece_so_earlier_pieces_land() {
        let (_d, bd, n) = blkdebug(json!({
            "max-transfer": 4096,
            "inject-error": [{"event": "write_aio", "sector": 8, "errno": 28}]
        }));
        assert!(n.write_at(&[7u8; 8192], 0, false).is_err());
        let child = bd.children()[0].node();
        assert_eq!(read(&child, 0, 4096).expect("first piece"), vec![7; 4096]);
        assert_eq!(read(&child, 4096, 4).expect("second piece"), vec![0xab; 4]);
    }

    #[test]
    fn errnos_map_to_the_kinds_qemus_nbd_server_sends() {
        let kind = |errno| injected(errno).kind;
        assert_eq!(kind(libc::EIO), ErrorKind::Io);
        assert_eq!(kind(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(kind(libc::EDQUOT), ErrorKind::NoSpace);
        assert_eq!(kind(libc::EPERM), ErrorKind::Permission);
        assert_eq!(kind(libc::ENOTSUP), ErrorKind::NotSupported);
        assert_eq!(kind(libc::EACCES), ErrorKind::Invalid);
        assert_eq!(kind(libc::EINVAL), ErrorKind::Invalid);
        assert_eq!(injected(libc::EPERM).context, "Operation not permitted");
    }

    #[test]
    fn read_only_follows_the_option_and_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = image(&dir);
        let bd = open_options(&Map::new(), img, true).expect("open");
        assert!(bd.read_only());
        let e = bd.write_at(&[1u8; 512], 0, false).expect_err("refused");
        assert_eq!(e.kind, ErrorKind::Permission);
        bd.reopen(false).expect("child is writable");
        bd.write_at(&[1u8; 512], 0, false).expect("write");
    }

    #[test]
    fn limits_are_checked_with_qemu_texts() {
        let err = |v: serde_json::Value| {
            let dir = tempfile::tempdir().expect("tempdir");
            let opts = v.as_object().cloned().unwrap_or_default();
            open_options(&opts, image(&dir), false)
                .err()
                .map(|e| e.context)
                .unwrap_or_default()
        };
        assert_eq!(
            err(json!({"align": 3})),
            "Cannot meet constraints with align 3"
        );
        assert_eq!(
            err(json!({"align": 512, "max-transfer": 1000})),
            "Cannot meet constraints with max-transfer 1000"
        );
        assert_eq!(
            err(json!({"opt-write-zero": 1000, "max-write-zero": 1500})),
            "Cannot meet constraints with max-write-zero 1500"
        );
        assert_eq!(
            err(json!({"max-transfer": 1u64 << 32})),
            "Parameter 'max-transfer' expects int32_t"
        );
        assert_eq!(
            err(json!({"align": -512})),
            "Value '-512' is out of range for parameter 'align'"
        );
        assert_eq!(
            err(json!({"config": "/nonexistent/blkdebug.conf"})),
            "Could not read blkdebug config file: No such file or directory (os error 2)"
        );
        assert_eq!(err(json!({"align": 4096, "max-transfer": 65536})), "");
    }

    #[test]
    fn a_config_file_adds_rules_before_the_options() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("blkdebug.conf");
        std::fs::write(
            &conf,
            "# a comment\n[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nonce = \"on\"\n\n\
             [set-state]\nevent = \"write_aio\"\nnew_state = \"0x5\"\n",
        )
        .expect("write config");
        let opts = json!({"config": conf, "inject-error": [{"event": "read_aio"}]});
        let opts = opts.as_object().cloned().unwrap_or_default();
        let bd = open_options(&opts, image(&dir), false).expect("open");
        bd.debug_event(crate::block::DebugEvent::WriteAio);
        let e = bd.write_at(&[1u8; 512], 0, false).expect_err("config rule");
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert_eq!(bd.state(), 5);
        bd.debug_event(crate::block::DebugEvent::ReadAio);
        assert!(bd.read_at(&mut [0u8; 512], 0).is_err());
        assert_eq!((bd.fired(0), bd.fired(1)), (1, 1));

        std::fs::write(&conf, "[nonsense]\n").expect("write config");
        let e = open_options(&opts, image(&dir), false)
            .err()
            .expect("refused");
        assert_eq!(e.context, "Could not parse blkdebug config file");
    }

    #[test]
    fn rules_are_shared_safely_between_threads() {
        let (_d, bd, n) = blkdebug(json!({"inject-error": [
            {"event": "write_aio", "sector": 0, "once": true}
        ]}));
        let n = Arc::new(n);
        let failures: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let n = n.clone();
                    s.spawn(move || {
                        (0..50)
                            .filter(|_| n.write_at(&[1u8; 512], 0, false).is_err())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(failures, 1, "a once rule fires exactly once");
        assert_eq!(bd.fired(0), 1);
    }
}
