//! The recovery side of a digest resync: answer the protected side's requests for the
//! replica's block digests (format and exchange in [`changelog::digests`]).
//!
//! A request is answered only once the replica holds every record up to its
//! `need_seq` (the producer's resync-begin MARK), so the digests describe a replica at
//! least that new; the protected side's comparison relies on that. Requests stay until
//! the shipper takes the answer and removes both.

use crate::error::{Result, TargetError};
use changelog::digests::{
    answer_name, block_count, file_digests_of, parse_request_name, BlockRuns, DigestAnswer,
    DigestRequest,
};
use changelog::{Key, TargetStore, VolumeId};
use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

/// How requests are answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AnswerMode {
    /// The replica's real block digests: only differing blocks are sent
    /// ("minimize downtime").
    #[default]
    Compare,
    /// Digests no block can have (all bits set; no SHA-256 preimage is known), so the
    /// protected side sends every block: failback's "full download", or a replica that
    /// cannot be trusted. The replica is not even read.
    FullDownload,
}

/// Largest device a request may describe (1 PiB): a bound against absurd requests.
const MAX_DEVICE_BYTES: u64 = 1 << 50;

/// Answers every pending request whose `need_seq` is below `applied_next_seq` (the
/// first seq not applied to `replica`), sealed with the key the request names. A
/// request naming a key older in `key`'s file than `last_key` (the key of the last
/// applied segment) is not answered: the shipper has moved past it, so the request is
/// not the shipper's. Returns how many it answered.
pub fn answer_requests(
    store: &dyn TargetStore,
    volume: &VolumeId,
    key: &Key,
    last_key: Option<[u8; 8]>,
    replica: &Path,
    applied_next_seq: u64,
    mode: AnswerMode,
) -> Result<usize> {
    let names = store.list_blobs(volume)?;
    let mut answered = 0;
    for name in &names {
        let Some(gen) = parse_request_name(name) else {
            continue;
        };
        if names.contains(&answer_name(gen)) {
            continue; // answered; the shipper has not collected it yet
        }
        let Some(bytes) = store.get_blob(volume, name)? else {
            continue;
        };
        let request: DigestRequest = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("volume {volume}: ignoring unreadable digest request {name}: {e}");
                continue;
            }
        };
        let block_ok = request.block_bytes.is_power_of_two()
            && (4096..=(1 << 20)).contains(&request.block_bytes);
        if request.gen != gen || !block_ok || request.device_bytes > MAX_DEVICE_BYTES {
            log::warn!("volume {volume}: ignoring malformed digest request {name}: {request:?}");
            continue;
        }
        let all_blocks = block_count(request.device_bytes, request.block_bytes);
        let blocks = match request.blocks.clone().map(|b| b.check(all_blocks)) {
            None => BlockRuns::whole(request.device_bytes, request.block_bytes),
            Some(Ok(blocks)) => blocks,
            Some(Err(e)) => {
                log::warn!("volume {volume}: ignoring malformed digest request {name}: {e}");
                continue;
            }
        };
        let sealing = match &request.key_id {
            None => key.clone(),
            Some(id) => {
                let asked = changelog::key::parse_id(id);
                let retired = asked
                    .zip(last_key)
                    .is_some_and(|(asked, last)| key.is_retired_by(asked, last));
                match asked.and_then(|id| key.only(id)) {
                    Some(_) if retired => {
                        warn_once(volume, gen, || {
                            format!(
                                "digest request {name} asks for an answer sealed with key \
                                 {id}, retired before the key of the segments applied: not \
                                 the shipper's request, not answered"
                            )
                        });
                        continue;
                    }
                    Some(key) => key,
                    None => {
                        warn_once(volume, gen, || {
                            format!(
                                "digest request {name} asks for an answer sealed with key \
                                 {id}, which the key file lacks (it has {}): copy the \
                                 protected side's key file here",
                                key.describe_ids()
                            )
                        });
                        continue;
                    }
                }
            }
        };
        if request.need_seq >= applied_next_seq {
            log::debug!(
                "volume {volume}: digest request {gen:016x} waits for seq {} to be applied",
                request.need_seq
            );
            continue;
        }
        let started = std::time::Instant::now();
        let digests = match mode {
            AnswerMode::Compare => {
                let file = File::open(replica).map_err(|e| {
                    TargetError::io(format!("opening replica {}", replica.display()), e)
                })?;
                file_digests_of(
                    &file,
                    request.device_bytes,
                    request.block_bytes,
                    &blocks,
                    |_| {},
                )
                .map_err(|e| TargetError::io(format!("reading replica {}", replica.display()), e))?
            }
            AnswerMode::FullDownload => vec![[0xff; 32]; blocks.len() as usize],
        };
        let answer = DigestAnswer {
            gen,
            block_bytes: request.block_bytes,
            device_bytes: request.device_bytes,
            blocks: request.blocks,
            digests,
        };
        store.put_blob(
            volume,
            &answer_name(gen),
            &answer.seal(&sealing, volume.as_str())?,
        )?;
        log::info!(
            "volume {volume}: answered digest request {gen:016x}: {} blocks of {} bytes in {:.1} s",
            answer.digests.len(),
            request.block_bytes,
            started.elapsed().as_secs_f64()
        );
        answered += 1;
    }
    Ok(answered)
}

