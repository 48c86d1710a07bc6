//! Check 5: protocol features through python3-libnbd (tests/py/libnbd_features.py):
//! structured reads over holes, DF, REQ_ONE block status, FUA writes, trim
//! then read zeroes, write-zeroes with FAST_ZERO and NO_HOLE, multi-conn
//! consistency across connections, and pipelined requests.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::{describe_failure, output, tool, Kind, ServeOpts, Server, PYTHON};
use tempfile::TempDir;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Must match SIZE and LAYOUT in the script.
const SIZE: u64 = 4 * MIB;
const LAYOUT: [(u64, u64); 3] = [(0, 64 * KIB), (MIB, 64 * KIB), (3 * MIB, MIB)];

/// The image the script expects: data in LAYOUT, holes elsewhere.
fn image() -> (TempDir, PathBuf) {
    let dir = common::temp_dir();
    let path = dir.path().join("disk.raw");
    common::sparse_file(&path, SIZE);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for (off, len) in LAYOUT {
        let data: Vec<u8> = (off..off + len)
            .map(|o| ((o / 4096 + 1) % 251 + 1) as u8)
            .collect();
        f.write_all_at(&data, off).unwrap();
    }
    f.sync_all().unwrap();
    (dir, path)
}

fn run_check(check: &str) {
    let (_dir, path) = image();
    let server = Server::start_under_test(&path, &ServeOpts::read_write());
    let mut cmd = tool(PYTHON);
    cmd.arg(common::py_script("libnbd_features.py"))
        .arg(check)
        .arg(server.uri())
        .arg(&path);
    if server.kind == Kind::Tidemark {
        cmd.arg("--multi-conn");
    }
    let out = output(&mut cmd);
    if !out.status.success() {
        panic!(
            "{}\n--- {:?} server log ---\n{}",
            describe_failure(&cmd, &out),
            server.kind,
            server.log()
        );
    }
    let mut server = server;
    server.assert_alive();
}

#[test]
fn structured_read_sends_holes_as_hole_chunks() {
    run_check("structured_read_over_holes");
}

#[test]
fn df_read_comes_as_a_single_chunk() {
    run_check("df_read_is_one_chunk");
}

#[test]
fn block_status_req_one_returns_exactly_one_extent() {
    run_check("block_status_req_one");
}

#[test]
fn fua_write_is_in_the_file_when_acknowledged() {
    run_check("fua_writes");
}

#[test]
fn trimmed_range_reads_as_zeroes() {
    run_check("trim_then_read_zeroes");
}

#[test]
fn write_zeroes_with_fast_zero_succeeds_or_fails_with_enotsup() {
    run_check("zero_fast_zero_and_no_hole");
}

#[test]
fn multi_conn_write_and_flush_on_one_connection_is_seen_on_another() {
    run_check("multi_conn_flush_is_visible_on_other_connection");
}

#[test]
fn pipelined_requests_all_complete_with_the_right_data() {
    run_check("pipelined_requests_complete_out_of_order");
}
