//! `qemu-img info --output=json`, the part backup tools read: the same
//! field names, order and layout (4-space indent) as qemu-img prints.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::block::chain::MAX_CHAIN_DEPTH;
use crate::block::open::{probe, Format};
use crate::block::qcow2::header::{
    COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
use crate::block::qcow2::{resolve_backing, Qcow2Node};
use crate::block::{BlockError, BlockResult};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageInfo {
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_filename_format: Option<String>,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    pub filename: String,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    pub format: String,
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    pub full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(rename = "dirty-flag")]
    pub dirty_flag: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Qcow2Specific,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Qcow2Specific {
    pub compat: String,
    #[serde(rename = "compression-type")]
    pub compression_type: String,
    #[serde(rename = "lazy-refcounts", skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// The stored bitmaps, in directory order; absent when there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    #[serde(rename = "refcount-bits")]
    pub refcount_bits: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(rename = "extended-l2", skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// One stored bitmap as `qemu-img info` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BitmapInfo {
    /// "in-use" and "auto", in that order, when set.
    pub flags: Vec<String>,
    pub name: String,
    pub granularity: u64,
    /// tidemark's: the bitmap was left in use by a crash and the intent
    /// log covers it; recovery (the next read-write open, or `tidemark
    /// bitmap --recover`) adds this many bytes to what was stored.
    #[serde(
        rename = "x-tidemark-recoverable-bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub recoverable_bytes: Option<u64>,
}

fn bitmap_infos(node: &Qcow2Node) -> Option<Vec<BitmapInfo>> {
    let recoverable = node.recoverable();
    let list: Vec<BitmapInfo> = node
        .stored_bitmaps()
        .into_iter()
        .map(|e| {
            let mut flags = Vec::new();
            if e.in_use() {
                flags.push("in-use".to_string());
            }
            if e.auto() {
                flags.push("auto".to_string());
            }
            BitmapInfo {
                flags,
                granularity: e.granularity(),
                recoverable_bytes: recoverable
                    .iter()
                    .find(|(n, _)| *n == e.name)
                    .map(|(_, b)| *b),
                name: e.name,
            }
        })
        .collect();
    (!list.is_empty()).then_some(list)
}

/// Information on one image (its backing file is named, not opened).
pub fn image_info(path: &Path, format: Option<Format>) -> BlockResult<ImageInfo> {
    image_info_opts(path, format, false)
}

/// As [`image_info`]; with `force_share` (qemu-img's `-U`), a qcow2 image
/// another process holds is read without taking its locks.
pub fn image_info_opts(
    path: &Path,
    format: Option<Format>,
    force_share: bool,
) -> BlockResult<ImageInfo> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let md = std::fs::metadata(path)
        .map_err(|e| BlockError::io(format!("Could not open '{}'", path.display()), e))?;
    let actual_size = md.blocks() * 512;
    let filename = path.display().to_string();
    if format == Format::Raw {
        // Opened (and locked) like qemu-img does, to refuse an image in use.
        let node = crate::block::file::FileNode::open(path, true)?;
        drop(node);
        return Ok(ImageInfo {
            backing_filename_format: None,
            virtual_size: md.len(),
            filename,
            cluster_size: None,
            format: "raw".into(),
            actual_size,
            format_specific: None,
            full_backing_filename: None,
            backing_filename: None,
            dirty_flag: false,
        });
    }
    let node = if force_share {
        Qcow2Node::open_force_share(path)?
    } else {
        Qcow2Node::open(path, true)?
    };
    Ok(qcow2_info(&node, filename, actual_size))
}

/// What `qemu-img info` says of an open qcow2 image.
pub fn qcow2_info(node: &Qcow2Node, filename: String, actual_size: u64) -> ImageInfo {
    let h = node.header();
    let v3 = h.version >= 3;
    let data = Qcow2Specific {
        compat: if v3 { "1.1" } else { "0.10" }.into(),
        compression_type: if h.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        }
        .into(),
        lazy_refcounts: v3.then_some(h.compatible & COMPAT_LAZY_REFCOUNTS != 0),
        bitmaps: bitmap_infos(node),
        refcount_bits: 1 << h.refcount_order,
        corrupt: v3.then_some(h.incompatible & INCOMPAT_CORRUPT != 0),
        extended_l2: v3.then_some(h.incompatible & INCOMPAT_EXTL2 != 0),
    };
    ImageInfo {
        backing_filename_format: h.backing_file.as_ref().and(node.backing_format()),
        virtual_size: h.size,
        filename,
        cluster_size: Some(h.cluster_size()),
        format: "qcow2".into(),
        actual_size,
        format_specific: Some(FormatSpecific {
            kind: "qcow2".into(),
            data,
        }),
        full_backing_filename: node.backing_path().map(|p| p.display().to_string()),
        backing_filename: h.backing_file.clone(),
        dirty_flag: h.incompatible & INCOMPAT_DIRTY != 0,
    }
}

/// `--backing-chain`: the image and every backing file below it, top first.
pub fn chain_info(path: &Path, format: Option<Format>) -> BlockResult<Vec<ImageInfo>> {
    let mut out: Vec<ImageInfo> = Vec::new();
    let mut seen = Vec::new();
    let mut next: Option<(PathBuf, Option<Format>)> = Some((path.to_owned(), format));
    while let Some((p, fmt)) = next.take() {
        let md = std::fs::metadata(&p)
            .map_err(|e| BlockError::io(format!("Could not open '{}'", p.display()), e))?;
        if seen.contains(&(md.dev(), md.ino())) {
            return Err(BlockError::invalid(format!(
                "Backing file loop: '{}' is already part of the chain",
                p.display()
            )));
        }
        if seen.len() > MAX_CHAIN_DEPTH {
            return Err(BlockError::invalid("the backing chain is too deep"));
        }
        seen.push((md.dev(), md.ino()));
        let info = image_info(&p, fmt)?;
        if let Some(name) = &info.backing_filename {
            let bfmt = match info.backing_filename_format.as_deref() {
                Some("raw") => Some(Format::Raw),
                Some("qcow2") => Some(Format::Qcow2),
                _ => None,
            };
            next = Some((resolve_backing(&p, name), bfmt));
        }
        out.push(info);
    }
    Ok(out)
}

/// JSON text exactly as `qemu-img info --output=json` lays it out.
pub fn to_qemu_json<T: Serialize>(value: &T) -> String {
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    // Serialising plain structs of strings and numbers cannot fail.
    if value.serialize(&mut ser).is_err() {
        return String::from("{}");
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::qcow2::create::{create_qcow2, CreateOptions};

    #[test]
    fn chain_info_lists_backing_files_top_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let opts = CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        };
        create_qcow2(&base, &opts).expect("base");
        let opts = CreateOptions {
            size: None,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        };
        create_qcow2(&top, &opts).expect("top");
        let chain = chain_info(&top, None).expect("info");
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].virtual_size, 1 << 20);
        assert_eq!(chain[0].backing_filename.as_deref(), Some("base.qcow2"));
        assert_eq!(chain[0].backing_filename_format.as_deref(), Some("qcow2"));
        assert_eq!(chain[1].backing_filename, None);
        let json = to_qemu_json(&chain[0]);
        assert!(json.contains("\"compat\": \"1.1\""), "{}", json);
    }
}
