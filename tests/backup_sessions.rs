//! Pull-backup sessions (`x-tidemark-backup-begin` / `-end` /
//! `x-tidemark-query-backups`) against `tidemark daemon`: a full pull is
//! the disk at begin whatever the guest writes meanwhile; the next
//! session's incremental bitmap holds exactly the writes since the
//! checkpoint; a failed session leaves the checkpoints as they were; a
//! begin over two disks is all or nothing; bad input is refused and
//! leaves nothing behind.

mod qmp_common;

use std::path::Path;
use std::process::Command;

use qmp_common::{nbd_map, qcow2_image, qemu_io, Impl, Instance, Qmp};
use serde_json::{json, Value};

const SIZE: u64 = 8 << 20;

fn start(disks: &[&str]) -> (Instance, Qmp) {
    let inst = Instance::start(
        Impl::Tidemark,
        &[
            "--nbd-server".into(),
            "addr.type=unix,addr.path=$DIR/nbd.sock".into(),
        ],
        |dir| {
            for d in disks {
                let img = dir.join(format!("{d}.qcow2"));
                qcow2_image(&img, SIZE);
                let out = Command::new("qemu-io")
                    .args(["-c", "write -P 0x11 0 8M"])
                    .arg(&img)
                    .output()
                    .expect("qemu-io");
                assert!(out.status.success());
            }
        },
    );
    let mut q = inst.client();
    for d in disks {
        let file = inst.path(&format!("{d}.qcow2"));
        ok(
            &mut q,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": d,
            "file": {"driver": "file", "filename": file}}),
        );
        ok(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": format!("guest-{d}"),
            "node-name": d, "name": d, "writable": true}),
        );
    }
    (inst, q)
}

fn ok(q: &mut Qmp, cmd: &str, args: Value) -> Value {
    let r = q.exec(cmd, args.clone());
    assert!(r.get("return").is_some(), "{cmd} {args}: {r}");
    r["return"].clone()
}

fn err(q: &mut Qmp, cmd: &str, args: Value) -> String {
    let r = q.exec(cmd, args.clone());
    r["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{cmd} {args} should fail: {r}"))
        .to_owned()
}

/// Reads a whole export into a raw file.
fn pull(uri: &str, to: &Path) {
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(to)
        .output()
        .expect("qemu-img convert");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bytes_at(path: &Path, at: u64, n: usize) -> Vec<u8> {
    let all = std::fs::read(path).expect("read pulled image");
    all[at as usize..at as usize + n].to_vec()
}

fn checkpoints(q: &mut Qmp, node: &str) -> Vec<String> {
    let nodes = ok(q, "query-named-block-nodes", json!({"flat": true}));
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["name"].as_str().map(str::to_owned))
        .collect()
}

/// What the session leaves behind once ended: nothing but the guests'.
fn assert_torn_down(q: &mut Qmp, scratch: &Path) {
    assert_eq!(ok(q, "query-jobs", json!({})), json!([]));
    assert_eq!(ok(q, "x-tidemark-query-backups", json!({})), json!([]));
    let exports = ok(q, "query-block-exports", json!({}));
    assert!(
        exports
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["id"].as_str().is_some_and(|i| i.starts_with("guest-"))),
        "{exports}"
    );
    assert!(!scratch.exists(), "{} left behind", scratch.display());
}

