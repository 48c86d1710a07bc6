//! Issue 4, checks 1-3: persistent qcow2 bitmaps served as
//! `qemu:dirty-bitmap:NAME`, compared with qemu-nbd `-B` on the same image.
//!
//! 1. Bitmaps made and filled by qemu-img/qemu-io read the same through
//!    tidemark and qemu-nbd (nbdinfo --map, and qemu-img map over NBD with
//!    x-dirty-bitmap), at granularities 4 KiB..4 MiB, two at a time.
//! 2. Writes through tidemark's writable export land in the stored bitmap:
//!    after a clean exit qemu-img sees flags ["auto"], check is clean, and
//!    qemu-nbd exports exactly the granules the test's model computes.
//! 3. While tidemark runs the bitmap is in use on disk; after kill -9 it
//!    stays in use, tidemark refuses it with qemu-nbd's text until removed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const M: u64 = 1 << 20;
const SIZE: u64 = 64 * M;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn qemu_img(args: &[&str]) -> String {
    run(tool("qemu-img").args(args))
}

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = tool("qemu-io");
    c.arg("-f").arg("qcow2");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(c.arg(img));
}

fn new_qcow2(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), &SIZE.to_string()]);
    img
}

fn opts(bitmaps: &[&str], read_only: bool) -> ServeOpts {
    ServeOpts {
        format: Some("qcow2"),
        bitmaps: bitmaps.iter().map(|b| b.to_string()).collect(),
        read_only,
        ..ServeOpts::default()
    }
}

/// `nbdinfo --map=qemu:dirty-bitmap:NAME` as text.
fn bitmap_map(srv: &Server, name: &str) -> String {
    run(tool("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(srv.uri()))
}

/// `qemu-img map --output=json` through qemu's NBD client with
/// x-dirty-bitmap: dirty areas read as unallocated ("data": false).
fn qemu_img_map(srv: &Server, name: &str) -> String {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        srv.socket().display()
    );
    run(tool("qemu-img").args(["map", "--output=json", "--image-opts", &opts]))
}

/// Pseudo-random (offset, len) writes inside the disk.
fn writes(seed: u64, n: usize) -> Vec<(u64, u64)> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let len = 512 * (1 + next() % 600);
            let off = 512 * (next() % ((SIZE - len) / 512));
            (off, len)
        })
        .collect()
}

fn write_cmds(w: &[(u64, u64)]) -> Vec<String> {
    w.iter().map(|(o, l)| format!("write {o} {l}")).collect()
}

/// Granule starts a set of writes dirties at `gran`.
fn granules(w: &[(u64, u64)], gran: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for &(o, l) in w {
        for g in o / gran..=(o + l - 1) / gran {
            out.insert(g);
        }
    }
    out
}

/// Dirty granules read from `nbdinfo --map --json` output.
fn dirty_granules(json: &str, gran: u64) -> BTreeSet<u64> {
    let v: Value = serde_json::from_str(json).expect("nbdinfo json");
    let mut out = BTreeSet::new();
    for e in v.as_array().expect("array") {
        if e["type"].as_u64() == Some(1) {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            assert_eq!(o % gran, 0, "extent {e} not granule aligned");
            for g in o / gran..(o + l).div_ceil(gran) {
                out.insert(g);
            }
        }
    }
    out
}

/// Compares granule sets, reporting only a few differences (a full set
/// would flood the failure message).
fn assert_same_granules(got: &BTreeSet<u64>, want: &BTreeSet<u64>, what: &str) {
    if got != want {
        let extra: Vec<_> = got.difference(want).take(10).collect();
        let missing: Vec<_> = want.difference(got).take(10).collect();
        panic!(
            "{what}: {} dirty granules, model {}; unexpected {extra:?}, missing {missing:?}",
            got.len(),
            want.len()
        );
    }
}

/// (name, flags) of the stored bitmaps as `qemu-img info` reports them.
fn qemu_flags(img: &Path, force_share: bool) -> Vec<(String, Vec<String>)> {
    let mut args = vec!["info", "--output=json"];
    if force_share {
        args.push("-U");
    }
    args.push(s(img));
    flags_of(&qemu_img(&args))
}

