//! Check 2: nbdcopy round trip. A 256 MiB random file (with a few holes, so
//! nbdcopy also sends zero requests) goes into a writable export and comes
//! back out; the checksums match, with one connection and with four.

mod common;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::{run, sha256, tool, Kind, ServeOpts, Server};

const SIZE: u64 = 256 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// Ranges (offset, length) that are holes in the source file.
const HOLES: [(u64, u64); 3] = [
    (10 * MIB, 3 * MIB),
    (100 * MIB + 4096, 64 * 1024),
    (250 * MIB, 6 * MIB),
];

fn punch(path: &Path, off: u64, len: u64) {
    run(Command::new("fallocate")
        .arg("-p")
        .arg("-o")
        .arg(off.to_string())
        .arg("-l")
        .arg(len.to_string())
        .arg(path));
}

fn round_trip(connections: u32) {
    let dir = common::temp_dir();
    let src = dir.path().join("src.raw");
    let target = dir.path().join("target.raw");
    let back = dir.path().join("back.raw");

    common::random_file(&src, SIZE);
    for (off, len) in HOLES {
        punch(&src, off, len);
    }
    // The target is pre-sized and sparse, except for garbage where the
    // source has holes: only real zero writes make those ranges match.
    common::sparse_file(&target, SIZE);
    {
        let mut f = OpenOptions::new().write(true).open(&target).unwrap();
        for (off, len) in HOLES {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![0xa5; len as usize]).unwrap();
        }
    }

    let server = Server::start_under_test(&target, &ServeOpts::read_write());
    let conns = format!("--connections={connections}");
    // nbdcopy caps connections at its thread count (default: the number of
    // cores), so ask for as many threads as connections.
    let threads = format!("--threads={connections}");
    let mut into = tool("nbdcopy");
    into.arg("-v")
        .arg(&conns)
        .arg(&threads)
        .arg("--flush")
        .arg(&src)
        .arg(server.uri());
    let out = common::output(&mut into);
    assert!(
        out.status.success(),
        "{}",
        common::describe_failure(&into, &out)
            .chars()
            .take(20000)
            .collect::<String>()
    );
    // nbdcopy opens N connections only if the server allows multi-conn,
    // which tidemark does: make sure the copy really ran over all of them.
    if connections > 1 && server.kind == Kind::Tidemark {
        let log = String::from_utf8_lossy(&out.stderr);
        let last = format!("dst{}: nbd_connect_uri", connections - 1);
        assert!(
            log.contains(&format!("connections={connections} ")) && log.contains(&last),
            "nbdcopy {conns} did not open {connections} connections to the export (no {last:?} in its debug log)"
        );
    }
    run(tool("nbdcopy")
        .arg(&conns)
        .arg(&threads)
        .arg(server.uri())
        .arg(&back));

    let want = sha256(&src);
    assert_eq!(
        sha256(&back),
        want,
        "file copied into the export and back differs from the original ({conns})"
    );
    assert_eq!(
        sha256(&target),
        want,
        "the served image file itself differs from the original after nbdcopy --flush ({conns})"
    );
    drop(server);
}

#[test]
fn nbdcopy_round_trip_256m_one_connection() {
    round_trip(1);
}

#[test]
fn nbdcopy_round_trip_256m_four_connections() {
    round_trip(4);
}
