//! Bitmaps that survive a crash (the intent log, src/block/qcow2/intent.rs):
//!
//! - kill -9 under load, seeded iterations: after a restart every recording
//!   bitmap is usable, a superset of every request the writer sent, and
//!   its extra bytes lie in zones first written since the last store point;
//!   a disabled bitmap is exactly as before; `qemu-img check` is clean;
//! - qemu in between: an image qemu wrote after the crash gets qemu's
//!   semantics (inconsistent bitmaps), never the stale log; without a crash
//!   qemu-img and qemu-nbd read tidemark's images as before;
//! - the switch: `--bitmap-intent-log off` is qemu's behaviour exactly.

mod common;
mod qmp_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::rng::{seed, Rng};
use common::PyScript;
use qmp_common::{Impl, Instance, Qmp};
use serde_json::{json, Value};

const SIZE: u64 = 4 << 30;
/// The log's zone size for this disk (qcow2/intent.rs: 64 MiB).
const ZONE: u64 = 64 << 20;
const GRAN: u64 = 65536;
const DEADLINE: Duration = Duration::from_secs(30);

fn qemu_img(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img")
}

fn ok_tool(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh image: recording bitmap `rec`, and `off`, disabled after
/// recording one write at 1 GiB (its bits must come back exactly).
fn make_image(dir: &Path) {
    ok_tool(
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "disk.qcow2",
                &SIZE.to_string(),
            ],
            dir,
        ),
        "create",
    );
    ok_tool(
        qemu_img(&["bitmap", "--add", "disk.qcow2", "off"], dir),
        "add off",
    );
    let out = Command::new("qemu-io")
        .args(["-c", "write 1G 64k", "disk.qcow2"])
        .current_dir(dir)
        .output()
        .expect("qemu-io");
    ok_tool(out, "qemu-io");
    ok_tool(
        qemu_img(&["bitmap", "--disable", "disk.qcow2", "off"], dir),
        "disable",
    );
    ok_tool(
        qemu_img(&["bitmap", "--add", "disk.qcow2", "rec"], dir),
        "add rec",
    );
}

fn daemon_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--blockdev",
        "driver=qcow2,node-name=disk,file.driver=file,file.filename=$DIR/disk.qcow2",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=vm,node-name=disk,name=vm,writable=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Starts tidemark on `dir`'s image (moved there by `setup`).
fn start_on(image: &Path, extra: &[&str]) -> Instance {
    let image = image.to_owned();
    Instance::start(Impl::Tidemark, &daemon_args(extra), move |d| {
        std::fs::rename(&image, d.join("disk.qcow2")).expect("move image");
    })
}

fn exec(q: &mut Qmp, cmd: &str, args: Value) -> Value {
    let r = q.exec(cmd, args.clone());
    assert!(r.get("return").is_some(), "{cmd} {args}: {r}");
    r["return"].clone()
}

/// The node's bitmaps as query-named-block-nodes lists them.
fn bitmaps(q: &mut Qmp) -> Vec<Value> {
    let nodes = exec(q, "query-named-block-nodes", json!({"flat": true}));
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["node-name"] == "disk")
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Dirty extents of `bitmap`, read over NBD (a writable export: qemu
/// exports a recording bitmap only from one; nothing writes to it).
fn dirty(q: &mut Qmp, inst: &Instance, bitmap: &str) -> Vec<(u64, u64)> {
    let id = format!("map-{bitmap}");
    exec(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": id, "node-name": "disk", "name": id,
               "writable": true, "bitmaps": [bitmap]}),
    );
    let map = qmp_common::nbd_map(&inst.nbd_uri(&id), &format!("qemu:dirty-bitmap:{bitmap}"));
    exec(q, "block-export-del", json!({"id": id}));
    map.lines()
        .filter(|l| l.contains("dirty") && !l.contains("clean"))
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 2).then(|| (f[0], f[1]))
        })
        .collect()
}

