//! The test drivers against qemu-storage-daemon: the same blockdev-add of a
//! `null-co` node and of a `blkdebug` filter, exported over NBD by qsd and
//! by `tidemark daemon`, must look the same to qemu-io and nbdinfo: the
//! data read, the allocation map, and the errno of an injected error
//! (ENOSPC from a `once` rule fires on the first write only).
//!
//! Reads are kept to allocated data and a failing read comes last: qsd's
//! NBD server skips reading holes (so no rule fires there) and drops the
//! connection when a structured read fails.

mod qmp_common;

use std::path::Path;
use std::process::Command;

use qmp_common::{nbd_map, Impl, Instance};
use serde_json::{json, Value};

/// The image under the blkdebug node: 1 MiB, its first 64 KiB 0xab, the
/// rest a hole.
fn make_image(dir: &Path) {
    let path = dir.join("img.raw");
    std::fs::write(&path, vec![0xabu8; 64 << 10]).expect("write image");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open image");
    f.set_len(1 << 20).expect("grow image");
}

fn start(kind: Impl) -> Instance {
    let args = ["--nbd-server", "addr.type=unix,addr.path=$DIR/nbd.sock"].map(String::from);
    Instance::start(kind, &args, make_image)
}

/// blockdev-add each of `nodes` and export `export` writable, all
/// through QMP; returns the replies.
fn build(inst: &Instance, nodes: &[Value], export: &str) -> Vec<Value> {
    let mut q = inst.client();
    let mut replies: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let mut n = n.clone();
            if let Some(f) = n.get_mut("filename") {
                *f = json!(inst.path("img.raw"));
            }
            q.exec("blockdev-add", n)
        })
        .collect();
    replies.push(q.exec(
        "block-export-add",
        json!({"type": "nbd", "id": export, "node-name": export,
               "name": export, "writable": true}),
    ));
    replies
}

