//! The QMP control channel: qemu's monitor protocol over unix sockets.
//!
//! - `json.rs`: framing of the byte stream, qemu's output form.
//! - `schema.rs`: proto/qmp-schema.json, argument checks, introspection.
//! - `server.rs`: sockets, greeting, negotiation, dispatch, events.
//! - `commands/`: the commands, one file per family.
//! - `cmdline.rs`: qemu-storage-daemon's command-line options.
//! - `error.rs`: the error class and text a reply carries.

pub mod cmdline;
pub mod commands;
pub mod error;
pub mod json;
pub mod schema;
pub mod server;
