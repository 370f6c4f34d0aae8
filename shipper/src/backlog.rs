//! The staged-backlog limit: when the segments durable in staging but not yet in the
//! store (the target store is down for long) exceed `backlog_resync_percent` of the
//! disk (50 by default, as Azure Site Recovery does), the shipper drops them and
//! resyncs the whole disk by digest instead of letting staging grow without bound.
//!
//! # What a drop does
//!
//! Staged segments `k ..= n` are not in the store; segment `k - 1` is (or `k = 0`).
//! The drop deletes `k ..= n` and rewinds the chain so the next segment is index `k`,
//! linked to the digest of `k - 1` (the previous digest in `k`'s header), with the
//! same next seq as before the drop (new records have higher seqs anyway, so the seq
//! floor stays monotonic). It asks the producer for a whole-disk digest resync first:
//! from the request until its done MARK the stream claims no crash point (I7), and the
//! comparison finds every block the dropped records changed — the replica's digests
//! are taken after it applied a continuation segment, so they describe a replica
//! without the dropped records, and any block where that differs from the source is
//! re-sent.
//!
//! # Why a new epoch
//!
//! Segments `k ..= n` were sealed with nonces `epoch ‖ k ..= n`. Sealing different
//! records as index `k` under the same epoch would repeat a nonce under the key, which
//! breaks AES-GCM (it leaks the XOR of both plaintexts and the authentication key).
//! So the continuation runs under a fresh random epoch; its first segment carries
//! [`changelog::flags::NEW_EPOCH`], which the verifier accepts only at the next index
//! and linked to the digest it applied last ([`changelog::ChainCursor::check`]). The
//! flag is in the authenticated header, and the link covers the previous segment's
//! epoch, so a segment of another protection stays a foreign epoch.
//!
//! # Doing it safely
//!
//! The reader starts a drop (it assigns indexes and epochs). It first stops cutting and
//! waits until the stager has staged every segment it cut, so no sealed segment of the
//! old numbering is in flight. Then it takes the stager's cursor lock (nothing is being
//! staged) and the upload lock, which the uploader holds around every upload attempt
//! (nothing is being uploaded, and whatever is in staging is exactly what the store
//! does not have). If what is staged then no longer exceeds the limit (the store came
//! back while the reader waited), it drops nothing: a whole-disk resync would be
//! wasted. Otherwise, under both locks, it bumps the drop generation: every staged segment
//! handed to the uploader carries the generation it was staged under, and the uploader
//! skips the older ones (their files are gone) instead of uploading them.
//!
//! On disk, in the volume's staging directory, in this order:
//!
//! 1. `resync.owed` (JSON, [`crate::status::BacklogDrop`]) is saved, and the resync is
//!    asked for in the ring header.
//! 2. `rewind.state` is saved: the continuation's chain position.
//! 3. Every staged segment from `k` on is deleted, and the directory synced.
//! 4. `chain.state` is saved as the continuation's position.
//! 5. `rewind.state` is deleted, and the directory synced. Only then does staging go on.
//!
//! A crash (of the shipper or the host) anywhere leaves one of these states:
//!
//! * before 2: the staged segments and `chain.state` are untouched; a restart uploads
//!   them or, if the backlog is still over the limit, drops again. A `resync.owed`
//!   left behind only costs a resync that was not needed.
//! * from 2 to 5: `rewind.state` exists. [`finish_interrupted`] (run by
//!   [`crate::chain_state::recover`] before anything else) deletes the staged segments
//!   from its index on again (none of the continuation exists yet: step 5 comes
//!   first), saves it as `chain.state` and deletes it. Every step is idempotent.
//! * after 5: `chain.state` is the continuation; staged continuation segments are
//!   rolled forward as usual.
//!
//! `resync.owed` stays until the stager stages a crash-point segment after the drop:
//! the reader flags one only after it read the done MARK of a resync that was asked
//! for after the drop (a resync still pending when it reads an older done MARK keeps
//! it inconsistent). A starting shipper that finds `resync.owed` while the ring has no
//! digest resync pending (a host crash lost the shared-memory ring with its request)
//! asks again. The ring records of the dropped segments were released when they were
//! staged, and the activity log cooled their extents then; the digest resync is what
//! covers them, so it must not be lost.
//!
//! One case is refused rather than repaired: an upload that reported a failure but
//! landed in the store leaves there a segment `k` of the old epoch; the continuation's
//! `k` then conflicts, and the volume goes Critical with a message saying so (the store
//! must lose that segment by hand, and the replica needs the resync anyway).

