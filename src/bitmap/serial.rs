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
        let first = self.stream_range(granule_start, n_bytes)?;
        let mut out = Vec::with_capacity(n_bytes as usize);
        let words = self.words();
        let (mut b, end) = (first, first + n_bytes);
        while b < end {
            let within = (b % 8) as usize;
            let take = (8 - within).min((end - b) as usize);
            let bytes = words[(b / 8) as usize].to_le_bytes();
            out.extend_from_slice(&bytes[within..within + take]);
            b += take as u64;
        }
        Ok(out)
    }

    /// Overwrites the granules from `granule_start` with the stream bytes in
    /// `data`. Bits past the last granule are ignored (the format says they
    /// are zero; a stray one must not become a phantom dirty granule).
    pub fn deserialize_range(&mut self, granule_start: u64, data: &[u8]) -> BitmapResult<()> {
        let first = self.stream_range(granule_start, data.len() as u64)?;
        let words = self.words_mut();
        let mut b = first;
        let mut rest = data;
        while !rest.is_empty() {
            let within = (b % 8) as usize;
            let take = (8 - within).min(rest.len());
            let word = &mut words[(b / 8) as usize];
            let mut bytes = word.to_le_bytes();
            bytes[within..within + take].copy_from_slice(&rest[..take]);
            *word = u64::from_le_bytes(bytes);
            rest = &rest[take..];
            b += take as u64;
        }
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
            self.bits_mut()[granule_start as usize..stop as usize].fill(dirty);
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
