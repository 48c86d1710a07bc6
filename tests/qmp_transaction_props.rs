//! Transactions leave every bitmap exactly as before when any action
//! fails: for random groups of bitmap actions ending in one that fails,
//! the names, bits and flags of every bitmap on every node are unchanged.
//! Runs the command code in-process (no sockets), so thousands of cases
//! are cheap.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tidemark::bitmap::set::lock;
use tidemark::block::BlockNode;
use tidemark::daemon::Daemon;
use tidemark::qmp::commands::{block, transaction};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const NODES: [&str; 2] = ["r0", "f0"];

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// A daemon with a raw node over a file node, bitmaps on both, some dirty.
fn setup(dir: &std::path::Path) -> std::sync::Arc<Daemon> {
    let img = dir.join("a.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 20))
        .expect("image");
    let d = Daemon::new();
    block::blockdev_add(
        &d,
        obj(json!({"driver": "file", "node-name": "f0", "filename": img})),
    )
    .expect("file node");
    block::blockdev_add(
        &d,
        obj(json!({"driver": "raw", "node-name": "r0", "file": "f0"})),
    )
    .expect("raw node");
    let add = |node: &str, name: &str, g: u64, disabled: bool| {
        let a = json!({"type": "block-dirty-bitmap-add",
                       "data": {"node": node, "name": name, "granularity": g, "disabled": disabled}});
        transaction::transaction(&d, obj(json!({ "actions": [a] }))).expect("add");
    };
    add("r0", "a", 65536, false);
    add("r0", "b", 512, true);
    add("f0", "a", 4096, false);
    let r0 = d.find_node("r0").expect("r0");
    r0.write_at(&[1u8; 4096], 70_000, false).expect("write");
    r0.write_at(&[1u8; 512], 3 << 20, false).expect("write");
    d
}

type Snapshot = BTreeMap<(String, String), String>;

fn snapshot(d: &Daemon) -> Snapshot {
    let mut s = BTreeMap::new();
    for node in NODES {
        let n = d.find_node(node).expect("node");
        for b in n.bitmaps().all() {
            let g = lock(&b);
            s.insert(
                (node.to_owned(), g.name().to_owned()),
                format!("{:?} {}", g.state, g.sha256()),
            );
        }
    }
    s
}

fn action() -> impl Strategy<Value = Value> {
    let node = prop::sample::select(NODES.to_vec());
    let name = prop::sample::select(NAMES.to_vec());
    let gran = prop::sample::select(vec![512u64, 4096, 65536]);
    prop_oneof![
        (node.clone(), name.clone(), gran, any::<bool>()).prop_map(|(n, b, g, dis)| json!(
            {"type": "block-dirty-bitmap-add",
             "data": {"node": n, "name": b, "granularity": g, "disabled": dis}})),
        (node.clone(), name.clone()).prop_map(|(n, b)| json!(
            {"type": "block-dirty-bitmap-remove", "data": {"node": n, "name": b}})),
        (node.clone(), name.clone()).prop_map(|(n, b)| json!(
            {"type": "block-dirty-bitmap-clear", "data": {"node": n, "name": b}})),
        (node.clone(), name.clone()).prop_map(|(n, b)| json!(
            {"type": "block-dirty-bitmap-enable", "data": {"node": n, "name": b}})),
        (node.clone(), name.clone()).prop_map(|(n, b)| json!(
            {"type": "block-dirty-bitmap-disable", "data": {"node": n, "name": b}})),
        (
            node.clone(),
            name.clone(),
            prop::collection::vec((node, name), 0..3)
        )
            .prop_map(|(n, t, srcs)| {
                let srcs: Vec<Value> = srcs
                    .into_iter()
                    .map(|(sn, sb)| json!({"node": sn, "name": sb}))
                    .collect();
                json!({"type": "block-dirty-bitmap-merge",
                       "data": {"node": n, "target": t, "bitmaps": srcs}})
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn failed_transaction_changes_no_bitmap(mut actions in prop::collection::vec(action(), 0..8)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = setup(dir.path());
        let before = snapshot(&d);
        actions.push(json!({"type": "abort", "data": {}}));
        let r = transaction::transaction(&d, obj(json!({ "actions": actions })));
        prop_assert!(r.is_err());
        prop_assert_eq!(snapshot(&d), before);
    }

    /// A group that succeeds equals the same actions run one by one.
    #[test]
    fn successful_transaction_equals_single_commands(actions in prop::collection::vec(action(), 0..6)) {
        let dir1 = tempfile::tempdir().expect("temp dir");
        let dir2 = tempfile::tempdir().expect("temp dir");
        let grouped = setup(dir1.path());
        let single = setup(dir2.path());
        if transaction::transaction(&grouped, obj(json!({ "actions": actions.clone() }))).is_ok() {
            for a in actions {
                let r = transaction::transaction(&single, obj(json!({ "actions": [a] })));
                prop_assert!(r.is_ok(), "one by one failed: {:?}", r);
            }
            prop_assert_eq!(snapshot(&grouped), snapshot(&single));
        }
    }
}
