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
use std::process::Command;

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

/// The bitmap names of a qcow2's directory, as the bytes on disk.
fn stored_names(path: &Path) -> Vec<Vec<u8>> {
    let img = std::fs::read(path).expect("read image");
    let be32 = |at: usize| u32::from_be_bytes(img[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().expect("8 bytes"));
    let mut at = be32(100) as usize;
    let cluster = 1usize << be32(20);
    while at + 8 <= cluster {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        if kind == 0 {
            break;
        }
        if kind == 0x2385_2875 {
            let (nb, size, off) = (be32(at + 8), be64(at + 16), be64(at + 24) as usize);
            let dir = &img[off..off + size as usize];
            let mut names = Vec::new();
            let mut e = 0;
            for _ in 0..nb {
                let name_len = u16::from_be_bytes([dir[e + 18], dir[e + 19]]) as usize;
                let extra = be32(off + e + 20) as usize;
                names.push(dir[e + 24 + extra..e + 24 + extra + name_len].to_vec());
                e += (24 + extra + name_len).div_ceil(8) * 8;
            }
            names.sort();
            return names;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Vec::new()
}

/// The node's bitmaps as query-named-block-nodes shows them.
fn shown_bitmaps(q: &mut qmp_common::Qmp, node: &str) -> Value {
    let r = q.exec("query-named-block-nodes", json!({"flat": true}));
    let nodes = r["return"].as_array().cloned().unwrap_or_default();
    let mut b = nodes
        .into_iter()
        .find(|n| n["node-name"] == json!(node))
        .unwrap_or_else(|| panic!("no node {node}: {r}"))["dirty-bitmaps"]
        .clone();
    if let Some(a) = b.as_array_mut() {
        a.sort_by_key(|x| x["name"].to_string());
    }
    b
}

/// `kind` serving node `q`, a qcow2 over `$DIR/n.qcow2` (made by
/// `setup`), with an NBD server on `$DIR/nbd.sock`.
fn start_on_image(kind: Impl, setup: &dyn Fn(&Path)) -> Instance {
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=f,filename=$DIR/n.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=q,file=f",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
    ]
    .map(str::to_owned)
    .to_vec();
    Instance::start(kind, &as_qemu(kind, &args), |dir| {
        setup(&dir.join("n.qcow2"))
    })
}

/// Runs `steps` (QMP commands) on `kind` over `image` (made by `setup` as
/// `n.qcow2`), then `quit`; returns the replies (the node's bitmaps shown
/// last) and the image as the daemon left it.
fn run_on_image(kind: Impl, setup: &dyn Fn(&Path), steps: &[Value]) -> (Vec<Value>, Vec<u8>) {
    let mut inst = start_on_image(kind, setup);
    let mut q = inst.client();
    let mut out: Vec<Value> = steps
        .iter()
        .map(|s| normalise(&q.cmd(s.clone()), inst.dir.path()))
        .collect();
    out.push(shown_bitmaps(&mut q, "q"));
    q.exec("quit", json!({}));
    assert!(
        inst.wait_exit(std::time::Duration::from_secs(20)),
        "{kind:?} did not quit"
    );
    let image = std::fs::read(inst.path("n.qcow2")).expect("read image");
    (out, image)
}

/// The images qsd and tidemark left hold the same stored names (`expect`
/// among them, in qemu's bytes), and qemu-img judges them alike.
fn same_directories(qemu_img: &[u8], our_img: &[u8], expect: &[u8]) {
    let dir = common::temp_dir();
    let (qp, tp) = (dir.path().join("qemu.qcow2"), dir.path().join("ours.qcow2"));
    std::fs::write(&qp, qemu_img).expect("write");
    std::fs::write(&tp, our_img).expect("write");
    let names = stored_names(&qp);
    assert!(
        names.contains(&expect.to_vec()),
        "{expect:?} not in {names:?}"
    );
    assert_eq!(stored_names(&tp), names);
    assert_eq!(qemu_img_accepts(&tp), qemu_img_accepts(&qp));
}

fn add(name: &str, persistent: bool) -> Value {
    json!({"execute": "block-dirty-bitmap-add",
           "arguments": {"node": "q", "name": name, "persistent": persistent}})
}

/// `qemu-img info` and `check` of an image both succeed; returns the
/// bitmap names info lists, sorted.
fn qemu_img_accepts(path: &Path) -> Vec<Value> {
    let p = path.to_str().expect("utf-8 path");
    tool("qemu-img", &["check", p]);
    let info: Value =
        serde_json::from_str(&tool("qemu-img", &["info", "--output=json", p])).expect("json");
    let mut names: Vec<Value> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| b["name"].clone())
        .collect();
    names.sort_by_key(|n| n.to_string());
    names
}

/// Finding 5: U+0000 in a name, 1023- and 1024-byte names. Replies match
/// qsd's; the image each writes holds the same name bytes (U+0000 as C0
/// 80) and opens in `qemu-img info` and `check`; each opens the other's.
#[test]
fn bitmap_names_are_qemu_bytes() {
    let x = |n: usize| "x".repeat(n);
    let steps = vec![
        add("a\0b", true),
        add("a", true),
        add("a\0b", true),
        add("a\0b", false),
        add(&x(1023), true),
        add(&format!("{}y", x(1023)), true),
        add(&format!("{}y", x(1023)), false),
        add(&format!("{}\0", x(1022)), true),
        add(&format!("{}\0", x(1022)), false),
        add(&format!("{}\0", x(1021)), true),
        add(&format!("{}\u{e9}", x(1022)), true),
        json!({"execute": "block-dirty-bitmap-remove",
               "arguments": {"node": "q", "name": "a\0"}}),
        json!({"execute": "block-dirty-bitmap-clear",
               "arguments": {"node": "q", "name": "a\0b"}}),
    ];
    let empty = |p: &Path| qcow2_image(p, MIB);
    let (qemu, qemu_img) = run_on_image(Impl::Qsd, &empty, &steps);
    let (ours, our_img) = run_on_image(Impl::Tidemark, &empty, &steps);
    for (i, (o, q)) in ours.iter().zip(&qemu).enumerate() {
        assert!(o == q, "step {i}: ours {o:.300}\nqemu's {q:.300}");
    }
    assert_eq!(ours.len(), qemu.len());
    same_directories(&qemu_img, &our_img, b"a\xc0\x80b");
    // Each reopens the image the other wrote, and shows the same names.
    let shown = |kind: Impl, img: &[u8]| {
        let img = img.to_vec();
        run_on_image(
            kind,
            &move |p: &Path| std::fs::write(p, &img).expect("write"),
            &[],
        )
        .0
    };
    let expect = shown(Impl::Qsd, &qemu_img);
    assert_eq!(shown(Impl::Tidemark, &qemu_img), expect);
    assert_eq!(shown(Impl::Tidemark, &our_img), expect);
}

/// Makes `path` a 1 MiB qcow2 holding one bitmap per name in `names`, each
/// stored under exactly those bytes (qemu-img adds placeholders of the same
/// length, which are then overwritten in the directory).
fn image_with_raw_names(path: &Path, names: &[&[u8]]) {
    qcow2_image(path, MIB);
    let p = path.to_str().expect("utf-8 path");
    let placeholders: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i}{}", "_".repeat(n.len() - 1)))
        .collect();
    for name in &placeholders {
        tool("qemu-img", &["bitmap", "--add", p, name]);
    }
    let mut img = std::fs::read(path).expect("read");
    // Every copy: qemu-img leaves earlier directories behind in the file.
    for (ph, raw) in placeholders.iter().zip(names) {
        let mut found = false;
        while let Some(at) = img.windows(ph.len()).position(|w| w == ph.as_bytes()) {
            img[at..at + raw.len()].copy_from_slice(raw);
            found = true;
        }
        assert!(found, "placeholder {ph} in the directory");
    }
    std::fs::write(path, img).expect("write");
}

