//! Compressed clusters: raw deflate (no zlib header, as qemu writes it)
//! or a zstd frame. The stored data is rounded up to whole sectors, so
//! trailing bytes after the stream are ignored.

use std::io::{Read, Write};

use crate::block::{BlockError, BlockResult};

pub const TYPE_ZLIB: u8 = 0;
pub const TYPE_ZSTD: u8 = 1;

/// Compresses one cluster as qemu stores it.
pub fn compress(kind: u8, data: &[u8]) -> BlockResult<Vec<u8>> {
    let failed = |e: std::io::Error| BlockError::io("Could not compress a cluster", e);
    match kind {
        TYPE_ZLIB => {
            let mut enc =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(data).map_err(failed)?;
            enc.finish().map_err(failed)
        }
        TYPE_ZSTD => zstd::bulk::compress(data, 0).map_err(failed),
        other => Err(BlockError::not_supported(format!(
            "unknown qcow2 compression type {}",
            other
        ))),
    }
}

/// Decompresses `input` into exactly `out.len()` bytes.
pub fn decompress(kind: u8, input: &[u8], out: &mut [u8]) -> BlockResult<()> {
    let bad = |why: String| BlockError::corrupt(format!("compressed cluster is corrupt: {}", why));
    match kind {
        TYPE_ZLIB => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                Ok(_) => Err(bad(format!(
                    "inflated to {} bytes instead of {}",
                    d.total_out(),
                    out.len()
                ))),
                Err(e) => Err(bad(e.to_string())),
            }
        }
        TYPE_ZSTD => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| bad(e.to_string()))?
                .single_frame();
            dec.read_exact(out).map_err(|e| bad(e.to_string()))
        }
        other => Err(BlockError::not_supported(format!(
            "unknown qcow2 compression type {}",
            other
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_garbage_inflates() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).expect("compress");
        let mut packed = enc.finish().expect("finish");
        packed.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 4096];
        decompress(TYPE_ZLIB, &packed, &mut out).expect("inflate");
        assert_eq!(out, data);
    }

    #[test]
    fn garbage_is_a_corrupt_error() {
        let mut out = vec![0u8; 512];
        let e = decompress(TYPE_ZLIB, &[0xff; 64], &mut out).expect_err("must fail");
        assert_eq!(e.kind, crate::block::ErrorKind::Corrupt);
        assert!(decompress(TYPE_ZSTD, &[0xff; 64], &mut out).is_err());
    }
}