/// Logs `what` about request `gen` of `volume` once per process: requests are looked
/// at on every poll.
fn warn_once(volume: &VolumeId, gen: u64, what: impl FnOnce() -> String) {
    static WARNED: Mutex<BTreeSet<(String, u64)>> = Mutex::new(BTreeSet::new());
    let mut warned = WARNED.lock().expect("warned lock");
    if warned.insert((volume.to_string(), gen)) {
        log::warn!("volume {volume}: {}", what());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use changelog::digests::request_name;
    use changelog::key::hex;
    use changelog::LocalDirStore;

    /// Asks for the digests of a 2-block replica with `key_id`, answers with `key`
    /// after a segment sealed with `last_key` was applied, and returns the sealed
    /// answer, if one was written.
    fn answer_for(key_id: Option<String>, key: &Key, last_key: Option<[u8; 8]>) -> Option<Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let replica = dir.path().join("replica");
        std::fs::write(&replica, vec![3u8; 8192]).unwrap();
        let store = LocalDirStore::new(dir.path().join("store"));
        let volume = VolumeId::new("vol0").unwrap();
        let request = DigestRequest {
            gen: 5,
            need_seq: 5,
            block_bytes: 4096,
            device_bytes: 8192,
            blocks: None,
            key_id,
        };
        let json = serde_json::to_vec(&request).unwrap();
        store.put_blob(&volume, &request_name(5), &json).unwrap();
        answer_requests(
            &store,
            &volume,
            key,
            last_key,
            &replica,
            6,
            AnswerMode::Compare,
        )
        .unwrap();
        store.get_blob(&volume, &answer_name(5)).unwrap()
    }

    #[test]
    fn an_answer_is_sealed_with_the_key_the_shipper_asks_for() {
        let (retired, sealing) = ([1u8; 32], [2u8; 32]);
        let rotated = Key::from_keys(vec![retired, sealing]);
        let only = |bytes| Key::from_bytes(bytes);
        let opens = |answer: &[u8], key: &Key| {
            DigestAnswer::open(key, "vol0", 5, "a", answer.to_vec()).is_ok()
        };

        let (retired_id, sealing_id) = (only(retired).id(), only(sealing).id());
        // A shipper still on the older key (the new one not proven yet) asks for it.
        let answer = answer_for(Some(hex(&retired_id)), &rotated, Some(retired_id)).unwrap();
        assert!(opens(&answer, &only(retired)));
        assert!(!opens(&answer, &only(sealing)));
        // A request without a key id (an older shipper) gets the sealing key.
        let answer = answer_for(None, &rotated, None).unwrap();
        assert!(opens(&answer, &only(sealing)));
        assert!(!opens(&answer, &only(retired)));
        // Once a segment under the newer key is applied, the older one is retired: a
        // request for it is not the shipper's (someone holding the old key wants the
        // replica's digests).
        assert!(answer_for(Some(hex(&retired_id)), &rotated, Some(sealing_id)).is_none());
        assert!(answer_for(Some(hex(&sealing_id)), &rotated, Some(sealing_id)).is_some());
        // A key this side lacks: no answer (the request waits for the key file).
        assert!(answer_for(Some(hex(&only([3; 32]).id())), &rotated, None).is_none());
        assert!(answer_for(Some("not hex".into()), &rotated, None).is_none());
    }
}
