//! Power-cut replay of the intent log (src/block/qcow2/intent.rs).
//!
//! `tidemark daemon` serves a 1 GiB qcow2 image with two recording
//! persistent bitmaps (64 KiB and 512 KiB granules) and a disabled one
//! through a writable NBD export. A seeded guest sends writes (each sector
//! stamped with the write's index and offset), write-zeroes, trims and
//! flushes, DEPTH in flight, phase by phase in 2 MiB windows (some
//! straddling a zone boundary, some revisited). Store points happen while
//! writes are in flight: `x-tidemark-bitmap-store` in STORE_PHASES, and
//! the daemon's timer (`--bitmap-store-interval 1`), which the guest waits
//! for in TIMER_PHASES, writing on. Then the daemon is killed (SIGKILL)
//! with requests in flight. `TIDEMARK_IO_TRACE` made it record every
//! write, zeroing, discard and flush it made to the image file
//! (src/block/io_trace.rs).
//!
//! The replay rebuilds what a power cut could have left, from the image as
//! it was before the daemon opened it: the durable image at every recorded
//! flush (everything before it; a seeded MAX_DURABLE of them if there are
//! more), and images where only part of what came after the previous flush
//! reached the disk: a lone write torn (only its head, or only its tail,
//! cut at a sector boundary of the disk), random halves of longer
//! stretches in a random order with some writes torn, and, where the
//! header cluster is written along with other operations, that write left
//! out or kept with a random half of the rest. For each image:
//!
//! - `qemu-img check` finds no corruption (leaked clusters are allowed),
//!   before and after recovery;
//! - `tidemark bitmap --recover` recovers it, offline, as the next
//!   read-write open would;
//! - qemu-nbd (qemu's reading, not tidemark's) exports every bitmap: none
//!   is missing or left inconsistent;
//! - every guest write whose data reached the image (one of its sectors
//!   reads as its own stamp in the guest view), or reached a durable image
//!   of an earlier flush, lies within each recording bitmap;
//! - the disabled bitmap is still empty, and the recording ones lie within
//!   the intent-log zones the guest wrote (recovery adds zones, not
//!   garbage).
//!
//! `TIDEMARK_SEED` (printed) seeds the guest and the choice of images: the
//! planned requests are the same for a seed; the trace, and so the images,
//! depend on timing (store points, requests in flight, how long the timer
//! is waited for). `TIDEMARK_POWERCUT_TEAR=4096` tears writes at 4 KiB
//! boundaries only (a device that writes 4 KiB atomically);
//! `TIDEMARK_POWERCUT_KEEP=1` keeps the trace and the failing images.

mod common;
mod qmp_common;

use std::collections::{BTreeSet, HashSet};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::wire::{self, Conn};
use common::PyScript;
use qmp_common::{Impl, Instance, Qmp};
use serde_json::{json, Value};

const DEFAULT_SEED: u64 = 0x7469_6465_6d61_726b;
const DISK: u64 = 1 << 30;
const CLUSTER: u64 = 64 << 10;
const SECTOR: u64 = 512;
/// The intent log's zone for this disk (intent::zone_shift: 64 MiB).
const ZONE: u64 = 64 << 20;
/// Recording bitmaps (name, granularity), and one disabled bitmap.
const RECORDING: [(&str, u64); 2] = [("b0", 64 << 10), ("b1", 512 << 10)];
const DISABLED: &str = "frozen";
const NODE: &str = "vda";
const IMAGE: &str = "vda.qcow2";

const PHASES: usize = 8;
const OPS_PER_PHASE: usize = 50;
/// Requests the writer keeps in flight.
const DEPTH: usize = 8;
/// Each phase writes into one or two windows of this size.
const WINDOW: u64 = 2 << 20;
/// Phases that start with an `x-tidemark-bitmap-store` (with writes in
/// flight).
const STORE_PHASES: [usize; 3] = [2, 4, 6];
/// Phases that end by writing on until the timer made a store point
/// (`--bitmap-store-interval 1`), within TIMER_DEADLINE.
const TIMER_PHASES: [usize; 2] = [3, 6];
const TIMER_DEADLINE: Duration = Duration::from_secs(20);
/// The longest wait for the trace to move before the next batch.
const TIMER_WAKE: Duration = Duration::from_millis(300);

/// Sampled images per stretch between two flushes, on top of its durable
/// image; the most durable images (a seeded sample beyond), and the most
/// images the test checks in all.
const SAMPLES_PER_STRETCH: usize = 4;
const MAX_DURABLE: usize = 250;
const MAX_IMAGES: usize = 450;
/// Worker threads checking images (each with its own qemu-nbd reader).
const WORKERS: usize = 2;

const MAGIC: u64 = 0x706f_7765_7263_7574; // "powercut"
const READER_DEADLINE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------- seeding

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

