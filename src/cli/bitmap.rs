//! `tidemark bitmap`: `qemu-img bitmap` on an image nobody has open.
//!
//! Like qemu-img, the operations run in command-line order on the image
//! opened read-write (which marks its stored bitmaps in use), and the image
//! is closed cleanly afterwards even when an operation failed, so the
//! operations before the failure are kept. Errors read as qemu-img's:
//! "Operation OP on bitmap NAME failed: REASON".
//!
//! `--sha256` is a tidemark extension for tests: it prints the bitmap's
//! SHA-256 as qemu's `x-debug-block-dirty-bitmap-sha256` computes it,
//! opening the image read-only. `--recover IMAGE` (tidemark's) recovers
//! the bitmaps a crash left in use from the intent log, for an image qemu
//! will open next (any read-write open here recovers; this one does only
//! that, and says what it did).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bitmap::set::lock;
use crate::bitmap::{check_name, default_granularity, granularity_shift, Checks, DirtyBitmap};
use crate::block::node::Node;
use crate::block::open::{open_image, Format};
use crate::block::BlockNode;

/// One operation, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn verb(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// What `tidemark bitmap` was asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitmapArgs {
    pub ops: Vec<Op>,
    pub granularity: Option<u64>,
    pub format: Option<Format>,
    pub source_file: Option<PathBuf>,
    pub source_format: Option<Format>,
    /// Print the bitmap's SHA-256 instead of changing anything.
    pub sha256: bool,
    /// Only recover from the intent log (no bitmap name).
    pub recover: bool,
    pub image: PathBuf,
    pub name: String,
}

pub const USAGE: &str = "usage: tidemark bitmap (--add | --remove | --clear | --enable | \
--disable | --merge SRC [-b SRCFILE [-F FMT]] | --sha256)... [-g GRANULARITY] [-f FMT] IMAGE NAME
       tidemark bitmap --recover [-f FMT] IMAGE";

fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "raw" => Ok(Format::Raw),
        "qcow2" => Ok(Format::Qcow2),
        other => Err(format!("Unknown file format '{other}'")),
    }
}

/// A granularity with qemu-img's suffixes.
fn parse_size(s: &str) -> Result<u64, String> {
    super::size::parse_size(s).ok_or_else(|| format!("Invalid granularity specified: '{s}'"))
}

/// Parses the arguments after `bitmap`, keeping the operations' order
/// (which clap's flags would lose).
pub fn parse_args(args: &[String]) -> Result<BitmapArgs, String> {
    let mut a = BitmapArgs::default();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |opt: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("option '{opt}' requires an argument"))
        };
        match arg.as_str() {
            "--add" => a.ops.push(Op::Add),
            "--remove" => a.ops.push(Op::Remove),
            "--clear" => a.ops.push(Op::Clear),
            "--enable" => a.ops.push(Op::Enable),
            "--disable" => a.ops.push(Op::Disable),
            "--merge" => a.ops.push(Op::Merge(value("--merge")?)),
            "--sha256" => a.sha256 = true,
            "--recover" => a.recover = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            "-g" | "--granularity" => a.granularity = Some(parse_size(&value(arg)?)?),
            "-f" => a.format = Some(parse_format(&value("-f")?)?),
            "-b" => a.source_file = Some(PathBuf::from(value("-b")?)),
            "-F" => a.source_format = Some(parse_format(&value("-F")?)?),
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(format!("unrecognized option '{s}'\n{USAGE}"))
            }
            _ => positional.push(arg.clone()),
        }
    }
    if a.recover {
        let [image]: [String; 1] = positional
            .try_into()
            .map_err(|_| format!("--recover takes the image file name alone\n{USAGE}"))?;
        if a.sha256 || !a.ops.is_empty() {
            return Err("--recover cannot be combined with other operations".into());
        }
        a.image = PathBuf::from(image);
        return Ok(a);
    }
    let [image, name]: [String; 2] = positional
        .try_into()
        .map_err(|_| format!("Expecting image file name and bitmap name\n{USAGE}"))?;
    a.image = PathBuf::from(image);
    a.name = name;
    if a.sha256 && !a.ops.is_empty() {
        return Err("--sha256 only reads; it cannot be combined with other operations".into());
    }
    if a.ops.is_empty() && !a.sha256 {
        return Err(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into(),
        );
    }
    if a.granularity.is_some() && !a.ops.contains(&Op::Add) {
        return Err("granularity only supported with --add".into());
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        return Err("-F requires -b".into());
    }
    if a.source_file.is_some() && !a.ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return Err("-b requires --merge".into());
    }
    Ok(a)
}

