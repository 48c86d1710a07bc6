//! The block graph, compared with qemu-storage-daemon 10.0.2: backing links
//! given by reference (libvirt's fleecing scratch), `"backing": null`,
//! chains opened from the image headers (implicit, auto-named nodes),
//! blockdev-del of nodes in a chain, blockdev-reopen with the image locks
//! probed from outside, and `tidemark serve --qmp`'s graph.
//!
//! Each scenario in tests/qmp_scenarios/graph_*.json runs on qsd and on
//! `tidemark daemon` with the same command line; the transcripts (QMP
//! replies, events, and the outcome of qemu-io / qemu-img runs against the
//! exports and the image files) must be equal after `normalise` (timestamps,
//! `#blockNNN` names, the instance directory).
//!
//! A scenario file:
//! ```json
//! {"setup": [["qemu-img", "create", "-q", "-f", "qcow2", "d.qcow2", "4M"]], // run in $DIR first
//!  "args": ["--nbd-server", "addr.type=unix,addr.path=$DIR/nbd.sock"],
//!  "steps": [
//!    {"qmp": {"execute": "query-named-block-nodes"},         // reply recorded
//!     "capture": {"MID": {"drv": "qcow2", "file": "$DIR/mid.qcow2"}}},
//!                  // the node-name of the first node in the reply's list with these
//!                  // fields becomes ${MID} in later steps (auto names are not known
//!                  // in advance)
//!    {"qmp": {"execute": "blockdev-del", "arguments": {"node-name": "${MID}"}},
//!     "expect": {"error": {"desc": "..."}}},                  // see below
//!    {"run": ["qemu-io", "-r", "-c", "read 0 4k", "$DIR/d.qcow2"]},
//!                  // exit status, stdout and stderr recorded (qemu-io's timing lines
//!                  // dropped); "json": true records stdout parsed as JSON
//!    {"event": "BLOCK_EXPORT_DELETED"}                        // next such event recorded
//!  ]}
//! ```
//! `expect` is part of what qsd's normalised record must contain (objects:
//! these keys, recursively; arrays: this length, element by element): it
//! pins the scenario to qsd's behaviour, so a scenario that no longer shows
//! what it is about fails on qsd alone. `GRAPH_CONFORMANCE_ONLY=qsd` runs
//! just the qsd side (to check scenarios), `GRAPH_CONFORMANCE_ONLY=qsd-twice`
//! compares qsd with itself (to check that transcripts are deterministic);
//! `QMP_TRACE=1` prints each step;
//! `GRAPH_CONFORMANCE_DUMP=DIR` writes both transcripts to DIR.

mod qmp_common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qmp_common::{normalise, wait_for_path, DirWatch, Impl, Instance, Qmp, TIDEMARK};
use serde_json::{json, Value};

/// Upper bound for one qemu-io / qemu-img run, so a hung export fails the
/// step instead of hanging the test.
const TOOL_TIMEOUT_SECS: &str = "30";

/// How long `tidemark serve` may take to listen.
const START_DEADLINE: Duration = Duration::from_secs(20);

fn load(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/qmp_scenarios")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn qsd_only() -> bool {
    std::env::var("GRAPH_CONFORMANCE_ONLY").as_deref() == Ok("qsd")
}

/// The implementation compared with qsd: tidemark, or qsd itself with
/// `GRAPH_CONFORMANCE_ONLY=qsd-twice` (shows that a scenario's normalised
/// transcript does not vary from run to run).
fn under_test() -> Impl {
    match std::env::var("GRAPH_CONFORMANCE_ONLY").as_deref() {
        Ok("qsd-twice") => Impl::Qsd,
        _ => Impl::Tidemark,
    }
}

/// Runs `argv` (in `dir`, with a timeout) and returns its record: exit
/// status, stdout and stderr lines, without qemu-io's timing lines.
fn run_tool(argv: &[String], dir: &Path, json_out: bool) -> Value {
    let out = Command::new("timeout")
        .arg(TOOL_TIMEOUT_SECS)
        .args(argv)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"));
    let lines = |b: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(b)
            .lines()
            .filter(|l| !l.contains(" ops; "))
            .map(str::to_owned)
            .collect()
    };
    let status = out.status.code().unwrap_or(-1);
    let stdout = if json_out && out.status.success() {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| json!({"not JSON": e.to_string(), "text": lines(&out.stdout)}))
    } else {
        json!(lines(&out.stdout))
    };
    json!({"run": argv[0], "status": status, "stdout": stdout, "stderr": lines(&out.stderr)})
}