fn seed() -> u64 {
    match std::env::var("TIDEMARK_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("TIDEMARK_SEED={s:?}: {e}"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

// ---------------------------------------------------------- guest requests

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    /// Write-zeroes; `no_hole` is NBD_CMD_FLAG_NO_HOLE.
    Zeroes {
        no_hole: bool,
    },
    Trim,
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct GuestOp {
    kind: Kind,
    off: u64,
    len: u64,
}

/// The stamp of every sector guest write `index` puts down at `off`: the
/// same 32 bytes 16 times.
fn stamp(seed: u64, index: usize, off: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&(MAGIC ^ seed).to_le_bytes());
    s[8..16].copy_from_slice(&off.to_le_bytes());
    s[16..24].copy_from_slice(&(index as u64).to_le_bytes());
    s[24..].copy_from_slice(&seed.rotate_left(17).to_le_bytes());
    s
}

fn write_data(seed: u64, index: usize, op: &GuestOp) -> Vec<u8> {
    let mut v = Vec::with_capacity(op.len as usize);
    for sector in 0..op.len / SECTOR {
        let s = stamp(seed, index, op.off + sector * SECTOR);
        for _ in 0..SECTOR / 32 {
            v.extend_from_slice(&s);
        }
    }
    v
}

/// Whether `sector` (512 bytes of the guest view at `off`) is write
/// `index`'s own.
fn is_stamped(seed: u64, index: usize, off: u64, sector: &[u8]) -> bool {
    let s = stamp(seed, index, off);
    sector.chunks(32).all(|c| c == s)
}

/// A window of `WINDOW` bytes, cluster-aligned: sometimes one that
/// straddles a zone boundary (a request there marks two zones).
fn pick_window(rng: &mut Rng) -> u64 {
    if rng.percent(20) {
        let boundary = (1 + rng.below(DISK / ZONE - 1)) * ZONE;
        return boundary - WINDOW / 2;
    }
    rng.below((DISK - WINDOW) / CLUSTER) * CLUSTER
}

/// One phase of the guest: the windows it writes in and its requests.
struct Phase {
    windows: Vec<u64>,
    ops: Vec<GuestOp>,
}

/// A request into one of `windows`.
fn gen_op(rng: &mut Rng, windows: &[u64]) -> GuestOp {
    let w = windows[rng.below(windows.len() as u64) as usize];
    let roll = rng.below(100);
    let (kind, unit, max_units) = if roll < 68 {
        if rng.percent(30) {
            (Kind::Write, CLUSTER, 2)
        } else {
            (Kind::Write, SECTOR, 256)
        }
    } else if roll < 80 {
        let no_hole = rng.percent(30);
        (Kind::Zeroes { no_hole }, 4096, 64)
    } else if roll < 92 {
        (Kind::Trim, CLUSTER, 6)
    } else {
        return GuestOp {
            kind: Kind::Flush,
            off: 0,
            len: 0,
        };
    };
    let len = (1 + rng.below(max_units)) * unit;
    let off = w + rng.below((WINDOW - len) / unit + 1) * unit;
    GuestOp { kind, off, len }
}

/// The guest's requests, phase by phase.
fn plan(rng: &mut Rng) -> Vec<Phase> {
    let mut used: Vec<u64> = Vec::new();
    let mut phases = Vec::new();
    for _ in 0..PHASES {
        let mut windows = Vec::new();
        for _ in 0..1 + rng.below(2) {
            // Going back to a window written before: in-place overwrites,
            // zero clusters written again, trims of allocated clusters.
            let w = if !used.is_empty() && rng.percent(35) {
                used[rng.below(used.len() as u64) as usize]
            } else {
                pick_window(rng)
            };
            used.push(w);
            windows.push(w);
        }
        let ops = (0..OPS_PER_PHASE).map(|_| gen_op(rng, &windows)).collect();
        phases.push(Phase { windows, ops });
    }
    phases
}

// ------------------------------------------------------------------ writer

/// A pipelined NBD client on simple replies (no structured replies were
/// negotiated): up to DEPTH requests in flight, replies in any order.
struct Writer {
    conn: Conn,
    in_flight: HashSet<u64>,
    next: u64,
}

impl Writer {
    fn connect(socket: &Path) -> Writer {
        let s = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut conn = Conn::new(s);
        conn.start();
        let (size, flags) = conn.go(NODE);
        assert_eq!(size, DISK, "export size");
        const SEND_FLUSH: u16 = 1 << 2;
        const SEND_TRIM: u16 = 1 << 5;
        const SEND_WRITE_ZEROES: u16 = 1 << 6;
        let wanted = SEND_FLUSH | SEND_TRIM | SEND_WRITE_ZEROES;
        assert_eq!(flags & wanted, wanted, "transmission flags {flags:#x}");
        assert_eq!(flags & wire::TFLAG_READ_ONLY, 0, "the export is writable");
        Writer {
            conn,
            in_flight: HashSet::new(),
            next: 1,
        }
    }

    fn send(&mut self, op: &GuestOp, data: &[u8]) {
        while self.in_flight.len() >= DEPTH {
            self.reply();
        }
        let (typ, flags) = match op.kind {
            Kind::Write => (wire::CMD_WRITE, 0),
            Kind::Zeroes { no_hole } => (
                wire::CMD_WRITE_ZEROES,
                if no_hole { wire::CMD_FLAG_NO_HOLE } else { 0 },
            ),
            Kind::Trim => (wire::CMD_TRIM, 0),
            Kind::Flush => (wire::CMD_FLUSH, 0),
        };
        let cookie = self.next;
        self.next += 1;
        self.conn.request(flags, typ, cookie, op.off, op.len as u32);
        if !data.is_empty() {
            self.conn.send(data);
        }
        self.in_flight.insert(cookie);
    }

    fn reply(&mut self) {
        let r = self.conn.recv(16);
        let magic = u32::from_be_bytes(r[0..4].try_into().expect("4 bytes"));
        let error = u32::from_be_bytes(r[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(r[8..16].try_into().expect("8 bytes"));
        assert_eq!(magic, wire::SIMPLE_REPLY_MAGIC, "simple reply");
        assert_eq!(error, 0, "request {cookie} failed");
        assert!(self.in_flight.remove(&cookie), "reply to cookie {cookie}");
    }

    fn drain(&mut self) {
        while !self.in_flight.is_empty() {
            self.reply();
        }
    }
}

fn ok(q: &mut Qmp, cmd: &str, args: Value) -> Value {
    let r = q.exec(cmd, args.clone());
    assert!(r.get("return").is_some(), "{cmd} {args}: {r}");
    r["return"].clone()
}

/// Counts the header writes (host offset 0: the log installed, a store
/// point's switch) in the daemon's trace as it grows.
struct TraceWatch {
    path: std::path::PathBuf,
    changes: FileWatch,
    pos: u64,
    pending: Vec<u8>,
    headers: usize,
}

impl TraceWatch {
    fn new(path: std::path::PathBuf) -> TraceWatch {
        TraceWatch {
            changes: FileWatch::new(&path),
            path,
            pos: 0,
            pending: Vec::new(),
            headers: 0,
        }
    }

    fn poll(&mut self) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            f.seek(SeekFrom::Start(self.pos)).expect("seek the trace");
            let n = f.read_to_end(&mut self.pending).expect("read the trace");
            self.pos += n as u64;
        }
        let recs = parse_trace(&self.pending);
        self.headers += recs
            .iter()
            .filter(|t| t.op == OP_WRITE && t.off == 0)
            .count();
        // Where the last whole record ends (a write's data comes last).
        let used = recs.last().map_or(0, |t| t.data.end);
        self.pending.drain(..used);
        self.headers
    }
}

/// Wakes when a file is modified (inotify), so that waiting for the
/// daemon to write is a kernel event with a bound, not a guessed sleep.
struct FileWatch {
    fd: i32,
}

impl FileWatch {
    fn new(path: &Path) -> FileWatch {
        let p = CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: plain syscalls on an fd we own; the path is NUL-terminated.
        let (fd, wd) = unsafe {
            let fd = libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK);
            (fd, libc::inotify_add_watch(fd, p.as_ptr(), libc::IN_MODIFY))
        };
        assert!(fd >= 0 && wd >= 0, "inotify on {}", path.display());
        FileWatch { fd }
    }

    /// Forgets the changes seen so far.
    fn clear(&self) {
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer we own; non-blocking fd.
        while unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    /// Waits until the file changed (since the last `clear`), at most `limit`.
    fn wait(&self, limit: Duration) {
        let mut p = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        unsafe {
            libc::poll(&mut p, 1, limit.as_millis() as i32);
        }
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        // SAFETY: closing our own fd once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// What the guest did.
struct GuestRun {
    /// Every request sent, in order (a write's stamps carry its index).
    ops: Vec<GuestOp>,
    /// Store points asked over QMP, and seen made by the timer.
    asked: usize,
    timer: usize,
}

/// Runs the guest's requests against the daemon, then kills it (SIGKILL)
/// with the last phase's requests still in flight. In TIMER_PHASES the
/// guest keeps writing after its planned requests until the daemon's own
/// timer made a store point (seen in the trace), so that one runs with
/// writes in flight too.
fn run_guest(
    inst: &mut Instance,
    seed: u64,
    rng: &mut Rng,
    phases: &[Phase],
    trace: std::path::PathBuf,
) -> GuestRun {
    let mut q = inst.client();
    let mut w = Writer::connect(&inst.path("nbd.sock"));
    let mut watch = TraceWatch::new(trace);
    let mut run = GuestRun {
        ops: Vec::new(),
        asked: 0,
        timer: 0,
    };
    let send = |w: &mut Writer, run: &mut GuestRun, op: GuestOp| {
        let data = match op.kind {
            Kind::Write => write_data(seed, run.ops.len(), &op),
            _ => Vec::new(),
        };
        w.send(&op, &data);
        run.ops.push(op);
    };
    for (p, phase) in phases.iter().enumerate() {
        for (k, op) in phase.ops.iter().enumerate() {
            send(&mut w, &mut run, *op);
            if k == DEPTH / 2 && STORE_PHASES.contains(&p) {
                ok(&mut q, "x-tidemark-bitmap-store", json!({"node": NODE}));
                run.asked += 1;
            }
        }
        if TIMER_PHASES.contains(&p) {
            // Batches of writes, each drained, then a wait for the trace
            // to move (the timer's store point writing), until the store
            // point's header write shows: the batches after the first
            // wake-up run alongside it.
            w.drain();
            let before = watch.poll();
            let deadline = Instant::now() + TIMER_DEADLINE;
            loop {
                for _ in 0..DEPTH {
                    send(&mut w, &mut run, gen_op(rng, &phase.windows));
                }
                w.drain();
                watch.changes.clear();
                if watch.poll() > before {
                    break;
                }
                watch.changes.wait(TIMER_WAKE);
                if watch.poll() > before {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no store point from the timer within {TIMER_DEADLINE:?}\n{}",
                    inst.log()
                );
            }
            run.timer += 1;
        }
        if p + 1 < phases.len() {
            w.drain();
        }
    }
    // A power cut comes without warning: the daemon dies with requests in
    // flight (what its trace holds is what it completed).
    inst.kill();
    run
}

// ------------------------------------------------------------------ trace

const OP_WRITE: u8 = 1;
const OP_ZEROES: u8 = 2;
const OP_DISCARD: u8 = 3;
const OP_FLUSH: u8 = 4;

#[derive(Debug)]
struct TraceOp {
    op: u8,
    off: u64,
    len: u64,
    /// Where a write's data lies in the trace.
    data: std::ops::Range<usize>,
}

/// The records of a trace (io_trace.rs); a record cut short by the kill
/// is dropped.
fn parse_trace(t: &[u8]) -> Vec<TraceOp> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 17 <= t.len() {
        let op = t[at];
        let off = u64::from_le_bytes(t[at + 1..at + 9].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(t[at + 9..at + 17].try_into().expect("8 bytes"));
        assert!(
            (OP_WRITE..=OP_FLUSH).contains(&op),
            "bad trace record {op} at {at}"
        );
        let data_len = if op == OP_WRITE { len as usize } else { 0 };
        if at + 17 + data_len > t.len() {
            break;
        }
        out.push(TraceOp {
            op,
            off,
            len,
            data: at + 17..at + 17 + data_len,
        });
        at += 17 + data_len;
    }
    out
}

/// How much of a write reached the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Part {
    Whole,
    /// The first `n` bytes (sector-aligned).
    Head(u64),
    /// From byte `n` on.
    Tail(u64),
}

fn apply(img: &mut Vec<u8>, trace: &[u8], op: &TraceOp, part: Part) {
    let (from, to) = match part {
        Part::Whole => (0, op.len),
        Part::Head(n) => (0, n),
        Part::Tail(n) => (n, op.len),
    };
    let (start, end) = ((op.off + from) as usize, (op.off + to) as usize);
    match op.op {
        OP_WRITE => {
            if img.len() < end {
                img.resize(end, 0);
            }
            img[start..end].copy_from_slice(&trace[op.data.start + from as usize..][..end - start]);
        }
        // FALLOC_FL_ZERO_RANGE (which extends the file).
        OP_ZEROES => {
            if img.len() < end {
                img.resize(end, 0);
            }
            img[start..end].fill(0);
        }
        // A punched hole: within the file only.
        OP_DISCARD => {
            let end = end.min(img.len());
            if start < end {
                img[start..end].fill(0);
            }
        }
        _ => {}
    }
}

/// One image a power cut could leave: the durable image at the start of
/// stretch `stretch` (every operation before the flush that opens it)
/// plus `ops` (trace indices, and how much of each) applied in this order.
#[derive(Debug, Clone)]
struct Candidate {
    stretch: usize,
    /// The whole stretch, in order: the durable image at its closing flush.
    durable: bool,
    ops: Vec<(usize, Part)>,
}

impl Candidate {
    fn describe(&self, trace: &[TraceOp]) -> String {
        let list: Vec<String> = self
            .ops
            .iter()
            .map(|&(i, p)| {
                let t = &trace[i];
                let name = match t.op {
                    OP_WRITE => "write",
                    OP_ZEROES => "zeroes",
                    _ => "discard",
                };
                let part = match p {
                    Part::Whole => String::new(),
                    Part::Head(n) => format!(" (torn: first {n} bytes)"),
                    Part::Tail(n) => format!(" (torn: from byte {n} on)"),
                };
                let what = if t.off == 0 && t.op == OP_WRITE {
                    " (the image header)"
                } else {
                    ""
                };
                format!("#{i} {name} {:#x}+{:#x}{what}{part}", t.off, t.len)
            })
            .collect();
        format!(
            "stretch {} ({}): {}",
            self.stretch,
            if self.durable {
                "durable image at its closing flush"
            } else {
                "sampled subset"
            },
            list.join(", ")
        )
    }
}

/// The stretches between flushes: the trace indices of the operations in
/// each (stretch k ends with flush k; the last one runs to the kill).
fn stretches(trace: &[TraceOp]) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new()];
    for (i, t) in trace.iter().enumerate() {
        if t.op == OP_FLUSH {
            out.push(Vec::new());
        } else if let Some(last) = out.last_mut() {
            last.push(i);
        }
    }
    out
}