/// One granule-per-bit set over the disk, from byte ranges.
fn granules(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<bool> {
    let mut g = vec![false; (SIZE / GRAN) as usize];
    for (off, len) in ranges {
        for i in off / GRAN..(off + len).div_ceil(GRAN) {
            g[i as usize] = true;
        }
    }
    g
}

/// One request of the writer's log.
struct Request {
    index: u64,
    offset: u64,
    len: u64,
    acked: bool,
}

/// The writer's log.
fn read_log(path: &Path) -> Vec<Request> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let acked: std::collections::HashSet<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ack ")?.parse().ok())
        .collect();
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let index = w.first()?.parse().ok()?;
            (w.len() == 4).then(|| Request {
                index,
                offset: w[2].parse().unwrap_or(0),
                len: w[3].parse().unwrap_or(0),
                acked: acked.contains(&index),
            })
        })
        .collect()
}

/// The writer agent, ready for commands (its stderr in `dir`).
fn spawn_writer(dir: &Path) -> PyScript {
    let w = PyScript::spawn(
        "crash_writer.py",
        Vec::<String>::new(),
        dir.join("writer.err"),
    );
    w.expect(&["ready"], DEADLINE);
    w
}

/// How an iteration places its store point.
#[derive(Debug, Clone, Copy)]
enum Store {
    None,
    /// Completed, then more writes.
    Before,
    /// Asked for just before the kill: it may be cut short.
    During,
}

/// The first `n` bytes of an image (its header), not the whole file.
fn head(img: &Path, n: u64) -> Vec<u8> {
    use std::io::Read;
    let mut h = Vec::new();
    if let Ok(f) = std::fs::File::open(img) {
        let _ = f.take(n).read_to_end(&mut h);
    }
    h
}

/// The autoclear bits in an image's header.
fn autoclear(img: &Path) -> u64 {
    let h = head(img, 96);
    u64::from_be_bytes(h[88..96].try_into().expect("a qcow2 header"))
}

/// The zones marked in an image's intent log (read from its header), for
/// failure messages.
fn log_zones(img: &Path) -> Vec<u64> {
    let h = head(img, 65536);
    let Some(at) = h.windows(4).position(|w| w == [0x74, 0x64, 0x6d, 0x69]) else {
        return Vec::new();
    };
    let map = &h[(at + 16).min(h.len())..(at + 16 + (SIZE / ZONE / 8) as usize).min(h.len())];
    (0..map.len() as u64 * 8)
        .filter(|z| map[(z / 8) as usize] & (1 << (z % 8)) != 0)
        .collect()
}

