//! Persistent bitmaps made over QMP survive `quit`: after the daemon exits,
//! `qemu-img info` lists the same bitmaps (names, granularity, flags) for
//! the image qemu-storage-daemon wrote and the one tidemark wrote, and
//! their dirty maps read back the same through a fresh export.

mod qmp_common;

use std::process::Command;
use std::time::Duration;

use qmp_common::{nbd_map, qcow2_image, qemu_io, Impl, Instance};
use serde_json::{json, Value};

fn run(kind: Impl) -> (Value, String) {
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=cf,filename=$DIR/c.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=c0,file=cf",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=w,node-name=c0,name=w,writable=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut inst = Instance::start(kind, &args, |d| qcow2_image(&d.join("c.qcow2"), 8 << 20));
    let mut q = inst.client();
    for (name, g, disabled) in [("p0", 65536, false), ("p1", 4096, true)] {
        let r = q.exec(
            "block-dirty-bitmap-add",
            json!({"node": "c0", "name": name, "granularity": g, "persistent": true,
                   "disabled": disabled}),
        );
        assert_eq!(r, json!({"return": {}}), "{kind:?}");
    }
    qemu_io(
        &inst.nbd_uri("w"),
        &["write -P 1 1M 64k", "write -P 2 5M 4k"],
    );
    assert_eq!(q.exec("quit", json!({})), json!({"return": {}}));
    assert!(
        inst.wait_exit(Duration::from_secs(20)),
        "{kind:?} did not exit"
    );
    let img = inst.path("c.qcow2");
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&img)
        .output()
        .expect("qemu-img info");
    let info: Value = serde_json::from_slice(&out.stdout).expect("info json");
    // Compared by name: qsd writes the bitmap directory newest first,
    // tidemark's store (src/block) in creation order; qemu-img reads both.
    let mut bitmaps: Vec<Value> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    bitmaps.sort_by_key(|b| b["name"].as_str().unwrap_or("").to_owned());
    let bitmaps = Value::Array(bitmaps);
    // Read the stored bits back with qemu-nbd, the same reader for both.
    let sock = inst.path("check.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", "p0", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .expect("qemu-nbd");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let watch = qmp_common::DirWatch::new(inst.dir.path());
    let log = inst.path("daemon.log");
    qmp_common::wait_for_path(&watch, &sock, &mut nbd, &log);
    let map = nbd_map(&uri, "qemu:dirty-bitmap:p0");
    let _ = nbd.kill();
    let _ = nbd.wait();
    (bitmaps, map)
}

#[test]
fn persistent_bitmaps_survive_quit_as_with_qsd() {
    let qsd = run(Impl::Qsd);
    let tm = run(Impl::Tidemark);
    assert!(qsd.0.as_array().is_some_and(|a| a.len() == 2), "{qsd:?}");
    assert_eq!(qsd, tm);
}
