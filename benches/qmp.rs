//! QMP against qemu-storage-daemon, in the same process and on the same
//! machine: the round-trip latency of a trivial command, and
//! `block-dirty-bitmap-merge` of large bitmaps (a 1 TiB sparse disk at
//! 4 KiB granularity: 2^28 bits, 32 MiB per bitmap), same and mixed
//! granularity. Each row prints both figures and the ratio qsd / tidemark
//! (above 1x: tidemark is faster).
//!
//! Run with `cargo bench --bench qmp`.

#[path = "../tests/qmp_common/mod.rs"]
mod qmp_common;

use std::time::{Duration, Instant};

use qmp_common::{qemu_io, raw_image, Impl, Instance, Qmp};
use serde_json::json;

const ROUND_TRIPS: usize = 2000;
const MERGES: usize = 10;
const DISK: u64 = 1 << 40;

fn args() -> Vec<String> {
    [
        "--blockdev",
        "driver=file,node-name=f0,filename=$DIR/big.img",
        "--blockdev",
        "driver=raw,node-name=r0,file=f0",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=w,node-name=r0,name=w,writable=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ok(q: &mut Qmp, cmd: &str, a: serde_json::Value) {
    let r = q.exec(cmd, a);
    assert!(r.get("return").is_some(), "{cmd}: {r}");
}

/// Mean time per call of `f`, over `n` calls.
fn mean(n: usize, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed() / n as u32
}

struct Figures {
    round_trip: Duration,
    merge_same: Duration,
    merge_mixed: Duration,
}

fn measure(kind: Impl) -> Figures {
    let inst = Instance::start(kind, &args(), |d| raw_image(&d.join("big.img"), DISK));
    let mut q = inst.client();
    let round_trip = mean(ROUND_TRIPS, || ok(&mut q, "query-version", json!({})));
    for (name, g) in [("a", 4096), ("b", 4096), ("c", 65536)] {
        ok(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "r0", "name": name, "granularity": g}),
        );
    }
    // Scattered dirty areas across the whole disk.
    let writes: Vec<String> = (0..64u64)
        .map(|i| format!("write -z {} 64k", i * (DISK / 64) + i * 12288))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&inst.nbd_uri("w"), &writes);
    let merge_same = mean(MERGES, || {
        ok(
            &mut q,
            "block-dirty-bitmap-merge",
            json!({"node": "r0", "target": "b", "bitmaps": ["a"]}),
        )
    });
    let merge_mixed = mean(MERGES, || {
        ok(
            &mut q,
            "block-dirty-bitmap-merge",
            json!({"node": "r0", "target": "b", "bitmaps": ["c"]}),
        )
    });
    Figures {
        round_trip,
        merge_same,
        merge_mixed,
    }
}

fn main() {
    let qsd = measure(Impl::Qsd);
    let tm = measure(Impl::Tidemark);
    println!("| QMP | qemu-storage-daemon | tidemark | qsd / tidemark |");
    println!("| --- | --- | --- | --- |");
    let row = |what: &str, a: Duration, b: Duration| {
        println!(
            "| {what} | {a:?} | {b:?} | {:.2}x |",
            a.as_secs_f64() / b.as_secs_f64().max(1e-12)
        );
    };
    row(
        &format!("query-version round trip (mean of {ROUND_TRIPS})"),
        qsd.round_trip,
        tm.round_trip,
    );
    row(
        "merge 2^28-bit bitmaps, same granularity",
        qsd.merge_same,
        tm.merge_same,
    );
    row(
        "merge 64 KiB into 4 KiB granularity",
        qsd.merge_mixed,
        tm.merge_mixed,
    );
}
