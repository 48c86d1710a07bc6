//! Issue check "Point in time under load": a full backup (blockdev-backup
//! sync=full, with a `speed` limit so the job lasts seconds) must copy the
//! source as it was when the job started, whatever an NBD client writes to
//! the source meanwhile. Run against `tidemark daemon` and, with the same
//! command line, against qemu-storage-daemon 10.0.2 (which checks the test).
//!
//! - The source is a 1 GiB qcow2 image (the size the issue asks for) whose
//!   every sector holds a seeded pattern stamped with its offset. Before the
//!   daemon starts, a byte copy of the image file is kept as expected.qcow2;
//!   the target is an empty qcow2 image of the same size.
//! - The daemon opens both as nodes and exports the source writable. Nothing
//!   writes to it until blockdev-backup has answered: only then does
//!   tests/py/backup_writer.py start (two libnbd connections rewriting random
//!   regions: writes and write-zeroes, most across cluster boundaries).
//! - The test waits (with a deadline) for BLOCK_JOB_COMPLETED, then stops the
//!   writer and takes its report: every command succeeded, and at least
//!   MIN_WRITES_DURING_JOB writes had been acknowledged before the event's
//!   timestamp. The job's events must be qemu's, in qemu's order (qsd also
//!   pauses and resumes the job while the writer runs: such pairs may come).
//! - After `quit`: `qemu-img compare expected target` says identical,
//!   `qemu-img compare expected source` finds a difference (the writer really
//!   wrote), and `qemu-img check` is clean on source and target. On a target
//!   mismatch the failure lists the differing ranges and what the target holds
//!   there (a writer's stamp names the write that leaked through).
//!
//! Synchronisation is by the QMP reply, QMP events, a pipe and pidfds, each
//! with a deadline; nothing sleeps. Every process is killed and every file
//! removed on any exit path (the drops of `Writer` and `Instance`).

mod common;
mod qmp_common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use common::{describe_failure, output, run, tool, PyScript};
use qmp_common::{qcow2_image, wait_child, Impl, Instance, Qmp};
use serde_json::{json, Value};

/// The disk: 1 GiB, as the issue says.
const DISK: u64 = 1 << 30;
/// The job's speed limit (bytes/s): at least four seconds for the disk.
const SPEED: u64 = 256 << 20;
const SEED: u64 = 0x7469_6465;
const JOB: &str = "bk0";
/// Writes the writer must have had acknowledged before BLOCK_JOB_COMPLETED.
const MIN_WRITES_DURING_JOB: u64 = 100;

const SECTOR: usize = 512;
/// First word of every pattern sector (xored with the seed), then its offset.
const BASE_MAGIC: u64 = 0x6261_7365_6461_7461; // "basedata"
/// backup_writer.py's stamp: magic ^ seed, offset, generation, connection.
const WRITE_MAGIC: u64 = 0x7772_6974_6572_2121; // "writer!!"

/// From the blockdev-backup reply to BLOCK_JOB_COMPLETED.
const JOB_DEADLINE: Duration = Duration::from_secs(60);
/// For the events after BLOCK_JOB_COMPLETED, and for the writer to drain.
const STEP_DEADLINE: Duration = Duration::from_secs(20);
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// qemu 10's events for a backup job with the default auto-finalize and
/// auto-dismiss (besides pauses: see `without_pauses`).
const EVENTS: [&str; 7] = [
    "JOB_STATUS_CHANGE created",
    "JOB_STATUS_CHANGE running",
    "JOB_STATUS_CHANGE waiting",
    "JOB_STATUS_CHANGE pending",
    "BLOCK_JOB_COMPLETED",
    "JOB_STATUS_CHANGE concluded",
    "JOB_STATUS_CHANGE null",
];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---- the source's pattern ---------------------------------------------------

