//! The `loom` package: the node (data directory, key store, log) and the roles that run on it,
//! composed from the library crates. The binary (`main.rs`) parses the command line and calls
//! these; tests start the same things in-process.
//!
//! - [`DataDir`]: the data directory's layout.
//! - [`node`]: [`Node`], and [`open_log`], the one way every role opens the log.
//! - [`serve()`]: `loom serve` / `loom gateway`.
//! - [`roles`]: `loom projector`, `loom replay`, `loom migrate`.

pub mod data_dir;
pub mod node;
pub mod roles;
pub mod serve;
pub mod shutdown;

pub use data_dir::DataDir;
pub use node::{
    Access, KeyStoreLocation, LogLocation, Node, NodeConfig, NodeError, OpenedLog, load_master_key,
    open_key_store, open_log,
};
pub use serve::{ServeConfig, serve};
pub use shutdown::Drain;