/// Runs the operations; on success the output to print (only `--sha256`
/// prints anything).
pub fn run(a: &BitmapArgs) -> Result<String, String> {
    if a.sha256 {
        return sha256(a);
    }
    let node = open_node(&a.image, a.format, false)?;
    if a.recover {
        let report = node.driver().recovered_bitmaps();
        node.store_bitmaps()
            .map_err(|e| format!("Could not close '{}': {e}", a.image.display()))?;
        if report.is_empty() {
            return Ok("nothing to recover\n".into());
        }
        return Ok(report
            .iter()
            .map(|(n, added)| {
                format!("recovered bitmap '{n}': {added} bytes added from the intent log\n")
            })
            .collect());
    }
    let mut result = Ok(());
    for op in &a.ops {
        result = apply(&node, op, a).map_err(|reason| {
            format!(
                "Operation {} on bitmap {} failed: {reason}",
                op.verb(),
                a.name
            )
        });
        if result.is_err() {
            break;
        }
    }
    // Closed cleanly whatever happened, as qemu-img does.
    let closed = node
        .store_bitmaps()
        .map_err(|e| format!("Could not close '{}': {e}", a.image.display()));
    result?;
    closed.map(|_| String::new())
}

fn open_node(path: &Path, format: Option<Format>, read_only: bool) -> Result<Node, String> {
    let driver = open_image(path, format, read_only)
        .map_err(|e| format!("Could not open '{}': {e}", path.display()))?;
    Node::open(path.display().to_string(), driver)
        .map_err(|e| format!("Could not open '{}': {e}", path.display()))
}

fn not_found(name: &str) -> String {
    format!("Dirty bitmap '{name}' not found")
}

fn apply(node: &Node, op: &Op, a: &BitmapArgs) -> Result<(), String> {
    let name = &a.name;
    let set = node.bitmaps();
    let existing = || set.get(name).ok_or_else(|| not_found(name));
    match op {
        Op::Add => {
            // qemu-img passes the granularity as a 32-bit value.
            let gran = match a.granularity {
                Some(g) => u64::from(g as u32),
                None => default_granularity(node.cluster_size()),
            };
            granularity_shift(gran).map_err(|e| e.message)?;
            if set.get(name).is_some() {
                return Err(format!("Bitmap already exists: {name}"));
            }
            node.can_store_bitmap(name, gran).map_err(|e| e.context)?;
            check_name(name).map_err(|e| e.message)?;
            let mut b = DirtyBitmap::new(name, node.size(), gran).map_err(|e| e.message)?;
            b.state.persistent = true;
            set.add(b).map_err(|e| e.message)?;
        }
        Op::Remove => {
            let b = existing()?;
            {
                let g = lock(&b);
                g.check_not_busy().map_err(|e| e.message)?;
                g.check_writable().map_err(|e| e.message)?;
            }
            set.remove(name);
        }
        Op::Clear => {
            let b = existing()?;
            let mut g = lock(&b);
            g.check(Checks::DEFAULT).map_err(|e| e.message)?;
            g.clear();
        }
        Op::Enable | Op::Disable => {
            let b = existing()?;
            let mut g = lock(&b);
            g.check(Checks::ALLOW_RO).map_err(|e| e.message)?;
            g.state.recording = *op == Op::Enable;
        }
        Op::Merge(src) => {
            let target = existing()?;
            let other;
            let source = match &a.source_file {
                Some(file) => {
                    other = open_node(file, a.source_format, true)?;
                    other.bitmaps().get(src)
                }
                None => set.get(src),
            }
            .ok_or_else(|| not_found(src))?;
            if Arc::ptr_eq(&target, &source) {
                return lock(&target).check(Checks::DEFAULT).map_err(|e| e.message);
            }
            let s = lock(&source).clone();
            lock(&target).merge(&s).map_err(|e| e.message)?;
        }
    }
    Ok(())
}

fn sha256(a: &BitmapArgs) -> Result<String, String> {
    let node = open_node(&a.image, a.format, true)?;
    let b = node
        .find_bitmap(&a.name)
        .ok_or_else(|| not_found(&a.name))?;
    let g = lock(&b);
    Ok(format!("{}\n", g.sha256()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<BitmapArgs, String> {
        parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operations_keep_their_order_and_options_are_checked() {
        let a = args(&[
            "--disable",
            "--merge",
            "b1",
            "-g",
            "64k",
            "--add",
            "i.qcow2",
            "b0",
        ])
        .expect("parse");
        assert_eq!(a.ops, vec![Op::Disable, Op::Merge("b1".into()), Op::Add]);
        assert_eq!(a.granularity, Some(65536));
        assert_eq!(
            args(&["i.qcow2", "b0"]).expect_err("no op"),
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        );
        assert_eq!(
            args(&["-g", "4096", "--clear", "i", "b"]).expect_err("-g"),
            "granularity only supported with --add"
        );
        assert!(args(&["--add", "i"]).is_err());
        assert!(args(&["--sha256", "--add", "i", "b"]).is_err());
        assert!(args(&["--add", "-f", "vmdk", "i", "b"]).is_err());
    }
}
