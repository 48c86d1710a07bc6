//! L1 and L2 table entries: what one 64-bit (or, with extended L2, 128-bit)
//! entry says about a guest cluster.

use crate::block::{BlockError, BlockResult};

/// Bit 63 of L1/L2 entries: refcount is exactly one, writes may go in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (v3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Bits 9..55: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (1..8 and 56..62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1..8 and 56..61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// The host offset of the L2 table an L1 entry points to (0 = none).
pub fn l1_l2_offset(entry: u64, cluster_size: u64, index: usize) -> BlockResult<u64> {
    let off = entry & OFFSET_MASK;
    if entry & L1_RESERVED != 0 || off & (cluster_size - 1) != 0 {
        return Err(BlockError::corrupt(format!(
            "L1 entry {} (0x{:016x}) is invalid: unaligned L2 table offset or reserved bits set",
            index, entry
        )));
    }
    Ok(off)
}

/// What a guest cluster (or subcluster run) maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this layer: read from the backing image, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster (0 = none).
    Zero { host: u64 },
    /// Data at `host` (the offset of this guest cluster's start).
    Data { host: u64, copied: bool },
    /// Compressed data starting at `host`, `len` bytes long at most.
    Compressed { host: u64, len: u64 },
}

/// Geometry the entry decoding needs.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub version: u32,
    pub extended_l2: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Decodes a standard or compressed L2 entry (without subclusters).
    pub fn decode(&self, entry: u64) -> BlockResult<Mapping> {
        let cs = self.cluster_size();
        if entry & COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (host & 511);
            return Ok(Mapping::Compressed { host, len });
        }
        let host = entry & OFFSET_MASK;
        let bad = entry & L2_RESERVED != 0
            || host & (cs - 1) != 0
            || (entry & ZERO != 0 && (self.version < 3 || self.extended_l2));
        if bad {
            return Err(BlockError::corrupt(format!(
                "L2 entry 0x{:016x} is invalid: unaligned cluster offset or reserved bits set",
                entry
            )));
        }
        if entry & ZERO != 0 {
            return Ok(Mapping::Zero { host });
        }
        if host == 0 {
            if entry & COPIED != 0 {
                return Err(BlockError::corrupt(format!(
                    "L2 entry 0x{:016x} maps to host offset 0 (the header)",
                    entry
                )));
            }
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data {
            host,
            copied: entry & COPIED != 0,
        })
    }

    /// The mapping of subcluster `sc` of an extended entry and how many
    /// subclusters from `sc` share it.
    pub fn decode_extended(&self, entry: u64, bitmap: u64, sc: u32) -> BlockResult<(Mapping, u32)> {
        let base = self.decode(entry)?;
        if let Mapping::Compressed { .. } = base {
            return Ok((base, 32 - sc));
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(BlockError::corrupt(format!(
                "extended L2 bitmap 0x{:016x} marks subclusters both allocated and zero",
                bitmap
            )));
        }
        let host = match base {
            Mapping::Data { host, .. } => host,
            _ => 0,
        };
        let state = |i: u32| -> u8 {
            if alloc & (1 << i) != 0 {
                1
            } else if zero & (1 << i) != 0 {
                2
            } else {
                0
            }
        };
        let s = state(sc);
        let mut n = 1;
        while sc + n < 32 && state(sc + n) == s {
            n += 1;
        }
        let m = match s {
            1 if host == 0 => {
                return Err(BlockError::corrupt(
                    "extended L2 entry has allocated subclusters but no host offset",
                ))
            }
            1 => base,
            2 => Mapping::Zero { host: 0 },
            _ => Mapping::Unallocated,
        };
        Ok((m, n))
    }
}

pub fn get_be64(b: &[u8], index: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[index * 8..index * 8 + 8]);
    u64::from_be_bytes(a)
}

pub fn put_be64(b: &mut [u8], index: usize, v: u64) {
    b[index * 8..index * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        version: 3,
        extended_l2: false,
    };

    #[test]
    fn standard_entries_decode() {
        assert_eq!(G.decode(0).expect("ok"), Mapping::Unallocated);
        assert_eq!(G.decode(1).expect("ok"), Mapping::Zero { host: 0 });
        assert_eq!(
            G.decode(COPIED | 0x50000).expect("ok"),
            Mapping::Data {
                host: 0x50000,
                copied: true
            }
        );
        assert!(G.decode(0x50200).is_err(), "unaligned");
    }

    #[test]
    fn compressed_entry_decodes_offset_and_length() {
        // 64 KiB clusters: x = 54; two extra sectors.
        let e = COMPRESSED | (2u64 << 54) | 0x12345;
        assert_eq!(
            G.decode(e).expect("ok"),
            Mapping::Compressed {
                host: 0x12345,
                len: 3 * 512 - 0x145
            }
        );
    }

    #[test]
    fn extended_bitmap_runs() {
        let g = Geometry {
            extended_l2: true,
            ..G
        };
        let bitmap = 0b0011u64 | (0b1100u64 << 32);
        let (m, n) = g.decode_extended(0x70000 | COPIED, bitmap, 0).expect("ok");
        assert_eq!(n, 2);
        assert!(matches!(m, Mapping::Data { host: 0x70000, .. }));
        let (m, n) = g.decode_extended(0x70000 | COPIED, bitmap, 2).expect("ok");
        assert_eq!((m, n), (Mapping::Zero { host: 0 }, 2));
        let (m, n) = g.decode_extended(0x70000 | COPIED, bitmap, 4).expect("ok");
        assert_eq!((m, n), (Mapping::Unallocated, 28));
    }
}
