//! qcow2 interop with qemu's own tools: images qemu writes read the same in
//! tidemark, images tidemark writes pass `qemu-img check` and compare equal
//! to the same workload done by qemu-io. Skipped (with a note) where
//! qemu-img is not installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use tidemark::block::open::{open_image, Format};
use tidemark::block::qcow2::create::{create_qcow2, CreateOptions};
use tidemark::block::{BlockNode, ErrorKind, ZeroFlags};

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("qemu-img not installed: skipping");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{} {:?} failed: {}{}",
        cmd,
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let mut child = Command::new("qemu-io")
        .args(["-f", fmt, img.to_str().expect("utf8")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().expect("stdin");
        for c in cmds {
            writeln!(stdin, "{}", c).expect("feed");
        }
    }
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-io failed: {}", text);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io reported: {}",
        text
    );
}

fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

/// Every byte of `img` as qemu reads it.
fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = p(dir, "qemu-view.raw");
    run("qemu-img", &["convert", "-O", "raw", s(img), s(&out)]);
    std::fs::read(&out).expect("read converted")
}

fn read_all(node: &dyn BlockNode) -> Vec<u8> {
    let mut buf = vec![0u8; node.size() as usize];
    // Odd-sized chunks cross cluster boundaries on purpose.
    let step = 123_457usize;
    let mut at = 0;
    while at < buf.len() {
        let n = step.min(buf.len() - at);
        node.read_at(&mut buf[at..at + n], at as u64).expect("read");
        at += n;
    }
    buf
}

/// Runs of (start, length, value).
type Runs = Vec<(u64, u64, u32)>;
/// A damage applied to a sample image.
type Damage = Box<dyn Fn(&Path)>;

fn have_qemu_nbd() -> bool {
    let ok = ["qemu-nbd", "nbdinfo"].iter().all(|c| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    if !ok {
        eprintln!("qemu-nbd or nbdinfo not installed: skipping the map comparison");
    }
    ok
}

/// (base:allocation runs, qemu:allocation-depth runs) as `qemu-nbd -A`
/// serves them, read with `nbdinfo --map`.
fn qemu_nbd_map(img: &Path, dir: &Path) -> (Runs, Runs) {
    let sock = p(dir, "qemu-nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut server = Command::new("qemu-nbd")
        .args(["-A", "-r", "-t", "-f", "qcow2", "-k", s(&sock), s(img)])
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    let read = |ctx: &str| -> Runs {
        let out = run("nbdinfo", &["--json", &format!("--map={}", ctx), &uri]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let mut runs = Vec::new();
        for e in v.as_array().expect("array") {
            let start = e["offset"].as_u64().expect("offset");
            let len = e["length"].as_u64().expect("length");
            push_run(
                &mut runs,
                start,
                len,
                e["type"].as_u64().expect("type") as u32,
            );
        }
        runs
    };
    let flags = read("base:allocation");
    let depth = read("qemu:allocation-depth");
    let _ = server.kill();
    let _ = server.wait();
    (flags, depth)
}

fn push_run(v: &mut Runs, start: u64, len: u64, val: u32) {
    if let Some(last) = v.last_mut() {
        if last.2 == val && last.0 + last.1 == start {
            last.1 += len;
            return;
        }
    }
    v.push((start, len, val));
}

fn our_map(node: &dyn BlockNode) -> (Runs, Runs) {
    let mut flags = Vec::new();
    let mut depth = Vec::new();
    let size = node.size();
    let mut at = 0;
    while at < size {
        let e = node.block_status(at, size - at).expect("status");
        assert!(e.len > 0);
        push_run(&mut flags, at, e.len, e.flags);
        at += e.len;
    }
    at = 0;
    while at < size {
        let e = node.allocation_depth(at, size - at).expect("depth");
        assert!(e.len > 0);
        push_run(&mut depth, at, e.len, e.depth);
        at += e.len;
    }
    (flags, depth)
}

fn check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(img)])
        .output()
        .expect("qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check failed on {}: {}{}",
        img.display(),
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("check json");
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v[key].as_u64().unwrap_or(0), 0, "{}: {}", key, text);
    }
}

