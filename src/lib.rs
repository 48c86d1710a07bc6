//! tidemark: a storage daemon that serves disk images over NBD and tracks
//! their changes for incremental backup. See DESIGN.md in the project's
//! shared folder for the map; README.md for use.

pub mod accept;
pub mod bitmap;
pub mod block;
pub mod checkpoint;
pub mod cli;
pub mod daemon;
pub mod daemonize;
pub mod event;
pub mod info;
pub mod job;
pub mod nbd;
pub mod object;
pub mod qmp;
pub mod store_point;
pub mod tls;
