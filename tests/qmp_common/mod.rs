//! Harness for the QMP tests: start qemu-storage-daemon or `tidemark
//! daemon` with the same command line, talk QMP to it, normalise replies.
//!
//! Readiness is the pidfile: both daemons write it only after every option
//! (monitor sockets included) is set up, and the harness waits for it with
//! inotify and a deadline, never with a sleep.

#![allow(dead_code)]

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

pub const TIDEMARK: &str = env!("CARGO_BIN_EXE_tidemark");
const START_DEADLINE: Duration = Duration::from_secs(20);
const REPLY_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Qsd,
    Tidemark,
}

impl Impl {
    pub fn program(self) -> Command {
        match self {
            Impl::Qsd => Command::new("qemu-storage-daemon"),
            Impl::Tidemark => {
                let mut c = Command::new(TIDEMARK);
                c.arg("daemon");
                c
            }
        }
    }
}

/// `args` for a run whose transcript is compared with qsd's: tidemark's
/// intent log off, so bitmaps reach the image only when qemu's would (a
/// store point after a bitmap command changes file sizes qsd reports).
pub fn as_qemu(kind: Impl, args: &[String]) -> Vec<String> {
    let mut v = args.to_vec();
    if kind == Impl::Tidemark {
        v.extend(["--bitmap-intent-log".to_owned(), "off".to_owned()]);
    }
    v
}

/// A running daemon in its own temp dir; killed and cleaned up on drop.
pub struct Instance {
    pub kind: Impl,
    child: Child,
    pub dir: TempDir,
    pub qmp_path: PathBuf,
    log: PathBuf,
}

impl Instance {
    /// Starts `kind` with `args` (where `$DIR` stands for the instance's
    /// directory) plus a monitor on `$DIR/qmp.sock` and a pidfile. `setup`
    /// runs first, to create images in the directory.
    pub fn start(kind: Impl, args: &[String], setup: impl FnOnce(&Path)) -> Instance {
        Self::start_with_monitors(kind, args, 1, setup)
    }

    /// As `start`, with `monitors` monitor sockets: a qemu chardev serves
    /// one client at a time, so concurrent clients need a monitor each
    /// (`$DIR/qmp.sock`, `$DIR/qmp1.sock`, ...).
    pub fn start_with_monitors(
        kind: Impl,
        args: &[String],
        monitors: usize,
        setup: impl FnOnce(&Path),
    ) -> Instance {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-qmp-")
            .tempdir()
            .expect("temp dir");
        setup(dir.path());
        let qmp_path = dir.path().join("qmp.sock");
        let pidfile = dir.path().join("daemon.pid");
        let log = dir.path().join("daemon.log");
        let d = dir.path().display().to_string();
        let mut cmd = kind.program();
        for a in args {
            cmd.arg(a.replace("$DIR", &d));
        }
        for k in 0..monitors.max(1) {
            cmd.arg("--chardev")
                .arg(format!(
                    "socket,id=qmp{k},path={},server=on,wait=off",
                    monitor_path(dir.path(), k).display()
                ))
                .arg("--monitor")
                .arg(format!("chardev=qmp{k}"));
        }
        cmd.arg("--pidfile").arg(&pidfile);
        let log_file = std::fs::File::create(&log).expect("log");
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup"))
            .stderr(log_file);
        let watch = DirWatch::new(dir.path());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut inst = Instance {
            kind,
            child,
            dir,
            qmp_path,
            log,
        };
        wait_for_path(&watch, &pidfile, &mut inst.child, &inst.log);
        inst
    }

    /// The socket of monitor `k`.
    pub fn monitor(&self, k: usize) -> PathBuf {
        monitor_path(self.dir.path(), k)
    }