/// One iteration: a fresh image, a writer, a kill, a restart, the checks.
fn iteration(writer: &mut PyScript, seed: u64, n: u64) {
    let mut rng = Rng(seed | 1);
    let stop = 20 + rng.next() % 300;
    let store = match rng.next() % 3 {
        0 => Store::None,
        1 => Store::Before,
        _ => Store::During,
    };
    let store_at = 1 + rng.next() % stop;
    let tmp = tempfile::tempdir().expect("tempdir");
    make_image(tmp.path());
    let mut inst = start_on(
        &tmp.path().join("disk.qcow2"),
        &["--bitmap-store-interval", "0"],
    );
    let mut q = inst.client();
    let log = inst.path("writer.log");
    let stops = match store {
        Store::None => format!("{stop}"),
        _ => format!("{} {stop}", store_at.min(stop - 1).max(1)),
    };
    writer.send(&format!(
        "run {} {} {seed} {SIZE} {stops}",
        inst.nbd_uri("vm"),
        log.display()
    ));
    // Requests acknowledged before the store point began: the store covers
    // them. Read from the writer's log before the store is asked for (the
    // writer logs each acknowledgement as it comes; replies come in any
    // order, so an old request may still be in flight).
    let mut covered = std::collections::HashSet::new();
    if !matches!(store, Store::None) {
        writer.expect(&["at "], DEADLINE);
        match store {
            Store::Before => {
                covered = read_log(&log)
                    .into_iter()
                    .filter(|r| r.acked)
                    .map(|r| r.index)
                    .collect();
                exec(&mut q, "x-tidemark-bitmap-store", json!({"node": "disk"}));
            }
            _ => {
                // Sent, not waited for: the kill may cut it short.
                let req =
                    json!({"execute": "x-tidemark-bitmap-store", "arguments": {"node": "disk"}});
                q.send_raw(format!("{req}\n").as_bytes());
            }
        }
    }
    writer.expect(&[&format!("at {stop}")], DEADLINE);
    inst.kill();
    writer.expect(&["done"], DEADLINE);
    drop(q);
    let requests = read_log(&log);
    assert!(
        requests.iter().any(|r| r.acked),
        "iteration {n}: no request was acknowledged"
    );
    let img = inst.path("disk.qcow2");
    assert_checks(
        &img,
        &format!("iteration {n} (seed {seed}), after the crash"),
    );

    let logged_zones = log_zones(&img);
    if let Ok(keep) = std::env::var("TIDEMARK_CRASH_KEEP") {
        let _ = std::fs::copy(&img, format!("{keep}/crash-{n}.qcow2"));
        let _ = std::fs::copy(&log, format!("{keep}/crash-{n}.log"));
    }
    let after = start_on(&img, &[]);
    let mut q = after.client();
    let seen = reached(writer, &after.nbd_uri("vm"), &log);
    let must: Vec<&Request> = requests
        .iter()
        .filter(|r| r.acked || seen.contains(&r.index))
        .collect();
    let list = bitmaps(&mut q);
    for b in &list {
        assert!(
            b.get("inconsistent").is_none(),
            "iteration {n} (seed {seed}, {store:?}): {b} came back inconsistent"
        );
    }
    let rec = list
        .iter()
        .find(|b| b["name"] == "rec")
        .unwrap_or_else(|| panic!("no bitmap rec: {list:?}"));
    assert_eq!(rec["recording"], true);
    assert!(rec.get("x-tidemark-recovered-bytes").is_some(), "{rec}");
    // Every request that reached the daemon is covered.
    let got = granules(dirty(&mut q, &after, "rec"));
    let want = granules(must.iter().map(|r| (r.offset, r.len)));
    for (i, (&w, &g)) in want.iter().zip(&got).enumerate() {
        assert!(
            !w || g,
            "iteration {n} (seed {seed}, {store:?}): granule at {} written but not dirty",
            i as u64 * GRAN
        );
    }
    // What is dirty beyond the requests lies in zones written since the
    // last store point (all zones written, without one).
    let recent = granules(
        requests
            .iter()
            .filter(|r| !covered.contains(&r.index))
            .map(|r| {
                let start = r.offset / ZONE * ZONE;
                let end = ((r.offset + r.len).div_ceil(ZONE) * ZONE).min(SIZE);
                (start, end - start)
            }),
    );
    let sent = granules(requests.iter().map(|r| (r.offset, r.len)));
    for (i, ((&w, &g), &z)) in sent.iter().zip(&got).zip(&recent).enumerate() {
        assert!(
            !g || w || z,
            "iteration {n} (seed {seed}, {store:?}): granule at {} dirty outside the zones written since the store point ({} requests acknowledged before it); zones in the log at the crash: {logged_zones:?}; requests in its zone: {:?}",
            i as u64 * GRAN,
            covered.len(),
            requests.iter().filter(|r| r.offset / ZONE == i as u64 * GRAN / ZONE || (r.offset + r.len - 1) / ZONE == i as u64 * GRAN / ZONE).map(|r| (r.index, r.offset, r.len, r.acked)).collect::<Vec<_>>()
        );
    }
    // The disabled bitmap is exactly as stored.
    assert_eq!(dirty(&mut q, &after, "off"), vec![(1 << 30, GRAN)]);
    exec(&mut q, "quit", json!({}));
    let mut after = after;
    assert!(after.wait_exit(DEADLINE));
    assert_checks(
        &after.path("disk.qcow2"),
        &format!("iteration {n}, after recovery"),
    );
}

