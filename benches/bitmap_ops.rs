//! Micro benchmark of every `DirtyBitmap` operation the daemon leans on, on
//! a 1 TiB disk at 64 KiB granularity (16M bits, 2 MiB of bits) in four
//! dirty patterns: merge, set range, reset/clear, extent scan and next
//! dirty area, count, clone and compare, and the qcow2 stream (serialise,
//! load, hash).
//!
//! Run with `cargo bench --bench bitmap_ops`; `BENCH_REPS` (default 30) sets
//! how many timed runs each row keeps the best of. Whole-bitmap rows print
//! GiB/s of bitmap bits (2 MiB per pass); small operations print ns/op.
//! Compare two builds by running them alternately on an idle machine.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::lcg;
use tidemark::bitmap::DirtyBitmap;

const TIB: u64 = 1 << 40;
const G64K: u64 = 64 * 1024;
/// Bytes of bits in a 1 TiB / 64 KiB bitmap: the unit of the GiB/s rows.
const BITMAP_BYTES: u64 = (TIB / G64K) / 8;
/// A qcow2 bitmap data cluster (64 KiB) holds this many granules.
const CLUSTER_GRANULES: u64 = 64 * 1024 * 8;

/// Best of `reps` timings of `f`.
fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let start = Instant::now();
        f();
        best = best.min(start.elapsed());
    }
    best
}

fn empty() -> DirtyBitmap {
    DirtyBitmap::new("b", TIB, G64K).expect("bitmap")
}

/// The four patterns: no dirty bit; 100k scattered extents of 1 to 16
/// granules; alternating dirty and clean runs of 1 to 128 granules (about
/// half dirty, ~130k dirty extents); every bit dirty.
fn patterns() -> Vec<(&'static str, DirtyBitmap)> {
    let mut sparse = empty();
    let mut next = lcg(1);
    let granules = TIB / G64K;
    for _ in 0..100_000 {
        let g = next() % (granules - 16);
        sparse
            .set_range(g * G64K, (1 + next() % 16) * G64K)
            .expect("in range");
    }
    let mut half = empty();
    let mut next = lcg(2);
    let mut g = 0;
    while g < granules {
        let dirty = (1 + next() % 128).min(granules - g);
        half.set_range(g * G64K, dirty * G64K).expect("in range");
        g += dirty + 1 + next() % 128;
    }
    let mut full = empty();
    full.set_range(0, TIB).expect("in range");
    vec![
        ("empty", empty()),
        ("sparse", sparse),
        ("half", half),
        ("full", full),
    ]
}

/// `n` byte ranges of 1 to 16 granules at unaligned random offsets: what
/// guest writes look like to the write path.
fn small_ranges(n: usize, seed: u64) -> Vec<(u64, u64)> {
    let mut next = lcg(seed);
    (0..n)
        .map(|_| {
            let off = next() % (TIB - 17 * G64K);
            (off, 1 + next() % (16 * G64K))
        })
        .collect()
}

/// Prints one markdown row per measurement.
struct Report {
    reps: usize,
}

impl Report {
    /// A whole-bitmap pass: GiB/s of bitmap bits.
    fn pass(&mut self, name: impl Into<String>, mut f: impl FnMut()) {
        let d = best(self.reps, &mut f);
        let gib = BITMAP_BYTES as f64 / (1u64 << 30) as f64;
        self.push(name, gib / d.as_secs_f64().max(1e-12), "GiB/s");
    }

    /// `ops` small operations per call of `f`: ns per operation.
    fn per_op(&mut self, name: impl Into<String>, ops: usize, mut f: impl FnMut()) {
        let d = best(self.reps, &mut f);
        self.push(name, d.as_secs_f64() * 1e9 / ops as f64, "ns/op");
    }

    /// A whole call of `f` that is not a plain pass: milliseconds.
    fn millis(&mut self, name: impl Into<String>, mut f: impl FnMut()) {
        let d = best(self.reps, &mut f);
        self.push(name, d.as_secs_f64() * 1e3, "ms");
    }

    fn push(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        println!("| {} | {value:.3} | {unit} |", name.into());
    }
}

fn merge_rows(r: &mut Report, pats: &[(&str, DirtyBitmap)]) {
    let sparse = &pats[1].1;
    for (name, src) in pats {
        // Merging is idempotent: the same target each run, no allocation.
        let mut dst = sparse.clone();
        r.pass(format!("merge {name} into sparse"), || {
            dst.merge(black_box(src)).expect("merge")
        });
    }
    for (name, src) in &pats[1..3] {
        let mut dst = DirtyBitmap::new("t", TIB, 512 * 1024).expect("bitmap");
        r.millis(format!("merge {name} into 512 KiB granularity"), || {
            dst.merge(black_box(src)).expect("merge")
        });
    }
}

