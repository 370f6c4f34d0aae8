//! Applying a volume's segments, in chain order, to its replica image.
//!
//! For each segment: read it from the store, check its place in the chain and
//! authenticate it ([`ChainCursor::open_next`]) — no byte reaches the replica before
//! that (I6) — then save the before-images of everything it changes in its undo
//! journal ([`crate::journal`]; in place before the first replica write, and kept if
//! it is already there), apply its records with io_uring, fdatasync the replica, and
//! only then persist the new position (I5). A crash between the replica writes and the
//! position update re-applies the same segment on restart; records are absolute
//! (offset + data, or a zeroed range), so re-applying yields the same replica.
//!
//! After each segment, retention ([`crate::points::prune`]) drops the oldest undo
//! journals when configured. The applier holds the journal lock: no rollback or prune
//! of the same replica runs meanwhile.
//!
//! **Store pruning** ([`ApplyOptions::prune_store`], on for `ublk-target apply` unless
//! `--keep-applied-segments`): the store is a transfer medium, as ASR's cache account
//! is, and the recovery points live in the undo journals, so a segment is deleted from
//! the store once the position after it is durable (never before: a crash before that
//! applies it again). Deletion follows each batch ([`Applier::apply_available`]) and
//! every `DELETE_EVERY` (64) segments within one; one that fails is logged and left,
//! never failing the apply. [`Applier::sweep_store`] deletes what an earlier run left
//! behind (killed between the two, or run with pruning off): segments below the
//! position whose header names this volume and the epoch the replica is in, so a store
//! holding another protection of the same volume id is never touched.
//!
//! Within a segment, records whose ranges do not overlap are submitted together; an
//! overlapping record waits for the batch before it, so the replica sees the records'
//! order wherever it matters. Writes point into the decompressed body: records are not
//! copied.
//!
//! **Pipeline.** [`Applier::apply_available`] fetches and opens segment `k + 1` on a
//! second thread while this one journals and writes segment `k` (reading and opening
//! take about a quarter of a segment's time on one thread; `bench/src/apply.rs` prints
//! the phases). Opening is where the chain position and the tag are checked, so I6
//! holds as before; the applier checks the chain position again against its own state
//! before it touches anything. The steps that touch the replica, the journal and the
//! state stay strictly in order per segment and never overlap between segments:
//! `undo_{k+1}` is captured only after the position after `k` is durable, so at most
//! one journal is ever newer than the applied position, which the catalog and rollback
//! rely on.
//!
//! **Syncs per segment**, each needed where it is:
//!
//! * the undo file, before its rename: else a crash could leave the name pointing at
//!   incomplete data, which is refused, and the interrupted apply could not go on;
//! * the journal directory, after that rename and before the first replica write: else
//!   a crash could lose the rename but keep some replica writes of `k`, and the restart
//!   would capture `undo_k` again from bytes `k` already wrote (a wrong point `k - 1`);
//! * the replica (fdatasync), before the position moves (I5);
//! * the state file and its directory, before `undo_{k+1}` is saved. The directory
//!   sync cannot be folded into the next segment's journal directory sync: they are
//!   different directories by default, and with both renames synced together a crash
//!   could keep `undo_{k+1}` but lose the new position, leaving journals `k` and
//!   `k + 1` both newer than it.
//!
//! On tmpfs these cost next to nothing (saving the state, two of them, takes about
//! 0.2 ms per 8 MiB segment in the bench); on a disk they are the price of the
//! journal's guarantees.

