//! `tidemark create` as a user runs it: for each set of arguments, the image
//! shows the same `qemu-img info --output=json` as `qemu-img create`'s with
//! the same arguments, and `qemu-img check` finds nothing.

mod common;

use common::{run, temp_dir, tool, TIDEMARK};

/// Drops, at every depth, the fields that name the file or count its
/// host blocks (those differ between any two files).
fn strip(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.remove("filename");
            o.remove("actual-size");
            o.values_mut().for_each(strip);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

fn info(path: &std::path::Path) -> serde_json::Value {
    let text = run(tool("qemu-img").args(["info", "--output=json"]).arg(path));
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("qemu-img info is JSON");
    strip(&mut v);
    v
}

#[test]
fn created_images_match_qemu_img_create() {
    let dir = temp_dir();
    let base = dir.path().join("base.raw");
    run(tool("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&base)
        .arg("8M"));
    let cases: &[&[&str]] = &[
        &["-f", "raw", "SIZE=64M"],
        &["-f", "qcow2", "SIZE=64M"],
        &["-f", "qcow2", "-o", "cluster_size=512", "SIZE=3G"],
        &["-f", "qcow2", "-o", "cluster_size=2M", "SIZE=10G"],
        &["-f", "qcow2", "-o", "compat=0.10", "SIZE=1G"],
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
    ];
    for (i, case) in cases.iter().enumerate() {
        let ours = dir.path().join(format!("t{i}.img"));
        let theirs = dir.path().join(format!("q{i}.img"));
        let args: Vec<&str> = case
            .iter()
            .filter(|a| !a.starts_with("SIZE="))
            .copied()
            .collect();
        let size: Vec<&str> = case
            .iter()
            .filter_map(|a| a.strip_prefix("SIZE="))
            .collect();
        run(tool(TIDEMARK)
            .current_dir(dir.path())
            .arg("create")
            .args(&args)
            .arg(&ours)
            .args(&size));
        run(tool("qemu-img")
            .current_dir(dir.path())
            .args(["create", "-q"])
            .args(&args)
            .arg(&theirs)
            .args(&size));
        assert_eq!(info(&ours), info(&theirs), "tidemark create {case:?}");
        let map = |p: &std::path::Path| run(tool("qemu-img").args(["map", "--output=json"]).arg(p));
        assert_eq!(
            map(&ours),
            map(&theirs),
            "map after tidemark create {case:?}"
        );
        if case.contains(&"qcow2") {
            let check = run(tool("qemu-img").arg("check").arg(&ours));
            assert!(check.contains("No errors were found"), "{case:?}: {check}");
        }
    }
}

#[test]
fn bad_sizes_and_options_are_refused_clearly() {
    let dir = temp_dir();
    let img = dir.path().join("x.qcow2");
    for (args, want) in [
        (vec!["-f", "qcow2", "12Q"], "Invalid image size"),
        (
            vec!["-f", "qcow2", "-o", "cluster_size=1000", "1G"],
            "luster",
        ),
        (vec!["-f", "qcow2", "-o", "bogus=1", "1G"], "Invalid option"),
    ] {
        let (size, opts) = args.split_last().expect("args");
        let out = common::output(tool(TIDEMARK).arg("create").args(opts).arg(&img).arg(size));
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
