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
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Loads `img` in qemu-storage-daemon and returns the sha256 of each bitmap.
fn qsd_sha256(img: &Path, names: &[&str]) -> Vec<String> {
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
    let qsd_log = || std::fs::read_to_string(dir.path().join("qsd.log")).unwrap_or_default();
    // Ready once its monitor accepts (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(&qmp) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                assert!(
                    child.try_wait().ok().flatten().is_none(),
                    "qemu-storage-daemon exited: {}",
                    qsd_log()
                );
                std::thread::yield_now();
            }
            Err(e) => panic!("qsd monitor: {e}: {}", qsd_log()),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    // The greeting first: the monitor is up and talking to us.
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("qmp greeting");
    assert!(greeting.contains("QMP"), "qsd greeting: {greeting:?}");
    let mut call = |cmd: Value| -> Value {
        writeln!(writer, "{cmd}").unwrap_or_else(|e| panic!("send {cmd}: {e}: {}", qsd_log()));
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("qmp reply");
            assert!(!line.is_empty(), "qsd closed the monitor: {}", qsd_log());
            let v: Value = serde_json::from_str(&line).expect("qmp json");
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    };
    call(json!({"execute": "qmp_capabilities"}));
    let out = names
        .iter()
        .map(|name| {
            let r = call(json!({"execute": "x-debug-block-dirty-bitmap-sha256",
                                 "arguments": {"node": "n", "name": name}}));
            r["return"]["sha256"]
                .as_str()
                .unwrap_or_else(|| panic!("qsd: {r}"))
                .to_string()
        })
        .collect();
    call(json!({"execute": "quit"}));
    // The daemon exits after quit (bounded: killed otherwise).
    if wait_with_deadline(&mut child, Duration::from_secs(20)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    out
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