fn set_reset_rows(r: &mut Report) {
    let ranges = small_ranges(100_000, 3);
    let mut b = empty();
    r.per_op("set_range 1-16 granules, unaligned", ranges.len(), || {
        for &(o, l) in &ranges {
            b.set_range(o, l).expect("in range");
        }
    });
    let mut b = empty();
    r.per_op("reset_range 1-16 granules, unaligned", ranges.len(), || {
        b.set_range(0, TIB).expect("in range");
        for &(o, l) in &ranges {
            b.reset_range(o, l).expect("in range");
        }
    });
    // Aligned 1 GiB ranges (16384 granules, 256 words) across the disk.
    let mut b = empty();
    r.per_op("set_range 1 GiB aligned", 1024, || {
        for i in 0..1024 {
            b.set_range(i << 30, 1 << 30).expect("in range");
        }
    });
    r.per_op("reset_range 1 GiB aligned", 1024, || {
        for i in 0..1024 {
            b.reset_range(i << 30, 1 << 30).expect("in range");
        }
    });
    let mut b = empty();
    r.pass("set_range whole disk", || b.set_range(0, TIB).expect("set"));
    r.pass("reset_range whole disk", || {
        b.reset_range(0, TIB).expect("reset")
    });
    r.pass("clear", || b.clear());
}

fn scan_rows(r: &mut Report, pats: &[(&str, DirtyBitmap)]) {
    for (name, b) in pats {
        let mut n = 0;
        r.millis(format!("dirty_extents {name}"), || {
            n = black_box(b).dirty_extents(0, u64::MAX).count()
        });
        let mut m = 0;
        r.millis(format!("extents {name}"), || {
            m = black_box(b).extents(0, u64::MAX).count()
        });
        eprintln!("  ({name}: {n} dirty extents, {m} extents)");
    }
    // NBD block status style: the next dirty area in a 64 MiB window from
    // a random offset, and the next clean byte from there.
    let mut next = lcg(4);
    let probes: Vec<u64> = (0..100_000).map(|_| next() % TIB).collect();
    for (name, b) in &pats[1..3] {
        r.per_op(
            format!("next_dirty_area 64 MiB window, {name}"),
            probes.len(),
            || {
                for &p in &probes {
                    black_box(b.next_dirty_area(p, p + (64 << 20)));
                }
            },
        );
        r.per_op(
            format!("next_clean to disk end, {name}"),
            probes.len(),
            || {
                for &p in &probes {
                    black_box(b.next_clean(p, u64::MAX));
                }
            },
        );
    }
}

fn count_rows(r: &mut Report, pats: &[(&str, DirtyBitmap)]) {
    for (name, b) in pats {
        r.pass(format!("count {name}"), || {
            black_box(black_box(b).count());
        });
    }
    let b = &pats[0].1;
    r.pass("is_empty empty", || {
        black_box(black_box(b).is_empty());
    });
    // A successor or a job's copy is a clone; tests compare whole bitmaps.
    let b = &pats[1].1;
    r.pass("clone sparse", || {
        black_box(black_box(b).clone());
    });
    let c = b.clone();
    r.pass("eq sparse", || {
        black_box(black_box(b) == black_box(&c));
    });
}

fn stream_rows(r: &mut Report, pats: &[(&str, DirtyBitmap)]) {
    for (name, b) in &pats[1..3] {
        r.pass(format!("to_bytes {name}"), || {
            black_box(black_box(b).to_bytes());
        });
        let bytes = b.to_bytes();
        r.pass(format!("from_bytes {name}"), || {
            black_box(DirtyBitmap::from_bytes("b", TIB, G64K, &bytes).expect("load"));
        });
        // The qcow2 store: per cluster, skip it if zero, else serialise it.
        r.pass(format!("store clusters {name}"), || {
            let mut g = 0;
            while g < b.granules() {
                if !b.is_range_zero(g, CLUSTER_GRANULES) {
                    let n = (b.serialized_len() - g / 8).min(CLUSTER_GRANULES / 8);
                    black_box(b.serialize_range(g, n).expect("range"));
                }
                g += CLUSTER_GRANULES;
            }
        });
        // The qcow2 load: per cluster, deserialise into a bitmap.
        let mut t = empty();
        r.pass(format!("load clusters {name}"), || {
            for (i, chunk) in bytes.chunks(64 * 1024).enumerate() {
                t.deserialize_range(i as u64 * CLUSTER_GRANULES, chunk)
                    .expect("range");
            }
        });
        r.pass(format!("sha256 {name}"), || {
            black_box(black_box(b).sha256());
        });
    }
}

fn main() {
    let reps = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let pats = patterns();
    println!("tidemark bitmap ops: 1 TiB at 64 KiB (16M bits), best of {reps}");
    for (name, b) in &pats {
        println!("pattern {name}: {} dirty granules", b.dirty_granules());
    }
    println!("| row | value | unit |");
    println!("|---|---|---|");
    let mut r = Report { reps };
    merge_rows(&mut r, &pats);
    set_reset_rows(&mut r);
    scan_rows(&mut r, &pats);
    count_rows(&mut r, &pats);
    stream_rows(&mut r, &pats);
}