/// Names qemu-img did not write but qemu reads: bytes that are not UTF-8
/// (shown with U+FFFD, kept byte for byte when the directory is written
/// again) and C0 80. Both daemons show the same, and leave the same bytes.
#[test]
fn names_that_are_not_utf8_on_disk_round_trip() {
    let raw: &[&[u8]] = &[b"a\xff\xfeb", b"c\xc0\x80d", b"e\xe2\x82", b"\xed\xa0\x80"];
    let setup = |p: &Path| image_with_raw_names(p, raw);
    let steps = vec![
        add("new", true),
        json!({"execute": "block-dirty-bitmap-remove",
               "arguments": {"node": "q", "name": "c\0d"}}),
        json!({"execute": "block-dirty-bitmap-add",
               "arguments": {"node": "q", "name": "c\0d", "persistent": true,
                             "disabled": true}}),
    ];
    let (qemu, qemu_img) = run_on_image(Impl::Qsd, &setup, &steps);
    let (ours, our_img) = run_on_image(Impl::Tidemark, &setup, &steps);
    assert_eq!(ours, qemu);
    same_directories(&qemu_img, &our_img, b"a\xff\xfeb");
}

/// Rewrites the bitmaps extension of `path` (which holds one bitmap) to a
/// directory of 65535 entries that all name that bitmap's table, appended
/// to the file.
fn share_one_table(path: &Path) {
    let mut img = std::fs::read(path).expect("read image");
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4"));
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
    let cs = 1u64 << be32(&img, 20);
    let mut at = be32(&img, 100) as usize;
    while be32(&img, at) != 0x2385_2875 {
        assert_ne!(be32(&img, at), 0, "no bitmaps extension");
        at += 8 + (be32(&img, at + 4) as usize).div_ceil(8) * 8;
    }
    let dir_at = be64(&img, at + 24) as usize;
    let first = img[dir_at..dir_at + 24].to_vec();
    let mut dir = Vec::new();
    for i in 0..65535u32 {
        let name = format!("{i:05}");
        let start = dir.len();
        dir.extend_from_slice(&first[..18]);
        dir.extend_from_slice(&(name.len() as u16).to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(name.as_bytes());
        dir.resize(start + (24 + name.len()).div_ceil(8) * 8, 0);
    }
    let dir_off = (img.len() as u64).div_ceil(cs) * cs;
    img[at + 8..at + 12].copy_from_slice(&65535u32.to_be_bytes());
    img[at + 16..at + 24].copy_from_slice(&(dir.len() as u64).to_be_bytes());
    img[at + 24..at + 32].copy_from_slice(&dir_off.to_be_bytes());
    img.resize(dir_off as usize, 0);
    img.extend_from_slice(&dir);
    std::fs::write(path, img).expect("write image");
}

/// Code review: a directory of 65535 entries sharing one 1 MiB table (a
/// 2 TiB disk at granularity 512, 4 KiB clusters) would have every table
/// read and kept: 64 GiB. tidemark refuses it at once, in little memory.
/// (qemu-img info 10.0.2 reads that table once per bitmap while it loads
/// them: after two minutes it had not finished and held 2.4 GB.)
#[test]
fn shared_bitmap_tables_are_refused_quickly() {
    let dir = common::temp_dir();
    let img = dir.path().join("shared.qcow2");
    let p = img.to_str().expect("utf-8 path");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p,
            "2T",
        ],
    );
    tool("qemu-img", &["bitmap", "--add", "-g", "512", p, "b"]);
    share_one_table(&img);
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "maxrss-kib=%M", common::TIDEMARK, "info", p]);
    let started = std::time::Instant::now();
    let out = common::output(&mut cmd);
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{}",
        common::describe_failure(&cmd, &out)
    );
    assert!(
        err.contains("the tables of bitmaps '00000' and '00001' share clusters"),
        "{err}"
    );
    let rss: u64 = err
        .split("maxrss-kib=")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rss in {err}"));
    assert!(rss < 256 << 10, "RSS {rss} KiB");
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}

