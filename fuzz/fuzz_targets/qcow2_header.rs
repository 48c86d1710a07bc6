//! The qcow2 header and its extensions: the header fields, the extension
//! list, the backing name, the bitmaps extension and tidemark's intent
//! log extension, as an open reads them from the first cluster.
//!
//! Oracle besides "no panic": a header that parses and serialises must
//! parse back to itself (tidemark rewrites headers it read).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::block::qcow2::bitmaps::ext::BitmapsExt;
use tidemark::block::qcow2::bitmaps::recover::current_log;
use tidemark::block::qcow2::header::{Header, EXT_BITMAPS};
use tidemark::block::qcow2::intent::{zone_ranges, Payload};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let _ = h.backing_format();
    for table in 0..3 {
        for bit in [0, 1, 4, 63] {
            let _ = h.feature_name(table, bit);
        }
    }
    if let Some(ext) = h.extension(EXT_BITMAPS) {
        if let Ok(b) = BitmapsExt::parse(ext, h.cluster_size()) {
            assert_eq!(
                BitmapsExt::parse(&b.serialize(), h.cluster_size()).ok(),
                Some(b)
            );
        }
    }
    if let Some(log) = current_log(&h) {
        let _ = zone_ranges(log.shift, &log.map, h.size);
        assert_eq!(Payload::decode(&log.encode(), h.size), Some(log));
    }
    if let Ok(bytes) = h.serialize() {
        let mut back = Header::parse(&bytes).expect("a serialised header parses");
        // Where the backing name sits is the writer's choice.
        back.backing_file_offset = h.backing_file_offset;
        back.backing_file_size = h.backing_file_size;
        assert_eq!(back, h);
    }
});
