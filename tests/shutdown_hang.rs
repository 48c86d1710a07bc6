//! Issue 15, finding 1: "hang at shutdown, then lost bitmaps".
//!
//! 40 seeded trials against `tidemark daemon`: a 1 TiB sparse qcow2 with
//! persistent bitmaps b1 then b2 at 512-byte granularity (256 MiB of bits
//! each), merges b2 into b1 and b1 into b2 in a loop on two monitors, whole-
//! disk trims on several NBD connections (tests/py/shutdown_trimmer.py), and
//! then `quit` or SIGTERM (alternating by seed) at a seeded moment while all
//! of that still runs. Every trial must exit by itself within 10 s (else it
//! is killed with SIGKILL and counts as a hang), with status 0, leaving both
//! bitmaps stored without the in-use flag in an image `qemu-img check` finds
//! clean. All trials run, then the failures are reported together, so a
//! run shows how many of the 40 hung.
//!
//! Synchronisation is by pipes, sockets and pidfds, each with a deadline.
//! The one wait that is not synchronisation is the seeded delay before the
//! stop: it picks the moment.

mod common;
mod qmp_common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{describe_failure, output, signal, tool, PyScript};
use qmp_common::{qcow2_image, wait_child, Impl, Instance, Qmp};
use serde_json::{json, Value};

const TRIALS: u64 = 40;
const DISK: u64 = 1 << 40;
/// How long the daemon may take to exit after `quit` or SIGTERM.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// How long the load may take to get going, or to end once the daemon has.
const LOAD_DEADLINE: Duration = Duration::from_secs(30);
/// NBD connections trimming the whole disk at once.
const TRIMMERS: usize = 3;
/// Trials run side by side.
const PARALLEL: usize = 2;
/// The stop comes this long (at most) after the load runs.
const MAX_DELAY_MS: u64 = 400;

/// splitmix64: the seeded choices of a trial.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Quit,
    Sigterm,
}

/// The next reply that is not an event, or None once the connection ends
/// (the daemon closed it, or was killed).
fn reply(q: &mut Qmp) -> Option<Value> {
    loop {
        let v = q.recv()?;
        if v.get("event").is_none() {
            return Some(v);
        }
    }
}

/// Merges `src` into `target` until the connection ends. Every merge
/// before `stopping` is set must succeed; after it, errors are the daemon
/// closing and end the loop. The first success is announced on `first`.
fn merge_loop(
    mut q: Qmp,
    target: &'static str,
    src: &'static str,
    stopping: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    first: mpsc::Sender<()>,
) -> Result<(), String> {
    let cmd = json!({"execute": "block-dirty-bitmap-merge",
                     "arguments": {"node": "disk", "target": target, "bitmaps": [src]}});
    let mut bytes = serde_json::to_vec(&cmd).expect("json");
    bytes.push(b'\n');
    loop {
        let sent = std::io::Write::write_all(&mut q.writer(), &bytes);
        let r = match sent {
            Ok(()) => reply(&mut q),
            Err(_) => None,
        };
        match r {
            Some(v) if v == json!({"return": {}}) => {
                if done.fetch_add(1, Ordering::Relaxed) == 0 {
                    let _ = first.send(());
                }
            }
            _ if stopping.load(Ordering::SeqCst) => return Ok(()),
            Some(v) => return Err(format!("merge {src}->{target}: {v}")),
            None => return Err(format!("merge {src}->{target}: no reply")),
        }
    }
}

/// What a trial saw: how long the exit took, or why it failed.
struct Outcome {
    seed: u64,
    stop: Stop,
    delay_ms: u64,
    merges: usize,
    exit: Result<Duration, String>,
}

