//! The shipper's error type.

use std::path::PathBuf;

pub type Result<T, E = ShipperError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    #[error(transparent)]
    Changelog(#[from] changelog::Error),
    #[error("ring: {0}")]
    Ring(#[from] blkfilter::ring::RingError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is unreadable ({what}); if the staging area was copied or damaged, restore it or start a new protection")]
    State { path: PathBuf, what: String },
    #[error("config {path}: {what}")]
    Config { path: PathBuf, what: String },
    #[error(
        "group clock {0} does not exist: the group's volumes create it when attached with \
         `blkfilter attach --group-clock {0}` (if they are attached, the file was deleted: \
         detach and attach them again)"
    )]
    NoGroupClock(PathBuf),
    #[error(
        "ring {ring} is not in the consistency group of clock {clock}: attach its volume \
         with `blkfilter attach --group-clock {clock}`"
    )]
    NotInGroup { ring: PathBuf, clock: PathBuf },
    #[error("volume {volume} is Critical: {what}")]
    Critical { volume: String, what: String },
    /// `--drain` shipped all the ring held, but writes that left the ring another way
    /// (a dropped backlog, an overflow) still wait for a digest resync.
    #[error(
        "volume {volume}: drained, but {why}: the store does not hold every write yet, so \
         the replica would not equal the source (do not fail over expecting no loss). \
         Attach the volume with blkfilter and run the shipper, with the recovery side \
         applying (ublk-target apply --follow), until `shipper status` shows the resync \
         done; then drain again"
    )]
    DrainIncomplete { volume: String, why: String },
}

impl ShipperError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ShipperError::Io {
            context: context.into(),
            source,
        }
    }
}
