//! The shipper's part of a digest resync (the handshake is in `blkfilter::ring::resync`):
//! it asks for one when a new protection epoch starts (the initial replication of a
//! volume that may already hold data), and it carries the replica's block digests from
//! the recovery side, through the target store, to the producer.
//!
//! For a pass with generation `gen` (the seq of its begin MARK) it stores a
//! [`DigestRequest`] with `need_seq = gen` (listing the pass's blocks when the pass is
//! restricted to the regions an overflow or unclean stop left in doubt); the recovery
//! side answers once its replica holds every record up to the MARK. A request whose
//! pass ended without it (the producer gave up waiting) is removed. The answer is authenticated with the volume key
//! ([`DigestAnswer::open`]); a forged or damaged answer is refused (the volume goes
//! Critical) rather than trusted, since a wrong digest could skip a differing block.

use crate::error::{Result, ShipperError};
use crate::keys::SealingKey;
use crate::pipeline::ShipperConfig;
use blkfilter::ring::resync::read_digest_blocks;
use blkfilter::ring::{digests_path, Consumer};
use changelog::digests::{answer_name, request_name, DigestAnswer, DigestRequest};
use changelog::uring::{write_file_atomic, Uring};
use changelog::TargetStore;
use std::fmt::Display;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the coordinator looks at the ring and the store.
const TICK: Duration = Duration::from_millis(100);
/// The longest pause between tries of a store that keeps failing.
const MOST_PAUSE: Duration = Duration::from_secs(60);

/// The coordinator's store trouble: the first failure of a spell is a warning and the
/// next try waits a pause that doubles up to [`MOST_PAUSE`]; later failures are debug,
/// so a store that is down, or refuses this host, does not fill the log every tick.
/// Each failure, and the end of the spell, is told to `report` (for the status).
struct StoreTrouble<'a> {
    failures: u32,
    next_try: Option<Instant>,
    report: &'a dyn Fn(Option<String>),
}

impl StoreTrouble<'_> {
    fn may_try(&self) -> bool {
        self.next_try.is_none_or(|at| Instant::now() >= at)
    }

    fn failed(&mut self, volume: &changelog::VolumeId, what: &str, e: impl Display) {
        let pause = TICK
            .saturating_mul(1 << self.failures.min(10))
            .min(MOST_PAUSE);
        if self.failures == 0 {
            log::warn!("volume {volume}: {what}: {e}; retrying (quietly, up to every minute)");
        } else {
            log::debug!("volume {volume}: {what}: {e}; retrying in {pause:?}");
        }
        (self.report)(Some(format!("{what}: {e}")));
        self.failures += 1;
        self.next_try = Some(Instant::now() + pause);
    }

    fn answered(&mut self, volume: &changelog::VolumeId) {
        if self.failures > 0 {
            log::info!(
                "volume {volume}: the store answers the digest resync again (after {} failed tries)",
                self.failures
            );
            (self.report)(None);
        }
        self.failures = 0;
        self.next_try = None;
    }
}

