//! `tidemark serve --listen HOST:PORT`: TCP on IPv4 and IPv6 loopback, with
//! port 0 so the test never races for a free port. The server logs the
//! address it bound; the test waits for that line, then drives the export
//! with nbdinfo and qemu-io over `nbd://`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{run, sparse_file, temp_dir, tool, wait_with_deadline, TIDEMARK};

const DEADLINE: Duration = Duration::from_secs(30);

struct TcpServer {
    child: Child,
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tidemark serve --listen HOST:0` and returns it with the
/// `host:port` it logged. A thread reads the log as it is written (and
/// keeps draining it), so the wait is on the line itself, with a deadline.
fn start(image: &Path, host: &str) -> (TcpServer, String) {
    let mut child = Command::new(TIDEMARK)
        .args(["serve", "--listen", &format!("{host}:0"), "--format", "raw"])
        .arg(image)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tidemark");
    let stderr = child.stderr.take().expect("piped stderr");
    let srv = TcpServer { child };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on tcp ").nth(1) {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(DEADLINE)
        .expect("tidemark logged no 'listening on tcp' line in time");
    (srv, addr)
}

fn exercise(host: &str) {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    sparse_file(&img, 16 << 20);
    let (mut srv, addr) = start(&img, host);
    let uri = format!("nbd://{addr}/");
    let info = run(tool("nbdinfo").arg("--json").arg(&uri));
    assert!(info.contains("\"export-size\": 16777216"), "{info}");
    let io = run(tool("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x5a 4096 65536",
        "-c",
        "read -P 0x5a 4096 65536",
    ]));
    assert!(!io.contains("fail"), "{io}");
    let map = run(tool("nbdinfo").arg("--map").arg(&uri));
    assert!(map.lines().any(|l| l.contains("data")), "{map}");
    common::signal(srv.child.id(), libc::SIGTERM);
    let status = wait_with_deadline(&mut srv.child, DEADLINE).expect("exit after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn serves_over_tcp_on_ipv4_loopback() {
    exercise("127.0.0.1");
}

#[test]
fn serves_over_tcp_on_ipv6_loopback() {
    exercise("[::1]");
}
