//! Sparse pulls (issue 13): a big, mostly empty image read the way backup
//! tools read it. `nbdinfo --map` must print what it prints for qemu-nbd,
//! and `nbdcopy` must bring back the same bytes (sha256), raw and qcow2.
//! Reads large enough to be answered from pipes (see src/nbd/splice.rs)
//! must return the file's bytes in simple and in structured replies:
//! unaligned, across pipes, into the sector padding past EOF, and as the
//! pieces of a long read.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::wire::{Conn, CMD_READ, REPLY_TYPE_OFFSET_HOLE};
use common::{describe_failure, output, run, tool, Kind, ServeOpts, Server};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// splitmix64, for seeded offsets.
fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `size` bytes, about 1% data: runs of 4 KiB to 3 MiB at seeded offsets
/// (some not page-aligned), and data in the last, partial sector.
fn sparse_image(path: &Path, size: u64) {
    common::sparse_file(path, size);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    let mut s = 13;
    let mut written = 0;
    while written < size / 100 {
        let len =
            [4 * KIB, 64 * KIB, 300 * KIB, 600 * KIB, MIB, 3 * MIB][(next(&mut s) % 6) as usize];
        let align = if next(&mut s).is_multiple_of(4) {
            512
        } else {
            4096
        };
        let off = (next(&mut s) % (size - len)) / align * align;
        f.write_all_at(&common::pattern(len as usize, off), off)
            .expect("write");
        written += len;
    }
    f.write_all_at(b"tail", size - 4).expect("write tail");
}

fn with_server<T>(
    kind: Kind,
    image: &Path,
    format: &'static str,
    f: impl FnOnce(&Server) -> T,
) -> T {
    let opts = ServeOpts {
        format: Some(format),
        ..ServeOpts::read_only()
    };
    let server = Server::start(kind, image, &opts);
    f(&server)
}

fn map(server: &Server) -> String {
    let mut cmd = tool("nbdinfo");
    cmd.arg("--map").arg(server.uri());
    let out = output(&mut cmd);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe_failure(&cmd, &out),
        server.log()
    );
    String::from_utf8(out.stdout).expect("utf-8 map")
}

/// sha256 of what `nbdcopy URI -` pulls.
fn pulled(server: &Server) -> String {
    let mut copy = tool("nbdcopy");
    copy.arg(server.uri()).arg("-").stdout(Stdio::piped());
    let mut child = copy.spawn().expect("spawn nbdcopy");
    let stdout = child.stdout.take().expect("nbdcopy stdout");
    let sum = Command::new("sha256sum")
        .stdin(stdout)
        .output()
        .expect("sha256sum");
    let status = child.wait().expect("wait nbdcopy");
    assert!(status.success(), "nbdcopy failed\n{}", server.log());
    String::from_utf8_lossy(&sum.stdout).to_string()
}

fn same_pull_as_qemu_nbd(image: &Path, format: &'static str) {
    let (ours_map, ours_sum) =
        with_server(Kind::under_test(), image, format, |s| (map(s), pulled(s)));
    let (theirs_map, theirs_sum) =
        with_server(Kind::QemuNbd, image, format, |s| (map(s), pulled(s)));
    assert_eq!(
        ours_map, theirs_map,
        "{format}: nbdinfo --map differs from qemu-nbd's"
    );
    assert_eq!(ours_sum, theirs_sum, "{format}: nbdcopy pulled other bytes");
    assert!(ours_map.lines().count() > 20, "a sparse map: {ours_map}");
}

#[test]
fn sparse_pull_map_and_bytes_match_qemu_nbd_raw_and_qcow2() {
    let dir = common::temp_dir();
    let raw = dir.path().join("sparse.raw");
    // Not a multiple of 512: the padding reads as zeroes on both.
    sparse_image(&raw, GIB - 100);
    same_pull_as_qemu_nbd(&raw, "raw");

    let qcow2 = dir.path().join("sparse.qcow2");
    run(tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));
    same_pull_as_qemu_nbd(&qcow2, "qcow2");
}

