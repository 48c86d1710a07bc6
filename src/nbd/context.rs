//! Metadata contexts: what NBD_CMD_BLOCK_STATUS can report, and how option
//! queries select them.
//!
//! Each export owns its contexts as [`Contexts`], which gives each its ID
//! the way qemu numbers them (see there), the same on every connection
//! whatever the client selects; replies come in ID order, as qemu's. New
//! kinds of context plug in by implementing [`MetaContext`]; the handshake
//! code only sees names and IDs.

use std::sync::Arc;

use crate::bitmap::set::{lock, BusyClaim, SharedBitmap};
use crate::block::link::Root;
use crate::block::{BlockNode, BlockResult};

/// One block-status descriptor: `len` bytes with status `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u64,
    pub flags: u64,
}

/// A source of block status for one named context.
pub trait MetaContext: Send + Sync {
    /// The full name, `namespace:leaf`, as bytes on the wire: a bitmap's
    /// leaf is qemu's C string (see bitmap/name.rs), not always UTF-8.
    fn name(&self) -> &[u8];

    /// Appends descriptors for `[offset, offset + len)`, consecutive from
    /// `offset`, each nonzero, never past the range, with equal neighbours
    /// merged; stops after `max` descriptors. Adds at least one when
    /// `len > 0`.
    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Descriptor>,
    ) -> BlockResult<()>;
}

/// Appends a descriptor to those a reply has from index `first` on,
/// merging it into the previous one when the flags match. Returns false,
/// adding nothing, when it would be descriptor number `max + 1`.
pub fn push_capped(out: &mut Vec<Descriptor>, first: usize, max: usize, d: Descriptor) -> bool {
    if out.len() > first {
        if let Some(last) = out.last_mut() {
            if last.flags == d.flags {
                last.len += d.len;
                return true;
            }
        }
    }
    if out.len() - first >= max {
        return false;
    }
    out.push(d);
    true
}

/// Runs `step` from `offset` until `len` is covered or `max` descriptors
/// are out: the loop every node-backed context shares.
fn collect(
    offset: u64,
    len: u64,
    max: usize,
    out: &mut Vec<Descriptor>,
    mut step: impl FnMut(u64, u64) -> BlockResult<Descriptor>,
) -> BlockResult<()> {
    let first = out.len();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let d = step(pos, end - pos)?;
        let d = Descriptor {
            len: d.len.clamp(1, end - pos),
            flags: d.flags,
        };
        if !push_capped(out, first, max, d) {
            break;
        }
        pos += d.len;
    }
    Ok(())
}

/// `base:allocation`: holes and zeroes as the export's node reports them.
pub struct BaseAllocation(pub Arc<Root>);

pub const BASE_ALLOCATION: &str = "base:allocation";
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

impl MetaContext for BaseAllocation {
    fn name(&self) -> &[u8] {
        BASE_ALLOCATION.as_bytes()
    }

    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Descriptor>,
    ) -> BlockResult<()> {
        let node = self.0.get();
        collect(offset, len, max, out, |pos, rest| {
            let e = node.block_status(pos, rest)?;
            Ok(Descriptor {
                len: e.len,
                flags: e.flags as u64,
            })
        })
    }
}

/// `qemu:allocation-depth`: which layer of the chain holds each range.
pub struct AllocationDepth(pub Arc<Root>);

impl MetaContext for AllocationDepth {
    fn name(&self) -> &[u8] {
        ALLOCATION_DEPTH.as_bytes()
    }

    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Descriptor>,
    ) -> BlockResult<()> {
        let node = self.0.get();
        collect(offset, len, max, out, |pos, rest| {
            let e = node.allocation_depth(pos, rest)?;
            Ok(Descriptor {
                len: e.len,
                flags: e.depth as u64,
            })
        })
    }
}

