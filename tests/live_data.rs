//! Data integrity of live block operations: external snapshots, active
//! commit, mirror (blockdev-mirror and drive-mirror) and libvirt's dirty
//! bitmap handling across them, each under a writable NBD export that one
//! libnbd client keeps using throughout. Every scenario runs, with the same
//! command line and the same QMP, against qemu-storage-daemon 10.0.2 (which
//! checks the test) and `tidemark daemon`.
//!
//! The NBD side is tests/py/live_agent.py: ONE connection for the whole
//! scenario, a shadow copy (a raw file) of what the export must hold, a log
//! of every acknowledged write, and an optional background writer (writes
//! and write-zeroes of 4 KiB..64 KiB at 512-byte aligned offsets, never two
//! overlapping ranges in flight, so the shadow is exact). The test drives the
//! daemon over QMP and the agent over a pipe, and at the end compares, with
//! `qemu-img compare`, the image files against the shadow (or against a copy
//! of the shadow saved at a well-defined point), and runs `qemu-img check`.
//!
//! A. snapshot_sync / snapshot_blockdev: pattern A written, then
//!    blockdev-snapshot-sync (or blockdev-snapshot of a blockdev-add'ed
//!    overlay with backing: null) while the client stays connected; pattern B
//!    (overlapping A) over the same connection; the export reads A+B, the old
//!    layer file holds A only, the overlay chain A+B.
//! B. commit_active / commit_active_cancel: active block-commit under the
//!    background writer; READY; job-complete pivots the export onto base,
//!    which alone holds every write. Cancel after READY: the export stays on
//!    top, base is the chain at the cancel point, later writes land in top.
//! C. mirror_background / mirror_write_blocking / mirror_cancel /
//!    drive_mirror_full / drive_mirror_top: sync=full mirror to a
//!    blockdev-add'ed qcow2 target (both copy modes), job-complete pivots the
//!    export onto the target, which then equals the shadow. Cancel after READY
//!    leaves the target a copy of the source at the cancel point and the
//!    source in use. drive-mirror mode=absolute-paths creates the target;
//!    with sync=top its backing is the source's backing.
//! D. bitmaps_libvirt: libvirt's checkpoint bitmap rules across an external
//!    snapshot and an active commit (docs/kbase/incrementalbackupinternals
//!    and qemuBlockGetBitmapMergeActions in libvirt's src/qemu/qemu_block.c):
//!    the merged bitmaps cover exactly the writes since the checkpoint.
//! E. block_stream / commit_intermediate: base <- mid <- top under the
//!    background writer; block-stream of mid into top (base-node=base), or
//!    block-commit of mid into base (top-node=mid): no READY, the export stays
//!    on top, top's header names base as its backing afterwards, the chain
//!    holds every write, and after the commit base alone is the old base+mid.
//!
//! Jobs start with a `speed` limit, so that the writer's commands provably
//! overlap the copy phase (query-block-jobs says "not ready" after they were
//! acknowledged); block-job-set-speed 0 then lets the job reach READY.
//!
//! `LIVE_DATA_ONLY=qsd` (or `=tidemark`) runs one side only. Synchronisation
//! is by QMP replies and events, agent replies and pidfds, each with a
//! deadline; nothing sleeps. Processes are killed and temp dirs removed on
//! every exit path (the drops of `Agent` and `Instance`).

mod common;
mod qmp_common;

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use common::{describe_failure, output, pattern, run, tool, PyScript};
use qmp_common::{wait_child, Impl, Instance, Qmp};
use serde_json::{json, Value};

/// The disk of scenarios A, B, C and E.
const DISK: u64 = 32 << 20;
/// The disk of scenario D: large enough that the writes leave most of the
/// bitmap clean (an all-dirty bitmap must not pass).
const BITMAP_DISK: u64 = 256 << 20;
const GRAN: u64 = 65536;
/// A job's speed (bytes/s) until the test has seen writes during its copy
/// phase; then block-job-set-speed 0.
const SLOW: u64 = 2 << 20;
/// Writes the agent must have had acknowledged in each phase.
const BATCH: u64 = 100;
const SEED: u64 = 0x6c69_7665;

/// For a QMP event or an agent reply (the agent's own waits give up after
/// 30 s and say so).
const STEP_DEADLINE: Duration = Duration::from_secs(45);
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

// ---- which implementations --------------------------------------------------

/// Runs `scenario` on `kind`, unless `LIVE_DATA_ONLY=qsd|tidemark` asks
/// for the other side only.
fn run_on(kind: Impl, scenario: impl FnOnce(Impl)) {
    let selected = match std::env::var("LIVE_DATA_ONLY").as_deref() {
        Err(_) | Ok("") => true,
        Ok("qsd") => kind == Impl::Qsd,
        Ok("tidemark") => kind == Impl::Tidemark,
        Ok(other) => panic!("LIVE_DATA_ONLY={other:?}: expected qsd or tidemark"),
    };
    if selected {
        scenario(kind);
    } else {
        eprintln!("skipped: LIVE_DATA_ONLY");
    }
}

/// Per line, two tests: `$scenario` (a function of the `Impl`) on qsd, and
/// on tidemark.
macro_rules! both {
    ($($qsd:ident, $tidemark:ident: $scenario:expr;)*) => {
        $(
            #[test]
            fn $qsd() {
                run_on(Impl::Qsd, $scenario);
            }

            #[test]
            fn $tidemark() {
                run_on(Impl::Tidemark, $scenario);
            }
        )*
    };
}

