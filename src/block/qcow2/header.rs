//! The qcow2 header and its extensions, parsed from and serialised to the
//! first cluster with explicit big-endian fields (docs/interop/qcow2.txt).
//! Extensions tidemark does not interpret are kept as raw bytes and written
//! back unchanged.

use crate::block::{BlockError, BlockResult};

/// qemu's text for an image without the qcow2 magic; it names no file, as
/// qemu's QMP replies give it.
pub const NOT_QCOW2: &str = "Image is not in qcow2 format";

pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// tidemark's checkpoint records ("tdmk"): an extension qemu does not know
/// and keeps as it is when it rewrites the header.
pub const EXT_TIDEMARK_CHECKPOINTS: u32 = 0x7464_6d6b;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bits whose data tidemark keeps consistent when it writes:
/// bit 0, the bitmaps extension (bitmaps/ keeps it).
pub const KNOWN_AUTOCLEAR: u64 = AUTOCLEAR_BITMAPS;

/// Longest backing file name qemu accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// One header extension as stored (type and payload, without padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// 0 = zlib, 1 = zstd (header byte 104, v3 only).
    pub compression_type: u8,
    /// Bytes of the header past the fields we know (kept verbatim).
    pub extra_fields: Vec<u8>,
    /// Every extension in file order, known ones included.
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
}

/// The unit qemu measures a disk's size in.
const SECTOR: u64 = 512;

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn corrupt(msg: impl Into<String>) -> BlockError {
    BlockError::corrupt(msg.into())
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Replaces (or with `None` removes) one of tidemark's own extensions;
    /// a new one goes last, after qemu's, so adding it moves none of them
    /// (a header write torn between sectors then still finds qemu's
    /// extensions where they were).
    pub fn set_own_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        let last = self.extensions.len();
        self.put_extension(kind, data, last);
    }

    /// Where extension `kind`'s payload starts in the serialised header.
    pub fn extension_offset(&self, kind: u32) -> Option<u64> {
        let mut at = if self.version >= 3 {
            u64::from(V3_HEADER_LEN) + self.extra_fields.len() as u64
        } else {
            u64::from(V2_HEADER_LEN)
        };
        for e in &self.extensions {
            if e.kind == kind {
                return Some(at + 8);
            }
            at += 8 + (e.data.len() as u64).div_ceil(8) * 8;
        }
        None
    }

    /// Replaces (or with `None` removes) an extension, keeping the order of
    /// the others.
    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        self.put_extension(kind, data, 0);
    }

    /// Replaces or removes extension `kind`; a new one goes at index `at`.
    fn put_extension(&mut self, kind: u32, data: Option<Vec<u8>>, at: usize) {
        match (self.extensions.iter().position(|e| e.kind == kind), data) {
            (Some(i), Some(d)) => self.extensions[i].data = d,
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(d)) => self.extensions.insert(at, Extension { kind, data: d }),
            (None, None) => {}
        }
    }

    /// The name of an incompatible feature bit, from the image's feature
    /// name table when it has one (so a newer qemu's feature is named).
    pub fn feature_name(&self, table: u8, bit: u32) -> String {
        if let Some(t) = self.extension(EXT_FEATURE_TABLE) {
            for e in t.chunks_exact(48) {
                if e[0] == table && u32::from(e[1]) == bit {
                    let name = &e[2..];
                    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    return String::from_utf8_lossy(&name[..end]).into_owned();
                }
            }
        }
        format!("Unknown incompatible feature: {:x}", 1u64 << bit)
    }

    /// Parses the first cluster (or as much of the file as exists, up to a
    /// cluster). `buf` must start at file offset 0.
    pub fn parse(buf: &[u8]) -> BlockResult<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(corrupt(format!(
                "image is too short for a qcow2 header ({} bytes)",
                buf.len()
            )));
        }
        if be32(buf, 0) != MAGIC {
            return Err(BlockError::invalid(NOT_QCOW2));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(BlockError::not_supported(format!(
                "Unsupported qcow2 version {}",
                version
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "Unsupported cluster size: 2^{}",
                cluster_bits
            )));
        }
        let cs = 1usize << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            // qemu counts a disk in 512-byte sectors and drops a partial
            // last one (the bytes past it are never read or written, and a
            // header qemu rewrites holds the rounded size).
            size: be64(buf, 24) / SECTOR * SECTOR,
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extra_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(corrupt("image is too short for a qcow2 v3 header"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN
                || !h.header_length.is_multiple_of(8)
                || h.header_length as usize > cs.min(buf.len())
            {
                return Err(corrupt(format!(
                    "qcow2 header length {} is invalid",
                    h.header_length
                )));
            }
            let extra = &buf[V3_HEADER_LEN as usize..h.header_length as usize];
            if let Some(&ct) = extra.first() {
                h.compression_type = ct;
            }
            h.extra_fields = extra.to_vec();
        }
        if h.refcount_order > 6 {
            return Err(corrupt(format!(
                "Reference count entry width too large; may not exceed 64 bits (order {})",
                h.refcount_order
            )));
        }
        h.parse_extensions(buf, cs)?;
        h.parse_backing_name(buf, cs)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], cs: usize) -> BlockResult<()> {
        // Extensions end at the backing name if it sits in the first cluster.
        let mut limit = cs.min(buf.len());
        if self.backing_file_offset != 0 && (self.backing_file_offset as usize) < limit {
            limit = self.backing_file_offset as usize;
        }
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > limit {
                // qemu tolerates a header that ends without an end marker.
                return Ok(());
            }
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let start = at + 8;
            if len > limit - start {
                return Err(corrupt(format!(
                    "qcow2 header extension 0x{:08x} of {} bytes overruns the header cluster",
                    kind, len
                )));
            }
            if self.extensions.iter().any(|e| e.kind == kind) && kind != 0 {
                return Err(corrupt(format!(
                    "qcow2 header extension 0x{:08x} appears twice",
                    kind
                )));
            }
            self.extensions.push(Extension {
                kind,
                data: buf[start..start + len].to_vec(),
            });
            at = start + len.div_ceil(8) * 8;
        }
    }

    fn parse_backing_name(&mut self, buf: &[u8], cs: usize) -> BlockResult<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let off = self.backing_file_offset;
        let len = self.backing_file_size;
        if len > MAX_BACKING_NAME || off.saturating_add(u64::from(len)) > cs.min(buf.len()) as u64 {
            return Err(corrupt(format!(
                "backing file name ({} bytes at offset {}) is outside the header cluster",
                len, off
            )));
        }
        let name = &buf[off as usize..off as usize + len as usize];
        // A lossy conversion would name another file, and a header written
        // back would rename the backing file (or make it too long to read).
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| BlockError::not_supported("backing file name is not valid UTF-8"))?;
        self.backing_file = Some(name);
        Ok(())
    }

    /// The whole header area (header, extensions, end marker, backing name)
    /// as it is written at offset 0. Fails if it does not fit one cluster.
    pub fn serialize(&self) -> BlockResult<Vec<u8>> {
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            let len = V3_HEADER_LEN as usize + self.extra_fields.len();
            b.extend_from_slice(&(len as u32).to_be_bytes());
            b.extend_from_slice(&self.extra_fields);
        }
        for e in &self.extensions {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(BlockError::invalid(format!(
                "qcow2 header ({} bytes) does not fit in one cluster",
                b.len()
            )));
        }
        Ok(b)
    }
}