/// The pattern of the sectors at guest offset `off` onwards, filling `buf`.
fn fill_pattern(buf: &mut [u8], off: u64) {
    for (k, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let at = off + (k * SECTOR) as u64;
        s[..8].copy_from_slice(&(BASE_MAGIC ^ SEED).to_le_bytes());
        s[8..16].copy_from_slice(&at.to_le_bytes());
        let mut x = (SEED ^ at).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for w in s[16..].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// `qemu-img map --output=json` of an image nobody has open.
fn image_map(img: &Path) -> Vec<Value> {
    let mut cmd = tool("qemu-img");
    cmd.args(["map", "-f", "qcow2", "--output=json"]).arg(img);
    let out = run(&mut cmd);
    serde_json::from_str::<Value>(&out)
        .expect("qemu-img map is JSON")
        .as_array()
        .cloned()
        .expect("qemu-img map is a list")
}

/// A qcow2 image whose every sector holds the seeded pattern. The image is
/// created with preallocated metadata (so every cluster is allocated, in
/// order) and the pattern written straight into the data clusters where
/// `qemu-img map` says they are: no raw image and no conversion, which
/// halves the I/O of the set-up.
fn seeded_qcow2(path: &Path, size: u64) {
    let mut cmd = tool("qemu-img");
    cmd.args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
    ])
    .arg(path)
    .arg(size.to_string());
    run(&mut cmd);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the new image");
    let mut buf = vec![0u8; 1 << 20];
    let mut covered = 0;
    for e in image_map(path) {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let host = e["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("preallocated extent without host offset: {e}"));
        assert_eq!(start, covered, "qemu-img map: a gap before {e}");
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            fill_pattern(&mut buf[..n], start + done);
            f.write_all_at(&buf[..n], host + done)
                .expect("write the pattern");
            done += n as u64;
        }
        covered += len;
    }
    assert_eq!(covered, size, "qemu-img map covers the disk");
    drop(f);
    for e in image_map(path) {
        assert!(
            e["data"] == true && e["zero"] == false,
            "{}: not all data after the fill: {e}",
            path.display()
        );
    }
}

