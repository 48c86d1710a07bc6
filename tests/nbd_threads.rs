//! The server's threads do not grow with the requests in flight: four
//! connections pipelining reads and writes on a qcow2 export (reads of data
//! and of unallocated clusters, overwrites and allocating writes) keep the
//! process within 4 threads per core, and the image stays clean.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The process's threads now.
fn threads(pid: u32) -> usize {
    proc_status(pid, "Threads:") as usize
}

#[test]
fn pipelined_clients_on_a_qcow2_export_keep_threads_within_four_per_core() {
    let dir = temp_dir();
    let img = dir.path().join("disk.qcow2");
    run(tool("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    // The first half allocated (the load script knows its content).
    run(tool("qemu-io")
        .args(["-f", "qcow2", "-c", "write -q -P 0x5a 0 32M"])
        .arg(&img));
    let opts = ServeOpts {
        format: Some("qcow2"),
        max_connections: Some(16),
        ..ServeOpts::read_write()
    };
    let srv = Server::start(Kind::Tidemark, &img, &opts);
    let pid = srv.pid();

    let stderr = dir.path().join("load.err");
    let mut load = Command::new(PYTHON)
        .arg(py_script("nbd_threads_load.py"))
        .arg(srv.socket())
        .args(["4", "1500", "16", "7"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("spawn the load");
    // Sampled for as long as the load runs.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut most = threads(pid);
    let status = loop {
        most = most.max(threads(pid));
        if let Some(status) = load.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = load.kill();
            panic!("the load did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut load.stdout.take().expect("stdout"), &mut out)
        .expect("load output");
    assert!(
        status.success(),
        "load failed ({status}): {}\n--- server log ---\n{}",
        std::fs::read_to_string(&stderr).unwrap_or_default(),
        srv.log()
    );
    assert!(
        out.contains(r#""done": 6000"#) && out.contains(r#""most_in_flight": 64"#),
        "every request answered, 64 in flight at once: {out}"
    );
    // One core cannot fit the fixed threads (main, timer, runtime, two
    // I/O threads, control plane) in four.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = 4 * cores.max(2);
    assert!(
        most <= limit,
        "{most} threads with {cores} cores (at most {limit})"
    );
    drop(srv);
    let mut cmd = tool("qemu-img");
    cmd.arg("check").arg(&img);
    let check = output(&mut cmd);
    assert!(check.status.success(), "{}", describe_failure(&cmd, &check));
}