/// The feature name table qemu writes into every v3 image it creates.
pub fn default_feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut t = Vec::with_capacity(names.len() * 48);
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN + 8,
            compression_type: 0,
            extra_fields: vec![0; 8],
            extensions: vec![
                Extension {
                    kind: EXT_BACKING_FORMAT,
                    data: b"raw".to_vec(),
                },
                Extension {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3, 4, 5],
                },
            ],
            backing_file: Some("base.img".into()),
        }
    }

    #[test]
    fn header_roundtrip_keeps_unknown_extensions() {
        let h = sample();
        let bytes = h.serialize().expect("serialize");
        let back = Header::parse(&bytes).expect("parse");
        assert_eq!(back.extension(0x1234_5678), Some(&[1u8, 2, 3, 4, 5][..]));
        assert_eq!(back.backing_format().as_deref(), Some("raw"));
        assert_eq!(back.backing_file.as_deref(), Some("base.img"));
        assert_eq!(back.serialize().expect("again"), bytes);
    }

    #[test]
    fn absurd_header_length_is_corrupt() {
        let mut bytes = sample().serialize().expect("serialize");
        bytes[100..104].copy_from_slice(&0x7fff_fff8u32.to_be_bytes());
        let e = Header::parse(&bytes).expect_err("must fail");
        assert_eq!(e.kind, crate::block::ErrorKind::Corrupt);
    }

    #[test]
    fn overlong_extension_is_corrupt() {
        let mut bytes = sample().serialize().expect("serialize");
        // The first extension's length field.
        let at = 112 + 4;
        bytes[at..at + 4].copy_from_slice(&0xffff_0000u32.to_be_bytes());
        assert!(Header::parse(&bytes).is_err());
    }

    /// Found by fuzz/qcow2_header: a name with invalid UTF-8 was read
    /// lossily, so a header written back named another file, here one
    /// too long to parse again.
    #[test]
    fn backing_name_that_is_not_utf8_is_refused() {
        let mut h = sample();
        h.backing_file = Some("b".repeat(400));
        let mut bytes = h.serialize().expect("serialize");
        let at = bytes.len() - 400;
        bytes[at..].fill(0xff);
        let e = Header::parse(&bytes).expect_err("must fail");
        assert_eq!(e.kind, crate::block::ErrorKind::NotSupported);
    }
}