/// The same from `tidemark info` (which takes the same `-U`).
fn tidemark_flags(img: &Path, force_share: bool) -> Vec<(String, Vec<String>)> {
    let mut args = vec!["info"];
    if force_share {
        args.push("-U");
    }
    args.push(s(img));
    flags_of(&run(tool(TIDEMARK).args(&args)))
}

fn flags_of(info_json: &str) -> Vec<(String, Vec<String>)> {
    let v: Value = serde_json::from_str(info_json).expect("info json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect();
                    (b["name"].as_str().unwrap().to_string(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn assert_check_clean(img: &Path) {
    let out = output(tool("qemu-img").args(["check", s(img)]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "{}",
        describe_failure(Command::new("qemu-img").args(["check", s(img)]), &out)
    );
}

#[test]
fn qemu_made_bitmaps_read_the_same_as_through_qemu_nbd() {
    let dir = temp_dir();
    let pairs = [
        (4096, 65536),
        (65536, 1 << 20),
        (1 << 20, 4 << 20),
        (4 << 20, 4096),
    ];
    for (i, &(g0, g1)) in pairs.iter().enumerate() {
        let img = new_qcow2(dir.path(), &format!("c1-{i}.qcow2"));
        let a = writes(11 + i as u64, 40);
        let b = writes(97 + i as u64, 40);
        qemu_img(&["bitmap", "--add", "-g", &g0.to_string(), s(&img), "b0"]);
        qemu_io(&img, &write_cmds(&a));
        qemu_img(&["bitmap", "--add", "-g", &g1.to_string(), s(&img), "b1"]);
        qemu_img(&["bitmap", "--merge", "b0", s(&img), "b1"]);
        qemu_img(&["bitmap", "--disable", s(&img), "b0"]);
        qemu_io(&img, &write_cmds(&b));
        let before = sha256(&img);
        let mut maps = Vec::new();
        for kind in [Kind::QemuNbd, Kind::Tidemark] {
            let srv = Server::start(kind, &img, &opts(&["b0", "b1"], true));
            maps.push((
                bitmap_map(&srv, "b0"),
                bitmap_map(&srv, "b1"),
                qemu_img_map(&srv, "b0"),
                qemu_img_map(&srv, "b1"),
            ));
        }
        assert_eq!(
            maps[0], maps[1],
            "granularities {g0}/{g1}: qemu-nbd vs tidemark"
        );
        // The model agrees too: b0 holds a, b1 holds a and b.
        let srv = Server::start(Kind::Tidemark, &img, &opts(&["b0", "b1"], true));
        let json = |n: &str| {
            run(tool("nbdinfo")
                .arg("--json")
                .arg(format!("--map=qemu:dirty-bitmap:{n}"))
                .arg(srv.uri()))
        };
        assert_same_granules(&dirty_granules(&json("b0"), g0), &granules(&a, g0), "b0");
        // The merge copies b0's granules (whole ones) into b1.
        let ab: Vec<_> = granules(&a, g0)
            .iter()
            .map(|g| (g * g0, g0.min(SIZE - g * g0)))
            .chain(b.iter().copied())
            .collect();
        assert_same_granules(&dirty_granules(&json("b1"), g1), &granules(&ab, g1), "b1");
        drop(srv);
        assert_eq!(sha256(&img), before, "a read-only export changed the image");
    }
}

#[test]
fn writes_through_tidemark_are_stored_on_clean_exit() {
    let dir = temp_dir();
    for gran in [4096u64, 65536, 4 << 20] {
        let img = new_qcow2(dir.path(), &format!("c2-{gran}.qcow2"));
        qemu_img(&["bitmap", "--add", "-g", &gran.to_string(), s(&img), "b0"]);
        let w = writes(gran, 60);
        let srv = Server::start(Kind::Tidemark, &img, &opts(&["b0"], false));
        let mut c = tool("qemu-io");
        c.args(["-f", "raw"]);
        for (i, (o, l)) in w.iter().enumerate() {
            // Writes, write-zeroes and discards all mark the bitmap.
            let cmd = match i % 3 {
                0 => format!("write {o} {l}"),
                1 => format!("write -z {o} {l}"),
                _ => format!("discard {o} {l}"),
            };
            c.arg("-c").arg(cmd);
        }
        run(c.arg(srv.uri()));
        let status = srv.terminate();
        assert!(status.success(), "tidemark exited with {status}");
        assert_eq!(
            qemu_flags(&img, false),
            vec![("b0".into(), vec!["auto".into()])]
        );
        assert_check_clean(&img);
        let srv = Server::start(Kind::QemuNbd, &img, &opts(&["b0"], true));
        let json = run(tool("nbdinfo")
            .arg("--json")
            .arg("--map=qemu:dirty-bitmap:b0")
            .arg(srv.uri()));
        assert_same_granules(&dirty_granules(&json, gran), &granules(&w, gran), "b0");
    }
}

/// Runs `tidemark serve` expecting it to refuse; returns its error line.
fn tidemark_refuses(img: &Path, bitmap: &str) -> String {
    let dir = temp_dir();
    let out = output(tool(TIDEMARK).args([
        "serve",
        "-f",
        "qcow2",
        "-k",
        s(&dir.path().join("s.sock")),
        "-B",
        bitmap,
        s(img),
    ]));
    assert!(!out.status.success(), "tidemark served bitmap {bitmap}");
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find_map(|l| l.strip_prefix("tidemark: "))
        .unwrap_or_else(|| panic!("no error line in {err}"))
        .to_string()
}

fn qemu_nbd_refuses(img: &Path, bitmap: &str) -> String {
    let dir = temp_dir();
    let out = output(tool("qemu-nbd").args([
        "-f",
        "qcow2",
        "-k",
        s(&dir.path().join("s.sock")),
        "-B",
        bitmap,
        s(img),
    ]));
    assert!(!out.status.success(), "qemu-nbd served bitmap {bitmap}");
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find_map(|l| l.strip_prefix("qemu-nbd: "))
        .unwrap_or_else(|| panic!("no error line in {err}"))
        .to_string()
}

#[test]
fn crashed_bitmap_is_in_use_and_refused_until_removed() {
    let dir = temp_dir();
    let img = new_qcow2(dir.path(), "c3.qcow2");
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    qemu_img(&["bitmap", "--add", s(&img), "b1"]);
    let srv = Server::start(Kind::Tidemark, &img, &opts(&["b0"], false));
    let in_use: Vec<String> = vec!["in-use".into(), "auto".into()];
    let flags = qemu_flags(&img, true);
    assert_eq!(
        flags,
        vec![("b0".into(), in_use.clone()), ("b1".into(), in_use.clone())]
    );
    assert_eq!(tidemark_flags(&img, true), flags);
    run(tool("qemu-io")
        .args(["-f", "raw", "-c", "write 0 64k"])
        .arg(srv.uri()));
    signal(srv.pid(), libc::SIGKILL);
    drop(srv);
    assert_eq!(qemu_flags(&img, false), flags, "in use after kill -9");
    assert_eq!(tidemark_flags(&img, false), flags);
    let theirs = qemu_nbd_refuses(&img, "b0");
    assert_eq!(theirs, "Bitmap 'b0' is inconsistent and cannot be used");
    assert_eq!(tidemark_refuses(&img, "b0"), theirs);
    // Offline, too, only removal is allowed, as with qemu-img.
    let out = output(tool(TIDEMARK).args(["bitmap", "--clear", s(&img), "b0"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Operation clear on bitmap b0 failed: Bitmap 'b0' is inconsistent"));
    // A clean run keeps inconsistent bitmaps exactly as they are.
    let srv = Server::start(Kind::Tidemark, &img, &opts(&[], false));
    assert!(srv.terminate().success());
    assert_eq!(qemu_flags(&img, false), flags);
    run(tool(TIDEMARK).args(["bitmap", "--remove", s(&img), "b0"]));
    assert_eq!(qemu_flags(&img, false), vec![("b1".into(), in_use)]);
    assert_eq!(tidemark_refuses(&img, "b0"), qemu_nbd_refuses(&img, "b0"));
    assert_eq!(tidemark_refuses(&img, "b0"), "Bitmap 'b0' is not found");
    assert_check_clean(&img);
}

/// LIST_META_CONTEXT over libnbd, names in the server's order: with no
/// query, then with `qemu:`, then with `qemu:dirty-bitmap:` (a "--" line
/// between the lists).
fn listed_contexts(srv: &Server) -> Vec<String> {
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.set_opt_mode(True)\nh.connect_uri({:?})\n\
         h.opt_list_meta_context(lambda c: print(c) or 0)\n\
         for q in ['qemu:', 'qemu:dirty-bitmap:']:\n\
         \x20   print('--')\n\
         \x20   h.clear_meta_contexts()\n\
         \x20   h.add_meta_context(q)\n\
         \x20   h.opt_list_meta_context(lambda c: print(c) or 0)\n\
         h.opt_abort()\n",
        srv.uri()
    );
    run(tool(PYTHON).arg("-c").arg(script))
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bitmaps_down_the_chain_and_context_order_match_qemu_nbd() {
    let dir = temp_dir();
    let base = new_qcow2(dir.path(), "base.qcow2");
    qemu_img(&["bitmap", "--add", s(&base), "bb"]);
    qemu_io(&base, &write_cmds(&writes(5, 20)));
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_img(&["bitmap", "--add", "-g", "4096", s(&top), "tb"]);
    qemu_img(&["bitmap", "--add", "--disable", s(&top), "td"]);
    qemu_io(&top, &write_cmds(&writes(6, 20)));
    let mut seen = Vec::new();
    for kind in [Kind::QemuNbd, Kind::Tidemark] {
        let srv = Server::start(kind, &top, &opts(&["td", "bb", "tb"], false));
        seen.push((
            listed_contexts(&srv),
            bitmap_map(&srv, "bb"),
            bitmap_map(&srv, "tb"),
            bitmap_map(&srv, "td"),
        ));
        assert!(srv.terminate().success());
    }
    assert_eq!(seen[0], seen[1]);
    let bitmaps = [
        "qemu:dirty-bitmap:tb",
        "qemu:dirty-bitmap:bb",
        "qemu:dirty-bitmap:td",
    ];
    let mut want = vec!["base:allocation"];
    want.extend(bitmaps);
    want.push("--");
    want.extend(bitmaps);
    want.push("--");
    want.extend(bitmaps);
    assert_eq!(seen[1].0, want);
    assert_check_clean(&top);
    assert_check_clean(&base);
}

/// The bitmap table offset of the first directory entry of `img`.
fn first_table_offset(img: &[u8]) -> usize {
    let be32 = |at: usize| u32::from_be_bytes(img[at..at + 4].try_into().unwrap()) as usize;
    let be64 = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap()) as usize;
    let mut off = be32(100);
    while be32(off) != 0x2385_2875 {
        assert_ne!(be32(off), 0, "no bitmaps extension");
        off += 8 + be32(off + 4).div_ceil(8) * 8;
    }
    be64(be64(off + 8 + 16))
}

#[test]
fn all_ones_table_entries_read_dirty_as_in_qemu_nbd() {
    let dir = temp_dir();
    let img = dir.path().join("ones.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&img),
        "64M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "4096", s(&img), "b0"]);
    qemu_io(&img, &write_cmds(&writes(9, 30)));
    // 16384 granules = 2048 bytes = 4 table entries; entry 1 becomes "all
    // ones" (qemu never writes one, but reads it).
    let mut bytes = std::fs::read(&img).expect("read");
    let t = first_table_offset(&bytes);
    bytes[t + 8..t + 16].copy_from_slice(&1u64.to_be_bytes());
    std::fs::write(&img, &bytes).expect("write");
    let maps: Vec<String> = [Kind::QemuNbd, Kind::Tidemark]
        .iter()
        .map(|&k| bitmap_map(&Server::start(k, &img, &opts(&["b0"], true)), "b0"))
        .collect();
    assert_eq!(maps[0], maps[1]);
    assert!(maps[1].contains(&format!("{:>10} ", 16 * M)), "{}", maps[1]);
}
