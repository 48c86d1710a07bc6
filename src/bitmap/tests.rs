//! Edge cases of `DirtyBitmap`; random sequences against a naive model live
//! in tests/bitmap_props.rs.

use super::*;

const K: u64 = 1024;

fn bm(size: u64, granularity: u64) -> DirtyBitmap {
    DirtyBitmap::new("b0", size, granularity).unwrap()
}

#[test]
fn last_partial_granule_is_one_bit_and_counts_whole() {
    // 1 MiB + 1536 bytes at 64 KiB: 17 granules, the last one 1536 bytes.
    let mut b = bm(1024 * K + 1536, 64 * K);
    assert_eq!(b.granules(), 17);
    b.set_range(1024 * K + 512, 512).unwrap();
    assert_eq!(b.dirty_granules(), 1);
    // QEMU reports 65536 here, more than the 1536 bytes that exist.
    assert_eq!(b.count(), 64 * K);
    assert_eq!(b.next_dirty_area(0, u64::MAX), Some((1024 * K, 1536)));
    // Resetting up to the disk end clears the partial granule.
    b.reset_range(1024 * K, 1536).unwrap();
    assert!(b.is_empty());
}

#[test]
fn zero_length_ranges_change_nothing() {
    let mut b = bm(64 * K, 512);
    b.set_range(4 * K, 0).unwrap();
    assert!(b.is_empty());
    b.set_range(64 * K, 0).unwrap();
    assert!(b.is_empty());
    b.set_range(0, 64 * K).unwrap();
    b.reset_range(512, 0).unwrap();
    assert_eq!(b.count(), 64 * K);
    assert_eq!(b.next_dirty_area(100, 100), None);
}

#[test]
fn ranges_past_the_end_are_refused_and_change_nothing() {
    let mut b = bm(64 * K, 4 * K);
    for (offset, len) in [(60 * K, 8 * K), (64 * K, 1), (u64::MAX, 2), (1, u64::MAX)] {
        let err = b.set_range(offset, len).unwrap_err();
        assert_eq!(err.kind, BitmapErrorKind::Invalid);
        assert!(b.reset_range(offset, len).is_err());
    }
    assert!(b.is_empty());
}

#[test]
fn queries_clip_to_the_disk_size() {
    let mut b = bm(10 * K, 4 * K);
    b.set_range(9 * K, 1).unwrap();
    assert_eq!(b.next_dirty_area(0, 1 << 40), Some((8 * K, 2 * K)));
    assert_eq!(b.next_dirty_area(9 * K, 1 << 40), Some((9 * K, K)));
    assert_eq!(b.next_dirty_area(10 * K, 1 << 40), None);
    assert_eq!(b.next_clean(8 * K, 1 << 40), None);
    assert_eq!(b.next_clean(5 * K, 1 << 40), Some(5 * K));
    assert!(!b.is_dirty(10 * K));
}

#[test]
fn set_touches_partial_granules_reset_needs_whole_ones() {
    let mut b = bm(64 * K, 4 * K);
    b.set_range(4 * K - 1, 2).unwrap();
    assert_eq!(
        b.dirty_extents(0, u64::MAX).collect::<Vec<_>>(),
        [(0, 8 * K)]
    );
    // Covers granule 0 only partly, granule 1 wholly.
    b.reset_range(1, 8 * K - 1).unwrap();
    assert_eq!(
        b.dirty_extents(0, u64::MAX).collect::<Vec<_>>(),
        [(0, 4 * K)]
    );
    b.reset_range(0, 4 * K).unwrap();
    assert!(b.is_empty());
}

#[test]
fn next_dirty_area_starts_inside_a_dirty_granule() {
    let mut b = bm(1024 * K, 64 * K);
    b.set_range(64 * K, 128 * K).unwrap();
    assert_eq!(b.next_dirty_area(100 * K, 150 * K), Some((100 * K, 50 * K)));
    assert_eq!(b.next_dirty_area(0, 64 * K), None);
    assert_eq!(b.next_clean(64 * K, 1024 * K), Some(192 * K));
}

