//! `tidemark serve --listen HOST:PORT`: TCP on IPv4 and IPv6 loopback, with
//! port 0 so the test never races for a free port. The server logs the
//! address it bound; the test waits for that line, then drives the export
//! with nbdinfo and qemu-io over `nbd://`.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
/// `host:port` it logged.
fn start(image: &Path, log: &Path, host: &str) -> (TcpServer, String) {
    let child = Command::new(TIDEMARK)
        .args(["serve", "--listen", &format!("{host}:0"), "--format", "raw"])
        .arg(image)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(File::create(log).expect("create log"))
        .spawn()
        .expect("start tidemark");
    let mut srv = TcpServer { child };
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text
            .lines()
            .find_map(|l| l.split("listening on tcp ").nth(1))
        {
            return (srv, addr.trim().to_string());
        }
        if let Ok(Some(status)) = srv.child.try_wait() {
            panic!("tidemark exited early ({status}):\n{text}");
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no 'listening' line in time:\n{text}"
        );
        // Poll the log the server is writing; the condition, not the
        // interval, ends the wait.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exercise(host: &str) {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    sparse_file(&img, 16 << 20);
    let (mut srv, addr) = start(&img, &dir.path().join("log"), host);
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
