//! Issue 4, check 5 (persistence round trip): bitmaps stored by qemu and
//! loaded by tidemark, then changed through tidemark and stored again, hash
//! the same in tidemark (`tidemark bitmap --sha256`) and in
//! qemu-storage-daemon (`x-debug-block-dirty-bitmap-sha256` after loading
//! the image), at several granularities and with bitmap data spanning many
//! clusters.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Loads `img` in qemu-storage-daemon and returns the sha256 of each bitmap.
/// A daemon that stops answering or exits before `quit` (seen now and
/// then on this machine, whatever tidemark does: the image is read-only
/// here) is replaced by a fresh one, twice at most.
fn qsd_sha256(img: &Path, names: &[&str]) -> Vec<String> {
    let mut failures = Vec::new();
    while failures.len() < 3 {
        match try_qsd_sha256(img, names) {
            Ok(hashes) => return hashes,
            Err(e) => {
                eprintln!("qemu-storage-daemon failed, trying again: {e}");
                failures.push(e);
            }
        }
    }
    panic!("qemu-storage-daemon failed three times: {failures:#?}");
}

fn try_qsd_sha256(img: &Path, names: &[&str]) -> Result<Vec<String>, String> {
    let dir = temp_dir();
    let qmp = dir.path().join("qmp.sock");
    // Its output goes to a file: a daemon writing into a closed pipe
    // would die of SIGPIPE.
    let log = std::fs::File::create(dir.path().join("qsd.log")).expect("log");
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", s(img)))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=n,file=f,read-only=on")
        .arg("--chardev")
        .arg(format!("socket,id=m,path={},server=on,wait=off", s(&qmp)))
        .arg("--monitor")
        .arg("chardev=m")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("start qemu-storage-daemon");
    let result = qmp_session(&mut child, &qmp, names);
    // Gone after quit (bounded: killed otherwise, and always reaped).
    let limit = Duration::from_secs(if result.is_ok() { 20 } else { 0 });
    if wait_with_deadline(&mut child, limit).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let qsd_log = std::fs::read_to_string(dir.path().join("qsd.log")).unwrap_or_default();
    result.map_err(|e| format!("{e}; its log: {qsd_log}"))
}

/// The hashes over `qmp`, once the daemon's monitor accepts; then `quit`.
fn qmp_session(child: &mut Child, qmp: &Path, names: &[&str]) -> Result<Vec<String>, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(qmp) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() >= deadline => return Err(format!("monitor: {e}")),
            Err(_) => {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(format!("exited at start: {st}"));
                }
                std::thread::yield_now();
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    // The greeting first: the monitor is up and talking to us.
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .map_err(|e| format!("greeting: {e}"))?;
    if !greeting.contains("QMP") {
        return Err(format!("greeting: {greeting:?}"));
    }
    let mut call = |cmd: Value| -> Result<Value, String> {
        writeln!(writer, "{cmd}").map_err(|e| format!("send {cmd}: {e}"))?;
        loop {
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .map_err(|e| format!("reply to {cmd}: {e}"))?;
            if line.is_empty() {
                return Err(format!("closed before replying to {cmd}"));
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("{line}: {e}"))?;
            if v.get("return").is_some() || v.get("error").is_some() {
                return Ok(v);
            }
        }
    };
    call(json!({"execute": "qmp_capabilities"}))?;
    let mut out = Vec::new();
    for name in names {
        let r = call(json!({"execute": "x-debug-block-dirty-bitmap-sha256",
                             "arguments": {"node": "n", "name": name}}))?;
        let hash = r["return"]["sha256"]
            .as_str()
            .unwrap_or_else(|| panic!("qsd: {r}"));
        out.push(hash.to_string());
    }
    call(json!({"execute": "quit"}))?;
    Ok(out)
}

fn ours(img: &Path, name: &str) -> String {
    run(tool(TIDEMARK).args(["bitmap", "--sha256", s(img), name]))
        .trim()
        .to_string()
}

fn writes(seed: u64, n: usize, size: u64) -> Vec<String> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let len = 512 * (1 + next() % 200);
            let off = 512 * (next() % ((size - len) / 512));
            format!("write {off} {len}")
        })
        .collect()
}

#[test]
fn stored_bitmaps_hash_the_same_in_qemu_storage_daemon() {
    let dir = temp_dir();
    // (virtual size, cluster size, granularities of b0 and b1)
    let cases = [
        (64 << 20, 65536, 65536, 4096),
        ((1 << 30) + 512 * 7, 4096, 4096, 1 << 20),
        (100 << 20, 512, 512, 2 << 20),
    ];
    for (i, &(size, cluster, g0, g1)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("r{i}.qcow2"));
        run(tool("qemu-img").args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            s(&img),
            &size.to_string(),
        ]));
        run(tool("qemu-img").args(["bitmap", "--add", "-g", &g0.to_string(), s(&img), "b0"]));
        run(tool("qemu-img").args(["bitmap", "--add", "-g", &g1.to_string(), s(&img), "b1"]));
        let mut io = tool("qemu-io");
        io.args(["-f", "qcow2"]);
        for w in writes(3 + i as u64, 300, size) {
            io.arg("-c").arg(w);
        }
        run(io.arg(&img));
        // Stored by qemu, loaded by tidemark.
        let theirs = qsd_sha256(&img, &["b0", "b1"]);
        assert_eq!(
            vec![ours(&img, "b0"), ours(&img, "b1")],
            theirs,
            "case {i}: qemu-stored"
        );
        // Changed through tidemark and stored by it, loaded by qemu.
        let opts = ServeOpts {
            format: Some("qcow2"),
            ..ServeOpts::default()
        };
        let srv = Server::start(Kind::Tidemark, &img, &opts);
        let mut io = tool("qemu-io");
        io.args(["-f", "raw"]);
        for w in writes(50 + i as u64, 300, size) {
            io.arg("-c").arg(w);
        }
        run(io.arg(srv.uri()));
        assert!(srv.terminate().success());
        let theirs = qsd_sha256(&img, &["b0", "b1"]);
        assert_eq!(
            vec![ours(&img, "b0"), ours(&img, "b1")],
            theirs,
            "case {i}: tidemark-stored"
        );
    }
}
