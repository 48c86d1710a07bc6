//! Shared harness for the integration tests: start a server (tidemark, or
//! qemu-nbd as the reference) on a fresh unix socket in a temp dir, wait until
//! it speaks NBD, and tear everything down on drop. Plus helpers that run the
//! stock tools (nbdinfo, nbdcopy, qemu-img, ...) and fail with everything a
//! reader needs: the command line, the exit status, stdout and stderr.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod rng;
pub mod wire;

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The tidemark binary built by cargo for this test run.
pub const TIDEMARK: &str = env!("CARGO_BIN_EXE_tidemark");

/// Debian's python3, the one that has python3-libnbd (the pyenv `python3`
/// on PATH does not).
pub const PYTHON: &str = "/usr/bin/python3";

/// How long a server may take to accept its first connection.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Upper bound for any single external command, so a hung server fails the
/// test instead of hanging the suite.
const TOOL_TIMEOUT_SECS: u32 = 180;

/// Which program serves the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tidemark,
    QemuNbd,
}

impl Kind {
    /// The server under test: tidemark, unless `TIDEMARK_TEST_SERVER=qemu-nbd`
    /// asks for the reference instead (a way to check the tests themselves).
    pub fn under_test() -> Kind {
        match std::env::var("TIDEMARK_TEST_SERVER").as_deref() {
            Ok("qemu-nbd") => Kind::QemuNbd,
            Ok("tidemark") | Err(_) => Kind::Tidemark,
            Ok(other) => panic!("TIDEMARK_TEST_SERVER={other:?}: expected tidemark or qemu-nbd"),
        }
    }
}

/// How to serve an image. The same options map onto tidemark's and
/// qemu-nbd's command lines.
#[derive(Clone, Debug, Default)]
pub struct ServeOpts {
    /// Export name; "" is the default export (as in qemu-nbd).
    pub export_name: String,
    /// `--description` / qemu-nbd `-D`.
    pub description: Option<String>,
    /// `--read-only` / qemu-nbd `-r`.
    pub read_only: bool,
    /// `--max-connections` / qemu-nbd `--shared`. None leaves each server's
    /// default (1 for both).
    pub max_connections: Option<u32>,
    /// Image format (`--format` / qemu-nbd `-f`); None means "raw".
    pub format: Option<&'static str>,
    /// Dirty bitmaps to export, in order (`--bitmap` / qemu-nbd `-B`).
    pub bitmaps: Vec<String>,
    /// Also offer `qemu:allocation-depth` (`-A` for both).
    pub allocation_depth: bool,
    /// Require TLS (`--object ... --tls-creds ID [--tls-authz ID]`, the
    /// same on both command lines).
    pub tls: Option<TlsOpts>,
    /// Listen on 127.0.0.1:PORT (tidemark `--listen`, qemu-nbd `-b -p`)
    /// instead of a unix socket. See [`free_tcp_port`].
    pub tcp_port: Option<u16>,
}

/// A server's TLS configuration, as qemu-nbd spells it: QOM objects, then
/// the ids of the credentials and of the optional authorization object.
#[derive(Clone, Debug, Default)]
pub struct TlsOpts {
    /// `--object` values, in order, e.g.
    /// `tls-creds-x509,id=tls0,endpoint=server,dir=D`.
    pub objects: Vec<String>,
    /// `--tls-creds`: the id of a `tls-creds-*` object.
    pub creds: String,
    /// `--tls-authz`: the id of an `authz-*` object.
    pub authz: Option<String>,
}

impl TlsOpts {
    /// `tls-creds-x509,id=tls0,endpoint=server,dir=DIR`.
    pub fn x509(dir: &Path) -> TlsOpts {
        TlsOpts::creds(format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}",
            dir.display()
        ))
    }

    /// `tls-creds-psk,id=tls0,endpoint=server,dir=DIR` (DIR/keys.psk).
    pub fn psk(dir: &Path) -> TlsOpts {
        TlsOpts::creds(format!(
            "tls-creds-psk,id=tls0,endpoint=server,dir={}",
            dir.display()
        ))
    }

    /// One credentials object (its definition must say `id=tls0`).
    pub fn creds(object: String) -> TlsOpts {
        TlsOpts {
            objects: vec![object],
            creds: "tls0".into(),
            authz: None,
        }
    }

    /// Adds an `authz-*` object (its definition must say `id=auth0`) and
    /// `--tls-authz auth0`.
    pub fn with_authz(mut self, object: &str) -> TlsOpts {
        self.objects.push(object.to_string());
        self.authz = Some("auth0".into());
        self
    }

    fn args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for o in &self.objects {
            v.push("--object".to_string());
            v.push(o.clone());
        }
        v.push("--tls-creds".into());
        v.push(self.creds.clone());
        if let Some(a) = &self.authz {
            v.push("--tls-authz".into());
            v.push(a.clone());
        }
        v
    }
}

/// A TCP port on 127.0.0.1 that nobody listens on right now (the kernel's
/// pick for port 0; qemu-nbd cannot report a port 0 it bound itself).
pub fn free_tcp_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

