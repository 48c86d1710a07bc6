//! Check 4: `base:allocation` as the stock tools see it. `nbdinfo --map`
//! (libnbd: 32-bit block status) and `qemu-img map` (qemu 10: extended
//! headers, REQ_ONE) over sparse raw files with data, holes, zeroed and
//! preallocated ranges print exactly what they print for qemu-nbd serving the
//! same file. Both servers serve read-only, one after the other.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{describe_failure, output, run, tool, Kind, ServeOpts, Server};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn dd_random(path: &Path, off: u64, len: u64) {
    let data = common::pattern(len as usize, off ^ len);
    let tmp = path.with_extension("chunk");
    std::fs::write(&tmp, &data).unwrap();
    run(Command::new("dd")
        .arg(format!("if={}", tmp.display()))
        .arg(format!("of={}", path.display()))
        .arg(format!("seek={off}"))
        .arg("oflag=seek_bytes")
        .arg("conv=notrunc")
        .arg("status=none"));
    std::fs::remove_file(&tmp).unwrap();
}

fn fallocate(path: &Path, mode: &[&str], off: u64, len: u64) {
    run(Command::new("fallocate")
        .args(mode)
        .arg("-o")
        .arg(off.to_string())
        .arg("-l")
        .arg(len.to_string())
        .arg(path));
}

/// 16 MiB: holes, data (large and small, aligned and not), a zeroed range
/// (`fallocate -z`), a punched hole inside data (`-p`), a preallocated range
/// (plain `fallocate`) and data right at the end.
fn mixed_file(dir: &Path) -> PathBuf {
    let p = dir.join("mixed.raw");
    common::sparse_file(&p, 16 * MIB);
    dd_random(&p, 128 * KIB, 192 * KIB);
    dd_random(&p, 4000 * KIB, 4 * KIB);
    dd_random(&p, 5 * MIB + 100, 3000);
    dd_random(&p, 8 * MIB, 4 * MIB);
    fallocate(&p, &["-z"], 9 * MIB, MIB);
    fallocate(&p, &["-p"], 11 * MIB, 512 * KIB);
    fallocate(&p, &[], 14 * MIB, MIB);
    dd_random(&p, 16 * MIB - 4 * KIB, 4 * KIB);
    p
}

/// 64 MiB with 4 KiB of data every 64 KiB: over a thousand extents.
fn striped_file(dir: &Path) -> PathBuf {
    let p = dir.join("striped.raw");
    common::sparse_file(&p, 64 * MIB);
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let block = common::pattern(4096, 3);
    for i in 0..(64 * MIB / (64 * KIB)) {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&block, i * 64 * KIB).unwrap();
    }
    use std::io::Write;
    f.flush().unwrap();
    p
}

/// Run a map tool against `kind` serving `image` read-only.
fn map_with(kind: Kind, image: &Path, tool_args: &[&str], program: &str) -> String {
    let server = Server::start(kind, image, &ServeOpts::read_only());
    let mut cmd = tool(program);
    cmd.args(tool_args).arg(server.uri());
    let out = output(&mut cmd);
    if !out.status.success() {
        panic!(
            "{}\n--- {kind:?} server log ---\n{}",
            describe_failure(&cmd, &out),
            server.log()
        );
    }
    // The socket path shows up in qemu-img's human output.
    String::from_utf8(out.stdout)
        .unwrap()
        .replace(&server.socket().display().to_string(), "SOCKET")
}

/// (offset, length, type) rows of `nbdinfo --map` output, with neighbours of
/// equal type merged: the allocation picture, whatever the extent splits.
fn merged(map: &str) -> Vec<(u64, u64, u32)> {
    let mut v: Vec<(u64, u64, u32)> = Vec::new();
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (Ok(off), Ok(len), Ok(ty)) = (f[0].parse(), f[1].parse(), f[2].parse()) else {
            continue;
        };
        match v.last_mut() {
            Some(last) if last.2 == ty && last.0 + last.1 == off => last.1 += len,
            _ => v.push((off, len, ty)),
        }
    }
    v
}

fn assert_same_map(image: &Path, program: &str, args: &[&str]) {
    let theirs = map_with(Kind::QemuNbd, image, args, program);
    let ours = map_with(Kind::under_test(), image, args, program);
    if ours != theirs {
        let hint = if program == "nbdinfo" && merged(&ours) == merged(&theirs) {
            "same allocation, but the extents are split differently"
        } else {
            "the allocation differs"
        };
        panic!(
            "`{program} {}` on {}: {hint}\n--- server under test ---\n{ours}\n--- qemu-nbd ---\n{theirs}",
            args.join(" "),
            image.display()
        );
    }
    assert!(!ours.trim().is_empty(), "{program} printed nothing");
}

#[test]
fn nbdinfo_map_matches_qemu_nbd_on_sparse_file() {
    let dir = common::temp_dir();
    let img = mixed_file(dir.path());
    assert_same_map(&img, "nbdinfo", &["--map"]);
    // Sanity: the file really has all three kinds of range.
    let ours = map_with(Kind::under_test(), &img, &["--map"], "nbdinfo");
    let kinds = merged(&ours);
    assert!(kinds.iter().any(|e| e.2 == 0), "no data extent: {ours}");
    assert!(
        kinds.iter().any(|e| e.2 == 3),
        "no hole,zero extent: {ours}"
    );
    assert!(kinds.len() >= 8, "too few extents for this file: {ours}");
}

#[test]
fn nbdinfo_map_totals_and_json_match_qemu_nbd() {
    let dir = common::temp_dir();
    let img = mixed_file(dir.path());
    assert_same_map(&img, "nbdinfo", &["--map", "--totals"]);
    assert_same_map(&img, "nbdinfo", &["--map", "--json"]);
}

#[test]
fn nbdinfo_map_matches_qemu_nbd_with_a_thousand_extents() {
    let dir = common::temp_dir();
    let img = striped_file(dir.path());
    assert_same_map(&img, "nbdinfo", &["--map"]);
}

#[test]
fn nbdinfo_map_matches_qemu_nbd_on_empty_and_full_files() {
    let dir = common::temp_dir();
    let empty = dir.path().join("empty.raw");
    common::sparse_file(&empty, 32 * MIB);
    assert_same_map(&empty, "nbdinfo", &["--map"]);
    let full = dir.path().join("full.raw");
    common::random_file(&full, 8 * MIB);
    assert_same_map(&full, "nbdinfo", &["--map"]);
}

#[test]
fn nbdinfo_map_matches_qemu_nbd_on_file_size_not_a_multiple_of_512() {
    let dir = common::temp_dir();
    let p = dir.path().join("odd.raw");
    common::sparse_file(&p, 1_000_000);
    dd_random(&p, 999_000, 1000);
    assert_same_map(&p, "nbdinfo", &["--map"]);
}

#[test]
fn qemu_img_map_over_nbd_matches_qemu_nbd() {
    let dir = common::temp_dir();
    let img = mixed_file(dir.path());
    assert_same_map(&img, "qemu-img", &["map", "--output=json", "-f", "raw"]);
    let striped = striped_file(dir.path());
    assert_same_map(
        &striped,
        "qemu-img",
        &["map", "--output=human", "-f", "raw"],
    );
}