/// The `qemu:dirty-bitmap:` contexts `kind` lists for an export of a
/// bitmap named "a\0b": the raw names from NBD_OPT_LIST_META_CONTEXT.
fn listed_contexts(kind: Impl) -> Vec<Vec<u8>> {
    use common::wire::{Conn, OPT_LIST_META_CONTEXT, REP_ACK, REP_META_CONTEXT};
    let mut inst = start_on_image(kind, &|p: &Path| qcow2_image(p, MIB));
    let mut q = inst.client();
    q.exec(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "a\0b"}),
    );
    let r = q.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "q", "name": "e",
               "writable": true, "bitmaps": ["a\0b"]}),
    );
    assert!(r.get("return").is_some(), "{kind:?}: {r}");
    let s = std::os::unix::net::UnixStream::connect(inst.path("nbd.sock")).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut c = Conn::new(s);
    c.start();
    let query = b"qemu:dirty-bitmap:";
    let mut data = Vec::new();
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(b"e");
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&(query.len() as u32).to_be_bytes());
    data.extend_from_slice(query);
    c.option(OPT_LIST_META_CONTEXT, &data);
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply();
        match r.rep_type {
            REP_META_CONTEXT => names.push(r.data[4..].to_vec()),
            REP_ACK => break,
            other => panic!("{kind:?}: reply {other:#x}"),
        }
    }
    drop(c);
    q.exec("quit", json!({}));
    assert!(inst.wait_exit(std::time::Duration::from_secs(20)));
    names
}

/// A bitmap named with U+0000 is offered over NBD under qemu's bytes
/// (C0 80 for the NUL), as qemu-storage-daemon offers it.
#[test]
fn a_nul_in_a_bitmap_name_reaches_nbd_as_qemus_bytes() {
    let qemu = listed_contexts(Impl::Qsd);
    assert_eq!(qemu, [b"qemu:dirty-bitmap:a\xc0\x80b".to_vec()]);
    assert_eq!(listed_contexts(Impl::Tidemark), qemu);
}
