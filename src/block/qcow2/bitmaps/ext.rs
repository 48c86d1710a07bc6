//! The bitmaps header extension: where the directory is and how many
//! entries it has (24 bytes, big-endian).

use super::{MAX_BITMAPS, MAX_DIRECTORY_SIZE};
use crate::block::{BlockError, BlockResult};

/// Autoclear bit 0: the bitmaps extension is consistent with the image.
pub use crate::block::qcow2::header::AUTOCLEAR_BITMAPS;
pub const EXT_LEN: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Parses and checks the extension payload, with qemu's texts.
    pub fn parse(data: &[u8], cluster_size: u64) -> BlockResult<BitmapsExt> {
        let bad = |m: String| BlockError::corrupt(m);
        if data.len() != EXT_LEN {
            return Err(bad(format!(
                "bitmaps_ext: Invalid extension length ({} bytes, expected {EXT_LEN})",
                data.len()
            )));
        }
        let be32 =
            |at: usize| u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
        let ext = BitmapsExt {
            nb_bitmaps: be32(0),
            directory_size: be64(8),
            directory_offset: be64(16),
        };
        if be32(4) != 0 {
            return Err(bad("bitmaps_ext: Reserved field is not zero".into()));
        }
        if ext.nb_bitmaps == 0 {
            return Err(bad("found bitmaps extension with zero bitmaps".into()));
        }
        if ext.nb_bitmaps > MAX_BITMAPS {
            return Err(bad(format!(
                "bitmaps_ext: File has {} bitmaps, exceeding the QEMU supported maximum of {}",
                ext.nb_bitmaps, MAX_BITMAPS
            )));
        }
        if ext.directory_size > MAX_DIRECTORY_SIZE {
            return Err(bad(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({})",
                ext.directory_size, MAX_DIRECTORY_SIZE
            )));
        }
        if ext.directory_offset == 0 || !ext.directory_offset.is_multiple_of(cluster_size) {
            return Err(bad("bitmaps_ext: invalid bitmap directory offset".into()));
        }
        Ok(ext)
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(EXT_LEN);
        b.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.directory_size.to_be_bytes());
        b.extend_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_roundtrip_and_qemu_texts() {
        let e = BitmapsExt {
            nb_bitmaps: 2,
            directory_size: 64,
            directory_offset: 0xd0000,
        };
        let b = e.serialize();
        assert_eq!(BitmapsExt::parse(&b, 65536).expect("parse"), e);
        let mut z = b.clone();
        z[3] = 0;
        assert_eq!(
            BitmapsExt::parse(&z, 65536).expect_err("zero").context,
            "found bitmaps extension with zero bitmaps"
        );
        let mut r = b.clone();
        r[7] = 1;
        assert_eq!(
            BitmapsExt::parse(&r, 65536).expect_err("reserved").context,
            "bitmaps_ext: Reserved field is not zero"
        );
        let mut o = b;
        o[23] = 8;
        assert_eq!(
            BitmapsExt::parse(&o, 65536).expect_err("offset").context,
            "bitmaps_ext: invalid bitmap directory offset"
        );
    }
}
