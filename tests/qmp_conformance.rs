//! The QMP conformance suite: every scenario in tests/qmp_scenarios runs
//! against qemu-storage-daemon 10.0.2 and against `tidemark daemon` with the
//! same command line; the transcripts (QMP replies, events, NBD dirty maps)
//! must be equal, normalised only for version strings, timestamps,
//! auto-generated node names and each instance's directory.
//!
//! A scenario file:
//! ```json
//! {"images": {"a.img": 4194304},                   // sparse raw images in $DIR
//!  "qcow2_images": {"c.qcow2": 4194304},            // made by qemu-img create
//!  "stale_bitmap_images": {"s.qcow2": [4194304, "b"]}, // bitmap b left in use
//!  "monitors": 3,                                    // client k talks to monitor k
//!  "args": ["--blockdev", "driver=file,node-name=f0,filename=$DIR/a.img"],
//!  "steps": [
//!    {"qmp": {"execute": "query-version"}},          // reply recorded
//!    {"client": 1, "qmp": {...}},                    // on another client
//!    {"connect": 2},                                 // unnegotiated client on monitor 2; greeting recorded
//!    {"raw": "[1]\n", "replies": 1},                 // bytes as is; N replies recorded
//!    {"write": ["write -P 1 0 64k"], "export": "w"}, // qemu-io through the NBD export
//!    {"map": "qemu:dirty-bitmap:b0", "export": "m"}, // nbdinfo --map recorded
//!    {"event": "BLOCK_EXPORT_DELETED", "client": 0}  // next such event recorded
//!  ]}
//! ```

mod qmp_common;

use std::collections::BTreeMap;
use std::path::Path;

use qmp_common::{
    nbd_map, normalise, qcow2_image, qcow2_with_stale_bitmap, qemu_io, raw_image, Impl, Instance,
    Qmp,
};
use serde_json::{json, Value};

fn load(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/qmp_scenarios")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Runs a scenario on one implementation; returns (step, record) pairs.
fn transcript(kind: Impl, sc: &Value) -> Vec<(usize, Value)> {
    let images: BTreeMap<String, u64> =
        serde_json::from_value(sc["images"].clone()).unwrap_or_default();
    let args: Vec<String> = serde_json::from_value(sc["args"].clone()).unwrap_or_default();
    let monitors = sc["monitors"].as_u64().unwrap_or(1) as usize;
    let qcow2: BTreeMap<String, u64> =
        serde_json::from_value(sc["qcow2_images"].clone()).unwrap_or_default();
    let stale: BTreeMap<String, (u64, String)> =
        serde_json::from_value(sc["stale_bitmap_images"].clone()).unwrap_or_default();
    let args = qmp_common::as_qemu(kind, &args);
    let inst = Instance::start_with_monitors(kind, &args, monitors, |dir| {
        for (name, size) in &images {
            raw_image(&dir.join(name), *size);
        }
        for (name, size) in &qcow2 {
            qcow2_image(&dir.join(name), *size);
        }
        for (name, (size, bitmap)) in &stale {
            qcow2_with_stale_bitmap(&dir.join(name), *size, bitmap);
        }
    });
    let dir = inst.dir.path().to_owned();
    let mut clients: BTreeMap<u64, Qmp> = BTreeMap::new();
    let mut out = Vec::new();
    let steps = sc["steps"].as_array().cloned().unwrap_or_default();
    let dir_text = dir.display().to_string();
    for (i, step) in steps.iter().enumerate() {
        // `$DIR` in a step is the instance's directory, as in `args`.
        let step: Value = serde_json::from_str(&step.to_string().replace("$DIR", &dir_text))
            .expect("step stays JSON");
        let step = &step;
        let c = step["client"].as_u64().unwrap_or(0);
        if std::env::var_os("QMP_TRACE").is_some() {
            eprintln!("{kind:?} step {i}: {step}");
        }
        let mut record = |v: Value| out.push((i, normalise(&v, &dir)));
        if let Some(k) = step["connect"].as_u64() {
            let q = Qmp::connect(&inst.monitor(k as usize));
            record(q.greeting.clone());
            clients.insert(k, q);
            continue;
        }
        if step.get("write").is_some() || step.get("map").is_some() {
            let uri = inst.nbd_uri(step["export"].as_str().unwrap_or(""));
            if let Some(cmds) = step["write"].as_array() {
                let cmds: Vec<&str> = cmds.iter().filter_map(Value::as_str).collect();
                qemu_io(&uri, &cmds);
            } else {
                let ctx = step["map"].as_str().unwrap_or("");
                record(json!({ "map": ctx, "extents": nbd_map(&uri, ctx) }));
            }
            continue;
        }
        let q = clients
            .entry(c)
            .or_insert_with(|| inst.client_on(c as usize));
        if let Some(cmd) = step.get("qmp") {
            let r = q.cmd(cmd.clone());
            record(r);
        } else if let Some(raw) = step["raw"].as_str() {
            q.send_raw(raw.as_bytes());
            for _ in 0..step["replies"].as_u64().unwrap_or(1) {
                let r = q.reply();
                record(r);
            }
        } else if let Some(name) = step["event"].as_str() {
            let e = q.event(name);
            record(e);
        } else {
            panic!("step {i}: unknown step {step}");
        }
    }
    out
}

fn run(name: &str) {
    let sc = load(name);
    let qsd = transcript(Impl::Qsd, &sc);
    let tm = transcript(Impl::Tidemark, &sc);
    let steps = sc["steps"].as_array().cloned().unwrap_or_default();
    for (a, b) in qsd.iter().zip(tm.iter()) {
        assert_eq!(
            a,
            b,
            "{name}: step {} {} differs\n qsd:      {}\n tidemark: {}",
            a.0,
            steps.get(a.0).map(Value::to_string).unwrap_or_default(),
            a.1,
            b.1
        );
    }
    assert_eq!(qsd.len(), tm.len(), "{name}: transcript lengths differ");
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )*
    };
}

scenarios!(
    negotiation,
    envelope_errors,
    bitmap_commands,
    bitmap_errors,
    bitmap_flow,
    transactions,
    blockdev,
    exports,
    legacy_exports,
    argument_types,
    events,
    qcow2,
    qcow2_persistent,
    inconsistent_bitmap,
);
