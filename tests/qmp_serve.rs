//! `tidemark serve --qmp PATH` (repeatable): the served image is node
//! `drive0` for QMP clients on every socket; `quit` ends the server.

mod qmp_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use qmp_common::{nbd_map, qemu_io, raw_image, wait_for_path, DirWatch, Qmp, TIDEMARK};
use serde_json::json;

/// Kills the server if the test fails before it quits.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_with_qmp_exposes_drive0_and_quits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("disk.img");
    raw_image(&img, 4 << 20);
    let (q1, q2) = (dir.path().join("q1.sock"), dir.path().join("q2.sock"));
    let nbd = dir.path().join("nbd.sock");
    let log = dir.path().join("log");
    let watch = DirWatch::new(dir.path());
    let child = Command::new(TIDEMARK)
        .arg("serve")
        .arg("--socket")
        .arg(&nbd)
        .arg("--qmp")
        .arg(&q1)
        .arg("--qmp")
        .arg(&q2)
        .arg(&img)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn tidemark serve");
    let mut child = Reap(child);
    for p in [&q1, &q2, &nbd] {
        wait_for_path(&watch, p, &mut child.0, &log);
    }
    let mut a = Qmp::connect(&q1);
    let mut b = Qmp::connect(&q2);
    for q in [&mut a, &mut b] {
        assert_eq!(
            q.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
    }
    let r = a.exec(
        "block-dirty-bitmap-add",
        json!({"node": "drive0", "name": "b0"}),
    );
    assert_eq!(r, json!({"return": {}}));
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    qemu_io(&uri, &["write -P 1 1M 4k"]);
    let nodes = b.exec("query-named-block-nodes", json!({}));
    assert_eq!(nodes["return"][0]["node-name"], "drive0");
    assert_eq!(nodes["return"][0]["dirty-bitmaps"][0]["count"], 65536);
    assert!(nbd_map(&uri, "base:allocation").contains("data"));
    assert_eq!(
        b.exec("blockdev-del", json!({"node-name": "drive0"}))["error"]["desc"],
        "Node drive0 is in use"
    );
    assert_eq!(a.exec("quit", json!({})), json!({"return": {}}));
    let status = qmp_common::wait_child(&mut child.0, Duration::from_secs(20));
    assert!(status, "serve did not exit after quit");
    assert!(
        !q1.exists() && !q2.exists() && !nbd.exists(),
        "sockets left behind"
    );
}

#[test]
fn serve_that_cannot_export_leaves_no_socket_behind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("disk.img");
    raw_image(&img, 4 << 20);
    let (qmp, nbd) = (dir.path().join("q.sock"), dir.path().join("nbd.sock"));
    let out = Command::new(TIDEMARK)
        .arg("serve")
        .arg("--socket")
        .arg(&nbd)
        .arg("--qmp")
        .arg(&qmp)
        .args(["-B", "nope"])
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .expect("run tidemark serve");
    assert!(
        !out.status.success(),
        "a missing bitmap must fail the start"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Bitmap 'nope' is not found"), "{stderr}");
    assert!(!qmp.exists() && !nbd.exists(), "sockets left behind");
}
