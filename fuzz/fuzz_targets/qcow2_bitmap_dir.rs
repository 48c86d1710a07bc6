//! The bitmap directory: entries with names and extra data, checked
//! against qemu's constraints, then written back. Input: 2 bytes of
//! entry count, 1 byte of cluster bits, then the directory itself.
//!
//! Oracle besides "no panic": what parses, serialises and parses back to
//! the same entries.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::block::qcow2::bitmaps::dir::{parse_directory, serialize_directory};
use tidemark::block::qcow2::bitmaps::load::data_geometry;
use tidemark::block::qcow2::bitmaps::store::check_size;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let nb = u32::from(u16::from_be_bytes([data[0], data[1]]));
    let cluster_bits = 9 + u32::from(data[2]) % 13;
    let cs = 1u64 << cluster_bits;
    let dir = &data[3..];
    let Ok(entries) = parse_directory(dir, nb) else {
        return;
    };
    assert_eq!(entries.len(), nb as usize);
    for e in &entries {
        let _ = e.in_use();
        let _ = e.auto();
        let _ = e.unusable_extra_data();
        if e.check(cs).is_ok() {
            let _ = e.granularity();
            // The disk size the table could describe, as the loader sizes it.
            let size = u64::from(e.table_size)
                .saturating_mul(cs * 8)
                .saturating_mul(e.granularity())
                / 2;
            let _ = data_geometry(size, e.granularity_bits, cs);
            let _ = check_size(size, e.granularity(), cs);
        }
    }
    let bytes = serialize_directory(&entries);
    assert_eq!(
        bytes.len(),
        entries.iter().map(|e| e.disk_len()).sum::<usize>()
    );
    let back = parse_directory(&bytes, nb).expect("a written directory parses");
    assert_eq!(back, entries);
});