/// A 3-deep chain over a raw base with data, zero clusters, discards,
/// unaligned writes; then the same through a compressed copy.
fn build_chain(dir: &Path, cs: u64, compat: &str) -> PathBuf {
    // The raw base is shorter than the overlays above it.
    let base = p(dir, "base.raw");
    run("qemu-img", &["create", "-f", "raw", s(&base), "3M"]);
    qemu_io(
        &base,
        "raw",
        &["write -P 0x11 0 1M".into(), "write -P 0x12 2M 4096".into()],
    );
    let mid = p(dir, "mid.qcow2");
    let opts = format!("cluster_size={},compat={}", cs, compat);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
            "4M",
        ],
    );
    let mut cmds = vec![
        "write -P 0x21 512k 700k".to_string(),
        "write -P 0x22 2M 100000".to_string(),
        "write -z 256k 128k".to_string(),
    ];
    if compat.starts_with("1.1") {
        cmds.push("discard 1536k 256k".into());
    }
    qemu_io(&mid, "qcow2", &cmds);
    let top = p(dir, "top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x31 1000 5000".into(),
            "write -P 0x32 3500k 64k".into(),
            "write -z 600k 2k".into(),
        ],
    );
    top
}

fn open(path: &Path, read_only: bool) -> Arc<dyn BlockNode> {
    // Another test thread may be forking a child just now: until it execs,
    // it shares our last file handle on the image, and with it the locks.
    for _ in 0..40 {
        match open_image(path, None, read_only) {
            Err(e) if e.kind == ErrorKind::Permission => {
                std::thread::sleep(std::time::Duration::from_millis(25))
            }
            r => return r.expect("open"),
        }
    }
    open_image(path, None, read_only).expect("open")
}

#[test]
fn qcow2_chains_read_and_map_like_qemu() {
    if !have_qemu() {
        return;
    }
    for (cs, compat) in [
        (65536, "1.1"),
        (512, "1.1"),
        (2 << 20, "1.1"),
        (65536, "0.10"),
        (65536, "1.1,extended_l2=on"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = build_chain(dir.path(), cs, compat);
        let node = open(&top, true);
        let ours = read_all(node.as_ref());
        assert!(
            ours == qemu_raw(&top, dir.path()),
            "data differs (cs {} {})",
            cs,
            compat
        );
        if !have_qemu_nbd() {
            continue;
        }
        let (qf, qd) = qemu_nbd_map(&top, dir.path());
        let (of, od) = our_map(node.as_ref());
        assert_eq!(of, qf, "base:allocation differs (cs {} {})", cs, compat);
        assert_eq!(od, qd, "allocation depth differs (cs {} {})", cs, compat);
    }
}

#[test]
fn qcow2_compressed_images_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    for ctype in ["zlib", "zstd"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = build_chain(dir.path(), 65536, "1.1");
        let packed = p(dir.path(), "packed.qcow2");
        let opts = format!("compression_type={}", ctype);
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &opts,
                s(&top),
                s(&packed),
            ],
        );
        let node = open(&packed, true);
        assert!(
            read_all(node.as_ref()) == qemu_raw(&packed, dir.path()),
            "{}",
            ctype
        );
        drop(node);
        // A standalone image with compressed clusters, a zero cluster and
        // holes; then overwrite parts of compressed clusters (COW + free).
        qemu_io(
            &packed,
            "qcow2",
            &["write -z 1M 64k".into(), "discard 2M 64k".into()],
        );
        let node = open(&packed, true);
        assert!(read_all(node.as_ref()) == qemu_raw(&packed, dir.path()));
        if have_qemu_nbd() {
            let ours = our_map(node.as_ref());
            assert_eq!(ours, qemu_nbd_map(&packed, dir.path()), "{}", ctype);
        }
        drop(node);
        let before = qemu_raw(&packed, dir.path());
        let w = 700 * 1024 + 17;
        let node = open(&packed, false);
        node.write_at(&[9u8; 1000], w as u64, false)
            .expect("write into compressed");
        node.discard(64 << 10, 128 << 10)
            .expect("discard compressed");
        drop(node);
        check_clean(&packed);
        let after = qemu_raw(&packed, dir.path());
        assert!(after[w..w + 1000].iter().all(|&b| b == 9));
        assert_eq!(after[w - 4000..w], before[w - 4000..w], "COW kept the rest");
        assert!(after[64 << 10..192 << 10].iter().all(|&b| b == 0));
        let node = open(&packed, true);
        assert!(read_all(node.as_ref()) == after);
    }
}