both! {
    snapshot_sync_qsd, snapshot_sync_tidemark: |kind| snapshot_scenario(kind, false);
    snapshot_blockdev_qsd, snapshot_blockdev_tidemark: |kind| snapshot_scenario(kind, true);
    commit_active_qsd, commit_active_tidemark: |kind| commit_active_scenario(kind, false);
    commit_active_cancel_qsd, commit_active_cancel_tidemark: |kind| commit_active_scenario(kind, true);
    mirror_background_qsd, mirror_background_tidemark: |kind| mirror_scenario(kind, Mirror::Background);
    mirror_write_blocking_qsd, mirror_write_blocking_tidemark: |kind| mirror_scenario(kind, Mirror::WriteBlocking);
    mirror_cancel_qsd, mirror_cancel_tidemark: |kind| mirror_scenario(kind, Mirror::Cancel);
    drive_mirror_full_qsd, drive_mirror_full_tidemark: |kind| mirror_scenario(kind, Mirror::DriveFull);
    drive_mirror_top_qsd, drive_mirror_top_tidemark: |kind| mirror_scenario(kind, Mirror::DriveTop);
    bitmaps_libvirt_qsd, bitmaps_libvirt_tidemark: bitmaps_libvirt;
    block_stream_qsd, block_stream_tidemark: |kind| middle_job(kind, true);
    commit_intermediate_qsd, commit_intermediate_tidemark: |kind| middle_job(kind, false);
}

// ---- qemu's job events --------------------------------------------------------

/// A job with auto-finalize and auto-dismiss that reaches READY and is then
/// completed, or cancelled (block-job-cancel without force: after READY that
/// is a completion without pivot, and qemu says BLOCK_JOB_COMPLETED).
/// A job that finishes on its own (stream, intermediate commit).
const JOB_EVENTS: [&str; 7] = [
    "created",
    "running",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
];

const READY_JOB_EVENTS: [&str; 9] = [
    "created",
    "running",
    "ready",
    "BLOCK_JOB_READY",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
];

/// `seen` without the pauses qemu makes for drained sections (a running job
/// goes "paused" then "running", a ready one "standby" then "ready"): when
/// and whether they happen is the implementation's business.
fn without_pauses(seen: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < seen.len() {
        let pair = (
            seen[i].as_str(),
            seen.get(i + 1).map(String::as_str).unwrap_or(""),
        );
        if pair == ("paused", "running") || pair == ("standby", "ready") {
            i += 2;
        } else {
            out.push(seen[i].clone());
            i += 1;
        }
    }
    out
}

// ---- offline tools -------------------------------------------------------------

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> String {
    let mut cmd = tool("qemu-img");
    cmd.args(args);
    for p in paths {
        cmd.arg(p);
    }
    run(&mut cmd)
}

/// A qcow2 image of `size` holding seeded pseudo-random data everywhere.
fn random_qcow2(path: &Path, size: u64, seed: u64) {
    let raw = path.with_extension("seed.raw");
    std::fs::write(&raw, pattern(size as usize, seed)).expect("write seed data");
    qemu_img(
        &["convert", "-q", "-f", "raw", "-O", "qcow2"],
        &[&raw, path],
    );
    std::fs::remove_file(&raw).expect("remove seed data");
}

/// `backing` <- `path`, the backing file named by its absolute path.
fn overlay_qcow2(path: &Path, backing: &Path) {
    let mut cmd = tool("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(path);
    run(&mut cmd);
}

fn empty_qcow2(path: &Path, size: u64) {
    let mut cmd = tool("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string());
    run(&mut cmd);
}

/// qemu-io commands on an image nobody has open.
fn qemu_io_offline(img: &Path, cmds: &[&str]) {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(img);
    let out = run(&mut cmd);
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

/// The guest view of a qcow2 chain as a raw file (the agent's shadow).
fn to_raw(img: &Path, raw: &Path) {
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw"], &[img, raw]);
}

/// A qcow2 layer alone (its backing not opened: unallocated reads as zeroes)
/// as a raw file.
fn layer_to_raw(img: &Path, raw: &Path) {
    let spec = json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": img.display().to_string()},
        "backing": null,
    });
    let mut cmd = tool("qemu-img");
    cmd.args(["convert", "-O", "raw"])
        .arg(format!("json:{spec}"))
        .arg(raw);
    run(&mut cmd);
}

/// `qemu-img compare` of image `img` (qcow2, its chain) with raw file `raw`:
/// the command and what it did.
fn compare_with_raw(img: &Path, raw: &Path) -> (Command, Output) {
    let mut cmd = tool("qemu-img");
    cmd.args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(img)
        .arg(raw);
    let out = output(&mut cmd);
    (cmd, out)
}

/// `qemu-img check` must find nothing wrong.
fn assert_image_clean(kind: Impl, img: &Path) {
    let mut cmd = tool("qemu-img");
    cmd.arg("check").arg(img);
    let out = output(&mut cmd);
    assert!(
        out.status.success(),
        "{kind:?}: {}",
        describe_failure(&cmd, &out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("No errors were found on the image."),
        "{kind:?}: qemu-img check {}: {text}",
        img.display()
    );
}

/// `qemu-img info --backing-chain --output=json`: one object per layer.
fn chain_info(img: &Path) -> Vec<Value> {
    let out = qemu_img(&["info", "--backing-chain", "--output=json"], &[img]);
    match serde_json::from_str::<Value>(&out).expect("qemu-img info is JSON") {
        Value::Array(a) => a,
        v => vec![v],
    }
}

// ---- the NBD agent ----------------------------------------------------------------

/// tests/py/live_agent.py on the export; killed and reaped on drop.
struct Agent(PyScript);

impl Agent {
    fn spawn(uri: &str, shadow: &Path, dir: &Path) -> Agent {
        let seed = SEED.to_string();
        let args = [OsStr::new(uri), shadow.as_os_str(), OsStr::new(&seed)];
        Agent(PyScript::spawn(
            "live_agent.py",
            args,
            dir.join("agent.stderr"),
        ))
    }

    fn stderr(&self) -> String {
        self.0.stderr()
    }

    /// The next line from the agent.
    fn line(&mut self) -> Result<String, String> {
        match self.0.lines.recv_timeout(STEP_DEADLINE) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "agent: no reply within {STEP_DEADLINE:?}; stderr:\n{}",
                self.stderr()
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err(format!("agent: exited; stderr:\n{}", self.stderr()))
            }
        }
    }

    fn send(&mut self, line: &str) -> Result<String, String> {
        let Some(stdin) = self.0.stdin.as_mut() else {
            return Err("agent: stdin closed".into());
        };
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("agent: write {line:?}: {e}; stderr:\n{}", self.stderr()))?;
        self.line()
    }

    fn quit(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        if !wait_child(&mut self.0.child, EXIT_DEADLINE) {
            panic!("agent: no exit after quit; stderr:\n{}", self.stderr());
        }
    }
}

