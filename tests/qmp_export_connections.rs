//! Deleting an export that a client is connected to: mode=safe refuses
//! ("still in use"), mode=hard deletes it and drops the client, as
//! qemu-storage-daemon does; the transcripts of both must be equal.

mod qmp_common;

use qmp_common::{normalise, raw_image, Impl, Instance};
use serde_json::{json, Value};
use tidemark::nbd::client::{ConnectOptions, NbdClient};

fn transcript(kind: Impl) -> Vec<Value> {
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=f0,filename=$DIR/a.img",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=f0,name=x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let inst = Instance::start(kind, &args, |d| raw_image(&d.join("a.img"), 1 << 20));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let opts = ConnectOptions {
        export: "x".into(),
        ..Default::default()
    };
    let mut nbd = rt
        .block_on(NbdClient::connect_unix(&inst.path("nbd.sock"), &opts))
        .expect("connect");
    let mut q = inst.client();
    let mut out = Vec::new();
    let dir = inst.dir.path().to_owned();
    let mut rec = |v: Value| out.push(normalise(&v, &dir));
    rec(json!({"read": rt.block_on(nbd.read(0, 512, 0)).is_ok()}));
    rec(q.exec("block-export-del", json!({"id": "e0"})));
    rec(q.exec("block-export-del", json!({"id": "e0", "mode": "safe"})));
    rec(q.exec("query-block-exports", json!({})));
    rec(json!({"read": rt.block_on(nbd.read(0, 512, 0)).is_ok()}));
    rec(q.exec("block-export-del", json!({"id": "e0", "mode": "hard"})));
    rec(q.event("BLOCK_EXPORT_DELETED"));
    rec(q.exec("query-block-exports", json!({})));
    rec(json!({"read after hard delete": rt.block_on(nbd.read(0, 512, 0)).is_ok()}));
    out
}

#[test]
fn export_in_use_is_kept_in_safe_mode_and_dropped_in_hard_mode() {
    let qsd = transcript(Impl::Qsd);
    let tm = transcript(Impl::Tidemark);
    assert_eq!(qsd, tm);
}
