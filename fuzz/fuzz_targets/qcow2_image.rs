//! A whole qcow2 image through the real open path: the input is written to
//! a file (on tmpfs) and opened as tidemark opens images, which reads and
//! checks the header and extensions, the L1 table, the refcount table, the
//! bitmap directory and bitmap tables. Then the image is used: block
//! status, allocation depth and reads walk the L1/L2 tables (compressed
//! and extended-L2 clusters included), the stored bitmaps are loaded,
//! and a read-write open writes, zeroes, discards and stores the bitmaps,
//! which walks the refcounts and the allocator.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tidemark::block::node::Node;
use tidemark::block::qcow2::Qcow2Node;
use tidemark::block::{BlockNode, ZeroFlags};
use tidemark::info::qcow2_info;

/// Bounds on the work per input, so one input stays fast whatever sizes
/// the image claims.
const MAX_CALLS: usize = 64;
const MAX_READ: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("tidemark-fuzz-{}.qcow2", std::process::id()))
    })
}

fn use_image(node: &Node) {
    let size = node.size();
    let mut off = 0;
    let mut data_at = Vec::new();
    for _ in 0..MAX_CALLS {
        if off >= size {
            break;
        }
        let want = (size - off).min(1 << 30);
        let Ok(e) = node.block_status(off, want) else {
            break;
        };
        assert!(
            e.len >= 1 && e.len <= want,
            "extent of {} for {want}",
            e.len
        );
        if e.flags == 0 {
            data_at.push(off);
        }
        off += e.len;
    }
    let mut off = 0;
    for _ in 0..MAX_CALLS {
        if off >= size {
            break;
        }
        let want = (size - off).min(1 << 30);
        let Ok(e) = node.allocation_depth(off, want) else {
            break;
        };
        assert!(
            e.len >= 1 && e.len <= want,
            "depth extent of {} for {want}",
            e.len
        );
        off += e.len;
    }
    // The start of the disk, and the start of every data run found.
    let mut buf = vec![0u8; CHUNK as usize];
    let mut read = 0;
    for at in std::iter::once(0).chain(data_at) {
        if read >= MAX_READ || at >= size {
            break;
        }
        let n = (size - at).min(CHUNK) as usize;
        let _ = node.read_at(&mut buf[..n], at);
        read += n as u64;
    }
}

fn write_image(node: &Node) {
    let size = node.size();
    if size == 0 {
        return;
    }
    let buf = vec![0x5au8; (size.min(CHUNK)) as usize];
    let _ = node.write_at(&buf, 0, false);
    let mid = size / 2;
    let n = (size - mid).min(CHUNK);
    let _ = node.write_zeroes(mid, n, ZeroFlags::default());
    let _ = node.discard(0, (CHUNK * 2).min(size));
    let _ = node.store_bitmaps();
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    if std::fs::write(p, data).is_err() {
        return;
    }
    if let Ok(q) = Qcow2Node::open(p, true) {
        let _ = qcow2_info(&q, String::new(), 0);
        let _ = q.image_info();
        let _ = q.checkpoint_record();
        let _ = q.backing_path();
        if let Ok(node) = Node::open("fuzz", Arc::new(q)) {
            use_image(&node);
        }
    }
    if let Ok(q) = Qcow2Node::open(p, false) {
        if let Ok(node) = Node::open("fuzz", Arc::new(q)) {
            write_image(&node);
            use_image(&node);
        }
    }
    let _ = std::fs::remove_file(p);
});
