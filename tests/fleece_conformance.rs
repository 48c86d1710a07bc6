//! Pull-mode backup by fleecing, compared with qemu-storage-daemon 10.0.2:
//! the three generations of qemu's iotest `image-fleecing` (a
//! `blockdev-backup sync=none` into a qcow2 scratch backed by the live
//! node; an explicit `copy-before-write` filter; `copy-before-write` with a
//! raw target read through a `snapshot-access` node, with and without a CBW
//! `bitmap`), the filter's options and failure modes (`on-cbw-error`,
//! `cbw-timeout`, `min-cluster-size`), libvirt's pull-backup sequence, and
//! the `bitmaps` of an NBD export given as names or as `{node, name}`.
//!
//! Each scenario in tests/qmp_scenarios/fleece_*.json runs on qsd and on
//! `tidemark daemon` with the same command line (see tests/scenario/mod.rs
//! for the format); the transcripts must be equal after `normalise`. There
//! is no guest in qsd: the guest's device is a writable NBD export of the
//! node the guest would write through (the live node for
//! `blockdev-backup`, which moves the export onto its filter; the
//! `copy-before-write` node itself where the iotest `qom-set`s the device
//! onto it), and qemu-io writes through it. The data is checked with the
//! iotest's patterns (qemu-io `read -P` over NBD: the fleecing export keeps
//! the old data, the guest sees the new), the allocation and dirty maps
//! with `nbdinfo --json --map[=qemu:dirty-bitmap:NAME]`, and every error
//! text (QMP replies, qemu-io's `read failed: ...`).
//!
//! The scenarios: `fleece_backup_sync_none` (generation 1),
//! `fleece_cbw_qcow2` (generation 2: the filter, a qcow2 scratch backed by
//! the live node), `fleece_cbw` (generation 3: raw target, snapshot-access
//! export), `fleece_cbw_bitmap` (a CBW bitmap: reads and block status
//! outside it fail; discard through a writable snapshot-access export),
//! `fleece_cbw_options` (bad options, min-cluster-size, cbw-timeout),
//! `fleece_cbw_errors` (on-cbw-error break-guest-write / break-snapshot
//! with a blkdebug target), `fleece_libvirt` (libvirt's transaction, export
//! and teardown over a two-layer chain), `fleece_export_bitmaps` (how
//! exports resolve and refuse bitmaps).
//!
//! `FLEECE_CONFORMANCE_ONLY=qsd` runs just the qsd side (to check
//! scenarios), `FLEECE_CONFORMANCE_ONLY=qsd-twice` compares qsd with itself
//! (to check that transcripts are deterministic),
//! `FLEECE_CONFORMANCE_DUMP=DIR` writes both transcripts to DIR,
//! `QMP_TRACE=1` prints each step.

mod qmp_common;
mod scenario;

scenario::conformance_suite! {
    env: "FLEECE_CONFORMANCE",
    files: "fleece_",
    every_file: every_fleece_scenario_file_runs,
    scenarios: [
        fleece_backup_sync_none,
        fleece_cbw_qcow2,
        fleece_cbw,
        fleece_cbw_bitmap,
        fleece_cbw_options,
        fleece_cbw_errors,
        fleece_libvirt,
        fleece_export_bitmaps,
    ],
}