fn overlaps(a: &TraceOp, b: &TraceOp) -> bool {
    a.off < b.off + b.len && b.off < a.off + a.len
}

/// The unit a device writes whole (TIDEMARK_POWERCUT_TEAR, in bytes;
/// 512 by default): a torn write is cut at one of its boundaries.
fn tear_unit() -> u64 {
    match std::env::var("TIDEMARK_POWERCUT_TEAR") {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|n: &u64| n.is_power_of_two() && *n >= SECTOR)
            .unwrap_or_else(|| panic!("TIDEMARK_POWERCUT_TEAR={v:?}: a power of two >= 512")),
        Err(_) => SECTOR,
    }
}

/// A seeded cut of write `t` at a boundary of `unit` on the disk (bytes
/// into the write); None if the write lies within one unit.
fn cut(rng: &mut Rng, t: &TraceOp, unit: u64) -> Option<u64> {
    let first = t.off / unit + 1;
    let last = (t.off + t.len - 1) / unit;
    if t.op != OP_WRITE || first > last {
        return None;
    }
    Some((first + rng.below(last - first + 1)) * unit - t.off)
}

/// The seeded sample. Every durable image (a seeded MAX_DURABLE of them
/// beyond that); both torn forms (head only, tail only) of the write of
/// every stretch that holds just one (headers, the log's marks, tables
/// written alone before a flush); for a stretch that writes the header
/// cluster among other operations, each such write left out, and subsets
/// that keep them; then, up to MAX_IMAGES, subsets of the
/// longer stretches (a random half, in a random order, some writes torn),
/// up to one per operation and SAMPLES_PER_STRETCH. Duplicates are left
/// out.
fn candidates(rng: &mut Rng, trace: &[TraceOp], stretches: &[Vec<usize>]) -> Vec<Candidate> {
    let unit = tear_unit();
    let mut out = Vec::new();
    for (s, ops) in stretches.iter().enumerate() {
        if !ops.is_empty() {
            out.push(Candidate {
                stretch: s,
                durable: true,
                ops: ops.iter().map(|&i| (i, Part::Whole)).collect(),
            });
        }
    }
    if out.len() > MAX_DURABLE {
        rng.shuffle(&mut out);
        out.truncate(MAX_DURABLE);
        out.sort_by_key(|c| c.stretch);
    }
    for (s, ops) in stretches.iter().enumerate() {
        if let [i] = ops[..] {
            if let Some(c) = cut(rng, &trace[i], unit) {
                for part in [Part::Head(c), Part::Tail(c)] {
                    out.push(Candidate {
                        stretch: s,
                        durable: false,
                        ops: vec![(i, part)],
                    });
                }
            }
        }
    }
    // The header cluster (the log's marks, the directory switch) written
    // with other operations before one flush: each such write left out,
    // the rest in order (a mark that is not write-ahead shows here); and
    // subsets that keep the header writes (a switch to what is not yet
    // on the disk shows here).
    let is_header = |i: usize| trace[i].op == OP_WRITE && trace[i].off < CLUSTER;
    for (s, ops) in stretches.iter().enumerate() {
        if ops.len() < 2 || !ops.iter().any(|&i| is_header(i)) {
            continue;
        }
        for (k, &i) in ops.iter().enumerate() {
            if is_header(i) {
                let mut rest: Vec<(usize, Part)> = ops.iter().map(|&j| (j, Part::Whole)).collect();
                rest.remove(k);
                out.push(Candidate {
                    stretch: s,
                    durable: false,
                    ops: rest,
                });
            }
        }
        for _ in 0..SAMPLES_PER_STRETCH {
            let mut chosen: Vec<(usize, Part)> = ops
                .iter()
                .filter(|&&i| is_header(i) || rng.percent(50))
                .map(|&i| (i, Part::Whole))
                .collect();
            rng.shuffle(&mut chosen);
            out.push(Candidate {
                stretch: s,
                durable: false,
                ops: chosen,
            });
        }
    }
    let mut samples = Vec::new();
    for (s, ops) in stretches.iter().enumerate() {
        if ops.len() > 1 {
            samples.extend(std::iter::repeat_n(s, ops.len().min(SAMPLES_PER_STRETCH)));
        }
    }
    rng.shuffle(&mut samples);
    samples.truncate(MAX_IMAGES.saturating_sub(out.len()));
    samples.sort();
    let mut seen: HashSet<(usize, Vec<(usize, Part)>)> = HashSet::new();
    for s in samples {
        let ops = &stretches[s];
        let mut chosen: Vec<usize> = ops.iter().copied().filter(|_| rng.percent(50)).collect();
        if chosen.is_empty() {
            chosen.push(ops[rng.below(ops.len() as u64) as usize]);
        }
        rng.shuffle(&mut chosen);
        let picked: Vec<(usize, Part)> = chosen
            .into_iter()
            .map(|i| match rng.percent(30) {
                true => match cut(rng, &trace[i], unit) {
                    Some(c) if rng.percent(50) => (i, Part::Head(c)),
                    Some(c) => (i, Part::Tail(c)),
                    None => (i, Part::Whole),
                },
                false => (i, Part::Whole),
            })
            .collect();
        // The order matters only between operations that overlap.
        let any_overlap = picked.iter().enumerate().any(|(a, &(i, _))| {
            picked[a + 1..]
                .iter()
                .any(|&(j, _)| overlaps(&trace[i], &trace[j]))
        });
        let mut key = picked.clone();
        if !any_overlap {
            key.sort();
        }
        let whole_stretch = picked.len() == ops.len() && picked.iter().all(|p| p.1 == Part::Whole);
        if (whole_stretch && !any_overlap) || !seen.insert((s, key)) {
            continue;
        }
        out.push(Candidate {
            stretch: s,
            durable: false,
            ops: picked,
        });
    }
    out
}

