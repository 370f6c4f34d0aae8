//! ublk-target: the recovery side of ublk-dr.
//!
//! * [`config`]: the config file (`ublk-target apply --config`).
//! * [`apply`]: verify and apply segments to a replica image, crash-safe and
//!   idempotent (I5, I6), saving an undo journal per segment first.
//! * [`journal`]: the undo journal format and its contract; `reflink` shares the
//!   replica's blocks with it where the filesystem can.
//! * [`points`]: the recovery-point catalog, the views registry and retention.
//! * [`view`]: the replica at any retained point, with a throw-away write overlay.
//! * [`rollback`]: make the replica equal a point for real (failover).
//! * [`state`]: the replica's paths and the persisted applier state.
//! * [`digests`]: answer digest-resync requests with the replica's block digests.
//! * [`device`]: serve a view of the replica as a ublk device.
//! * [`plan`]: recovery plans, volumes failed over together in steps with hooks
//!   ([`hook`] runs those).
//! * [`health`]: how current the replica is known to be (its newest point, or the
//!   shipper's heartbeat), and the recovery side's health and alerts.
//! * [`status`]: each volume's health, newest point, RPO here and what waits.
pub mod apply;
pub mod config;
pub mod device;
pub mod digests;
pub mod error;
pub mod group_cuts;
pub mod health;
pub mod hook;
pub mod journal;
pub mod keys;
pub mod plan;
pub mod points;
mod reflink;
pub mod rollback;
pub mod state;
pub mod status;
pub mod view;

pub use apply::{Applied, Applier, ApplyOptions, ApplyTimes};
pub use error::{Result, TargetError};
pub use journal::UndoMethod;
pub use points::{catalog, prune, Catalog, PruneReport, RecoveryPoint, Retention};
pub use rollback::{commit, rollback_steps, rollback_to, RollbackReport};
pub use state::{ApplyState, PointFacts, ReplicaPaths};
pub use view::{PointView, ViewOptions};
