//! Stress tests of the block graph under concurrent load, each run against
//! `tidemark daemon` (and, where the commands exist there too, against
//! qemu-storage-daemon 10.0.2 with the same command line, which checks the
//! test itself).
//!
//! - Check 6, "no deadlock": two monitors merge two persistent bitmaps into
//!   each other 1,000 times each (b1 into b2 on one, b2 into b1 on the other:
//!   opposite lock orders) while an NBD client writes and trims the whole disk;
//!   then `quit` or SIGTERM under that load. The daemon must answer every
//!   merge, exit in time, and leave both bitmaps stored, not in use, in an
//!   image `qemu-img check` finds clean.
//! - Check 5, "replacement under load": four NBD connections keep reads,
//!   writes, write-zeroes and flushes in flight (tests/py/graph_replace_load.py
//!   checks every read as it completes) while tidemark's test hook
//!   `x-tidemark-insert-filter` / `x-tidemark-remove-filter` puts a
//!   pass-through filter above a node and takes it out again, 50 times. No
//!   request may fail, every acknowledged write must read back (through a fresh
//!   connection, then offline with `qemu-img compare` against the model the
//!   load wrote), the filter must show in `query-named-block-nodes` while it is
//!   in and be in use (`blockdev-del` refuses it), the export's root must sit
//!   on it when it is above the exported node, and the image must be clean
//!   after `quit`. The filter goes above the qcow2 node in one test and above
//!   its file node in the other (which quits with the filter still in). The
//!   same load without the hook runs against both daemons, so the load and its
//!   checks are known good on their own.
//!
//! Synchronisation is by pipes, sockets, pidfiles and pidfds, each with a
//! deadline; nothing sleeps.

mod common;
mod qmp_common;

use std::io::Write;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{describe_failure, output, signal, tool, PyScript};
use qmp_common::{qcow2_image, wait_child, Impl, Instance, Qmp};
use serde_json::{json, Value};

/// How long the daemon may take to exit after `quit` or SIGTERM.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a load script may take to answer a line (or to make progress).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(60);

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---- a load script on a pipe ----------------------------------------------

/// A tests/py load script (common::PyScript: stdout read by a thread, so
/// every wait has a deadline; stderr kept in a file for failure messages;
/// killed and reaped on drop), named in its failure messages.
struct Script {
    name: String,
    p: PyScript,
}

impl Script {
    fn spawn(name: &str, args: &[&str], dir: &Path) -> Script {
        let stderr = dir.join(format!("{name}.stderr"));
        Script {
            name: name.to_owned(),
            p: PyScript::spawn(name, args, stderr),
        }
    }

    fn stderr(&self) -> String {
        self.p.stderr()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.p.stdin.as_mut().expect("script stdin open");
        if let Err(e) = writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
            panic!(
                "{}: cannot send {line:?} ({e}); stderr:\n{}",
                self.name,
                self.stderr()
            );
        }
    }

    /// The next line, waiting at most until `deadline`.
    fn next_line(&mut self, deadline: Instant, waiting_for: &str) -> String {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.p.lines.recv_timeout(left) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!(
                "{}: no {waiting_for} within the deadline; stderr:\n{}",
                self.name,
                self.stderr()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let st = self.p.child.wait().expect("wait script");
                panic!(
                    "{}: exited ({st}) while the test waited for {waiting_for}; stderr:\n{}",
                    self.name,
                    self.stderr()
                )
            }
        }
    }

    /// The next line that starts with `prefix`, skipping progress ticks.
    fn expect(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let l = self.next_line(deadline, prefix);
            if l == "tick" {
                continue;
            }
            assert!(
                l.starts_with(prefix),
                "{}: expected {prefix:?}, got {l:?}",
                self.name
            );
            return l;
        }
    }

    /// Waits for `n` progress ticks that arrive from now on (ticks already
    /// queued are dropped first, so they show work done after this call).
    fn fresh_ticks(&mut self, n: usize, limit: Duration) {
        while let Ok(l) = self.p.lines.try_recv() {
            assert_eq!(l, "tick", "{}: unexpected line", self.name);
        }
        let deadline = Instant::now() + limit;
        for _ in 0..n {
            let l = self.next_line(deadline, "progress");
            assert_eq!(l, "tick", "{}: unexpected line", self.name);
        }
    }

    /// Closes stdin and waits (bounded) for the script to exit.
    fn finish(&mut self, limit: Duration) -> ExitStatus {
        self.p.stdin = None;
        assert!(
            wait_child(&mut self.p.child, limit),
            "{}: did not exit within {limit:?}; stderr:\n{}",
            self.name,
            self.stderr()
        );
        self.p.child.wait().expect("script status")
    }
}

