//! Target stores: where sealed segments are kept until the recovery side applies them.
//!
//! A store holds immutable segment files per volume, named `<volume>/<index:016x>.seg`
//! so that names sort in chain order. Stores are untrusted: segments are authenticated
//! end to end, so a store can lose or damage data (detected) but not forge history.
//! `put` is idempotent for identical bytes, which makes re-uploads after a crash safe,
//! and refuses different bytes under an existing name.

use crate::error::{Error, Result};
use crate::uring::{write_file_atomic, Uring};
use crate::volume::VolumeId;
use std::path::{Path, PathBuf};

/// The file name of segment `index`.
pub fn segment_file_name(index: u64) -> String {
    format!("{index:016x}.seg")
}

/// Parses a segment file name back into its index.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

pub trait TargetStore: Send + Sync {
    /// Stores segment `index` of `volume` durably. Idempotent for identical bytes;
    /// [`Error::Conflict`] for different bytes under the same index.
    fn put(&self, volume: &VolumeId, index: u64, bytes: &[u8]) -> Result<()>;
    /// Reads segment `index`; `None` when absent.
    fn get(&self, volume: &VolumeId, index: u64) -> Result<Option<Vec<u8>>>;
    /// The indexes present for `volume`, ascending.
    fn list(&self, volume: &VolumeId) -> Result<Vec<u64>>;
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
    /// Name of one segment for messages.
    fn segment_name(&self, volume: &VolumeId, index: u64) -> String {
        format!("{}/{volume}/{}", self.describe(), segment_file_name(index))
    }
}

/// The embedded default store: a local (or mounted) directory.
#[derive(Clone, Debug)]
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    pub fn new(root: impl Into<PathBuf>) -> LocalDirStore {
        LocalDirStore { root: root.into() }
    }

    pub fn volume_dir(&self, volume: &VolumeId) -> PathBuf {
        self.root.join(volume.as_str())
    }

    pub fn segment_path(&self, volume: &VolumeId, index: u64) -> PathBuf {
        self.volume_dir(volume).join(segment_file_name(index))
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

impl TargetStore for LocalDirStore {
    fn put(&self, volume: &VolumeId, index: u64, bytes: &[u8]) -> Result<()> {
        let dir = self.volume_dir(volume);
        let path = self.segment_path(volume, index);
        if let Some(existing) = read_optional(&path)? {
            return if existing == bytes {
                Ok(())
            } else {
                Err(Error::Conflict {
                    segment: segment_file_name(index),
                    store: dir.display().to_string(),
                })
            };
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating store directory {}", dir.display()), e))?;
        let mut uring = Uring::new(4).map_err(|e| Error::io("setting up io_uring", e))?;
        write_file_atomic(&mut uring, &dir, &segment_file_name(index), bytes)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    fn get(&self, volume: &VolumeId, index: u64) -> Result<Option<Vec<u8>>> {
        read_optional(&self.segment_path(volume, index))
    }

    fn list(&self, volume: &VolumeId) -> Result<Vec<u64>> {
        list_segment_dir(&self.volume_dir(volume))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// The segment indexes in a directory, ascending; a missing directory is empty.
/// Temporary files and foreign names are skipped.
pub fn list_segment_dir(dir: &Path) -> Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut indexes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        if let Some(index) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            indexes.push(index);
        }
    }
    indexes.sort_unstable();
    Ok(indexes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(dir.path());
        let vol = VolumeId::new("v").unwrap();
        assert!(store.list(&vol).unwrap().is_empty());
        store.put(&vol, 2, b"two").unwrap();
        store.put(&vol, 0, b"zero").unwrap();
        store.put(&vol, 2, b"two").unwrap();
        assert!(matches!(
            store.put(&vol, 2, b"TWO"),
            Err(Error::Conflict { .. })
        ));
        std::fs::write(store.volume_dir(&vol).join("junk.txt"), b"x").unwrap();
        assert_eq!(store.list(&vol).unwrap(), vec![0, 2]);
        assert_eq!(store.get(&vol, 0).unwrap().unwrap(), b"zero");
        assert_eq!(store.get(&vol, 1).unwrap(), None);
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
    }
}
