//! What hostile or careless NBD clients cannot do to the server: leave a
//! request unanswered, spin it on a full descriptor table, or pin memory
//! without bound; and the connection limits qemu's servers default to.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::wire::*;
use common::*;

/// Every malformed block-status payload gets exactly one reply, and the
/// replies (errno and message) are qemu-nbd's.
#[test]
fn malformed_block_status_payloads_get_one_reply_each_as_from_qemu_nbd() {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    sparse_file(&img, 1 << 20);
    let mut transcripts = Vec::new();
    for kind in [Kind::QemuNbd, Kind::Tidemark] {
        let srv = Server::start(kind, &img, &ServeOpts::read_write());
        let out = run_py(
            "nbd_bs_payload.py",
            &[srv.socket().to_str().expect("utf-8")],
        );
        drop(srv);
        transcripts.push(out);
    }
    let lines: Vec<&str> = transcripts[1].lines().collect();
    // Five refusals, the flush, and nothing more.
    assert_eq!(lines.len(), 7, "tidemark's replies:\n{}", transcripts[1]);
    assert_eq!(lines[6], r#"{"extra": 0}"#);
    assert_eq!(
        transcripts[0], transcripts[1],
        "qemu-nbd's replies, then tidemark's"
    );
}

/// A child process, killed and reaped when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Open descriptors of `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A server started under a descriptor limit of `nofile`, many connections
/// allowed, with its log in `dir`.
fn start_limited(dir: &Path, image: &Path, nofile: u32) -> (Reaped, PathBuf, PathBuf) {
    let sock = dir.join("nbd.sock");
    let log = dir.join("server.log");
    let script =
        format!("ulimit -n {nofile} && exec \"$0\" serve -f raw -e 1000 -k \"$1\" \"$2\"",);
    let child = Command::new("sh")
        .args(["-c", &script, TIDEMARK])
        .arg(&sock)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log"))
        .env("RUST_LOG", "info")
        .spawn()
        .expect("spawn tidemark");
    let child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, sock, log)
}