/// A tiny deterministic generator (xorshift64*) so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_workload(cs: u64, seed: u64, ops: usize) {
    random_workload_with(&format!("cluster_size={}", cs), cs, seed, ops);
}

fn random_workload_with(opts: &str, cs: u64, seed: u64, ops: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let size: u64 = 8 << 20;
    let base = p(d, "base.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", s(&base), &size.to_string()],
    );
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x5a 0 3M".into(), "write -P 0x5b 5M 1M".into()],
    );
    let ours = p(d, "ours.qcow2");
    let theirs = p(d, "theirs.qcow2");
    for img in [&ours, &theirs] {
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                s(img),
            ],
        );
    }
    let mut rng = Rng(seed | 1);
    let mut cmds = Vec::new();
    {
        let node = open(&ours, false);
        for _ in 0..ops {
            let kind = rng.below(10);
            let max = if rng.below(4) == 0 {
                3 * cs + 5000
            } else {
                9000
            };
            let len = 1 + rng.below(max.min(size));
            let off = rng.below(size - len);
            match kind {
                0..=5 => {
                    let byte = (rng.below(255) + 1) as u8;
                    node.write_at(&vec![byte; len as usize], off, false)
                        .expect("write");
                    cmds.push(format!("write -P {} {} {}", byte, off, len));
                }
                6 | 7 => {
                    let unmap = rng.below(2) == 0;
                    let flags = ZeroFlags {
                        may_unmap: unmap,
                        fast: false,
                    };
                    node.write_zeroes(off, len, flags).expect("zero");
                    cmds.push(format!(
                        "write -z {}{} {}",
                        if unmap { "-u " } else { "" },
                        off,
                        len
                    ));
                }
                8 => {
                    node.discard(off, len).expect("discard");
                    cmds.push(format!("discard {} {}", off, len));
                }
                _ => {
                    node.flush().expect("flush");
                    cmds.push("flush".into());
                }
            }
        }
    }
    qemu_io(&theirs, "qcow2", &cmds);
    check_clean(&ours);
    let out = Command::new("qemu-img")
        .args(["compare", s(&ours), s(&theirs)])
        .output()
        .expect("compare");
    assert!(
        out.status.success(),
        "cs {} seed {}: {}",
        cs,
        seed,
        String::from_utf8_lossy(&out.stdout)
    );
    // And tidemark reads its own image as qemu does.
    let node = open(&ours, true);
    assert!(
        read_all(node.as_ref()) == qemu_raw(&ours, d),
        "cs {} seed {}",
        cs,
        seed
    );
    // Allocation matches too: zeroes and discards were done the qemu way.
    if have_qemu_nbd() {
        drop(node);
        let (qf, qd) = qemu_nbd_map(&theirs, d);
        let (of, od) = qemu_nbd_map(&ours, d);
        assert_eq!(of, qf, "base:allocation, cs {} seed {}", cs, seed);
        assert_eq!(od, qd, "allocation depth, cs {} seed {}", cs, seed);
        // And tidemark reports its image as qemu-nbd reports it.
        let node = open(&ours, true);
        let (tf, td) = our_map(node.as_ref());
        assert_eq!(tf, of, "our base:allocation, cs {} seed {}", cs, seed);
        assert_eq!(td, od, "our allocation depth, cs {} seed {}", cs, seed);
    }
}

#[test]
fn qcow2_random_writes_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    for (i, cs) in [512u64, 4096, 65536, 2 << 20].into_iter().enumerate() {
        random_workload(cs, 0x7164_6d72 + i as u64, 150);
    }
}