#[test]
fn extents_alternate_and_cover_the_range() {
    let mut b = bm(100 * K, 4 * K);
    b.set_range(8 * K, 4 * K).unwrap();
    b.set_range(96 * K, 4 * K).unwrap();
    let e: Vec<_> = b.extents(K, 200 * K).collect();
    let dirty: Vec<_> = e.iter().map(|x| (x.offset, x.len, x.dirty)).collect();
    assert_eq!(
        dirty,
        [
            (K, 7 * K, false),
            (8 * K, 4 * K, true),
            (12 * K, 84 * K, false),
            (96 * K, 4 * K, true)
        ]
    );
}

#[test]
fn clear_all_and_zero_size_disk() {
    let mut b = bm(0, 512);
    assert_eq!(b.granules(), 0);
    assert_eq!(b.next_dirty_area(0, 10), None);
    assert!(b.set_range(0, 1).is_err());
    // QEMU hashes one zero word for an empty bitmap.
    assert_eq!(
        b.sha256(),
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    );
    let mut b = bm(1 << 30, 64 * K);
    b.set_range(0, 1 << 30).unwrap();
    assert_eq!(b.count(), 1 << 30);
    b.clear();
    assert!(b.is_empty());
}

#[test]
fn sha256_matches_values_taken_from_qemu() {
    // qemu-storage-daemon 10.0.2, 1 MiB + 1536 bytes, 64 KiB, write 512 at
    // 1 MiB + 512.
    let mut b = bm(1024 * K + 1536, 64 * K);
    b.set_range(1024 * K + 512, 512).unwrap();
    assert_eq!(
        b.sha256(),
        "41b8f24b79ae38bb5f3af44cf187d022c20517a6f576791e466d536517b68fb9"
    );
    // 3 words of 64 granules plus 4 KiB, writes in the first and last granule.
    let mut b = bm(64 * K * 64 * 3 + 4 * K, 64 * K);
    b.set_range(0, 64 * K).unwrap();
    b.set_range(64 * K * 64 * 3, 4 * K).unwrap();
    assert_eq!(
        b.sha256(),
        "33679eedd86f9637ab73892a064cdab3d82365cf5063b145affb2272327a6ddc"
    );
}

#[test]
fn merge_refuses_different_sizes_with_qemu_text() {
    let mut dst = bm(64 * K, 512);
    let mut src = bm(128 * K, 512);
    src.set_range(0, 512).unwrap();
    let err = dst.merge(&src).unwrap_err();
    assert_eq!(err.kind, BitmapErrorKind::Incompatible);
    assert_eq!(
        err.message,
        "Bitmaps are of different sizes (destination size is 65536, source size is 131072) \
         and can't be merged"
    );
    assert!(dst.is_empty());
}

#[test]
fn merge_checks_target_then_source() {
    let mut dst = bm(64 * K, 512);
    let mut src = DirtyBitmap::new("s", 64 * K, 512).unwrap();
    src.set_range(0, 1).unwrap();
    src.state.readonly = true;
    dst.merge(&src).unwrap();
    assert_eq!(dst.count(), 512);
    src.state.busy = true;
    assert_eq!(
        dst.merge(&src).unwrap_err().message,
        "Bitmap 's' is currently in use by another operation and cannot be used"
    );
    dst.state.readonly = true;
    assert_eq!(
        dst.merge(&src).unwrap_err().message,
        "Bitmap 'b0' is readonly and cannot be modified"
    );
}

#[test]
fn merge_across_granularities_rounds_outwards() {
    // Coarse into fine: one 64 KiB granule becomes 128 granules of 512 B,
    // as qemu-storage-daemon does.
    let mut coarse = bm(192 * K, 64 * K);
    coarse.set_range(64 * K + 100, 10).unwrap();
    let mut fine = bm(192 * K, 512);
    fine.merge(&coarse).unwrap();
    assert_eq!(fine.count(), 64 * K);
    assert_eq!(fine.next_dirty_area(0, u64::MAX), Some((64 * K, 64 * K)));
    // Fine into coarse: one 512 B granule dirties the 2 GiB granule.
    let mut huge = bm(192 * K, 2 * K * K * K);
    huge.merge(&fine).unwrap();
    assert_eq!(huge.count(), 2 * K * K * K);
    // A dirty 4 KiB granule lies inside the first 8 KiB granule.
    let mut a = bm(16 * K, 4 * K);
    let mut b2 = bm(16 * K, 8 * K);
    a.set_range(4 * K, 1).unwrap();
    b2.merge(&a).unwrap();
    assert_eq!(b2.next_dirty_area(0, u64::MAX), Some((0, 8 * K)));
}