use crate::error::{Result, TargetError};
use crate::journal::{Journal, JournalLock, ReplicaFile, UndoMethod};
use crate::points::{PruneReport, Retained, Retention};
use crate::rollback::{rollback_locked, RollbackReport};
use crate::state::{ApplyState, PointFacts, ReplicaPaths};
use changelog::header::HEADER_LEN;
use changelog::uring::{IoOp, Uring};
use changelog::{ChainCursor, Key, Op, OpenedSegment, SegmentHeader, TargetStore, VolumeId};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Queue depth for replica writes.
const APPLY_DEPTH: u32 = 64;
/// With store pruning, applied segments are deleted at the latest after this many
/// more, so a run killed in a long catch-up leaves few for the next start's sweep.
const DELETE_EVERY: usize = 64;
/// How many of the segments below the position a start's sweep looks at (the newest
/// ones): each one's header is read (one small ranged read per segment), and an older
/// store (from before pruning) may hold every segment ever shipped.
const SWEEP_AT_MOST: usize = 16_384;

/// Decodes a saved applier state's chain position (the [`ChainCursor`] after the last
/// applied segment); reads the current and the legacy format.
pub fn decode_state(bytes: &[u8]) -> std::result::Result<ChainCursor, String> {
    ApplyState::decode(bytes).map(|s| s.cursor)
}

/// What one applied segment changed.
#[derive(Clone, Debug)]
pub struct Applied {
    pub header: SegmentHeader,
    pub records: usize,
    pub bytes_written: u64,
    /// Whether its undo journal was written now (`false`: kept from an interrupted
    /// apply of the same segment).
    pub journal_saved: bool,
    /// What retention removed afterwards.
    pub pruned: Option<PruneReport>,
}

/// Where an applier's time went, summed over the segments it applied since it was
/// opened. Each phase is wall time on the thread that ran it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyTimes {
    /// Segments applied.
    pub segments: u64,
    /// Reading segment files from the store.
    pub fetch: Duration,
    /// Chain check, AES-GCM, lz4 and record validation ([`ChainCursor::open_next`]).
    pub open: Duration,
    /// Reading the before-images of the ranges each segment changes.
    pub undo_read: Duration,
    /// Hashing the before-images and writing the undo file (fsync, rename, directory
    /// fsync).
    pub undo_save: Duration,
    /// The replica writes.
    pub write: Duration,
    /// The replica's fdatasync.
    pub sync: Duration,
    /// Saving the applied state.
    pub state: Duration,
}

/// Applier settings beyond the store, key and paths.
#[derive(Clone, Debug, Default)]
pub struct ApplyOptions {
    /// The undo journal directory [default: `REPLICA.journal/`].
    pub journal_dir: Option<PathBuf>,
    /// Pruning after each applied segment (none by default: every journal is kept).
    pub retention: Retention,
    /// Copy before-images (with a checksum) even where the filesystem could share the
    /// replica's blocks with the journal (see [`crate::journal`]).
    pub copy_undo: bool,
    /// Delete each segment from the store once it is applied (see the module docs).
    /// Off by default for library users; `ublk-target apply` turns it on.
    pub prune_store: bool,
}

pub struct Applier {
    store: Arc<dyn TargetStore>,
    key: Key,
    paths: ReplicaPaths,
    replica: File,
    state: ApplyState,
    journal: Journal,
    retention: Retention,
    uring: Uring,
    times: ApplyTimes,
    /// Scratch space for undo files, kept from one segment to the next.
    undo_buf: Vec<u8>,
    undo_method: UndoMethod,
    prune_store: bool,
    /// Segments applied (position durable) and not yet deleted from the store.
    applied_in_store: Vec<u64>,
    /// What retention keeps, once it has run (read from the catalog then, kept up to
    /// date after).
    retained: Option<Retained>,
    _lock: JournalLock,
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.settle_merge_or_warn(true);
    }
}

