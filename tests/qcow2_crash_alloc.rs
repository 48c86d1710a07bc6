//! Issue 13's crash test of the qcow2 write path: kill -9 of the server
//! during allocating writes, 20 seeded iterations (TIDEMARK_SEED,
//! printed; TIDEMARK_CRASH_ITERATIONS).
//!
//! Each iteration: a fresh qcow2 (64 KiB clusters, sometimes 32 or 128;
//! no backing, a raw backing or a qcow2 backing with data on its first
//! 48 MiB, so partial-cluster writes copy on write from it), served
//! writable; a writer (tests/py/crash_alloc_writer.py) keeps 8 writes in
//! flight, each to clusters of its own, with its index in its data, some
//! with FUA, and a FLUSH now and then, logging every request before it is
//! sent and every reply as it comes; the server is killed after a seeded
//! number of replies. Then:
//!
//! - `qemu-img check` finds no corruption (exit 0, or 3: leaks, which qemu
//!   allows after a crash);
//! - read through qemu-nbd: every durable write (acknowledged with FUA, or
//!   acknowledged before a FLUSH was sent that was acknowledged) reads
//!   back exactly; the bytes of every write's clusters outside the write
//!   read as the backing (or zeroes); and a write that is not durable
//!   reads, sector by sector, as before or as written.
//!
//! `TIDEMARK_TEST_SERVER=qemu-nbd` runs it against qemu-nbd, to check the
//! test itself.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::rng::{seed, Rng};
use common::{Kind, PyScript, ServeOpts, Server};

const SIZE: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// The backing: data on its first 48 MiB, and an end inside a cluster.
const BACKING_SIZE: u64 = 48 * MIB + 20480;
const DEADLINE: Duration = Duration::from_secs(20);

/// base.raw (the backing's content, also what the checker compares with)
/// and base.qcow2 (the same, 16 KiB clusters): data in 1 MiB runs with
/// 1 MiB and 64 KiB holes among them, so copy-on-write reads both.
fn make_backings(dir: &Path, seed: u64) {
    let raw = dir.join("base.raw");
    common::sparse_file(&raw, BACKING_SIZE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .expect("open base.raw");
    let mut at = 0;
    let mut k = 0;
    while at < BACKING_SIZE {
        let len = MIB.min(BACKING_SIZE - at);
        // Every third MiB a hole; inside the others a 64 KiB one.
        if k % 3 != 2 {
            use std::io::{Seek, SeekFrom};
            let mut data = common::pattern(len as usize, seed ^ (k + 1));
            let hole = (k * 65536) % len;
            for b in data.iter_mut().skip(hole as usize).take(65536) {
                *b = 0;
            }
            f.seek(SeekFrom::Start(at)).expect("seek");
            f.write_all(&data).expect("write base.raw");
        }
        at += len;
        k += 1;
    }
    drop(f);
    common::tool_in(
        dir,
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=16384",
            "base.raw",
            "base.qcow2",
        ],
    );
}

#[derive(Debug, Clone, Copy)]
enum Backing {
    None,
    Raw,
    Qcow2,
}