    /// A connected, negotiated client on monitor `k`.
    pub fn client_on(&self, k: usize) -> Qmp {
        let mut q = Qmp::connect(&self.monitor(k));
        let r = q.cmd(json!({"execute": "qmp_capabilities"}));
        assert_eq!(r, json!({"return": {}}), "negotiation");
        q
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A connected, negotiated client.
    pub fn client(&self) -> Qmp {
        let mut q = Qmp::connect(&self.qmp_path);
        let r = q.cmd(json!({"execute": "qmp_capabilities"}));
        assert_eq!(r, json!({"return": {}}), "negotiation");
        q
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Kills the process with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own (after `quit`).
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        wait_child(&mut self.child, limit)
    }

    /// NBD URI of an export on the instance's NBD socket.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.path("nbd.sock").display()
        )
    }
}

fn monitor_path(dir: &Path, k: usize) -> PathBuf {
    if k == 0 {
        dir.join("qmp.sock")
    } else {
        dir.join(format!("qmp{k}.sock"))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (on a pidfd, with a deadline) for `child` to exit on its own.
pub fn wait_child(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let pidfd = PidFd::open(child.id());
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        pidfd.wait(Duration::from_millis(200));
    }
}

/// A QMP client over a unix socket. Events that arrive while waiting for a
/// reply are kept for [`Qmp::event`].
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub greeting: Value,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path:?}: {e}"));
        s.set_read_timeout(Some(REPLY_DEADLINE)).expect("timeout");
        let writer = s.try_clone().expect("clone");
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
        };
        q.greeting = q.recv().expect("greeting");
        q
    }

    /// Another handle on the socket, to write from another thread.
    pub fn writer(&self) -> UnixStream {
        self.writer.try_clone().expect("clone socket")
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// The next JSON line, or None at EOF or timeout.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}")),
            ),
        }
    }

    /// The next reply that is not an event.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.recv().expect("reply before deadline");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn cmd(&mut self, v: Value) -> Value {
        let mut bytes = serde_json::to_vec(&v).expect("json");
        bytes.push(b'\n');
        self.send_raw(&bytes);
        self.reply()
    }

    pub fn exec(&mut self, name: &str, args: Value) -> Value {
        self.cmd(json!({"execute": name, "arguments": args}))
    }

    /// The next event named `name` (earlier ones of other names are kept).
    pub fn event(&mut self, name: &str) -> Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            let v = self
                .recv()
                .unwrap_or_else(|| panic!("no {name} event before deadline"));
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Whether the server closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.get_mut().read(&mut b), Ok(0))
    }
}

/// Normalises a reply for comparison across implementations: version
/// strings, timestamps, auto-generated node names and the instance's
/// directory.
pub fn normalise(v: &Value, dir: &Path) -> Value {
    let d = dir.display().to_string();
    match v {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, x) in m {
                let x = match k.as_str() {
                    "package" => json!("PACKAGE"),
                    "timestamp" => json!("TIMESTAMP"),
                    _ => normalise(x, dir),
                };
                out.insert(k.clone(), x);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| normalise(x, dir)).collect()),
        Value::String(s) => {
            let s = s.replace(&d, "$DIR");
            Value::String(auto_node_names(&s))
        }
        _ => v.clone(),
    }
}

fn auto_node_names(s: &str) -> String {
    let Some(i) = s.find("#block") else {
        return s.to_owned();
    };
    let rest = &s[i + 6..];
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    // Already normalised (`#blockN`, as scenarios spell it): kept as is.
    let rest = rest[digits..]
        .strip_prefix('N')
        .filter(|_| digits == 0)
        .unwrap_or(&rest[digits..]);
    format!("{}#blockN{}", &s[..i], auto_node_names(rest))
}

