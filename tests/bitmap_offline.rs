//! Issue 4, checks 4 and 6: the offline tool against `qemu-img bitmap`,
//! and hand-crafted corruptions of the bitmap directory.
//!
//! 4. The same operations through `tidemark bitmap` and `qemu-img bitmap`
//!    give images that `qemu-img info` and `qemu-img check` describe the
//!    same way, and the same errors (qemu's node name aside).
//! 6. A corrupt extension, directory entry or table gives a clear error
//!    (qemu's text where qemu refuses the image too), and the image is
//!    byte for byte unchanged afterwards, even after a read-write attempt.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn qemu_img(args: &[&str]) -> String {
    run(tool("qemu-img").args(args))
}

/// `qemu-img info --output=json` without the fields that name the file or
/// depend on its layout on the host.
fn info(img: &Path) -> Value {
    let mut v: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", s(img)])).expect("info json");
    let o = v.as_object_mut().expect("object");
    for k in ["filename", "actual-size", "children"] {
        o.remove(k);
    }
    v
}

/// `tidemark info` with the same fields left out as in [`info`].
fn tidemark_info(img: &Path) -> Value {
    let mut v: Value =
        serde_json::from_str(&run(tool(TIDEMARK).args(["info", s(img)]))).expect("info json");
    let o = v.as_object_mut().expect("object");
    for k in ["filename", "actual-size", "children"] {
        o.remove(k);
    }
    v
}

