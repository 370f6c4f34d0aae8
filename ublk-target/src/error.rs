//! The recovery side's error type.

use std::path::PathBuf;

pub type Result<T, E = TargetError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Changelog(#[from] changelog::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: segment {missing:016x} is missing from {store} although later segments exist (a gap in the history); nothing after it can be applied")]
    Gap {
        volume: String,
        missing: u64,
        store: String,
    },
    #[error("applier state {path} is unreadable ({what}); it must match the replica: restore it, or start over with an empty replica")]
    State { path: PathBuf, what: String },
    #[error("replica {path}: {what}")]
    Replica { path: PathBuf, what: String },
    #[error("{0}")]
    Device(String),
    #[error("undo journal {path} is unusable: {what}. It was not used; the points that need it cannot be served or rolled back to until it is restored (`ublk-target points` lists what is intact)")]
    Journal { path: PathBuf, what: String },
    #[error("journal {journal} is locked by another ublk-target apply, prune or rollback of this replica; only one may change a replica at a time, stop the other first")]
    Busy { journal: PathBuf },
    #[error(
        "recovery point {point} is not available: {why}; {available}; see `ublk-target points`"
    )]
    PointUnavailable {
        point: u64,
        why: String,
        available: String,
    },
    #[error("replica was rolled back to point {point} for failover; it no longer follows the source, so no segment is applied to it: protect it in the reverse direction (failback), or start a new replica with an empty state and journal")]
    RolledBack { point: u64 },
    #[error("rollback to point {point} refused: {what}")]
    Rollback { point: u64, what: String },
    #[error("point view: {what}")]
    View { what: String },
    #[error("config {path}: {what}")]
    Config { path: PathBuf, what: String },
    #[error("{segment} is sealed with key {found}, which was retired before key {newer} that sealed the segments applied already; a shipper never goes back to a retired key, so it was forged by someone holding that key. Nothing was applied. Remove the key from both sides' key files (`shipper key forget FILE {found}`) and find out how it leaked")]
    RetiredKey {
        segment: String,
        found: String,
        newer: String,
    },
}

impl TargetError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TargetError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether trying again later may succeed (store or disk I/O trouble, or a segment
    /// not uploaded yet), as opposed to input that must not be applied.
    pub fn is_recoverable(&self) -> bool {
        match self {
            TargetError::Io { .. } => true,
            TargetError::Changelog(e) => e.is_recoverable(),
            _ => false,
        }
    }
}