/// `nbdinfo --map=CONTEXT` of an export, as text.
pub fn nbd_map(uri: &str, context: &str) -> String {
    let out = Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(uri)
        .output()
        .expect("run nbdinfo");
    assert!(
        out.status.success(),
        "nbdinfo --map={context} {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-io commands against an NBD export (writes that bitmaps record).
pub fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    let out = c.output().expect("run qemu-io");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu-io {cmds:?} {uri}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates an empty qcow2 image with qemu-img.
pub fn qcow2_image(path: &Path, size: u64) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img create: {out:?}");
}

/// Creates a qcow2 image holding persistent bitmap `name` marked in use, as
/// a crash leaves it: qemu-storage-daemon opens it read-write (which marks
/// the stored bitmaps in use on disk) and is killed once ready.
pub fn qcow2_with_stale_bitmap(path: &Path, size: u64, name: &str) {
    qcow2_image(path, size);
    let out = Command::new("qemu-img")
        .args(["bitmap", "--add", "-g", "65536"])
        .arg(path)
        .arg(name)
        .output()
        .expect("run qemu-img bitmap");
    assert!(out.status.success(), "qemu-img bitmap: {out:?}");
    let args = vec![
        "--blockdev".to_owned(),
        format!("driver=file,node-name=f,filename={}", path.display()),
        "--blockdev".to_owned(),
        "driver=qcow2,node-name=q,file=f".to_owned(),
    ];
    // Dropping the instance kills it with SIGKILL: no clean close.
    drop(Instance::start(Impl::Qsd, &args, |_| {}));
}

/// Creates a sparse raw image.
pub fn raw_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// Waits until `path` exists (it appears in the directory `watch` watches),
/// panicking with the log if `child` exits first or the deadline passes.
pub fn wait_for_path(watch: &DirWatch, path: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + START_DEADLINE;
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    while !path.exists() {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("exited ({st}) at start:\n{}", log());
        }
        assert!(Instant::now() < deadline, "not ready in time:\n{}", log());
        watch.wait(Duration::from_millis(200));
    }
}

/// Waits for changes in a directory (inotify), so readiness is a kernel
/// event with a deadline rather than a guessed sleep.
pub struct DirWatch {
    fd: i32,
}

impl DirWatch {
    pub fn new(dir: &Path) -> DirWatch {
        // SAFETY: plain syscalls on an fd we own; the path is NUL-terminated.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK);
            assert!(fd >= 0, "inotify_init1");
            let p = CString::new(dir.as_os_str().as_bytes()).expect("path");
            libc::inotify_add_watch(
                fd,
                p.as_ptr(),
                libc::IN_CREATE | libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO,
            );
            DirWatch { fd }
        }
    }

    pub fn wait(&self, limit: Duration) {
        poll_fd(self.fd, limit);
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer we own; non-blocking fd.
        unsafe {
            libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len());
        }
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        // SAFETY: closing our own fd once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// A pidfd: readable when the process exits.
struct PidFd {
    fd: i32,
}

impl PidFd {
    fn open(pid: u32) -> PidFd {
        // SAFETY: pidfd_open syscall with a pid we spawned.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as i32;
        PidFd { fd }
    }

    fn wait(&self, limit: Duration) {
        if self.fd >= 0 {
            poll_fd(self.fd, limit);
        }
    }
}

impl Drop for PidFd {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: closing our own fd once.
            unsafe {
                libc::close(self.fd);
            }
        }
    }
}

fn poll_fd(fd: i32, limit: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    unsafe {
        libc::poll(&mut p, 1, limit.as_millis() as i32);
    }
}

impl Instance {
    /// The daemon's process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has exited (after `wait_exit`).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Qmp {
    /// The oldest event not yet taken (kept ones first, in arrival order),
    /// or None if none arrives before `deadline` or the connection ends.
    pub fn next_event_until(&mut self, deadline: Instant) -> Option<Value> {
        if !self.events.is_empty() {
            return Some(self.events.remove(0));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let sock = self.reader.get_ref();
        sock.set_read_timeout(Some(left)).expect("timeout");
        let v = self.recv();
        let sock = self.reader.get_ref();
        sock.set_read_timeout(Some(REPLY_DEADLINE))
            .expect("timeout");
        match v {
            Some(v) if v.get("event").is_some() => Some(v),
            Some(v) => panic!("a reply while only events were due: {v}"),
            None => None,
        }
    }
}