#[test]
fn serialization_is_lsb_first_bytes_in_order() {
    let mut b = bm(100 * 512, 512); // 100 granules: 13 stream bytes
    b.set_range(0, 512).unwrap(); // granule 0
    b.set_range(9 * 512, 512).unwrap(); // granule 9: byte 1 bit 1
    b.set_range(99 * 512, 512).unwrap(); // granule 99: byte 12 bit 3
    let bytes = b.to_bytes();
    assert_eq!(bytes.len(), 13);
    assert_eq!(bytes[0], 0x01);
    assert_eq!(bytes[1], 0x02);
    assert_eq!(bytes[12], 0x08);
    assert_eq!(b.serialize_range(8, 1).unwrap(), [0x02]);
    assert_eq!(b.serialize_range(64, 5).unwrap(), [0, 0, 0, 0, 0x08]);
    assert!(b.serialize_range(4, 1).is_err());
    assert!(b.serialize_range(8, 13).is_err());
    let back = DirtyBitmap::from_bytes("b0", 100 * 512, 512, &bytes).unwrap();
    assert_eq!(back, b);
}

#[test]
fn deserialize_ignores_tail_bits_and_short_data_is_refused() {
    let mut b = bm(10 * 512, 512); // 10 granules, 2 bytes
    b.deserialize_range(0, &[0xff, 0xff]).unwrap();
    assert_eq!(b.dirty_granules(), 10);
    assert_eq!(b.to_bytes(), [0xff, 0x03]);
    let err = DirtyBitmap::from_bytes("b0", 10 * 512, 512, &[0xff]).unwrap_err();
    assert_eq!(err.kind, BitmapErrorKind::Invalid);
    // Padded cluster data is accepted; the padding is ignored.
    let padded = DirtyBitmap::from_bytes("b0", 10 * 512, 512, &[1, 0, 0xff, 0xff]).unwrap();
    assert_eq!(padded.dirty_granules(), 1);
}

#[test]
fn zero_chunks_and_fills() {
    let mut b = bm(1024 * 512, 512); // 1024 granules
    assert!(b.is_range_zero(0, 1024));
    b.deserialize_fill(512, 32, true).unwrap(); // granules 512..768
    assert_eq!(b.dirty_granules(), 256);
    assert!(b.is_range_zero(0, 512));
    assert!(!b.is_range_zero(0, 513));
    assert!(b.is_range_zero(768, 1 << 40));
    b.deserialize_fill(512, 16, false).unwrap();
    assert_eq!(b.dirty_granules(), 128);
}

#[test]
fn huge_disk_costs_one_bit_per_granule() {
    // 1 TiB at 64 KiB: 16M granules, 2 MiB of words.
    let b = bm(1 << 40, 64 * K);
    assert_eq!(b.words().len(), (1 << 24) / 64);
    assert!(DirtyBitmap::new("b0", u64::MAX, 512).is_err());
}

#[test]
fn bits_that_cannot_be_allocated_are_an_error() {
    // 2^54 granules want 2 PiB of words, more than any address space here:
    // the allocation fails and is reported, nothing aborts.
    let err = DirtyBitmap::new("b0", MAX_DISK_SIZE, 512).unwrap_err();
    assert_eq!(err.kind, BitmapErrorKind::NoMemory);
    assert_eq!(
        err.message,
        "Cannot allocate memory for a bitmap of 18014398509481984 bits"
    );
}

#[test]
fn stream_matches_bitmap_data_written_by_qemu() {
    // A 10 MiB qcow2 with a 64 KiB bitmap after qemu-io 10.0.2 wrote 64 KiB
    // at 64 KiB, 512 B at 640 KiB and 4 KiB at 9 MiB: the first 20 bytes
    // of its bitmap data cluster.
    let from_qemu = [
        0x02, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0,
    ];
    let mut b = bm(10 * K * K, 64 * K);
    b.set_range(64 * K, 64 * K).unwrap();
    b.set_range(640 * K, 512).unwrap();
    b.set_range(9 * K * K, 4 * K).unwrap();
    assert_eq!(b.to_bytes(), from_qemu);
    let back = DirtyBitmap::from_bytes("b0", 10 * K * K, 64 * K, &from_qemu).unwrap();
    assert_eq!(back, b);
}