// ------------------------------------------------------------ the checks

/// Sorted, joined byte ranges.
#[derive(Debug, Clone, Default)]
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn from(mut v: Vec<(u64, u64)>) -> Ranges {
        v.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (o, l) in v {
            match out.last_mut() {
                Some(last) if o <= last.0 + last.1 => {
                    let end = (last.0 + last.1).max(o + l);
                    last.1 = end - last.0;
                }
                _ => out.push((o, l)),
            }
        }
        Ranges(out)
    }

    /// The parts of `[off, off + len)` outside these ranges.
    fn missing(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = off;
        let end = off + len;
        for &(o, l) in &self.0 {
            if o + l <= at {
                continue;
            }
            if o >= end {
                break;
            }
            if o > at {
                out.push((at, o - at));
            }
            at = at.max(o + l);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end - at));
        }
        out
    }

    fn bytes(&self) -> u64 {
        self.0.iter().map(|r| r.1).sum()
    }
}

/// Where each guest byte of the read ranges lies in the reader's output.
struct Layout {
    ranges: Vec<(u64, u64, usize)>,
}

impl Layout {
    fn new(r: &Ranges) -> Layout {
        let mut pos = 0;
        let ranges =
            r.0.iter()
                .map(|&(o, l)| {
                    let e = (o, l, pos);
                    pos += l as usize;
                    e
                })
                .collect();
        Layout { ranges }
    }