use crate::chain_state;
use crate::error::{Result, ShipperError};
use crate::pipeline::ShipperConfig;
use crate::status::BacklogDrop;
use blkfilter::ring::Consumer;
use changelog::store::{list_segment_dir, segment_file_name};
use changelog::uring::{sync_dir, write_file_atomic, Uring};
use changelog::{unix_ms_now, ChainCursor, VolumeId};
use std::path::Path;

/// The continuation's chain position while a drop is under way.
pub const REWIND_FILE: &str = "rewind.state";
/// A whole-disk digest resync is owed for a dropped backlog.
pub const OWED_FILE: &str = "resync.owed";
/// The index of the continuation's first segment, which must announce the new epoch
/// (`NEW_EPOCH`). Kept on disk so a shipper restarted before cutting that segment still
/// announces it; harmless afterwards (the reader announces only at that exact index).
pub const ANNOUNCE_FILE: &str = "epoch.announce";

/// Default `backlog_resync_percent`.
pub const DEFAULT_PERCENT: u32 = 50;

/// The staged bytes above which the backlog is dropped; `None` when never (0 %).
pub fn limit_bytes(percent: u32, device_bytes: u64) -> Option<u64> {
    (percent > 0).then(|| (u128::from(device_bytes) * u128::from(percent) / 100) as u64)
}

