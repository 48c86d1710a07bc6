//! Inputs the fuzzers (fuzz/, scripts/fuzz.sh) found that broke tidemark,
//! rebuilt by hand so each failure stays explained: each test names the
//! target, what went wrong, and what must happen instead.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use tidemark::block::qcow2::Qcow2Node;
use tidemark::block::BlockNode;

/// Runs `f` on a thread and fails the test if it has not finished in
/// `secs` (the failures here were endless loops).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("still running: the loop the fuzzer found is back")
}

/// The fields of a v3 qcow2 header that the tests vary.
struct Image {
    cluster_bits: u32,
    size: u64,
    l1_offset: u64,
    l1_size: u32,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    refcount_order: u32,
    /// File length in clusters; everything not set is zero.
    clusters: u64,
}

impl Image {
    fn bytes(&self) -> Vec<u8> {
        let cs = 1usize << self.cluster_bits;
        let mut b = vec![0u8; cs * self.clusters as usize];
        let mut at = 0;
        let mut put = |v: &[u8]| {
            b[at..at + v.len()].copy_from_slice(v);
            at += v.len();
        };
        put(b"QFI\xfb");
        put(&3u32.to_be_bytes());
        put(&0u64.to_be_bytes()); // backing file offset
        put(&0u32.to_be_bytes()); // backing file size
        put(&self.cluster_bits.to_be_bytes());
        put(&self.size.to_be_bytes());
        put(&0u32.to_be_bytes()); // crypt method
        put(&self.l1_size.to_be_bytes());
        put(&self.l1_offset.to_be_bytes());
        put(&self.refcount_table_offset.to_be_bytes());
        put(&self.refcount_table_clusters.to_be_bytes());
        put(&0u32.to_be_bytes()); // snapshots
        put(&0u64.to_be_bytes());
        put(&0u64.to_be_bytes()); // incompatible
        put(&0u64.to_be_bytes()); // compatible
        put(&0u64.to_be_bytes()); // autoclear
        put(&self.refcount_order.to_be_bytes());
        put(&104u32.to_be_bytes()); // header length
        b
    }

    fn write_to(&self, path: &Path) {
        std::fs::write(path, self.bytes()).expect("write image");
    }
}

/// qcow2_image: a refcount table whose entries are all zero calls every
/// cluster free, the header's included. The first write needs a refcount
/// block; the allocator put it at cluster 0, over the header, and since
/// offset 0 also means "no block", it tried again, forever. Now the write
/// fails as corrupt and the header is untouched.
#[test]
fn refcount_block_never_lands_on_the_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no-refblocks.qcow2");
    for refcount_order in [0, 4] {
        Image {
            cluster_bits: 12,
            size: 1 << 20,
            l1_offset: 0x3000,
            l1_size: 1,
            refcount_table_offset: 0x1000,
            refcount_table_clusters: 1,
            refcount_order,
            clusters: 4,
        }
        .write_to(&path);
        let p = path.clone();
        let result = within(20, move || {
            let node = Qcow2Node::open(&p, false).expect("the header is valid");
            node.write_at(&[0x5a; 4096], 0, false)
        });
        let err = result.expect_err("a write into a corrupt image must fail");
        assert!(err.to_string().contains("Preventing invalid"), "{err}");
        let after = std::fs::read(&path).expect("read image");
        assert_eq!(&after[..4], b"QFI\xfb", "the header was overwritten");
    }
}

/// qcow2_image: block status on an image whose file is huge and sparse
/// (an L2 entry pointed a write far past the end of a small file) decides
/// whether the image looks metadata-preallocated by counting clusters in
/// use up to the end of the file: one refcount lookup per cluster, 2^33
/// of them here. Ranges with no refcount block are now skipped whole.
#[test]
fn preallocation_guess_does_not_walk_a_sparse_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sparse.qcow2");
    const COPIED: u64 = 1 << 63;
    let img = Image {
        cluster_bits: 9,
        size: 1 << 20,
        l1_offset: 0x400,
        l1_size: 32,
        refcount_table_offset: 0x200,
        refcount_table_clusters: 1,
        refcount_order: 4,
        clusters: 5,
    };
    let mut b = img.bytes();
    let host = 1u64 << 38;
    b[0x200..0x208].copy_from_slice(&0x800u64.to_be_bytes()); // refcount block
    b[0x400..0x408].copy_from_slice(&(0x600 | COPIED).to_be_bytes()); // L2 table
    b[0x600..0x608].copy_from_slice(&(host | COPIED).to_be_bytes()); // data
    for c in 0..5 {
        b[0x800 + 2 * c + 1] = 1; // the five clusters of metadata are in use
    }
    std::fs::write(&path, &b).expect("write image");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(1 << 42).expect("a sparse 4 TiB file");
    drop(f);
    let status = within(20, move || {
        let node = Qcow2Node::open(&path, true).expect("the image opens");
        node.block_status(0, 1 << 20)
    });
    let e = status.expect("block status answers");
    assert_eq!(e.len, 512, "one data cluster, then unallocated ones");
}
