//! Check 1: `nbdinfo --json` (and `--list --json`) sees the same export from
//! tidemark as from qemu-nbd 10.0.2 serving the same raw file: size, block
//! sizes, contexts, transmission flags and can_* fields. The one deliberate
//! difference: tidemark advertises CAN_MULTI_CONN (qemu-nbd's default
//! `--shared=1` does not), which is asserted on its own.

mod common;

use std::path::Path;

use common::{describe_failure, output, tool, Kind, ServeOpts, Server};
use serde_json::Value;

/// What nbdinfo reported: its JSON, plus the raw transmission flags of every
/// export it opened (from libnbd's debug log, "eflags: 0x...").
struct Report {
    json: Value,
    eflags: Vec<u16>,
}

fn nbdinfo(server: &Server, list: bool) -> Report {
    let mut cmd = tool("nbdinfo");
    cmd.env("LIBNBD_DEBUG", "1").arg("--json");
    if list {
        cmd.arg("--list");
    }
    cmd.arg(server.uri());
    let out = output(&mut cmd);
    if !out.status.success() {
        panic!(
            "{}\n--- {:?} server log ---\n{}",
            describe_failure(&cmd, &out),
            server.kind,
            server.log()
        );
    }
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Make the JSON independent of where the socket lives.
    let stdout = stdout.replace(&server.socket().display().to_string(), "SOCKET");
    let json: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("nbdinfo output is not JSON ({e}):\n{stdout}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let eflags = stderr
        .lines()
        .filter(|l| {
            l.contains("nbd_opt_go: exportsize:") || l.contains("nbd_opt_info: exportsize:")
        })
        .filter_map(|l| l.split("eflags: 0x").nth(1))
        .map(|h| u16::from_str_radix(h.trim(), 16).unwrap_or_else(|e| panic!("eflags {h:?}: {e}")))
        .collect::<Vec<_>>();
    assert!(
        !eflags.is_empty(),
        "no 'eflags:' line in libnbd debug output:\n{stderr}"
    );
    Report { json, eflags }
}

fn exports(v: &Value) -> &Vec<Value> {
    v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array in {v:#}"))
}

/// Serve `image` with qemu-nbd and then with tidemark (one at a time: each
/// locks the image as qemu does) and compare what nbdinfo sees.
fn compare(image: &Path, opts: &ServeOpts, list: bool) {
    let qemu = {
        let server = Server::start(Kind::QemuNbd, image, opts);
        nbdinfo(&server, list)
    };
    let ours = {
        let server = Server::start(Kind::under_test(), image, opts);
        nbdinfo(&server, list)
    };

    // Both allow one client by default, so neither offers multi-conn:
    // the whole output matches.
    let (qemu_json, our_json) = (qemu.json, ours.json);
    assert_eq!(
        our_json,
        qemu_json,
        "nbdinfo --json{} differs (left: server under test, right: qemu-nbd)\n--- ours ---\n{:#}\n--- qemu-nbd ---\n{:#}",
        if list { " --list" } else { "" },
        our_json,
        qemu_json
    );
    assert_eq!(ours.eflags, qemu.eflags, "transmission flags");
}

/// A 64 MiB raw file with some data at the start and the rest sparse.
fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    common::sparse_file(&path, 64 * 1024 * 1024);
    let data = common::pattern(3 * 65536, 1);
    std::fs::write(dir.join("head"), &data).unwrap();
    let out = output(
        std::process::Command::new("dd")
            .arg(format!("if={}", dir.join("head").display()))
            .arg(format!("of={}", path.display()))
            .arg("conv=notrunc")
            .arg("status=none"),
    );
    assert!(out.status.success(), "dd: {out:?}");
    path
}

fn expect_basics(server_kind: Kind, image: &Path, opts: &ServeOpts) {
    let server = Server::start(server_kind, image, opts);
    let r = nbdinfo(&server, false);
    let e = &exports(&r.json)[0];
    assert_eq!(e["export-size"], 64 * 1024 * 1024, "{e:#}");
    assert_eq!(e["block_size_minimum"], 1, "{e:#}");
    assert_eq!(e["block_size_preferred"], 4096, "{e:#}");
    assert_eq!(e["block_size_maximum"], 32 * 1024 * 1024, "{e:#}");
    assert_eq!(e["is_read_only"], opts.read_only, "{e:#}");
    assert_eq!(
        e["contexts"],
        serde_json::json!(["base:allocation"]),
        "{e:#}"
    );
    assert_eq!(r.json["protocol"], "newstyle-fixed");
    assert_eq!(r.json["structured"], true);
}

#[test]
fn nbdinfo_json_matches_qemu_nbd_read_write() {
    let dir = common::temp_dir();
    let img = image(dir.path());
    compare(&img, &ServeOpts::read_write(), false);
}

#[test]
fn nbdinfo_json_matches_qemu_nbd_read_only() {
    let dir = common::temp_dir();
    let img = image(dir.path());
    compare(&img, &ServeOpts::read_only(), false);
}

#[test]
fn nbdinfo_json_matches_qemu_nbd_with_name_and_description() {
    let dir = common::temp_dir();
    let img = image(dir.path());
    let opts = ServeOpts {
        export_name: "vda".into(),
        description: Some("the first disk of a test VM".into()),
        ..ServeOpts::default()
    };
    compare(&img, &opts, false);
}

#[test]
fn nbdinfo_list_json_matches_qemu_nbd() {
    let dir = common::temp_dir();
    let img = image(dir.path());
    let opts = ServeOpts {
        export_name: "vda".into(),
        description: Some("the first disk of a test VM".into()),
        read_only: true,
        ..ServeOpts::default()
    };
    compare(&img, &opts, true);
}

#[test]
fn nbdinfo_list_json_matches_qemu_nbd_default_export_without_description() {
    let dir = common::temp_dir();
    let img = image(dir.path());
    compare(&img, &ServeOpts::read_write(), true);
}

#[test]
fn nbdinfo_reports_size_block_sizes_and_context() {
    let dir = common::temp_dir();
    let img = image(dir.path());
    expect_basics(Kind::under_test(), &img, &ServeOpts::read_write());
    expect_basics(Kind::under_test(), &img, &ServeOpts::read_only());
}

#[test]
fn nbdinfo_list_shows_name_and_description() {
    let dir = common::temp_dir();
    let img = image(dir.path());
    let opts = ServeOpts {
        export_name: "backup-vda".into(),
        description: Some("nightly backup target".into()),
        ..ServeOpts::default()
    };
    let server = Server::start_under_test(&img, &opts);
    let r = nbdinfo(&server, true);
    let ex = exports(&r.json);
    assert_eq!(ex.len(), 1, "{:#}", r.json);
    assert_eq!(ex[0]["export-name"], "backup-vda");
    assert_eq!(ex[0]["description"], "nightly backup target");
}