    fn at(&self, off: u64) -> usize {
        let i = self.ranges.partition_point(|r| r.0 + r.1 <= off);
        let (o, l, pos) = self.ranges[i];
        assert!(o <= off && off < o + l, "{off:#x} outside the read ranges");
        pos + (off - o) as usize
    }
}

/// What the test knows of the guest: its requests and their stamps.
struct Guest {
    seed: u64,
    ops: Vec<GuestOp>,
    read: Ranges,
    layout: Layout,
    /// Every zone any request touched (what a recording bitmap may hold).
    zones: Ranges,
}

impl Guest {
    fn new(seed: u64, ops: Vec<GuestOp>) -> Guest {
        let data = ops
            .iter()
            .filter(|o| o.kind != Kind::Flush)
            .map(|o| (o.off, o.len));
        let read = Ranges::from(data.clone().collect());
        let zones = Ranges::from(
            data.map(|(o, l)| {
                let z0 = o / ZONE * ZONE;
                (z0, (o + l).div_ceil(ZONE) * ZONE - z0)
            })
            .collect(),
        );
        let layout = Layout::new(&read);
        Guest {
            seed,
            ops,
            read,
            layout,
            zones,
        }
    }

    /// The guest writes at least one of whose sectors reads as its own in
    /// `view` (the reader's output).
    fn visible(&self, view: &[u8]) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        for (i, op) in self.ops.iter().enumerate() {
            if op.kind != Kind::Write {
                continue;
            }
            let hit = (0..op.len / SECTOR).any(|s| {
                let off = op.off + s * SECTOR;
                let at = self.layout.at(off);
                is_stamped(self.seed, i, off, &view[at..at + SECTOR as usize])
            });
            if hit {
                out.insert(i);
            }
        }
        out
    }
}

