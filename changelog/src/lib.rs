//! The ublk-dr change-log: the segment format and the stores segments live in.
pub mod record;

pub use record::{Op, RecordRef};