/// Runs the setup commands of a scenario in `dir`; they must succeed.
fn setup(sc: &Value, dir: &Path) {
    let cmds: Vec<Vec<String>> = serde_json::from_value(sc["setup"].clone()).unwrap_or_default();
    for argv in cmds {
        let r = run_tool(&argv, dir, false);
        assert_eq!(r["status"], 0, "setup {argv:?}: {r}");
    }
}

/// The node-name of the first element of `reply["return"]` that has all
/// the fields of `pattern`.
fn find_node(reply: &Value, pattern: &Value) -> Option<String> {
    reply["return"]
        .as_array()?
        .iter()
        .find(|n| contains(n, pattern))
        .and_then(|n| n["node-name"].as_str())
        .map(str::to_owned)
}

/// Whether `v` has everything `pattern` has (objects: a subset of keys,
/// recursively; arrays: same length, element by element; else equal).
fn contains(v: &Value, pattern: &Value) -> bool {
    match (v, pattern) {
        (Value::Object(a), Value::Object(p)) => p
            .iter()
            .all(|(k, x)| a.get(k).is_some_and(|y| contains(y, x))),
        (Value::Array(a), Value::Array(p)) => {
            a.len() == p.len() && a.iter().zip(p).all(|(y, x)| contains(y, x))
        }
        _ => v == pattern,
    }
}

/// Runs a scenario on one implementation: one normalised record per step.
/// The records are pushed into `out` as they come, so a panic half-way
/// (a daemon that died, a reply that never came) leaves what was done.
fn transcript(kind: Impl, name: &str, sc: &Value, out: &mut Vec<Value>) {
    let args: Vec<String> = serde_json::from_value(sc["args"].clone()).unwrap_or_default();
    let inst = Instance::start(kind, &args, |dir| setup(sc, dir));
    let dir = inst.dir.path().to_owned();
    let dir_text = dir.display().to_string();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut client: Option<Qmp> = None;
    let steps = sc["steps"].as_array().cloned().unwrap_or_default();
    for (i, step) in steps.iter().enumerate() {
        // Expectations name the directory as $DIR, as records do.
        let expect = step.get("expect").cloned();
        let mut text = step.to_string();
        for (k, v) in &vars {
            // A JSON string inside a JSON text: escape it as such.
            let v = serde_json::to_string(v).expect("string");
            text = text.replace(&format!("${{{k}}}"), &v[1..v.len() - 1]);
        }
        let step: Value = serde_json::from_str(&text.replace("$DIR", &dir_text))
            .unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
        if std::env::var_os("QMP_TRACE").is_some() {
            eprintln!("{kind:?} step {i}: {step}");
        }
        let record = if let Some(argv) = step.get("run") {
            let argv: Vec<String> =
                serde_json::from_value(argv.clone()).expect("run: an array of strings");
            run_tool(&argv, &dir, step["json"].as_bool().unwrap_or(false))
        } else {
            let q = client.get_or_insert_with(|| inst.client());
            if let Some(cmd) = step.get("qmp") {
                let reply = q.cmd(cmd.clone());
                let mut missing = Vec::new();
                if let Some(Value::Object(caps)) = step.get("capture") {
                    for (var, pattern) in caps {
                        match find_node(&reply, pattern) {
                            Some(n) => {
                                vars.insert(var.clone(), n);
                            }
                            None => {
                                vars.insert(var.clone(), format!("<no node for {var}>"));
                                missing.push(var.clone());
                            }
                        }
                    }
                }
                if missing.is_empty() {
                    reply
                } else {
                    json!({"reply": reply, "capture failed": missing})
                }
            } else if let Some(ev) = step["event"].as_str() {
                q.event(ev)
            } else {
                panic!("{name} step {i}: unknown step {step}");
            }
        };
        let record = normalise(&record, &dir);
        if kind == Impl::Qsd {
            if let Some(exp) = &expect {
                assert!(
                    contains(&record, exp),
                    "{name} step {i} {step}: qsd's record does not match the scenario's \
                     expectation\n record: {record}\n expect: {exp}"
                );
            }
        }
        out.push(record);
    }
}

