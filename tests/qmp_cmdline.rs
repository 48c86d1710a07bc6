//! qemu-storage-daemon's command line: a backup script written for qsd
//! (--blockdev keyval and JSON, --nbd-server, --export, --chardev,
//! --monitor, --pidfile, --daemonize) runs unchanged with
//! `tidemark daemon` as the binary, and prints the same.

use std::path::Path;
use std::process::Command;

const TIDEMARK: &str = env!("CARGO_BIN_EXE_tidemark");

fn run_script(daemon: &str) -> String {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp_scripts");
    let dir = tempfile::Builder::new()
        .prefix("tidemark-qsd-script-")
        .tempdir()
        .expect("temp dir");
    let out = Command::new("sh")
        .arg(scripts.join("incremental_backup.sh"))
        .arg(dir.path())
        .env("DAEMON", daemon)
        .env("QMP_SEND", scripts.join("qmp_send.py"))
        .output()
        .expect("run script");
    let text =
        String::from_utf8_lossy(&out.stdout).replace(&dir.path().display().to_string(), "$DIR");
    assert!(
        out.status.success(),
        "{daemon}: script failed\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Daemonized: the pidfile names a process that must be gone after quit.
    if let Ok(pid) = std::fs::read_to_string(dir.path().join("daemon.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            assert!(!alive, "{daemon}: still running after quit");
        }
    }
    text
}

#[test]
fn qsd_backup_script_runs_unchanged_as_tidemark_daemon() {
    let qsd = run_script("qemu-storage-daemon");
    let tidemark = run_script(&format!("{TIDEMARK} daemon"));
    assert!(qsd.contains("dirty"), "the script did not run:\n{qsd}");
    assert_eq!(qsd, tidemark);
}