/// Checks a `backlog_resync_percent`.
pub fn check_percent(percent: u32) -> std::result::Result<u32, String> {
    if percent <= 100 {
        Ok(percent)
    } else {
        Err(format!(
            "backlog_resync_percent must be from 0 (never drop the staged backlog) to 100, not {percent}"
        ))
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ShipperError {
    move |e| ShipperError::io(what, e)
}

/// What was dropped.
pub(crate) struct Dropped {
    pub continuation: ChainCursor,
    pub record: BacklogDrop,
}

/// What [`drop_staged`] did.
pub(crate) enum DropResult {
    /// Nothing: what is staged now (`bytes`) is within `limit` — the uploader caught
    /// up between the check that called for the drop and the locks (the store came
    /// back), and a whole-disk resync would be wasted.
    WithinLimit {
        bytes: u64,
    },
    Dropped(Dropped),
}

/// Steps 1 to 5 of a drop (see the module docs), if the staged segments still exceed
/// `limit` bytes. The caller holds the stager's cursor (`cursor`, the position after
/// the newest staged segment) and the upload lock.
pub(crate) fn drop_staged(
    config: &ShipperConfig,
    dir: &Path,
    ring: &Consumer,
    cursor: &ChainCursor,
    limit: u64,
    oldest_lost_unix_ms: u64,
) -> Result<DropResult> {
    let staged = list_segment_dir(dir)?;
    let mut bytes = 0u64;
    for &index in &staged {
        let path = dir.join(segment_file_name(index));
        bytes += std::fs::metadata(&path)
            .map_err(io_err(format!("reading {}", path.display())))?
            .len();
    }
    let first = match staged.first() {
        Some(&first) if bytes > limit => first,
        _ => return Ok(DropResult::WithinLimit { bytes }),
    };
    let path = dir.join(segment_file_name(first));
    let head = std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
    let info = changelog::read_info(&head, &path.display().to_string())?;
    let epoch = fresh_epoch(&[info.header.epoch, cursor.epoch.unwrap_or(0)])?;
    let continuation = ChainCursor {
        volume: cursor.volume.clone(),
        epoch: Some(epoch),
        next_index: first,
        prev_digest: info.header.prev_digest,
        next_seq: cursor.next_seq,
    };
    let device_bytes = ring.geometry().device_bytes;
    let record = BacklogDrop {
        at_unix_ms: unix_ms_now(),
        segments: staged.len() as u64,
        bytes,
        limit_percent: config.backlog_resync_percent,
        device_bytes,
        continue_index: first,
        epoch,
        oldest_lost_unix_ms,
    };
    let mut uring = Uring::new(2).map_err(io_err("io_uring setup".into()))?;
    // 1.
    let json = serde_json::to_vec_pretty(&record).expect("drop record serializes");
    write_file_atomic(&mut uring, dir, OWED_FILE, &json)
        .map_err(io_err(format!("writing {}", dir.join(OWED_FILE).display())))?;
    ring.request_digest_resync(config.resync_block_bytes);
    // 2.
    let state = bincode::serialize(&continuation).expect("cursor serializes");
    write_file_atomic(&mut uring, dir, REWIND_FILE, &state).map_err(io_err(format!(
        "writing {}",
        dir.join(REWIND_FILE).display()
    )))?;
    // 3. to 5.
    rewind(&mut uring, dir, &continuation)?;
    log::warn!(
        "volume {}: staged backlog of {bytes} bytes exceeded {}% of the {device_bytes}-byte disk: dropped segments {first:016x}..={:016x}; the chain continues at {first:016x} in epoch {epoch:016x}; whole-disk digest resync asked for",
        config.volume,
        config.backlog_resync_percent,
        staged.last().expect("not empty"),
    );
    Ok(DropResult::Dropped(Dropped {
        continuation,
        record,
    }))
}

/// Steps 3 to 5: delete the staged segments from the continuation's index on, save it
/// as the chain position, delete the rewind file. Idempotent.
fn rewind(uring: &mut Uring, dir: &Path, continuation: &ChainCursor) -> Result<()> {
    for index in list_segment_dir(dir)?
        .into_iter()
        .filter(|&i| i >= continuation.next_index)
    {
        let path = dir.join(segment_file_name(index));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ShipperError::io(format!("removing {}", path.display()), e)),
        }
    }
    sync_dir(uring, dir).map_err(io_err(format!("syncing {}", dir.display())))?;
    let index = continuation.next_index.to_string();
    write_file_atomic(uring, dir, ANNOUNCE_FILE, index.as_bytes()).map_err(io_err(format!(
        "writing {}",
        dir.join(ANNOUNCE_FILE).display()
    )))?;
    chain_state::save(uring, dir, continuation)?;
    let path = dir.join(REWIND_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ShipperError::io(format!("removing {}", path.display()), e)),
    }
    sync_dir(uring, dir).map_err(io_err(format!("syncing {}", dir.display())))
}