/// Where two records differ, as JSON paths (at most `limit`).
fn json_diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>, limit: usize) {
    if out.len() >= limit || a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let p = format!("{path}/{k}");
                match y.get(k) {
                    Some(w) => json_diff(v, w, &p, out, limit),
                    None => out.push(format!("{p}: only qsd has it: {v}")),
                }
            }
            for (k, w) in y {
                if !x.contains_key(k) {
                    out.push(format!("{path}/{k}: only tidemark has it: {w}"));
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                out.push(format!(
                    "{path}: qsd has {} elements, tidemark {}",
                    x.len(),
                    y.len()
                ));
            }
            for (k, (v, w)) in x.iter().zip(y).enumerate() {
                json_diff(v, w, &format!("{path}/{k}"), out, limit);
            }
        }
        _ => out.push(format!("{path}: qsd {a}, tidemark {b}")),
    }
    out.truncate(limit);
}

fn clip(s: String, n: usize) -> String {
    if s.len() <= n {
        return s;
    }
    let mut k = n;
    while !s.is_char_boundary(k) {
        k -= 1;
    }
    format!("{}... ({} bytes)", &s[..k], s.len())
}

/// The differences between two transcripts, readable; empty if equal.
fn compare(steps: &[Value], qsd: &[Value], tm: &[Value]) -> String {
    let mut report = String::new();
    let mut shown = 0;
    let mut count = 0;
    for i in 0..qsd.len().max(tm.len()) {
        let (a, b) = (qsd.get(i), tm.get(i));
        if a == b {
            continue;
        }
        count += 1;
        if shown == 6 {
            continue;
        }
        shown += 1;
        let step = steps.get(i).map(Value::to_string).unwrap_or_default();
        report.push_str(&format!("\n--- step {i}: {}\n", clip(step, 400)));
        match (a, b) {
            (Some(a), Some(b)) => {
                let mut paths = Vec::new();
                json_diff(a, b, "", &mut paths, 12);
                for p in paths {
                    report.push_str(&format!("  {}\n", clip(p, 600)));
                }
                report.push_str(&format!(" qsd:      {}\n", clip(a.to_string(), 1500)));
                report.push_str(&format!(" tidemark: {}\n", clip(b.to_string(), 1500)));
            }
            (Some(a), None) => report.push_str(&format!(
                " qsd:      {}\n tidemark: (no record)\n",
                clip(a.to_string(), 1500)
            )),
            (None, Some(b)) => report.push_str(&format!(
                " qsd:      (no record)\n tidemark: {}\n",
                clip(b.to_string(), 1500)
            )),
            (None, None) => {}
        }
    }
    if count > 0 {
        report.insert_str(
            0,
            &format!("{count} of {} steps differ", qsd.len().max(tm.len())),
        );
    }
    report
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".to_owned())
}

/// With `GRAPH_CONFORMANCE_DUMP=DIR`, writes a transcript to
/// DIR/NAME.WHO.json (one record per step), to read qsd's answers in full.
fn dump(name: &str, who: &str, records: &[Value]) {
    if let Some(d) = std::env::var_os("GRAPH_CONFORMANCE_DUMP") {
        let path = Path::new(&d).join(format!("{name}.{who}.json"));
        let text = serde_json::to_string_pretty(records).expect("json");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    }
}

fn run(name: &str) {
    let sc = load(name);
    let steps = sc["steps"].as_array().cloned().unwrap_or_default();
    let mut qsd = Vec::new();
    transcript(Impl::Qsd, name, &sc, &mut qsd);
    assert_eq!(qsd.len(), steps.len(), "{name}: qsd transcript incomplete");
    dump(name, "qsd", &qsd);
    if qsd_only() {
        return;
    }
    let mut tm = Vec::new();
    let done = catch_unwind(AssertUnwindSafe(|| {
        transcript(under_test(), name, &sc, &mut tm)
    }));
    let mut stopped = String::new();
    if let Err(e) = done {
        // The step that failed gets the harness's message as its record.
        let msg = panic_text(e.as_ref());
        stopped = format!("\nthe run stopped at step {}: {msg}", tm.len());
        tm.push(json!({ "harness error": msg }));
    }
    dump(name, "tidemark", &tm);
    let diff = compare(&steps, &qsd, &tm);
    assert!(
        diff.is_empty(),
        "{name}: tidemark differs from qsd: {diff}{stopped}"
    );
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )*
    };
}

