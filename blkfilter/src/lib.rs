//! blkfilter: the capture side of ublk-dr.
//!
//! A ublk server in front of the protected disk records every completed write into a
//! shared-memory [`ring`] that the shipper drains; when the ring is full, the written
//! region goes to the ring's dirty bitmap instead.
pub mod activity_log;
pub mod capture;
pub mod daemon;
pub mod digest_pass;
mod queue;
pub mod ring;
pub mod server;
pub mod workload;
