//! Images that qemu reads in a particular way, checked against qemu itself:
//! the same QMP script runs against qemu-storage-daemon and `tidemark
//! daemon`, and the replies, NBD views and images they leave must agree.
//!
//! - a qcow2 whose virtual size is not a multiple of 512 (qemu drops the
//!   partial last sector; a raw file's partial sector is rounded up);
//! - bitmap names: U+0000 (qemu keeps it as the bytes C0 80), names of
//!   1023 and 1024 bytes, and names that are not UTF-8 on disk;
//! - a crafted bitmap directory that asks for far more memory than the
//!   image warrants.

mod common;
mod qmp_common;

use std::path::Path;

use qmp_common::{as_qemu, normalise, qcow2_image, Impl, Instance};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Sets the virtual size field of a qcow2 header (bytes 24..32).
fn patch_header_size(path: &Path, size: u64) {
    let mut img = std::fs::read(path).expect("read image");
    img[24..32].copy_from_slice(&size.to_be_bytes());
    std::fs::write(path, img).expect("write image");
}

/// Output of a stock tool that must succeed, as text.
fn tool(program: &str, args: &[&str]) -> String {
    let mut cmd = common::tool(program);
    cmd.args(args);
    let out = common::output(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        common::describe_failure(&cmd, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdinfo --size` of an export.
fn nbd_size(uri: &str) -> u64 {
    let text = tool("nbdinfo", &["--size", uri]);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("nbdinfo --size {uri}: {text:?}"))
}

/// Each format node's name and virtual size, from query-named-block-nodes
/// (protocol nodes show the image file's length, which depends on where
/// each program allocates).
fn node_sizes(q: &mut qmp_common::Qmp) -> Vec<(String, Value)> {
    let r = q.exec("query-named-block-nodes", json!({"flat": true}));
    let mut v: Vec<(String, Value)> = r["return"]
        .as_array()
        .unwrap_or_else(|| panic!("query-named-block-nodes: {r}"))
        .iter()
        .filter(|n| n["drv"] != json!("file"))
        .map(|n| {
            (
                n["node-name"].as_str().unwrap_or("").to_owned(),
                n["image"]["virtual-size"].clone(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn blockdev_args(nodes: &[(&str, &str, &str)]) -> Vec<String> {
    let mut args = Vec::new();
    for (file, fmt, image) in nodes {
        args.push("--blockdev".to_owned());
        args.push(format!(
            "driver=file,node-name={file},filename=$DIR/{image}"
        ));
        args.push("--blockdev".to_owned());
        args.push(format!("driver={fmt},node-name={fmt}-{file},file={file}"));
    }
    args.push("--nbd-server".to_owned());
    args.push("addr.type=unix,addr.path=$DIR/nbd.sock".to_owned());
    args
}

/// What one implementation shows of a qcow2 of 1 MiB + 100 bytes and a raw
/// file of the same length: node sizes, export sizes, and the raw file's
/// length after a write to its last (partial) sector.
fn odd_sizes(kind: Impl) -> Value {
    let odd = MIB + 100;
    let args = blockdev_args(&[("fq", "qcow2", "odd.qcow2"), ("fr", "raw", "odd.raw")]);
    let inst = Instance::start(kind, &as_qemu(kind, &args), |dir| {
        qcow2_image(&dir.join("odd.qcow2"), MIB);
        patch_header_size(&dir.join("odd.qcow2"), odd);
        qmp_common::raw_image(&dir.join("odd.raw"), odd);
    });
    let mut q = inst.client();
    for (id, node) in [("q", "qcow2-fq"), ("r", "raw-fr")] {
        let r = q.exec(
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node, "writable": true}),
        );
        assert_eq!(r, json!({"return": {}}), "{kind:?} export {id}");
    }
    let q_size = nbd_size(&inst.nbd_uri("qcow2-fq"));
    let r_size = nbd_size(&inst.nbd_uri("raw-fr"));
    // The whole last sector of each export takes a write.
    qmp_common::qemu_io(
        &inst.nbd_uri("qcow2-fq"),
        &[&format!("write -P 7 {} 512", q_size - 512)],
    );
    qmp_common::qemu_io(
        &inst.nbd_uri("raw-fr"),
        &[&format!("write -P 9 {} 512", r_size - 512)],
    );
    let raw_len = std::fs::metadata(inst.path("odd.raw")).expect("stat").len();
    let nodes = node_sizes(&mut q);
    normalise(
        &json!({"nodes": nodes, "qcow2 export": q_size, "raw export": r_size,
                "raw file": raw_len}),
        inst.dir.path(),
    )
}

/// Finding 6: a qcow2 whose size is not a sector multiple is exported as
/// qemu exports it (1 MiB + 100 bytes -> 1 MiB); a raw file's partial
/// sector is rounded up, and a write to it grows the file, as in qemu.
#[test]
fn odd_virtual_sizes_are_rounded_as_qemu_rounds_them() {
    let qemu = odd_sizes(Impl::Qsd);
    assert_eq!(qemu["qcow2 export"], json!(MIB), "qemu's own rounding");
    assert_eq!(qemu["raw export"], json!(MIB + 512), "qemu's own rounding");
    assert_eq!(odd_sizes(Impl::Tidemark), qemu);
}

/// The same qcow2 through `tidemark serve` and qemu-nbd.
#[test]
fn odd_qcow2_size_matches_qemu_nbd() {
    let dir = common::temp_dir();
    let img = dir.path().join("odd.qcow2");
    qcow2_image(&img, MIB);
    patch_header_size(&img, MIB + 100);
    let opts = common::ServeOpts {
        format: Some("qcow2"),
        read_only: true,
        ..common::ServeOpts::default()
    };
    let sizes: Vec<u64> = [common::Kind::QemuNbd, common::Kind::Tidemark]
        .into_iter()
        .map(|kind| {
            let server = common::Server::start(kind, &img, &opts);
            let size = nbd_size(&server.uri());
            drop(server);
            size
        })
        .collect();
    assert_eq!(sizes, [MIB, MIB]);
    let info = tool(
        "qemu-img",
        &["info", "--output=json", img.to_str().expect("utf-8 path")],
    );
    let info: Value = serde_json::from_str(&info).expect("qemu-img info json");
    assert_eq!(info["virtual-size"], json!(MIB));
}