// ---- one scenario's daemon, monitor and agent ------------------------------------------

struct Live {
    kind: Impl,
    inst: Instance,
    q: Qmp,
    agent: Agent,
    /// Every event received, in order, and whether a wait took it.
    events: Vec<(Value, bool)>,
    t0: Instant,
}

impl Live {
    /// Starts `kind` with `args` after `setup`, which must leave the guest
    /// view of the exported image in `$DIR/shadow.raw`; then the agent on
    /// export "vm".
    fn start(kind: Impl, args: &[&str], setup: impl FnOnce(&Path)) -> Live {
        let t0 = Instant::now();
        let inst = Instance::start(kind, &strings(args), setup);
        let q = inst.client();
        let mut agent = Agent::spawn(
            &inst.nbd_uri("vm"),
            &inst.path("shadow.raw"),
            inst.dir.path(),
        );
        match agent.line() {
            Ok(l) if l.starts_with("ready ") => {}
            r => panic!(
                "{kind:?}: the agent did not connect: {r:?}\n--- daemon log ---\n{}",
                inst.log()
            ),
        }
        Live {
            kind,
            inst,
            q,
            agent,
            events: Vec::new(),
            t0,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.inst.path(name)
    }

    #[track_caller]
    fn fail(&self, msg: &str) -> ! {
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(e, _)| {
                let mut e = e.clone();
                if let Some(m) = e.as_object_mut() {
                    m.remove("timestamp");
                }
                e.to_string()
            })
            .collect();
        panic!(
            "{:?} after {:?}: {msg}\n--- events ---\n{}\n--- agent stderr ---\n{}\n--- daemon log ---\n{}",
            self.kind,
            self.t0.elapsed(),
            events.join("\n"),
            self.agent.stderr(),
            self.inst.log()
        )
    }

    /// A command that must succeed: its "return" value.
    #[track_caller]
    fn qmp(&mut self, name: &str, args: Value) -> Value {
        let r = self.q.exec(name, args.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => self.fail(&format!("{name} {args}: {r}")),
        }
    }

    #[track_caller]
    fn transaction(&mut self, actions: Value) {
        self.qmp("transaction", json!({ "actions": actions }));
    }

    /// blockdev-add of the qcow2 image `img` as node `node`; with
    /// `no_backing`, `"backing": null` (as libvirt adds an overlay).
    #[track_caller]
    fn add_qcow2(&mut self, node: &str, img: &Path, no_backing: bool) {
        let mut args = json!({
            "driver": "qcow2",
            "node-name": node,
            "file": {"driver": "file", "filename": img.display().to_string()},
        });
        if no_backing {
            args["backing"] = Value::Null;
        }
        self.qmp("blockdev-add", args);
    }

    /// An agent command that must reply "ok ...": the rest of the reply.
    #[track_caller]
    fn agent(&mut self, line: &str) -> String {
        match self.agent.send(line) {
            Ok(r) if r == "ok" => String::new(),
            Ok(r) if r.starts_with("ok ") => r[3..].to_owned(),
            Ok(r) => self.fail(&format!("agent {line:?}: {r}")),
            Err(e) => self.fail(&e),
        }
    }

    /// `BATCH` more writes by the background writer.
    #[track_caller]
    fn writes(&mut self) -> u64 {
        let r = self.agent(&format!("wait {BATCH}"));
        r.parse()
            .unwrap_or_else(|_| self.fail(&format!("agent wait: {r:?}")))
    }

    /// The writes from now on are phase `name`'s; `BATCH` of them.
    #[track_caller]
    fn phase(&mut self, name: &str) {
        self.agent(&format!("phase {name}"));
        self.writes();
    }

