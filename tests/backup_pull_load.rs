//! Issue check "point in time under load", the vendor's way: pull-backup
//! sessions (x-tidemark-backup-begin / -end) pulled by examples/vendor-pull.py
//! (libnbd, base:allocation and qemu:dirty-bitmap:backup-vda) while a writer
//! rewrites random regions of the disk through the live export the whole time.
//!
//! - The disk is a 256 MiB qcow2 image, an eighth of it a seeded pattern,
//!   the rest holes, made from a raw file that stays as the writer's shadow.
//! - The writer is tests/py/live_agent.py: one libnbd connection, up to four
//!   writes or write-zeroes (4 to 64 KiB) in flight at random offsets, every
//!   acknowledged one applied to the shadow, so the shadow is the disk
//!   whenever the writer is paused.
//! - vendor-pull.py runs with freeze/thaw hooks (`echo freeze; read ack`):
//!   the test gets the line on the client's stdout and answers on its stdin.
//!   At "freeze" it pauses the writer and saves the shadow: the disk at the
//!   begin that follows. At "thaw" (the begin has answered) it restarts the
//!   writer and waits until WRITES_BEFORE_PULL more writes are acknowledged
//!   before the client may read a byte; the writer keeps going until the
//!   next freeze, through the whole pull and the end of the session.
//! - Session 1 is a full backup (checkpoint c1): the image equals the disk
//!   at its begin. Session 2 is an incremental from c1 (checkpoint c2): the
//!   exported bitmap holds exactly the writes since the first begin (rounded
//!   to its granularity: the agent's `covers ... exact`, checked at the
//!   thaw, before the writer restarts), the client pulls only dirty extents,
//!   and the overlay over the full equals the disk at the second begin.
//! - At the end the disk still equals the shadow (the writer's writes all
//!   landed), sessions and jobs are gone, c1 and c2 are recorded, and
//!   `qemu-img check` is clean on the disk and both backups.
//!
//! Synchronisation is by pipes, the QMP reply and pidfds, each with a
//! deadline; nothing sleeps. The drops of the client, the agent and the
//! instance kill every process and remove every file.

mod common;
mod qmp_common;

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use common::{describe_failure, output, pattern, run, tool, PyScript, PYTHON};
use qmp_common::{wait_child, Impl, Instance, Qmp};
use serde_json::{json, Value};

const SIZE: u64 = 256 << 20;
/// The initial data: the first REGION of every STRIDE holds the pattern.
const REGION: u64 = 2 << 20;
const STRIDE: u64 = 16 << 20;
const SEED: u64 = 0x7075_6c6c;
/// live_agent.py's WRITE_MAGIC ("livedata").
const WRITER_MAGIC: u64 = 0x6C69_7665_6461_7461;
/// The granularity of the checkpoint bitmaps (qcow2's cluster size).
const GRANULARITY: u64 = 64 << 10;
/// Writes acknowledged after a begin before the client may pull.
const WRITES_BEFORE_PULL: u64 = 200;
/// Writes between the two sessions.
const WRITES_BETWEEN: u64 = 300;
const STEP_DEADLINE: Duration = Duration::from_secs(60);
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

fn disk_args() -> Vec<String> {
    [
        "--blockdev",
        "driver=file,node-name=vda-file,filename=$DIR/vda.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=vda,file=vda-file",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=guest-vda,node-name=vda,name=vda,writable=on",
    ]
    .map(String::from)
    .to_vec()
}

