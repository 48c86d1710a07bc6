//! Bitmap table entries: one per cluster of bitmap data. Bits 9-55 hold
//! the data cluster's offset; with offset 0, bit 0 says whether the
//! cluster reads as all zeros (0) or all ones (1). Every other bit is
//! reserved and must be zero.

use crate::block::{BlockError, BlockResult};

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const ALL_ONES: u64 = 1;
const RESERVED: u64 = !(OFFSET_MASK | ALL_ONES);

/// What one cluster of bitmap data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    Zeros,
    Ones,
    Data(u64),
}

/// Decodes `entry` of bitmap `name`'s table; a data cluster must be
/// aligned and lie inside the file (`file_len`).
pub fn decode(entry: u64, cluster_size: u64, file_len: u64, name: &str) -> BlockResult<Cluster> {
    let off = entry & OFFSET_MASK;
    let bad = |why: String| {
        BlockError::corrupt(format!(
            "Could not read bitmap_table table from image for bitmap '{name}': \
             Invalid argument ({why})"
        ))
    };
    if entry & RESERVED != 0 {
        return Err(bad(format!("entry {entry:#x} has reserved bits set")));
    }
    if off == 0 {
        return Ok(if entry & ALL_ONES != 0 {
            Cluster::Ones
        } else {
            Cluster::Zeros
        });
    }
    if entry & ALL_ONES != 0 || !off.is_multiple_of(cluster_size) {
        return Err(bad(format!(
            "data cluster offset {off:#x} is not cluster aligned"
        )));
    }
    if off.saturating_add(cluster_size) > file_len.div_ceil(cluster_size) * cluster_size {
        return Err(bad(format!(
            "data cluster {off:#x} lies past the end of the file"
        )));
    }
    Ok(Cluster::Data(off))
}

/// The data cluster an entry points to, 0 for none (entries were checked
/// when loaded).
pub fn data_offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}

pub fn encode(c: Cluster) -> u64 {
    match c {
        Cluster::Zeros => 0,
        Cluster::Ones => ALL_ONES,
        Cluster::Data(off) => off,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_as_the_spec_says() {
        let cs = 65536;
        assert!(matches!(decode(0, cs, 1 << 20, "b"), Ok(Cluster::Zeros)));
        assert!(matches!(decode(1, cs, 1 << 20, "b"), Ok(Cluster::Ones)));
        assert!(matches!(
            decode(0x10000, cs, 1 << 20, "b"),
            Ok(Cluster::Data(0x10000))
        ));
        assert!(decode(0x10001, cs, 1 << 20, "b").is_err());
        assert!(decode(0x10200, cs, 1 << 20, "b").is_err());
        assert!(decode(0x10002, cs, 1 << 20, "b").is_err());
        assert!(decode(1 << 40, cs, 1 << 20, "b").is_err());
        assert!(decode(1 << 60, cs, 1 << 20, "b").is_err());
    }
}
