//! tidemark's dirty bitmaps against qemu-storage-daemon's: the same writes
//! must give the same `x-debug-block-dirty-bitmap-sha256`, the same `count`,
//! the same merge result across granularities, and the same error texts.
//!
//! Each test starts its own daemon on sockets in a temporary directory. The
//! daemon runs with `--daemonize`, whose parent exits only once every socket
//! listens, so the test waits for that exit (with a timeout) instead of
//! sleeping; dropping the handle sends `quit`, waits on a pidfd for the
//! daemon to exit, and kills it by its pid if it does not.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use tidemark::bitmap::{Checks, DirtyBitmap};

const TIMEOUT: Duration = Duration::from_secs(30);
const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Runs a command to completion, killing it if it outlives `TIMEOUT`.
fn run(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(out) => out.expect("wait for child"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child we started and have not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {TIMEOUT:?}");
        }
    }
}

/// A qemu-storage-daemon with one raw node `n{i}` per image, each exported
/// writable over NBD as `x{i}`, and a QMP monitor.
struct Qsd {
    dir: tempfile::TempDir,
    pid: libc::pid_t,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qsd {
    fn start(image_sizes: &[u64]) -> Qsd {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let mut cmd = Command::new("qemu-storage-daemon");
        for (i, &size) in image_sizes.iter().enumerate() {
            let img = path(&format!("img{i}"));
            std::fs::File::create(&img)
                .and_then(|f| f.set_len(size))
                .expect("create image");
            cmd.arg("--blockdev")
                .arg(format!("driver=file,node-name=f{i},filename={img}"))
                .arg("--blockdev")
                .arg(format!("driver=raw,node-name=n{i},file=f{i}"));
        }
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                path("qmp.sock")
            ))
            .arg("--monitor")
            .arg("chardev=m")
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", path("nbd.sock")));
        for i in 0..image_sizes.len() {
            cmd.arg("--export").arg(format!(
                "type=nbd,id=e{i},node-name=n{i},name=x{i},writable=on"
            ));
        }
        cmd.arg("--daemonize").arg("--pidfile").arg(path("qsd.pid"));
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "qemu-storage-daemon failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(path("qsd.pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        let writer = UnixStream::connect(path("qmp.sock")).expect("connect QMP");
        writer.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let reader = BufReader::new(writer.try_clone().expect("clone"));
        let mut qsd = Qsd {
            dir,
            pid,
            reader,
            writer,
        };
        let greeting = qsd.read_message();
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        qsd.ok("qmp_capabilities", json!({}));
        qsd
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).expect("QMP JSON")
    }

    /// Sends a command and returns its `return` or `error` object.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}").expect("write QMP");
        loop {
            let reply = self.read_message();
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(err["desc"].as_str().unwrap_or_default().to_owned());
            }
            // An event: keep reading.
        }
    }

    fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments)
            .unwrap_or_else(|e| panic!("{command} failed: {e}"))
    }

    fn add_bitmap(&mut self, node: &str, name: &str, granularity: u64) {
        self.ok(
            "block-dirty-bitmap-add",
            json!({"node": node, "name": name, "granularity": granularity}),
        );
    }

    fn sha256(&mut self, node: &str, name: &str) -> String {
        let ret = self.ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": node, "name": name}),
        );
        ret["sha256"].as_str().expect("sha256").to_owned()
    }

    /// The `count` that query-named-block-nodes reports for a bitmap.
    fn count(&mut self, node: &str, name: &str) -> u64 {
        let nodes = self.ok("query-named-block-nodes", json!({}));
        let node = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node))
            .expect("node listed");
        let bitmap = node["dirty-bitmaps"]
            .as_array()
            .and_then(|a| a.iter().find(|b| b["name"] == name))
            .expect("bitmap listed");
        bitmap["count"].as_u64().expect("count")
    }

    fn nbd_socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// Writes the ranges through the NBD export of image `i` with qemu-io.
    fn write(&self, i: usize, ranges: &[(u64, u64)]) {
        let uri = format!("nbd+unix:///x{i}?socket={}", self.nbd_socket().display());
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &uri]);
        for (offset, len) in ranges {
            cmd.arg("-c").arg(format!("write -q {offset} {len}"));
        }
        let out = run(&mut cmd);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "qemu-io failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Waits until process `pid` has exited (it need not be our child), up to
/// `TIMEOUT`: a pidfd becomes readable when its process exits. Returns
/// whether it has.
fn wait_exit(pid: libc::pid_t) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // ESRCH: already gone (and reaped).
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    let fd = fd as libc::c_int;
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; then closing the fd we own.
    let ready = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as libc::c_int) } == 1;
    unsafe { libc::close(fd) };
    ready
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = writeln!(self.writer, "{}", json!({"execute": "quit"}));
        if !wait_exit(self.pid) {
            // SAFETY: kill(2) on the daemon's own pid, read from its pid file.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            wait_exit(self.pid);
        }
    }
}

/// Deterministic pseudo-random writes (offset and length multiples of 512,
/// mostly not aligned to the granularity), all within `size`.
fn scattered_writes(size: u64, count: usize, seed: u64) -> Vec<(u64, u64)> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let sectors = size / 512;
    (0..count)
        .map(|_| {
            let start = next() % sectors;
            let len = 1 + next() % 64.min(sectors - start);
            (start * 512, len * 512)
        })
        .collect()
}

fn tidemark_bitmap(size: u64, granularity: u64, writes: &[(u64, u64)]) -> DirtyBitmap {
    let mut b = DirtyBitmap::new("b0", size, granularity).expect("new bitmap");
    for &(offset, len) in writes {
        b.set_range(offset, len).expect("set range");
    }
    b
}