    /// `phase`, with the background writer (stopped or paused) started.
    #[track_caller]
    fn start_phase(&mut self, name: &str) {
        self.agent(&format!("phase {name}"));
        self.agent("start");
        self.writes();
    }

    /// With the writer paused: the agent reads the whole export back and
    /// compares it with the shadow; job `id`'s events must be `want`; then
    /// `quit`.
    #[track_caller]
    fn verify_and_quit(&mut self, id: &str, want: &[&str]) {
        self.agent("pause");
        self.agent("verify");
        self.assert_job_events(id, want);
        self.quit();
    }

    /// The first event not yet taken named `name` (for the job or export
    /// `id`, if given).
    #[track_caller]
    fn event(&mut self, name: &str, id: Option<&str>) -> Value {
        let deadline = Instant::now() + STEP_DEADLINE;
        let matches = |e: &Value| {
            e["event"] == name
                && id.is_none_or(|id| e["data"]["device"] == id || e["data"]["id"] == id)
        };
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|(e, taken)| !taken && matches(e))
            {
                self.events[i].1 = true;
                return self.events[i].0.clone();
            }
            match self.q.next_event_until(deadline) {
                Some(e) => self.events.push((e, false)),
                None => self.fail(&format!(
                    "no {name} event (for {id:?}) within {STEP_DEADLINE:?}"
                )),
            }
        }
    }

    /// Waits until job `id` is gone (JOB_STATUS_CHANGE null).
    #[track_caller]
    fn job_gone(&mut self, id: &str) {
        let deadline = Instant::now() + STEP_DEADLINE;
        loop {
            let ev = self.event("JOB_STATUS_CHANGE", Some(id));
            if ev["data"]["status"] == "null" {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!("job {id} not gone within {STEP_DEADLINE:?}"));
            }
        }
    }

    /// The job's events so far: JOB_STATUS_CHANGE statuses and BLOCK_JOB_*
    /// names.
    fn job_events(&self, id: &str) -> Vec<String> {
        self.events
            .iter()
            .map(|(e, _)| e)
            .filter_map(|e| {
                let name = e["event"].as_str()?;
                if name == "JOB_STATUS_CHANGE" && e["data"]["id"] == id {
                    Some(e["data"]["status"].as_str()?.to_owned())
                } else if name.starts_with("BLOCK_JOB_") && e["data"]["device"] == id {
                    Some(name.to_owned())
                } else {
                    None
                }
            })
            .collect()
    }

    #[track_caller]
    fn assert_job_events(&self, id: &str, want: &[&str]) {
        let seen = self.job_events(id);
        if without_pauses(&seen) != want {
            self.fail(&format!(
                "job {id}: events {seen:?}, want {want:?} (pause/resume pairs aside)"
            ));
        }
    }

    /// The node export "vm" is on.
    #[track_caller]
    fn export_node(&mut self) -> String {
        let r = self.qmp("query-block-exports", json!({}));
        let Some(e) = r
            .as_array()
            .and_then(|a| a.iter().find(|e| e["id"] == "vm"))
        else {
            self.fail(&format!("query-block-exports has no export vm: {r}"))
        };
        e["node-name"].as_str().unwrap_or("").to_owned()
    }

    #[track_caller]
    fn assert_export_on(&mut self, node: &str, when: &str) {
        let got = self.export_node();
        if got != node {
            self.fail(&format!(
                "{when}: export vm is on node {got:?}, want {node:?}"
            ));
        }
    }

    /// The job as query-block-jobs shows it.
    #[track_caller]
    fn block_job(&mut self, id: &str) -> Value {
        let r = self.qmp("query-block-jobs", json!({}));
        match r
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == id))
        {
            Some(j) => j.clone(),
            None => self.fail(&format!("query-block-jobs has no job {id}: {r}")),
        }
    }

    #[track_caller]
    fn assert_no_jobs(&mut self) {
        let r = self.qmp("query-block-jobs", json!({}));
        if r != json!([]) {
            self.fail(&format!("jobs left: {r}"));
        }
    }

    /// With the writer running and job `id` started at speed SLOW: BATCH
    /// writes are acknowledged while the job is still copying (listed, not
    /// ready), then the speed limit goes.
    #[track_caller]
    fn writes_during_copy(&mut self, id: &str) {
        self.writes();
        let job = self.block_job(id);
        let copying = job["status"] == "running" || job["status"] == "paused";
        if job["ready"] != false || !copying {
            self.fail(&format!(
                "job {id} was no longer copying after {BATCH} writes (speed {SLOW}): {job}"
            ));
        }
        self.qmp("block-job-set-speed", json!({"device": id, "speed": 0}));
    }

    /// `writes_during_copy`, then the job reaches READY: its event.
    #[track_caller]
    fn writes_during_copy_then_ready(&mut self, id: &str) -> Value {
        self.writes_during_copy(id);
        self.event("BLOCK_JOB_READY", Some(id))
    }

    /// Waits for job `id`'s BLOCK_JOB_COMPLETED (which must carry no error)
    /// and for the job to go away.
    #[track_caller]
    fn completed(&mut self, id: &str, ty: &str) {
        let ev = self.event("BLOCK_JOB_COMPLETED", Some(id));
        if ev["data"].get("error").is_some() || ev["data"]["type"] != ty {
            self.fail(&format!("job {id}: {ev}"));
        }
        self.job_gone(id);
        self.assert_no_jobs();
    }

    /// Job `id` of type `ty`, started at speed SLOW: writes during its copy
    /// phase, READY, then writes while it is ready.
    #[track_caller]
    fn until_ready(&mut self, id: &str, ty: &str) {
        self.agent("phase during-job");
        let ready = self.writes_during_copy_then_ready(id);
        if ready["data"]["type"] != ty {
            self.fail(&format!("{ready}"));
        }
        self.phase("ready");
    }

    /// job-complete of ready job `id`: it ends, with the export pivoted
    /// onto `node`; then writes there.
    #[track_caller]
    fn complete_ready(&mut self, id: &str, ty: &str, node: &str, when: &str) {
        self.qmp("job-complete", json!({ "id": id }));
        self.completed(id, ty);
        self.assert_export_on(node, when);
        self.phase("after-pivot");
    }

    /// block-job-cancel of ready job `id` with nothing in flight (after READY
    /// a completion without pivot): the export stays on `node`; then the
    /// writer goes on. Returns the shadow at the cancel point, saved.
    #[track_caller]
    fn cancel_ready(&mut self, id: &str, ty: &str, node: &str, when: &str) -> PathBuf {
        self.agent("pause");
        let at_cancel = self.path("at-cancel.raw");
        self.agent(&format!("save {}", at_cancel.display()));
        self.qmp("block-job-cancel", json!({ "device": id }));
        self.completed(id, ty);
        self.assert_export_on(node, when);
        self.start_phase("after-cancel");
        at_cancel
    }

    /// Ends the agent's connection, then `quit`: the daemon must exit 0.
    #[track_caller]
    fn quit(&mut self) {
        self.agent("disconnect");
        self.qmp("quit", json!({}));
        if !self.inst.wait_exit(EXIT_DEADLINE) {
            self.fail(&format!("no exit within {EXIT_DEADLINE:?} of quit"));
        }
        let st = self.inst.exit_status().expect("exited");
        if !st.success() {
            self.fail(&format!("exit status {st} after quit"));
        }
    }

    /// `qemu-img compare` of image `img` (qcow2, its chain) with raw file
    /// `raw` must say identical; otherwise the agent says where and what.
    #[track_caller]
    fn assert_same(&mut self, img: &Path, raw: &Path, what: &str) {
        let (cmd, out) = compare_with_raw(img, raw);
        match out.status.code() {
            Some(0) => {}
            Some(1) => {
                let conv = self.path("mismatch.raw");
                to_raw(img, &conv);
                let detail = self
                    .agent
                    .send(&format!("diff {}", conv.display()))
                    .unwrap_or_else(|e| e);
                self.fail(&format!(
                    "{what}: {} differs from {}: {}\n{detail}",
                    img.display(),
                    raw.display(),
                    String::from_utf8_lossy(&out.stdout).trim()
                ));
            }
            _ => self.fail(&describe_failure(&cmd, &out)),
        }
    }

    /// `qemu-img compare` must find a difference.
    #[track_caller]
    fn assert_differs(&mut self, img: &Path, raw: &Path, what: &str) {
        let (cmd, out) = compare_with_raw(img, raw);
        if out.status.code() != Some(1) {
            self.fail(&format!("{what}: {}", describe_failure(&cmd, &out)));
        }
    }

    /// `img` must be a layer over `backing` (named by its absolute path),
    /// a chain of two; else fails with `what` and the chain.
    #[track_caller]
    fn assert_backing(&self, img: &Path, backing: &Path, what: &str) {
        let chain = chain_info(img);
        if chain.len() != 2 || chain[0]["full-backing-filename"] != backing.display().to_string() {
            self.fail(&format!("{what}: {chain:?}"));
        }
    }

    fn done(mut self) {
        let stats = self.agent("stats");
        self.agent.quit();
        eprintln!(
            "{:?}: passed in {:?}; agent: {stats}",
            self.kind,
            self.t0.elapsed()
        );
    }
}

