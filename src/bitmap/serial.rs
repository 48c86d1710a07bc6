//! The bitmap as the byte stream the qcow2 bitmaps extension stores
//! (qemu's docs/interop/qcow2.txt, "Bitmap data"): bit `i` of the stream is
//! granule `i`, bytes in order, bit 0 the least significant bit of byte 0.
//! The stream is `ceil(granules / 8)` bytes; its unused tail bits are zero.
//!
//! A stream position is given as the first granule, which must start a byte
//! (a multiple of 8), and a length in bytes; a qcow2 cluster of `c` bytes
//! holds granules `[k * 8c, (k + 1) * 8c)`. Ranges past the stream are
//! refused, except `is_range_zero`, which treats missing bits as zero.
//!
//! The stream is exactly the little-endian bytes of the bitmap's raw words
//! (`Lsb0` over `u64`), so it is copied a word at a time from the raw
//! slice: bitvec's `load_le::<u8>` per 8-bit chunk measured 16-80x slower
//! (benches/bitmap_ops.rs; figures in benches/README.md).

use super::dirty::DirtyBitmap;
use super::error::{BitmapError, BitmapResult};

impl DirtyBitmap {
    /// Length of the whole stream in bytes.
    pub fn serialized_len(&self) -> u64 {
        self.granules().div_ceil(8)
    }

    /// Checks a stream range, returning its first byte index.
    fn stream_range(&self, granule_start: u64, n_bytes: u64) -> BitmapResult<u64> {
        if !granule_start.is_multiple_of(8) {
            return Err(BitmapError::invalid(format!(
                "Bitmap stream position {granule_start} is not a multiple of 8 granules"
            )));
        }
        let first = granule_start / 8;
        match first.checked_add(n_bytes) {
            Some(end) if end <= self.serialized_len() => Ok(first),
            _ => Err(BitmapError::invalid(format!(
                "Bitmap stream range (granule {granule_start}, {n_bytes} bytes) exceeds \
                 the {} bytes of bitmap '{}'",
                self.serialized_len(),
                self.name()
            ))),
        }
    }

    /// `n_bytes` bytes of the stream, starting at granule `granule_start`.
    pub fn serialize_range(&self, granule_start: u64, n_bytes: u64) -> BitmapResult<Vec<u8>> {
        let first = self.stream_range(granule_start, n_bytes)? as usize;
        let end = first + n_bytes as usize;
        // Whole words, then cut to the asked bytes (a qcow2 cluster starts
        // on a word, so the cut at the front is empty there).
        let words = &self.words()[first / 8..end.div_ceil(8)];
        let mut out = Vec::with_capacity(words.len() * 8);
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(end - first / 8 * 8);
        out.drain(..first % 8);
        Ok(out)
    }

    /// Overwrites the granules from `granule_start` with the stream bytes in
    /// `data`. Bits past the last granule are ignored (the format says they
    /// are zero; a stray one must not become a phantom dirty granule).
    pub fn deserialize_range(&mut self, granule_start: u64, data: &[u8]) -> BitmapResult<()> {
        let first = self.stream_range(granule_start, data.len() as u64)? as usize;
        let words = self.words_mut();
        // A part word up to a word boundary, whole words, a part word.
        let head = ((8 - first % 8) % 8).min(data.len());
        patch_word(words, first, &data[..head]);
        let mut whole = data[head..].chunks_exact(8);
        let w0 = (first + head) / 8;
        for (w, chunk) in words[w0..].iter_mut().zip(&mut whole) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *w = u64::from_le_bytes(bytes);
        }
        let tail = whole.remainder();
        patch_word(words, first + data.len() - tail.len(), tail);
        self.clear_tail();
        Ok(())
    }

    /// Sets (`dirty`) or clears every granule of `n_bytes` stream bytes from
    /// `granule_start`: a qcow2 bitmap table entry of 0 (all zeros) or 1
    /// (all ones) instead of a data cluster.
    pub fn deserialize_fill(
        &mut self,
        granule_start: u64,
        n_bytes: u64,
        dirty: bool,
    ) -> BitmapResult<()> {
        self.stream_range(granule_start, n_bytes)?;
        let stop = (granule_start + n_bytes * 8).min(self.granules());
        if granule_start < stop {
            self.fill(granule_start as usize, stop as usize, dirty);
        }
        Ok(())
    }

    /// Whether granules `[granule_start, granule_start + n_granules)` are
    /// all clean; granules past the end count as clean. Used to store an
    /// all-zero qcow2 cluster as a 0 table entry.
    pub fn is_range_zero(&self, granule_start: u64, n_granules: u64) -> bool {
        let stop = granule_start
            .saturating_add(n_granules)
            .min(self.granules());
        self.next_set(granule_start, stop).is_none()
    }

    /// The whole stream.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.serialized_len();
        let mut out = Vec::with_capacity(len as usize);
        for w in self.words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(len as usize);
        out
    }

    /// A bitmap whose bits come from a whole stream. `data` may be longer
    /// than the stream (cluster padding); the extra bytes are ignored.
    pub fn from_bytes(name: &str, size: u64, granularity: u64, data: &[u8]) -> BitmapResult<Self> {
        let mut bitmap = DirtyBitmap::new(name, size, granularity)?;
        let len = bitmap.serialized_len();
        if (data.len() as u64) < len {
            return Err(BitmapError::invalid(format!(
                "Bitmap '{name}' data is {} bytes, but {len} are needed",
                data.len()
            )));
        }
        bitmap.deserialize_range(0, &data[..len as usize])?;
        Ok(bitmap)
    }
}

/// Overwrites stream bytes `[byte, byte + bytes.len())`, all within one word.
fn patch_word(words: &mut [u64], byte: usize, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let within = byte % 8;
    if let Some(word) = words.get_mut(byte / 8) {
        let mut le = word.to_le_bytes();
        le[within..within + bytes.len()].copy_from_slice(bytes);
        *word = u64::from_le_bytes(le);
    }
}
