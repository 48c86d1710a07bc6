//! Meta-context IDs are qemu's, byte for byte: `base:allocation` 0,
//! `qemu:allocation-depth` 1, and `qemu:dirty-bitmap:NAME` 2 plus the
//! bitmap's place in the export's list, with or without allocation depth
//! and whatever subset (in whatever order) the client selects.
//!
//! The same raw exchanges (tests/py/nbd_contexts.py: LIST and
//! SET_META_CONTEXT replies, then BLOCK_STATUS reply chunks, with
//! structured replies and with extended headers, there also with payloads
//! naming IDs) run against qemu-nbd and `tidemark serve` with the same
//! `-A`/`-B` options, and against qemu-storage-daemon and `tidemark daemon`
//! with the same `block-export-add` (`bitmaps` lists, one naming a bitmap
//! twice, `allocation-depth` true and false); the transcripts must match to
//! the byte. qemu's transcripts are also checked against the rule itself,
//! so the test says what qemu does, not only that tidemark copies it.

mod common;
mod qmp_common;

use std::path::{Path, PathBuf};

use common::{run, run_py, tool, ServeOpts, Server};
use qmp_common::{as_qemu, Impl, Instance};
use serde_json::{json, Value};

const SIZE: u64 = 4 << 20;
const BASE: &str = "base:allocation";
const DEPTH: &str = "qemu:allocation-depth";

fn bitmap(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// `top.qcow2` in `dir` over a raw backing file with data in its first
/// MiB (so allocation depth has 0, 1 and 2 to say), and three disabled
/// bitmaps b0, b1, b2 that each saw different writes.
fn image(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    let img = |args: &[&str]| run(tool("qemu-img").args(args));
    let io = |fmt: &str, file: &Path, cmd: &str| {
        run(tool("qemu-io").args(["-f", fmt, "-c", cmd]).arg(file));
    };
    let (b, t) = (base.to_str().expect("utf-8"), top.to_str().expect("utf-8"));
    img(&["create", "-q", "-f", "raw", b, &SIZE.to_string()]);
    io("raw", &base, "write -P 1 0 1M");
    img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", t,
    ]);
    for (name, write) in [
        ("b0", "write -P 2 512k 256k"),
        ("b1", "write -P 3 2M 64k"),
        ("b2", "write -P 4 3M 128k"),
    ] {
        img(&["bitmap", "--add", t, name]);
        io("qcow2", &top, write);
    }
    for name in ["b0", "b1", "b2"] {
        img(&["bitmap", "--disable", t, name]);
    }
    top
}

/// The exchanges, each on its own connection to `export`: several subsets
/// and orders, names the export may not offer, a name given twice, and
/// (extended headers only) payloads naming selected, unselected and
/// repeated IDs.
fn cases(export: &str) -> String {
    let (b0, b1, b2) = (bitmap("b0"), bitmap("b1"), bitmap("b2"));
    let all = [0, 1, 2, 3, 4];
    let v = json!([
        {"list": [], "set": [BASE]},
        {"list": ["qemu:"], "set": [b0]},
        {"list": ["qemu:dirty-bitmap:"], "set": [b2, DEPTH],
         "ids": [[1], [2], [4], [4, 1], [1, 1]]},
        {"list": ["base:", DEPTH], "set": [b1, b2, b0, DEPTH, BASE],
         "ids": [[0], [1], [2], [3], [4], [4, 2], [2, 2], all, [5]]},
        {"set": [DEPTH], "ids": [[1], [0]]},
        {"set": [b0, b0], "ids": [[2], [3], [4]]},
        {"set": [b1, bitmap("nope"), "qemu:", DEPTH, "base:"], "ids": [[2], [3], [1]]},
        {"set": [bitmap("nope")], "ids": [[0]]},
    ]);
    let mut v = v;
    for case in v.as_array_mut().expect("cases") {
        case["export"] = json!(export);
    }
    v.to_string()
}