/// One iteration; returns the checker's summary.
fn iteration(writer: &mut PyScript, shared: &Path, seed: u64, n: u64) -> String {
    let mut rng = Rng::new(seed);
    let backing = match rng.next() % 3 {
        0 => Backing::None,
        1 => Backing::Raw,
        _ => Backing::Qcow2,
    };
    let cluster: u64 = match rng.next() % 4 {
        0 => 32768,
        1 => 131072,
        _ => 65536,
    };
    let stop = 3 + rng.next() % 150;
    let what = format!(
        "iteration {n} (seed {seed}: backing {backing:?}, cluster {cluster}, kill after {stop} replies)"
    );
    // Printed with the test's output if it fails, to replay it.
    eprintln!("{what}");
    let tmp = common::temp_dir();
    let dir = tmp.path();
    let mut create = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        format!("cluster_size={cluster}"),
    ];
    let (base, fmt) = match backing {
        Backing::None => (None, ""),
        Backing::Raw => (Some(shared.join("base.raw")), "raw"),
        Backing::Qcow2 => (Some(shared.join("base.qcow2")), "qcow2"),
    };
    if let Some(b) = &base {
        create.extend([
            "-b".into(),
            b.display().to_string(),
            "-F".into(),
            fmt.into(),
        ]);
    }
    create.extend(["disk.qcow2".into(), SIZE.to_string()]);
    let args: Vec<&str> = create.iter().map(String::as_str).collect();
    common::tool_in(dir, "qemu-img", &args);
    let img = dir.join("disk.qcow2");
    let log = dir.join("writer.log");

    let server = Server::start(
        Kind::under_test(),
        &img,
        &ServeOpts {
            format: Some("qcow2"),
            max_connections: Some(4),
            ..ServeOpts::read_write()
        },
    );
    writer.send(&format!(
        "run {} {} {seed} {SIZE} {cluster} {BACKING_SIZE} {stop}",
        server.uri(),
        log.display()
    ));
    writer.expect(&["acked"], DEADLINE);
    common::signal(server.pid(), libc::SIGKILL);
    let server_log = server.log();
    drop(server); // reaps it
    writer.expect(&["done"], DEADLINE);

    let check = common::output(common::tool("qemu-img").args(["check"]).arg(&img));
    assert!(
        matches!(check.status.code(), Some(0) | Some(3)),
        "{what}: qemu-img check after the crash:\n{}{}\n--- server log ---\n{server_log}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Read back through qemu (the reference reader of the image).
    let reader = Server::start(
        Kind::QemuNbd,
        &img,
        &ServeOpts {
            format: Some("qcow2"),
            ..ServeOpts::read_only()
        },
    );
    let old = match backing {
        Backing::None => "-".to_string(),
        _ => shared.join("base.raw").display().to_string(),
    };
    writer.send(&format!(
        "verify {} {} {seed} {SIZE} {cluster} {old}",
        reader.uri(),
        log.display()
    ));
    let mut fails = Vec::new();
    let summary = loop {
        let l = writer.expect(&["FAIL", "ok", "bad"], DEADLINE);
        if l.starts_with("FAIL") {
            fails.push(l);
        } else {
            break l;
        }
    };
    writer.expect(&["end"], DEADLINE);
    drop(reader);
    if !fails.is_empty() || !summary.starts_with("ok") {
        if let Ok(keep) = std::env::var("TIDEMARK_CRASH_KEEP") {
            let _ = std::fs::copy(&img, format!("{keep}/crash-alloc-{n}.qcow2"));
            let _ = std::fs::copy(&log, format!("{keep}/crash-alloc-{n}.log"));
        }
        panic!(
            "{what}: {summary}\n{}\n--- qemu-img check ---\n{}\n--- server log ---\n{server_log}",
            fails.join("\n"),
            String::from_utf8_lossy(&check.stdout)
        );
    }
    format!(
        "{what}: check exit {}, {summary}",
        check.status.code().unwrap_or(-1)
    )
}

#[test]
fn kill_9_during_allocating_writes_keeps_every_durable_write_and_the_image_consistent() {
    let iterations: u64 = std::env::var("TIDEMARK_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let base = seed(20261202);
    eprintln!("seed {base} (TIDEMARK_SEED), {iterations} iterations");
    let shared = common::temp_dir();
    make_backings(shared.path(), base);
    let mut writer = PyScript::spawn(
        "crash_alloc_writer.py",
        Vec::<String>::new(),
        shared.path().join("writer.err"),
    );
    writer.expect(&["ready"], DEADLINE);
    let mut durable = 0;
    for n in 0..iterations {
        let started = Instant::now();
        let summary = iteration(
            &mut writer,
            shared.path(),
            base.wrapping_add(n.wrapping_mul(0x9e37_79b9)),
            n,
        );
        eprintln!("{summary} ({:?})", started.elapsed());
        durable += summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("durable="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    writer.send("quit");
    assert!(
        !writer.stderr().contains("Traceback"),
        "writer: {}",
        writer.stderr()
    );
    // Some durable writes must have been checked, or the test checked
    // nothing of what it is for.
    assert!(
        durable >= iterations,
        "only {durable} durable writes in {iterations} iterations"
    );
}
