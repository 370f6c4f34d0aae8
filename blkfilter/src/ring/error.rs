use super::RingGeometry;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong opening or reading a ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        /// What was being done, e.g. "open", "map".
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} is not a ublk-dr ring ({why}); check the path, or delete the file and let \
         blkfilter create the ring again"
    )]
    BadMagic { path: PathBuf, why: String },

    #[error(
        "{path} is not a ublk-dr group clock ({why}); check the path, or delete the file \
         (with every volume of the group detached) and let blkfilter create it again"
    )]
    NotAGroupClock { path: PathBuf, why: String },

    #[error(
        "ring {path} has format version {found}, this build reads version {supported}; \
         run matching versions of blkfilter and the shipper"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error(
        "ring {path} exists with {found}, but {wanted} was asked for; drain it with the \
         shipper and delete it, or configure the existing geometry"
    )]
    GeometryMismatch {
        path: PathBuf,
        found: RingGeometry,
        wanted: RingGeometry,
    },

    #[error(
        "ring {path} has a corrupt header: {what}; stop blkfilter and the shipper, delete \
         the ring file and resync the volume"
    )]
    CorruptHeader { path: PathBuf, what: String },

    #[error("invalid ring geometry: {0}")]
    InvalidGeometry(String),

    #[error("ring {path} is already open by another {role}; stop that process first")]
    Busy { path: PathBuf, role: &'static str },

    #[error(
        "ring corrupt at byte position {pos}: {what}; stop blkfilter and the shipper, \
         delete the ring file and resync the volume"
    )]
    Corrupt { pos: u64, what: String },

    /// A caller asked for a position outside `[released, published]`: a bug in the caller.
    #[error(
        "position {pos} is outside the consumer's window [{released}, {published}] or unaligned"
    )]
    BadPosition {
        pos: u64,
        released: u64,
        published: u64,
    },
}

/// The record did not fit: mark its region dirty instead (see the module doc for the rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ring full")]
pub struct Full;
