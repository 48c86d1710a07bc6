//! A third-party client: python `qemu.qmp` (PyPI) connects, negotiates,
//! runs commands, gets errors and receives an event, against
//! qemu-storage-daemon and tidemark alike; the outputs must be equal.
//!
//! scripts/test.sh installs qemu.qmp into target/qmp-venv; without that
//! venv (no network) the test says so and passes without running.

mod qmp_common;

use std::path::Path;
use std::process::Command;

use qmp_common::{raw_image, Impl, Instance};

fn venv_python() -> Option<std::path::PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/qmp-venv/bin/python");
    p.exists().then_some(p)
}

fn run(kind: Impl, python: &Path) -> String {
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=disk-file,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=disk,file=disk-file",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let inst = Instance::start(kind, &args, |dir| raw_image(&dir.join("disk.img"), 1 << 20));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp_scripts/qemu_qmp_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&inst.qmp_path)
        .arg(inst.path("nbd.sock"))
        .output()
        .expect("run python");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{kind:?}: qemu.qmp client failed\n{text}\n{}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        inst.log()
    );
    text
}

#[test]
fn qemu_qmp_from_pypi_works_as_with_qsd() {
    let Some(python) = venv_python() else {
        eprintln!("skipped: target/qmp-venv missing (scripts/test.sh installs qemu.qmp)");
        return;
    };
    let qsd = run(Impl::Qsd, &python);
    let tidemark = run(Impl::Tidemark, &python);
    assert!(qsd.contains("BLOCK_EXPORT_DELETED"), "{qsd}");
    assert_eq!(qsd, tidemark);
}