#[test]
fn full_then_incremental_pull_and_a_failed_session_keeps_the_checkpoint() {
    let (inst, mut q) = start(&["vda"]);
    let guest = inst.nbd_uri("vda");
    let scratch = inst.path("s1.qcow2");
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "s1", "checkpoint": "c1",
        "disks": [{"node": "vda", "scratch": scratch}]}),
    );
    let disk = &r["disks"][0];
    assert_eq!(disk["size"], SIZE);
    let uri = disk["uri"].as_str().expect("uri").to_owned();
    assert_eq!(uri, inst.nbd_uri("s1-vda"));
    // The guest writes during the pull: the pull is the disk at begin.
    qemu_io(&guest, &["write -P 0x22 1M 64k"]);
    let full = inst.path("full.raw");
    pull(&uri, &full);
    assert_eq!(bytes_at(&full, 1 << 20, 4), vec![0x11; 4]);
    let q1 = ok(&mut q, "x-tidemark-query-backups", json!({}));
    assert_eq!(q1[0]["id"], "s1");
    assert!(
        q1[0]["disks"][0]["scratch-bytes"].as_u64().unwrap_or(0) > 0,
        "{q1}"
    );
    end(&mut q, "s1", true);
    assert_torn_down(&mut q, &scratch);
    assert_eq!(checkpoints(&mut q, "vda"), vec!["c1"]);

    // Incremental from c1: exactly the writes since the first begin.
    qemu_io(&guest, &["write -P 0x33 3M 128k"]);
    let scratch2 = inst.path("s2.qcow2");
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "s2", "incremental": "c1",
        "checkpoint": "c2", "disks": [{"node": "vda", "scratch": scratch2}]}),
    );
    assert_eq!(r["disks"][0]["bitmap"], "backup-vda");
    assert_eq!(r["disks"][0]["dirty-bytes"], 64 * 1024 + 128 * 1024);
    let uri = r["disks"][0]["uri"].as_str().expect("uri").to_owned();
    let map = nbd_map(&uri, "qemu:dirty-bitmap:backup-vda");
    let dirty: Vec<&str> = map.lines().filter(|l| l.contains("dirty")).collect();
    assert_eq!(dirty.len(), 2, "{map}");
    assert!(dirty[0].trim_start().starts_with("1048576"), "{map}");
    assert!(dirty[1].trim_start().starts_with("3145728"), "{map}");
    // A failure keeps the checkpoints as before the begin.
    end(&mut q, "s2", false);
    assert_torn_down(&mut q, &scratch2);
    assert_eq!(checkpoints(&mut q, "vda"), vec!["c1"]);

    // So the next incremental from c1 still sees every write since it.
    qemu_io(&guest, &["write -P 0x44 6M 64k"]);
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "s3", "incremental": "c1",
        "disks": [{"node": "vda", "scratch": inst.path("s3.qcow2")}]}),
    );
    assert_eq!(
        r["disks"][0]["dirty-bytes"],
        64 * 1024 + 128 * 1024 + 64 * 1024
    );
    end(&mut q, "s3", true);
    let check = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(inst.path("vda.qcow2"))
        .output()
        .expect("qemu-img check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn a_two_disk_begin_is_all_or_nothing() {
    let (inst, mut q) = start(&["vda", "vdb"]);
    let good = inst.path("sa.qcow2");
    let e = err(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "m", "checkpoint": "c1",
        "disks": [{"node": "vda", "scratch": good},
                  {"node": "vdb", "scratch": inst.path("nodir/sb.qcow2")}]}),
    );
    assert!(e.contains("nodir"), "{e}");
    assert_torn_down(&mut q, &good);
    assert!(checkpoints(&mut q, "vda").is_empty());
    assert!(checkpoints(&mut q, "vdb").is_empty());
    let nodes = ok(&mut q, "query-named-block-nodes", json!({"flat": true}));
    assert_eq!(nodes.as_array().map(Vec::len), Some(4), "{nodes}");

    // Both disks at once, each with its own export and checkpoint.
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "m", "checkpoint": "c1",
        "disks": [{"node": "vda"}, {"node": "vdb"}]}),
    );
    let exports: Vec<&str> = r["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["export"].as_str())
        .collect();
    assert_eq!(exports, vec!["m-vda", "m-vdb"]);
    end(&mut q, "m", true);
    assert_eq!(checkpoints(&mut q, "vda"), vec!["c1"]);
    assert_eq!(checkpoints(&mut q, "vdb"), vec!["c1"]);
    assert_eq!(ok(&mut q, "query-jobs", json!({})), json!([]));
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let (inst, mut q) = start(&["vda"]);
    let scratch = inst.path("x.qcow2");
    let e = err(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "x", "incremental": "nope",
        "disks": [{"node": "vda", "scratch": scratch}]}),
    );
    assert_eq!(e, "Checkpoint 'nope' not found on disk 'vda'");
    assert_torn_down(&mut q, &scratch);
    let e = err(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "x",
        "disks": [{"node": "nosuch"}]}),
    );
    assert_eq!(e, "Cannot find device='nosuch' nor node-name='nosuch'");
    let e = err(
        &mut q,
        "x-tidemark-backup-end",
        json!({"id": "zz", "success": true}),
    );
    assert_eq!(e, "Backup session 'zz' not found");
    ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "x",
        "disks": [{"node": "vda", "scratch": scratch}]}),
    );
    let e = err(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "x",
        "disks": [{"node": "vda", "scratch": inst.path("y.qcow2")}]}),
    );
    assert_eq!(e, "Backup session 'x' already exists");
    end(&mut q, "x", true);
    assert_torn_down(&mut q, &scratch);
}

