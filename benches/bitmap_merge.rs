//! Micro benchmark of the in-memory bitmap: merging two bitmaps of 16M bits
//! and scanning a 1 TiB / 64 KiB bitmap holding 100k scattered dirty
//! extents. Each figure is printed with the ratio against a bit-at-a-time
//! reference run in the same process (what a naive bitmap would cost).
//!
//! Run with `cargo bench --bench bitmap_merge`.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::lcg;
use tidemark::bitmap::DirtyBitmap;

const TIB: u64 = 1 << 40;
const G64K: u64 = 64 * 1024;

/// Best of `runs` timings of `f`, and its last result.
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..runs {
        let start = Instant::now();
        let r = black_box(f());
        best = best.min(start.elapsed());
        out = Some(r);
    }
    (best, out.expect("at least one run"))
}

/// A 1 TiB bitmap at `granularity` with `n` scattered dirty extents of 1 to
/// 16 granules (64 KiB granules: 16M bits).
fn scattered(granularity: u64, n: usize, seed: u64) -> DirtyBitmap {
    let mut b = DirtyBitmap::new("b", TIB, granularity).expect("bitmap");
    let mut next = lcg(seed);
    let granules = TIB / granularity;
    for _ in 0..n {
        let g = next() % (granules - 16);
        let len = 1 + next() % 16;
        b.set_range(g * granularity, len * granularity)
            .expect("in range");
    }
    b
}

fn report(what: &str, ours: Duration, reference: Duration) {
    println!(
        "{what:<48} {:>10.3} ms   reference {:>10.3} ms   x{:.0}",
        ours.as_secs_f64() * 1e3,
        reference.as_secs_f64() * 1e3,
        reference.as_secs_f64() / ours.as_secs_f64().max(1e-12),
    );
}

/// Bit-at-a-time merge: the reference for the word-level one.
fn naive_merge(dst: &mut DirtyBitmap, src: &DirtyBitmap) {
    let g = src.granularity();
    for i in 0..src.granules() {
        if src.is_dirty(i * g) {
            dst.set_range(i * g, g.min(src.size() - i * g))
                .expect("in range");
        }
    }
}

/// Bit-at-a-time scan for dirty extents: the reference for the word scan.
fn naive_extents(b: &DirtyBitmap) -> usize {
    let g = b.granularity();
    let mut extents = 0;
    let mut in_run = false;
    for i in 0..b.granules() {
        let d = b.is_dirty(i * g);
        if d && !in_run {
            extents += 1;
        }
        in_run = d;
    }
    extents
}

fn main() {
    println!("tidemark bitmap micro benchmark (best of several runs)");
    let a = scattered(G64K, 100_000, 1);
    let b = scattered(G64K, 100_000, 2);
    println!(
        "bitmaps: 1 TiB at 64 KiB = {} bits ({} KiB of words), {} and {} dirty granules",
        a.granules(),
        a.words().len() * 8 / 1024,
        a.dirty_granules(),
        b.dirty_granules()
    );

    // Merging is idempotent, so each run merges into the same target in
    // place: the timing is the merge alone, no allocation or copy.
    // Same granularity: a word-wise OR of 16M bits.
    let mut d = a.clone();
    let (ours, _) = time(20, || d.merge(&b).expect("merge"));
    let mut d = a.clone();
    let (reference, _) = time(3, || naive_merge(&mut d, &b));
    report("merge 16M bits, same granularity", ours, reference);

    // Across granularities: the 64 KiB source into a 512 KiB target and
    // into a 4 KiB target (256M bits).
    for target_granularity in [512 * 1024, 4096] {
        let mut d = DirtyBitmap::new("t", TIB, target_granularity).expect("bitmap");
        let (ours, _) = time(5, || d.merge(&b).expect("merge"));
        let mut n = DirtyBitmap::new("t", TIB, target_granularity).expect("bitmap");
        let (reference, _) = time(1, || naive_merge(&mut n, &b));
        assert_eq!(d, n);
        report(
            &format!("merge 16M bits into granularity {target_granularity}"),
            ours,
            reference,
        );
    }

    // Scan: every dirty extent of the 1 TiB bitmap.
    let (ours, n) = time(20, || a.dirty_extents(0, u64::MAX).count());
    let (reference, naive_n) = time(3, || naive_extents(&a));
    assert_eq!(n, naive_n);
    report(
        &format!("scan 1 TiB/64 KiB: {n} dirty extents"),
        ours,
        reference,
    );
    let (ours, n) = time(20, || a.extents(0, u64::MAX).count());
    report(
        &format!("scan 1 TiB/64 KiB: {n} clean+dirty extents"),
        ours,
        reference,
    );

    // Hash and serialise the 16M bits (2 MiB).
    let (sha, _) = time(10, || a.sha256());
    let (ser, _) = time(10, || a.to_bytes());
    println!(
        "sha256 of 16M bits {:>10.3} ms   to_bytes {:>10.3} ms",
        sha.as_secs_f64() * 1e3,
        ser.as_secs_f64() * 1e3
    );
}