fn blockdev(node: &str, file: &str, backing: Option<&str>) -> Vec<String> {
    let mut v = vec![
        "--blockdev".to_owned(),
        format!("driver=file,node-name={node}-file,filename=$DIR/{file}"),
        "--blockdev".to_owned(),
    ];
    let mut q = format!("driver=qcow2,node-name={node},file={node}-file");
    if let Some(b) = backing {
        q += &format!(",backing={b}");
    }
    v.push(q);
    v
}

fn serve(node: &str) -> Vec<String> {
    strings(&[
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        &format!("type=nbd,id=vm,node-name={node},name=vm,writable=on"),
    ])
}

fn args(parts: &[Vec<String>]) -> Vec<String> {
    parts.concat()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---- A: snapshot under a serving export -------------------------------------------------

/// Pattern A: scattered extents, some crossing cluster boundaries, one
/// write-zeroes over the image's own data.
const PATTERN_A: [(&str, u64, u64); 7] = [
    ("write", 0, 0x10000),
    ("write", 0x1_1000, 0x3000),
    ("write", 0x10_0200, 0x1_9000),
    ("zero", 0x20_0000, 0x4_0000),
    ("write", 0x4F_F000, 0x2000),
    ("write", 0xA0_0000, 0x10_0000),
    ("write", DISK - 0x1_0000, 0x1_0000),
];

/// Pattern B: partly over A, partly new.
const PATTERN_B: [(&str, u64, u64); 7] = [
    ("write", 0x8000, 0x1_0000),
    ("write", 0x10_0000, 0x2000),
    ("write", 0x4F_F800, 0x1000),
    ("zero", 0xA8_0000, 0x1_0000),
    ("write", 0x140_0000, 0x4_B000),
    ("write", 0x21_0000, 0x1000),
    ("write", DISK - 0x1000, 0x1000),
];

fn write_pattern(l: &mut Live, p: &[(&str, u64, u64)]) {
    for (what, off, len) in p {
        l.agent(&format!("{what} {off} {len}"));
    }
}

fn snapshot_setup(d: &Path, blockdev_overlay: bool) {
    let disk = d.join("disk.qcow2");
    empty_qcow2(&disk, DISK);
    // The image's own data, before pattern A.
    qemu_io_offline(&disk, &["write -P 0x5a 0 4M", "write -P 0xa5 12M 4M"]);
    to_raw(&disk, &d.join("shadow.raw"));
    if blockdev_overlay {
        // As libvirt does: the overlay is created with its backing file
        // named, and opened with backing: null.
        overlay_qcow2(&d.join("overlay.qcow2"), &disk);
    }
}

fn snapshot_scenario(kind: Impl, blockdev_overlay: bool) {
    let a = args(&[blockdev("disk", "disk.qcow2", None), serve("disk")]);
    let mut l = Live::start(kind, &refs(&a), |d| snapshot_setup(d, blockdev_overlay));
    write_pattern(&mut l, &PATTERN_A);
    let a_only = l.path("a.raw");
    l.agent(&format!("save {}", a_only.display()));

    let overlay = l.path("overlay.qcow2");
    if blockdev_overlay {
        l.add_qcow2("ov", &overlay, true);
        l.qmp(
            "blockdev-snapshot",
            json!({"node": "disk", "overlay": "ov"}),
        );
    } else {
        l.qmp(
            "blockdev-snapshot-sync",
            json!({
                "node-name": "disk",
                "snapshot-file": overlay.display().to_string(),
                "snapshot-node-name": "ov",
                "format": "qcow2",
            }),
        );
    }
    l.assert_export_on("ov", "after the snapshot");

    l.agent("phase b");
    write_pattern(&mut l, &PATTERN_B);
    l.agent("verify");
    l.quit();

    let (disk, shadow) = (l.path("disk.qcow2"), l.path("shadow.raw"));
    l.assert_same(&disk, &a_only, "the old layer holds A only");
    l.assert_same(&overlay, &shadow, "the overlay chain holds A+B");
    l.assert_backing(
        &overlay,
        &disk,
        "the overlay's backing is not the old layer",
    );
    assert_image_clean(kind, &disk);
    assert_image_clean(kind, &overlay);
    l.done();
}

// ---- B: active commit under writes ------------------------------------------------------

/// base (random data everywhere) <- top (some extents of its own, one of
/// them zeroes over base's data); shadow.raw is the chain.
fn chain_setup(d: &Path, top: &str) {
    let base = d.join("base.qcow2");
    random_qcow2(&base, DISK, SEED);
    let top = d.join(top);
    overlay_qcow2(&top, &base);
    qemu_io_offline(
        &top,
        &[
            "write -P 0x33 1M 3M",
            "write -z 6M 1M",
            "write -P 0x44 10M 2M",
            "write -P 0x55 31M 512K",
        ],
    );
    to_raw(&top, &d.join("shadow.raw"));
}

/// Active commit of top into base under the writer, to READY; then
/// job-complete (the export pivots onto base), or block-job-cancel.
fn commit_active_scenario(kind: Impl, cancel: bool) {
    let a = args(&[
        blockdev("base", "base.qcow2", None),
        blockdev("top", "top.qcow2", Some("base")),
        serve("top"),
    ]);
    let mut l = Live::start(kind, &refs(&a), |d| chain_setup(d, "top.qcow2"));
    l.start_phase("before-job");
    l.qmp(
        "block-commit",
        json!({"job-id": "c0", "device": "top", "speed": SLOW}),
    );
    l.until_ready("c0", "commit");

    let (base, top, shadow) = (
        l.path("base.qcow2"),
        l.path("top.qcow2"),
        l.path("shadow.raw"),
    );
    if cancel {
        let at_cancel = l.cancel_ready("c0", "commit", "top", "after cancelling the ready commit");
        l.verify_and_quit("c0", &READY_JOB_EVENTS);
        l.assert_same(&top, &shadow, "the chain holds every write");
        l.assert_same(&base, &at_cancel, "base is the chain at the cancel point");
        let top_alone = l.path("top-alone.raw");
        layer_to_raw(&top, &top_alone);
        let r = l
            .agent
            .send(&format!("diff {} after-cancel", top_alone.display()));
        match r {
            Ok(r) if r.starts_with("ok") => {}
            r => l.fail(&format!(
                "writes after the cancel are not all in top: {r:?}"
            )),
        }
    } else {
        l.complete_ready("c0", "commit", "base", "after the active commit");
        l.verify_and_quit("c0", &READY_JOB_EVENTS);
        l.assert_same(&base, &shadow, "base alone holds every write");
    }
    assert_image_clean(kind, &base);
    assert_image_clean(kind, &top);
    l.done();
}

// ---- C: mirror under writes -----------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mirror {
    Background,
    WriteBlocking,
    Cancel,
    DriveFull,
    DriveTop,
}

