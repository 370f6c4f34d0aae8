//! Which key the shipper seals with (rotation as a whole: [`changelog::key`]).
//!
//! Contract:
//!
//! * The sealing key is the newest key of the key file that the recovery side has
//!   proved to hold (a `key-<id>.held` blob in the store that opens with that key), so
//!   nothing is sealed with a key the recovery side cannot open. A new key in the file
//!   waits, unused, until its proof appears.
//! * The choice only moves forward in the file, and it is saved in the staging
//!   directory (`sealing.key`, the id in hex) before a segment is sealed with it, so a
//!   restart while the store is unreachable goes on with the last proven key. With no
//!   saved choice, the key of the newest staged segment goes on. With neither (a new
//!   protection) and a file of several keys, the pipeline reads the proofs before it
//!   seals anything ([`SealingKey::is_a_guess`]); with no proof at all (the recovery
//!   side has not run yet) the file's oldest key seals, as a one-key file always has.
//! * A sealing key the file no longer has (forgotten while in use) is left only for
//!   the file's newest key, never for one in between, which may be older.
//! * The key file is read again on every [`SealingKey::refresh`] (the pipeline does so
//!   every few seconds) when it changed; one that does not load keeps the keys in
//!   force. A sealing key the file no longer has stays in use (from memory) until a
//!   newer one is proven.

use crate::error::{Result, ShipperError};
use changelog::key::{hex, parse_id, WatchedKeyFile};
use changelog::{Key, TargetStore, VolumeId};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file in the volume's staging directory that names the sealing key.
pub const SEALING_FILE: &str = "sealing.key";

pub struct SealingKey {
    volume: VolumeId,
    /// Where the choice is saved.
    saved: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The key file, read again when it changes (`None`: keys given in memory).
    file: Option<WatchedKeyFile>,
    /// Every key of the file.
    all: Key,
    /// The key that seals, alone.
    sealing: Key,
    /// `sealing` is the file's oldest key for want of anything better, not a choice.
    guess: bool,
}

impl SealingKey {
    /// The keys `all` (from `file`, if given) for `volume`, whose staging directory is
    /// `dir`: seals with the saved choice, else the newest staged segment's key, if
    /// the file has it; else the oldest key, as a guess.
    pub fn open(volume: &VolumeId, all: Key, file: Option<&Path>, dir: &Path) -> SealingKey {
        let saved = dir.join(SEALING_FILE);
        let chosen = std::fs::read_to_string(&saved)
            .ok()
            .and_then(|text| parse_id(text.trim()))
            .or_else(|| newest_staged_key(dir))
            .and_then(|id| all.only(id));
        let guess = chosen.is_none() && all.ids().len() > 1;
        let sealing = chosen.unwrap_or_else(|| all.only(all.ids()[0]).expect("a key file"));
        SealingKey {
            volume: volume.clone(),
            saved,
            inner: Mutex::new(Inner {
                file: file.map(|f| WatchedKeyFile::new(f, all.clone())),
                all,
                sealing,
                guess,
            }),
        }
    }

    /// Whether the sealing key is only a guess (the file's oldest of several, with no
    /// saved choice and nothing staged): the pipeline must [`SealingKey::refresh`]
    /// successfully before it seals anything.
    pub fn is_a_guess(&self) -> bool {
        self.inner.lock().expect("key lock").guess
    }

    /// The key that seals now.
    pub fn sealing(&self) -> Key {
        self.inner.lock().expect("key lock").sealing.clone()
    }

    /// Reads the key file again if it changed, then moves to the newest key newer than
    /// the sealing one that the store holds a proof for. Returns the new sealing key's
    /// id when it moved. Store errors are returned (the caller retries later).
    pub fn refresh(&self, store: &dyn TargetStore) -> Result<Option<[u8; 8]>> {
        self.reread_file();
        let (all, sealing) = {
            let inner = self.inner.lock().expect("key lock");
            (inner.all.clone(), inner.sealing.id())
        };
        let ids = all.ids();
        // Keys after the sealing one (only the newest if the sealing key is no longer
        // in the file: the ones in between may be older than it).
        let newer = match all.position(sealing) {
            Some(at) => &ids[at + 1..],
            None => &ids[ids.len() - 1..],
        };
        let proven = match newer {
            [] => None,
            _ => self.newest_proven(&all, newer, store)?,
        };
        let mut inner = self.inner.lock().expect("key lock");
        // The proofs were read: whatever came of them is a choice now.
        inner.guess = false;
        let Some(id) = proven else {
            return Ok(None);
        };
        self.save(id)?;
        inner.sealing = all.only(id).expect("in the file");
        log::info!(
            "volume {}: the recovery side holds key {}: sealing with it from now on",
            self.volume,
            hex(&id)
        );
        Ok(Some(id))
    }

