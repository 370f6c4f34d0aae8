//! The shipper's heartbeat: how the recovery side tells a quiet volume from a dead
//! protected site.
//!
//! Segments carry the time they were cut, so while a volume is written the newest
//! recovery point says how current the replica is. A volume nobody writes makes no
//! segments, and its newest point ages as if the source were gone. So a shipper that
//! has shipped everything writes a small blob, [`BLOB_NAME`], into the volume's store
//! area now and then: "at `unix_ms` every write captured was in the segments before
//! `next_index`, the last of which has digest `prev_digest`". A replica whose applied
//! position is exactly that (same index, same digest: the same history) was current at
//! `unix_ms`.
//!
//! Contract:
//!
//! * A heartbeat is written only when it is true: every record the ring had published
//!   by `unix_ms` is in a segment before `next_index`, and each of those is in the
//!   store (the shipper checks in that order, under its chain lock).
//! * It is sealed (AES-256-GCM, bound to the volume) with the key segments are sealed
//!   with: the store cannot forge one, and so cannot hide an outage. An old heartbeat
//!   put back only makes the replica look older.
//! * It only ever vouches for the exact position it names ([`Heartbeat::vouches_for`]):
//!   a replica behind it, ahead of it or on another history learns nothing from it.
//! * Times are the source's clock, as segment times are.

use crate::digests::{open_blob, seal_blob};
use crate::error::{Error, Result};
use crate::header::Digest32;
use crate::key::Key;
use crate::segment::ChainCursor;
use crate::volume::VolumeId;
use serde::{Deserialize, Serialize};

/// The heartbeat's object name in the volume's store area (one, replaced each time).
pub const BLOB_NAME: &str = "heartbeat";

/// What a caught-up shipper vouches for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// When (ms since the Unix epoch, source clock).
    pub unix_ms: u64,
    /// The chain position every write captured by then was shipped up to.
    pub next_index: u64,
    pub prev_digest: Digest32,
    /// How often the shipper writes one while caught up (ms): the recovery side's RPO
    /// threshold must leave room for it.
    pub interval_ms: u64,
}

impl Heartbeat {
    /// The heartbeat for a chain at `cursor` at `unix_ms`, from a shipper that writes
    /// one every `interval_ms`.
    pub fn at(cursor: &ChainCursor, unix_ms: u64, interval_ms: u64) -> Heartbeat {
        Heartbeat {
            unix_ms,
            next_index: cursor.next_index,
            prev_digest: cursor.prev_digest,
            interval_ms,
        }
    }

    /// Sealed for `volume`'s store area with `key`'s sealing key.
    pub fn seal(&self, key: &Key, volume: &VolumeId) -> Result<Vec<u8>> {
        let plain = bincode::serialize(self).expect("a heartbeat serializes");
        seal_blob(key, &aad(volume), &plain)
    }

    /// Opens `bytes` as `volume`'s heartbeat with one of `key`'s keys.
    pub fn open(key: &Key, volume: &VolumeId, bytes: Vec<u8>) -> Result<Heartbeat> {
        let plain = open_blob(key, &aad(volume), BLOB_NAME, bytes)?;
        bincode::deserialize(&plain).map_err(|e| Error::Corrupt {
            segment: BLOB_NAME.into(),
            what: format!("heartbeat does not decode: {e}"),
        })
    }

    /// Whether a replica applied up to `cursor` held everything captured by
    /// `unix_ms`: its position is exactly the one vouched for.
    pub fn vouches_for(&self, cursor: &ChainCursor) -> bool {
        cursor.next_index == self.next_index && cursor.prev_digest == self.prev_digest
    }
}

fn aad(volume: &VolumeId) -> Vec<u8> {
    format!("ublk-dr heartbeat v1 {volume}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(next_index: u64, digest: u8) -> ChainCursor {
        ChainCursor {
            next_index,
            prev_digest: [digest; 32],
            ..ChainCursor::start(VolumeId::new("vol0").unwrap())
        }
    }

    #[test]
    fn a_heartbeat_opens_only_for_its_volume_and_key() {
        let vol0 = VolumeId::new("vol0").unwrap();
        let vol1 = VolumeId::new("vol1").unwrap();
        let key = Key::from_keys(vec![[1; 32], [2; 32]]);
        let beat = Heartbeat::at(&cursor(7, 9), 1_700_000_000_000, 10_000);
        let sealed = beat.seal(&key, &vol0).unwrap();
        assert_eq!(Heartbeat::open(&key, &vol0, sealed.clone()).unwrap(), beat);
        // The recovery side may hold more keys, or only the sealing one.
        assert_eq!(
            Heartbeat::open(&Key::from_bytes([2; 32]), &vol0, sealed.clone()).unwrap(),
            beat
        );
        assert!(matches!(
            Heartbeat::open(&Key::from_bytes([1; 32]), &vol0, sealed.clone()),
            Err(Error::Auth { .. })
        ));
        assert!(Heartbeat::open(&key, &vol1, sealed.clone()).is_err());
        // The store changing a byte (a later time, say) breaks the tag.
        for at in [0, 20, sealed.len() - 1] {
            let mut forged = sealed.clone();
            forged[at] ^= 1;
            assert!(Heartbeat::open(&key, &vol0, forged).is_err(), "byte {at}");
        }
    }

    #[test]
    fn a_heartbeat_vouches_only_for_its_exact_position() {
        let beat = Heartbeat::at(&cursor(7, 9), 1, 10_000);
        assert!(beat.vouches_for(&cursor(7, 9)));
        assert!(!beat.vouches_for(&cursor(6, 9)), "behind");
        assert!(!beat.vouches_for(&cursor(8, 9)), "ahead");
        assert!(!beat.vouches_for(&cursor(7, 8)), "another history");
    }
}