fn assert_same(qsd: &mut Qsd, node: &str, name: &str, ours: &DirtyBitmap, what: &str) {
    assert_eq!(qsd.sha256(node, name), ours.sha256(), "sha256 of {what}");
    assert_eq!(qsd.count(node, name), ours.count(), "count of {what}");
}

/// Sizes that are and are not multiples of granularity * 64 (a whole word),
/// including a partial last granule, at granularities from 512 B to 1 MiB.
#[test]
fn sha256_and_count_match_qemu_storage_daemon() {
    let cases: &[(u64, u64)] = &[
        (M, 64 * K),                       // 16 granules: one partial word
        (64 * K * 64 * 3 + 4 * K, 64 * K), // 3 words plus a partial granule
        (10 * M + 512, 512),               // 20481 granules
        (7 * M + 3 * 512, 4 * K),          // partial last granule
        (128 * M, M),                      // exactly two words
        (512, 2 * K * M),                  // one 2 GiB granule over 512 bytes
    ];
    let sizes: Vec<u64> = cases.iter().map(|c| c.0).collect();
    let mut qsd = Qsd::start(&sizes);
    for (i, &(size, granularity)) in cases.iter().enumerate() {
        let node = format!("n{i}");
        qsd.add_bitmap(&node, "b0", granularity);
        let empty = tidemark_bitmap(size, granularity, &[]);
        assert_same(&mut qsd, &node, "b0", &empty, "an empty bitmap");

        let mut writes = scattered_writes(size, 40, i as u64 + 1);
        // The very last sector, and a first sector.
        writes.push((size - 512, 512));
        writes.push((0, 512));
        qsd.write(i, &writes);
        let ours = tidemark_bitmap(size, granularity, &writes);
        let what = format!("size {size} granularity {granularity}");
        assert_same(&mut qsd, &node, "b0", &ours, &what);
    }
}

#[test]
fn byte_unaligned_writes_dirty_the_granules_they_touch() {
    let size = 3 * M;
    let mut qsd = Qsd::start(&[size]);
    qsd.add_bitmap("n0", "b0", 64 * K);
    let writes = [(1000, 10), (64 * K - 1, 2), (2 * M + 12345, 70000)];
    qsd.write(0, &writes);
    let ours = tidemark_bitmap(size, 64 * K, &writes);
    assert_same(&mut qsd, "n0", "b0", &ours, "unaligned writes");
}

#[test]
fn merge_across_granularities_matches_qemu() {
    let size = 5 * M + 512;
    let mut qsd = Qsd::start(&[size]);
    qsd.add_bitmap("n0", "b0", 64 * K);
    let writes = scattered_writes(size, 30, 99);
    qsd.write(0, &writes);
    let src = tidemark_bitmap(size, 64 * K, &writes);
    for (name, granularity) in [("fine", 512), ("mid", 16 * K), ("coarse", M)] {
        qsd.add_bitmap("n0", name, granularity);
        // Start from other dirt in the target, then merge b0 into it.
        let other = [(size - 512, 512)];
        let mut ours = tidemark_bitmap(size, granularity, &other);
        // Recording targets also see this write.
        qsd.write(0, &other);
        qsd.ok(
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": name, "bitmaps": ["b0"]}),
        );
        let mut src_now = src.clone();
        src_now.set_range(size - 512, 512).expect("set");
        ours.merge(&src_now).expect("merge");
        assert_same(&mut qsd, "n0", name, &ours, name);
    }
}

#[test]
fn errors_use_qemu_texts() {
    let mut qsd = Qsd::start(&[M, 2 * M]);
    qsd.add_bitmap("n0", "b0", 64 * K);
    qsd.add_bitmap("n1", "c0", 64 * K);

    // Merge of different sizes.
    let theirs = qsd
        .execute(
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": "b0",
                   "bitmaps": [{"node": "n1", "name": "c0"}]}),
        )
        .expect_err("merge of different sizes must fail");
    let mut b0 = DirtyBitmap::new("b0", M, 64 * K).expect("b0");
    let c0 = DirtyBitmap::new("c0", 2 * M, 64 * K).expect("c0");
    assert_eq!(
        b0.merge(&c0).expect_err("ours must fail too").message,
        theirs
    );

    // Granularity.
    for granularity in [256, 1000, 3 * 65536] {
        let theirs = qsd
            .execute(
                "block-dirty-bitmap-add",
                json!({"node": "n0", "name": "g", "granularity": granularity}),
            )
            .expect_err("bad granularity");
        let ours = DirtyBitmap::new("g", M, granularity).expect_err("bad granularity");
        assert_eq!(ours.message, theirs);
    }

    // Busy: a disabled bitmap exported over NBD is in use.
    qsd.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "n0", "name": "b0"}),
    );
    qsd.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "ro", "node-name": "n0", "name": "ro",
               "bitmaps": ["b0"]}),
    );
    let theirs = qsd
        .execute(
            "block-dirty-bitmap-clear",
            json!({"node": "n0", "name": "b0"}),
        )
        .expect_err("busy bitmap cannot be cleared");
    b0.state.busy = true;
    assert_eq!(b0.check(Checks::DEFAULT).expect_err("busy").message, theirs);
}

#[test]
fn the_daemon_is_gone_after_drop() {
    let qsd = Qsd::start(&[M]);
    let pid = qsd.pid;
    let dir: PathBuf = qsd.dir.path().to_owned();
    drop(qsd);
    // Gone, or a zombie waiting for its reaper: never still running.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        assert_eq!(state, Some("Z"), "daemon {pid} still running: {stat}");
    }
    assert!(!dir.exists(), "temporary directory removed");
}
