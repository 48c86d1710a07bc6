//! Offline commands (`tidemark bitmap`, `tidemark info`): the logic behind
//! the subcommands of src/main.rs, so tests and other fronts can call it.

pub mod bitmap;
pub mod size;
