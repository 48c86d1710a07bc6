//! The NBD protocol: wire format, handshake, transmission, server and client.
//! Nothing here knows about image formats; it sees only [`crate::block::BlockNode`]
//! and [`context::MetaContext`].

pub mod bitmaps;
pub mod budget;
pub mod client;
pub mod context;
pub mod exec;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod reply;
pub mod request;
pub mod server;
pub mod session;
pub mod sink;
pub mod splice;
pub mod tls;
pub mod workers;