/// The process's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Under `ulimit -n 64`, 200 clients that never finish the handshake fill
/// the descriptor table. The server neither spins nor floods its log, and
/// serves a new client once descriptors free up.
#[test]
fn a_full_descriptor_table_is_waited_out_not_spun_on() {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    sparse_file(&img, 1 << 20);
    let (mut child, sock, log) = start_limited(dir.path(), &img, 64);
    let pid = child.0.id();
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    // The table is full once the server holds all but a few descriptors.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) < 62 {
        assert!(Instant::now() < deadline, "{} fds open", open_fds(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
    let log_before = std::fs::metadata(&log).expect("log").len();
    let cpu_before = cpu_time(pid);
    let window = Duration::from_secs(2);
    std::thread::sleep(window);
    let cpu = cpu_time(pid) - cpu_before;
    let grown = std::fs::metadata(&log).expect("log").len() - log_before;
    eprintln!("at EMFILE: {cpu:?} of CPU in {window:?}, log grew {grown} bytes");
    assert!(
        cpu < window / 5,
        "the server used {cpu:?} of CPU in {window:?} at EMFILE"
    );
    assert!(grown < 100 << 10, "the log grew by {grown} bytes");
    drop(idle);
    // A client is served as soon as the idle ones are gone.
    let started = Instant::now();
    let out = output(tool("nbdinfo").args(["--size", &unix_uri("", &sock)]));
    assert!(out.status.success(), "nbdinfo: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a new client waited {:?}",
        started.elapsed()
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        text.matches("cannot accept connections").count(),
        1,
        "one warning a minute at most:\n{text}"
    );
    signal(pid, libc::SIGTERM);
    assert!(wait_with_deadline(&mut child.0, Duration::from_secs(20)).is_some());
}

/// A raw image of `size` bytes whose every other 4 KiB block is data, so
/// reads carry data and the allocation map has many extents.
fn striped_image(path: &Path, size: u64) {
    let mut f = File::create(path).expect("create");
    f.set_len(size).expect("size");
    let block = pattern(4096, 7);
    let mut at = 0;
    while at < size {
        f.seek(SeekFrom::Start(at)).expect("seek");
        f.write_all(&block).expect("write");
        at += 8192;
    }
}

/// A client that asks and never reads: structured replies (and
/// base:allocation when `status`), then `n` requests sent at once.
fn greedy_client(sock: &Path, status: bool, n: u64) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut c = Conn::new(s);
    c.start();
    c.structured_replies();
    if status {
        c.set_meta_context("", &["base:allocation"]);
    }
    c.go("");
    for i in 0..n {
        if status {
            c.request(0, CMD_BLOCK_STATUS, i, 0, 64 << 20);
        } else {
            c.request(0, CMD_READ, i, (i % 4) * (32 << 20), 32 << 20);
        }
    }
    c.s
}

/// 40 clients send four 32 MiB reads each and 10 send block-status
/// requests, and none reads a reply. The server's memory stays bounded,
/// and another client is served meanwhile.
#[test]
fn clients_that_never_read_pin_bounded_memory() {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    let size = 128u64 << 20;
    striped_image(&img, size);
    let opts = ServeOpts {
        max_connections: Some(100),
        ..ServeOpts::read_only()
    };
    let srv = Server::start(Kind::Tidemark, &img, &opts);
    let base = rss(srv.pid());
    let mut greedy = Vec::new();
    for _ in 0..40 {
        greedy.push(greedy_client(srv.socket(), false, 4));
    }
    for _ in 0..10 {
        greedy.push(greedy_client(srv.socket(), true, 32));
    }
    // A well-behaved client is served while they sit there, and reads
    // what the image holds.
    let mut c = Conn::new(srv.connect());
    c.open("");
    let mut expected = vec![0u8; 1 << 20];
    File::open(&img)
        .and_then(|mut f| f.read_exact(&mut expected))
        .expect("read image");
    for _ in 0..20 {
        assert!(
            c.read_ok(0, 1 << 20) == expected,
            "a read returned wrong data"
        );
    }
    let peak = rss(srv.pid());
    eprintln!(
        "RSS {} MiB with 50 clients not reading (at start {} MiB)",
        peak >> 20,
        base >> 20
    );
    assert!(
        peak < 256 << 20,
        "RSS {} MiB with 50 clients not reading (at start {} MiB)",
        peak >> 20,
        base >> 20
    );
    drop(greedy);
    drop(c);
    srv.terminate();
}

/// `daemon`'s NBD server allows 100 clients by default, as
/// qemu-storage-daemon: the 101st waits.
#[test]
fn daemon_allows_a_hundred_clients_as_qsd() {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    sparse_file(&img, 1 << 20);
    let mut greeted = Vec::new();
    for program in ["qemu-storage-daemon", TIDEMARK] {
        let sock = dir.path().join("n.sock");
        let mut cmd = Command::new(program);
        if program == TIDEMARK {
            cmd.arg("daemon");
        }
        let mut child = Reaped(
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=f",
                    img.display()
                ))
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", sock.display()))
                .arg("--export")
                .arg("type=nbd,id=e,node-name=f,name=x")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "{program} did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let conns: Vec<UnixStream> = (0..110)
            .map(|_| UnixStream::connect(&sock).expect("connect"))
            .collect();
        let mut n = 0;
        for (i, c) in conns.iter().enumerate() {
            let wait = if i < 100 { 10_000 } else { 300 };
            c.set_read_timeout(Some(Duration::from_millis(wait)))
                .expect("timeout");
            let mut greeting = [0u8; 16];
            if (&*c).read_exact(&mut greeting).is_ok() {
                n += 1;
            }
        }
        greeted.push(n);
        drop(conns);
        signal(child.0.id(), libc::SIGTERM);
        assert!(wait_with_deadline(&mut child.0, Duration::from_secs(20)).is_some());
        let _ = std::fs::remove_file(&sock);
    }
    assert_eq!(greeted, [100, 100], "greeted by qsd, by tidemark");
}

/// `serve` allows one client, as qemu-nbd (and so offers no multi-conn).
#[test]
fn serve_allows_one_client_as_qemu_nbd() {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    sparse_file(&img, 1 << 20);
    let opts = ServeOpts::read_write();
    let mut flags = Vec::new();
    for kind in [Kind::QemuNbd, Kind::Tidemark] {
        let srv = Server::start(kind, &img, &opts);
        let out = output(tool("nbdinfo").args(["--can", "multi-conn", &srv.uri()]));
        flags.push(out.status.code());
        let mut c = Conn::new(srv.connect());
        c.open("");
        // A second client waits in the backlog: no greeting comes.
        let second = srv.connect();
        second
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        let got = (&second).read(&mut byte);
        assert!(got.is_err(), "{kind:?} greeted a second client: {got:?}");
        drop(c);
        // Once the first is gone, it is served.
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut greeting = [0u8; 16];
        (&second).read_exact(&mut greeting).expect("greeting");
    }
    assert_eq!(flags[0], flags[1]);
}