impl ServeOpts {
    pub fn read_write() -> ServeOpts {
        ServeOpts::default()
    }

    pub fn read_only() -> ServeOpts {
        ServeOpts {
            read_only: true,
            ..ServeOpts::default()
        }
    }
}

/// A running NBD server on a private unix socket. Dropping it kills and reaps
/// the process and removes its directory (socket and log).
pub struct Server {
    pub kind: Kind,
    child: Child,
    dir: TempDir,
    socket: PathBuf,
    log: PathBuf,
    export_name: String,
    /// Set when the server listens on TCP instead of `socket`.
    tcp: Option<SocketAddr>,
}

impl Server {
    /// Serve `image` (a raw file) with the server under test, allowing the
    /// many connections the tests rely on (both servers default to one).
    /// The qemu-nbd stand-in also gets discard that really punches holes.
    pub fn start_under_test(image: &Path, opts: &ServeOpts) -> Server {
        let kind = Kind::under_test();
        let mut opts = opts.clone();
        if opts.max_connections.is_none() {
            opts.max_connections = Some(16);
        }
        Server::start(kind, image, &opts)
    }

    /// Serve `image` (a raw file) with `kind`, exactly as `opts` says.
    pub fn start(kind: Kind, image: &Path, opts: &ServeOpts) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-srv-")
            .tempdir()
            .expect("create server temp dir");
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("server.log");
        let tcp = opts
            .tcp_port
            .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)));
        let mut cmd = match kind {
            Kind::Tidemark => {
                let mut c = Command::new(TIDEMARK);
                c.arg("serve");
                match tcp {
                    Some(addr) => c.arg("--listen").arg(addr.to_string()),
                    None => c.arg("--socket").arg(&socket),
                };
                if let Some(tls) = &opts.tls {
                    c.args(tls.args());
                }
                c.arg("--export-name")
                    .arg(&opts.export_name)
                    .arg("--format")
                    .arg(opts.format.unwrap_or("raw"));
                if let Some(d) = &opts.description {
                    c.arg("--description").arg(d);
                }
                for b in &opts.bitmaps {
                    c.arg("--bitmap").arg(b);
                }
                if opts.allocation_depth {
                    c.arg("-A");
                }
                if opts.read_only {
                    c.arg("--read-only");
                }
                if let Some(n) = opts.max_connections {
                    c.arg("--max-connections").arg(n.to_string());
                }
                c.arg(image);
                c
            }
            Kind::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                c.arg("-f").arg(opts.format.unwrap_or("raw"));
                match tcp {
                    Some(addr) => c
                        .arg("-b")
                        .arg(addr.ip().to_string())
                        .arg("-p")
                        .arg(addr.port().to_string()),
                    None => c.arg("-k").arg(&socket),
                };
                if let Some(tls) = &opts.tls {
                    c.args(tls.args());
                }
                c.arg("-x").arg(&opts.export_name).arg("--persistent");
                if let Some(d) = &opts.description {
                    c.arg("-D").arg(d);
                }
                for b in &opts.bitmaps {
                    c.arg("-B").arg(b);
                }
                if opts.allocation_depth {
                    c.arg("-A");
                }
                if opts.read_only {
                    c.arg("-r");
                } else {
                    // qemu-nbd ignores discard by default; tidemark punches holes.
                    c.arg("--discard=unmap");
                }
                if let Some(n) = opts.max_connections {
                    c.arg(format!("--shared={n}"));
                }
                c.arg(image);
                c
            }
        };
        let log_file = File::create(&log).expect("create server log");
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file)
            .env("RUST_LOG", "info");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut server = Server {
            kind,
            child,
            dir,
            socket,
            log,
            export_name: opts.export_name.clone(),
            tcp,
        };
        server.wait_ready(&format!("{cmd:?}"));
        server
    }

    /// Poll until the socket accepts a connection and sends the NBD greeting.
    fn wait_ready(&mut self, what: &str) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "server exited ({status}) before accepting connections: {what}\n--- log ---\n{}",
                    self.log()
                );
            }
            let stream: Option<Box<dyn Read>> = match self.tcp {
                Some(addr) => TcpStream::connect(addr).ok().map(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    Box::new(s) as Box<dyn Read>
                }),
                None => UnixStream::connect(&self.socket).ok().map(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    Box::new(s) as Box<dyn Read>
                }),
            };
            if let Some(mut s) = stream {
                let mut greeting = [0u8; 16];
                match s.read_exact(&mut greeting) {
                    Ok(()) if &greeting == b"NBDMAGICIHAVEOPT" => return,
                    Ok(()) => panic!(
                        "{what}: server greeting is {greeting:02x?}, not NBDMAGIC IHAVEOPT\n--- log ---\n{}",
                        self.log()
                    ),
                    // Accepted and closed: maybe still starting up; retry.
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "server did not accept an NBD connection on {} within {START_DEADLINE:?}: {what}\n--- log ---\n{}",
                    self.address(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    /// The TCP address, for a server started with `tcp_port`.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Where the server listens: `unix:PATH` or `tcp:HOST:PORT`.
    pub fn address(&self) -> String {
        match self.tcp {
            Some(addr) => format!("tcp:{addr}"),
            None => format!("unix:{}", self.socket.display()),
        }
    }

    /// `nbd+unix:///NAME?socket=PATH` for this server's export.
    pub fn uri(&self) -> String {
        unix_uri(&self.export_name, &self.socket)
    }

    /// Everything the server wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panic (with the server log) if the server process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "{:?} server died: {status}\n--- log ---\n{}",
                self.kind,
                self.log()
            );
        }
    }

    /// Open a raw connection to the socket (no handshake yet).
    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket.display()));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Send SIGTERM and wait (bounded) for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        wait_with_deadline(&mut self.child, Duration::from_secs(20)).unwrap_or_else(|| {
            panic!(
                "{:?} server did not exit within 20s of SIGTERM\n--- log ---\n{}",
                self.kind,
                self.log()
            )
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // `dir` (socket, log) is removed by its own Drop after this.
    }
}