fn mirror_scenario(kind: Impl, how: Mirror) {
    let a = args(&[
        blockdev("base", "base.qcow2", None),
        blockdev("src", "src.qcow2", Some("base")),
        serve("src"),
    ]);
    let mut l = Live::start(kind, &refs(&a), |d| {
        chain_setup(d, "src.qcow2");
        empty_qcow2(&d.join("tgt.qcow2"), DISK);
    });
    l.start_phase("before-job");

    let (target_node, target) = match how {
        Mirror::DriveFull | Mirror::DriveTop => {
            let target = l.path("new.qcow2");
            let sync = if how == Mirror::DriveTop {
                "top"
            } else {
                "full"
            };
            l.qmp(
                "drive-mirror",
                json!({
                    "job-id": "m0", "device": "src", "target": target.display().to_string(),
                    "format": "qcow2", "mode": "absolute-paths", "node-name": "new",
                    "sync": sync, "speed": SLOW,
                }),
            );
            ("new", target)
        }
        _ => {
            let target = l.path("tgt.qcow2");
            l.add_qcow2("tgt", &target, false);
            let mode = if how == Mirror::WriteBlocking {
                "write-blocking"
            } else {
                "background"
            };
            l.qmp(
                "blockdev-mirror",
                json!({
                    "job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                    "copy-mode": mode, "speed": SLOW,
                }),
            );
            ("tgt", target)
        }
    };
    l.until_ready("m0", "mirror");

    let shadow = l.path("shadow.raw");
    let src = l.path("src.qcow2");
    if how == Mirror::Cancel {
        let at_cancel = l.cancel_ready("m0", "mirror", "src", "after cancelling the ready mirror");
        l.verify_and_quit("m0", &READY_JOB_EVENTS);
        l.assert_same(
            &target,
            &at_cancel,
            "the target is the source at the cancel point",
        );
        l.assert_same(&src, &shadow, "the source holds every write");
    } else {
        l.complete_ready("m0", "mirror", target_node, "after the mirror's pivot");
        l.verify_and_quit("m0", &READY_JOB_EVENTS);
        l.assert_same(&target, &shadow, "the target holds every write");
        l.assert_differs(
            &src,
            &shadow,
            "writes after the pivot must not reach the source",
        );
    }
    let chain = chain_info(&target);
    match how {
        Mirror::DriveTop => {
            let base = l.path("base.qcow2").display().to_string();
            if chain.len() != 2
                || chain[0]["full-backing-filename"] != base
                || chain[0]["backing-filename-format"] != "qcow2"
            {
                l.fail(&format!(
                    "sync=top: the target's backing is not the source's backing {base}: {chain:?}"
                ));
            }
        }
        _ => {
            if chain.len() != 1 {
                l.fail(&format!(
                    "sync=full: the target has a backing file: {chain:?}"
                ));
            }
        }
    }
    assert_image_clean(kind, &target);
    assert_image_clean(kind, &src);
    l.done();
}

