//! ublk-target: the recovery side of ublk-dr.
//!
//! * [`apply`]: verify and apply segments to a replica image, crash-safe and
//!   idempotent (I5, I6), saving an undo journal per segment first.
//! * [`journal`]: the undo journal format and its contract.
//! * [`state`]: the replica's paths and the persisted applier state.
pub mod apply;
pub mod error;
pub mod journal;
pub mod state;

pub use apply::{Applied, Applier, ApplyOptions};
pub use error::{Result, TargetError};
pub use state::{ApplyState, PointFacts, ReplicaPaths};
