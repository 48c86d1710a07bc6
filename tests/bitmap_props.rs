//! Random sequences of set, reset, clear, merge (across granularities) and
//! serialise/deserialise, checked after every step against a naive model:
//! one `bool` per granule, computed byte range by byte range.

use proptest::prelude::*;
use tidemark::bitmap::DirtyBitmap;

/// The obvious implementation the real one must agree with.
#[derive(Clone, Debug)]
struct Model {
    size: u64,
    granularity: u64,
    dirty: Vec<bool>,
}

impl Model {
    fn new(size: u64, granularity: u64) -> Self {
        let n = size.div_ceil(granularity) as usize;
        Model {
            size,
            granularity,
            dirty: vec![false; n],
        }
    }

    /// Bytes `[start, end)` of granule `i`, clipped to the disk.
    fn bytes_of(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.granularity;
        (start, (start + self.granularity).min(self.size))
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|e| e <= self.size)
    }

    fn set(&mut self, offset: u64, len: u64) {
        // A zero-length range touches no granule.
        if len == 0 {
            return;
        }
        for i in 0..self.dirty.len() {
            let (s, e) = self.bytes_of(i);
            if s < offset + len && offset < e {
                self.dirty[i] = true;
            }
        }
    }

    fn reset(&mut self, offset: u64, len: u64) {
        for i in 0..self.dirty.len() {
            let (s, e) = self.bytes_of(i);
            let full_end = s + self.granularity;
            // Wholly covered, where the disk end may cut the last granule.
            let covered_end = if offset + len == self.size {
                e
            } else {
                full_end
            };
            if offset <= s && covered_end <= offset + len {
                self.dirty[i] = false;
            }
        }
    }

    fn merge(&mut self, src: &Model) {
        for i in 0..self.dirty.len() {
            let (s, e) = self.bytes_of(i);
            for j in 0..src.dirty.len() {
                let (ss, se) = src.bytes_of(j);
                if src.dirty[j] && ss < e && s < se {
                    self.dirty[i] = true;
                }
            }
        }
    }

    /// Maximal dirty byte runs within `[offset, end)`.
    fn dirty_extents(&self, offset: u64, end: u64) -> Vec<(u64, u64)> {
        let end = end.min(self.size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in 0..self.dirty.len() {
            if !self.dirty[i] {
                continue;
            }
            let (s, e) = self.bytes_of(i);
            let (s, e) = (s.max(offset), e.min(end));
            if s >= e {
                continue;
            }
            match out.last_mut() {
                Some((ps, pl)) if *ps + *pl == s => *pl += e - s,
                _ => out.push((s, e - s)),
            }
        }
        out
    }

    fn stream(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.dirty.len().div_ceil(8)];
        for (i, &d) in self.dirty.iter().enumerate() {
            if d {
                out[i / 8] |= 1 << (i % 8);
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
enum Op {
    Set(u64, u64),
    Reset(u64, u64),
    Clear,
    /// Merge from a bitmap of granularity 2^shift with these ranges set.
    Merge(u32, Vec<(u64, u64)>),
    /// Serialise the whole bitmap and load it into a fresh one.
    RoundTrip,
    /// Serialise a byte-aligned chunk and write it back into a cleared copy.
    Chunk(u64, u64),
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..=size + 2048, 0..=size / 2 + 2048);
    prop_oneof![
        4 => range.clone().prop_map(|(o, l)| Op::Set(o, l)),
        3 => range.clone().prop_map(|(o, l)| Op::Reset(o, l)),
        1 => Just(Op::Clear),
        2 => (9u32..=16, prop::collection::vec(range, 0..4))
            .prop_map(|(s, r)| Op::Merge(s, r)),
        1 => Just(Op::RoundTrip),
        1 => (0u64..64, 0u64..64).prop_map(|(a, b)| Op::Chunk(a, b)),
    ]
}

fn case() -> impl Strategy<Value = (u64, u32, Vec<Op>)> {
    (0u64..200_000, 9u32..=15).prop_flat_map(|(size, shift)| {
        (
            Just(size),
            Just(shift),
            prop::collection::vec(op(size), 1..24),
        )
    })
}

fn check_same(b: &DirtyBitmap, m: &Model) {
    assert_eq!(b.granules() as usize, m.dirty.len());
    for (i, &d) in m.dirty.iter().enumerate() {
        assert_eq!(b.is_dirty(i as u64 * m.granularity), d, "granule {i}");
    }
    let n = m.dirty.iter().filter(|&&d| d).count() as u64;
    assert_eq!(b.count(), n * m.granularity);
    assert_eq!(b.to_bytes(), m.stream());
    let ext: Vec<_> = b.dirty_extents(0, u64::MAX).collect();
    assert_eq!(ext, m.dirty_extents(0, u64::MAX));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_operations_agree_with_the_model((size, shift, ops) in case()) {
        let g = 1u64 << shift;
        let mut b = DirtyBitmap::new("b0", size, g).unwrap();
        let mut m = Model::new(size, g);
        for op in ops {
            match op {
                Op::Set(o, l) => {
                    let ok = b.set_range(o, l).is_ok();
                    prop_assert_eq!(ok, m.in_range(o, l));
                    if ok { m.set(o, l); }
                }
                Op::Reset(o, l) => {
                    let ok = b.reset_range(o, l).is_ok();
                    prop_assert_eq!(ok, m.in_range(o, l));
                    if ok { m.reset(o, l); }
                }
                Op::Clear => {
                    b.clear();
                    m.dirty.fill(false);
                }
                Op::Merge(s, ranges) => {
                    let mut src = DirtyBitmap::new("src", size, 1 << s).unwrap();
                    let mut sm = Model::new(size, 1 << s);
                    for (o, l) in ranges {
                        if src.set_range(o, l).is_ok() { sm.set(o, l); }
                    }
                    b.merge(&src).unwrap();
                    m.merge(&sm);
                }
                Op::RoundTrip => {
                    let bytes = b.to_bytes();
                    let back = DirtyBitmap::from_bytes("b0", size, g, &bytes).unwrap();
                    prop_assert_eq!(back.sha256(), b.sha256());
                    prop_assert_eq!(&back, &b);
                }
                Op::Chunk(a, n) => {
                    let len = b.to_bytes().len() as u64;
                    let first = a.min(len);
                    let n = n.min(len - first);
                    let chunk = b.serialize_range(first * 8, n).unwrap();
                    prop_assert_eq!(&chunk[..], &m.stream()[first as usize..(first + n) as usize]);
                    let zero = chunk.iter().all(|&x| x == 0);
                    prop_assert_eq!(b.is_range_zero(first * 8, n * 8), zero);
                    let mut copy = b.clone();
                    copy.deserialize_fill(first * 8, n, false).unwrap();
                    copy.deserialize_range(first * 8, &chunk).unwrap();
                    prop_assert_eq!(&copy, &b);
                }
            }
            check_same(&b, &m);
        }
    }

    #[test]
    fn extents_and_queries_agree_with_the_model(
        (size, shift, ops) in case(),
        offset in 0u64..210_000,
        span in 0u64..210_000,
    ) {
        let g = 1u64 << shift;
        let mut b = DirtyBitmap::new("b0", size, g).unwrap();
        let mut m = Model::new(size, g);
        for op in ops {
            if let Op::Set(o, l) = op {
                if b.set_range(o, l).is_ok() { m.set(o, l); }
            }
        }
        let end = offset + span;
        let want = m.dirty_extents(offset, end);
        let got: Vec<_> = b.dirty_extents(offset, end).collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(b.next_dirty_area(offset, end), want.first().copied());
        // The alternating extents tile [offset, min(end, size)) exactly.
        let clipped = end.min(size);
        let mut pos = offset;
        let mut dirty_runs = Vec::new();
        for e in b.extents(offset, end) {
            prop_assert_eq!(e.offset, pos);
            prop_assert!(e.len > 0);
            if e.dirty { dirty_runs.push((e.offset, e.len)); }
            pos += e.len;
        }
        prop_assert_eq!(pos, clipped.max(offset));
        prop_assert_eq!(dirty_runs, want);
        // next_clean: the first byte at or after offset in a clean granule.
        let expect_clean = (offset..clipped).find(|&x| !m.dirty[(x / g) as usize]);
        prop_assert_eq!(b.next_clean(offset, end), expect_clean);
    }
}