#[test]
fn qcow2_random_writes_match_qemu_io_on_v2_and_odd_refcount_widths() {
    if !have_qemu() {
        return;
    }
    random_workload_with("cluster_size=65536,compat=0.10", 65536, 41, 150);
    for bits in [1, 8, 64] {
        let opts = format!("cluster_size=4096,refcount_bits={}", bits);
        random_workload_with(&opts, 4096, 42 + bits, 150);
    }
}

#[test]
fn qcow2_concurrent_writers_leave_a_clean_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = p(dir.path(), "c.qcow2");
    create_qcow2(
        &img,
        &CreateOptions {
            size: Some(16 << 20),
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .expect("create");
    let node = open(&img, false);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let node = node.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(t + 11);
                for i in 0..200u64 {
                    // Each thread owns its own 4 MiB stripe.
                    let off = t * (4 << 20) + rng.below((4 << 20) - 70000);
                    let len = 1 + rng.below(65536);
                    match i % 7 {
                        5 => node.discard(off, len).expect("discard"),
                        6 => node
                            .write_zeroes(off, len, ZeroFlags::default())
                            .expect("zero"),
                        _ => node
                            .write_at(&vec![t as u8 + 1; len as usize], off, false)
                            .expect("write"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let data = read_all(node.as_ref());
    drop(node);
    check_clean(&img);
    assert!(data == qemu_raw(&img, dir.path()));
}

#[test]
fn qcow2_locks_exclude_qemu_writers() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = p(dir.path(), "l.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "1M"]);
    // tidemark holds it writable: qemu-io may not write it.
    let node = open(&img, false);
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 512", s(&img)])
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lock"), "qemu-io was not refused: {}", text);
    drop(node);
    // qemu-io holds it writable: tidemark may not open it.
    let mut child = Command::new("qemu-io")
        .arg(s(&img))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    {
        use std::io::{BufRead, Write};
        let stdin = child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "write 0 512").expect("feed");
        stdin.flush().expect("flush");
        // Once qemu-io has written, it holds its locks.
        let mut lines = std::io::BufReader::new(child.stdout.as_mut().expect("stdout")).lines();
        for line in lines.by_ref() {
            if line.expect("line").contains("wrote") {
                break;
            }
        }
    }
    let refused = match open_image(&img, Some(Format::Qcow2), false) {
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::Permission, "{}", e);
            assert!(e.to_string().contains("lock"), "{}", e);
            true
        }
        Ok(_) => false,
    };
    drop(child.stdin.take());
    let _ = child.wait();
    assert!(
        refused,
        "tidemark opened an image qemu-io holds for writing"
    );
    drop(open(&img, false));
}

/// The fields of `qemu-img info --output=json` that do not depend on the
/// host (actual-size does).
fn info_fields(img: &Path) -> serde_json::Value {
    let out = run("qemu-img", &["info", "--output=json", s(img)]);
    let mut v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let o = v.as_object_mut().expect("object");
    for k in [
        "actual-size",
        "children",
        "filename",
        "full-backing-filename",
    ] {
        o.remove(k);
    }
    v
}

#[test]
fn qcow2_create_matches_qemu_img_create() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(
        "qemu-img",
        &["create", "-f", "raw", s(&p(d, "base.raw")), "3M"],
    );
    let cases: Vec<(Vec<&str>, CreateOptions)> = vec![
        (
            vec!["-o", "cluster_size=65536"],
            CreateOptions {
                size: Some(64 << 20),
                ..Default::default()
            },
        ),
        (
            vec!["-o", "cluster_size=512"],
            CreateOptions {
                size: Some(1 << 30),
                cluster_size: 512,
                ..Default::default()
            },
        ),
        (
            vec!["-o", "cluster_size=2M,compat=0.10"],
            CreateOptions {
                size: Some(10 << 30),
                cluster_size: 2 << 20,
                compat_v2: true,
                ..Default::default()
            },
        ),
        (
            vec!["-b", "base.raw", "-F", "raw"],
            CreateOptions {
                size: None,
                backing_file: Some("base.raw".into()),
                backing_format: Some("raw".into()),
                ..Default::default()
            },
        ),
        (
            vec!["-o", "cluster_size=4096"],
            CreateOptions {
                size: Some(1 << 40),
                cluster_size: 4096,
                ..Default::default()
            },
        ),
    ];
    for (i, (args, opts)) in cases.into_iter().enumerate() {
        let theirs = p(d, &format!("q{}.qcow2", i));
        let ours = p(d, &format!("t{}.qcow2", i));
        let mut a = vec!["create", "-f", "qcow2"];
        a.extend(args);
        a.push(s(&theirs));
        let size = opts.size.map(|v| v.to_string());
        if let Some(sz) = &size {
            a.push(sz);
        }
        run("qemu-img", &a);
        create_qcow2(&ours, &opts).expect("create");
        check_clean(&ours);
        assert_eq!(info_fields(&ours), info_fields(&theirs), "case {}", i);
        // Our info agrees with qemu-img's too.
        let mine = tidemark::info::image_info(&ours, None).expect("info");
        let mut v = serde_json::to_value(&mine).expect("json");
        let o = v.as_object_mut().expect("object");
        for k in ["actual-size", "filename", "full-backing-filename"] {
            o.remove(k);
        }
        assert_eq!(v, info_fields(&theirs), "info case {}", i);
        // And the new image takes writes that qemu then trusts.
        let node = open(&ours, false);
        node.write_at(&[7u8; 3000], 1000, true).expect("write");
        drop(node);
        check_clean(&ours);
    }
}

