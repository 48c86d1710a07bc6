//! The bitmap's SHA-256 as QEMU's `x-debug-block-dirty-bitmap-sha256`.
//!
//! QEMU hashes the bottom level of its hbitmap: an array of `unsigned long`
//! (64-bit, little-endian on x86_64), one bit per granule, granule 0 at the
//! least significant bit of word 0, with at least one word even for an
//! empty disk, and zero bits past the last granule. Our words have exactly
//! that layout, so the hash is over their little-endian bytes. Verified
//! against qemu-storage-daemon 10.0.2 by tests/bitmap_sha256.rs.

use openssl::sha::Sha256;

use super::dirty::DirtyBitmap;

/// Words hashed per update call, to avoid copying the whole bitmap.
const CHUNK_WORDS: usize = 4096;

impl DirtyBitmap {
    /// Lower-case hex SHA-256 of the bits, equal to QEMU's for the same
    /// size, granularity and dirty granules.
    pub fn sha256(&self) -> String {
        let mut hasher = Sha256::new();
        let words = self.words();
        if words.is_empty() {
            hasher.update(&0u64.to_le_bytes());
        }
        let mut buf = Vec::with_capacity(CHUNK_WORDS * 8);
        for chunk in words.chunks(CHUNK_WORDS) {
            buf.clear();
            for w in chunk {
                buf.extend_from_slice(&w.to_le_bytes());
            }
            hasher.update(&buf);
        }
        hasher.finish().iter().map(|b| format!("{b:02x}")).collect()
    }
}
