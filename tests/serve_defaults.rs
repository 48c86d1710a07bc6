//! Check 8: the README's first command, as a new user runs it. `tidemark
//! serve` with no arguments, in an empty directory, creates its demo image
//! (a qcow2 with a recording checkpoint), listens on ./tidemark.sock and
//! takes QMP on ./tidemark-qmp.sock, answers `nbdinfo
//! nbd+unix:///?socket=./tidemark.sock`, runs the README's backup
//! walkthrough, and on SIGTERM or SIGINT exits 0 and removes its sockets.

mod common;

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::wire::Conn;
use common::{run, tool, wait_with_deadline, TIDEMARK};
use tempfile::TempDir;

/// `tidemark serve` with no arguments, run in `cwd`; logs go to a separate
/// temp dir so the working directory holds only what tidemark creates.
struct Bare {
    child: Child,
    cwd: PathBuf,
    log: PathBuf,
    _logdir: TempDir,
}

impl Bare {
    fn start(cwd: &Path) -> Bare {
        let logdir = common::temp_dir();
        let log = logdir.path().join("serve.log");
        let f = File::create(&log).unwrap();
        let child = Command::new(TIDEMARK)
            .arg("serve")
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn tidemark serve");
        let mut b = Bare {
            child,
            cwd: cwd.to_path_buf(),
            log,
            _logdir: logdir,
        };
        b.wait_ready();
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.cwd.join("tidemark.sock")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "`tidemark serve` exited ({st}) before listening\n--- log ---\n{}",
                    self.log()
                );
            }
            if UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`tidemark serve` did not accept on ./tidemark.sock within 30s\n--- log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send `sig`; the process must exit 0 within 20 s.
    fn stop_with(&mut self, sig: libc::c_int) {
        common::signal(self.child.id(), sig);
        let st =
            wait_with_deadline(&mut self.child, Duration::from_secs(20)).unwrap_or_else(|| {
                panic!(
                    "`tidemark serve` still running 20s after signal {sig}\n--- log ---\n{}",
                    self.log()
                )
            });
        assert!(
            st.success(),
            "`tidemark serve` exited with {st} after signal {sig}, expected status 0\n--- log ---\n{}",
            self.log()
        );
        assert!(
            !self.socket().exists(),
            "./tidemark.sock is still there after exit on signal {sig}"
        );
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `nbdinfo nbd+unix:///?socket=./tidemark.sock`, run in `cwd`.
fn nbdinfo_relative(cwd: &Path, extra: &[&str]) -> String {
    run(tool("nbdinfo")
        .args(extra)
        .arg("nbd+unix:///?socket=./tidemark.sock")
        .current_dir(cwd))
}

#[test]
fn serve_without_arguments_works_with_nbdinfo_and_exits_0_on_sigterm() {
    let cwd = common::temp_dir();
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
    let mut s = Bare::start(cwd.path());

    let info = nbdinfo_relative(cwd.path(), &[]);
    let demo = cwd.path().join("tidemark-demo.qcow2");
    assert!(
        demo.exists(),
        "no tidemark-demo.qcow2 in the working directory"
    );
    let demo_size = 64 << 20;
    assert!(
        info.contains(&format!("export-size: {demo_size}")),
        "nbdinfo does not show the demo image's size {demo_size}:\n{info}"
    );
    assert!(
        info.contains("export=\"\":"),
        "default export is not the empty name:\n{info}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&nbdinfo_relative(cwd.path(), &["--json"])).unwrap();
    assert_eq!(json["exports"][0]["is_read_only"], false, "{json:#}");

    s.stop_with(libc::SIGTERM);
    assert!(demo.exists(), "demo image must survive shutdown");
    assert!(!cwd.path().join("tidemark-qmp.sock").exists());
}

/// The README's walkthrough: write, begin a session, map its bitmap, pull
/// it, end it.
#[test]
fn readme_backup_walkthrough_pulls_what_was_written() {
    let cwd = common::temp_dir();
    let mut s = Bare::start(cwd.path());
    let uri = "nbd+unix:///?socket=./tidemark.sock";
    run(tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", uri])
        .current_dir(cwd.path()));
    let begin = run(tool(TIDEMARK)
        .args(["qmp", "./tidemark-qmp.sock", "x-tidemark-backup-begin"])
        .arg(r#"{"id": "b1", "disks": [{"node": "drive0"}], "incremental": "demo", "checkpoint": "b1"}"#)
        .current_dir(cwd.path()));
    assert!(begin.contains(r#""dirty-bytes": 65536"#), "{begin}");
    let backup = "nbd+unix:///b1-drive0?socket=./tidemark.sock";
    let map = run(tool("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:backup-drive0", backup])
        .current_dir(cwd.path()));
    let dirty: Vec<&str> = map.lines().filter(|l| l.contains("dirty")).collect();
    assert_eq!(dirty.len(), 1, "{map}");
    assert!(dirty[0].trim_start().starts_with("1048576"), "{map}");
    run(tool("nbdcopy")
        .args([backup, "backup.raw"])
        .current_dir(cwd.path()));
    let pulled = std::fs::read(cwd.path().join("backup.raw")).unwrap();
    assert_eq!(&pulled[1 << 20..(1 << 20) + 65536], &[0x5a; 65536][..]);
    run(tool(TIDEMARK)
        .args(["qmp", "./tidemark-qmp.sock", "x-tidemark-backup-end"])
        .arg(r#"{"id": "b1", "success": true}"#)
        .current_dir(cwd.path()));
    s.stop_with(libc::SIGTERM);
}

#[test]
fn serve_without_arguments_exits_0_on_sigint() {
    let cwd = common::temp_dir();
    let mut s = Bare::start(cwd.path());
    nbdinfo_relative(cwd.path(), &["--size"]);
    s.stop_with(libc::SIGINT);
}

#[test]
fn sigterm_with_a_connected_client_still_exits_0() {
    let cwd = common::temp_dir();
    let mut s = Bare::start(cwd.path());
    let mut c = Conn::new(UnixStream::connect(s.socket()).unwrap());
    c.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.open("");
    let data = c.read_ok(0, 4096);
    assert_eq!(data.len(), 4096);
    s.stop_with(libc::SIGTERM);
    // The idle client's connection is closed, not left dangling.
    match c.ending() {
        common::wire::Ending::Closed(_) => {}
        common::wire::Ending::StillOpen(got) => {
            panic!("client connection still open after the server exited: {got:02x?}")
        }
    }
}

#[test]
fn demo_image_is_kept_and_reused_across_restarts() {
    let cwd = common::temp_dir();
    let uri = "nbd+unix:///?socket=./tidemark.sock";
    {
        let mut s = Bare::start(cwd.path());
        run(tool("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5c 4096 4096", uri])
            .current_dir(cwd.path()));
        s.stop_with(libc::SIGTERM);
    }
    let mut s = Bare::start(cwd.path());
    let out = run(tool("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5c 4096 4096", uri])
        .current_dir(cwd.path()));
    assert!(
        !out.contains("failed"),
        "data written before the restart is gone: {out}"
    );
    s.stop_with(libc::SIGTERM);
}
