//! Metadata contexts: what NBD_CMD_BLOCK_STATUS can report, and how option
//! queries select them.
//!
//! Each export owns an ordered list of contexts; a context's index in that
//! list is its ID on every connection, which gives qemu's numbering
//! (`base:allocation` 0, `qemu:allocation-depth` 1, then the dirty bitmaps)
//! and qemu's reply order. New kinds of context plug in by implementing
//! [`MetaContext`]; the handshake code only sees names.

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

/// The contexts (IDs, in ID order) that `queries` pick from `contexts`.
/// An empty query list means every context for LIST and none for SET.
pub fn select(contexts: &[Arc<dyn MetaContext>], queries: &[&[u8]], list: bool) -> Vec<u32> {
    let mut ids: Vec<u32> = Vec::new();
    for (id, ctx) in contexts.iter().enumerate() {
        let name = ctx.name();
        let hit = if list && queries.is_empty() {
            true
        } else if list {
            queries.iter().any(|q| list_matches(q, name))
        } else {
            // A name an export offers twice (a bitmap listed twice) is set
            // once, as qemu.
            queries.iter().any(|q| set_matches(q, name))
                && !ids.iter().any(|&i| contexts[i as usize].name() == name)
        };
        if hit {
            ids.push(id as u32);
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