/// What a sector at guest offset `off` holds, in words.
fn classify(s: &[u8], off: u64) -> String {
    let word = |i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().unwrap());
    if s.iter().all(|&b| b == 0) {
        "zeroes".to_owned()
    } else if word(0) == BASE_MAGIC ^ SEED {
        let mut want = vec![0u8; SECTOR];
        fill_pattern(&mut want, word(1));
        let whole = if s == want.as_slice() {
            ""
        } else {
            " (damaged)"
        };
        if word(1) == off {
            format!("the pattern{whole}")
        } else {
            format!("the pattern of offset {:#x}{whole}", word(1))
        }
    } else if word(0) == WRITE_MAGIC ^ SEED {
        format!(
            "the writer's data (connection {}, write #{}, for offset {:#x})",
            word(3),
            word(2),
            word(1)
        )
    } else {
        format!("foreign bytes {}...", hex(&s[..16]))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where the target differs from the expected image, for a failure message:
/// both converted to raw, compared sector by sector; the differing ranges
/// (up to 20) with what the target holds at the start of each.
fn describe_mismatch(dir: &Path, expected: &Path, target: &Path) -> String {
    let raw = |img: &Path, name: &str| -> PathBuf {
        let out = dir.join(name);
        let mut cmd = tool("qemu-img");
        cmd.args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(img)
            .arg(&out);
        run(&mut cmd);
        out
    };
    let (e, t) = (raw(expected, "expected.raw"), raw(target, "target.raw"));
    let (mut fe, mut ft) = (File::open(&e).unwrap(), File::open(&t).unwrap());
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    let (mut be, mut bt) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let (mut bad, mut off) = (0u64, 0u64);
    while off < DISK {
        fe.read_exact(&mut be).unwrap();
        ft.read_exact(&mut bt).unwrap();
        for (k, (se, st)) in be
            .chunks_exact(SECTOR)
            .zip(bt.chunks_exact(SECTOR))
            .enumerate()
        {
            if se == st {
                continue;
            }
            bad += 1;
            let at = off + (k * SECTOR) as u64;
            match ranges.last_mut() {
                Some(r) if r.1 == at => r.1 += SECTOR as u64,
                _ => ranges.push((at, at + SECTOR as u64, classify(st, at))),
            }
        }
        off += be.len() as u64;
    }
    let _ = std::fs::remove_file(&e);
    let _ = std::fs::remove_file(&t);
    let mut s = format!(
        "{bad} sectors in {} ranges differ from the source at job start:\n",
        ranges.len()
    );
    for (a, b, what) in ranges.iter().take(20) {
        s += &format!(
            "  [{a:#x}, {b:#x}) ({} bytes): target holds {what}\n",
            b - a
        );
    }
    s
}

// ---- offline checks ---------------------------------------------------------

/// `qemu-img compare -f qcow2 -F qcow2 a b`: exit status and stdout.
fn compare(a: &Path, b: &Path) -> (Option<i32>, String) {
    let mut cmd = tool("qemu-img");
    cmd.args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(a)
        .arg(b);
    let out = output(&mut cmd);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        describe_failure(&cmd, &out)
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `qemu-img check` must find nothing wrong.
fn assert_image_clean(img: &Path) {
    let mut cmd = tool("qemu-img");
    cmd.arg("check").arg(img);
    let out = output(&mut cmd);
    assert!(out.status.success(), "{}", describe_failure(&cmd, &out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("No errors were found on the image."),
        "qemu-img check {}: {text}",
        img.display()
    );
}

// ---- the writer -------------------------------------------------------------

/// tests/py/backup_writer.py: runs until told to stop, then reports one
/// line of JSON. Killed and reaped on drop.
struct Writer(PyScript);

impl Writer {
    fn spawn(uri: &str, dir: &Path) -> Writer {
        let args = [uri.to_owned(), SEED.to_string()];
        Writer(PyScript::spawn(
            "backup_writer.py",
            args,
            dir.join("writer.stderr"),
        ))
    }

    fn stderr(&self) -> String {
        self.0.stderr()
    }

    /// Stops the writer and returns its report, in which "before" counts
    /// the commands acknowledged before `limit_us` (CLOCK_REALTIME, µs).
    fn stop(&mut self, limit_us: u64) -> Value {
        if let Some(mut stdin) = self.0.stdin.take() {
            // A writer that died already shows below, with its stderr.
            let _ = writeln!(stdin, "stop {limit_us}").and_then(|()| stdin.flush());
        }
        let line = match self.0.lines.recv_timeout(STEP_DEADLINE) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!(
                "writer: no report within {STEP_DEADLINE:?}; stderr:\n{}",
                self.stderr()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "writer: exited without a report; stderr:\n{}",
                self.stderr()
            ),
        };
        assert!(
            wait_child(&mut self.0.child, STEP_DEADLINE),
            "writer: no exit after its report; stderr:\n{}",
            self.stderr()
        );
        let st = self.0.child.wait().expect("writer status");
        assert!(st.success(), "writer: {st}; stderr:\n{}", self.stderr());
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("writer report {line:?}: {e}"))
    }
}

// ---- the scenario -------------------------------------------------------------

/// An event as a line of `EVENTS`.
fn summary(ev: &Value) -> String {
    let name = ev["event"].as_str().unwrap_or("?");
    if name == "JOB_STATUS_CHANGE" {
        assert_eq!(ev["data"]["id"], JOB, "{ev}");
        format!("{name} {}", ev["data"]["status"].as_str().unwrap_or("?"))
    } else {
        name.to_owned()
    }
}

/// `seen` without the pauses of a running job: qemu pauses a job for a
/// drained section of its nodes (qsd here pauses it once or more while the
/// writer runs), with a "paused" then "running" change each time. When and
/// whether that happens is the implementation's business.
fn without_pauses(seen: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < seen.len() {
        if seen[i] == "JOB_STATUS_CHANGE paused"
            && seen.get(i + 1).map(String::as_str) == Some("JOB_STATUS_CHANGE running")
        {
            i += 2;
        } else {
            out.push(seen[i].clone());
            i += 1;
        }
    }
    out
}

/// The next event, or a failure that says what was seen and what the
/// writer and the daemon said.
fn next_event(
    q: &mut Qmp,
    deadline: Instant,
    seen: &[String],
    w: &Writer,
    inst: &Instance,
) -> Value {
    q.next_event_until(deadline).unwrap_or_else(|| {
        panic!(
            "{:?}: the job's events stopped after {seen:?} (deadline, or the monitor \
             closed)\n--- writer stderr ---\n{}\n--- daemon log ---\n{}",
            inst.kind,
            w.stderr(),
            inst.log()
        )
    })
}

fn point_in_time_under_load(kind: Impl) {
    let t0 = Instant::now();
    let args = strings(&[
        "--blockdev",
        "driver=file,node-name=src-file,filename=$DIR/source.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=src,file=src-file",
        "--blockdev",
        "driver=file,node-name=tgt-file,filename=$DIR/target.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=tgt,file=tgt-file",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=vm,node-name=src,name=vm,writable=on",
    ]);
    let mut inst = Instance::start(kind, &args, |d| {
        let source = d.join("source.qcow2");
        seeded_qcow2(&source, DISK);
        std::fs::copy(&source, d.join("expected.qcow2")).expect("copy the source image");
        qcow2_image(&d.join("target.qcow2"), DISK);
    });
    let prepared = t0.elapsed();
    let mut q = inst.client();

    let r = q.exec(
        "blockdev-backup",
        json!({"job-id": JOB, "device": "src", "target": "tgt", "sync": "full", "speed": SPEED}),
    );
    assert_eq!(
        r,
        json!({"return": {}}),
        "{kind:?}: blockdev-backup\n--- daemon log ---\n{}",
        inst.log()
    );
    let job_start = Instant::now();
    // Only now does anything write to the source.
    let mut writer = Writer::spawn(&inst.nbd_uri("vm"), inst.dir.path());

    let deadline = job_start + JOB_DEADLINE;
    let mut seen = Vec::new();
    let completed = loop {
        let ev = next_event(&mut q, deadline, &seen, &writer, &inst);
        seen.push(summary(&ev));
        if ev["event"] == "BLOCK_JOB_COMPLETED" {
            break ev;
        }
    };
    let job_time = job_start.elapsed();
    let ts = &completed["timestamp"];
    let at_us = ts["seconds"].as_u64().expect("seconds") * 1_000_000
        + ts["microseconds"].as_u64().expect("microseconds");
    let report = writer.stop(at_us);
    eprintln!(
        "{kind:?}: set-up {prepared:?}, job {job_time:?} (reply to BLOCK_JOB_COMPLETED); \
         writer: {report}"
    );

    assert_eq!(
        report["errors"],
        0,
        "{kind:?}: writer commands failed: {report}\n--- writer stderr ---\n{}\n--- daemon log ---\n{}",
        writer.stderr(),
        inst.log()
    );
    let during = report["before"]["writes"].as_u64().expect("before.writes");
    assert!(
        during >= MIN_WRITES_DURING_JOB,
        "{kind:?}: only {during} writes acknowledged before BLOCK_JOB_COMPLETED \
         (want {MIN_WRITES_DURING_JOB}): {report}"
    );

    let deadline = Instant::now() + STEP_DEADLINE;
    while seen.last().map(String::as_str) != Some("JOB_STATUS_CHANGE null") {
        let ev = next_event(&mut q, deadline, &seen, &writer, &inst);
        seen.push(summary(&ev));
    }
    assert_eq!(
        without_pauses(&seen),
        EVENTS,
        "{kind:?}: the job's events (all of them: {seen:?})"
    );
    assert_eq!(
        completed["data"],
        json!({"type": "backup", "device": JOB, "len": DISK, "offset": DISK, "speed": SPEED}),
        "{kind:?}: {completed}"
    );

    // The job is gone, and so is its filter: the export is on the source again.
    assert_eq!(q.exec("query-block-jobs", json!({})), json!({"return": []}));
    let r = q.exec("query-block-exports", json!({}));
    assert_eq!(r["return"][0]["node-name"], "src", "{kind:?}: {r}");

    assert_eq!(q.exec("quit", json!({})), json!({"return": {}}));
    assert!(
        inst.wait_exit(EXIT_DEADLINE),
        "{kind:?}: no exit within {EXIT_DEADLINE:?} of quit\n--- daemon log ---\n{}",
        inst.log()
    );
    let status = inst.exit_status().expect("exited");
    assert!(status.success(), "{kind:?}: exit status {status}");

    let (source, expected, target) = (
        inst.path("source.qcow2"),
        inst.path("expected.qcow2"),
        inst.path("target.qcow2"),
    );
    let (code, text) = compare(&expected, &target);
    if code != Some(0) {
        panic!(
            "{kind:?}: the target is not the source at job start: {text}{}",
            describe_mismatch(inst.dir.path(), &expected, &target)
        );
    }
    let (code, text) = compare(&expected, &source);
    assert_eq!(
        code,
        Some(1),
        "{kind:?}: the source still equals its copy from job start: {text}"
    );
    assert_image_clean(&source);
    assert_image_clean(&target);
    eprintln!("{kind:?}: passed in {:?}", t0.elapsed());
}

#[test]
fn backup_is_point_in_time_under_load_tidemark() {
    point_in_time_under_load(Impl::Tidemark);
}

#[test]
fn backup_is_point_in_time_under_load_qsd() {
    point_in_time_under_load(Impl::Qsd);
}
