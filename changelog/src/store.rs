//! Target stores: where sealed segments are kept until the recovery side applies them.
//!
//! A store holds immutable segment files per volume, named `<volume>/<index:016x>.seg`
//! so that names sort in chain order. Stores are untrusted: segments are authenticated
//! end to end, so a store can lose or damage data (detected) but not forge history.
//! `put` is idempotent for identical bytes, which makes re-uploads after a crash safe,
//! and refuses different bytes under an existing name. Only the recovery side deletes
//! segments, the ones its replica has applied (`delete`), so a store does not grow
//! without end; a re-upload of a deleted one just puts it again.

use crate::error::{Error, Result};
use crate::uring::{sync_dir, write_file_atomic, Uring};
use crate::volume::VolumeId;
use std::path::{Path, PathBuf};

/// Removes `path`; absent is fine.
fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("deleting {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

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
    /// [`TargetStore::put`] for a segment whose `bytes` are also in `staged`, a complete
    /// and durable file that is never written again (the caller removes it after
    /// success). A store on the same file system may take the file itself instead of
    /// writing a copy; by default the bytes are put.
    fn put_staged(
        &self,
        volume: &VolumeId,
        index: u64,
        bytes: &[u8],
        _staged: &Path,
    ) -> Result<()> {
        self.put(volume, index, bytes)
    }
    /// Deletes segment `index` of `volume`; absent is fine.
    fn delete(&self, volume: &VolumeId, index: u64) -> Result<()>;
    /// Reads segment `index`; `None` when absent.
    fn get(&self, volume: &VolumeId, index: u64) -> Result<Option<Vec<u8>>>;
    /// Reads the first `len` bytes of segment `index` (all of it if shorter), e.g. its
    /// header; `None` when absent. By default the whole segment is read and cut.
    fn get_head(&self, volume: &VolumeId, index: u64, len: usize) -> Result<Option<Vec<u8>>> {
        Ok(self.get(volume, index)?.map(|mut bytes| {
            bytes.truncate(len);
            bytes
        }))
    }
    /// The indexes present for `volume`, ascending.
    fn list(&self, volume: &VolumeId) -> Result<Vec<u64>>;
    /// Stores a small named object of `volume` (not a segment; names are
    /// [`valid_blob_name`]), replacing any earlier one. Used for the resync digest
    /// exchange.
    fn put_blob(&self, volume: &VolumeId, name: &str, bytes: &[u8]) -> Result<()>;
    /// Reads a named object; `None` when absent.
    fn get_blob(&self, volume: &VolumeId, name: &str) -> Result<Option<Vec<u8>>>;
    /// Deletes a named object; absent is fine.
    fn delete_blob(&self, volume: &VolumeId, name: &str) -> Result<()>;
    /// The names of `volume`'s objects, sorted.
    fn list_blobs(&self, volume: &VolumeId) -> Result<Vec<String>>;
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

    /// Hard-links the staged file into the store when both share a file system: the
    /// segment is not written a second time (on the embedded default, staging and store
    /// often share a disk). Anything else, or a name already taken (checked as `put`
    /// does), goes through `put`.
    fn put_staged(&self, volume: &VolumeId, index: u64, bytes: &[u8], staged: &Path) -> Result<()> {
        let dir = self.volume_dir(volume);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating store directory {}", dir.display()), e))?;
        let path = self.segment_path(volume, index);
        if std::fs::hard_link(staged, &path).is_err() {
            // Another file system (EXDEV), no hard links there, or the name exists.
            return self.put(volume, index, bytes);
        }
        let mut uring = Uring::new(2).map_err(|e| Error::io("setting up io_uring", e))?;
        sync_dir(&mut uring, &dir).map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
    }

    fn delete(&self, volume: &VolumeId, index: u64) -> Result<()> {
        remove_if_present(&self.segment_path(volume, index))
    }

    fn get(&self, volume: &VolumeId, index: u64) -> Result<Option<Vec<u8>>> {
        read_optional(&self.segment_path(volume, index))
    }

    fn get_head(&self, volume: &VolumeId, index: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let path = self.segment_path(volume, index);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
        };
        let mut head = Vec::with_capacity(len);
        std::io::Read::read_to_end(&mut std::io::Read::take(file, len as u64), &mut head)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(Some(head))
    }

    fn list(&self, volume: &VolumeId) -> Result<Vec<u64>> {
        list_segment_dir(&self.volume_dir(volume))
    }

    fn put_blob(&self, volume: &VolumeId, name: &str, bytes: &[u8]) -> Result<()> {
        check_blob_name(name)?;
        let dir = self.volume_dir(volume);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating store directory {}", dir.display()), e))?;
        let mut uring = Uring::new(4).map_err(|e| Error::io("setting up io_uring", e))?;
        write_file_atomic(&mut uring, &dir, name, bytes)
            .map_err(|e| Error::io(format!("writing {}", dir.join(name).display()), e))
    }

    fn get_blob(&self, volume: &VolumeId, name: &str) -> Result<Option<Vec<u8>>> {
        check_blob_name(name)?;
        read_optional(&self.volume_dir(volume).join(name))
    }

    fn delete_blob(&self, volume: &VolumeId, name: &str) -> Result<()> {
        check_blob_name(name)?;
        remove_if_present(&self.volume_dir(volume).join(name))
    }

    fn list_blobs(&self, volume: &VolumeId) -> Result<Vec<String>> {
        let dir = self.volume_dir(volume);
        let mut names =
            file_names(&dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        names.retain(|n| valid_blob_name(n));
        Ok(names)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// Blob names: 1–64 of `[a-z0-9.-]`, not starting with a dot (temporary files do) and
/// not a segment name.
pub fn valid_blob_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && parse_segment_file_name(name).is_none()
}

fn check_blob_name(name: &str) -> Result<()> {
    if valid_blob_name(name) {
        Ok(())
    } else {
        Err(Error::io(
            format!("store object name {name:?}"),
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ))
    }
}

/// The names of the entries of `dir`, sorted; a missing directory has none, and names
/// that are not UTF-8 (never ours) are skipped. Every listing of this project's
/// directories (segments, blobs, undo journals, view registrations) goes through here.
pub fn file_names(dir: &Path) -> std::io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        if let Ok(name) = entry?.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// The segment indexes in a directory, ascending; a missing directory is empty.
/// Temporary files and foreign names are skipped.
pub fn list_segment_dir(dir: &Path) -> Result<Vec<u64>> {
    let names = file_names(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    let mut indexes: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_segment_file_name(n))
        .collect();
    indexes.sort_unstable();
    Ok(indexes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_segment_is_linked_not_copied_and_stays_idempotent() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(dir.path().join("store"));
        let vol = VolumeId::new("v").unwrap();
        let staged = dir.path().join("staged.seg");
        std::fs::write(&staged, b"sealed").unwrap();
        store.put_staged(&vol, 7, b"sealed", &staged).unwrap();
        let stored = store.segment_path(&vol, 7);
        assert_eq!(
            std::fs::metadata(&stored).unwrap().ino(),
            std::fs::metadata(&staged).unwrap().ino(),
            "same file system: the staged file itself is in the store"
        );
        // A re-upload after a crash (staged file not yet removed) is a no-op; different
        // bytes under the same index are refused, linked or not.
        store.put_staged(&vol, 7, b"sealed", &staged).unwrap();
        let other = dir.path().join("other.seg");
        std::fs::write(&other, b"forged").unwrap();
        assert!(matches!(
            store.put_staged(&vol, 7, b"forged", &other),
            Err(Error::Conflict { .. })
        ));
        std::fs::remove_file(&staged).unwrap();
        assert_eq!(store.get(&vol, 7).unwrap().unwrap(), b"sealed");
    }

    #[test]
    fn a_staged_segment_on_another_file_system_is_copied() {
        use std::os::unix::fs::MetadataExt;
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let disk = tempfile::tempdir_in("/var/tmp").unwrap();
        let staged = shm.path().join("staged.seg");
        std::fs::write(&staged, b"sealed").unwrap();
        let store = LocalDirStore::new(disk.path());
        let vol = VolumeId::new("v").unwrap();
        store.put_staged(&vol, 1, b"sealed", &staged).unwrap();
        let stored = std::fs::metadata(store.segment_path(&vol, 1)).unwrap();
        if stored.dev() != std::fs::metadata(&staged).unwrap().dev() {
            assert_eq!(stored.nlink(), 1, "written as a copy");
        }
        std::fs::remove_file(&staged).unwrap();
        assert_eq!(store.get(&vol, 1).unwrap().unwrap(), b"sealed");
    }

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
        store.put_blob(&vol, "digests-1.req", b"r").unwrap();
        store.put_blob(&vol, "digests-1.req", b"r2").unwrap();
        assert_eq!(
            store.get_blob(&vol, "digests-1.req").unwrap().unwrap(),
            b"r2"
        );
        assert_eq!(
            store.list_blobs(&vol).unwrap(),
            vec!["digests-1.req", "junk.txt"]
        );
        assert_eq!(
            store.list(&vol).unwrap(),
            vec![0, 2],
            "blobs are not segments"
        );
        assert!(store.put_blob(&vol, "../x", b"").is_err());
        assert!(store.put_blob(&vol, &segment_file_name(3), b"").is_err());
        store.delete_blob(&vol, "digests-1.req").unwrap();
        store.delete_blob(&vol, "digests-1.req").unwrap();
        assert_eq!(store.get_blob(&vol, "digests-1.req").unwrap(), None);
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
    }
}