impl Applier {
    /// Opens the replica (created if missing), the applied position saved in
    /// `state_path` (fresh when missing) and the undo journal (created if missing), and
    /// takes the journal lock.
    pub fn open(
        store: Arc<dyn TargetStore>,
        volume: VolumeId,
        key: Key,
        replica_path: &Path,
        state_path: &Path,
        options: &ApplyOptions,
    ) -> Result<Applier> {
        let paths = ReplicaPaths::new(replica_path)
            .with_state(Some(state_path.into()))
            .with_journal(options.journal_dir.clone());
        let journal = Journal::new(&paths.journal);
        journal.create()?;
        let lock = journal.lock()?;
        let replica = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(replica_path)
            .map_err(|e| {
                TargetError::io(format!("opening replica {}", replica_path.display()), e)
            })?;
        let state = ApplyState::load(state_path, Some(&volume))?
            .unwrap_or_else(|| ApplyState::start(volume));
        let uring = Uring::new(APPLY_DEPTH).map_err(|e| TargetError::io("io_uring setup", e))?;
        let undo_method = UndoMethod::for_replica(&replica, options.copy_undo);
        Ok(Applier {
            store,
            key,
            paths,
            replica,
            state,
            journal,
            retention: options.retention,
            uring,
            times: ApplyTimes::default(),
            undo_buf: Vec::new(),
            undo_method,
            prune_store: options.prune_store,
            applied_in_store: Vec::new(),
            retained: None,
            _lock: lock,
        })
    }

    /// The applied position: the next segment index and the first seq not applied.
    pub fn cursor(&self) -> &ChainCursor {
        &self.state.cursor
    }

    /// The whole applied state.
    pub fn state(&self) -> &ApplyState {
        &self.state
    }

    /// Where the time went so far.
    pub fn times(&self) -> &ApplyTimes {
        &self.times
    }

    /// How before-images are being kept: [`UndoMethod::Share`] until the filesystem
    /// refuses to share blocks.
    pub fn undo_method(&self) -> UndoMethod {
        self.undo_method
    }

    /// The replica's paths (replica, state, journal).
    pub fn paths(&self) -> &ReplicaPaths {
        &self.paths
    }

    /// Applies `retention` now (see [`crate::points::prune`]). When thinning, it books a
    /// merge of undo files that is done and starts the next on a thread of its own
    /// ([`Applier::finish_thinning`] waits for it). The first call reads the catalog;
    /// later ones cost the same however many journals are retained (but for thinning's
    /// walk over the retained points, at most every tenth of an interval).
    pub fn prune(&mut self, retention: &Retention, now_unix_ms: u64) -> Result<PruneReport> {
        // A rollback (perhaps interrupted) needs its journals.
        self.refuse_if_rolled_back()?;
        let Some(latest) = self.state.latest() else {
            return Ok(PruneReport::default());
        };
        let retained = match &mut self.retained {
            Some(retained) => retained,
            None => self.retained.insert(Retained::load(&self.paths)?),
        };
        let pruned = retained.prune(
            &self.paths,
            &self.journal,
            &mut self.uring,
            latest,
            retention,
            now_unix_ms,
            true,
        );
        if pruned.is_err() || retained.needs_reload {
            // Partly done, perhaps: read again next time.
            self.retained = None;
        }
        pruned
    }

    /// Rolls the replica back to `point` for failover (see [`crate::rollback`]); no
    /// segment is applied afterwards.
    pub fn rollback_to(&mut self, point: u64) -> Result<RollbackReport> {
        // First: a merge under way is abandoned and waited for (dropping `Retained`
        // does), so that nothing is merged behind the rollback's back.
        self.retained = None;
        let (state, report) = rollback_locked(
            &self.paths,
            &self.journal,
            &mut self.uring,
            &self.replica,
            self.state.clone(),
            point,
            None,
        )?;
        self.state = state;
        Ok(report)
    }

    /// Applies the next segment if the store has it. `Ok(None)` when it is not there
    /// yet; [`TargetError::Gap`] when it is missing but later ones exist;
    /// [`TargetError::RolledBack`] once the replica was rolled back for failover. With
    /// a retention, an error of the pruning that follows is returned although the
    /// segment was applied (the position has moved; the next call goes on).
    pub fn apply_next(&mut self) -> Result<Option<Applied>> {
        self.refuse_if_rolled_back()?;
        let applied =
            match fetch_and_open(&*self.store, &self.key, &self.state.cursor, &mut self.times)? {
                Some(segment) => self.apply_opened(segment).map(Some),
                None => Ok(None),
            };
        self.delete_applied();
        applied
    }

