//! ublk-target: the recovery side of ublk-dr.
//!
//! * [`apply`]: verify and apply segments to a replica image, crash-safe and
//!   idempotent (I5, I6).
pub mod apply;
pub mod error;

pub use apply::{Applied, Applier};
pub use error::{Result, TargetError};