/// A new daemon with an NBD server, the image `img` moved into its
/// directory and opened as node `vda`.
fn restart(img: &Path) -> (Instance, Qmp) {
    let nbd = [
        "--nbd-server".to_owned(),
        "addr.type=unix,addr.path=$DIR/nbd.sock".to_owned(),
    ];
    let inst = Instance::start(Impl::Tidemark, &nbd, |d| {
        std::fs::rename(img, d.join("vda.qcow2")).expect("move image");
    });
    let mut q = inst.client();
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "vda",
        "file": {"driver": "file", "filename": inst.path("vda.qcow2")}}),
    );
    (inst, q)
}

fn qemu_img(args: &[&str], dir: &Path) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

fn checkpoint_list(q: &mut Qmp, node: &str) -> Value {
    let mut v = ok(q, "x-tidemark-query-checkpoints", json!({"node": node}));
    // The dirty counts change with every write; the list itself must not.
    for c in v["checkpoints"].as_array_mut().into_iter().flatten() {
        c.as_object_mut().map(|m| m.remove("dirty-bytes"));
    }
    v
}

#[test]
fn checkpoints_live_in_the_image_across_restarts_and_qemu() {
    let (inst, mut q) = start(&["vda"]);
    for (id, inc, chk) in [("s1", None, "c1"), ("s2", Some("c1"), "c2")] {
        let mut args = json!({"id": id, "checkpoint": chk, "disks": [{"node": "vda"}]});
        if let Some(i) = inc {
            args["incremental"] = json!(i);
        }
        ok(&mut q, "x-tidemark-backup-begin", args);
        end(&mut q, id, true);
    }
    let before = checkpoint_list(&mut q, "vda");
    let names: Vec<&str> = before["checkpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, vec!["c1", "c2"], "{before}");
    assert_eq!(before["checkpoints"][1]["parent"], "c1");
    ok(&mut q, "quit", json!({}));
    drop(q);
    let dir = inst.dir.path().to_owned();
    let img = inst.path("vda.qcow2");
    let mut inst = inst;
    assert!(inst.wait_exit(std::time::Duration::from_secs(20)));
    // qemu rewrites the header and qemu-nbd writes through the image: the
    // record stays, and the bitmaps record qemu's writes.
    qemu_img(&["check", "vda.qcow2"], &dir);
    qemu_img(&["bitmap", "--add", "vda.qcow2", "other"], &dir);
    let sock = dir.join("qemu-nbd.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .expect("qemu-nbd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not listen"
        );
        std::thread::yield_now();
    }
    // qemu-nbd ends with its only client (no --persistent).
    qemu_io(
        &format!("nbd+unix:///?socket={}", sock.display()),
        &["write -P 0x55 2M 64k"],
    );
    assert!(qmp_common::wait_child(
        &mut nbd,
        std::time::Duration::from_secs(20)
    ));
    qemu_img(&["check", "vda.qcow2"], &dir);
    let (_inst2, mut q) = restart(&img);
    assert_eq!(checkpoint_list(&mut q, "vda"), before);
    let full = ok(
        &mut q,
        "x-tidemark-query-checkpoints",
        json!({"node": "vda"}),
    );
    assert_eq!(full["checkpoints"][1]["dirty-bytes"], 65536, "{full}");
    // Removing c1: c2 takes its parent (none).
    ok(
        &mut q,
        "x-tidemark-checkpoint-remove",
        json!({"node": "vda", "name": "c1"}),
    );
    let after = checkpoint_list(&mut q, "vda");
    assert_eq!(
        after["checkpoints"].as_array().map(Vec::len),
        Some(1),
        "{after}"
    );
    assert!(after["checkpoints"][0].get("parent").is_none(), "{after}");
    ok(&mut q, "quit", json!({}));
}