    /// With store pruning: deletes the applied segments this applier has not deleted
    /// yet. A failure is logged and the rest left to [`Applier::sweep_store`].
    fn delete_applied(&mut self) {
        if !self.prune_store {
            self.applied_in_store.clear();
            return;
        }
        let volume = &self.state.cursor.volume;
        for index in std::mem::take(&mut self.applied_in_store) {
            if let Err(e) = self.store.delete(volume, index) {
                log::warn!(
                    "volume {volume}: applied segments stay in the store {} (deleting \
                     {index:016x} failed: {e}); the next apply start deletes them",
                    self.store.describe()
                );
                return;
            }
        }
    }

    /// With store pruning: deletes the segments below the applied position that an
    /// earlier run left in the store, if they are of this replica's volume and epoch
    /// (each one's header is read to know); of the newest `SWEEP_AT_MOST` (16384)
    /// only, the rest named in a warning. Returns how many were deleted.
    pub fn sweep_store(&mut self) -> Result<usize> {
        let cursor = &self.state.cursor;
        let (true, Some(epoch)) = (self.prune_store, cursor.epoch) else {
            return Ok(0);
        };
        let mut below = self.store.list(&cursor.volume)?;
        below.retain(|&i| i < cursor.next_index);
        let older = below.len().saturating_sub(SWEEP_AT_MOST);
        if older > 0 {
            log::warn!(
                "volume {}: {older} segments below the replica's position stay in the store {} \
                 ({:016x}..={:016x}, older than the {SWEEP_AT_MOST} a start sweeps): \
                 delete them if nothing else reads the store",
                cursor.volume,
                self.store.describe(),
                below[0],
                below[older - 1]
            );
        }
        let mut deleted = 0;
        for &index in &below[older..] {
            let head = self.store.get_head(&cursor.volume, index, HEADER_LEN)?;
            let Some(bytes) = head else {
                continue;
            };
            let name = self.store.segment_name(&cursor.volume, index);
            let ours = SegmentHeader::decode(&bytes, &name)
                .is_ok_and(|h| h.volume == cursor.volume && h.epoch == epoch && h.index == index);
            if ours {
                self.store.delete(&cursor.volume, index)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    fn refuse_if_rolled_back(&self) -> Result<()> {
        match self.state.rolled_back_to {
            Some(point) => Err(TargetError::RolledBack { point }),
            None => Ok(()),
        }
    }

    /// Refuses a segment sealed with a key older in the key file than the one that
    /// sealed the last applied segment: shippers only move to newer keys, so such a
    /// segment was sealed by whoever holds a retired key. (A key the file no longer
    /// has, on either side, cannot be placed and is not compared.)
    fn refuse_retired_key(&self, header: &SegmentHeader, name: &str) -> Result<()> {
        let Some(last) = self.state.key_id else {
            return Ok(());
        };
        if !self.key.is_retired_by(header.key_id, last) {
            return Ok(());
        }
        Err(TargetError::RetiredKey {
            segment: name.into(),
            found: changelog::key::hex(&header.key_id),
            newer: changelog::key::hex(&last),
        })
    }

    /// Applies a segment [`fetch_and_open`] returned for the current position.
    fn apply_opened(&mut self, segment: OpenedSegment) -> Result<Applied> {
        let volume = self.state.cursor.volume.clone();
        let index = segment.header.index;
        // The opener checked the chain against the position it predicted; that must be
        // the applied one (cheap, and it keeps I6 local to this function).
        let name = self.store.segment_name(&volume, index);
        self.state.cursor.check(&segment.header, &name)?;
        self.refuse_retired_key(&segment.header, &name)?;
        let saved = self.journal.save_undo(
            &mut self.uring,
            &segment,
            &self.state,
            &ReplicaFile {
                file: &self.replica,
                path: &self.paths.replica,
            },
            &mut self.undo_buf,
            &mut self.undo_method,
        )?;
        self.times.undo_read += saved.read;
        self.times.undo_save += saved.save;
        let bytes_written = self.write_records(&segment)?;
        let t = Instant::now();
        let cuts = crate::group_cuts::segment_cuts(&segment);
        if let Some(cuts) = &cuts {
            crate::group_cuts::record(&self.paths.journal, index, cuts)?;
        }
        let facts = PointFacts::from_header(&segment.header);
        // Before the state moves on: an error after that would fail a segment applied.
        let journal_bytes = match self.retained {
            Some(_) => self.journal.disk_bytes((index, index))?,
            None => 0,
        };
        self.state.cursor.advance(&segment.header, segment.digest);
        self.state.last = Some(facts);
        self.state.key_id = Some(segment.header.key_id);
        self.state.save(&mut self.uring, &self.paths.state)?;
        if let Some(retained) = &mut self.retained {
            retained.applied(&facts, cuts.as_ref(), journal_bytes);
        }
        self.times.state += t.elapsed();
        self.times.segments += 1;
        self.applied_in_store.push(index);
        log::debug!(
            "volume {volume}: applied segment {index:016x} (seq {}..={})",
            segment.header.first_seq,
            segment.header.last_seq
        );
        let pruned = if self.retention.is_unlimited() {
            None
        } else {
            let retention = self.retention;
            Some(self.prune(&retention, changelog::unix_ms_now())?)
        };
        Ok(Applied {
            records: segment.records().count(),
            bytes_written,
            header: segment.header,
            journal_saved: saved.saved,
            pruned,
        })
    }

    /// Applies every segment available now; returns how many.
    ///
    /// A second thread fetches and opens the next segment while this one applies the
    /// current one (a pipeline one segment deep, so at most two opened segments are in
    /// memory). Opening includes the chain check and authentication, so I6 holds as in
    /// [`Applier::apply_next`]; the opener checks each segment against the position the
    /// segment before it leads to, and [`Applier::apply_opened`] checks it again
    /// against the applied position. An error of the opener (say a segment that fails
    /// authentication) is returned once every segment before it is applied, as the
    /// sequential loop would; an error of this thread stops the opener.
    pub fn apply_available(&mut self) -> Result<usize> {
        self.apply_available_with(|_| {})
    }

    /// [`Applier::apply_available`], telling `on_applied` about each segment as it is
    /// applied (for progress).
    pub fn apply_available_with(&mut self, mut on_applied: impl FnMut(&Applied)) -> Result<usize> {
        self.refuse_if_rolled_back()?;
        let store = self.store.clone();
        let key = self.key.clone();
        let mut cursor = self.state.cursor.clone();
        let applied = std::thread::scope(|scope| {
            // Rendezvous: the opener hands over segment k + 1 only when this thread is
            // done with k, and opens k + 2 only after that.
            let (tx, rx) = std::sync::mpsc::sync_channel(0);
            scope.spawn(move || loop {
                let mut times = ApplyTimes::default();
                let next = fetch_and_open(&*store, &key, &cursor, &mut times);
                let more = match &next {
                    Ok(Some(segment)) => {
                        cursor.advance(&segment.header, segment.digest);
                        true
                    }
                    _ => false,
                };
                if tx.send((next, times)).is_err() || !more {
                    break;
                }
            });
            let mut count = 0;
            loop {
                let (next, times) = rx.recv().expect("the opener sends before it ends");
                self.times.fetch += times.fetch;
                self.times.open += times.open;
                let Some(segment) = next? else {
                    return Ok(count);
                };
                on_applied(&self.apply_opened(segment)?);
                count += 1;
                if self.applied_in_store.len() >= DELETE_EVERY {
                    self.delete_applied();
                }
            }
        });
        // After the batch, and after a failed one too: what was applied is durable.
        self.delete_applied();
        self.settle_merge_or_warn(false);
        applied
    }

    /// [`Applier::settle_merge`], where trouble is only logged.
    fn settle_merge_or_warn(&mut self, wait: bool) {
        if let Err(e) = self.settle_merge(wait) {
            log::warn!("thinning recovery points: {e}; the journal is read again");
        }
    }

    /// Finishes a merge of undo files that is done (thinning starts them on a thread of
    /// their own, and finishes them after a segment applied; this is for when none
    /// comes), or waits for it to be done with `wait`; returns how many undo files that
    /// removed. After an error the journal is read again.
    fn settle_merge(&mut self, wait: bool) -> Result<usize> {
        let Some(retained) = &mut self.retained else {
            return Ok(0);
        };
        let finished = retained.settle_merge(&self.journal, &mut self.uring, wait);
        if finished.is_err() {
            self.retained = None;
        }
        finished
    }

    /// Whether a merge of undo files (thinning) is under way on its thread.
    pub fn thinning_under_way(&self) -> bool {
        self.retained
            .as_ref()
            .is_some_and(|retained| retained.merge_under_way())
    }

    /// Waits for the merge of undo files under way, if any, and finishes it; returns
    /// how many undo files that removed. [`Applier::prune`] starts the next.
    pub fn finish_thinning(&mut self) -> Result<usize> {
        self.settle_merge(true)
    }

    fn write_records(&mut self, segment: &OpenedSegment) -> Result<u64> {
        let started = Instant::now();
        let fd = self.replica.as_raw_fd();
        let mut batch: Vec<IoOp<'_>> = Vec::new();
        let mut batch_ranges: Vec<(u64, u64)> = Vec::new();
        let mut written = 0u64;
        let err = |e| {
            TargetError::io(
                format!("writing replica {}", self.paths.replica.display()),
                e,
            )
        };
        for record in segment.records() {
            let op = match record.op {
                Op::Write | Op::Fua => IoOp::Write {
                    offset: record.offset,
                    data: record.data,
                },
                // Both read back as zeroes; a hole works on every file system and
                // on block devices (which zero the range).
                Op::Discard | Op::WriteZeroes => IoOp::Fallocate {
                    offset: record.offset,
                    len: u64::from(record.len),
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                },
                // Durability is settled once per segment below; marks carry no data.
                Op::Flush | Op::Mark => continue,
            };
            let range = (record.offset, record.offset + u64::from(record.len));
            if record.len == 0 {
                continue;
            }
            if batch_ranges
                .iter()
                .any(|&(s, e)| s < range.1 && range.0 < e)
            {
                self.uring.run_batch(fd, batch.drain(..)).map_err(err)?;
                batch_ranges.clear();
            }
            batch.push(op);
            batch_ranges.push(range);
            written += u64::from(record.len);
        }
        self.uring.run_batch(fd, batch).map_err(err)?;
        let t = Instant::now();
        self.times.write += t - started;
        self.uring.fsync(fd, true).map_err(err)?;
        self.times.sync += t.elapsed();
        Ok(written)
    }
}

/// Reads the segment that must come after `cursor` and opens it (chain position,
/// authentication, decompression, record validation: nothing of it is trusted before
/// this returns it). `Ok(None)` when the store does not have it yet;
/// [`TargetError::Gap`] when it is missing but later ones exist.
fn fetch_and_open(
    store: &dyn TargetStore,
    key: &Key,
    cursor: &ChainCursor,
    times: &mut ApplyTimes,
) -> Result<Option<OpenedSegment>> {
    let volume = &cursor.volume;
    let index = cursor.next_index;
    let t = Instant::now();
    let Some(bytes) = store.get(volume, index)? else {
        if let Some(&later) = store.list(volume)?.iter().find(|&&i| i > index) {
            log::error!("volume {volume}: segment {index:016x} missing, {later:016x} present");
            return Err(TargetError::Gap {
                volume: volume.to_string(),
                missing: index,
                store: store.describe(),
            });
        }
        return Ok(None);
    };
    let fetched = Instant::now();
    times.fetch += fetched - t;
    let segment = cursor.open_next(bytes, &store.segment_name(volume, index), key)?;
    times.open += fetched.elapsed();
    Ok(Some(segment))
}