/// `qemu-img check` finds no corruption (0: clean; 3: leaked clusters
/// only, which a crash may leave).
fn assert_checks(img: &Path, when: &str) {
    let dir = img.parent().unwrap_or(Path::new("."));
    let check = qemu_img(&["check", img.to_str().unwrap_or("")], dir);
    assert!(
        matches!(check.status.code(), Some(0) | Some(3)),
        "{when}: qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// The unacknowledged writes of `log` whose data reached the disk served
/// at `uri` (their stamp is there): they must be covered too. Requests
/// neither acknowledged nor seen may never have reached the daemon.
fn reached(writer: &mut PyScript, uri: &str, log: &Path) -> std::collections::HashSet<u64> {
    writer.send(&format!("seen {uri} {}", log.display()));
    let seen = writer
        .expect(&["seen"], DEADLINE)
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    writer.expect(&["end"], DEADLINE);
    seen
}

#[test]
fn kill_9_under_load_leaves_every_recording_bitmap_a_superset() {
    let iterations: u64 = std::env::var("TIDEMARK_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let base = seed(20261130);
    eprintln!("seed {base} (TIDEMARK_SEED), {iterations} iterations");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut writer = spawn_writer(logs.path());
    for n in 0..iterations {
        iteration(
            &mut writer,
            base.wrapping_add(n.wrapping_mul(0x9e37_79b9)),
            n,
        );
    }
    writer.send("quit");
}

/// Writes through `inst`'s export with qemu-io, then kills it (a crash).
fn write_then_crash(inst: &mut Instance, cmds: &[&str]) {
    qmp_common::qemu_io(&inst.nbd_uri("vm"), cmds);
    inst.kill();
}

fn info_json(img: &Path) -> Value {
    let out = Command::new(qmp_common::TIDEMARK)
        .args(["info", "--output=json"])
        .arg(img)
        .output()
        .expect("tidemark info");
    serde_json::from_str(&ok_tool(out, "tidemark info")).expect("info json")
}

fn stored_flags(img: &Path, name: &str) -> Vec<String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(img)
        .output()
        .expect("qemu-img info");
    let v: Value = serde_json::from_str(&ok_tool(out, "qemu-img info")).expect("json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == name)
        .map(|b| {
            b["flags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn qemu_writing_after_a_crash_gets_qemus_semantics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_image(tmp.path());
    let mut inst = start_on(&tmp.path().join("disk.qcow2"), &[]);
    write_then_crash(&mut inst, &["write 3G 64k"]);
    let img = inst.path("disk.qcow2");
    // Crashed: in use on disk, and the log covers it.
    assert_eq!(stored_flags(&img, "rec"), vec!["in-use", "auto"]);
    let info = info_json(&img);
    let rec = &info["format-specific"]["data"]["bitmaps"][1];
    assert_eq!(rec["name"], "rec", "{info}");
    assert_eq!(rec["x-tidemark-recoverable-bytes"], ZONE, "{info}");
    // qemu writes the image: it clears the log's autoclear bit, so the
    // log is stale from then on.
    let out = Command::new("qemu-io")
        .args(["-c", "write 2G 4k"])
        .arg(&img)
        .output()
        .expect("qemu-io");
    ok_tool(out, "qemu-io");
    assert!(info_json(&img)["format-specific"]["data"]["bitmaps"][1]
        .get("x-tidemark-recoverable-bytes")
        .is_none());
    let after = start_on(&img, &[]);
    let mut q = after.client();
    let list = bitmaps(&mut q);
    let rec = list.iter().find(|b| b["name"] == "rec").expect("rec");
    assert_eq!(rec["inconsistent"], true, "{rec}");
    assert!(rec.get("x-tidemark-recovered-bytes").is_none(), "{rec}");
    // As in qemu, an inconsistent bitmap can only be removed.
    exec(
        &mut q,
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "rec"}),
    );
    exec(&mut q, "quit", json!({}));
}

#[test]
fn without_a_crash_qemu_reads_the_image_as_before() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_image(tmp.path());
    let inst = start_on(&tmp.path().join("disk.qcow2"), &[]);
    let mut q = inst.client();
    qmp_common::qemu_io(&inst.nbd_uri("vm"), &["write 5M 64k", "write 3G 4k"]);
    let ours = qmp_common::nbd_map(
        &{
            exec(
                &mut q,
                "block-export-add",
                json!({"type": "nbd", "id": "m", "node-name": "disk", "name": "m",
                   "writable": true, "bitmaps": ["rec"]}),
            );
            inst.nbd_uri("m")
        },
        "qemu:dirty-bitmap:rec",
    );
    exec(&mut q, "quit", json!({}));
    let mut inst = inst;
    assert!(inst.wait_exit(DEADLINE));
    let img = inst.path("disk.qcow2");
    let dir = inst.dir.path();
    // Closed cleanly: no log left, flags as qemu leaves them.
    assert_eq!(stored_flags(&img, "rec"), vec!["auto"]);
    assert_eq!(autoclear(&img), 1, "only the bitmaps bit");
    let check = qemu_img(&["check", "disk.qcow2"], dir);
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    // qemu-nbd -B exports the same bits tidemark stored.
    let sock = dir.join("qemu-nbd.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", "rec", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .expect("qemu-nbd");
    let deadline = Instant::now() + DEADLINE;
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::yield_now();
    }
    let theirs = qmp_common::nbd_map(
        &format!("nbd+unix:///?socket={}", sock.display()),
        "qemu:dirty-bitmap:rec",
    );
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert_eq!(ours, theirs);
    ok_tool(
        qemu_img(&["bitmap", "--remove", "disk.qcow2", "rec"], dir),
        "remove",
    );
    assert_eq!(
        qemu_img(&["check", "disk.qcow2"], dir).status.code(),
        Some(0)
    );
}

#[test]
fn with_the_log_off_a_crash_is_what_it_is_in_qemu() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_image(tmp.path());
    let mut inst = start_on(
        &tmp.path().join("disk.qcow2"),
        &["--bitmap-intent-log", "off"],
    );
    write_then_crash(&mut inst, &["write 3G 64k"]);
    let img = inst.path("disk.qcow2");
    assert_eq!(autoclear(&img), 1, "no log: only the bitmaps bit");
    // Restarted with the log on: nothing to recover from, qemu's rule.
    let after = start_on(&img, &[]);
    let mut q = after.client();
    for b in bitmaps(&mut q) {
        assert_eq!(b["inconsistent"], true, "{b}");
    }
    exec(&mut q, "quit", json!({}));
}

#[test]
fn periodic_store_points_under_load_lose_no_bits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_image(tmp.path());
    let mut inst = start_on(
        &tmp.path().join("disk.qcow2"),
        &["--bitmap-store-interval", "1"],
    );
    let logs = tempfile::tempdir().expect("tempdir");
    let mut writer = spawn_writer(logs.path());
    let log = inst.path("writer.log");
    // Long enough for store points to happen while it writes: the
    // image's header shows each one (the directory moves).
    writer.send(&format!(
        "run {} {} 7 {SIZE} 100 100000",
        inst.nbd_uri("vm"),
        log.display()
    ));
    writer.expect(&["at 100"], DEADLINE);
    let img = inst.path("disk.qcow2");
    let dir_offset = || {
        let h = head(&img, 4096);
        h.windows(4)
            .position(|w| w == [0x23, 0x85, 0x28, 0x75])
            .and_then(|at| h.get(at + 24..at + 32))
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let first = dir_offset();
    let mut moves = 0;
    let deadline = Instant::now() + DEADLINE;
    let mut last = first;
    while moves < 2 {
        assert!(Instant::now() < deadline, "no periodic store point");
        let now = dir_offset();
        if now != last {
            moves += 1;
            last = now;
        }
        std::thread::yield_now();
    }
    inst.kill();
    writer.expect(&["done"], DEADLINE);
    let after = start_on(&img, &[]);
    let mut q = after.client();
    let seen = reached(&mut writer, &after.nbd_uri("vm"), &log);
    let requests = read_log(&log);
    let want = granules(
        requests
            .iter()
            .filter(|r| r.acked || seen.contains(&r.index))
            .map(|r| (r.offset, r.len)),
    );
    let got = granules(dirty(&mut q, &after, "rec"));
    for (i, (&w, &g)) in want.iter().zip(&got).enumerate() {
        assert!(
            !w || g,
            "granule at {} written but not dirty",
            i as u64 * GRAN
        );
    }
    exec(&mut q, "quit", json!({}));
    writer.send("quit");
}