#[test]
fn the_four_chain_rules_and_removal_from_two_layers() {
    let nbd = [
        "--nbd-server".to_owned(),
        "addr.type=unix,addr.path=$DIR/nbd.sock".to_owned(),
    ];
    let inst = Instance::start(Impl::Tidemark, &nbd, |dir| {
        qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "4M"], dir);
        qemu_img(&["bitmap", "--add", "b.qcow2", "gap"], dir);
        qemu_img(&["bitmap", "--add", "b.qcow2", "two"], dir);
        qemu_img(
            &[
                "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "m.qcow2",
            ],
            dir,
        );
        qemu_img(&["bitmap", "--add", "m.qcow2", "low"], dir);
        qemu_img(
            &[
                "create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "t.qcow2",
            ],
            dir,
        );
        qemu_img(&["bitmap", "--add", "t.qcow2", "gap"], dir);
        qemu_img(&["bitmap", "--add", "t.qcow2", "two"], dir);
        qemu_img(&["bitmap", "--add", "--disable", "t.qcow2", "off"], dir);
        qemu_img(&["create", "-q", "-f", "qcow2", "s.qcow2", "4M"], dir);
    });
    qmp_common::qcow2_with_stale_bitmap(&inst.path("s.qcow2"), 4 << 20, "stale");
    let mut q = inst.client();
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t",
        "file": {"driver": "file", "filename": inst.path("t.qcow2")}}),
    );
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "s",
        "file": {"driver": "file", "filename": inst.path("s.qcow2")}}),
    );
    let begin = |q: &mut Qmp, node: &str, chk: &str| {
        err(
            q,
            "x-tidemark-backup-begin",
            json!({"id": "x", "incremental": chk,
            "disks": [{"node": node, "scratch": inst.path("x.qcow2")}]}),
        )
    };
    assert_eq!(
        begin(&mut q, "t", "low"),
        "Checkpoint 'low' of disk 't' is broken: the top layer has no bitmap of its name"
    );
    // "gap" is in t and b, not in m; "two" likewise, so both are gapped.
    assert_eq!(
        begin(&mut q, "t", "gap"),
        "Checkpoint 'gap' of disk 't' is broken: the layers holding its bitmap are not contiguous"
    );
    assert_eq!(
        begin(&mut q, "t", "off"),
        "Checkpoint 'off' of disk 't' is broken: its bitmap in 't' is not recording and persistent"
    );
    assert_eq!(
        begin(&mut q, "s", "stale"),
        "Checkpoint 'stale' of disk 's' is broken: its bitmap in 's' is inconsistent"
    );
    assert!(!inst.path("x.qcow2").exists());
    // Removal reaches the read-only backing layer too.
    let layers = ok(&mut q, "x-tidemark-query-checkpoints", json!({"node": "t"}));
    assert_eq!(
        layers["checkpoints"],
        json!([]),
        "records only for tidemark's own"
    );
    ok(
        &mut q,
        "x-tidemark-checkpoint-remove",
        json!({"node": "t", "name": "two"}),
    );
    ok(&mut q, "quit", json!({}));
    let mut inst = inst;
    assert!(inst.wait_exit(std::time::Duration::from_secs(20)));
    let info = Command::new("qemu-img")
        .args(["info", "--backing-chain"])
        .arg(inst.path("t.qcow2"))
        .output()
        .expect("qemu-img info");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(!text.contains("name: two"), "{text}");
    assert!(text.contains("name: gap"), "{text}");
    for f in ["b.qcow2", "m.qcow2", "t.qcow2"] {
        qemu_img(&["check", f], inst.dir.path());
    }
}

