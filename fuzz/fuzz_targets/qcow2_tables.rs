//! L1, L2 (standard, compressed, extended) and bitmap table entries, as
//! the mapping code decodes them. The first byte picks the geometry
//! (cluster size, version, extended L2), the rest is a table of
//! big-endian 64-bit entries; with extended L2 every second word is the
//! subcluster bitmap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::block::qcow2::bitmaps::table;
use tidemark::block::qcow2::tables::{get_be64, l1_l2_offset, Geometry, Mapping};

fuzz_target!(|data: &[u8]| {
    let Some((&g, rest)) = data.split_first() else {
        return;
    };
    let extended_l2 = g & 0x80 != 0;
    let geo = Geometry {
        // 512 B .. 2 MiB; extended L2 needs 16 KiB or more.
        cluster_bits: if extended_l2 {
            14 + u32::from(g & 7)
        } else {
            9 + u32::from(g & 15) % 13
        },
        version: if g & 0x40 != 0 { 3 } else { 2 },
        extended_l2,
    };
    let cs = geo.cluster_size();
    let n = rest.len() / 8;
    let file_len = u64::from(g) << 20;
    for i in 0..n {
        let e = get_be64(rest, i);
        let _ = l1_l2_offset(e, cs, i);
        let _ = table::decode(e, cs, file_len, "b0");
        if extended_l2 {
            if i % 2 == 1 {
                continue;
            }
            let bitmap = if i + 1 < n { get_be64(rest, i + 1) } else { 0 };
            let mut sc = 0;
            while sc < 32 {
                let Ok((m, run)) = geo.decode_extended(e, bitmap, sc) else {
                    break;
                };
                assert!(run >= 1 && sc + run <= 32, "subcluster run out of range");
                check(m, cs);
                sc += run;
            }
        } else if let Ok(m) = geo.decode(e) {
            check(m, cs);
        }
    }
});

/// What a decoded mapping promises the read path.
fn check(m: Mapping, cs: u64) {
    match m {
        Mapping::Data { host, .. } => assert!(host != 0 && host % cs == 0),
        Mapping::Compressed { len, .. } => assert!(len > 0),
        Mapping::Zero { host } => assert!(host % cs == 0),
        Mapping::Unallocated => {}
    }
}
