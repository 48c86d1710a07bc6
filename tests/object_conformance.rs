//! qemu's user-creatable objects, compared with qemu-storage-daemon 10.0.2
//! (issue 12, check 4): `object-add` / `object-del` of `secret`,
//! `tls-creds-x509`, `tls-creds-psk`, `authz-simple` and `authz-list`, every
//! refusal qsd gives for them, `--object` on the command line, and
//! `nbd-server-start` with `tls-creds` / `tls-authz` given by id: the NBD
//! server then requires TLS, serves TLS clients (nbdinfo with the client
//! certificates or the PSK), and looks its authz object up by id for each
//! connection. qsd lets `object-del` delete credentials and authz objects
//! the server uses; the scenarios record what happens then.
//!
//! Each scenario in tests/qmp_scenarios/objects_*.json runs on qsd and on
//! `tidemark daemon` with the same command line; the transcripts must be
//! equal after `normalise`. TLS material is made per instance with
//! tests/tls/gen-certs.sh (`"tls": true`).
//!
//! The scenario format and the runner are shared with the job suite
//! (tests/scenario/mod.rs). `OBJECT_CONFORMANCE_ONLY=qsd` runs just the qsd
//! side (to check scenarios), `OBJECT_CONFORMANCE_ONLY=qsd-twice` compares
//! qsd with itself; `QMP_TRACE=1` prints each step;
//! `OBJECT_CONFORMANCE_DUMP=DIR` writes both transcripts to DIR.

mod qmp_common;
mod scenario;

scenario::conformance_suite! {
    env: "OBJECT_CONFORMANCE",
    files: "objects_",
    every_file: every_objects_scenario_file_runs,
    scenarios: [
        objects_secret,
        objects_tls_creds,
        objects_authz,
        objects_nbd_tls,
        objects_nbd_psk,
        objects_cmdline,
    ],
}
