//! Check 7: the `nbd` crate's client (crates.io nbd 0.3) reads and writes an
//! export. It takes the oldest path a server must still support: fixed
//! newstyle without NO_ZEROES (so the server sends the 124 zero bytes),
//! NBD_OPT_EXPORT_NAME, then simple replies only.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::{ServeOpts, Server};
use nbd::client::{handshake, NbdClient, NbdExt};
use tempfile::TempDir;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 8 * MIB;

fn image() -> (TempDir, PathBuf, Vec<u8>) {
    let dir = common::temp_dir();
    let path = dir.path().join("disk.raw");
    let data = common::pattern(SIZE as usize, 7);
    std::fs::write(&path, &data).unwrap();
    (dir, path, data)
}

fn file_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

fn connect(server: &Server) -> UnixStream {
    server.connect()
}

#[test]
fn nbd_crate_client_reads_and_writes_the_default_export() {
    let (_dir, path, mut model) = image();
    let server = Server::start_under_test(&path, &ServeOpts::read_write());
    let mut stream = connect(&server);
    let export = handshake(&mut stream, b"").expect("nbd crate handshake (EXPORT_NAME \"\")");
    assert_eq!(export.size, SIZE);
    assert!(!export.readonly, "writable export reported read-only");
    assert!(export.send_flush, "export must advertise flush");
    assert!(export.send_trim, "export must advertise trim");

    let mut c = NbdClient::new(&mut stream, &export);
    // Read the whole export in 1 MiB pieces.
    let mut all = Vec::new();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..SIZE / MIB {
        c.read_exact(&mut buf).expect("read through the nbd crate");
        all.extend_from_slice(&buf);
    }
    assert!(
        all == model,
        "data read through the nbd crate differs from the file"
    );
    assert_eq!(c.read(&mut buf).unwrap(), 0, "read at the end returns 0");

    // Write at an aligned and at an unaligned offset, then flush.
    let a = common::pattern(128 * 1024, 70);
    c.seek(SeekFrom::Start(3 * MIB + 512)).unwrap();
    c.write_all(&a).expect("write through the nbd crate");
    model[(3 * MIB + 512) as usize..][..a.len()].copy_from_slice(&a);
    let b = common::pattern(777, 71);
    c.seek(SeekFrom::Start(5 * MIB + 3)).unwrap();
    c.write_all(&b)
        .expect("unaligned write through the nbd crate");
    model[(5 * MIB + 3) as usize..][..b.len()].copy_from_slice(&b);
    c.flush().expect("flush through the nbd crate");

    // Read back through the export and from the file.
    let mut back = vec![0u8; a.len()];
    c.seek(SeekFrom::Start(3 * MIB + 512)).unwrap();
    c.read_exact(&mut back).unwrap();
    assert!(back == a, "aligned write did not read back");
    let mut back = vec![0u8; b.len()];
    c.seek(SeekFrom::Start(5 * MIB + 3)).unwrap();
    c.read_exact(&mut back).unwrap();
    assert!(back == b, "unaligned write did not read back");
    assert!(
        file_range(&path, 3 * MIB, MIB as usize) == model[3 * MIB as usize..4 * MIB as usize],
        "image file differs after flush"
    );
    assert!(
        file_range(&path, 5 * MIB, 4096) == model[5 * MIB as usize..5 * MIB as usize + 4096],
        "image file differs after flush"
    );

    // Trim, then the range reads as zeroes.
    c.seek(SeekFrom::Start(6 * MIB)).unwrap();
    c.trim(MIB as usize).expect("trim through the nbd crate");
    let mut z = vec![1u8; MIB as usize];
    c.seek(SeekFrom::Start(6 * MIB)).unwrap();
    c.read_exact(&mut z).unwrap();
    assert!(
        z.iter().all(|&x| x == 0),
        "trimmed range does not read as zeroes"
    );
}

#[test]
fn nbd_crate_client_opens_a_named_export() {
    let (_dir, path, model) = image();
    let opts = ServeOpts {
        export_name: "vda".into(),
        ..ServeOpts::default()
    };
    let mut server = Server::start_under_test(&path, &opts);
    let mut stream = connect(&server);
    let export = handshake(&mut stream, b"vda").expect("handshake for export \"vda\"");
    assert_eq!(export.size, SIZE);
    let mut c = NbdClient::new(&mut stream, &export);
    let mut buf = vec![0u8; 65536];
    c.seek(SeekFrom::Start(MIB)).unwrap();
    c.read_exact(&mut buf).unwrap();
    assert!(buf[..] == model[MIB as usize..MIB as usize + 65536]);

    // EXPORT_NAME for a missing export cannot be answered with an error:
    // the server closes, the crate reports an error, the server lives on.
    let mut bad = connect(&server);
    assert!(
        handshake(&mut bad, b"no-such-export").is_err(),
        "handshake for a missing export must fail"
    );
    server.assert_alive();
    let mut again = connect(&server);
    handshake(&mut again, b"vda").expect("handshake after a failed one");
}

#[test]
fn nbd_crate_client_sees_read_only_and_gets_an_error_on_write() {
    let (_dir, path, model) = image();
    let server = Server::start_under_test(&path, &ServeOpts::read_only());
    let mut stream = connect(&server);
    let export = handshake(&mut stream, b"").expect("handshake");
    assert!(export.readonly, "read-only export not reported read-only");
    let mut c = NbdClient::new(&mut stream, &export);
    let err = c
        .write_all(&[0xff; 4096])
        .expect_err("write to a read-only export must fail");
    // qemu's EINVAL (22), which the crate names in its error.
    assert!(
        err.to_string().contains("EINVAL"),
        "expected EINVAL from the server, got {err}"
    );
    let mut buf = vec![0u8; 4096];
    c.seek(SeekFrom::Start(0)).unwrap();
    c.read_exact(&mut buf)
        .expect("read after the refused write");
    assert!(buf[..] == model[..4096], "refused write changed data");
}