scenarios!(
    graph_fleecing_raw,
    graph_fleecing_qcow2,
    graph_backing_null,
    graph_chain,
    graph_reopen,
);

// ---------------------------------------------------------------- serve

/// `tidemark serve --qmp` (or, as the reference, qsd with the command line
/// that builds the same graph) in a temp dir, killed on drop.
struct Served {
    _child: Reaper,
    dir: tempfile::TempDir,
    qmp: Qmp,
}

/// A child process, killed and reaped on drop (also when a start-up wait
/// panics).
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Served {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.path("nbd.sock").display())
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Value {
        let r = self.qmp.exec(cmd, args);
        normalise(&r, self.dir.path())
    }
}

/// The image of the serve tests: a qcow2 overlay over a qcow2 base (so the
/// graph has a chain), or a raw image.
fn serve_images(dir: &Path, qcow2: bool) -> PathBuf {
    let cmds: &[&[&str]] = if qcow2 {
        &[
            &[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "base.qcow2",
                "4M",
            ],
            &["qemu-io", "-c", "write -P 1 0 64k", "base.qcow2"],
            &[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "disk.qcow2",
            ],
        ]
    } else {
        &[
            &["qemu-img", "create", "-q", "-f", "raw", "disk.img", "4M"],
            &["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "disk.img"],
        ]
    };
    for argv in cmds {
        let argv: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
        let r = run_tool(&argv, dir, false);
        assert_eq!(r["status"], 0, "setup {argv:?}: {r}");
    }
    dir.join(if qcow2 { "disk.qcow2" } else { "disk.img" })
}

fn serve(kind: Impl, qcow2: bool) -> Served {
    let dir = tempfile::Builder::new()
        .prefix("tidemark-graph-")
        .tempdir()
        .expect("temp dir");
    let img = serve_images(dir.path(), qcow2);
    let (qmp, nbd, log) = (
        dir.path().join("qmp.sock"),
        dir.path().join("nbd.sock"),
        dir.path().join("qsd.log"),
    );
    let mut cmd = match kind {
        Impl::Tidemark => {
            let mut c = Command::new(TIDEMARK);
            c.env("RUST_LOG", "info")
                .arg("serve")
                .arg("--socket")
                .arg(&nbd)
                .arg("--qmp")
                .arg(&qmp)
                .arg(&img);
            c
        }
        Impl::Qsd => {
            // What qemu-nbd builds for `qemu-nbd -k SOCK IMAGE` (a format node
            // over an implicit file node, export id "qemu-nbd-export", the
            // empty export name), with the format node named drive0.
            let node = json!({
                "driver": if qcow2 { "qcow2" } else { "raw" },
                "node-name": "drive0",
                "file": {"driver": "file", "filename": img},
            });
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(node.to_string())
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
                .arg("--export")
                .arg("type=nbd,id=qemu-nbd-export,node-name=drive0,name=,writable=on")
                .arg("--chardev")
                .arg(format!(
                    "socket,id=m0,path={},server=on,wait=off",
                    qmp.display()
                ))
                .arg("--monitor")
                .arg("chardev=m0");
            c
        }
    };
    let child = match kind {
        // qsd writes its pidfile once every option is set up.
        Impl::Qsd => {
            let pidfile = dir.path().join("qsd.pid");
            cmd.arg("--pidfile").arg(&pidfile);
            let watch = DirWatch::new(dir.path());
            let mut child = Reaper(
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).expect("log"))
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
            );
            wait_for_path(&watch, &pidfile, &mut child.0, &log);
            child
        }
        // tidemark serve logs "listening on unix PATH" once the QMP and NBD
        // sockets listen (a socket file exists a moment before it does).
        Impl::Tidemark => {
            let mut child = Reaper(
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
            );
            let stderr = child.0.stderr.take().expect("stderr");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening on unix") {
                        let _ = tx.send(Ok(()));
                    }
                    seen.push(line);
                }
                // EOF: the process exited (or closed stderr) before that.
                let _ = tx.send(Err(seen.join("\n")));
            });
            match rx.recv_timeout(START_DEADLINE) {
                Ok(Ok(())) => {}
                Ok(Err(log)) => panic!("{cmd:?} exited before listening:\n{log}"),
                Err(_) => panic!("{cmd:?}: no 'listening on unix' line in time"),
            }
            child
        }
    };
    let mut q = Qmp::connect(&qmp);
    assert_eq!(
        q.cmd(json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
    Served {
        _child: child,
        dir,
        qmp: q,
    }
}

/// What a serve test records: the queries, and qemu-io through the export.
fn serve_transcript(s: &mut Served) -> Vec<Value> {
    let uri = s.uri();
    let io = |cmds: &[&str]| {
        let mut argv = vec!["qemu-io".to_owned(), "-f".into(), "raw".into()];
        for c in cmds {
            argv.push("-c".into());
            argv.push((*c).to_owned());
        }
        argv.push(uri.clone());
        run_tool(&argv, Path::new("/"), false)
    };
    vec![
        s.exec("query-block-exports", json!({})),
        s.exec("query-named-block-nodes", json!({})),
        s.exec("query-named-block-nodes", json!({"flat": true})),
        io(&["read -P 1 0 64k", "write -P 9 1M 64k", "read -P 9 1M 64k"]),
    ]
}

/// The spec in short, checked on both sides, so a failure names what is
/// missing: one export "qemu-nbd-export" of drive0; drive0 is the format
/// node, over one file node for the image (plus, for the overlay, the base's
/// two implicit nodes).
fn serve_shape_problems(t: &[Value], qcow2: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    let export = json!({"return": [{"id": "qemu-nbd-export", "node-name": "drive0",
                                    "shutting-down": false, "type": "nbd"}]});
    check(
        t[0] == export,
        format!("query-block-exports should be {export}, is {}", t[0]),
    );
    let nodes = t[1]["return"].as_array().cloned().unwrap_or_default();
    let image = if qcow2 { "disk.qcow2" } else { "disk.img" };
    match nodes.iter().find(|n| n["node-name"] == "drive0") {
        None => check(false, "no node drive0".to_owned()),
        Some(d) => {
            let want = json!({
                "drv": if qcow2 { "qcow2" } else { "raw" },
                "file": format!("$DIR/{image}"),
                "ro": false,
                "backing_file_depth": u64::from(qcow2),
            });
            check(
                contains(d, &want),
                format!("drive0 should have {want}, is {d}"),
            );
        }
    }
    let files = nodes
        .iter()
        .filter(|n| n["drv"] == "file" && n["file"] == format!("$DIR/{image}"))
        .count();
    check(
        files == 1,
        format!("one file node for {image} under drive0, not {files}"),
    );
    check(
        nodes.len() == if qcow2 { 4 } else { 2 },
        format!(
            "{} nodes (drive0, its file node{}), not {}",
            if qcow2 { 4 } else { 2 },
            if qcow2 {
                ", the base and its file node"
            } else {
                ""
            },
            nodes.len()
        ),
    );
    check(
        t[3]["status"] == 0,
        format!("qemu-io through the export: {}", t[3]),
    );
    problems
}

fn check_serve(qcow2: bool) {
    let mut qsd = serve(Impl::Qsd, qcow2);
    let want = serve_transcript(&mut qsd);
    drop(qsd);
    let problems = serve_shape_problems(&want, qcow2);
    assert!(
        problems.is_empty(),
        "the reference (qsd) is not as the test says: {problems:#?}"
    );
    if qsd_only() {
        return;
    }
    let mut tm = serve(under_test(), qcow2);
    let got = serve_transcript(&mut tm);
    drop(tm);
    let problems = serve_shape_problems(&got, qcow2);
    // And all of it as qsd shows the same graph.
    let steps: Vec<Value> = [
        "query-block-exports",
        "query-named-block-nodes",
        "query-named-block-nodes flat",
        "qemu-io through the export",
    ]
    .iter()
    .map(|s| json!(s))
    .collect();
    let diff = compare(&steps, &want, &got);
    assert!(
        problems.is_empty() && diff.is_empty(),
        "tidemark serve --qmp: {problems:#?}\nCompared with qsd's equivalent: {diff}"
    );
}

#[test]
fn serve_qmp_raw_graph() {
    check_serve(false);
}

#[test]
fn serve_qmp_qcow2_chain_graph() {
    check_serve(true);
}
