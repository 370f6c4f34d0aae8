//! The ublk-dr shipper: turns a volume's capture ring into sealed change-log segments,
//! stages them durably and ships them to a target store.
//!
//! * [`pipeline`]: reader → sealers → stager → uploader, and its contracts (I4).
//! * [`chain_state`]: the persisted chain position and crash recovery.
//! * [`backlog`]: dropping a staged backlog over its limit, and the resync that follows.
//! * [`mark`]: operator MARKs and app-consistent points (freeze, hooks).
//! * [`resync`]: initial replication and the digest exchange of a resync.
//! * [`priority`]: pipeline threads in the background while shipping keeps up.
//! * [`retry`]: the retry schedule for recoverable errors.
//! * [`throttle`]: the upload bandwidth limit and its windows of the week.
//! * [`status`]: health, RPO and the status file.
//! * [`config`]: the TOML configuration file.
pub mod backlog;
pub mod chain_state;
pub mod config;
pub mod error;
pub mod group_cuts;
pub mod keys;
pub mod mark;
pub mod pipeline;
pub mod priority;
pub mod resync;
pub mod retry;
pub mod status;
pub mod throttle;

pub use error::{Result, ShipperError};
pub use pipeline::{run, Control, RunSummary, ShipperConfig};
pub use status::{Health, Status};
