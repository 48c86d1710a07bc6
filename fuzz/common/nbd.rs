//! Exports for the NBD targets: null-co nodes (reads are zeroes, writes
//! land nowhere), so every iteration starts from the same state and the
//! fuzzer exercises the protocol code, not a disk.

use std::sync::{Arc, OnceLock};

use tidemark::bitmap::DirtyBitmap;
use tidemark::block::link::{Gate, Root};
use tidemark::block::node::Node;
use tidemark::block::null::NullNode;
use tidemark::nbd::bitmaps::bitmap_contexts;
use tidemark::nbd::export::{Export, ExportConfig};

pub const SIZE: u64 = 64 << 20;

/// One runtime for the whole process: building one per input would cost
/// more than the input itself.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // libFuzzer's C main leaves SIGPIPE fatal; a client that hangs up
        // must be an EPIPE, as in the daemon (Rust's main ignores it).
        // SAFETY: setting a signal's disposition to SIG_IGN at start-up.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// An export over a fresh null node with a recording bitmap `b0` (some
/// granules dirty) offered as `qemu:dirty-bitmap:b0`, and
/// `qemu:allocation-depth`.
pub fn export(name: &str, read_only: bool) -> Export {
    let node = Node::open(name, Arc::new(NullNode::new(SIZE, true, false))).expect("null node");
    let mut b = DirtyBitmap::new("b0", SIZE, 64 << 10).expect("bitmap");
    b.set_range(0, 1 << 20).expect("range");
    b.set_range(8 << 20, 3 << 16).expect("range");
    let shared = node.bitmaps().add(b).expect("add bitmap");
    let contexts = bitmap_contexts(&[(shared, false)]).expect("bitmap context");
    let root = Root::new(Arc::new(node), !read_only, Arc::new(Gate::default()));
    Export::new(
        root,
        ExportConfig {
            name: name.to_owned(),
            description: Some("fuzz export".to_owned()),
            read_only,
            multi_conn: true,
            allocation_depth: true,
            bitmap_contexts: contexts,
        },
    )
}