/// shadow.raw (an eighth pattern, the rest holes) and vda.qcow2 converted
/// from it.
fn make_disk(dir: &Path) {
    let shadow = dir.join("shadow.raw");
    let f = File::create(&shadow).expect("create shadow");
    f.set_len(SIZE).expect("size shadow");
    for (k, at) in (0..SIZE).step_by(STRIDE as usize).enumerate() {
        f.write_all_at(&pattern(REGION as usize, SEED + k as u64), at)
            .expect("write pattern");
    }
    drop(f);
    run(tool("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&shadow)
        .arg(dir.join("vda.qcow2")));
}

fn ok(q: &mut Qmp, cmd: &str, args: Value) -> Value {
    let r = q.exec(cmd, args.clone());
    assert!(r.get("return").is_some(), "{cmd} {args}: {r}");
    r["return"].clone()
}

// ---- the writer -------------------------------------------------------------------

/// tests/py/live_agent.py on the guest export; killed and reaped on drop.
struct Writer(PyScript);

impl Writer {
    fn spawn(uri: &str, shadow: &Path, dir: &Path) -> Writer {
        let seed = SEED.to_string();
        let args = [OsStr::new(uri), shadow.as_os_str(), OsStr::new(&seed)];
        let mut w = Writer(PyScript::spawn(
            "live_agent.py",
            args,
            dir.join("writer.stderr"),
        ));
        let ready = w.line();
        assert_eq!(ready, format!("ready {SIZE}"), "writer");
        w
    }

    fn line(&mut self) -> String {
        match self.0.lines.recv_timeout(STEP_DEADLINE) {
            Ok(l) => l,
            Err(e) => panic!("writer: {e:?}; stderr:\n{}", self.0.stderr()),
        }
    }

    /// Sends a command; its "ok" reply without the "ok".
    fn cmd(&mut self, line: &str) -> String {
        let stdin = self.0.stdin.as_mut().expect("writer stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("writer: {line}: {e}; stderr:\n{}", self.0.stderr()));
        let reply = self.line();
        match reply.strip_prefix("ok") {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("writer: {line}: {reply}"),
        }
    }

    /// Commands acknowledged so far.
    fn done(&mut self) -> u64 {
        let stats: Value = serde_json::from_str(&self.cmd("stats")).expect("stats JSON");
        stats["done"].as_u64().expect("done")
    }

    fn quit(mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        assert!(
            wait_child(&mut self.0.child, EXIT_DEADLINE),
            "writer: no exit after quit; stderr:\n{}",
            self.0.stderr()
        );
    }
}

// ---- the vendor's client --------------------------------------------------------------

/// examples/vendor-pull.py with its hooks on pipes; killed and reaped on drop.
struct Pull {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: PathBuf,
}

impl Pull {
    fn spawn(inst: &Instance, id: &str, args: &[&str]) -> Pull {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vendor-pull.py");
        let stderr = inst.path(&format!("{id}.stderr"));
        let mut cmd = Command::new(PYTHON);
        cmd.arg(script)
            .arg("--qmp")
            .arg(inst.monitor(1))
            .args(["--disk", "vda", "--id", id, "--json"])
            .arg("--out")
            .arg(inst.path("backups"))
            .arg("--scratch-dir")
            .arg(inst.dir.path())
            .args([
                "--freeze",
                "echo freeze; read ack",
                "--thaw",
                "echo thaw; read ack",
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("client stderr"));
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("client stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Pull {
            stdin: child.stdin.take().expect("client stdin"),
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn line(&mut self) -> String {
        match self.lines.recv_timeout(STEP_DEADLINE) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "client: nothing within {STEP_DEADLINE:?}; stderr:\n{}",
                    self.stderr()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = wait_child(&mut self.child, EXIT_DEADLINE);
                panic!(
                    "client: exited ({:?}) early; stderr:\n{}",
                    self.child.try_wait(),
                    self.stderr()
                )
            }
        }
    }

    /// Lets a hook finish.
    fn resume(&mut self) {
        writeln!(self.stdin, "go")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("client: {e}; stderr:\n{}", self.stderr()));
    }

    /// Waits for a clean exit.
    fn finish(mut self) {
        assert!(
            wait_child(&mut self.child, EXIT_DEADLINE),
            "client: no exit; stderr:\n{}",
            self.stderr()
        );
        let st = self.child.try_wait().ok().flatten();
        assert!(
            st.is_some_and(|s| s.success()),
            "client: {st:?}; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one session saw.
struct Session {
    /// The client's JSON summary.
    summary: Value,
    /// The writer's reply to `covers` at the thaw, if asked.
    covers: Option<String>,
    /// Writes acknowledged between the begin and the client's exit.
    writes: u64,
}

/// What the writer checks at a session's hooks.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    /// At the freeze: `mark`, the point `covers` counts writes from.
    Mark,
    /// At the thaw: `covers` on the session's bitmap, exactly.
    Covers,
}

/// Runs one session of vendor-pull.py under load: at the freeze the writer
/// pauses and the shadow goes to `expected` (the disk at the begin); at the
/// thaw the writer restarts and WRITES_BEFORE_PULL writes land before the
/// client reads a byte. `check` adds a `mark` or a `covers`.
fn session(
    inst: &Instance,
    writer: &mut Writer,
    id: &str,
    args: &[&str],
    expected: &Path,
    check: Check,
) -> Session {
    let mut pull = Pull::spawn(inst, id, args);
    assert_eq!(pull.line(), "freeze");
    writer.cmd("pause");
    writer.cmd(&format!("save {}", expected.display()));
    if check == Check::Mark {
        writer.cmd("mark");
    }
    // The writes from here on carry the session's name in their stamps.
    writer.cmd(&format!("phase {id}"));
    pull.resume();
    assert_eq!(pull.line(), "thaw");
    let covers = (check == Check::Covers).then(|| {
        let uri = inst.nbd_uri(&format!("{id}-vda"));
        writer.cmd(&format!("covers {uri} backup-vda {GRANULARITY} exact"))
    });
    let at_begin = writer.done();
    writer.cmd("start");
    writer.cmd(&format!("wait {WRITES_BEFORE_PULL}"));
    pull.resume();
    let line = pull.line();
    let summary: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("client summary {line:?}: {e}; stderr:\n{}", pull.stderr()));
    pull.finish();
    let writes = writer.done() - at_begin;
    println!("{id}: {summary}; {writes} writes between the begin and the client's exit");
    Session {
        summary,
        covers,
        writes,
    }
}

// ---- checks -------------------------------------------------------------------------

/// `qemu-img compare` of a backup chain with the raw file of what it must
/// hold; on a difference, what both hold at the first differing offset (a
/// writer's stamp names its write: magic, offset, number, phase).
fn assert_same(backup: &Path, expected: &Path, what: &str) {
    let mut cmd = tool("qemu-img");
    cmd.args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(backup)
        .arg(expected);
    let out = output(&mut cmd);
    if out.status.success() {
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.split("offset ").nth(1).and_then(|s| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u64>()
            .ok()
    });
    let mut detail = String::new();
    if let Some(at) = at {
        let raw = backup.with_extension("compare.raw");
        run(tool("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(backup)
            .arg(&raw));
        let sector = |p: &Path| {
            let mut b = vec![0u8; 32];
            File::open(p)
                .and_then(|f| f.read_exact_at(&mut b, at & !511))
                .map(|()| b)
                .unwrap_or_default()
        };
        detail = format!(
            "\nat sector {:#x}: the backup holds {}, the disk held {}",
            at & !511,
            stamp(&sector(&raw)),
            stamp(&sector(expected))
        );
        let _ = std::fs::remove_file(&raw);
    }
    panic!("{what}: {}{detail}", describe_failure(&cmd, &out));
}

/// What a sector's first 32 bytes say: the writer stamps each sector of a
/// write with its magic ^ seed, offset, number and phase (0 before the
/// first session, then 1 for s1, 2 for s2).
fn stamp(b: &[u8]) -> String {
    let word = |k: usize| {
        b.get(8 * k..8 * k + 8)
            .and_then(|w| w.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    if b.iter().all(|&x| x == 0) {
        "zeroes".into()
    } else if word(0) == WRITER_MAGIC ^ SEED {
        format!(
            "write #{} of phase {} (offset {:#x})",
            word(2),
            word(3),
            word(1)
        )
    } else {
        format!("other data {:02x?}", &b[..b.len().min(8)])
    }
}

fn qemu_img_check(img: &Path) {
    run(tool("qemu-img").args(["check", "-q"]).arg(img));
}

#[test]
fn full_and_incremental_pulls_under_load_are_the_disk_at_each_begin() {
    let mut inst = Instance::start_with_monitors(Impl::Tidemark, &disk_args(), 2, make_disk);
    let mut q = inst.client();
    let mut writer = Writer::spawn(
        &inst.nbd_uri("vda"),
        &inst.path("shadow.raw"),
        inst.dir.path(),
    );
    writer.cmd("start");
    writer.cmd(&format!("wait {WRITES_BETWEEN}"));

    // Session 1: full backup, checkpoint c1.
    let at_c1 = inst.path("at-c1.raw");
    let full = session(
        &inst,
        &mut writer,
        "s1",
        &["--checkpoint", "c1"],
        &at_c1,
        Check::Mark,
    );
    let disk = &full.summary["disks"][0];
    assert_eq!(disk["size"], SIZE, "{}", full.summary);
    assert!(disk["pulled"].as_u64() > Some(0), "{}", full.summary);
    assert!(
        disk["skipped"].as_u64() > Some(0),
        "holes: {}",
        full.summary
    );
    assert!(
        full.writes > WRITES_BEFORE_PULL,
        "writes during the pull: {}",
        full.writes
    );
    assert_eq!(ok(&mut q, "x-tidemark-query-backups", json!({})), json!([]));
    let c1 = inst.path("backups/vda.c1.qcow2");
    assert_same(
        &c1,
        &at_c1,
        "the full backup against the disk at the first begin",
    );

    // Session 2: incremental from c1, checkpoint c2.
    writer.cmd(&format!("wait {WRITES_BETWEEN}"));
    let at_c2 = inst.path("at-c2.raw");
    let inc = session(
        &inst,
        &mut writer,
        "s2",
        &["--incremental", "c1", "--checkpoint", "c2"],
        &at_c2,
        Check::Covers,
    );
    let disk = &inc.summary["disks"][0];
    let dirty = disk["dirty-bytes"].as_u64().expect("dirty-bytes");
    let covers = inc.covers.expect("covers");
    assert!(
        covers.starts_with(&format!("dirty={dirty} ")),
        "{covers} vs {}",
        inc.summary
    );
    // Exactly the dirty extents: their data, or a write-zeroes where they
    // read as zeroes now; nothing else.
    let pulled =
        disk["pulled"].as_u64().expect("pulled") + disk["zeroed"].as_u64().expect("zeroed");
    assert!(dirty > 0 && pulled == dirty, "{}", inc.summary);
    assert_eq!(disk["skipped"], SIZE - dirty, "{}", inc.summary);
    assert!(
        inc.writes > WRITES_BEFORE_PULL,
        "writes during the pull: {}",
        inc.writes
    );
    let c2 = inst.path("backups/vda.c2.qcow2");
    assert_same(
        &c2,
        &at_c2,
        "the incremental over the full against the disk at the second begin",
    );

    // Every write landed; nothing of the sessions is left; c1 and c2 stay.
    writer.cmd("pause");
    writer.cmd("verify");
    writer.quit();
    assert_eq!(ok(&mut q, "x-tidemark-query-backups", json!({})), json!([]));
    assert_eq!(ok(&mut q, "query-jobs", json!({})), json!([]));
    let exports = ok(&mut q, "query-block-exports", json!({}));
    assert_eq!(exports.as_array().map(Vec::len), Some(1), "{exports}");
    let list = ok(
        &mut q,
        "x-tidemark-query-checkpoints",
        json!({"node": "vda"}),
    );
    let names: Vec<&str> = list["checkpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["c1", "c2"], "{list}");
    ok(&mut q, "quit", json!({}));
    assert!(inst.wait_exit(EXIT_DEADLINE), "daemon: no exit after quit");
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    };
    let scratch: Vec<String> = names(inst.dir.path())
        .into_iter()
        .filter(|n| n.contains("scratch"))
        .collect();
    assert!(scratch.is_empty(), "{scratch:?}");
    assert_eq!(
        names(&inst.path("backups")),
        ["vda.c1.qcow2", "vda.c2.qcow2"]
    );
    for img in [inst.path("vda.qcow2"), c1, c2] {
        qemu_img_check(&img);
    }
}
