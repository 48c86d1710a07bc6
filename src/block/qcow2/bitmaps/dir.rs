//! Bitmap directory entries: a 24-byte fixed part, extra data, the name
//! (no terminator), padded to 8 bytes. The directory is the entries back
//! to back, exactly `directory_size` bytes.

use super::{
    FLAG_AUTO, FLAG_EXTRA_DATA_COMPATIBLE, FLAG_IN_USE, KNOWN_FLAGS, MAX_GRANULARITY_BITS,
    MAX_NAME_SIZE, MAX_PHYS_SIZE, MAX_TABLE_SIZE, MIN_GRANULARITY_BITS, TYPE_DIRTY_TRACKING,
};
use crate::bitmap::name::from_c_bytes;
use crate::block::{BlockError, BlockResult};

const FIXED_LEN: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    /// The name as qemu reads and shows it (`bitmap::name`): what QMP and
    /// the node's bitmaps know it by.
    pub name: String,
    /// The name's bytes on disk, written back as they were read (they
    /// need not be UTF-8); for a new entry, qemu's bytes for `name`.
    pub name_bytes: Vec<u8>,
    /// Kept verbatim: qemu knows no extra data, and must leave it as is.
    pub extra_data: Vec<u8>,
}

fn broken() -> BlockError {
    BlockError::corrupt("Broken bitmap directory")
}

impl DirEntry {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Unknown extra data without the compatible flag: the bitmap must not
    /// be used, only kept (or removed).
    pub fn unusable_extra_data(&self) -> bool {
        !self.extra_data.is_empty() && self.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0
    }

    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// Bytes this entry takes in the directory.
    pub fn disk_len(&self) -> usize {
        (FIXED_LEN + self.extra_data.len() + self.name_bytes.len()).div_ceil(8) * 8
    }

    /// Checks the entry's fields as qemu does on open ("doesn't satisfy the
    /// constraints"), naming the broken field after qemu's text.
    pub fn check(&self, cluster_size: u64) -> BlockResult<()> {
        let why = if self.kind != TYPE_DIRTY_TRACKING {
            format!("type {} is not a dirty tracking bitmap", self.kind)
        } else if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            format!(
                "granularity bits {} outside {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}",
                self.granularity_bits
            )
        } else if self.flags & !KNOWN_FLAGS != 0 {
            format!("reserved flags {:#x} are set", self.flags & !KNOWN_FLAGS)
        } else if self.table_size == 0 || u64::from(self.table_size) > MAX_TABLE_SIZE {
            format!("bitmap table size {} is invalid", self.table_size)
        } else if u64::from(self.table_size) * cluster_size > MAX_PHYS_SIZE {
            format!("bitmap data of {} clusters is too large", self.table_size)
        } else if self.table_offset == 0 || !self.table_offset.is_multiple_of(cluster_size) {
            format!(
                "bitmap table offset {:#x} is not cluster aligned",
                self.table_offset
            )
        } else {
            return Ok(());
        };
        Err(BlockError::corrupt(format!(
            "Bitmap '{}' doesn't satisfy the constraints: {why}",
            self.name
        )))
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.kind);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name_bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra_data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(&self.name_bytes);
        out.resize(start + self.disk_len(), 0);
    }
}

/// Parses `nb` entries that must fill `buf` exactly (qemu's texts for a
/// directory that is too short, too long or inconsistent).
pub fn parse_directory(buf: &[u8], nb: u32) -> BlockResult<Vec<DirEntry>> {
    let mut out = Vec::with_capacity(nb.min(4096) as usize);
    let mut at = 0usize;
    for _ in 0..nb {
        let rest = &buf[at..];
        if rest.len() < FIXED_LEN {
            return Err(BlockError::corrupt(
                "Less bitmaps found than specified in header extension",
            ));
        }
        let be32 = |i: usize| u32::from_be_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let name_size = usize::from(u16::from_be_bytes([rest[18], rest[19]]));
        let extra_size = be32(20) as usize;
        if name_size == 0 || name_size > MAX_NAME_SIZE || extra_size > rest.len() {
            return Err(broken());
        }
        let len = (FIXED_LEN + extra_size + name_size).div_ceil(8) * 8;
        if len > rest.len() {
            return Err(broken());
        }
        let extra = &rest[FIXED_LEN..FIXED_LEN + extra_size];
        let name = &rest[FIXED_LEN + extra_size..FIXED_LEN + extra_size + name_size];
        // qemu reads the name as a C string: up to a NUL, if any.
        let name_bytes = name.split(|&b| b == 0).next().unwrap_or_default().to_vec();
        // A name that is empty as a C string could not be written back.
        if name_bytes.is_empty() {
            return Err(broken());
        }
        out.push(DirEntry {
            table_offset: (u64::from(be32(0)) << 32) | u64::from(be32(4)),
            table_size: be32(8),
            flags: be32(12),
            kind: rest[16],
            granularity_bits: rest[17],
            name: from_c_bytes(&name_bytes),
            name_bytes,
            extra_data: extra.to_vec(),
        });
        at += len;
    }
    if at != buf.len() {
        return Err(broken());
    }
    Ok(out)
}

pub fn serialize_directory<'a>(entries: impl IntoIterator<Item = &'a DirEntry>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.write_to(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            table_offset: 0x90000,
            table_size: 1,
            flags: FLAG_AUTO,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            name: name.into(),
            name_bytes: crate::bitmap::name::c_bytes(name),
            extra_data: Vec::new(),
        }
    }

    #[test]
    fn directory_roundtrip_pads_to_eight() {
        let mut b = entry("b1");
        b.extra_data = vec![1, 2, 3];
        b.flags |= FLAG_EXTRA_DATA_COMPATIBLE;
        let entries = vec![entry("b0"), b];
        let bytes = serialize_directory(&entries);
        assert_eq!(bytes.len(), 32 + 32);
        assert_eq!(parse_directory(&bytes, 2).expect("parse"), entries);
        assert_eq!(
            parse_directory(&bytes, 3).expect_err("short").context,
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(
            parse_directory(&bytes, 1).expect_err("long").context,
            "Broken bitmap directory"
        );
        // A name that starts with a NUL is empty to qemu: not writable back
        // (found by fuzz/qcow2_bitmap_dir).
        let mut nul = serialize_directory(&entries[..1]);
        nul[FIXED_LEN] = 0;
        assert_eq!(
            parse_directory(&nul, 1).expect_err("empty").context,
            "Broken bitmap directory"
        );
    }

    #[test]
    fn constraints_use_qemu_text() {
        let mut e = entry("b0");
        assert!(e.check(65536).is_ok());
        e.granularity_bits = 8;
        let err = e.check(65536).expect_err("granularity");
        assert!(err
            .context
            .starts_with("Bitmap 'b0' doesn't satisfy the constraints"));
    }
}
