//! Block jobs and push backup, compared with qemu-storage-daemon 10.0.2:
//! QEMU's job state machine (JOB_STATUS_CHANGE and the BLOCK_JOB_* events,
//! query-jobs / query-block-jobs), blockdev-backup and drive-backup with
//! every sync mode and bitmap mode, the job verbs, transactions with
//! completion-mode grouped, and error injection with the blkdebug and
//! null-co drivers.
//!
//! Each scenario in tests/qmp_scenarios/job_*.json runs on qsd and on
//! `tidemark daemon` with the same command line (see tests/scenario/mod.rs
//! for the format); the transcripts must be equal after `normalise`. The
//! events of each job are recorded per job (`job_events` steps), so the
//! interleaving of two jobs' events is never compared, only each job's
//! sequence. Intermediate job states are observed only where they are
//! stable: a job throttled to `speed: 1` copies its first chunk and then
//! waits for hours, a job with `auto-finalize: false` waits in "pending",
//! one with `auto-dismiss: false` in "concluded", and a job stopped by
//! `on-target-error: stop` in "paused".
//!
//! The scenarios, by what they are about: `job_control` and `job_cancel`
//! (the verbs, their states and texts), `job_incremental_drive_backup` and
//! `job_incremental_blockdev_backup` (docs/interop/bitmaps.rst end to end,
//! every image compared with the disk at its point in time),
//! `job_matrix_{bitmap,full,top}` (iotest 257: bitmap modes with and without
//! an injected failure), `job_failure_rollback` (failed backups keep the
//! bitmap, individual and grouped transactions, retries), `job_enospc` (the
//! error policies), `job_bad_input` (every argument error, iotest 257's
//! matrix), `job_graph` (the copy-before-write filter, point-in-time
//! semantics), `job_drive_backup_targets` (the images drive-backup makes),
//! `job_drivers` (blkdebug and null-co themselves).
//!
//! `JOB_CONFORMANCE_ONLY=qsd` runs just the qsd side (to check scenarios),
//! `JOB_CONFORMANCE_ONLY=qsd-twice` compares qsd with itself (to check that
//! transcripts are deterministic), `JOB_CONFORMANCE_DUMP=DIR` writes both
//! transcripts to DIR, `QMP_TRACE=1` prints each step.

mod qmp_common;
mod scenario;

scenario::conformance_suite! {
    env: "JOB_CONFORMANCE",
    files: "job_",
    every_file: every_job_scenario_file_runs,
    scenarios: [
        job_control,
        job_cancel,
        job_incremental_drive_backup,
        job_incremental_blockdev_backup,
        job_matrix_bitmap,
        job_matrix_full,
        job_matrix_top,
        job_failure_rollback,
        job_enospc,
        job_bad_input,
        job_graph,
        job_drive_backup_targets,
        job_drivers,
    ],
}