/// The parts of `qemu-img check --output=json` that say whether the image
/// is sound and how much it holds.
fn check(img: &Path) -> Value {
    let out = output(tool("qemu-img").args(["check", "--output=json", s(img)]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("check json");
    let keep = [
        "check-errors",
        "corruptions",
        "leaks",
        "allocated-clusters",
        "total-clusters",
    ];
    let mut o = serde_json::Map::new();
    for k in keep {
        if let Some(x) = v.get(k) {
            o.insert(k.to_string(), x.clone());
        }
    }
    assert!(
        out.status.success(),
        "check of {} failed: {v}",
        img.display()
    );
    Value::Object(o)
}

/// The error line of a failed run, without the program name, and with the
/// node name qemu-img prints (`#blockNNN`) or tidemark prints (the file)
/// replaced by NODE.
fn error_line(stderr: &[u8], program: &str, img: &Path) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{program}: ")))
        .unwrap_or_else(|| panic!("no {program} error in {text}"))
        .replace(s(img), "NODE");
    match line.find("#block") {
        Some(i) => {
            let end = line[i..]
                .find(|c: char| !(c == '#' || c.is_ascii_alphanumeric()))
                .map_or(line.len(), |e| i + e);
            format!("{}NODE{}", &line[..i], &line[end..])
        }
        None => line,
    }
}

struct Pair {
    theirs: PathBuf,
    ours: PathBuf,
}

impl Pair {
    fn new(dir: &Path, name: &str, create: &[&str], size: &str) -> Pair {
        let theirs = dir.join(format!("{name}-qemu.qcow2"));
        let ours = dir.join(format!("{name}-tidemark.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create);
        args.push(s(&theirs));
        args.push(size);
        qemu_img(&args);
        run(tool("qemu-io").args([
            "-f",
            "qcow2",
            "-c",
            "write 0 1M",
            "-c",
            "write 9M 5k",
            s(&theirs),
        ]));
        std::fs::copy(&theirs, &ours).expect("copy image");
        Pair { theirs, ours }
    }

    /// Runs the same `bitmap` arguments through both tools: same success,
    /// same error, same resulting image.
    fn same(&self, args: &[&str], name: &str) {
        let q = output(
            tool("qemu-img")
                .arg("bitmap")
                .args(args)
                .arg(&self.theirs)
                .arg(name),
        );
        let t = output(
            tool(TIDEMARK)
                .arg("bitmap")
                .args(args)
                .arg(&self.ours)
                .arg(name),
        );
        let what = format!("bitmap {args:?} {name:.20}");
        assert_eq!(
            q.status.success(),
            t.status.success(),
            "{what}: exit status"
        );
        if !q.status.success() {
            assert_eq!(
                error_line(&t.stderr, "tidemark", &self.ours),
                error_line(&q.stderr, "qemu-img", &self.theirs),
                "{what}: error text"
            );
        }
        assert_eq!(
            info(&self.ours),
            info(&self.theirs),
            "{what}: qemu-img info"
        );
        assert_eq!(
            tidemark_info(&self.ours),
            info(&self.ours),
            "{what}: tidemark info"
        );
        assert_eq!(
            check(&self.ours),
            check(&self.theirs),
            "{what}: qemu-img check"
        );
    }
}

#[test]
fn offline_tool_matches_qemu_img_bitmap() {
    let dir = temp_dir();
    let p = Pair::new(dir.path(), "v3", &[], "64M");
    p.same(&["--add"], "b0");
    p.same(&["--add", "-g", "4096", "--disable"], "b1");
    p.same(&["--add"], "b0");
    p.same(&["--remove"], "zz");
    p.same(&["--add", "-g", "1000"], "b2");
    p.same(&["--add", "-g", "2G"], "big");
    p.same(&["--add", "-g", "512"], "small");
    p.same(&["--merge", "b0"], "b1");
    p.same(&["--merge", "zz"], "b1");
    p.same(&["--enable"], "b1");
    p.same(&["--clear"], "b0");
    p.same(&["--disable"], "b0");
    p.same(&["--add", "--merge", "b1", "-g", "8k"], "b3");
    p.same(&[], "b0");
    p.same(&["-g", "4096", "--enable"], "b0");
    p.same(&["--add", "--remove"], "b0");
    p.same(&["--remove"], "big");
    p.same(&["--add"], &"x".repeat(1024));
    p.same(&["--add"], &"y".repeat(1023));
    // A bitmap merged in from another image.
    let src = dir.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "64M"]);
    qemu_img(&["bitmap", "--add", "-g", "16k", s(&src), "s0"]);
    run(tool("qemu-io").args(["-f", "qcow2", "-c", "write 20M 300k", s(&src)]));
    p.same(&["--merge", "s0", "-b", s(&src), "-F", "qcow2"], "b3");
    p.same(&["--merge", "nope", "-b", s(&src), "-F", "qcow2"], "b3");
    p.same(&["--remove"], "small");

    let v2 = Pair::new(dir.path(), "v2", &["-o", "compat=0.10"], "64M");
    v2.same(&["--add"], "b0");
    // Bitmap data past qemu's limits is refused before it is written.
    let huge = Pair::new(dir.path(), "huge", &[], "16T");
    huge.same(&["--add", "-g", "512"], "b0");
    huge.same(&["--add", "-g", "4096"], "b0");
}

/// Where the bitmaps extension's payload and the first directory entry
/// lie in `img`.
fn locate(img: &[u8]) -> (usize, usize) {
    let be32 = |at: usize| u32::from_be_bytes(img[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap());
    let mut off = be32(100) as usize;
    loop {
        let (kind, len) = (be32(off), be32(off + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return (off + 8, be64(off + 8 + 16) as usize);
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Applies corruption `what` to an image holding one bitmap `b0`.
fn corrupt(img: &mut [u8], what: &str) {
    let (ext, e) = locate(img);
    let table = get64(img, e) as usize;
    match what {
        "granularity 8" => img[e + 17] = 8,
        "granularity 32" => img[e + 17] = 32,
        "reserved flag" => put32(img, e + 12, 8 | 2),
        "type 2" => img[e + 16] = 2,
        "table unaligned" => put64(img, e, table as u64 + 512),
        "table past the end" => put64(img, e, 1 << 40),
        "table size 2" => put32(img, e + 8, 2),
        "table size 0" => put32(img, e + 8, 0),
        "name size 0" => img[e + 18..e + 20].copy_from_slice(&[0, 0]),
        "name size 2000" => img[e + 18..e + 20].copy_from_slice(&2000u16.to_be_bytes()),
        "extra data size" => put32(img, e + 20, 8),
        "zero bitmaps" => put32(img, ext, 0),
        "two bitmaps" => put32(img, ext, 2),
        "reserved field" => put32(img, ext + 4, 1),
        "directory size" => put64(img, ext + 8, 40),
        "directory too large" => put64(img, ext + 8, 128 << 20),
        "directory unaligned" => put64(img, ext + 16, e as u64 + 8),
        "directory past the end" => put64(img, ext + 16, 1 << 40),
        "data past the end" => put64(img, table, 1 << 40),
        "data unaligned" => put64(img, table, get64(img, table) + 512),
        "data reserved bit" => put64(img, table, get64(img, table) | 2),
        other => panic!("unknown corruption {other}"),
    }
}

#[test]
fn corrupt_bitmap_directories_give_clear_errors_and_stay_unchanged() {
    let dir = temp_dir();
    let good = dir.path().join("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&good), "64M"]);
    qemu_img(&["bitmap", "--add", s(&good), "b0"]);
    run(tool("qemu-io").args(["-f", "qcow2", "-c", "write 0 64k", s(&good)]));
    let pristine = std::fs::read(&good).expect("read image");
    // (corruption, tidemark's error, whether qemu-img refuses with the same
    // text). qemu reads a table or data cluster past the end of the file as
    // zeroes; tidemark refuses it, as the directory cannot be trusted.
    let constraints = "Bitmap 'b0' doesn't satisfy the constraints";
    let table_entry =
        "Could not read bitmap_table table from image for bitmap 'b0': Invalid argument";
    let cases: &[(&str, &str, bool)] = &[
        ("granularity 8", constraints, true),
        ("granularity 32", constraints, true),
        ("reserved flag", constraints, true),
        ("type 2", constraints, true),
        ("table unaligned", constraints, true),
        ("table size 0", constraints, true),
        ("table size 2", "Could not read bitmap 'b0' from image: Invalid argument", true),
        ("name size 0", "Broken bitmap directory", true),
        ("name size 2000", "Broken bitmap directory", true),
        ("extra data size", "Broken bitmap directory", true),
        ("zero bitmaps", "found bitmaps extension with zero bitmaps", true),
        ("two bitmaps", "Less bitmaps found than specified in header extension", true),
        ("reserved field", "bitmaps_ext: Reserved field is not zero", true),
        ("directory size", "Broken bitmap directory", true),
        (
            "directory too large",
            "bitmaps_ext: bitmap directory size (134217728) exceeds the maximum supported size (67107840)",
            true,
        ),
        ("directory unaligned", "bitmaps_ext: invalid bitmap directory offset", true),
        ("directory past the end", "bitmap directory at offset 1099511627776", false),
        ("table past the end", "bitmap table at offset 1099511627776", false),
        ("data past the end", "data cluster 0x10000000000 lies past the end of the file", false),
        ("data unaligned", table_entry, true),
        ("data reserved bit", table_entry, true),
    ];
    for &(what, want, qemu_same) in cases {
        let img = dir.path().join("bad.qcow2");
        let mut bytes = pristine.clone();
        corrupt(&mut bytes, what);
        std::fs::write(&img, &bytes).expect("write image");
        let before = sha256(&img);
        let t = output(tool(TIDEMARK).args(["info", s(&img)]));
        assert!(!t.status.success(), "{what}: tidemark info accepted it");
        let err = String::from_utf8_lossy(&t.stderr).to_string();
        assert!(
            err.contains(want),
            "{what}: tidemark said {err:?}, expected {want:?}"
        );
        let q = output(tool("qemu-img").args(["info", s(&img)]));
        if qemu_same {
            let qerr = String::from_utf8_lossy(&q.stderr);
            assert!(!q.status.success(), "{what}: qemu-img accepted it");
            assert!(
                qerr.contains(want),
                "{what}: qemu-img said {qerr:?}, expected {want:?}"
            );
        }
        // Read-write attempts must not touch the image either.
        let rw = output(tool(TIDEMARK).args(["bitmap", "--add", s(&img), "new"]));
        assert!(!rw.status.success(), "{what}: bitmap --add accepted it");
        let sock = dir.path().join("s.sock");
        let srv = output(tool(TIDEMARK).args(["serve", "-k", s(&sock), s(&img)]));
        assert!(!srv.status.success(), "{what}: serve accepted it");
        assert_eq!(sha256(&img), before, "{what}: the image changed");
    }
}

#[test]
fn stale_extension_without_autoclear_bit_is_ignored_as_qemu_does() {
    let dir = temp_dir();
    let img = dir.path().join("stale.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    let mut bytes = std::fs::read(&img).expect("read");
    put64(&mut bytes, 88, 0);
    std::fs::write(&img, &bytes).expect("write");
    let copy = dir.path().join("stale-qemu.qcow2");
    std::fs::copy(&img, &copy).expect("copy");
    // Read-only: no bitmaps listed, as qemu-img info.
    assert_eq!(info(&img), info(&copy));
    let ours: Value =
        serde_json::from_str(&run(tool(TIDEMARK).args(["info", s(&img)]))).expect("json");
    assert!(ours["format-specific"]["data"].get("bitmaps").is_none());
    // Read-write: the extension is dropped (its clusters leak, as in qemu).
    run(tool(TIDEMARK).args(["bitmap", "--add", s(&img), "b1"]));
    qemu_img(&["bitmap", "--add", s(&copy), "b1"]);
    assert_eq!(info(&img), info(&copy));
}

#[test]
fn raw_images_cannot_store_bitmaps_as_in_qemu_img() {
    let dir = temp_dir();
    let img = dir.path().join("r.raw");
    sparse_file(&img, 1 << 20);
    let q = output(tool("qemu-img").args(["bitmap", "--add", "-f", "raw", s(&img), "b0"]));
    let t = output(tool(TIDEMARK).args(["bitmap", "--add", "-f", "raw", s(&img), "b0"]));
    assert!(!q.status.success() && !t.status.success());
    assert_eq!(
        error_line(&t.stderr, "tidemark", &img),
        error_line(&q.stderr, "qemu-img", &img)
    );
}