/// `key=N` from a `word key=N key=N` status line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

// ---- offline checks ---------------------------------------------------------

/// `qemu-img check` must find nothing wrong.
fn assert_image_clean(img: &Path) {
    let mut cmd = tool("qemu-img");
    cmd.arg("check").arg(img);
    let out = output(&mut cmd);
    assert!(out.status.success(), "{}", describe_failure(&cmd, &out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("No errors were found on the image."),
        "qemu-img check: {text}"
    );
}

/// `qemu-img info --output=json` of an image nobody has open.
fn image_info(img: &Path) -> Value {
    let mut cmd = tool("qemu-img");
    cmd.args(["info", "--output=json"]).arg(img);
    let out = output(&mut cmd);
    assert!(out.status.success(), "{}", describe_failure(&cmd, &out));
    serde_json::from_slice(&out.stdout).expect("qemu-img info is JSON")
}

fn node_info(q: &mut Qmp, node: &str) -> Option<Value> {
    let r = q.exec("query-named-block-nodes", json!({}));
    let nodes = r["return"]
        .as_array()
        .unwrap_or_else(|| panic!("query-named-block-nodes: {r}"));
    nodes.iter().find(|n| n["node-name"] == node).cloned()
}

// ---- check 6: no deadlock ---------------------------------------------------

/// 64 GiB at 512-byte granularity: 16 MiB per bitmap, so every merge and
/// every whole-disk trim takes long enough to overlap the others.
const MERGE_DISK: u64 = 64 << 30;
const MERGES: usize = 1000;

#[derive(Clone, Copy, Debug)]
enum Stop {
    Quit,
    Sigterm,
}

/// `MERGES` merges of `src` into `target` on `q`, started together with the
/// other monitor's loop; every one must succeed. `done` counts them, so a
/// hang can say how far each loop got.
fn merge_loop(
    mut q: Qmp,
    target: &'static str,
    src: &'static str,
    go: Arc<Barrier>,
    done: Arc<AtomicUsize>,
) -> Qmp {
    go.wait();
    for i in 0..MERGES {
        let r = q.exec(
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": target, "bitmaps": [src]}),
        );
        assert_eq!(r, json!({"return": {}}), "merge {src}->{target} #{i}");
        done.fetch_add(1, Ordering::Relaxed);
    }
    q
}

fn merge_storm(kind: Impl, stop: Stop) {
    let args = strings(&[
        "--blockdev",
        "driver=file,node-name=disk-file,filename=$DIR/disk.qcow2,discard=unmap",
        "--blockdev",
        "driver=qcow2,node-name=disk,file=disk-file,discard=unmap",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=vm,node-name=disk,name=vm,writable=on",
    ]);
    let mut inst = Instance::start_with_monitors(kind, &args, 2, |d| {
        qcow2_image(&d.join("disk.qcow2"), MERGE_DISK)
    });
    let mut q0 = inst.client_on(0);
    for name in ["b1", "b2"] {
        let r = q0.exec(
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": name, "granularity": 512, "persistent": true}),
        );
        assert_eq!(r, json!({"return": {}}), "{kind:?}: add {name}");
    }
    let q1 = inst.client_on(1);

    let mut writer = Script::spawn(
        "graph_merge_writer.py",
        &[&inst.nbd_uri("vm")],
        inst.dir.path(),
    );
    writer.expect("ready", SCRIPT_DEADLINE);

    writer.send("begin");
    let started = Instant::now();
    let go = Arc::new(Barrier::new(2));
    let (done_a, done_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = {
        let (go, done) = (go.clone(), done_a.clone());
        thread::spawn(move || merge_loop(q0, "b2", "b1", go, done))
    };
    let b = {
        let done = done_b.clone();
        thread::spawn(move || merge_loop(q1, "b1", "b2", go, done))
    };
    // A deadlocked daemon shows as a reply timeout (qmp_common's deadline,
    // "reply before deadline") in one of the loops.
    let joined = (a.join(), b.join());
    let (Ok(mut q0), Ok(q1)) = joined else {
        panic!(
            "{kind:?}: a merge loop failed (see its panic above; a missing reply is a hang): \
             {} of {MERGES} merges b1->b2 and {} of b2->b1 answered\n--- daemon log ---\n{}",
            done_a.load(Ordering::Relaxed),
            done_b.load(Ordering::Relaxed),
            inst.log()
        );
    };
    let merging = started.elapsed();

    // The writer answers once a whole-disk trim pass and some writes were
    // acknowledged, and says how many writes completed while the merges ran.
    writer.send("report");
    let report = writer.expect("ok ", SCRIPT_DEADLINE);
    assert!(field(&report, "trims") >= 1, "{report}");
    assert!(
        field(&report, "during") > 0,
        "no write completed during the merges: {report}"
    );
    eprintln!(
        "{kind:?}/{stop:?}: {} merges in {merging:?}; writer: {report}",
        2 * MERGES
    );

    // Both bitmaps recorded from before the first write, and every trim
    // covered its range of the disk: both are dirty all over.
    let node = node_info(&mut q0, "disk").expect("node disk");
    let mut bitmaps = node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    bitmaps.sort_by_key(|b| b["name"].as_str().unwrap_or("").to_owned());
    assert_eq!(bitmaps.len(), 2, "{kind:?}: {node}");
    for (b, name) in bitmaps.iter().zip(["b1", "b2"]) {
        assert_eq!(b["name"], name, "{kind:?}: {b}");
        assert_eq!(b["granularity"], 512, "{kind:?}: {b}");
        assert_eq!(b["persistent"], true, "{kind:?}: {b}");
        assert_eq!(b["recording"], true, "{kind:?}: {b}");
        assert_eq!(b["count"], MERGE_DISK, "{kind:?}: {b}");
    }

    // Stop the daemon while the writer still writes.
    match stop {
        Stop::Quit => assert_eq!(q0.exec("quit", json!({})), json!({"return": {}})),
        Stop::Sigterm => signal(inst.pid(), libc::SIGTERM),
    }
    let t = Instant::now();
    assert!(
        inst.wait_exit(EXIT_DEADLINE),
        "{kind:?}: no exit within {EXIT_DEADLINE:?} of {stop:?}\n--- daemon log ---\n{}",
        inst.log()
    );
    let status = inst.exit_status().expect("exited");
    assert!(
        status.success(),
        "{kind:?}: exit status {status} after {stop:?}\n--- daemon log ---\n{}",
        inst.log()
    );
    eprintln!("{kind:?}/{stop:?}: exited {:?} after {stop:?}", t.elapsed());
    drop((q0, q1));
    // The writer sees its connection end, or its commands fail, and exits 0.
    let st = writer.finish(SCRIPT_DEADLINE);
    assert!(st.success(), "writer: {st}; stderr:\n{}", writer.stderr());

    let img = inst.path("disk.qcow2");
    let info = image_info(&img);
    let mut stored: Vec<Value> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    stored.sort_by_key(|b| b["name"].as_str().unwrap_or("").to_owned());
    assert_eq!(
        Value::Array(stored),
        json!([
            {"flags": ["auto"], "name": "b1", "granularity": 512},
            {"flags": ["auto"], "name": "b2", "granularity": 512},
        ]),
        "{kind:?}/{stop:?}: stored bitmaps (in-use must be clear): {info}"
    );
    assert_image_clean(&img);
}

#[test]
fn opposite_merges_under_write_and_trim_then_quit_tidemark() {
    merge_storm(Impl::Tidemark, Stop::Quit);
}

#[test]
fn opposite_merges_under_write_and_trim_then_sigterm_tidemark() {
    merge_storm(Impl::Tidemark, Stop::Sigterm);
}

#[test]
fn opposite_merges_under_write_and_trim_then_quit_qsd() {
    merge_storm(Impl::Qsd, Stop::Quit);
}

#[test]
fn opposite_merges_under_write_and_trim_then_sigterm_qsd() {
    merge_storm(Impl::Qsd, Stop::Sigterm);
}

// ---- check 5: replacement under load ----------------------------------------

const LOAD_DISK: u64 = 256 << 20;
/// Graph changes per run: insert, remove, insert, ...
const CHANGES: usize = 50;
/// Progress ticks (16 completed commands each) between two graph changes.
const TICKS_BETWEEN: usize = 8;
const FILTER: &str = "swap-filter";

/// Where the filter goes, if anywhere.
#[derive(Clone, Copy, Debug)]
enum Swap {
    /// No graph changes: the load and its checks alone.
    None,
    /// Above the qcow2 node: the export's root moves.
    AboveFormat,
    /// Above the file node: the qcow2 node's `file` child moves. The last
    /// insert stays, so the daemon closes with the filter in the graph.
    AboveFile,
}

fn export_node(q: &mut Qmp) -> Value {
    let r = q.exec("query-block-exports", json!({}));
    r["return"][0]["node-name"].clone()
}

fn replacement_under_load(kind: Impl, swap: Swap) {
    let args = strings(&[
        "--blockdev",
        "driver=file,node-name=disk-file,filename=$DIR/disk.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=disk,file=disk-file",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=vm,node-name=disk,name=vm,writable=on",
    ]);
    let mut inst = Instance::start(kind, &args, |d| {
        qcow2_image(&d.join("disk.qcow2"), LOAD_DISK)
    });
    let mut q = inst.client();
    let model = inst.path("model.raw");
    let mut load = Script::spawn(
        "graph_replace_load.py",
        &[
            &inst.nbd_uri("vm"),
            model.to_str().expect("utf-8 path"),
            "5",
        ],
        inst.dir.path(),
    );
    load.expect("ready", SCRIPT_DEADLINE);

    let (target, changes) = match swap {
        Swap::None => ("", CHANGES),
        Swap::AboveFormat => ("disk", CHANGES),
        Swap::AboveFile => ("disk-file", CHANGES + 1),
    };
    let mut inserted = false;
    for i in 0..changes {
        // Commands completed since the last change: the change lands on a
        // graph with requests in flight, and the load went on after it.
        load.fresh_ticks(TICKS_BETWEEN, SCRIPT_DEADLINE);
        if matches!(swap, Swap::None) {
            continue;
        }
        let r = if inserted {
            q.exec("x-tidemark-remove-filter", json!({"node": FILTER}))
        } else {
            q.exec(
                "x-tidemark-insert-filter",
                json!({"node": target, "filter-node-name": FILTER}),
            )
        };
        let what = if inserted { "remove" } else { "insert" };
        assert_eq!(
            r,
            json!({"return": {}}),
            "{kind:?}: {what} #{i} of the filter above {target}\n--- daemon log ---\n{}",
            inst.log()
        );
        inserted = !inserted;
        assert_eq!(
            node_info(&mut q, FILTER).is_some(),
            inserted,
            "{kind:?}: after {what} #{i}, query-named-block-nodes: {}",
            q.exec("query-named-block-nodes", json!({}))
        );
        assert!(node_info(&mut q, target).is_some(), "{target} gone");
        if inserted {
            // The filter has a user now (the export, or the qcow2 node's
            // `file` edge), so it cannot be deleted.
            let r = q.exec("blockdev-del", json!({"node-name": FILTER}));
            assert!(
                r.get("error").is_some(),
                "{kind:?}: blockdev-del of the filter inserted above {target} (#{i}): {r}"
            );
        }
        // Above the format node every export root moves onto the filter (and
        // back); above the file node the export stays where it was.
        let want = match swap {
            Swap::AboveFormat if inserted => FILTER,
            _ => "disk",
        };
        assert_eq!(export_node(&mut q), want, "{kind:?}: after {what} #{i}");
    }
    load.fresh_ticks(TICKS_BETWEEN, SCRIPT_DEADLINE);
    load.send("stop");
    // Drain, then the whole disk through a fresh connection, checked against
    // the model (with the filter still in for AboveFile).
    let done = load.expect("done ", SCRIPT_DEADLINE);
    eprintln!("{kind:?}/{swap:?}: {done}");
    assert!(
        field(&done, "writes") > 0 && field(&done, "reads") > 0,
        "{done}"
    );
    assert_eq!(field(&done, "verified"), LOAD_DISK, "{done}");
    let st = load.finish(SCRIPT_DEADLINE);
    assert!(st.success(), "load: {st}; stderr:\n{}", load.stderr());

    assert_eq!(q.exec("quit", json!({})), json!({"return": {}}));
    assert!(
        inst.wait_exit(EXIT_DEADLINE),
        "{kind:?}: no exit within {EXIT_DEADLINE:?} of quit\n--- daemon log ---\n{}",
        inst.log()
    );
    let status = inst.exit_status().expect("exited");
    assert!(status.success(), "{kind:?}: exit status {status}");

    let img = inst.path("disk.qcow2");
    let mut cmd = tool("qemu-img");
    cmd.args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&model)
        .arg(&img);
    let out = output(&mut cmd);
    assert!(out.status.success(), "{}", describe_failure(&cmd, &out));
    assert_image_clean(&img);
}

#[test]
fn filter_above_format_node_swapped_under_load() {
    replacement_under_load(Impl::Tidemark, Swap::AboveFormat);
}

#[test]
fn filter_above_file_node_swapped_under_load() {
    replacement_under_load(Impl::Tidemark, Swap::AboveFile);
}

#[test]
fn load_reads_back_every_write_tidemark() {
    replacement_under_load(Impl::Tidemark, Swap::None);
}

#[test]
fn load_reads_back_every_write_qsd() {
    replacement_under_load(Impl::Qsd, Swap::None);
}