    /// The newest of `candidates` (ids of `all`, oldest first) with a proof in the
    /// store that opens.
    fn newest_proven(
        &self,
        all: &Key,
        candidates: &[[u8; 8]],
        store: &dyn TargetStore,
    ) -> Result<Option<[u8; 8]>> {
        let names = store.list_blobs(&self.volume)?;
        for &id in candidates.iter().rev() {
            let name = Key::proof_name(id);
            if !names.contains(&name) {
                continue;
            }
            let Some(proof) = store.get_blob(&self.volume, &name)? else {
                continue;
            };
            if all.proves(id, self.volume.as_str(), proof) {
                return Ok(Some(id));
            }
            log::warn!(
                "volume {}: {name} in the store does not prove key {}: ignored",
                self.volume,
                hex(&id)
            );
        }
        Ok(None)
    }

    fn reread_file(&self) {
        let mut inner = self.inner.lock().expect("key lock");
        let who = format!("volume {}", self.volume);
        let Some(all) = inner.file.as_mut().and_then(|f| f.changed(&who)) else {
            return;
        };
        if !all.has(inner.sealing.id()) {
            log::warn!(
                "{who}: the key file no longer has the sealing key {}; it seals on from \
                 memory until the recovery side proves a newer one",
                hex(&inner.sealing.id())
            );
        }
        inner.all = all;
    }

    /// Saves `id` as the sealing key's, durably, before anything is sealed with it.
    fn save(&self, id: [u8; 8]) -> Result<()> {
        let dir = self.saved.parent().expect("in the staging directory");
        let mut uring = changelog::uring::Uring::new(2)
            .map_err(|e| ShipperError::io("setting up io_uring", e))?;
        changelog::uring::write_file_atomic(
            &mut uring,
            dir,
            SEALING_FILE,
            format!("{}\n", hex(&id)).as_bytes(),
        )
        .map_err(|e| ShipperError::io(format!("writing {}", self.saved.display()), e))
    }
}

/// The key id of the newest segment staged in `dir`, if any.
fn newest_staged_key(dir: &Path) -> Option<[u8; 8]> {
    let newest = changelog::store::list_segment_dir(dir)
        .ok()?
        .into_iter()
        .max()?;
    let path = dir.join(changelog::store::segment_file_name(newest));
    let mut head = vec![0u8; changelog::header::HEADER_LEN];
    std::io::Read::read_exact(&mut std::fs::File::open(path).ok()?, &mut head).ok()?;
    changelog::SegmentHeader::decode(&head, "staged")
        .ok()
        .map(|h| h.key_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use changelog::LocalDirStore;

    #[test]
    fn the_sealing_key_moves_forward_only_on_a_proof_and_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(dir.path().join("store"));
        let volume = VolumeId::new("vol0").unwrap();
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let id = |k| Key::from_bytes(k).id();
        let file = Key::from_keys(vec![a, b, c]);
        let keys = SealingKey::open(&volume, file.clone(), None, dir.path());
        assert!(keys.is_a_guess());
        assert_eq!(
            keys.sealing().id(),
            id(a),
            "no saved choice, no proof: the oldest"
        );
        assert_eq!(keys.refresh(&store).unwrap(), None);

        // A "proof" the store made up (sealed with another key) moves nothing.
        let forged = Key::from_bytes([9; 32])
            .seal_proof(id([9; 32]), "vol0")
            .unwrap()
            .unwrap();
        store
            .put_blob(&volume, &Key::proof_name(id(c)), &forged)
            .unwrap();
        assert_eq!(keys.refresh(&store).unwrap(), None);
        assert_eq!(keys.sealing().id(), id(a));

        // The recovery side proves b: the shipper moves to it, and remembers.
        let proof = file.seal_proof(id(b), "vol0").unwrap().unwrap();
        store
            .put_blob(&volume, &Key::proof_name(id(b)), &proof)
            .unwrap();
        assert_eq!(keys.refresh(&store).unwrap(), Some(id(b)));
        assert_eq!(keys.sealing().id(), id(b));
        assert_eq!(keys.refresh(&store).unwrap(), None);
        let again = SealingKey::open(&volume, file.clone(), None, dir.path());
        assert!(!again.is_a_guess());
        assert_eq!(again.sealing().id(), id(b));

        // Never back: a proof of a only is no reason to return to it.
        store.delete_blob(&volume, &Key::proof_name(id(b))).unwrap();
        let proof_a = file.seal_proof(id(a), "vol0").unwrap().unwrap();
        store
            .put_blob(&volume, &Key::proof_name(id(a)), &proof_a)
            .unwrap();
        assert_eq!(again.refresh(&store).unwrap(), None);
        assert_eq!(again.sealing().id(), id(b));
    }
}
