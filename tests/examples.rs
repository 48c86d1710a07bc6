//! The walkthroughs in examples/ run as documented and end cleanly: they are
//! what a new user tries first, so they must not rot.

mod common;

use std::path::Path;

use common::{run, tool, TIDEMARK};

fn example(name: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    run(tool("bash").arg(&script).env("TIDEMARK", TIDEMARK))
}

#[test]
fn full_pull_example_copies_the_disk_exactly() {
    let out = example("full-pull.sh");
    assert!(out.contains("Images are identical."), "{out}");
    assert!(out.contains("socket removed: yes"), "{out}");
}

#[test]
fn incremental_pull_example_copies_only_dirty_extents_and_matches() {
    let out = example("incremental-pull.sh");
    assert!(out.contains("flags:") && out.contains("auto"), "{out}");
    assert!(out.contains("in 3 dirty extents"), "{out}");
    assert!(out.contains("Images are identical."), "{out}");
    assert!(out.contains("No errors were found on the image."), "{out}");
}

#[test]
fn snapshot_commit_example_commits_every_write_into_the_disk() {
    snapshot_commit_output_is_complete(&example("snapshot-commit.sh"));
}

/// The same walkthrough on qemu-storage-daemon: checks the script itself
/// against the reference.
#[test]
fn snapshot_commit_example_runs_on_qemu_storage_daemon() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/snapshot-commit.sh");
    snapshot_commit_output_is_complete(&run(tool("bash").arg(&script).arg("--qsd")));
}

fn snapshot_commit_output_is_complete(out: &str) {
    assert!(out.contains("blockdev-snapshot-sync -> ok"), "{out}");
    assert!(out.contains("backing file: "), "{out}");
    assert!(out.contains("still holds the snapshot: yes"), "{out}");
    assert!(out.contains("BLOCK_JOB_READY"), "{out}");
    assert!(out.contains("BLOCK_JOB_COMPLETED"), "{out}");
    assert!(out.contains("query-block-jobs -> []"), "{out}");
    assert!(out.contains("No errors were found on the image."), "{out}");
    assert!(out.contains("Images are identical."), "{out}");
}

#[test]
fn vendor_pull_example_pulls_the_full_then_only_dirty_extents() {
    let out = example("vendor-pull.sh");
    assert!(out.contains("vda: full backup c1 -> "), "{out}");
    assert!(out.contains("pulled 11599872 bytes"), "{out}");
    assert!(
        out.contains("vda: incremental c1 -> c2, over vda.c1.qcow2"),
        "{out}"
    );
    assert!(
        out.contains(
            "pulled 458752 bytes (0.4 MiB) in 2 data extents, zeroed 1048576 bytes in 1 extent,"
        ),
        "{out}"
    );
    assert!(out.contains("x-tidemark-query-backups -> []"), "{out}");
    assert_eq!(out.matches("check clean").count(), 2, "{out}");
    assert_eq!(out.matches("Images are identical.").count(), 3, "{out}");
}
