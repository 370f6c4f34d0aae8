//! Where a replica's files live, and the applier's persisted state.
//!
//! A replica `R` comes with:
//!
//! * the applied state (default `R.state`): the chain position after the last applied
//!   segment, the header facts of that segment (so the latest point can be listed
//!   without its undo journal), and whether the replica was rolled back for failover;
//! * the journal directory (default `R.journal/`): one undo file per applied segment
//!   ([`crate::journal`]), the views registry (`views/`), view scratch files
//!   (`scratch/`) and the `lock` taken by whoever writes the replica.
//!
//! The state file is `STATE_MAGIC ‖ bincode(ApplyState)`, replaced atomically. Earlier
//! formats are still read: `UBLKDRA2` (no key id of the last segment, so no retired
//! key is refused until the next segment is applied) and a file without a magic
//! (bincode of a bare [`ChainCursor`]: no facts about the last segment, so until the
//! next one is applied the latest position is not listed as a recovery point).

use crate::error::{Result, TargetError};
use changelog::uring::{write_file_atomic, Uring};
use changelog::{flags, ChainCursor, SegmentHeader, VolumeId};
use std::path::{Path, PathBuf};

/// First bytes of a state file in the current format. A legacy file starts with the
/// bincode length of the volume id (at most 32), so it can never start like this.
pub const STATE_MAGIC: [u8; 8] = *b"UBLKDRA3";

/// The magic of the format before key ids were kept.
const STATE_MAGIC_V2: [u8; 8] = *b"UBLKDRA2";

/// The paths that belong to one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaPaths {
    pub replica: PathBuf,
    pub state: PathBuf,
    pub journal: PathBuf,
}

impl ReplicaPaths {
    /// The defaults: `REPLICA.state` and `REPLICA.journal/`.
    pub fn new(replica: impl Into<PathBuf>) -> ReplicaPaths {
        let replica = replica.into();
        let with = |suffix: &str| PathBuf::from(format!("{}{suffix}", replica.display()));
        ReplicaPaths {
            state: with(".state"),
            journal: with(".journal"),
            replica,
        }
    }

    pub fn with_state(mut self, state: Option<PathBuf>) -> ReplicaPaths {
        if let Some(state) = state {
            self.state = state;
        }
        self
    }

    pub fn with_journal(mut self, journal: Option<PathBuf>) -> ReplicaPaths {
        if let Some(journal) = journal {
            self.journal = journal;
        }
        self
    }
}

/// What the catalog needs to know about one segment: which point it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PointFacts {
    /// The segment index, which is also the point's number.
    pub index: u64,
    pub first_seq: u64,
    /// The point is "every record with seq <= last_seq applied".
    pub last_seq: u64,
    /// When the shipper cut the segment (source clock), ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// The segment header's flags ([`changelog::flags`]).
    pub flags: u32,
}

impl PointFacts {
    pub fn from_header(header: &SegmentHeader) -> PointFacts {
        PointFacts {
            index: header.index,
            first_seq: header.first_seq,
            last_seq: header.last_seq,
            created_unix_ms: header.created_unix_ms,
            flags: header.flags,
        }
    }

    /// Whether the state after this segment is one the source could have had after a
    /// power cut (I3): only then is it a recovery point.
    pub fn is_crash_point(&self) -> bool {
        self.flags & flags::CRASH_POINT != 0
    }

    pub fn is_app_consistent(&self) -> bool {
        self.flags & flags::APP_CONSISTENT != 0
    }

    /// The first seq not included in this point.
    pub fn end_seq(&self) -> u64 {
        self.last_seq + 1
    }
}

/// The applier's persisted state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyState {
    /// The next segment to apply.
    pub cursor: ChainCursor,
    /// The last applied segment (`cursor.next_index - 1`), when known.
    pub last: Option<PointFacts>,
    /// Set when a rollback for failover started: the replica no longer follows the
    /// source and no further segment may be applied to it.
    pub rolled_back_to: Option<u64>,
    /// The id of the key that sealed the last applied segment, when known: a segment
    /// sealed with a key older than it (retired: earlier in the key file) is refused.
    pub key_id: Option<[u8; 8]>,
}