#[test]
fn qcow2_refcount_table_growth_stays_clean() {
    if !have_qemu() {
        return;
    }
    // 512-byte clusters: one refcount table cluster covers only 8 MiB.
    let dir = tempfile::tempdir().expect("tempdir");
    let img = p(dir.path(), "g.qcow2");
    create_qcow2(
        &img,
        &CreateOptions {
            size: Some(64 << 20),
            cluster_size: 512,
            ..Default::default()
        },
    )
    .expect("create");
    let node = open(&img, false);
    let mut rng = Rng(99);
    for i in 0..40u64 {
        let off = rng.below(60 << 20);
        node.write_at(&vec![(i + 1) as u8; 600_000], off, false)
            .expect("write");
    }
    let data = read_all(node.as_ref());
    drop(node);
    check_clean(&img);
    assert!(data == qemu_raw(&img, dir.path()));
}

/// Bytes of a fresh 64 KiB-cluster image with one data cluster at 64 KiB
/// guest offset: header, reftable at 0x10000, refblock 0x20000, L1 0x30000,
/// L2 0x40000, data 0x50000.
fn sample_image(d: &Path) -> PathBuf {
    let img = p(d, "s.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "4M"]);
    qemu_io(&img, "qcow2", &["write -P 0x44 64k 64k".into()]);
    img
}

fn patch(img: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open");
    f.write_all_at(bytes, at).expect("patch");
}

/// Opening and reading everything gives an error, never a panic or garbage.
fn expect_refused(img: &Path, what: &str) {
    let r = open_image(img, Some(Format::Qcow2), true).and_then(|n| {
        let mut buf = vec![0u8; n.size() as usize];
        n.read_at(&mut buf, 0)?;
        n.block_status(0, n.size())?;
        Ok(())
    });
    let e = r.expect_err(what);
    assert!(!e.to_string().is_empty(), "{}", what);
}

#[test]
fn qcow2_corrupt_images_give_clear_errors() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cases: Vec<(&str, Damage)> = vec![
        (
            "truncated header",
            Box::new(|i: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(i)
                    .expect("o")
                    .set_len(50)
                    .expect("t")
            }),
        ),
        (
            "truncated data",
            Box::new(|i: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(i)
                    .expect("o")
                    .set_len(0x50000)
                    .expect("t")
            }),
        ),
        (
            "L1 past EOF",
            Box::new(|i: &Path| patch(i, 40, &(1u64 << 40).to_be_bytes())),
        ),
        (
            "L1 unaligned",
            Box::new(|i: &Path| patch(i, 40, &0x30200u64.to_be_bytes())),
        ),
        (
            "L2 pointer past EOF",
            Box::new(|i: &Path| {
                patch(
                    i,
                    0x30000,
                    &(0x8000_0000_0000_0000u64 | 1 << 40).to_be_bytes(),
                )
            }),
        ),
        (
            "L2 pointer unaligned",
            Box::new(|i: &Path| patch(i, 0x30000, &0x8000_0000_0004_0200u64.to_be_bytes())),
        ),
        (
            "data pointer unaligned",
            Box::new(|i: &Path| patch(i, 0x40008, &0x8000_0000_0005_0100u64.to_be_bytes())),
        ),
        (
            "refcount table past EOF",
            Box::new(|i: &Path| patch(i, 48, &(1u64 << 40).to_be_bytes())),
        ),
        (
            "refcount table absurd",
            Box::new(|i: &Path| patch(i, 56, &u32::MAX.to_be_bytes())),
        ),
        (
            "header length absurd",
            Box::new(|i: &Path| patch(i, 100, &0x7fff_fff8u32.to_be_bytes())),
        ),
        (
            "cluster bits absurd",
            Box::new(|i: &Path| patch(i, 20, &40u32.to_be_bytes())),
        ),
        (
            "l1 size absurd",
            Box::new(|i: &Path| patch(i, 36, &u32::MAX.to_be_bytes())),
        ),
        (
            "virtual size beyond L1",
            Box::new(|i: &Path| patch(i, 24, &(1u64 << 50).to_be_bytes())),
        ),
        (
            "unknown incompatible feature",
            Box::new(|i: &Path| patch(i, 72, &(1u64 << 40).to_be_bytes())),
        ),
    ];
    for (what, damage) in cases {
        let img = sample_image(d);
        damage(&img);
        expect_refused(&img, what);
    }
    // A corrupt image is not opened for writing; read-only still works.
    let img = sample_image(d);
    patch(&img, 72, &2u64.to_be_bytes());
    let e = open_image(&img, None, false).err().expect("corrupt bit");
    assert_eq!(e.kind, ErrorKind::Corrupt);
    // Read-only still works (through `open`, which rides out the fork race).
    let ro = open(&img, true);
    assert!(ro.read_only());
    drop(ro);
    // The L2 table's refcount says "free": the next allocation would land
    // on it. The write is refused and the image marked corrupt instead.
    let img = sample_image(d);
    patch(&img, 0x20000 + 2 * 4, &0u16.to_be_bytes());
    let node = open(&img, false);
    let e = node
        .write_at(&[1u8; 512], 3 << 20, false)
        .expect_err("allocation over metadata must fail");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{}", e);
    let mut buf = vec![0u8; 512];
    node.read_at(&mut buf, 64 << 10).expect("reads still work");
    assert_eq!(buf, vec![0x44u8; 512]);
    drop(node);
    assert!(open_image(&img, None, false).is_err(), "marked corrupt");
    // A data cluster mapped onto the L1 table: the in-place write is
    // refused instead of overwriting metadata.
    let img = sample_image(d);
    patch(&img, 0x40008, &0x8000_0000_0003_0000u64.to_be_bytes());
    let node = open(&img, false);
    let e = node
        .write_at(&[1u8; 512], 64 << 10, false)
        .expect_err("write over the L1 table must fail");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{}", e);
    let mut buf = vec![0u8; 512];
    node.read_at(&mut buf, 64 << 10).expect("reads still work");
    drop(node);
    assert!(open_image(&img, None, false).is_err(), "marked corrupt");
}