// ---- D: libvirt's bitmaps across snapshot and commit ---------------------------------------

/// What libvirt's pull backup does to read a checkpoint: a disabled,
/// transient bitmap `tmp` on `node` = the merge of `sources`, exported
/// read-only with it; the agent checks that it covers every write since the
/// checkpoint and nothing else (rounded to the granularity); then the
/// export and the bitmap go.
fn check_checkpoint(l: &mut Live, node: &str, tmp: &str, sources: Value, when: &str) {
    l.transaction(json!([
        {"type": "block-dirty-bitmap-add", "data": {
            "node": node, "name": tmp, "persistent": false, "disabled": true,
            "granularity": GRAN}},
        {"type": "block-dirty-bitmap-merge", "data": {
            "node": node, "target": tmp, "bitmaps": sources}},
    ]));
    l.qmp(
        "block-export-add",
        json!({"type": "nbd", "id": "backup", "node-name": node, "name": "backup",
               "writable": false, "bitmaps": [tmp]}),
    );
    let uri = l.inst.nbd_uri("backup");
    let r = match l.agent.send(&format!("covers {uri} {tmp} {GRAN} exact")) {
        Ok(r) if r.starts_with("ok") => r,
        r => l.fail(&format!("{when}: the checkpoint's bitmaps: {r:?}")),
    };
    eprintln!("{:?}: {when}: {r}", l.kind);
    l.qmp("block-export-del", json!({"id": "backup"}));
    l.event("BLOCK_EXPORT_DELETED", Some("backup"));
    l.qmp(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": tmp}),
    );
}