/// Whether the segment with `index` must announce a new epoch: it is the first of a
/// continuation after a drop (see [`ANNOUNCE_FILE`]).
pub fn must_announce(dir: &Path, index: u64) -> bool {
    std::fs::read_to_string(dir.join(ANNOUNCE_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        == Some(index)
}

/// Finishes a drop a crash interrupted between steps 2 and 5; true if there was one.
pub fn finish_interrupted(dir: &Path, volume: &VolumeId) -> Result<bool> {
    let path = dir.join(REWIND_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(ShipperError::io(format!("reading {}", path.display()), e)),
    };
    let continuation: ChainCursor =
        bincode::deserialize(&bytes).map_err(|e| ShipperError::State {
            path: path.clone(),
            what: e.to_string(),
        })?;
    if &continuation.volume != volume {
        return Err(ShipperError::State {
            path,
            what: format!("it belongs to volume {}, not {volume}", continuation.volume),
        });
    }
    log::warn!(
        "volume {volume}: finishing a backlog drop interrupted by a crash: staged segments from {:016x} on are dropped",
        continuation.next_index
    );
    let mut uring = Uring::new(2).map_err(io_err("io_uring setup".into()))?;
    rewind(&mut uring, dir, &continuation)?;
    Ok(true)
}

/// The drop a whole-disk resync is still owed for, if any.
pub fn owed(dir: &Path) -> Result<Option<BacklogDrop>> {
    let path = dir.join(OWED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ShipperError::State {
                path,
                what: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ShipperError::io(format!("reading {}", path.display()), e)),
    }
}

/// The resync after a drop has completed (a crash point is staged): nothing is owed.
pub(crate) fn settle(uring: &mut Uring, dir: &Path) -> Result<()> {
    let path = dir.join(OWED_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ShipperError::io(format!("removing {}", path.display()), e)),
    }
    sync_dir(uring, dir).map_err(io_err(format!("syncing {}", dir.display())))
}

/// A random epoch that is none of `used`.
fn fresh_epoch(used: &[u64]) -> Result<u64> {
    loop {
        let mut epoch = [0u8; 8];
        getrandom::getrandom(&mut epoch)
            .map_err(|e| ShipperError::io("random epoch", std::io::Error::other(e.to_string())))?;
        let epoch = u64::from_le_bytes(epoch);
        if !used.contains(&epoch) {
            return Ok(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use changelog::segment::{seal, PlainSegment, SealParams};
    use changelog::{Key, Op, RecordRef};

    fn volume() -> VolumeId {
        VolumeId::new("vol0").unwrap()
    }

    /// Stages segments 0..count of epoch 7 the way the stager does; returns the
    /// cursor after each.
    fn stage(dir: &Path, key: &Key, count: u64) -> Vec<ChainCursor> {
        let mut uring = Uring::new(2).unwrap();
        let mut cursor = ChainCursor {
            epoch: Some(7),
            ..ChainCursor::start(volume())
        };
        let mut after = Vec::new();
        for index in 0..count {
            let mut plain = PlainSegment::default();
            plain.push(&RecordRef {
                seq: 10 * index + 1,
                op: Op::Write,
                flags: 0,
                offset: 0,
                len: 4,
                data: b"abcd",
            });
            let params = SealParams {
                volume: volume(),
                epoch: 7,
                index,
                created_unix_ms: 1,
            };
            let linked = seal(&plain, &params, key).unwrap().link(cursor.prev_digest);
            write_file_atomic(&mut uring, dir, &segment_file_name(index), &linked.bytes).unwrap();
            cursor.advance(&linked.header, linked.digest);
            after.push(cursor.clone());
        }
        after
    }

    #[test]
    fn limits() {
        assert_eq!(limit_bytes(0, 1 << 30), None);
        assert_eq!(limit_bytes(50, 4 << 20), Some(2 << 20));
        assert_eq!(limit_bytes(100, u64::MAX), Some(u64::MAX));
        assert!(check_percent(100).is_ok());
        assert!(check_percent(101).unwrap_err().contains("0 (never"));
    }

    /// The uploader can bring staging back within the limit between the check that
    /// calls for a drop and the locks the drop takes (the store came back): then
    /// nothing is dropped and no resync is asked for. Beyond the limit, it drops.
    #[test]
    fn a_backlog_back_within_the_limit_is_not_dropped() {
        use blkfilter::ring::{Consumer, Producer, RingGeometry};
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let key = Key::from_bytes([1; 32]);
        let after = stage(&staging, &key, 4);
        let ring_path = dir.path().join("ring");
        let _producer = Producer::create(&ring_path, &RingGeometry::new(1 << 20, 4 << 20)).unwrap();
        let ring = Consumer::open(&ring_path).unwrap();
        let config = ShipperConfig::new(volume(), ring_path, dir.path().into(), key);
        let staged: u64 = (0..4)
            .map(|i| {
                std::fs::metadata(staging.join(segment_file_name(i)))
                    .unwrap()
                    .len()
            })
            .sum();
        match drop_staged(&config, &staging, &ring, &after[3], staged, 1).unwrap() {
            DropResult::WithinLimit { bytes } => assert_eq!(bytes, staged),
            DropResult::Dropped(_) => panic!("dropped a backlog within the limit"),
        }
        assert_eq!(list_segment_dir(&staging).unwrap(), vec![0, 1, 2, 3]);
        assert!(!staging.join(OWED_FILE).exists());
        assert!(!ring.resync_progress().pending());

        match drop_staged(&config, &staging, &ring, &after[3], staged - 1, 1).unwrap() {
            DropResult::Dropped(dropped) => assert_eq!(dropped.record.bytes, staged),
            DropResult::WithinLimit { .. } => panic!("kept a backlog over the limit"),
        }
        assert!(list_segment_dir(&staging).unwrap().is_empty());
        assert!(staging.join(OWED_FILE).exists());
        assert!(ring.resync_progress().pending());
    }

    /// A crash after the rewind file was saved, with some or all of the dropped
    /// segments still in staging and `chain.state` at the old position: the restart
    /// finishes the drop and continues from the continuation's position.
    #[test]
    fn a_drop_interrupted_by_a_crash_is_finished_on_restart() {
        for deleted_before_crash in [0, 2, 4] {
            let dir = tempfile::tempdir().unwrap();
            let key = Key::from_bytes([1; 32]);
            let after = stage(dir.path(), &key, 6);
            let mut uring = Uring::new(2).unwrap();
            chain_state::save(&mut uring, dir.path(), &after[5]).unwrap();
            // Segments 0 and 1 were uploaded and removed; 2..=5 are the backlog.
            for index in 0..2 {
                std::fs::remove_file(dir.path().join(segment_file_name(index))).unwrap();
            }
            let continuation = ChainCursor {
                epoch: Some(8),
                ..after[1].clone()
            };
            let continuation = ChainCursor {
                next_seq: after[5].next_seq,
                ..continuation
            };
            write_file_atomic(
                &mut uring,
                dir.path(),
                REWIND_FILE,
                &bincode::serialize(&continuation).unwrap(),
            )
            .unwrap();
            for index in (2..6).rev().take(deleted_before_crash) {
                std::fs::remove_file(dir.path().join(segment_file_name(index))).unwrap();
            }

            let cursor = chain_state::recover(dir.path(), &volume(), &key).unwrap();
            assert_eq!(cursor, continuation, "deleted {deleted_before_crash}");
            assert!(list_segment_dir(dir.path()).unwrap().is_empty());
            assert!(!dir.path().join(REWIND_FILE).exists());
            // A run that starts now announces the new epoch on the continuation's first
            // segment, and only there.
            assert!(must_announce(dir.path(), continuation.next_index));
            assert!(!must_announce(dir.path(), continuation.next_index + 1));
            // And again: nothing left to do.
            assert!(!finish_interrupted(dir.path(), &volume()).unwrap());
            assert_eq!(
                chain_state::recover(dir.path(), &volume(), &key).unwrap(),
                continuation
            );
        }
    }

    #[test]
    fn a_foreign_rewind_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut uring = Uring::new(2).unwrap();
        let other = ChainCursor::start(VolumeId::new("vol1").unwrap());
        write_file_atomic(
            &mut uring,
            dir.path(),
            REWIND_FILE,
            &bincode::serialize(&other).unwrap(),
        )
        .unwrap();
        let err = finish_interrupted(dir.path(), &volume()).unwrap_err();
        assert!(err.to_string().contains("vol1"), "{err}");
    }
}