#[test]
fn qcow2_backing_loops_and_missing_backings_are_errors() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let a = p(d, "a.qcow2");
    let b = p(d, "b.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&a), "1M"]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            s(&b),
        ],
    );
    // Point a at b: a loop qemu-img itself would refuse to create.
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&a),
        ],
    );
    let e = open_image(&b, None, true).err().expect("loop");
    assert!(e.to_string().contains("loop"), "{}", e);
    assert!(tidemark::info::chain_info(&b, None).is_err());
    let c = p(d, "c.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nowhere.qcow2",
            "-F",
            "qcow2",
            s(&c),
            "1M",
        ],
    );
    let e = open_image(&c, None, true).err().expect("missing");
    assert!(
        e.to_string().contains("Could not open backing file"),
        "{}",
        e
    );
}

#[test]
fn qcow2_partial_writes_to_new_clusters_map_like_qemu_nbd() {
    if !have_qemu() || !have_qemu_nbd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = p(dir.path(), "n.qcow2");
    for cs in [65536u64, 2 << 20] {
        create_qcow2(
            &img,
            &CreateOptions {
                size: Some(16 << 20),
                cluster_size: cs,
                ..Default::default()
            },
        )
        .expect("create");
        let node = open(&img, false);
        node.write_at(&[3u8; 4096], 8192, false).expect("write");
        node.write_at(&[4u8; 100], (5 << 20) + 7, false)
            .expect("write");
        drop(node);
        check_clean(&img);
        let node = open(&img, true);
        assert_eq!(
            our_map(node.as_ref()),
            qemu_nbd_map(&img, dir.path()),
            "cs {}",
            cs
        );
    }
    // Metadata preallocation: every cluster mapped, the host file sparse.
    let img = p(dir.path(), "pre.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            s(&img),
            "8M",
        ],
    );
    let node = open(&img, false);
    node.write_at(&[6u8; 5000], 70_000, false).expect("write");
    drop(node);
    check_clean(&img);
    let node = open(&img, true);
    assert_eq!(
        our_map(node.as_ref()),
        qemu_nbd_map(&img, dir.path()),
        "preallocated"
    );
}

