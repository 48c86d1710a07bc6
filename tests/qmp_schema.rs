//! proto/qmp-schema.json against qemu-storage-daemon's own introspection:
//! every command and event tidemark offers exists in qsd, and its arguments
//! are qsd's (same names, same optional/required, compatible types,
//! enum values and union variants a subset of qsd's), level by level.

mod qmp_common;

use std::collections::{BTreeMap, BTreeSet};

use qmp_common::{Impl, Instance};
use serde_json::{json, Value};

struct Schema {
    by_name: BTreeMap<String, Value>,
    commands: BTreeSet<String>,
}

thread_local! {
    /// Type pairs already compared: the schemas are recursive
    /// (BlockdevOptions contains BlockdevRef contains BlockdevOptions).
    static SEEN: std::cell::RefCell<BTreeSet<(String, String)>> = Default::default();
}

fn schema(kind: Impl) -> Schema {
    let inst = Instance::start(kind, &[], |_| {});
    let mut q = inst.client();
    let list = q.exec("query-qmp-schema", json!({}))["return"].clone();
    let cmds = q.exec("query-commands", json!({}))["return"].clone();
    let by_name = list
        .as_array()
        .expect("schema list")
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or("").to_owned(), e.clone()))
        .collect();
    let commands = cmds
        .as_array()
        .expect("command list")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    Schema { by_name, commands }
}

fn members(t: &Value) -> BTreeMap<String, (bool, String)> {
    t["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let name = m["name"].as_str().unwrap_or("").to_owned();
            let optional = m.get("default").is_some();
            (
                name,
                (optional, m["type"].as_str().unwrap_or("").to_owned()),
            )
        })
        .collect()
}

