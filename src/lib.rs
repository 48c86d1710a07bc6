//! tidemark: a storage daemon that serves disk images over NBD and tracks
//! their changes for incremental backup. See ../shared/DESIGN.md for the map.

pub mod bitmap;
pub mod block;