#[test]
fn a_session_nobody_uses_expires_as_a_failure() {
    let (inst, mut q) = start(&["vda"]);
    let guest = inst.nbd_uri("vda");
    checkpoint(&mut q, "c0");
    qemu_io(&guest, &["write -P 0x22 1M 64k"]);
    let scratch = inst.path("l.qcow2");
    ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "l", "incremental": "c0", "checkpoint": "c1", "lease": 1,
        "disks": [{"node": "vda", "scratch": scratch}]}),
    );
    assert_eq!(checkpoints(&mut q, "vda"), vec!["c1", "c0"]);
    qemu_io(&guest, &["write -P 0x33 5M 64k"]);
    let ev = q.event("X_TIDEMARK_BACKUP_EXPIRED");
    assert_eq!(ev["data"]["id"], "l", "{ev}");
    assert_torn_down(&mut q, &scratch);
    assert_eq!(checkpoints(&mut q, "vda"), vec!["c0"]);
    // The next incremental from c0 covers both writes.
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "n", "incremental": "c0", "disks": [{"node": "vda"}]}),
    );
    assert_eq!(r["disks"][0]["dirty-bytes"], 2 * 65536, "{r}");
}

/// Ends session `id` (it must succeed as a command).
fn end(q: &mut Qmp, id: impl serde::Serialize, success: bool) {
    ok(
        q,
        "x-tidemark-backup-end",
        json!({"id": id, "success": success}),
    );
}

/// Makes checkpoint `c` on `vda` with a session that succeeds.
fn checkpoint(q: &mut Qmp, c: &str) {
    ok(
        q,
        "x-tidemark-backup-begin",
        json!({"id": format!("make-{c}"), "checkpoint": c, "disks": [{"node": "vda"}]}),
    );
    end(q, format!("make-{c}"), true);
}

/// Reads `len` bytes at `at` of `uri` with qemu-io; its stderr and stdout
/// on failure.
fn try_read(uri: &str, at: u64, len: u64) -> Result<(), String> {
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", &format!("read {at} {len}"), uri])
        .output()
        .expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.success() && !text.contains("failed") {
        true => Ok(()),
        false => Err(text),
    }
}

#[test]
fn a_full_scratch_breaks_the_snapshot_not_the_guest() {
    let (inst, mut q) = start(&["vda"]);
    let guest = inst.nbd_uri("vda");
    checkpoint(&mut q, "c1");
    qemu_io(&guest, &["write -P 0x22 0 64k"]);
    let scratch = inst.path("q.qcow2");
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "q", "incremental": "c1", "checkpoint": "c2",
        "disks": [{"node": "vda", "scratch": scratch, "quota": 32 * 1024}]}),
    );
    let uri = r["disks"][0]["uri"].as_str().expect("uri").to_owned();
    assert!(try_read(&uri, 0, 65536).is_ok());
    // Two 16 KiB copies fit the quota; the third write breaks the snapshot,
    // and every guest write succeeds.
    qemu_io(
        &guest,
        &[
            "write -P 0x33 1M 4k",
            "write -P 0x33 2M 4k",
            "write -P 0x33 3M 4k",
            "write -P 0x33 4M 4k",
        ],
    );
    let ev = q.event("X_TIDEMARK_BACKUP_BROKEN");
    assert_eq!(ev["data"]["id"], "q", "{ev}");
    assert_eq!(ev["data"]["node"], "vda", "{ev}");
    let s = ok(&mut q, "x-tidemark-query-backups", json!({}));
    let disk = &s[0]["disks"][0];
    assert_eq!(disk["state"], "broken", "{s}");
    assert_eq!(disk["scratch-quota"], 32 * 1024, "{s}");
    assert_eq!(disk["read-bytes"], 65536, "{s}");
    assert_eq!(disk["allocated-bytes"], SIZE, "{s}");
    let e = try_read(&uri, 0, 65536).expect_err("a broken snapshot must not be read");
    assert!(e.contains("Input/output error"), "{e}");
    let e = err(
        &mut q,
        "x-tidemark-backup-end",
        json!({"id": "q", "success": true}),
    );
    assert!(e.contains("broke"), "{e}");
    end(&mut q, "q", false);
    assert_torn_down(&mut q, &scratch);
    assert_eq!(checkpoints(&mut q, "vda"), vec!["c1"]);
    // The guest's writes are all there, and c1 still covers them.
    let mut buf = inst.path("now.raw");
    pull(&guest, &buf);
    for at in [1u64 << 20, 2 << 20, 3 << 20, 4 << 20] {
        assert_eq!(bytes_at(&buf, at, 4), vec![0x33; 4]);
    }
    buf.set_extension("x");
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "n", "incremental": "c1", "disks": [{"node": "vda"}]}),
    );
    assert_eq!(r["disks"][0]["dirty-bytes"], 5 * 65536, "{r}");
    end(&mut q, "n", true);
}