/// Compares our type `a` with qsd's type `b`; appends differences.
fn compare(ours: &Schema, qsd: &Schema, a: &str, b: &str, path: &str, errs: &mut Vec<String>) {
    if !SEEN.with(|s| s.borrow_mut().insert((a.to_owned(), b.to_owned()))) {
        return;
    }
    let (Some(ta), Some(tb)) = (ours.by_name.get(a), qsd.by_name.get(b)) else {
        errs.push(format!("{path}: type {a} / {b} missing"));
        return;
    };
    let (ma, mb) = (ta["meta-type"].as_str(), tb["meta-type"].as_str());
    if ma != mb {
        errs.push(format!("{path}: {ma:?} here, {mb:?} in qsd"));
        return;
    }
    match ma {
        Some("builtin") if ta["json-type"] != tb["json-type"] => {
            errs.push(format!("{path}: {a} here, {b} in qsd"));
        }
        Some("enum") => {
            let vb: Vec<&Value> = tb["values"].as_array().into_iter().flatten().collect();
            for v in ta["values"].as_array().into_iter().flatten() {
                if !vb.contains(&v) {
                    errs.push(format!("{path}: value {v} not in qsd"));
                }
            }
        }
        Some("array") => compare(
            ours,
            qsd,
            ta["element-type"].as_str().unwrap_or(""),
            tb["element-type"].as_str().unwrap_or(""),
            &format!("{path}[]"),
            errs,
        ),
        Some("alternate") => {
            let kinds = |s: &Schema, t: &Value| -> BTreeMap<String, String> {
                t["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["type"].as_str())
                    .map(|n| {
                        // Branches are told apart by JSON type.
                        let key = s.by_name.get(n).map(|e| match e["meta-type"].as_str() {
                            Some("builtin") => e["json-type"].to_string(),
                            m => format!("{m:?}"),
                        });
                        (key.unwrap_or_default(), n.to_owned())
                    })
                    .collect()
            };
            let (ka, kb) = (kinds(ours, ta), kinds(qsd, tb));
            for (k, na) in &ka {
                match kb.get(k) {
                    Some(nb) => compare(ours, qsd, na, nb, &format!("{path}|{k}"), errs),
                    None => errs.push(format!("{path}: branch {k} not in qsd")),
                }
            }
        }
        Some("object") => {
            let (ma, mb) = (members(ta), members(tb));
            for (name, (opt, ty)) in &ma {
                match mb.get(name) {
                    None => errs.push(format!("{path}.{name}: not in qsd")),
                    Some((optb, tyb)) => {
                        if opt != optb {
                            errs.push(format!("{path}.{name}: optional {opt} here, {optb} in qsd"));
                        }
                        compare(ours, qsd, ty, tyb, &format!("{path}.{name}"), errs);
                    }
                }
            }
            for (name, (optb, _)) in &mb {
                if !optb && !ma.contains_key(name) {
                    errs.push(format!("{path}.{name}: required in qsd, missing here"));
                }
            }
            let variants = |t: &Value| -> BTreeMap<String, String> {
                t["variants"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        (
                            v["case"].as_str().unwrap_or("").to_owned(),
                            v["type"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            };
            let vb = variants(tb);
            for (case, ty) in variants(ta) {
                match vb.get(&case) {
                    Some(tyb) => compare(ours, qsd, &ty, tyb, &format!("{path}<{case}>"), errs),
                    None => errs.push(format!("{path}: variant {case} not in qsd")),
                }
            }
        }
        _ => {}
    }
}

#[test]
fn every_command_and_argument_is_qemus() {
    let ours = schema(Impl::Tidemark);
    let qsd = schema(Impl::Qsd);
    let mut errs = Vec::new();
    // tidemark's own commands are `x-tidemark-*` and marked as
    // extensions in proto/qmp-schema.json; everything else is qemu's.
    let proto: Value = serde_json::from_str(include_str!("../proto/qmp-schema.json"))
        .expect("proto/qmp-schema.json");
    for e in proto.as_array().into_iter().flatten() {
        let Some(name) = e["command"].as_str() else {
            continue;
        };
        if name.starts_with("x-tidemark-") != (e["extension"] == true) {
            errs.push(format!("command {name}: extension mark and name disagree"));
        }
    }
    for c in &ours.commands {
        if c.starts_with("x-tidemark-") {
            continue;
        }
        if !qsd.commands.contains(c) {
            errs.push(format!("command {c} not in qsd"));
            continue;
        }
        let (a, b) = (&ours.by_name[c], &qsd.by_name[c]);
        compare(
            &ours,
            &qsd,
            a["arg-type"].as_str().unwrap_or(""),
            b["arg-type"].as_str().unwrap_or(""),
            c,
            &mut errs,
        );
    }
    for (name, e) in &ours.by_name {
        if e["meta-type"] == "event" {
            match qsd.by_name.get(name) {
                Some(b) => compare(
                    &ours,
                    &qsd,
                    e["arg-type"].as_str().unwrap_or(""),
                    b["arg-type"].as_str().unwrap_or(""),
                    name,
                    &mut errs,
                ),
                // tidemark's own events are named X_TIDEMARK_*.
                None if name.starts_with("X_TIDEMARK_") => {}
                None => errs.push(format!("event {name} not in qsd")),
            }
        }
    }
    assert!(
        errs.is_empty(),
        "schema differs from qsd:\n{}",
        errs.join("\n")
    );
}

/// The object model's commands (issue 12): tidemark offers `object-add`
/// and `object-del`, and `nbd-server-start` takes `tls-creds` and
/// `tls-authz`; the test above compares their arguments with qsd's.
#[test]
fn object_commands_and_nbd_tls_are_offered() {
    let ours = schema(Impl::Tidemark);
    for c in ["object-add", "object-del"] {
        assert!(ours.commands.contains(c), "{c} not offered");
    }
    let start = &ours.by_name["nbd-server-start"];
    let args = &ours.by_name[start["arg-type"].as_str().unwrap_or("")];
    let names = members(args);
    for m in ["tls-creds", "tls-authz"] {
        assert!(names.contains_key(m), "nbd-server-start: no {m}");
    }
}
