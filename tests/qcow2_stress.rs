//! Issue 13's stress test of the qcow2 data path: 4 NBD connections at once
//! of random reads, writes, write-zeroes, trims and flushes of mixed sizes
//! (1 byte to 1 MiB, aligned and not to the 64 KiB cluster, some crossing
//! an L2 table boundary, the backing file's end and the disk's end) on a
//! qcow2 overlay whose qcow2 backing has data on part of it, and which
//! itself starts with data, zero clusters and discarded ranges.
//!
//! The connections share clusters, L2 tables and refcount blocks but never
//! bytes: the disk is cut into stripes of 256 KiB..1 MiB (not cluster
//! aligned) dealt round-robin to the connections (tests/py/qcow2_stress.py),
//! so each keeps an exact model of its stripes and checks every read as it
//! completes. At the end: a clean shutdown, `qemu-img check` clean, and
//! `qemu-img compare` of the overlay (read through its backing) with a raw
//! file built from the models says identical; the backing is untouched.
//!
//! Seed: TIDEMARK_SEED (printed); duration: TIDEMARK_STRESS_SECS (12 s);
//! TIDEMARK_STRESS_KEEP=1 keeps the temp dir (images, model) for a look.
//! `TIDEMARK_TEST_SERVER=qemu-nbd` runs it against qemu-nbd, to check the
//! test itself. Beware: qemu-nbd 10.0.2 fails it about half the time (even
//! with one connection): with the default seed, connection 0 reads wrong
//! bytes in cluster 8162 after mixed write-zeroes, and `qemu-img check`
//! after qemu-nbd's clean exit finds a cluster referenced twice
//! ("refcount=1 reference=2"), a qemu bug, not a test one.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use common::rng::{seed, Rng};
use common::{Kind, PyScript, ServeOpts, Server};

const CLUSTER: u64 = 65536;
/// The overlay: past 1 GiB (its third L2 table) and not a whole number of
/// clusters.
const SIZE: u64 = (1 << 30) + (8 << 20) - 1536;
/// The backing ends inside a cluster, inside the last window.
const BACKING_SIZE: u64 = (1 << 30) + (3 << 20) + 3584;
const CONNS: usize = 4;
const MIB: u64 = 1 << 20;

/// The parts of the disk the connections work in (offset, length): the
/// start, the boundary between the first two L2 tables (512 MiB with
/// 64 KiB clusters), and the backing's end up to the disk's end.
fn windows() -> Vec<(u64, u64)> {
    let last = (1 << 30) - 4 * MIB;
    vec![
        (0, 12 * MIB),
        ((512 * MIB) - 6 * MIB, 12 * MIB),
        (last, SIZE - last),
    ]
}

fn secs() -> f64 {
    std::env::var("TIDEMARK_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12.0)
}

/// The backing: a raw file with position-dependent data on ranges of each
/// window (one up to the backing's end), converted to a qcow2 with 16 KiB
/// clusters (so the overlay's copy-on-write reads a mix of allocated and
/// unallocated backing clusters).
fn make_backing(dir: &Path, seed: u64) {
    let src = dir.join("backing-src.raw");
    common::sparse_file(&src, BACKING_SIZE);
    let ranges = [
        (3 * CLUSTER + 1000, 5 * MIB),
        (7 * MIB + 4096, 300_000),
        (512 * MIB - 5 * MIB + 12345, 7 * MIB),
        (
            (1 << 30) - 3 * MIB - 777,
            BACKING_SIZE - ((1 << 30) - 3 * MIB - 777),
        ),
    ];
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .expect("open backing source");
    for (k, &(off, len)) in ranges.iter().enumerate() {
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&common::pattern(len as usize, seed ^ (k as u64 + 1)))
            .expect("write backing data");
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
            "backing-src.raw",
            "backing.qcow2",
        ],
    );
    std::fs::remove_file(&src).expect("remove backing source");
}

/// The overlay, with a seeded start state written by qemu-io: data
/// (different bytes in every range), zero clusters over backing data, and
/// discarded ranges.
fn make_overlay(dir: &Path, seed: u64) {
    common::tool_in(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "-b",
            "backing.qcow2",
            "-F",
            "qcow2",
            "overlay.qcow2",
            &SIZE.to_string(),
        ],
    );
    let mut rng = Rng::new(seed ^ 0x07e7);
    let mut cmds = Vec::new();
    for (off, len) in windows() {
        for _ in 0..14 {
            let n = match rng.next() % 3 {
                0 => CLUSTER * rng.range(1, 3),
                1 => rng.range(1, 200_000),
                _ => 512 * rng.range(1, 256),
            };
            let at = off + rng.range(0, len - n);
            let at = if rng.next().is_multiple_of(2) {
                at / CLUSTER * CLUSTER
            } else {
                at
            };
            let at = at.max(off);
            cmds.push(match rng.next() % 6 {
                0 => format!("write -z {at} {n}"),
                1 => format!("discard {at} {n}"),
                _ => format!("write -P {} {at} {n}", 1 + rng.next() % 255),
            });
        }
    }
    let mut args = Vec::new();
    for c in &cmds {
        args.push("-c");
        args.push(c.as_str());
    }
    args.extend(["-f", "qcow2", "overlay.qcow2"]);
    common::tool_in(dir, "qemu-io", &args);
}