/// qemu-io's record of `cmds` against an export: exit status and output,
/// without the timing lines.
fn qemu_io(inst: &Instance, export: &str, cmds: &[&str]) -> Value {
    let mut c = Command::new("timeout");
    c.args(["30", "qemu-io", "-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(inst.nbd_uri(export));
    let out = c.output().expect("run qemu-io");
    let lines = |b: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(b)
            .lines()
            .filter(|l| !l.contains(" ops; "))
            .map(str::to_owned)
            .collect()
    };
    json!({
        "status": out.status.code(),
        "stdout": lines(&out.stdout),
        "stderr": lines(&out.stderr),
    })
}

/// Runs `scenario` on qsd and on tidemark; returns both records.
fn both(scenario: impl Fn(&Instance) -> Value) -> (Value, Value) {
    let qsd = scenario(&start(Impl::Qsd));
    let tidemark = scenario(&start(Impl::Tidemark));
    (qsd, tidemark)
}

fn contains(record: &Value, text: &str) -> bool {
    record.to_string().contains(text)
}

#[test]
fn null_co_reads_zeroes_and_drops_writes_as_in_qsd() {
    let (qsd, tidemark) = both(|inst| {
        let built = build(
            inst,
            &[json!({"driver": "null-co", "node-name": "null0",
                     "size": 1000, "read-zeroes": true})],
            "null0",
        );
        let io = qemu_io(
            inst,
            "null0",
            &[
                "read -P 0 0 1k",
                "write -P 0x5a 0 512",
                "read -P 0 0 1k",
                "write -z 0 1k",
                "flush",
                "discard 0 1k",
            ],
        );
        let map = nbd_map(&inst.nbd_uri("null0"), "base:allocation");
        json!({"built": built, "io": io, "map": map})
    });
    assert_eq!(qsd, tidemark);
    // The size is rounded up to a sector; the whole node is a zero hole.
    assert!(contains(&qsd["map"], "1024    3  hole,zero"), "{qsd}");
}

#[test]
fn null_co_without_read_zeroes_maps_as_a_plain_hole() {
    let (qsd, tidemark) = both(|inst| {
        let built = build(inst, &[json!({"driver": "null-co", "node-name": "n"})], "n");
        let map = nbd_map(&inst.nbd_uri("n"), "base:allocation");
        let io = qemu_io(inst, "n", &["write -P 0x5a 0 64k", "flush"]);
        json!({"built": built, "map": map, "io": io})
    });
    assert_eq!(qsd, tidemark);
    assert!(contains(&qsd["map"], "1073741824    1  hole"), "{qsd}");
}

/// `raw` over `blkdebug` over `file`: how qemu's tests use blkdebug.
fn blkdebug_stack(rules: Value) -> Vec<Value> {
    let mut bd = json!({"driver": "blkdebug", "node-name": "bd", "image": "f0"});
    if let (Some(bd), Some(rules)) = (bd.as_object_mut(), rules.as_object()) {
        bd.extend(rules.clone());
    }
    vec![
        json!({"driver": "file", "node-name": "f0", "filename": "img.raw"}),
        bd,
        json!({"driver": "raw", "node-name": "r0", "file": "bd"}),
    ]
}

#[test]
fn blkdebug_once_enospc_fails_only_the_first_write_as_in_qsd() {
    let rules = json!({"inject-error": [{"event": "write_aio", "errno": 28, "once": true}]});
    let (qsd, tidemark) = both(|inst| {
        let built = build(inst, &blkdebug_stack(rules.clone()), "r0");
        let io = qemu_io(
            inst,
            "r0",
            &[
                "read -P 0xab 0 4k",
                "write -P 0x11 0 4k",
                "read -P 0xab 0 4k",
                "write -P 0x22 0 4k",
                "read -P 0x22 0 4k",
            ],
        );
        let map = nbd_map(&inst.nbd_uri("r0"), "base:allocation");
        json!({"built": built, "io": io, "map": map})
    });
    assert_eq!(qsd, tidemark);
    let out = qsd["io"]["stdout"].to_string();
    assert_eq!(
        out.matches("write failed: No space left on device").count(),
        1,
        "{qsd}"
    );
    assert_eq!(qsd["io"]["status"], json!(1), "{qsd}");
}

#[test]
fn blkdebug_sector_rule_stays_armed_and_hits_reads_too_as_in_qsd() {
    let rules = json!({"inject-error": [{"event": "write_aio", "sector": 8}]});
    let (qsd, tidemark) = both(|inst| {
        let built = build(inst, &blkdebug_stack(rules.clone()), "r0");
        let io = qemu_io(
            inst,
            "r0",
            &[
                "read -P 0xab 4096 512",
                "write -P 0x33 0 4k",
                "write -P 0x33 4096 512",
                "write -P 0x33 3584 1k",
                "read -P 0x33 0 4k",
                "flush",
                // Last: qsd drops the connection after a failed read.
                "read 4096 512",
            ],
        );
        json!({"built": built, "io": io})
    });
    assert_eq!(qsd, tidemark);
    let out = qsd["io"]["stdout"].to_string();
    assert_eq!(
        out.matches("write failed: Input/output error").count(),
        2,
        "{qsd}"
    );
    assert!(out.contains("read failed: Input/output error"), "{qsd}");
}

#[test]
fn blkdebug_states_and_other_errnos_match_qsd() {
    let rules = json!({
        "inject-error": [{"event": "write_aio", "state": 2, "iotype": "write", "errno": 1},
                         {"event": "write_aio", "state": 3, "iotype": "write", "errno": 28}],
        "set-state": [{"event": "read_aio", "state": 1, "new_state": 2},
                      {"event": "read_aio", "state": 2, "new_state": 3}]
    });
    let (qsd, tidemark) = both(|inst| {
        let built = build(inst, &blkdebug_stack(rules.clone()), "r0");
        let io = qemu_io(
            inst,
            "r0",
            &[
                "write -P 0x44 0 512",
                "read -P 0x44 0 512",
                "write -P 0x55 0 512",
                "read -P 0x44 0 512",
                "write -P 0x66 0 512",
                "read -P 0x44 0 512",
            ],
        );
        json!({"built": built, "io": io})
    });
    assert_eq!(qsd, tidemark);
    let out = qsd["io"]["stdout"].to_string();
    assert!(
        out.contains("write failed: Operation not permitted"),
        "{qsd}"
    );
    assert!(
        out.contains("write failed: No space left on device"),
        "{qsd}"
    );
}

#[test]
fn blkdebug_exported_directly_fails_writes_on_pwritev_as_in_qsd() {
    let rules = json!({"inject-error": [{"event": "pwritev", "iotype": "write", "errno": 28, "once": true}]});
    let (qsd, tidemark) = both(|inst| {
        let mut nodes = blkdebug_stack(rules.clone());
        nodes.pop();
        let built = build(inst, &nodes, "bd");
        let io = qemu_io(
            inst,
            "bd",
            &[
                "write -P 0x77 0 4k",
                "read -P 0xab 0 4k",
                "write -P 0x77 0 4k",
                "read -P 0x77 0 4k",
            ],
        );
        json!({"built": built, "io": io})
    });
    assert_eq!(qsd, tidemark);
    assert!(
        contains(&qsd["io"], "write failed: No space left on device"),
        "{qsd}"
    );
}

#[test]
fn bad_options_get_qsd_errors() {
    let bad = [
        json!({"driver": "null-co", "node-name": "a", "latency-ns": -1}),
        json!({"driver": "blkdebug", "node-name": "b", "image": "nope"}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "inject-error": [{"event": "bogus"}]}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "inject-error": [{}]}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "inject-error": [{"event": "read_aio", "iotype": "nope"}]}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "set-state": [{"event": "none"}]}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "align": 3}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "align": 512, "max-transfer": 1000}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "max-transfer": 4294967296u64}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "align": -512}),
        json!({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"},
               "config": "/nonexistent/blkdebug.conf"}),
        json!({"driver": "blkdebug", "node-name": "b"}),
    ];
    let (qsd, tidemark) = both(|inst| {
        let mut q = inst.client();
        let replies: Vec<Value> = bad
            .iter()
            .map(|a| q.exec("blockdev-add", a.clone()))
            .collect();
        // Nothing was left behind by the failures.
        let nodes = q.exec("query-named-block-nodes", json!({"flat": true}));
        json!({"replies": replies, "nodes": nodes})
    });
    assert_eq!(qsd, tidemark);
    assert!(qsd["replies"]
        .as_array()
        .is_some_and(|r| r.iter().all(|x| x.get("error").is_some())));
}
