//! The one error type of the change-log crate.
//!
//! Variants separate *corruption* (the bytes are not a valid segment), *authentication*
//! (the bytes are well-formed but not ours or tampered with), *chain* problems (a valid
//! segment in the wrong place of the history) and plain I/O, because the callers react
//! differently: I/O is retried, everything else stops the volume for an operator.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line, as the commands print them. The I/O variants
/// of this workspace's errors put their cause into their own message (so a status file
/// or a log line holding just the message is complete), so a cause whose text the line
/// already holds is not repeated, as anyhow's `{:#}` would.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// Whether `e` or one of its causes is a file system out of space (ENOSPC) or quota
/// (EDQUOT): something an operator fixes by freeing space, after which retrying works.
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |c| c.source()).any(|c| {
        c.downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|code| code == libc::ENOSPC || code == libc::EDQUOT)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("{segment} is corrupt: {what}")]
    Corrupt { segment: String, what: String },

    #[error("{segment} has format version {found}; this build reads version {supported}: upgrade ublk-dr on this side")]
    UnsupportedVersion {
        segment: String,
        found: u16,
        supported: u16,
    },

    #[error("{segment} was sealed with key id {found}, which the key file in use lacks (it has {expected}): point --key at the key file the shipper uses, or, after `shipper key rotate` on the protected side, copy its key file here")]
    WrongKey {
        segment: String,
        expected: String,
        found: String,
    },

    #[error("{segment} failed authentication (AES-GCM tag mismatch): it was corrupted or forged; nothing was applied")]
    Auth { segment: String },

    #[error("{segment} belongs to volume {found:?}, expected {expected:?}: segments of another volume are in this store directory")]
    ForeignVolume {
        segment: String,
        expected: String,
        found: String,
    },

    #[error("{segment} belongs to protection epoch {found:016x}, expected {expected:016x}: it comes from another protection run of this volume")]
    ForeignEpoch {
        segment: String,
        expected: u64,
        found: u64,
    },

    #[error("{segment} breaks the hash chain: {what}")]
    Chain { segment: String, what: String },

    #[error("key file {path}: {what}")]
    Key { path: PathBuf, what: String },

    #[error("invalid volume id {0:?}: use 1-32 characters from A-Z a-z 0-9 . _ - (not starting with '.')")]
    InvalidVolumeId(String),

    #[error("{segment} already exists in {store} with different contents: two writers for one volume, or a reused protection epoch")]
    Conflict { segment: String, store: String },

    #[error("segment too large: {what}")]
    TooLarge { what: String },
}

impl Error {
    /// An I/O error with what was being done (also for stores outside this crate).
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(segment: &str, what: impl Into<String>) -> Self {
        Error::Corrupt {
            segment: segment.to_string(),
            what: what.into(),
        }
    }

    /// Whether retrying the same operation later may succeed (I/O trouble), as opposed to
    /// an error that needs an operator (corrupt, foreign or forged input, wrong key).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, Error::Io { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("applying: {0}")]
    struct Outer(#[source] Error);

    #[test]
    fn one_line_names_each_cause_once() {
        let io = Error::io("writing x", io::Error::from_raw_os_error(libc::ENOSPC));
        let outer = Outer(io);
        assert!(is_disk_full(&outer));
        let line = one_line(&outer);
        assert_eq!(
            line,
            "applying: writing x: No space left on device (os error 28)"
        );
        let wrapped = anyhow::Error::new(Error::io("reading y", io::ErrorKind::NotFound.into()))
            .context("opening the store");
        assert!(!is_disk_full(&*wrapped));
        assert_eq!(
            one_line(&*wrapped),
            "opening the store: reading y: entity not found"
        );
    }
}