/// `qemu:dirty-bitmap:NAME`: bit 0 set where the bitmap is dirty. The
/// context holds the bitmap busy for as long as the export lives.
pub struct DirtyBitmapContext {
    name: Vec<u8>,
    /// Shared when one export lists a bitmap twice (qemu offers it twice).
    claim: Arc<BusyClaim>,
}

pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

impl DirtyBitmapContext {
    /// `export_as` is the leaf the client sees (qemu: the bitmap's name).
    pub fn new(export_as: &str, claim: Arc<BusyClaim>) -> Self {
        let mut name = DIRTY_BITMAP_PREFIX.as_bytes().to_vec();
        name.extend_from_slice(&crate::bitmap::name::c_bytes(export_as));
        DirtyBitmapContext { name, claim }
    }

    fn bitmap(&self) -> &SharedBitmap {
        self.claim.bitmap()
    }
}

impl MetaContext for DirtyBitmapContext {
    fn name(&self) -> &[u8] {
        &self.name
    }

    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Descriptor>,
    ) -> BlockResult<()> {
        let first = out.len();
        let b = lock(self.bitmap());
        for e in b.extents(offset, offset + len) {
            let d = Descriptor {
                len: e.len,
                flags: e.dirty as u64,
            };
            if !push_capped(out, first, max, d) {
                break;
            }
        }
        Ok(())
    }
}

/// Whether `query` names `name` for NBD_OPT_LIST_META_CONTEXT. A query that
/// ends in a colon (`base:`, `qemu:`, `qemu:dirty-bitmap:`) lists everything
/// under it, as qemu does; anything else must match exactly. Unknown
/// namespaces simply match nothing.
pub fn list_matches(query: &[u8], name: &[u8]) -> bool {
    if query.ends_with(b":") {
        name.starts_with(query)
    } else {
        query == name
    }
}

/// Whether `query` selects `name` for NBD_OPT_SET_META_CONTEXT: only exact
/// names select; wildcards are ignored there, as the spec and qemu say.
pub fn set_matches(query: &[u8], name: &[u8]) -> bool {
    query == name
}

/// qemu's context IDs (nbd/server.c `NBD_META_ID_*`): fixed by kind and
/// by a bitmap's place in the export's list, not by what else the export
/// offers or the client selects (measured with qemu-nbd and
/// qemu-storage-daemon 10.0.2).
pub const BASE_ALLOCATION_ID: u32 = 0;
pub const ALLOCATION_DEPTH_ID: u32 = 1;
/// The export's dirty bitmap number `i` (0-based, in its list) is
/// `FIRST_BITMAP_ID + i`, with or without `qemu:allocation-depth`.
pub const FIRST_BITMAP_ID: u32 = 2;

/// An export's contexts with their IDs, in ID order: the one place IDs
/// are given out.
pub struct Contexts(Vec<(u32, Arc<dyn MetaContext>)>);

impl Contexts {
    /// `base:allocation`, `qemu:allocation-depth` if offered, and the
    /// export's dirty bitmaps in its order (one listed twice is offered
    /// twice, under two IDs, as qemu).
    pub fn new(
        base: Arc<dyn MetaContext>,
        depth: Option<Arc<dyn MetaContext>>,
        bitmaps: Vec<Arc<dyn MetaContext>>,
    ) -> Contexts {
        let mut all = vec![(BASE_ALLOCATION_ID, base)];
        all.extend(depth.map(|d| (ALLOCATION_DEPTH_ID, d)));
        all.extend((FIRST_BITMAP_ID..).zip(bitmaps));
        Contexts(all)
    }

    /// The context with ID `id`, if the export has one.
    pub fn get(&self, id: u32) -> Option<&dyn MetaContext> {
        let i = self.0.binary_search_by_key(&id, |(i, _)| *i).ok()?;
        Some(&*self.0[i].1)
    }

    /// Every context with its ID, in ID order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &dyn MetaContext)> {
        self.0.iter().map(|(id, c)| (*id, &**c))
    }
}

