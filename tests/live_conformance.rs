//! Live block operations, compared with qemu-storage-daemon 10.0.2:
//! external snapshots (blockdev-snapshot-sync, blockdev-snapshot, both also
//! as transaction actions), block-stream, block-commit (intermediate and
//! active), drive-mirror and blockdev-mirror, and the verbs that end them
//! (job-complete / block-job-complete, block-job-cancel after READY).
//!
//! Each scenario in tests/qmp_scenarios/live_*.json runs on qsd and on
//! `tidemark daemon` with the same command line (see tests/scenario/mod.rs
//! for the format); the transcripts must be equal after `normalise`. What
//! they record: the job events (JOB_STATUS_CHANGE and BLOCK_JOB_READY /
//! _COMPLETED / _CANCELLED with their len and offset), the graph while a
//! job runs (the auto-named `copy-on-read`, `commit_top` and `mirror_top`
//! filters, and the exports moved onto them) and after it ends, the
//! backing file names written into the image headers, the data (qemu-io
//! patterns over NBD, `qemu-img compare` against images made with stock
//! tools), and every error text. Intermediate job states are observed only
//! where they are stable: a job throttled to `speed: 1` copies its first
//! chunk and then waits, and is paused before it is looked at; one with
//! `auto-finalize: false` waits in "pending"; a mirror or an active commit
//! waits in "ready" until it is completed or cancelled.
//!
//! The scenarios: `live_snapshot` (external snapshots and the bitmaps of
//! the layers), `live_stream`, `live_commit`, `live_mirror`, and
//! `live_bad_input` (refusals that leave the graph as it was).
//!
//! `LIVE_CONFORMANCE_ONLY=qsd` runs just the qsd side (to check scenarios),
//! `LIVE_CONFORMANCE_ONLY=qsd-twice` compares qsd with itself (to check that
//! transcripts are deterministic), `LIVE_CONFORMANCE_DUMP=DIR` writes both
//! transcripts to DIR, `QMP_TRACE=1` prints each step.

mod qmp_common;
mod scenario;

scenario::conformance_suite! {
    env: "LIVE_CONFORMANCE",
    files: "live_",
    every_file: every_live_scenario_file_runs,
    scenarios: [
        live_snapshot,
        live_stream,
        live_commit,
        live_mirror,
        live_bad_input,
    ],
}