#[test]
fn a_given_scratch_node_and_refusals_that_leave_nothing() {
    let (inst, mut q) = start(&["vda"]);
    checkpoint(&mut q, "c1");
    for (name, size) in [("small", SIZE / 2), ("fit", SIZE)] {
        qcow2_image(&inst.path(&format!("{name}.qcow2")), size);
        ok(
            &mut q,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": inst.path(&format!("{name}.qcow2"))}}),
        );
    }
    let e = err(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "g", "incremental": "c1", "checkpoint": "c2",
        "disks": [{"node": "vda", "scratch-node": "small"}]}),
    );
    assert_eq!(
        e,
        format!(
            "Scratch node 'small' has {} bytes; disk 'vda' needs {SIZE}",
            SIZE / 2
        )
    );
    assert_eq!(checkpoints(&mut q, "vda"), vec!["c1"]);
    // A file that exists already is not the session's to make.
    let taken = inst.path("fit.qcow2");
    let e = err(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "g", "disks": [{"node": "vda", "scratch": taken}]}),
    );
    assert!(e.contains("already exists"), "{e}");
    assert!(taken.exists());
    // A job holding the checkpoint's bitmap (slowly: it has writes to
    // copy).
    qemu_io(&inst.nbd_uri("vda"), &["write -P 0x22 0 1M"]);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "hold", "device": "vda", "target": "fit", "sync": "bitmap",
        "bitmap": "c1", "bitmap-mode": "never", "speed": 1}),
    );
    let e = err(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "g", "incremental": "c1", "disks": [{"node": "vda"}]}),
    );
    assert_eq!(e, "Checkpoint 'c1' of disk 'vda' is in use by a block job");
    ok(
        &mut q,
        "block-job-cancel",
        json!({"device": "hold", "force": true}),
    );
    while q.event("JOB_STATUS_CHANGE")["data"] != json!({"id": "hold", "status": "null"}) {}
    assert_eq!(ok(&mut q, "query-jobs", json!({})), json!([]));
    // The given node serves as the scratch and stays, without the bitmap.
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "g", "incremental": "c1",
        "disks": [{"node": "vda", "scratch-node": "fit"}]}),
    );
    let uri = r["disks"][0]["uri"].as_str().expect("uri").to_owned();
    let pulled = inst.path("g.raw");
    pull(&uri, &pulled);
    assert_eq!(bytes_at(&pulled, 0, 4), vec![0x22; 4]);
    assert_eq!(bytes_at(&pulled, 2 << 20, 4), vec![0x11; 4]);
    end(&mut q, "g", true);
    assert_torn_down(&mut q, &inst.path("none"));
    assert!(checkpoints(&mut q, "fit").is_empty());
    assert!(taken.exists());
}

