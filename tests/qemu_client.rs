//! Check 3: qemu's own NBD client (qemu-img 10, qemu-io 10) against the
//! server: convert in and out, compare, and qemu-io writes (aligned,
//! unaligned, zeroes, FUA, discard) verified with `read -P` and against the
//! image file itself. qemu 10 negotiates extended headers, so this is the
//! 64-bit request/reply path; a raw-socket test pins that the server offers
//! them.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::wire::*;
use common::{describe_failure, output, run, sha256, tool, ServeOpts, Server};

const MIB: u64 = 1024 * 1024;

fn qemu_io(server: &Server, cmds: &[String]) -> String {
    let mut cmd = tool("qemu-io");
    cmd.arg("-f").arg("raw");
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(server.uri());
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || stdout.contains("failed") || !out.stderr.is_empty() {
        panic!(
            "{}\n--- {:?} server log ---\n{}",
            describe_failure(&cmd, &out),
            server.kind,
            server.log()
        );
    }
    stdout
}

/// The image's expected bytes, updated alongside each qemu-io command.
struct Model(Vec<u8>);

impl Model {
    fn fill(&mut self, off: u64, len: u64, byte: u8) {
        self.0[off as usize..(off + len) as usize].fill(byte);
    }
}

fn write_pattern(m: &mut Model, cmds: &mut Vec<String>, flags: &str, byte: u8, off: u64, len: u64) {
    cmds.push(format!("write {flags} -P {byte:#x} {off} {len}"));
    m.fill(off, len, byte);
}

fn write_zeroes(m: &mut Model, cmds: &mut Vec<String>, flags: &str, off: u64, len: u64) {
    cmds.push(format!("write -z {flags} {off} {len}"));
    m.fill(off, len, 0);
}

/// `read -P` commands that verify every byte of the model in `[off, off+len)`
/// (one command per run of equal bytes).
fn verify_range(m: &Model, off: u64, len: u64) -> Vec<String> {
    let mut cmds = Vec::new();
    let (mut start, end) = (off as usize, (off + len) as usize);
    while start < end {
        let b = m.0[start];
        let mut stop = start;
        while stop < end && m.0[stop] == b {
            stop += 1;
        }
        cmds.push(format!("read -P {b:#x} {start} {}", stop - start));
        start = stop;
    }
    cmds
}