fn bitmaps_libvirt(kind: Impl) {
    let a = args(&[blockdev("base", "base.qcow2", None), serve("base")]);
    let mut l = Live::start(kind, &refs(&a), |d| {
        let base = d.join("base.qcow2");
        empty_qcow2(&base, BITMAP_DISK);
        qemu_io_offline(&base, &["write -P 0x6b 0 8M", "write -P 0x6c 100M 4M"]);
        to_raw(&base, &d.join("shadow.raw"));
        overlay_qcow2(&d.join("top.qcow2"), &base);
    });

    // The checkpoint: b0 on the active layer, recording from now on.
    l.qmp(
        "block-dirty-bitmap-add",
        json!({"node": "base", "name": "b0", "persistent": true, "granularity": GRAN}),
    );
    l.agent("mark");
    l.start_phase("before-snapshot");

    // External snapshot; the overlay gets its own b0 in the same
    // transaction; base's b0 stays.
    let top = l.path("top.qcow2");
    l.add_qcow2("top", &top, true);
    l.transaction(json!([
        {"type": "blockdev-snapshot", "data": {"node": "base", "overlay": "top"}},
        {"type": "block-dirty-bitmap-add", "data": {
            "node": "top", "name": "b0", "persistent": true, "granularity": GRAN}},
    ]));
    l.assert_export_on("top", "after the snapshot");
    l.phase("after-snapshot");

    // An incremental backup across both layers.
    l.agent("pause");
    check_checkpoint(
        &mut l,
        "top",
        "backup-vm",
        json!([{"node": "top", "name": "b0"}, {"node": "base", "name": "b0"}]),
        "backup across the snapshot",
    );

    // Active commit of top into base, libvirt's way: at the pivot a
    // recording libvirt-tmp-activewrite on base, after it top's b0 and that
    // bitmap merged into base's b0.
    l.start_phase("before-commit");
    l.qmp(
        "block-commit",
        json!({"job-id": "c0", "device": "top", "speed": SLOW}),
    );
    l.agent("phase during-commit");
    l.writes_during_copy_then_ready("c0");
    l.phase("ready");
    l.transaction(json!([
        {"type": "block-dirty-bitmap-add", "data": {
            "node": "base", "name": "libvirt-tmp-activewrite", "persistent": false,
            "disabled": false, "granularity": GRAN}},
    ]));
    l.qmp("job-complete", json!({"id": "c0"}));
    l.completed("c0", "commit");
    l.transaction(json!([
        {"type": "block-dirty-bitmap-merge", "data": {
            "node": "base", "target": "b0", "bitmaps": [
                {"node": "top", "name": "b0"},
                {"node": "base", "name": "libvirt-tmp-activewrite"}]}},
        {"type": "block-dirty-bitmap-remove", "data": {
            "node": "base", "name": "libvirt-tmp-activewrite"}},
    ]));
    l.assert_export_on("base", "after the active commit");
    l.phase("after-commit");
    l.agent("pause");
    check_checkpoint(
        &mut l,
        "base",
        "backup-vm",
        json!(["b0"]),
        "base's b0 after the commit",
    );
    l.assert_job_events("c0", &READY_JOB_EVENTS);

    // libvirt drops the committed layer.
    l.qmp("blockdev-del", json!({"node-name": "top"}));
    l.agent("verify");
    l.quit();

    let (base, shadow) = (l.path("base.qcow2"), l.path("shadow.raw"));
    l.assert_same(&base, &shadow, "base alone holds every write");
    assert_image_clean(kind, &base);
    assert_image_clean(kind, &top);
    for (img, what) in [(&base, "base"), (&top, "top")] {
        let info = &chain_info(img)[0];
        let bitmaps = &info["format-specific"]["data"]["bitmaps"];
        let want = json!([{"flags": ["auto"], "name": "b0", "granularity": GRAN}]);
        if *bitmaps != want {
            l.fail(&format!(
                "{what}: the stored bitmaps are {bitmaps}, want {want}"
            ));
        }
    }
    l.done();
}

// ---- E: stream and intermediate commit under writes ------------------------------------------

/// base (random) <- mid (extents of its own) <- top (others); shadow.raw
/// is the chain, mid.raw the chain below top.
fn three_layer_setup(d: &Path) {
    chain_setup(d, "mid.qcow2");
    std::fs::rename(d.join("shadow.raw"), d.join("mid.raw")).expect("rename");
    let top = d.join("top.qcow2");
    overlay_qcow2(&top, &d.join("mid.qcow2"));
    qemu_io_offline(&top, &["write -P 0x77 2M 1M", "write -P 0x88 20M 1M"]);
    to_raw(&top, &d.join("shadow.raw"));
}

fn middle_job(kind: Impl, stream: bool) {
    let a = args(&[
        blockdev("base", "base.qcow2", None),
        blockdev("mid", "mid.qcow2", Some("base")),
        blockdev("top", "top.qcow2", Some("mid")),
        serve("top"),
    ]);
    let mut l = Live::start(kind, &refs(&a), three_layer_setup);
    l.start_phase("before-job");
    let (job, ty) = if stream {
        l.qmp(
            "block-stream",
            json!({"job-id": "s0", "device": "top", "base-node": "base", "speed": SLOW}),
        );
        ("s0", "stream")
    } else {
        l.qmp(
            "block-commit",
            json!({"job-id": "c0", "device": "top", "top-node": "mid",
                   "base-node": "base", "speed": SLOW}),
        );
        ("c0", "commit")
    };
    l.agent("phase during-job");
    l.writes_during_copy(job);
    l.completed(job, ty);
    l.assert_export_on("top", "after the job");
    l.phase("after-job");
    l.verify_and_quit(job, &JOB_EVENTS);

    let (base, mid, top) = (
        l.path("base.qcow2"),
        l.path("mid.qcow2"),
        l.path("top.qcow2"),
    );
    let shadow = l.path("shadow.raw");
    l.assert_same(&top, &shadow, "the chain holds every write");
    if !stream {
        let mid_raw = l.path("mid.raw");
        l.assert_same(&base, &mid_raw, "base alone is the old base+mid");
    }
    l.assert_backing(
        &top,
        &base,
        &format!("top's backing is not base after the {ty}"),
    );
    for img in [&base, &mid, &top] {
        assert_image_clean(kind, img);
    }
    l.done();
}
