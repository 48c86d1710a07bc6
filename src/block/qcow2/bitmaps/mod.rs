//! The qcow2 "Bitmaps extension" (header extension 0x23852875,
//! docs/interop/qcow2.txt): persistent dirty bitmaps stored in the image,
//! read and written as qemu does.
//!
//! - `ext.rs`: the 24-byte header extension and the autoclear bit;
//! - `dir.rs`: bitmap directory entries, parsed and serialised;
//! - `table.rs`: bitmap table entries (data cluster, all-zero, all-ones);
//! - `load.rs`: the directory and tables checked at open, the bits read
//!   on demand;
//! - `store.rs`: in_use marking at read-write open, and storing on close.
//!
//! The rules qemu follows, measured with qemu-img/qemu-io/qemu-nbd 10.0.2:
//! - an extension whose autoclear bit is clear was left behind by a program
//!   that did not understand it: it is ignored (with qemu's warning), and a
//!   read-write open drops it from the header;
//! - a bitmap found with `in_use` set was not stored cleanly: it is loaded
//!   inconsistent, and kept on disk exactly as it is until removed;
//! - a name is a C string (`bitmap::name`): read up to a NUL, shown over
//!   QMP as modified UTF-8, and written back as the bytes it was read
//!   from; a new name is stored as qemu's bytes (U+0000 as C0 80);
//! - opening read-write sets `in_use` on every stored bitmap, so a crash
//!   leaves them marked; a clean close writes them again with it cleared.
//!
//! Where tidemark differs on purpose: a bitmap table or data cluster that
//! lies past the end of the file is an error (qemu reads it as zeroes, which
//! would hand a backup tool a bitmap that silently lost its bits); a name
//! stored twice (as qemu shows it: bytes that are not UTF-8 show as
//! U+FFFD) is a broken directory; the whole
//! directory is rewritten at every store (qemu updates some entries in
//! place), so the cluster layout differs while `qemu-img info` and `check`
//! agree.

pub mod dir;
pub mod ext;
pub mod load;
pub mod recover;
pub mod store;
pub mod table;

pub use dir::DirEntry;
pub use ext::BitmapsExt;
pub use load::check_directory;

/// Directory entry flag: the bitmap is being modified (not stored cleanly).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap records writes (qemu's "enabled").
pub const FLAG_AUTO: u32 = 1 << 1;
/// Directory entry flag: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flags qemu knows; any other bit makes the entry invalid.
pub const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// The only bitmap type: a dirty tracking bitmap.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Granularity bounds of a stored bitmap, as log2.
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name in bytes: the format's limit is qemu's for any
/// bitmap (the driver checks it first, with its own text).
pub const MAX_NAME_SIZE: usize = crate::bitmap::MAX_NAME_LEN;
/// Most bitmaps one image may hold.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest directory qemu reads: 1 KiB per bitmap at most.
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Most entries of one bitmap table, and most bytes of bitmap data (qemu's
/// BME_MAX_TABLE_SIZE and BME_MAX_PHYS_SIZE).
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;

/// One stored bitmap as the open image knows it: its directory entry and
/// its checked table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    pub entry: DirEntry,
    pub table: Vec<u64>,
    /// Found in use (or with extra data it may not ignore) when the image
    /// was opened: its bits cannot be trusted. Our own in_use marking of a
    /// read-write open does not change this.
    pub inconsistent: bool,
}

/// What the image holds on disk right now: the extension's directory
/// location and the bitmaps in directory order. Empty when the image has
/// no (valid, honoured) bitmaps extension.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub ext: Option<BitmapsExt>,
    pub bitmaps: Vec<StoredBitmap>,
}

impl Stored {
    /// Names of the bitmaps found inconsistent (the intent log does not
    /// vouch for them).
    pub fn inconsistent_names(&self) -> Vec<String> {
        self.bitmaps
            .iter()
            .filter(|b| b.inconsistent)
            .map(|b| b.entry.name.clone())
            .collect()
    }
}

use super::Qcow2Node;
use crate::bitmap::DirtyBitmap;
use crate::block::{BlockError, BlockResult, ErrorKind};

