//! The digest-resync handshake, carried by ring header fields (see the layout table in
//! the parent module) so it survives either side restarting:
//!
//! 1. A requester (the shipper starting a new protection epoch, or an operator through
//!    `shipper resync`) sets the block size and raises `DIGEST_REQUEST` and `RESYNC`
//!    ([`RingControl::request_digest_resync`]). From then on the stream is not
//!    consistent.
//! 2. The producer records a resync-begin MARK with seq `gen`, starts remembering which
//!    blocks later writes touch, stores `gen` and the size to compare, lowers
//!    `DIGEST_REQUEST`/`DIGESTS_READY` and raises `DIGEST_ACTIVE`.
//!
//!    The producer also starts a *restricted* pass on its own, without step 1, for the
//!    regions a ring overflow or an unclean stop left in the dirty bitmap (when the
//!    volume resyncs by comparison): it writes the blocks to [`digest_blocks_path`]
//!    first and raises `DIGEST_RESTRICTED` with `DIGEST_ACTIVE`. `RESYNC` is already up.
//! 3. The consumer asks the recovery side for its replica's block digests (of the
//!    listed blocks only, for a restricted pass) as of a state holding every record up
//!    to `gen`, writes them to [`digests_path`] and raises `DIGESTS_READY`.
//! 4. The producer compares each block of the source with the replica's digest, under
//!    the same range claim a write takes, and re-records the block when it differs or a
//!    write after `gen` touched it. It publishes progress in the header as it goes.
//! 5. The producer lowers `DIGEST_ACTIVE`, records the resync-done MARK, then lowers
//!    `RESYNC` unless another resync is due. A reader of the done MARK therefore sees
//!    `DIGEST_ACTIVE` already down.
//!
//! A producer that restarts with `DIGEST_ACTIVE` up lost its touched-block set, so it
//! starts over at step 2 with a new `gen`, over the whole disk (a restricted pass's
//! block list left the dirty bitmap when the pass began).
//!
//! A restricted pass may give up waiting for digests (the recovery side is down):
//! it then re-records every listed block, as a resync without digests does.

use super::layout::{
    FLAG_DIGESTS_READY, FLAG_DIGEST_ACTIVE, FLAG_DIGEST_REQUEST, FLAG_DIGEST_RESTRICTED,
    FLAG_RESYNC, OFF_RESYNC_BLOCK, OFF_RESYNC_DONE, OFF_RESYNC_GEN, OFF_RESYNC_SENT,
    OFF_RESYNC_TOTAL,
};
use super::shm::Shm;
use super::RingError;
use changelog::digests::{BlockRuns, DEFAULT_BLOCK_BYTES};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// Where the consumer puts the replica digests for the producer: beside the ring file.
pub fn digests_path(ring: &Path) -> PathBuf {
    beside(ring, ".digests")
}

/// `ring` with `suffix` appended to its file name.
fn beside(ring: &Path, suffix: &str) -> PathBuf {
    let mut name = ring.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Where the producer lists the blocks of a restricted pass for the consumer.
pub fn digest_blocks_path(ring: &Path) -> PathBuf {
    beside(ring, ".digest-blocks")
}

/// Lists the blocks of restricted pass `gen` (write, then rename: the consumer never
/// reads half a list). Not synced: a producer that restarts begins a new pass anyway.
pub fn write_digest_blocks(ring: &Path, gen: u64, blocks: &BlockRuns) -> std::io::Result<()> {
    let path = digest_blocks_path(ring);
    let tmp = beside(&path, ".tmp");
    let bytes = bincode::serialize(&(gen, blocks)).expect("block runs serialize");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)
}