#[test]
fn ranges_across_word_boundaries() {
    // Three words of granules; 60..130 crosses both word edges.
    let mut b = bm(192 * 512, 512);
    b.set_range(60 * 512, 70 * 512).unwrap();
    assert_eq!(b.words(), &[0xf << 60, !0, 0b11]);
    assert_eq!(b.dirty_granules(), 70);
    b.reset_range(62 * 512, 67 * 512).unwrap();
    assert_eq!(b.words(), &[0b11 << 60, 0, 0b10]);
    assert_eq!(b.next_dirty_area(0, u64::MAX), Some((60 * 512, 1024)));
    assert_eq!(
        b.next_dirty_area(62 * 512, u64::MAX),
        Some((129 * 512, 512))
    );
    assert_eq!(b.next_clean(60 * 512, u64::MAX), Some(62 * 512));
    // One whole word; scans that start and stop on word edges.
    b.clear();
    b.set_range(64 * 512, 64 * 512).unwrap();
    assert_eq!(b.words(), &[0, !0, 0]);
    assert_eq!(b.next_dirty_area(0, 64 * 512), None);
    assert_eq!(b.next_dirty_area(0, u64::MAX), Some((64 * 512, 64 * 512)));
    assert_eq!(b.next_clean(64 * 512, 128 * 512), None);
    assert_eq!(b.next_clean(64 * 512, u64::MAX), Some(128 * 512));
}

#[test]
fn merge_across_granularities_keeps_the_partial_last_granule() {
    // 1 MiB + 1 KiB: the last 64 KiB granule of the source is partial.
    let size = 1024 * K + K;
    let mut src = bm(size, 64 * K);
    src.set_range(64 * K, 1).unwrap(); // source granule 1
    src.set_range(1024 * K, 1).unwrap(); // the partial last granule
    let mut coarse = bm(size, 256 * K);
    coarse.merge(&src).unwrap();
    assert_eq!(coarse.words(), &[0b1_0001]);
    let mut fine = bm(size, 4 * K);
    fine.merge(&src).unwrap();
    let dirty: Vec<_> = fine.dirty_extents(0, u64::MAX).collect();
    assert_eq!(dirty, [(64 * K, 64 * K), (1024 * K, K)]);
    assert_eq!(fine.dirty_granules(), 17);
}

#[test]
fn stream_ranges_at_every_byte() {
    // 199 granules: 25 stream bytes over 4 words, the last byte 7 bits.
    let size = 199 * 512;
    let mut b = bm(size, 512);
    for g in (0..199).step_by(3) {
        b.set_range(g * 512, 512).unwrap();
    }
    let all = b.to_bytes();
    assert_eq!(all.len(), 25);
    let mut full = bm(size, 512);
    full.set_range(0, size).unwrap();
    let ones = full.to_bytes();
    for start in 0..25 {
        for end in start..=25 {
            let part = b
                .serialize_range(start as u64 * 8, (end - start) as u64)
                .unwrap();
            assert_eq!(part, &all[start..end]);
            // Only the given bytes change.
            let mut c = full.clone();
            c.deserialize_range(start as u64 * 8, &part).unwrap();
            let mut expect = ones.clone();
            expect[start..end].copy_from_slice(&part);
            assert_eq!(c.to_bytes(), expect, "bytes {start}..{end}");
        }
    }
    // A stray bit past the last granule does not reach the words.
    let mut c = bm(size, 512);
    c.deserialize_range(192, &[0xff]).unwrap();
    assert_eq!(c.words()[3], 0x7f);
    assert_eq!(c.dirty_granules(), 7);
}

#[test]
fn clones_are_equal_and_independent() {
    // 100 granules: the second word is partial.
    let mut a = bm(100 * 512, 512);
    a.set_range(60 * 512, 40 * 512).unwrap();
    let mut b = a.clone();
    assert_eq!(b, a);
    assert_eq!(b.words(), a.words());
    assert_eq!(b.granules(), 100);
    b.reset_range(99 * 512, 512).unwrap();
    assert_ne!(b, a);
    assert_eq!((a.dirty_granules(), b.dirty_granules()), (40, 39));
    let mut renamed = a.clone();
    renamed.set_name("b1").unwrap();
    assert_ne!(renamed, a);
}
