//! Proving to the shipper which keys the recovery side holds (see [`changelog::key`]
//! for rotation as a whole).
//!
//! Contract:
//!
//! * [`publish_proofs`] leaves a `key-<id>.held` blob per key of the file in the
//!   volume's store area, each sealed with its own key, so the shipper moves to a new
//!   key only once this side can open what it seals. It never deletes one: a proof
//!   only ever moves a shipper forward, so one left by a key forgotten since is
//!   harmless, and an apply run with a stale or wrong key file must not withdraw the
//!   proofs of the right one. `apply --follow` publishes again every minute, in case
//!   the store lost them.

use crate::error::Result;
use changelog::{Key, TargetStore, VolumeId};

/// Writes a proof for every key of `key` that the store lacks one for. Returns how
/// many it wrote.
pub fn publish_proofs(store: &dyn TargetStore, volume: &VolumeId, key: &Key) -> Result<usize> {
    let names = store.list_blobs(volume)?;
    let mut written = 0;
    for id in key.ids() {
        let name = Key::proof_name(id);
        if names.contains(&name) {
            continue;
        }
        let proof = key
            .seal_proof(id, volume.as_str())
            .expect("the id is the file's")?;
        store.put_blob(volume, &name, &proof)?;
        log::info!(
            "volume {volume}: proved to the shipper that this side holds key {}",
            changelog::key::hex(&id)
        );
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use changelog::LocalDirStore;

    #[test]
    fn proofs_follow_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(dir.path().join("store"));
        let volume = VolumeId::new("vol0").unwrap();
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let id = |k| Key::from_bytes(k).id();
        let proofs = || {
            let mut names = store.list_blobs(&volume).unwrap();
            names.retain(|n| n.starts_with("key-"));
            names
        };
        assert_eq!(
            publish_proofs(&store, &volume, &Key::from_keys(vec![a, b])).unwrap(),
            2
        );
        assert_eq!(proofs().len(), 2);
        let proof = store
            .get_blob(&volume, &Key::proof_name(id(b)))
            .unwrap()
            .unwrap();
        assert!(Key::from_bytes(b).proves(id(b), "vol0", proof));
        // Nothing new: nothing written.
        assert_eq!(
            publish_proofs(&store, &volume, &Key::from_keys(vec![a, b])).unwrap(),
            0
        );
        // a forgotten, c added: c proved; a's proof stays (it only ever moves a
        // shipper forward), so a stale key file cannot withdraw a right one's proofs.
        let rotated = Key::from_keys(vec![b, c]);
        assert_eq!(publish_proofs(&store, &volume, &rotated).unwrap(), 1);
        let mut expected: Vec<String> = [a, b, c].map(|k| Key::proof_name(id(k))).to_vec();
        expected.sort();
        assert_eq!(proofs(), expected);
        let stranger = Key::from_bytes([4; 32]);
        assert_eq!(publish_proofs(&store, &volume, &stranger).unwrap(), 1);
        assert_eq!(proofs().len(), 4);
    }
}