/// Send `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Wait for `child` to exit, polling with a deadline; None if it did not.
pub fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `nbd+unix:///NAME?socket=PATH`.
pub fn unix_uri(export_name: &str, socket: &Path) -> String {
    format!("nbd+unix:///{}?socket={}", export_name, socket.display())
}

/// A command wrapped in coreutils `timeout`, so that a hung server cannot hang
/// the suite.
pub fn tool<S: AsRef<OsStr>>(program: S) -> Command {
    let mut c = Command::new("timeout");
    c.arg("-k")
        .arg("5")
        .arg(TOOL_TIMEOUT_SECS.to_string())
        .arg(program);
    c
}

/// Run a command, return its output whatever the exit status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run a command that must succeed; return its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    if !out.status.success() {
        panic!("{}", describe_failure(cmd, &out));
    }
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{cmd:?}: stdout is not UTF-8: {e}"))
}

/// A readable account of a failed command.
pub fn describe_failure(cmd: &Command, out: &Output) -> String {
    let timed_out = if out.status.code() == Some(124) {
        " (TIMED OUT)"
    } else {
        ""
    };
    format!(
        "command failed: {cmd:?}\nstatus: {}{timed_out}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fresh temp dir for a test's files.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("tidemark-test-")
        .tempdir()
        .expect("create temp dir")
}

/// A sparse file of `size` bytes (all zeros, no data allocated).
pub fn sparse_file(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
}

/// A file of `size` bytes from /dev/urandom.
pub fn random_file(path: &Path, size: u64) {
    let mut src = File::open("/dev/urandom").expect("open /dev/urandom");
    let mut dst = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let copied = std::io::copy(&mut (&mut src).take(size), &mut dst).expect("copy random data");
    assert_eq!(copied, size);
    dst.flush().unwrap();
}

/// Deterministic pseudo-random bytes (xorshift), for data we check later.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// sha256 of a file, via sha256sum.
pub fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum printed nothing for {}", path.display()))
        .to_string()
}

/// Path of a helper script in tests/py.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("py")
        .join(name)
}

/// Run a tests/py script with Debian's python3 (which has libnbd); it must
/// exit 0. Returns its stdout.
pub fn run_py(script: &str, args: &[&str]) -> String {
    let mut cmd = tool(PYTHON);
    cmd.arg(py_script(script)).args(args);
    run(&mut cmd)
}

/// A tests/py script on pipes: lines to its stdin, lines from its stdout
/// (read by a thread into `lines`, so that every wait can have a deadline),
/// its stderr in a file for failure messages. Killed and reaped on drop.
pub struct PyScript {
    pub child: Child,
    /// None once closed (which tells most scripts to finish).
    pub stdin: Option<ChildStdin>,
    pub lines: Receiver<String>,
    stderr: PathBuf,
}

impl PyScript {
    /// Starts tests/py/`script` with `args` under Debian's python3, its
    /// stderr going to the file `stderr`.
    pub fn spawn<I, S>(script: &str, args: I, stderr: PathBuf) -> PyScript
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(py_script(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap_or_else(|e| panic!("{stderr:?}: {e}")));
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("script stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        PyScript {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        }
    }

    /// What the script has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next line that starts with one of `prefixes` (others are
    /// skipped), within `within`; the deadline or the script's end fails
    /// the test with its stderr.
    pub fn expect(&self, prefixes: &[&str], within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if prefixes.iter().any(|p| l.starts_with(p)) => return l,
                Ok(_) => {}
                Err(e) => panic!(
                    "no {prefixes:?} line from the script ({e}); stderr: {}",
                    self.stderr()
                ),
            }
        }
    }

    /// Sends one line to the script.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("script stdin");
        writeln!(stdin, "{line}").expect("write to the script");
    }
}

/// Runs `program` with `args` in `dir`; it must exit 0. Its stdout.
pub fn tool_in(dir: &Path, program: &str, args: &[&str]) -> String {
    let mut cmd = tool(program);
    cmd.args(args).current_dir(dir);
    run(&mut cmd)
}

impl Drop for PyScript {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number in the `key` line of /proc/`pid`/status (`VmRSS:`,
/// `Threads:`), its unit dropped.
pub fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Resident memory of `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:") << 10
}