#[test]
fn qcow2_images_with_bitmaps_keep_them_across_a_read_write_open() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = p(dir.path(), "b.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "4M"]);
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    let driver = open_image(&img, None, false).expect("open read-write");
    let node = tidemark::block::node::Node::open("n", driver).expect("node");
    node.write_at(&[1; 4096], 0, false).expect("write");
    node.store_bitmaps().expect("clean close");
    drop(node);
    let info = run("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"b0\""), "{}", info);
    assert!(!info.contains("in-use"), "{}", info);
    check_clean(&img);
}

#[test]
fn qcow2_overlapping_concurrent_requests_keep_the_image_consistent() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = p(d, "base.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&base), "8M"]);
    qemu_io(&base, "qcow2", &["write -P 0x77 0 8M".into()]);
    let img = p(d, "o.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&img),
        ],
    );
    let node = open(&img, false);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let node = node.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(t * 7 + 3);
                let mut buf = vec![0u8; 70_000];
                for _ in 0..300u64 {
                    let len = 1 + rng.below(65536);
                    let off = rng.below((8 << 20) - len);
                    match rng.below(6) {
                        0 => node.discard(off, len).expect("discard"),
                        1 => node
                            .write_zeroes(
                                off,
                                len,
                                ZeroFlags {
                                    may_unmap: true,
                                    fast: false,
                                },
                            )
                            .expect("zero"),
                        2 => node.read_at(&mut buf[..len as usize], off).expect("read"),
                        3 => node.flush().expect("flush"),
                        _ => node
                            .write_at(&vec![t as u8 + 1; len as usize], off, false)
                            .expect("write"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let data = read_all(node.as_ref());
    drop(node);
    check_clean(&img);
    assert!(data == qemu_raw(&img, d));
}

#[test]
fn qcow2_grow_moves_the_l1_table_and_stays_clean() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = p(dir.path(), "g.qcow2");
    let opts = "cluster_size=512";
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", opts, s(&img), "1M"],
    );
    qemu_io(&img, "qcow2", &["write -P 0x61 0 1M".into()]);
    let node = tidemark::block::qcow2::Qcow2Node::open(&img, false).expect("open");
    node.grow_to(64 << 20).expect("grow");
    assert_eq!(node.size(), 64 << 20);
    node.write_at(&[0x62; 70_000], (64 << 20) - 70_000, false)
        .expect("write at the new end");
    drop(node);
    check_clean(&img);
    let info = info_fields(&img);
    assert_eq!(info["virtual-size"].as_u64(), Some(64 << 20));
    let data = qemu_raw(&img, dir.path());
    assert!(data[..1 << 20].iter().all(|&b| b == 0x61));
    assert!(data[(64 << 20) - 70_000..].iter().all(|&b| b == 0x62));
    let node = open(&img, true);
    assert!(read_all(node.as_ref()) == data);
}