/// [`ApplyState`] as `UBLKDRA2` files hold it.
#[derive(serde::Deserialize)]
struct ApplyStateV2 {
    cursor: ChainCursor,
    last: Option<PointFacts>,
    rolled_back_to: Option<u64>,
}

impl ApplyState {
    pub fn start(volume: VolumeId) -> ApplyState {
        ApplyState {
            cursor: ChainCursor::start(volume),
            last: None,
            rolled_back_to: None,
            key_id: None,
        }
    }

    /// The index of the last applied segment, `None` before the first.
    pub fn latest(&self) -> Option<u64> {
        self.cursor.next_index.checked_sub(1)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = STATE_MAGIC.to_vec();
        bincode::serialize_into(&mut bytes, self).expect("state serializes");
        bytes
    }

    /// Decodes the current format, the one before, or the legacy bare cursor.
    pub fn decode(bytes: &[u8]) -> std::result::Result<ApplyState, String> {
        if let Some(rest) = bytes.strip_prefix(&STATE_MAGIC) {
            return bincode::deserialize(rest).map_err(|e| e.to_string());
        }
        if let Some(rest) = bytes.strip_prefix(&STATE_MAGIC_V2) {
            let v2: ApplyStateV2 = bincode::deserialize(rest).map_err(|e| e.to_string())?;
            return Ok(ApplyState {
                cursor: v2.cursor,
                last: v2.last,
                rolled_back_to: v2.rolled_back_to,
                key_id: None,
            });
        }
        bincode::deserialize::<ChainCursor>(bytes)
            .map(|cursor| ApplyState {
                cursor,
                last: None,
                rolled_back_to: None,
                key_id: None,
            })
            .map_err(|e| format!("neither the current nor an earlier format: {e}"))
    }

    /// Reads the state at `path`; `Ok(None)` when there is none yet. With `volume`,
    /// a state of another volume is refused.
    pub fn load(path: &Path, volume: Option<&VolumeId>) -> Result<Option<ApplyState>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TargetError::io(format!("reading {}", path.display()), e)),
        };
        let state = ApplyState::decode(&bytes).map_err(|what| TargetError::State {
            path: path.into(),
            what,
        })?;
        if let Some(volume) = volume.filter(|&v| *v != state.cursor.volume) {
            return Err(TargetError::State {
                path: path.into(),
                what: format!("it tracks volume {}, not {volume}", state.cursor.volume),
            });
        }
        Ok(Some(state))
    }

    /// Replaces the state at `path` atomically and durably.
    pub fn save(&self, uring: &mut Uring, path: &Path) -> Result<()> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("apply.state");
        write_file_atomic(uring, dir, name, &self.encode())
            .map_err(|e| TargetError::io(format!("saving {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_and_legacy_formats_decode() {
        let volume = VolumeId::new("vol0").unwrap();
        let mut state = ApplyState::start(volume.clone());
        state.cursor.next_index = 7;
        state.last = Some(PointFacts {
            index: 6,
            first_seq: 10,
            last_seq: 20,
            created_unix_ms: 5,
            flags: flags::CRASH_POINT,
        });
        state.rolled_back_to = Some(3);
        state.key_id = Some([9; 8]);
        assert_eq!(ApplyState::decode(&state.encode()).unwrap(), state);

        // The format before key ids: the same fields, without the last.
        let mut v2 = STATE_MAGIC_V2.to_vec();
        bincode::serialize_into(
            &mut v2,
            &(&state.cursor, &state.last, &state.rolled_back_to),
        )
        .unwrap();
        let before = ApplyState::decode(&v2).unwrap();
        assert_eq!(
            before,
            ApplyState {
                key_id: None,
                ..state.clone()
            }
        );

        let legacy = bincode::serialize(&state.cursor).unwrap();
        let old = ApplyState::decode(&legacy).unwrap();
        assert_eq!(old.cursor, state.cursor);
        assert_eq!((old.last, old.rolled_back_to), (None, None));
        assert!(ApplyState::decode(b"garbage").is_err());
    }

    #[test]
    fn default_paths() {
        let p = ReplicaPaths::new("/x/r.img");
        assert_eq!(p.state, Path::new("/x/r.img.state"));
        assert_eq!(p.journal, Path::new("/x/r.img.journal"));
    }
}
