//! ublk-target: the recovery side of ublk-dr.
//!
//! * [`apply`]: verify and apply segments to a replica image, crash-safe and
//!   idempotent (I5, I6).
//! * [`digests`]: answer digest-resync requests with the replica's block digests.
//! * [`device`]: serve a view of the replica as a ublk device.
pub mod apply;
pub mod device;
pub mod digests;
pub mod error;

pub use apply::{Applied, Applier};
pub use error::{Result, TargetError};