/// The blocks of restricted pass `gen`, as the producer listed them.
pub fn read_digest_blocks(ring: &Path, gen: u64) -> Result<BlockRuns, String> {
    let path = digest_blocks_path(ring);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    match bincode::deserialize::<(u64, BlockRuns)>(&bytes) {
        Ok((listed, blocks)) if listed == gen => Ok(blocks),
        Ok((listed, _)) => Err(format!(
            "{} lists the blocks of pass {listed}, not {gen}",
            path.display()
        )),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// A snapshot of the digest-resync fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncProgress {
    /// A digest resync was asked for and has not begun.
    pub requested: bool,
    /// A digest pass is running (waiting for digests, or comparing).
    pub active: bool,
    /// The replica's digests are in place; the producer is comparing.
    pub digests_ready: bool,
    /// The active pass covers only the blocks in [`digest_blocks_path`].
    #[serde(default)]
    pub restricted: bool,
    /// The stream is not consistent until the next resync-done MARK (any resync).
    pub resync: bool,
    pub gen: u64,
    pub block_bytes: u32,
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Bytes re-recorded because they differed (or were written meanwhile).
    pub sent_bytes: u64,
}

impl ResyncProgress {
    /// Whether a digest resync is asked for or running.
    pub fn pending(&self) -> bool {
        self.requested || self.active
    }
}

pub(super) fn progress(shm: &Shm) -> ResyncProgress {
    let flags = shm.flags().load(Acquire);
    let block = shm.header_u32(OFF_RESYNC_BLOCK).load(Relaxed);
    ResyncProgress {
        requested: flags & FLAG_DIGEST_REQUEST != 0,
        active: flags & FLAG_DIGEST_ACTIVE != 0,
        digests_ready: flags & FLAG_DIGESTS_READY != 0,
        restricted: flags & FLAG_DIGEST_RESTRICTED != 0,
        resync: flags & FLAG_RESYNC != 0,
        gen: shm.header_u64(OFF_RESYNC_GEN).load(Relaxed),
        block_bytes: if block == 0 {
            DEFAULT_BLOCK_BYTES
        } else {
            block
        },
        total_bytes: shm.header_u64(OFF_RESYNC_TOTAL).load(Relaxed),
        done_bytes: shm.header_u64(OFF_RESYNC_DONE).load(Relaxed),
        sent_bytes: shm.header_u64(OFF_RESYNC_SENT).load(Relaxed),
    }
}

/// Step 1. `block_bytes` must be a power of two of at least 4 KiB.
pub(super) fn request(shm: &Shm, block_bytes: u32) {
    shm.header_u32(OFF_RESYNC_BLOCK).store(block_bytes, Relaxed);
    // Release: the producer that sees the flag sees the block size.
    shm.flags()
        .fetch_or(FLAG_DIGEST_REQUEST | FLAG_RESYNC, Release);
}

/// Step 2, producer side. A restricted pass listed its blocks before.
pub(super) fn begin(shm: &Shm, gen: u64, total_bytes: u64, restricted: bool) {
    shm.header_u64(OFF_RESYNC_GEN).store(gen, Relaxed);
    shm.header_u64(OFF_RESYNC_TOTAL).store(total_bytes, Relaxed);
    shm.header_u64(OFF_RESYNC_DONE).store(0, Relaxed);
    shm.header_u64(OFF_RESYNC_SENT).store(0, Relaxed);
    let restricted = if restricted {
        FLAG_DIGEST_RESTRICTED
    } else {
        0
    };
    // One update: a consumer never sees this pass active with another pass's kind.
    let lowered = FLAG_DIGEST_REQUEST | FLAG_DIGESTS_READY | FLAG_DIGEST_RESTRICTED;
    let raised = FLAG_DIGEST_ACTIVE | FLAG_RESYNC | restricted;
    let _ = shm
        .flags()
        .fetch_update(AcqRel, Acquire, |f| Some(f & !lowered | raised));
}

pub(super) fn set_progress(shm: &Shm, done_bytes: u64, sent_bytes: u64) {
    shm.header_u64(OFF_RESYNC_DONE).store(done_bytes, Relaxed);
    shm.header_u64(OFF_RESYNC_SENT).store(sent_bytes, Relaxed);
}

/// Step 3, consumer side.
pub(super) fn mark_ready(shm: &Shm) {
    shm.flags().fetch_or(FLAG_DIGESTS_READY, Release);
}

/// The producer found the digests file stale or unreadable: ask for it again.
pub(super) fn clear_ready(shm: &Shm) {
    shm.flags().fetch_and(!FLAG_DIGESTS_READY, AcqRel);
}

/// Step 5, before the done MARK is recorded.
pub(super) fn finish(shm: &Shm) {
    shm.flags().fetch_and(
        !(FLAG_DIGEST_ACTIVE | FLAG_DIGESTS_READY | FLAG_DIGEST_RESTRICTED),
        AcqRel,
    );
}

/// A role-less handle on a ring for operator commands: ask for a digest resync and
/// watch its progress while blkfilter and the shipper keep their roles.
pub struct RingControl {
    shm: Shm,
}

impl RingControl {
    pub fn open(path: &Path) -> Result<RingControl, RingError> {
        Ok(RingControl {
            shm: Shm::open_unlocked(path)?,
        })
    }

    /// Asks for a whole-disk digest resync (step 1). Idempotent while one is pending.
    pub fn request_digest_resync(&self, block_bytes: u32) {
        request(&self.shm, block_bytes);
    }

    pub fn progress(&self) -> ResyncProgress {
        progress(&self.shm)
    }

    /// The seq up to which the shipper says every record is durably staged.
    pub fn released_seq(&self) -> u64 {
        self.shm
            .header_u64(super::layout::OFF_RELEASED_SEQ)
            .load(Acquire)
    }

    /// Asks the producer for a MARK (see [`super::mark`]); returns the request number
    /// for [`RingControl::mark_recorded`].
    pub fn request_mark(&self, app_consistent: bool) -> u64 {
        super::mark::request(&self.shm, app_consistent)
    }

    /// The seq of the MARK that served request `number`, once the producer recorded it.
    pub fn mark_recorded(&self, number: u64) -> Option<u64> {
        super::mark::recorded(&self.shm, number)
    }

    /// The last consistency-group cut whose MARK the producer recorded (0: none), and
    /// the id of the group clock the ring takes its seqs from (0: none).
    pub fn group_cuts_recorded(&self) -> (u64, u64) {
        let at = |offset| self.shm.header_u64(offset).load(Acquire);
        (
            at(super::layout::OFF_GROUP_CUTS_SEEN),
            at(super::layout::OFF_GROUP_ID),
        )
    }

    pub fn device_bytes(&self) -> u64 {
        self.shm.geometry().device_bytes
    }
}