/// The IDs (in ID order) that `queries` pick from `contexts`. An empty
/// query list means every context for LIST and none for SET.
pub fn select(contexts: &Contexts, queries: &[&[u8]], list: bool) -> Vec<u32> {
    let mut ids: Vec<u32> = Vec::new();
    for (id, ctx) in contexts.iter() {
        let name = ctx.name();
        let hit = if list && queries.is_empty() {
            true
        } else if list {
            queries.iter().any(|q| list_matches(q, name))
        } else {
            // A name an export offers twice (a bitmap listed twice) is set
            // once, under its first ID, as qemu.
            queries.iter().any(|q| set_matches(q, name))
                && !ids
                    .iter()
                    .any(|&i| contexts.get(i).map(|c| c.name()) == Some(name))
        };
        if hit {
            ids.push(id);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_list_but_do_not_set() {
        assert!(list_matches(b"qemu:", b"qemu:dirty-bitmap:b0"));
        assert!(list_matches(b"qemu:dirty-bitmap:", b"qemu:dirty-bitmap:b0"));
        assert!(list_matches(b"base:", b"base:allocation"));
        assert!(!list_matches(b"qemu:dirty-", b"qemu:dirty-bitmap:b0"));
        assert!(!set_matches(b"qemu:", b"qemu:allocation-depth"));
        assert!(set_matches(b"base:allocation", b"base:allocation"));
    }

    struct Named(&'static [u8]);

    impl MetaContext for Named {
        fn name(&self) -> &[u8] {
            self.0
        }

        fn extents(&self, _: u64, _: u64, _: usize, _: &mut Vec<Descriptor>) -> BlockResult<()> {
            Ok(())
        }
    }

    fn contexts(depth: bool, bitmaps: &[&'static [u8]]) -> Contexts {
        let named = |n: &'static [u8]| -> Arc<dyn MetaContext> { Arc::new(Named(n)) };
        Contexts::new(
            named(b"base:allocation"),
            depth.then(|| named(b"qemu:allocation-depth")),
            bitmaps.iter().map(|b| named(b)).collect(),
        )
    }

    #[test]
    fn ids_are_qemus_with_or_without_allocation_depth() {
        let b: &[&[u8]] = &[b"qemu:dirty-bitmap:b1", b"qemu:dirty-bitmap:b0"];
        let with = contexts(true, b);
        let without = contexts(false, b);
        let ids = |c: &Contexts| c.iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(&with), [0, 1, 2, 3]);
        assert_eq!(ids(&without), [0, 2, 3]);
        assert!(without.get(1).is_none());
        assert!(without.get(4).is_none());
        let name = without.get(3).map(|c| c.name());
        assert_eq!(name, Some(&b"qemu:dirty-bitmap:b0"[..]));
        let q: &[&[u8]] = &[b"qemu:dirty-bitmap:b0", b"base:allocation"];
        assert_eq!(select(&without, q, false), [0, 3]);
        assert_eq!(select(&with, q, false), [0, 3]);
        assert_eq!(select(&without, &[b"qemu:"], true), [2, 3]);
    }

    #[test]
    fn a_bitmap_listed_twice_is_listed_twice_and_set_once() {
        let c = contexts(false, &[b"qemu:dirty-bitmap:b0", b"qemu:dirty-bitmap:b0"]);
        assert_eq!(select(&c, &[], true), [0, 2, 3]);
        let b0: &[u8] = b"qemu:dirty-bitmap:b0";
        assert_eq!(select(&c, &[b0, b0], false), [2]);
    }

    #[test]
    fn merged_descriptors_do_not_count_against_the_cap() {
        let mut out = Vec::new();
        let mut flip = 0u64;
        collect(0, 100, 2, &mut out, |_, _| {
            flip += 1;
            Ok(Descriptor {
                len: 10,
                flags: (flip / 3) % 2,
            })
        })
        .expect("collect");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], Descriptor { len: 20, flags: 0 });
    }
}
