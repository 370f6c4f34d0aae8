//! The ublk-dr change-log: the segment format, its verifier, and the stores segments
//! live in.
//!
//! * [`record`]: the records a segment carries (WRITE, FLUSH, FUA, DISCARD,
//!   WRITE_ZEROES, MARK) and their encoding.
//! * [`header`]: the fixed 192-byte segment header, format version 1.
//! * [`segment`]: sealing (lz4, AES-256-GCM, hash chain) and verified opening.
//! * [`store`]: the target-store trait and the local-directory store.
//! * [`key`], [`volume`]: the shared key and volume names.
//! * [`digests`]: block digests and the resync digest exchange through the store.
//! * [`uring`]: synchronous io_uring file I/O used by every stage.
//! * [`inspect`]: a human-readable dump of one segment.
//! * [`alert`], [`heartbeat`]: what both sides share about a volume's health: the
//!   alert command, and the shipper's sealed "caught up as of" note in the store.
pub mod alert;
pub mod check;
pub mod digests;
pub mod error;
pub mod header;
pub mod heartbeat;
pub mod inspect;
pub mod key;
pub mod record;
pub mod segment;
pub mod store;
pub mod uring;
pub mod volume;

pub use error::{Error, Result};
pub use header::{flags, Digest32, SegmentHeader};
pub use key::Key;
pub use record::{GroupCutLabel, Op, RecordRef};
pub use segment::{
    open, read_info, seal, seal_owned, ChainCursor, LinkedSegment, OpenedSegment, PlainSegment,
    SealParams,
};
pub use store::{
    parse_segment_file_name, segment_file_name, valid_blob_name, LocalDirStore, TargetStore,
};
pub use volume::VolumeId;

/// A duration for a table cell (an RPO, an age): `0.4s`, `12.0s`, `4m05s`, `3h07m`,
/// `15d04h` (from two days on).
pub fn short_duration(ms: u64) -> String {
    let secs = ms / 1000;
    if secs < 60 {
        format!("{:.1}s", ms as f64 / 1e3)
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else if secs < 2 * 86_400 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600)
    }
}

/// Milliseconds since the Unix epoch, the time unit of headers and status files.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_durations() {
        let cases = [
            (400, "0.4s"),
            (59_999, "60.0s"),
            (245_000, "4m05s"),
            (11_220_000, "3h07m"),
            (47 * 3_600_000, "47h00m"),
            (15 * 86_400_000 + 4 * 3_600_000, "15d04h"),
        ];
        for (ms, text) in cases {
            assert_eq!(super::short_duration(ms), text);
        }
    }
}