/// Runs the exchanges on `socket` in `mode`: the transcript, one JSON line
/// per reply, bytes in hex.
fn transcript(socket: &Path, export: &str, mode: &str) -> String {
    let sock = socket.to_str().expect("utf-8");
    run_py(
        "nbd_contexts.py",
        &[sock, &SIZE.to_string(), mode, &cases(export)],
    )
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks qemu's transcript against the rule, for an export offering
/// `bitmaps` in this order: every SET reply carries the rule's ID (a name
/// offered twice under its first), every LIST reply ID 0, and the chunks
/// of the plain BLOCK_STATUS carry the IDs SET gave, in that order.
/// Returns how many SET replies named a context.
fn check_rule(t: &str, depth: bool, bitmaps: &[&str]) -> usize {
    let rule = |name: &str| -> Option<u32> {
        if name == BASE {
            return Some(0);
        }
        if name == DEPTH {
            return depth.then_some(1);
        }
        let leaf = name.strip_prefix("qemu:dirty-bitmap:")?;
        let i = bitmaps.iter().position(|b| *b == leaf)?;
        Some(2 + i as u32)
    };
    let mut set_ids: Vec<u32> = Vec::new();
    let mut status_ids: Vec<u32> = Vec::new();
    let mut named = 0;
    let finish = |set_ids: &mut Vec<u32>, status_ids: &mut Vec<u32>| {
        if !set_ids.is_empty() {
            assert_eq!(status_ids, set_ids, "BLOCK_STATUS chunk IDs\n{t}");
        }
        set_ids.clear();
        status_ids.clear();
    };
    for line in t.lines() {
        let v: Value = serde_json::from_str(line).expect("json line");
        let label = v[0].as_str().expect("label");
        if label == "case" {
            finish(&mut set_ids, &mut status_ids);
            continue;
        }
        let b = unhex(v[1].as_str().expect("hex"));
        match label {
            "list" | "set" if be32(&b, 12) == 4 => {
                let (id, name) = (be32(&b, 20), String::from_utf8_lossy(&b[24..]));
                if label == "list" {
                    assert_eq!(id, 0, "LIST reply for {name}\n{t}");
                } else {
                    assert_eq!(Some(id), rule(&name), "SET reply for {name}\n{t}");
                    set_ids.push(id);
                    named += 1;
                }
            }
            "status" => {
                let ext = be32(&b, 0) == 0x6E8A_278C;
                let head = if ext { 32 } else { 20 };
                let kind = u16::from_be_bytes([b[6], b[7]]);
                if kind & 0x8000 == 0 {
                    status_ids.push(be32(&b, head));
                }
            }
            _ => {}
        }
    }
    finish(&mut set_ids, &mut status_ids);
    named
}

/// The first line where tidemark's transcript differs from qemu's, with
/// the case it belongs to.
fn compare(what: &str, qemu: &str, ours: &str) {
    let mut case = "";
    for (q, o) in qemu.lines().zip(ours.lines()) {
        if q.starts_with("[\"case\"") {
            case = q;
        }
        assert_eq!(o, q, "{what}, {case}: tidemark's reply, then qemu's");
    }
    assert_eq!(
        ours.lines().count(),
        qemu.lines().count(),
        "{what}: replies\n--- tidemark ---\n{ours}\n--- qemu ---\n{qemu}"
    );
}

#[test]
fn ids_match_qemu_nbd_for_every_subset() {
    let dir = common::temp_dir();
    let img = image(dir.path());
    // (-A, -B in command-line order): qemu-nbd offers -B bitmaps in the
    // reverse order of the options.
    let setups: [(bool, &[&str]); 5] = [
        (true, &["b0", "b1", "b2"]),
        (false, &["b0", "b2", "b0"]),
        (false, &["b1"]),
        (true, &[]),
        (false, &[]),
    ];
    for (depth, bitmaps) in setups {
        let opts = ServeOpts {
            format: Some("qcow2"),
            read_only: true,
            allocation_depth: depth,
            bitmaps: bitmaps.iter().map(|b| b.to_string()).collect(),
            max_connections: Some(16),
            ..ServeOpts::default()
        };
        let order: Vec<&str> = bitmaps.iter().rev().copied().collect();
        for mode in ["structured", "extended"] {
            let what = format!("-A {depth}, -B {bitmaps:?}, {mode}");
            let qemu = Server::start(common::Kind::QemuNbd, &img, &opts);
            let q = transcript(qemu.socket(), "", mode);
            drop(qemu);
            let ours = Server::start(common::Kind::Tidemark, &img, &opts);
            let t = transcript(ours.socket(), "", mode);
            drop(ours);
            let named = check_rule(&q, depth, &order);
            assert!(named >= 2, "{what}: too few contexts set\n{q}");
            compare(&what, &q, &t);
        }
    }
}

/// block-export-add exports: (name, bitmaps, allocation-depth); the
/// bitmaps of different exports are disjoint (an exported bitmap is busy).
const QMP_EXPORTS: [(&str, &[&str], Option<bool>); 4] = [
    ("twice", &["b0", "b2", "b0"], None),
    ("depth", &["b1"], Some(true)),
    ("plain", &[], Some(false)),
    ("plain-depth", &[], Some(true)),
];

fn qmp_daemon(kind: Impl) -> Instance {
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,filename=$DIR/top.qcow2,node-name=f0",
        "--blockdev",
        "driver=qcow2,file=f0,node-name=d0,read-only=on",
    ]
    .map(String::from)
    .to_vec();
    let inst = Instance::start(kind, &as_qemu(kind, &args), |d| {
        image(d);
    });
    let mut q = inst.client();
    let sock = inst.path("nbd.sock");
    let r = q.exec(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    assert_eq!(r, json!({"return": {}}), "{kind:?} nbd-server-start");
    for (name, bitmaps, depth) in QMP_EXPORTS {
        let mut a = json!({
            "type": "nbd", "id": name, "node-name": "d0", "name": name, "bitmaps": bitmaps,
        });
        if let Some(d) = depth {
            a["allocation-depth"] = json!(d);
        }
        let r = q.exec("block-export-add", a);
        assert_eq!(r, json!({"return": {}}), "{kind:?} block-export-add {name}");
    }
    inst
}

#[test]
fn ids_match_qemu_storage_daemon_exports() {
    let qsd = qmp_daemon(Impl::Qsd);
    let ours = qmp_daemon(Impl::Tidemark);
    for (name, bitmaps, depth) in QMP_EXPORTS {
        for mode in ["structured", "extended"] {
            let what = format!("export {name} ({bitmaps:?}, depth {depth:?}), {mode}");
            let q = transcript(&qsd.path("nbd.sock"), name, mode);
            let t = transcript(&ours.path("nbd.sock"), name, mode);
            let named = check_rule(&q, depth == Some(true), bitmaps);
            assert!(named >= 2, "{what}: too few contexts set\n{q}");
            compare(&what, &q, &t);
        }
    }
}