/// Runs until `finished` is set: forwards requests and answers for every digest pass
/// the producer begins. `store_trouble` hears the last store error while the exchange
/// keeps failing, and `None` once the store answers again.
pub fn coordinate(
    config: &ShipperConfig,
    keys: &SealingKey,
    ring: &Consumer,
    store: &dyn TargetStore,
    finished: &AtomicBool,
    store_trouble: &dyn Fn(Option<String>),
) -> Result<()> {
    let volume = &config.volume;
    // The pass asked about, and the keys its answer may be sealed with: the request
    // names the sealing key, and is made again when that moves (the recovery side
    // does not answer in a key older than the segments it applied), so an answer to
    // the earlier request may still come.
    let mut asked: Option<u64> = None;
    let mut answer_keys: Vec<changelog::Key> = Vec::new();
    let mut trouble = StoreTrouble {
        failures: 0,
        next_try: None,
        report: store_trouble,
    };
    while !finished.load(Ordering::Acquire) {
        std::thread::sleep(TICK);
        let progress = ring.resync_progress();
        let again = ring.resync_progress();
        if (progress.active, progress.gen, progress.restricted)
            != (again.active, again.gen, again.restricted)
        {
            continue; // a pass is beginning: look again next tick
        }
        if let Some(stale) = asked.filter(|&g| !progress.active || progress.gen != g) {
            forget(store, volume, stale);
            asked = None;
            answer_keys.clear();
        }
        if !progress.active || progress.digests_ready || progress.gen == 0 {
            continue;
        }
        let gen = progress.gen;
        if !trouble.may_try() {
            continue;
        }
        let sealing = keys.sealing();
        let key_moved = answer_keys.last().is_some_and(|k| k.id() != sealing.id());
        if asked != Some(gen) || key_moved {
            let blocks = if progress.restricted {
                match read_digest_blocks(ring.path(), gen) {
                    Ok(blocks) => Some(blocks),
                    Err(e) => {
                        log::warn!("volume {volume}: digest resync {gen}: {e}; retrying");
                        continue;
                    }
                }
            } else {
                None
            };
            let request = DigestRequest {
                gen,
                need_seq: gen,
                block_bytes: progress.block_bytes,
                device_bytes: ring.geometry().device_bytes,
                blocks,
                key_id: Some(changelog::key::hex(&sealing.id())),
            };
            let json = serde_json::to_vec(&request).expect("request serializes");
            match store.put_blob(volume, &request_name(gen), &json) {
                Ok(()) => {
                    trouble.answered(volume);
                    log::info!(
                        "volume {volume}: digest resync {gen}: asked {} for the replica's digests",
                        store.describe()
                    );
                    asked = Some(gen);
                    answer_keys.push(sealing);
                }
                Err(e) => trouble.failed(volume, "digest request", e),
            }
            continue;
        }
        let name = answer_name(gen);
        let bytes = match store.get_blob(volume, &name) {
            Ok(found) => {
                trouble.answered(volume);
                match found {
                    Some(bytes) => bytes,
                    None => continue,
                }
            }
            Err(e) => {
                trouble.failed(volume, "reading the digest answer", e);
                continue;
            }
        };
        let where_ = format!("{}/{volume}/{name}", store.describe());
        // Only a key asked for opens it: an answer under another key (a retired one
        // someone still holds) is not the recovery side's.
        let answer = open_answer(&answer_keys, volume.as_str(), gen, &where_, bytes)
            .map_err(|e| ShipperError::Critical {
                volume: volume.to_string(),
                what: format!(
                    "the replica digests failed verification ({e}); check that both sides use the same key, remove {where_} and run `shipper resync` again"
                ),
            })?;
        deliver(ring.path(), &answer)?;
        ring.mark_digests_ready();
        log::info!(
            "volume {volume}: digest resync {gen}: {} replica digests delivered; the producer compares",
            answer.digests.len()
        );
        forget(store, volume, gen);
        asked = None;
        answer_keys.clear();
    }
    Ok(())
}

/// Opens an answer with the keys it was asked in, newest first, stopping at the first
/// that opens (the bytes are copied only while another key remains to try).
fn open_answer(
    keys: &[changelog::Key],
    volume: &str,
    gen: u64,
    name: &str,
    bytes: Vec<u8>,
) -> changelog::Result<DigestAnswer> {
    let (oldest, newer) = keys.split_first().expect("asked with at least one key");
    for key in newer.iter().rev() {
        if let Ok(answer) = DigestAnswer::open(key, volume, gen, name, bytes.clone()) {
            return Ok(answer);
        }
    }
    DigestAnswer::open(oldest, volume, gen, name, bytes)
}

/// Removes pass `gen`'s request and answer from the store.
fn forget(store: &dyn TargetStore, volume: &changelog::VolumeId, gen: u64) {
    for name in [request_name(gen), answer_name(gen)] {
        if let Err(e) = store.delete_blob(volume, &name) {
            log::warn!("volume {volume}: removing {name} from the store: {e}");
        }
    }
}

/// Writes the digests beside the ring, durably and atomically, for the producer.
fn deliver(ring: &Path, answer: &DigestAnswer) -> Result<()> {
    let path = digests_path(ring);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("ring paths have a file name");
    let bytes = bincode::serialize(answer).expect("answer serializes");
    let mut uring = Uring::new(2).map_err(|e| ShipperError::io("setting up io_uring", e))?;
    write_file_atomic(&mut uring, dir, name, &bytes)
        .map_err(|e| ShipperError::io(format!("writing {}", path.display()), e))
}