#[test]
fn large_reads_return_the_file_in_simple_and_structured_replies() {
    let dir = common::temp_dir();
    let path = dir.path().join("data.raw");
    // Data, a hole, data to a partial last sector.
    let size = 40 * MIB + 1000;
    common::sparse_file(&path, size);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.write_all_at(&common::pattern((16 * MIB) as usize, 1), 0)
        .expect("write");
    f.write_all_at(&common::pattern((8 * MIB) as usize, 2), 32 * MIB)
        .expect("write");
    f.write_all_at(&common::pattern(1000, 3), 40 * MIB)
        .expect("write");
    drop(f);
    let mut file = std::fs::read(&path).expect("read");
    file.resize(size.next_multiple_of(512) as usize, 0);

    let server = Server::start_under_test(&path, &ServeOpts::read_only());
    let reads: &[(u64, u32)] = &[
        (0, 128 * 1024),
        (4095, 256 * 1024),
        (512, (1 << 20) + 513),
        (MIB - 7, 2 << 20),
        // Streamed in pieces in structured mode.
        (3 * MIB + 4096, 5 << 20),
        (15 * MIB, 2 << 20),
        (20 * MIB, 32 << 20),
        (40 * MIB - (300 << 10), (300 << 10) + 1024),
    ];
    for structured in [false, true] {
        let mut c = Conn::new(server.connect());
        c.start();
        if structured {
            c.structured_replies();
        }
        let (export_size, _) = c.go("");
        assert_eq!(export_size, file.len() as u64);
        for &(off, len) in reads {
            let len = len.min((export_size - off) as u32);
            let got = c.read_ok(off, len);
            let want = &file[off as usize..off as usize + len as usize];
            assert!(
                got == want,
                "read {off}+{len} (structured: {structured}) differs from the file"
            );
        }
        if structured {
            // What nbdcopy reads over a 64 KiB data extent: the rest of the
            // 256 KiB comes as a hole chunk, not as 192 KiB of zeroes.
            let out = c.call(0, CMD_READ, 16 * MIB - 65536, 256 << 10, &[]);
            let holes: Vec<u32> = out
                .chunks
                .iter()
                .filter(|(t, _)| *t == REPLY_TYPE_OFFSET_HOLE)
                .map(|(_, p)| u32::from_be_bytes(p[8..12].try_into().expect("hole size")))
                .collect();
            assert_eq!(holes, [192 << 10], "chunks: {:?}", out.chunks.len());
        }
    }
}

/// The hole chunks of a 256 KiB read (what nbdcopy reads over a 64 KiB
/// data extent) starting at `off` on a fresh structured connection.
fn hole_chunks(server: &Server, off: u64) -> Vec<u32> {
    let mut c = Conn::new(server.connect());
    c.start();
    c.structured_replies();
    c.go("");
    let out = c.call(0, CMD_READ, off, 256 << 10, &[]);
    out.chunks
        .iter()
        .filter(|(t, _)| *t == REPLY_TYPE_OFFSET_HOLE)
        .map(|(_, p)| u32::from_be_bytes(p[8..12].try_into().expect("hole size")))
        .collect()
}

#[test]
fn qcow2_reads_send_unallocated_clusters_as_hole_chunks() {
    let dir = common::temp_dir();
    let raw = dir.path().join("data.raw");
    common::sparse_file(&raw, 64 * MIB);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .expect("open");
    f.write_all_at(&common::pattern(65536, 4), 8 * MIB)
        .expect("write");
    drop(f);
    let qcow2 = dir.path().join("data.qcow2");
    run(tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));
    let opts = ServeOpts {
        format: Some("qcow2"),
        ..ServeOpts::read_only()
    };
    let server = Server::start_under_test(&qcow2, &opts);
    // Asked twice: the first may find the tables not yet in memory (the
    // pool answers), the second is served where it was read (no waiting);
    // both must send the 192 KiB of unallocated clusters as a hole.
    for round in 0..2 {
        let holes = hole_chunks(&server, 8 * MIB);
        assert_eq!(holes, [192 << 10], "round {round}");
    }
    // All data: no hole chunk.
    let mut c = Conn::new(server.connect());
    c.start();
    c.structured_replies();
    c.go("");
    let got = c.read_ok(8 * MIB - 4096, 256 << 10);
    let mut want = vec![0u8; 4096];
    want.extend_from_slice(&common::pattern(65536, 4));
    want.resize(256 << 10, 0);
    assert!(got == want, "the read differs from the image");
}
