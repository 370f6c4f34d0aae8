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
    #[error("volume {volume} is Critical: {what}")]
    Critical { volume: String, what: String },
}

impl ShipperError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ShipperError::Io {
            context: context.into(),
            source,
        }
    }
}
