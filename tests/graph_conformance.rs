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
//! The scenario format and the runner are shared with the job suite
//! (tests/scenario/mod.rs). `GRAPH_CONFORMANCE_ONLY=qsd` runs just the qsd
//! side (to check scenarios), `GRAPH_CONFORMANCE_ONLY=qsd-twice` compares
//! qsd with itself (to check that transcripts are deterministic);
//! `QMP_TRACE=1` prints each step; `GRAPH_CONFORMANCE_DUMP=DIR` writes both
//! transcripts to DIR.

mod qmp_common;
mod scenario;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qmp_common::{normalise, wait_for_path, DirWatch, Impl, Qmp, TIDEMARK};
use scenario::{compare, contains, run_tool, Filter};
use serde_json::{json, Value};

/// How long a `serve` gets to announce its socket.
const START_DEADLINE: Duration = Duration::from_secs(20);

scenario::conformance_suite! {
    env: "GRAPH_CONFORMANCE",
    files: "graph_",
    every_file: every_graph_scenario_file_runs,
    scenarios: [
        graph_fleecing_raw,
        graph_fleecing_qcow2,
        graph_backing_null,
        graph_chain,
        graph_reopen,
    ],
}

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
        let r = run_tool(&argv, dir, false, &Filter::default());
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
        run_tool(&argv, Path::new("/"), false, &Filter::default())
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
    if SUITE.qsd_only() {
        return;
    }
    let mut tm = serve(SUITE.under_test(), qcow2);
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