fn trial(seed: u64) -> Outcome {
    let mut rng = Rng(seed);
    let stop = if seed.is_multiple_of(2) {
        Stop::Quit
    } else {
        Stop::Sigterm
    };
    let delay_ms = rng.next() % MAX_DELAY_MS;
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=disk-file,filename=$DIR/disk.qcow2,discard=unmap",
        "--blockdev",
        "driver=qcow2,node-name=disk,file=disk-file,discard=unmap",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock,max-connections=16",
        "--export",
        "type=nbd,id=vm,node-name=disk,name=vm,writable=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut inst = Instance::start_with_monitors(Impl::Tidemark, &args, 3, |d| {
        qcow2_image(&d.join("disk.qcow2"), DISK)
    });
    let mut q0 = inst.client_on(0);
    for name in ["b1", "b2"] {
        let r = q0.exec(
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": name, "granularity": 512, "persistent": true}),
        );
        assert_eq!(r, json!({"return": {}}), "seed {seed}: add {name}");
    }

    let mut trimmer = PyScript::spawn(
        "shutdown_trimmer.py",
        [
            inst.path("nbd.sock").display().to_string(),
            "vm".to_owned(),
            TRIMMERS.to_string(),
        ],
        inst.path("trimmer.stderr"),
    );
    match trimmer.lines.recv_timeout(LOAD_DEADLINE) {
        Ok(l) if l == "ready" => {}
        other => panic!(
            "seed {seed}: trimmer not ready ({other:?}); stderr:\n{}\n--- daemon log ---\n{}",
            trimmer.stderr(),
            inst.log()
        ),
    }

    let stopping = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let (first_tx, first_rx) = mpsc::channel();
    let loops: Vec<_> = [("b1", "b2"), ("b2", "b1")]
        .into_iter()
        .enumerate()
        .map(|(k, (target, src))| {
            let q = inst.client_on(k + 1);
            let (stopping, done, first) = (stopping.clone(), done.clone(), first_tx.clone());
            thread::spawn(move || merge_loop(q, target, src, stopping, done, first))
        })
        .collect();
    // Merges and trims both run: then pick the moment.
    match first_rx.recv_timeout(LOAD_DEADLINE) {
        Ok(()) => {}
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
            "seed {seed}: no merge succeeded\n--- daemon log ---\n{}",
            inst.log()
        ),
    }
    thread::sleep(Duration::from_millis(delay_ms));

    stopping.store(true, Ordering::SeqCst);
    match stop {
        Stop::Quit => {
            // The reply may or may not come before the monitor closes.
            q0.send_raw(b"{\"execute\": \"quit\"}\n");
        }
        Stop::Sigterm => signal(inst.pid(), libc::SIGTERM),
    }
    let t = Instant::now();
    // On a hang, wait_exit kills the daemon with SIGKILL, as the issue's
    // operator had to; that ends the sockets the load waits on.
    let exited = inst.wait_exit(EXIT_DEADLINE);
    let took = t.elapsed();
    let merges = done.load(Ordering::Relaxed);
    for l in loops {
        match l.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("seed {seed}: {e}\n--- daemon log ---\n{}", inst.log()),
            Err(_) => panic!("seed {seed}: a merge loop panicked"),
        }
    }
    drop(q0);
    trimmer.stdin = None;
    assert!(
        wait_child(&mut trimmer.child, LOAD_DEADLINE),
        "seed {seed}: trimmer did not end; stderr:\n{}",
        trimmer.stderr()
    );
    let st = trimmer.child.wait().expect("trimmer status");
    assert!(
        st.success(),
        "seed {seed}: trimmer {st}; stderr:\n{}",
        trimmer.stderr()
    );

    let exit = if !exited {
        Err(format!(
            "no exit within {EXIT_DEADLINE:?} of {stop:?} (killed)\n--- daemon log ---\n{}",
            tail(&inst.log())
        ))
    } else {
        let status = inst.exit_status().expect("exited");
        if status.success() {
            check_image(&inst.path("disk.qcow2")).map(|()| took)
        } else {
            Err(format!(
                "exit status {status} after {stop:?}\n--- daemon log ---\n{}",
                tail(&inst.log())
            ))
        }
    };
    Outcome {
        seed,
        stop,
        delay_ms,
        merges,
        exit,
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Both bitmaps stored without in-use; `qemu-img check` clean.
fn check_image(img: &Path) -> Result<(), String> {
    let mut cmd = tool("qemu-img");
    cmd.args(["info", "--output=json"]).arg(img);
    let out = output(&mut cmd);
    if !out.status.success() {
        return Err(describe_failure(&cmd, &out));
    }
    let info: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info is JSON");
    let mut stored: Vec<Value> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    stored.sort_by_key(|b| b["name"].as_str().unwrap_or("").to_owned());
    let want = json!([
        {"flags": ["auto"], "name": "b1", "granularity": 512},
        {"flags": ["auto"], "name": "b2", "granularity": 512},
    ]);
    if Value::Array(stored.clone()) != want {
        return Err(format!("stored bitmaps: {stored:?}, want {want}"));
    }
    let mut cmd = tool("qemu-img");
    cmd.arg("check").arg(img);
    let out = output(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("No errors were found on the image.") {
        return Err(describe_failure(&cmd, &out));
    }
    Ok(())
}

#[test]
fn merges_and_whole_disk_trims_never_stop_a_shutdown() {
    let started = Instant::now();
    // Two trials at a time: most of a trial is the daemon storing 512 MiB
    // of bitmaps and qemu-img reading the image, not CPU.
    let next = Arc::new(AtomicU64::new(0));
    let runners: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let next = next.clone();
            thread::spawn(move || {
                let mut v = Vec::new();
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= TRIALS {
                        return v;
                    }
                    v.push(trial(seed));
                }
            })
        })
        .collect();
    let mut outcomes: Vec<Outcome> = runners
        .into_iter()
        .flat_map(|r| r.join().expect("a trial panicked (see above)"))
        .collect();
    outcomes.sort_by_key(|o| o.seed);
    let mut failed = Vec::new();
    for o in &outcomes {
        match &o.exit {
            Ok(t) => eprintln!(
                "seed {:2} {:?} after {} ms, {} merges: exited in {t:?}",
                o.seed, o.stop, o.delay_ms, o.merges
            ),
            Err(e) => {
                eprintln!(
                    "seed {:2} {:?} after {} ms, {} merges: FAILED",
                    o.seed, o.stop, o.delay_ms, o.merges
                );
                failed.push(format!("seed {} ({:?}): {e}", o.seed, o.stop));
            }
        }
    }
    eprintln!("{TRIALS} trials in {:?}", started.elapsed());
    assert!(
        failed.is_empty(),
        "{} of {TRIALS} trials failed:\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}