fn file_bytes(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

#[test]
fn qemu_img_convert_into_and_out_of_the_export_and_compare() {
    let dir = common::temp_dir();
    let src = dir.path().join("src.raw");
    let target = dir.path().join("target.raw");
    let back = dir.path().join("back.raw");
    common::random_file(&src, 48 * MIB);
    run(Command::new("fallocate")
        .args([
            "-p",
            "-o",
            &(8 * MIB).to_string(),
            "-l",
            &(5 * MIB).to_string(),
        ])
        .arg(&src));
    common::sparse_file(&target, 48 * MIB);
    let server = Server::start_under_test(&target, &ServeOpts::read_write());
    let uri = server.uri();

    run(tool("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    let same = run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    assert!(
        same.contains("Images are identical"),
        "qemu-img compare: {same}"
    );

    run(tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&back));
    assert_eq!(sha256(&back), sha256(&src), "converted out of the export");
    assert_eq!(
        sha256(&target),
        sha256(&src),
        "the image file behind the export"
    );

    // compare sees a one-byte change made through the export.
    qemu_io(&server, &["write -P 0x5a 12345344 1".to_string()]);
    let out = output(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare after a one-byte write must report a difference: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Content mismatch at offset 12345344"),
        "{out:?}"
    );
}

#[test]
fn qemu_io_pattern_writes_verify_through_the_export_and_in_the_file() {
    let dir = common::temp_dir();
    let image = dir.path().join("disk.raw");
    let size = 8 * MIB;
    common::sparse_file(&image, size);
    let server = Server::start_under_test(&image, &ServeOpts::read_write());
    let mut m = Model(vec![0; size as usize]);
    let mut cmds = Vec::new();

    // Aligned and unaligned data writes.
    write_pattern(&mut m, &mut cmds, "", 0xab, 0, 65536);
    write_pattern(&mut m, &mut cmds, "", 0x11, 4097, 3000);
    write_pattern(&mut m, &mut cmds, "", 0x12, 65535, 2);
    write_pattern(&mut m, &mut cmds, "", 0x13, 100_001, 77_777);
    write_pattern(&mut m, &mut cmds, "", 0x14, size - 333, 333);
    // Write zeroes over data: without unmap (NO_HOLE), with unmap, unaligned.
    write_pattern(&mut m, &mut cmds, "", 0xcc, 128 * 1024, 256 * 1024);
    write_zeroes(&mut m, &mut cmds, "", 128 * 1024, 64 * 1024);
    write_zeroes(&mut m, &mut cmds, "-u", 192 * 1024, 64 * 1024);
    write_zeroes(&mut m, &mut cmds, "", 300 * 1024 + 5, 1000);
    // FUA writes and FUA write-zeroes.
    write_pattern(&mut m, &mut cmds, "-f", 0x22, MIB + 512, 8192);
    write_pattern(&mut m, &mut cmds, "-f", 0x23, MIB + 20_000, 1);
    write_zeroes(&mut m, &mut cmds, "-f", MIB + 1024, 512);
    // Discard a written range: tidemark punches a hole, which reads as zeroes.
    write_pattern(&mut m, &mut cmds, "", 0x33, 2 * MIB, 2 * MIB);
    cmds.push(format!("discard {} {}", 2 * MIB + 512 * 1024, MIB));
    m.fill(2 * MIB + 512 * 1024, MIB, 0);
    cmds.push("flush".to_string());
    // Verify in the same process...
    let mut all = cmds.clone();
    all.extend(verify_range(&m, 0, 4 * MIB));
    qemu_io(&server, &all);
    // ...in a fresh process (nothing cached client-side)...
    qemu_io(&server, &verify_range(&m, 0, size));
    // ...and in the image file itself.
    let on_disk = file_bytes(&image);
    assert_eq!(on_disk.len() as u64, size, "image size changed");
    if let Some(i) = (0..size as usize).find(|&i| on_disk[i] != m.0[i]) {
        panic!(
            "image file differs from what qemu-io wrote at offset {i}: file {:#x}, expected {:#x}",
            on_disk[i], m.0[i]
        );
    }
}

#[test]
fn qemu_io_reads_and_writes_at_the_end_and_across_max_block_size() {
    let dir = common::temp_dir();
    let image = dir.path().join("disk.raw");
    // Not a multiple of 4096 or of 512's larger powers.
    let size = 40 * MIB + 3 * 512;
    common::sparse_file(&image, size);
    let server = Server::start_under_test(&image, &ServeOpts::read_write());
    let mut m = Model(vec![0; size as usize]);
    let mut cmds = Vec::new();
    // 36 MiB: qemu splits this at the server's 32 MiB maximum.
    write_pattern(&mut m, &mut cmds, "", 0x44, 512, 36 * MIB);
    write_pattern(&mut m, &mut cmds, "", 0x45, size - 1024, 1024);
    cmds.extend(verify_range(&m, 0, size));
    qemu_io(&server, &cmds);
    // A write past the end fails cleanly and leaves the export usable.
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw", "-c"])
        .arg(format!("write -P 0x66 {} 1024", size - 512))
        .arg(server.uri());
    let out = output(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("wrote 1024/1024"),
        "write past the end succeeded: {text}"
    );
    qemu_io(&server, &verify_range(&m, size - 4096, 4096));
}

#[test]
fn extended_headers_are_negotiated_and_serve_a_64_bit_read() {
    let dir = common::temp_dir();
    let image = dir.path().join("disk.raw");
    let data = common::pattern(65536, 9);
    std::fs::write(&image, &data).unwrap();
    let server = Server::start_under_test(&image, &ServeOpts::read_write());
    let mut c = Conn::new(server.connect());
    c.start();
    c.option(11 /* NBD_OPT_EXTENDED_HEADERS */, &[]);
    let r = c.opt_reply();
    assert_eq!(
        (r.option, r.rep_type),
        (11, REP_ACK),
        "NBD_OPT_EXTENDED_HEADERS must be acked, as qemu-nbd 10 does: {r:?}"
    );
    let (size, _) = c.go("");
    assert_eq!(size, 65536);
    // Extended request: magic, flags, type, cookie, offset, 64-bit length.
    let mut req = 0x21e4_1c71u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_READ.to_be_bytes());
    req.extend_from_slice(&77u64.to_be_bytes());
    req.extend_from_slice(&4096u64.to_be_bytes());
    req.extend_from_slice(&8192u64.to_be_bytes());
    c.send(&req);
    // Extended reply chunks: magic, flags, type, cookie, offset, payload length.
    let mut got = vec![0u8; 8192];
    let mut covered = 0;
    loop {
        let h = c.recv(32);
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        assert_eq!(magic, 0x6e8a_278c, "extended reply magic, header {h:02x?}");
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap());
        assert_eq!(cookie, 77);
        let p = c.recv(len as usize);
        match typ {
            REPLY_TYPE_OFFSET_DATA => {
                let off = u64::from_be_bytes(p[0..8].try_into().unwrap()) as usize;
                got[off - 4096..off - 4096 + p.len() - 8].copy_from_slice(&p[8..]);
                covered += p.len() - 8;
            }
            REPLY_TYPE_NONE => {}
            t => panic!("unexpected reply chunk type {t:#x}: {p:02x?}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, 8192, "read chunks cover the request");
    assert!(
        got == data[4096..4096 + 8192],
        "extended read returned wrong data"
    );
    drop(server);
}