impl Qcow2Node {
    pub(super) fn lock_stored(&self) -> BlockResult<std::sync::MutexGuard<'_, Stored>> {
        self.stored
            .lock()
            .map_err(|_| BlockError::new(ErrorKind::Io, "qcow2 bitmap lock poisoned"))
    }

    /// The directory entries as they are on disk now (what `qemu-img info`
    /// lists), in directory order.
    pub fn stored_bitmaps(&self) -> Vec<DirEntry> {
        self.lock_stored()
            .map(|s| s.bitmaps.iter().map(|b| b.entry.clone()).collect())
            .unwrap_or_default()
    }

    pub(super) fn load_stored_bitmaps(&self) -> BlockResult<Vec<DirtyBitmap>> {
        let header = self.lock_meta()?.header.clone();
        let stored = self.lock_stored()?.clone();
        stored
            .bitmaps
            .iter()
            .map(|b| load::load_bitmap(&self.f, &header, b, self.is_read_only()))
            .collect()
    }

    pub(super) fn check_can_store(&self, name: &str, granularity: u64) -> BlockResult<()> {
        let meta = self.lock_meta()?;
        let stored = self.lock_stored()?;
        let dir = stored.ext.map_or(0, |e| e.directory_size);
        store::check_can_store(&meta.header, stored.bitmaps.len(), dir, name, granularity)
    }

    pub(super) fn mark_stored_in_use(&self) -> BlockResult<()> {
        self.check_writable()?;
        let _meta = self.lock_meta()?;
        let mut stored = self.lock_stored()?;
        store::mark_in_use(&self.f, &mut stored)
    }

    /// Writes `bitmaps` as the stored bitmaps. `in_use`: a store point of
    /// an image that stays writable (flags stay set; the intent log keeps
    /// the zones written since the bitmaps were copied); otherwise a clean
    /// store (a close): the log leaves the header with the directory
    /// switch. The bitmaps' bytes are written and flushed, and the new
    /// header flushed, without the metadata lock: guest I/O waits only for
    /// the allocation and the header write.
    /// (The node runs one store at a time.)
    pub(super) fn store_bitmaps_at(
        &self,
        bitmaps: &[&DirtyBitmap],
        in_use: bool,
    ) -> BlockResult<()> {
        use crate::block::qcow2::intent::{Payload, AUTOCLEAR_INTENT, EXT_TIDEMARK_INTENT};
        let ctx = |e: BlockError| BlockError {
            context: format!(
                "'{}': could not store bitmaps: {}",
                self.f.path.display(),
                e.context
            ),
            ..e
        };
        self.check_writable()?;
        let prepared = {
            let mut meta = self.lock_meta()?;
            let stored = self.lock_stored()?;
            store::prepare(&self.f, &mut meta, &stored, bitmaps, in_use).map_err(ctx)?
        };
        if let Err(e) = store::write(&self.f, &prepared) {
            store::abandon(&self.f, &mut *self.lock_meta()?, prepared);
            return Err(ctx(e));
        }
        let mut meta = self.lock_meta()?;
        let mut stored = self.lock_stored()?;
        let mut disk = self.intent.lock_disk();
        let untrusted: Vec<String> = bitmaps
            .iter()
            .filter(|b| b.state.inconsistent)
            .map(|b| b.name().to_owned())
            .collect();
        // The switch keeps the map as it is (both epochs): a header write
        // torn between sectors must not clear zones while leaving the old
        // directory. The old epoch's zones are cleared after, in place.
        let payload = Payload {
            untrusted: untrusted.clone(),
            ..disk.combined(self.intent.shift)
        };
        let mut header = |h: &mut crate::block::qcow2::header::Header| {
            if in_use {
                // Bitmaps stored in use need a log that vouches for them.
                h.set_own_extension(EXT_TIDEMARK_INTENT, Some(payload.encode()));
                h.autoclear |= AUTOCLEAR_INTENT;
            } else {
                h.set_own_extension(EXT_TIDEMARK_INTENT, None);
                h.autoclear &= !AUTOCLEAR_INTENT;
            }
        };
        let replaced =
            store::switch(&self.f, &mut meta, &mut stored, prepared, &mut header).map_err(ctx)?;
        let logged = in_use && replaced.switched;
        if logged {
            disk.untrusted = untrusted;
            disk.installed = true;
        } else if !in_use {
            self.intent.reset(&mut disk);
        }
        drop((disk, stored, meta));
        // The header reaches the disk without the lock held. Only then are
        // the old epoch's zones cleared (in place; not flushed: until that
        // is on disk, a crash only recovers more) and the old clusters
        // freed: before, a crash could find the old directory.
        self.f.sync().map_err(ctx)?;
        let mut meta = self.lock_meta()?;
        if logged {
            let mut disk = self.intent.lock_disk();
            disk.old.iter_mut().for_each(|b| *b = 0);
            self.write_map(&mut meta, &disk).map_err(ctx)?;
        }
        store::finish(&self.f, &mut meta, replaced).map_err(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::dir::parse_directory;
    use super::*;
    use crate::block::node::Node;
    use crate::block::open::open_image;
    use crate::block::qcow2::create::{create_qcow2, CreateOptions};
    use crate::block::qcow2::header::{Header, EXT_BITMAPS};
    use crate::block::BlockNode;

    /// The stored (name, flags) read straight from the file.
    fn on_disk(path: &std::path::Path) -> Vec<(String, u32)> {
        let img = std::fs::read(path).expect("read image");
        let h = Header::parse(&img).expect("header");
        let Some(ext) = h.extension(EXT_BITMAPS) else {
            return Vec::new();
        };
        let ext = BitmapsExt::parse(ext, h.cluster_size()).expect("ext");
        let at = ext.directory_offset as usize;
        let dir = &img[at..at + ext.directory_size as usize];
        parse_directory(dir, ext.nb_bitmaps)
            .expect("dir")
            .into_iter()
            .map(|e| (e.name, e.flags))
            .collect()
    }

    /// Seeded mutations of the extension, directory and tables: every
    /// open either succeeds or fails with an error, never panics, and a
    /// failed read-write open leaves the file as it was.
    #[test]
    fn mutated_bitmap_metadata_never_panics_nor_changes_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.qcow2");
        let opts = CreateOptions {
            size: Some(8 << 20),
            cluster_size: 4096,
            ..Default::default()
        };
        create_qcow2(&path, &opts).expect("create");
        {
            let node =
                Node::open("n", open_image(&path, None, false).expect("open")).expect("node");
            for (name, g) in [("b0", 4096), ("b1", 512)] {
                let mut b = DirtyBitmap::new(name, 8 << 20, g).expect("bitmap");
                b.state.persistent = true;
                node.bitmaps().add(b).expect("add");
            }
            node.write_at(&[7; 9000], 100_000, false).expect("write");
            node.store_bitmaps().expect("store");
        }
        let pristine = std::fs::read(&path).expect("read");
        let h = Header::parse(&pristine).expect("header");
        let ext = BitmapsExt::parse(h.extension(EXT_BITMAPS).expect("ext"), 4096).expect("ext");
        let entries = parse_directory(
            &pristine[ext.directory_offset as usize..][..ext.directory_size as usize],
            ext.nb_bitmaps,
        )
        .expect("dir");
        // Byte ranges worth hitting: the header cluster, the directory and
        // the tables.
        let mut spots = vec![(0usize, 4096usize), (ext.directory_offset as usize, 64)];
        spots.extend(
            entries
                .iter()
                .map(|e| (e.table_offset as usize, 8 * e.table_size as usize)),
        );
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let mut img = pristine.clone();
            for _ in 0..1 + rnd() % 3 {
                let (at, len) = spots[(rnd() % spots.len() as u64) as usize];
                let i = at + (rnd() % len.max(1) as u64) as usize;
                if let Some(b) = img.get_mut(i) {
                    *b ^= 1 << (rnd() % 8);
                }
            }
            std::fs::write(&path, &img).expect("write image");
            for ro in [true, false] {
                let opened = open_image(&path, None, ro).and_then(|d| Node::open("n", d));
                if opened.is_err() && !ro {
                    let now = std::fs::read(&path).expect("read");
                    assert!(now == img, "a failed read-write open changed the image");
                }
            }
        }
    }

    #[test]
    fn store_point_then_write_marks_in_use_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.qcow2");
        let opts = CreateOptions {
            size: Some(4 << 20),
            ..Default::default()
        };
        create_qcow2(&path, &opts).expect("create");
        let node = Node::open("n", open_image(&path, None, false).expect("open")).expect("node");
        node.can_store_bitmap("b0", 65536).expect("can store");
        let mut b = DirtyBitmap::new("b0", 4 << 20, 65536).expect("bitmap");
        b.state.persistent = true;
        node.bitmaps().add(b).expect("add");
        node.write_at(&[1; 512], 70000, false).expect("write");
        node.store_bitmaps().expect("store point");
        assert_eq!(on_disk(&path), vec![("b0".to_string(), FLAG_AUTO)]);
        node.write_at(&[1; 512], 0, false).expect("write");
        assert_eq!(
            on_disk(&path),
            vec![("b0".to_string(), FLAG_AUTO | FLAG_IN_USE)]
        );
        node.store_bitmaps().expect("close");
        drop(node);
        let node = Node::open("n", open_image(&path, None, true).expect("reopen")).expect("node");
        let b = node.bitmaps().get("b0").expect("b0");
        let b = crate::bitmap::set::lock(&b);
        assert!(!b.state.inconsistent && b.state.recording && b.state.readonly);
        assert_eq!(b.dirty_granules(), 2);
        assert!(b.is_dirty(0) && b.is_dirty(70000));
    }
}