/// The outcome of checking one image.
#[derive(Debug, Default)]
struct Checked {
    visible: BTreeSet<usize>,
    recovered: bool,
    /// Bytes recovery added, per bitmap (from its report).
    added: u64,
    leaks: bool,
    /// Writes checked against the bitmaps.
    writes_checked: usize,
    dirty_bytes: Vec<u64>,
    failures: Vec<String>,
}

fn qemu_img_check(path: &Path) -> (Option<i32>, String) {
    let out = common::output(
        common::tool("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(path),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

struct Reader {
    py: PyScript,
}

impl Reader {
    fn start(dir: &Path, n: usize) -> Reader {
        let args: [&str; 0] = [];
        Reader {
            py: PyScript::spawn(
                "powercut_reader.py",
                args,
                dir.join(format!("reader{n}.stderr")),
            ),
        }
    }

    fn read(&mut self, image: &Path, ranges: &Ranges, out: &Path) -> Value {
        let mut names: Vec<&str> = RECORDING.iter().map(|r| r.0).collect();
        names.push(DISABLED);
        let req = json!({
            "image": image, "bitmaps": names, "out": out,
            "ranges": ranges.0.iter().map(|&(o, l)| json!([o, l])).collect::<Vec<_>>(),
        });
        let stdin = self.py.stdin.as_mut().expect("reader stdin");
        writeln!(stdin, "{req}").expect("write to the reader");
        stdin.flush().expect("flush the reader's stdin");
        let line = self
            .py
            .lines
            .recv_timeout(READER_DEADLINE)
            .unwrap_or_else(|e| panic!("reader: {e}\n{}", self.py.stderr()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reader said {line:?}: {e}"))
    }
}

/// Checks one image (`bytes`) at `path`. `durable_reached`: guest writes
/// that reached an earlier durable image (so reached this one too, even if
/// overwritten since).
fn check_image(
    guest: &Guest,
    reader: &mut Reader,
    path: &Path,
    bytes: &[u8],
    durable_reached: &BTreeSet<usize>,
) -> Checked {
    let mut c = Checked::default();
    std::fs::write(path, bytes).expect("write the replayed image");
    let (code, text) = qemu_img_check(path);
    match code {
        Some(0) => {}
        Some(3) => c.leaks = true,
        _ => c.failures.push(format!(
            "qemu-img check of the power-cut image exited {code:?}:\n{text}"
        )),
    }
    let out = common::output(
        common::tool(qmp_common::TIDEMARK)
            .args(["bitmap", "--recover"])
            .arg(path),
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        c.failures.push(format!(
            "tidemark bitmap --recover failed ({}): {said}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
        return c;
    }
    for line in said.lines() {
        if let Some(rest) = line.strip_prefix("recovered bitmap '") {
            c.recovered = true;
            let added = rest
                .split(": ")
                .nth(1)
                .and_then(|x| x.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok());
            c.added += added.unwrap_or(0);
        } else if line != "nothing to recover" {
            c.failures
                .push(format!("tidemark bitmap --recover said {line:?}"));
        }
    }
    let (code, text) = qemu_img_check(path);
    if !matches!(code, Some(0) | Some(3)) {
        c.failures.push(format!(
            "qemu-img check after recovery exited {code:?}:\n{text}"
        ));
    }
    let view_path = path.with_extension("view");
    let r = reader.read(path, &guest.read, &view_path);
    if r["ok"] != true {
        c.failures.push(format!(
            "qemu-nbd could not export the bitmaps: {}\n{}",
            r["error"],
            reader.py.stderr()
        ));
        return c;
    }
    let view = std::fs::read(&view_path).expect("read the guest view");
    let _ = std::fs::remove_file(&view_path);
    assert_eq!(view.len() as u64, guest.read.bytes(), "guest view size");
    c.visible = guest.visible(&view);
    let reached: BTreeSet<usize> = c.visible.union(durable_reached).copied().collect();
    c.writes_checked = reached.len();
    for (name, _) in RECORDING {
        let dirty = dirty_of(&r, name);
        c.dirty_bytes.push(dirty.bytes());
        let mut uncovered = Vec::new();
        let mut holes = Vec::new();
        for &i in &reached {
            let op = &guest.ops[i];
            let missing = dirty.missing(op.off, op.len);
            if !missing.is_empty() {
                uncovered.push(i);
                holes.extend(missing);
            }
        }
        if !uncovered.is_empty() {
            let here = uncovered.iter().filter(|i| c.visible.contains(i)).count();
            let list: Vec<String> = uncovered
                .iter()
                .take(8)
                .map(|&i| format!("#{i} {:#x}+{:#x}", guest.ops[i].off, guest.ops[i].len))
                .collect();
            c.failures.push(format!(
                "bitmap {name} misses {} of the {} guest writes that reached the disk \
                 ({here} seen in this image, the others in an earlier durable one): {}{}; \
                 not dirty: {}",
                uncovered.len(),
                reached.len(),
                list.join(", "),
                if uncovered.len() > 8 { ", ..." } else { "" },
                fmt_ranges(&Ranges::from(holes).0)
            ));
        }
        let beyond: Vec<(u64, u64)> = dirty
            .0
            .iter()
            .flat_map(|&(o, l)| guest.zones.missing(o, l))
            .collect();
        if !beyond.is_empty() {
            c.failures.push(format!(
                "bitmap {name} is dirty outside every zone the guest wrote: {}",
                fmt_ranges(&beyond)
            ));
        }
    }
    let frozen = dirty_of(&r, DISABLED);
    if !frozen.0.is_empty() {
        c.failures.push(format!(
            "the disabled bitmap {DISABLED} gained bits: {}",
            fmt_ranges(&frozen.0)
        ));
    }
    c
}

fn dirty_of(r: &Value, name: &str) -> Ranges {
    let list = r["dirty"][name]
        .as_array()
        .unwrap_or_else(|| panic!("no extents for {name}: {r}"));
    Ranges::from(
        list.iter()
            .map(|e| {
                (
                    e[0].as_u64().expect("offset"),
                    e[1].as_u64().expect("length"),
                )
            })
            .collect(),
    )
}

fn fmt_ranges(r: &[(u64, u64)]) -> String {
    let v: Vec<String> = r
        .iter()
        .take(8)
        .map(|&(o, l)| format!("{o:#x}+{l:#x}"))
        .collect();
    let more = if r.len() > 8 { ", ..." } else { "" };
    format!("[{}{more}]", v.join(", "))
}

// ------------------------------------------------------------- the test

/// The durable image as the checking threads roll it forward.
struct Cursor {
    /// The next image of the list to check.
    next: usize,
    /// `img` is the durable image at the start of this stretch.
    stretch: usize,
    img: Vec<u8>,
}

/// What the checking threads share.
struct Replay<'a> {
    guest: &'a Guest,
    /// Failing images are written out (TIDEMARK_POWERCUT_KEEP).
    keep: bool,
    dir: &'a Path,
    trace: &'a [TraceOp],
    trace_bytes: &'a [u8],
    stretches: &'a [Vec<usize>],
    base: &'a [u8],
}

impl Replay<'_> {
    /// Checks the images of `list` (sorted by stretch) on WORKERS threads
    /// that take them in order from one cursor, which rolls the durable
    /// image forward as it goes. `reached_before(stretch)`: the guest
    /// writes that reached a durable image before that stretch.
    fn run<'c>(
        &self,
        list: &[&'c Candidate],
        reached_before: &(dyn Fn(usize) -> BTreeSet<usize> + Sync),
    ) -> Vec<(&'c Candidate, Checked)> {
        let cursor = Mutex::new(Cursor {
            next: 0,
            stretch: 0,
            img: self.base.to_vec(),
        });
        let results = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for w in 0..WORKERS {
                let (cursor, results) = (&cursor, &results);
                s.spawn(move || {
                    let mut reader = Reader::start(self.dir, w);
                    loop {
                        let (n, c, mut bytes) = {
                            let mut cur = cursor.lock().expect("cursor");
                            let n = cur.next;
                            let Some(&c) = list.get(n) else { break };
                            cur.next += 1;
                            while cur.stretch < c.stretch {
                                for &i in &self.stretches[cur.stretch] {
                                    apply(
                                        &mut cur.img,
                                        self.trace_bytes,
                                        &self.trace[i],
                                        Part::Whole,
                                    );
                                }
                                cur.stretch += 1;
                            }
                            (n, c, cur.img.clone())
                        };
                        for &(i, p) in &c.ops {
                            apply(&mut bytes, self.trace_bytes, &self.trace[i], p);
                        }
                        let path = self.dir.join(format!("w{w}.qcow2"));
                        let reached = reached_before(c.stretch);
                        let checked = check_image(self.guest, &mut reader, &path, &bytes, &reached);
                        if self.keep && !checked.failures.is_empty() {
                            let kind = if c.durable { "durable" } else { "sampled" };
                            let keep = self.dir.join(format!("failed-{kind}-{n}.qcow2"));
                            let _ = std::fs::write(&keep, &bytes);
                        }
                        let _ = std::fs::remove_file(&path);
                        results.lock().expect("results").push((c, checked));
                    }
                });
            }
        });
        results.into_inner().expect("results")
    }
}

#[test]
fn a_power_cut_anywhere_leaves_bitmaps_that_cover_every_write_that_reached_the_disk() {
    let t0 = Instant::now();
    let seed = seed();
    println!("seed: {seed:#x} (TIDEMARK_SEED to change it)");
    let mut rng = Rng::new(seed);
    let phases = plan(&mut rng);

    // The daemon, with its I/O traced. The variable is set only while the
    // daemon is spawned: nothing else this test runs may trace.
    let work = tempfile::Builder::new()
        .prefix("tidemark-powercut-")
        .tempdir()
        .expect("temp dir");
    let traces = work.path().join("traces");
    std::fs::create_dir(&traces).expect("trace dir");
    let base_copy = work.path().join("base.qcow2");
    let args: Vec<String> = [
        "--blockdev",
        &format!("driver=file,node-name=f,filename=$DIR/{IMAGE}"),
        "--blockdev",
        &format!("driver=qcow2,node-name={NODE},file=f"),
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        &format!("type=nbd,id=e,node-name={NODE},name={NODE},writable=on"),
        "--bitmap-store-interval",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    std::env::set_var("TIDEMARK_IO_TRACE", &traces);
    let mut inst = Instance::start(Impl::Tidemark, &args, |d| {
        let img = d.join(IMAGE);
        common::run(
            common::tool("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&img)
                .arg(DISK.to_string()),
        );
        for (name, g) in RECORDING {
            common::run(
                common::tool("qemu-img")
                    .args(["bitmap", "--add", "-g", &g.to_string()])
                    .arg(&img)
                    .arg(name),
            );
        }
        common::run(
            common::tool("qemu-img")
                .args(["bitmap", "--add", "--disable", "-g", "65536"])
                .arg(&img)
                .arg(DISABLED),
        );
        std::fs::copy(&img, &base_copy).expect("copy the base image");
    });
    std::env::remove_var("TIDEMARK_IO_TRACE");
    let trace_path = traces.join(format!("{IMAGE}.trace"));
    let run = run_guest(&mut inst, seed, &mut rng, &phases, trace_path.clone());
    let guest = Guest::new(seed, run.ops);
    let ran = t0.elapsed();
    let log = inst.log();
    drop(inst);

    let trace_bytes = std::fs::read(&trace_path)
        .unwrap_or_else(|e| panic!("no trace: {e}\n--- daemon log ---\n{log}"));
    let base = std::fs::read(&base_copy).expect("read the base image");
    let trace = parse_trace(&trace_bytes);
    let stretches = stretches(&trace);
    let flushes = trace.iter().filter(|t| t.op == OP_FLUSH).count();
    let mut rng = Rng::new(seed ^ 0x7265_706c_6179);
    let cands = candidates(&mut rng, &trace, &stretches);
    println!(
        "guest: {} requests ({} writes), store points: {} asked, {} by the timer; trace: {} \
         operations, {flushes} flushes, {} stretches; {} images to check (daemon phase {ran:?})",
        guest.ops.len(),
        guest.ops.iter().filter(|o| o.kind == Kind::Write).count(),
        run.asked,
        run.timer,
        trace.len(),
        stretches.len(),
        cands.len()
    );

    // Pass 1: the durable images (what reached them reached every later
    // image); pass 2: the sampled ones. Each pass on WORKERS threads that
    // take the images in stretch order from one cursor, which rolls the
    // durable image forward as it goes.
    let (mut durable, mut sampled): (Vec<&Candidate>, Vec<&Candidate>) =
        cands.iter().partition(|c| c.durable);
    durable.sort_by_key(|c| c.stretch);
    sampled.sort_by_key(|c| c.stretch);
    let keep = std::env::var_os("TIDEMARK_POWERCUT_KEEP").is_some();
    let replay = Replay {
        guest: &guest,
        keep,
        dir: work.path(),
        trace: &trace,
        trace_bytes: &trace_bytes,
        stretches: &stretches,
        base: &base,
    };
    let first = replay.run(&durable, &|_| BTreeSet::new());
    // Writes seen in the durable image at the end of stretch k reached
    // every image built on it (stretches after k).
    let mut seen_by_end: Vec<(usize, BTreeSet<usize>)> = first
        .iter()
        .map(|(c, r)| (c.stretch, r.visible.clone()))
        .collect();
    seen_by_end.sort_by_key(|e| e.0);
    let reached_before = |stretch: usize| -> BTreeSet<usize> {
        seen_by_end
            .iter()
            .filter(|e| e.0 < stretch)
            .flat_map(|e| e.1.iter().copied())
            .collect()
    };
    let second = replay.run(&sampled, &reached_before);

    // The report.
    let all: Vec<&(&Candidate, Checked)> = first.iter().chain(second.iter()).collect();
    let recovered = all.iter().filter(|r| r.1.recovered).count();
    let recovered_with_writes = all
        .iter()
        .filter(|r| r.1.recovered && r.1.added > 0 && !r.1.visible.is_empty())
        .count();
    let leaks = all.iter().filter(|r| r.1.leaks).count();
    let checked: usize = all.iter().map(|r| r.1.writes_checked).sum();
    let torn = second
        .iter()
        .filter(|r| r.0.ops.iter().any(|o| o.1 != Part::Whole))
        .count();
    let max_dirty = all
        .iter()
        .flat_map(|r| r.1.dirty_bytes.iter().copied())
        .max()
        .unwrap_or(0);
    println!(
        "checked {} images ({} durable, {} sampled of which {torn} with torn writes): \
         {recovered} recovered from the intent log ({recovered_with_writes} with zones added \
         and writes visible), {leaks} with leaked clusters; {checked} write coverages checked; \
         largest recording bitmap {max_dirty} bytes of {DISK} (zones written: {}); {:?} in all",
        all.len(),
        first.len(),
        second.len(),
        guest.zones.bytes(),
        t0.elapsed()
    );
    let failed: Vec<&&(&Candidate, Checked)> =
        all.iter().filter(|r| !r.1.failures.is_empty()).collect();
    let kept = match keep {
        true => format!(
            "the trace and the failing images are kept in {}",
            work.keep().display()
        ),
        false => "TIDEMARK_POWERCUT_KEEP=1 keeps the trace and the failing images".into(),
    };
    if !failed.is_empty() {
        let mut msg = format!(
            "{} of {} power-cut images fail (seed {seed:#x}; {kept}):\n",
            failed.len(),
            all.len(),
        );
        for r in failed.iter().take(6) {
            msg += &format!("\n* {}\n", r.0.describe(&trace));
            for f in r.1.failures.iter().take(6) {
                msg += &format!("  - {f}\n");
            }
        }
        if failed.len() > 6 {
            msg += "\nand:\n";
            for r in &failed[6..] {
                msg += &format!("* {}\n", r.0.describe(&trace));
            }
        }
        panic!("{msg}");
    }
    if keep {
        println!("{kept}");
    }
    assert!(
        recovered_with_writes > 0,
        "no image had its bitmaps recovered from the intent log with writes that \
         reached it: the test proved nothing"
    );
    assert!(checked > 0, "no write reached any image");
}