/// Waits for a line from `w` that starts with one of `prefixes`; a line
/// starting with FAIL, or the end of the script, fails the test with
/// everything the script printed after it.
fn expect_line(w: &PyScript, prefixes: &[&str], deadline: Instant, server: &Server) -> String {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match w.lines.recv_timeout(left) {
            Ok(l) if l.starts_with("FAIL") => {
                let mut all = l;
                // The rest of the report, until the script exits.
                while let Ok(more) = w.lines.recv_timeout(Duration::from_secs(10)) {
                    all.push('\n');
                    all.push_str(&more);
                }
                panic!(
                    "{all}\n--- worker stderr ---\n{}\n--- server log ---\n{}",
                    w.stderr(),
                    server.log()
                );
            }
            Ok(l) if prefixes.iter().any(|p| l.starts_with(p)) => return l,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => panic!(
                "worker: no {prefixes:?} line in time; stderr: {}\n--- server log ---\n{}",
                w.stderr(),
                server.log()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "worker exited without a {prefixes:?} line; stderr: {}\n--- server log ---\n{}",
                w.stderr(),
                server.log()
            ),
        }
    }
}

#[test]
fn four_connections_of_mixed_io_on_a_qcow2_overlay_match_the_model() {
    let seed = seed(20261201);
    let secs = secs();
    eprintln!("seed {seed} (TIDEMARK_SEED), {secs} s (TIDEMARK_STRESS_SECS)");
    let mut tmp = common::temp_dir();
    if std::env::var_os("TIDEMARK_STRESS_KEEP").is_some() {
        // To look at the images after a failure.
        tmp.disable_cleanup(true);
        eprintln!("keeping {}", tmp.path().display());
    }
    let dir = tmp.path();
    make_backing(dir, seed);
    make_overlay(dir, seed);
    let backing_sum = common::sha256(&dir.join("backing.qcow2"));
    // The disk as it is before the test, read through the backing: the
    // models start from it, and write their stripes back into it.
    common::tool_in(
        dir,
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "overlay.qcow2",
            "expected.raw",
        ],
    );
    assert_eq!(
        std::fs::metadata(dir.join("expected.raw"))
            .expect("expected.raw")
            .len(),
        SIZE
    );

    let server = Server::start(
        Kind::under_test(),
        &dir.join("overlay.qcow2"),
        &ServeOpts {
            format: Some("qcow2"),
            // 4 workers, and room for the readiness probe's connection
            // that the server may not have seen closed yet.
            max_connections: Some(8),
            ..ServeOpts::read_write()
        },
    );
    let windows = windows()
        .iter()
        .map(|(o, l)| format!("{o}:{l}"))
        .collect::<Vec<_>>()
        .join(",");
    let expected = dir.join("expected.raw");
    let mut workers: Vec<PyScript> = (0..CONNS)
        .map(|c| {
            PyScript::spawn(
                "qcow2_stress.py",
                [
                    server.uri(),
                    expected.display().to_string(),
                    SIZE.to_string(),
                    windows.clone(),
                    seed.to_string(),
                    c.to_string(),
                    CONNS.to_string(),
                    secs.to_string(),
                ],
                dir.join(format!("worker{c}.err")),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for w in &workers {
        expect_line(w, &["connected"], deadline, &server);
    }
    // All four connected: start them together.
    for w in &mut workers {
        let stdin = w.stdin.as_mut().expect("worker stdin");
        writeln!(stdin, "go").expect("tell the worker to go");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 60.0);
    for w in &workers {
        let done = expect_line(w, &["done"], deadline, &server);
        eprintln!("{done}");
        // A run that did next to nothing proves nothing.
        let reads: u64 = done
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("read="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(reads >= 50, "too few reads checked: {done}");
        // libnbd only prints what a callback raises; the worker catches
        // everything, so any traceback is a bug in the test.
        assert!(
            !w.stderr().contains("Traceback"),
            "worker stderr: {}",
            w.stderr()
        );
    }
    drop(workers);

    let log = server.log();
    let status = server.terminate();
    assert!(status.success(), "server exit: {status}\n{log}");

    // No leaks expected after a clean close: exit 0, not 3.
    let check = common::output(
        common::tool("qemu-img")
            .args(["check", "overlay.qcow2"])
            .current_dir(dir),
    );
    assert_eq!(
        check.status.code(),
        Some(0),
        "qemu-img check (seed {seed}):\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let compare = common::output(
        common::tool("qemu-img")
            .args([
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                "expected.raw",
                "overlay.qcow2",
            ])
            .current_dir(dir),
    );
    assert_eq!(
        compare.status.code(),
        Some(0),
        "qemu-img compare with the model (seed {seed}):\n{}{}",
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    assert_eq!(
        common::sha256(&dir.join("backing.qcow2")),
        backing_sum,
        "the backing file changed"
    );
}