#[test]
fn a_crash_mid_session_takes_the_new_checkpoint_back() {
    let (mut inst, mut q) = start(&["vda"]);
    let guest = inst.nbd_uri("vda");
    checkpoint(&mut q, "c1");
    qemu_io(&guest, &["write -P 0x22 1M 64k"]);
    ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "crashk", "incremental": "c1", "checkpoint": "c2",
        "disks": [{"node": "vda"}]}),
    );
    let listed = checkpoint_list(&mut q, "vda");
    assert_eq!(listed["checkpoints"][1]["pending"], "crashk", "{listed}");
    let scratch: Vec<std::path::PathBuf> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("-crashk-vda.scratch.qcow2"))
        })
        .collect();
    assert_eq!(scratch.len(), 1, "{scratch:?}");
    qemu_io(&guest, &["write -P 0x33 5M 64k", "flush"]);
    drop(q);
    inst.kill();
    let img = inst.path("vda.qcow2");
    let (_inst2, mut q) = restart(&img);
    // The dead daemon's scratch file went when the new one started.
    assert!(!scratch[0].exists(), "{} left behind", scratch[0].display());
    let listed = checkpoint_list(&mut q, "vda");
    let names: Vec<&str> = listed["checkpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, vec!["c1"], "{listed}");
    assert_eq!(checkpoints(&mut q, "vda"), vec!["c1"]);
    // c1 came back usable and covers both writes since it.
    let full = ok(
        &mut q,
        "x-tidemark-query-checkpoints",
        json!({"node": "vda"}),
    );
    assert_eq!(full["checkpoints"][0]["valid"], true, "{full}");
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "after", "incremental": "c1", "disks": [{"node": "vda"}]}),
    );
    let uri = r["disks"][0]["uri"].as_str().expect("uri").to_owned();
    let map = nbd_map(&uri, "qemu:dirty-bitmap:backup-vda");
    for at in [1u64 << 20, 5 << 20] {
        let covered = map.lines().any(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            l.contains("dirty") && f.len() == 2 && f[0] <= at && at + 65536 <= f[0] + f[1]
        });
        assert!(covered, "write at {at} not covered: {map}");
    }
    ok(&mut q, "quit", json!({}));
}

#[test]
fn checkpoints_carry_across_an_external_snapshot() {
    let (inst, mut q) = start(&["vda"]);
    let guest = inst.nbd_uri("vda");
    checkpoint(&mut q, "c1");
    qemu_io(&guest, &["write -P 0x22 1M 64k"]);
    ok(
        &mut q,
        "blockdev-snapshot-sync",
        json!({"node-name": "vda", "snapshot-file": inst.path("top.qcow2"),
        "snapshot-node-name": "top", "format": "qcow2"}),
    );
    qemu_io(&guest, &["write -P 0x33 5M 64k"]);
    let listed = ok(
        &mut q,
        "x-tidemark-query-checkpoints",
        json!({"node": "top"}),
    );
    let c1 = &listed["checkpoints"][0];
    assert_eq!(c1["name"], "c1", "{listed}");
    assert_eq!(c1["layers"], json!(["top", "vda"]), "{listed}");
    assert_eq!(c1["valid"], true, "{listed}");
    assert_eq!(c1["dirty-bytes"], 2 * 65536, "{listed}");
    let r = ok(
        &mut q,
        "x-tidemark-backup-begin",
        json!({"id": "s", "incremental": "c1", "checkpoint": "c2", "disks": [{"node": "top"}]}),
    );
    assert_eq!(r["disks"][0]["dirty-bytes"], 2 * 65536, "{r}");
    end(&mut q, "s", true);
    ok(&mut q, "quit", json!({}));
    let mut inst = inst;
    assert!(inst.wait_exit(std::time::Duration::from_secs(20)));
    for img in ["vda.qcow2", "top.qcow2"] {
        qemu_img(&["check", img], inst.dir.path());
    }
}
