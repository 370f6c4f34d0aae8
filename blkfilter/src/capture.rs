//! Capture: what the ublk server does for each request of a protected volume.
//!
//! For every request the backing I/O is done first (through io_uring), and only after it
//! completed is the request recorded in the ring with the next sequence number (I1, I2):
//!
//! | request | backing I/O | record |
//! |---|---|---|
//! | WRITE | write | WRITE + data |
//! | FUA write | write, then fdatasync | FUA + data |
//! | FLUSH | fsync | FLUSH (its seq exceeds every write completed before it) |
//! | DISCARD | fallocate(PUNCH_HOLE) | DISCARD range |
//! | WRITE_ZEROES | fallocate(PUNCH_HOLE): reads return zeroes, on every file system | WRITE_ZEROES range |
//! | MARK | none | MARK + label |
//!
//! A data-changing request whose backing I/O fails is not recorded, but its range is
//! marked in the ring's dirty bitmap: a failed write may have changed part of it (a short
//! write before ENOSPC), and the resync below sends what the backing then holds.
//!
//! When the ring has no room, the request's range is marked in the ring's dirty bitmap
//! instead and the ring flags overflow (I7): the request still succeeds, so the volume
//! never stalls on replication. Once the ring has room again, a *resync pass* re-records
//! the dirty regions from the backing as ordinary WRITE records (taking seqs from the
//! same clock, so they order correctly against new writes), then a MARK with
//! `MARK_RESYNC_DONE`. From that record on the stream is consistent again; the shipper
//! marks no segment as a crash point in between. A request re-issued after a server restart is simply
//! recorded again; records are absolute (offset + data), so replaying one twice is
//! harmless.

use crate::activity_log::{ActivityLog, ActivityLogError, Recovered};
use crate::digest_pass::{usable_block_bytes, DigestPass, MAX_BLOCK_BYTES};
use crate::ring::resync::write_digest_blocks;
use crate::ring::{digests_path, Producer, RingError};
use changelog::digests::DigestAnswer;
use changelog::record::{MARK_APP_CONSISTENT, MARK_GROUP_CUT, MARK_RESYNC_BEGIN, MARK_RESYNC_DONE};
use changelog::uring::{IoOp, Uring};
use changelog::{Op, RecordRef};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("backing {path}: {source}")]
    Backing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("request {offset}+{len} reaches past the end of the {size}-byte volume")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the ring is full, so the mark {label:?} could not be recorded; retry once the shipper has caught up")]
    MarkNotRecorded { label: String },
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    ActivityLog(#[from] ActivityLogError),
}

/// One request on the protected volume.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
    },
    Fua {
        offset: u64,
        data: &'a [u8],
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Mark {
        label: &'a str,
        app_consistent: bool,
    },
}

/// What happened to a request's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Captured {
    /// Recorded in the ring with this seq.
    Recorded(u64),
    /// The ring was full: the range was marked dirty for resync. The seq was taken
    /// (and is never used again), so the request still has its place in the order.
    MarkedDirty(u64),
}

/// The capture path over one backing file or block device.
pub struct Capture {
    path: PathBuf,
    backing: File,
    size: u64,
    uring: Uring,
    recorder: Recorder,
}

impl Capture {
    /// Opens `backing` read-write (with `O_DIRECT` when `direct`; the caller's buffers
    /// must then be aligned) in front of `ring`.
    pub fn open(backing: &Path, ring: Producer, direct: bool) -> Result<Capture, CaptureError> {
        Capture::open_with(backing, Recorder::new(ring), direct)
    }

    fn open_with(
        backing: &Path,
        recorder: Recorder,
        direct: bool,
    ) -> Result<Capture, CaptureError> {
        let err = |source| CaptureError::Backing {
            path: backing.into(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(backing).map_err(err)?;
        let size = device_size(&file).map_err(err)?;
        Ok(Capture {
            path: backing.into(),
            backing: file,
            size,
            uring: Uring::new(8).map_err(err)?,
            recorder,
        })
    }

    /// [`Capture::open`] with an activity log at `log` (see [`crate::activity_log`]);
    /// returns what the log recovered from an unclean stop.
    pub fn open_with_activity_log(
        backing: &Path,
        ring: Producer,
        direct: bool,
        log: &Path,
    ) -> Result<(Capture, Recovered), CaptureError> {
        let size = ring.geometry().device_bytes;
        let (log, recovered) =
            ActivityLog::open(log, size, crate::activity_log::DEFAULT_EXTENT_BYTES)?;
        let recorder = Recorder::with_activity_log(ring, log, &recovered)?;
        let capture = Capture::open_with(backing, recorder, direct)?;
        Ok((capture, recovered))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// See [`Recorder::set_resync_compare`].
    pub fn set_resync_compare(&mut self, wait: Option<Duration>) {
        self.recorder.set_resync_compare(wait);
    }

    pub fn backing(&self) -> &File {
        &self.backing
    }

    /// Performs `request` on the backing, then records it. Returns only after both.
    /// When a resync pass is due, runs it first (see the module docs).
    pub fn handle(&mut self, request: Request<'_>) -> Result<Captured, CaptureError> {
        self.tick()?;
        self.handle_request(request)
    }

    /// What the ublk server's background task does each tick: runs a resync pass when
    /// one is due, records MARKs asked for through the ring header, cools activity-log
    /// extents, and moves a digest resync along (see [`crate::ring::resync`]): starts
    /// one that was asked for, takes the replica digests once delivered, compares
    /// blocks while the ring is at most half full. Returns whether a digest resync is
    /// still pending. [`Capture::handle`] calls it before each request.
    pub fn tick(&mut self) -> Result<bool, CaptureError> {
        if self.recorder.resync_due() {
            self.resync()?;
        }
        self.recorder.serve_mark_requests();
        self.recorder.serve_group_cuts();
        // Between requests nothing is in flight.
        if let Some(released) = self.recorder.activity_log_evictable(&[]) {
            let fd = self.backing.as_raw_fd();
            self.uring
                .fsync(fd, true)
                .map_err(|source| CaptureError::Backing {
                    path: self.path.clone(),
                    source,
                })?;
            self.recorder.activity_log_evict(released, &[]);
        }
        self.recorder.digest_poll();
        let fd = self.backing.as_raw_fd();
        // Allocated only when a block is due: this runs before every request.
        let mut buf = Vec::new();
        while let Some((offset, len)) = self.recorder.digest_next() {
            buf.resize(MAX_BLOCK_BYTES as usize, 0);
            let data = &mut buf[..len as usize];
            if let Err(source) = self.uring.read_exact_at(fd, data, offset) {
                self.recorder.digest_skip(offset, len);
                return Err(CaptureError::Backing {
                    path: self.path.clone(),
                    source,
                });
            }
            self.recorder.digest_compare(offset, data);
        }
        Ok(self.recorder.digest_pending())
    }

    /// Whether the replica may lack writes until a resync ends: writes were lost to
    /// the bitmap and wait for a pass, or a digest pass is asked for or running.
    pub fn needs_resync(&self) -> bool {
        self.recorder.needs_resync() || self.recorder.digest_pending()
    }

    /// Re-records every dirty region from the backing, then the resync-done MARK; or,
    /// when resyncing by comparison, starts a digest pass over them (which [`Capture::tick`]
    /// carries on).
    pub fn resync(&mut self) -> Result<(), CaptureError> {
        let fd = self.backing.as_raw_fd();
        let pieces = self.recorder.begin_resync();
        let mut buf = vec![0u8; pieces.iter().map(|p| p.1).max().unwrap_or(0) as usize];
        for (i, &(offset, len)) in pieces.iter().enumerate() {
            if !self.recorder.has_room_for_resync() {
                // The ring is half full again: the rest waits for the next pass.
                for &(offset, len) in &pieces[i..] {
                    self.recorder.mark_dirty(offset, len);
                }
                break;
            }
            let data = &mut buf[..len as usize];
            if let Err(source) = self.uring.read_exact_at(fd, data, offset) {
                // Nothing is lost: what is not re-recorded goes back to the bitmap.
                for &(offset, len) in &pieces[i..] {
                    self.recorder.mark_dirty(offset, len);
                }
                return Err(CaptureError::Backing {
                    path: self.path.clone(),
                    source,
                });
            }
            self.recorder.record(Op::Write, offset, len, data, 0);
        }
        self.recorder.end_resync();
        Ok(())
    }

    fn handle_request(&mut self, request: Request<'_>) -> Result<Captured, CaptureError> {
        let fd = self.backing.as_raw_fd();
        let err = |source| CaptureError::Backing {
            path: self.path.clone(),
            source,
        };
        match request {
            Request::Write { offset, data } | Request::Fua { offset, data } => {
                self.check_range(offset, data.len() as u64)?;
                self.recorder
                    .activity_log_ensure(offset, data.len() as u64)?;
                let fua = matches!(request, Request::Fua { .. });
                let done = self.uring.write_all_at(fd, data, offset).and_then(|()| {
                    if fua {
                        self.uring.fsync(fd, true)
                    } else {
                        Ok(())
                    }
                });
                if let Err(source) = done {
                    return Err(self.failed(offset, data.len() as u64, true, source));
                }
                let op = if fua { Op::Fua } else { Op::Write };
                Ok(self.recorder.record(op, offset, data.len() as u64, data, 0))
            }
            Request::Flush => {
                self.uring.fsync(fd, false).map_err(err)?;
                Ok(self.recorder.record(Op::Flush, 0, 0, &[], 0))
            }
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len } => {
                self.check_range(offset, len)?;
                self.recorder.activity_log_ensure(offset, len)?;
                let op = match request {
                    Request::Discard { .. } => Op::Discard,
                    _ => Op::WriteZeroes,
                };
                // Both read back as zeroes; a hole does that on every file system.
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                if let Err(source) = self
                    .uring
                    .run_batch(fd, [IoOp::Fallocate { offset, len, mode }])
                {
                    return Err(self.failed(offset, len, false, source));
                }
                Ok(self.recorder.record(op, offset, len, &[], 0))
            }
            Request::Mark {
                label,
                app_consistent,
            } => {
                let flags = if app_consistent {
                    MARK_APP_CONSISTENT
                } else {
                    0
                };
                match self
                    .recorder
                    .record(Op::Mark, 0, label.len() as u64, label.as_bytes(), flags)
                {
                    Captured::MarkedDirty(_) => Err(CaptureError::MarkNotRecorded {
                        label: label.into(),
                    }),
                    recorded => Ok(recorded),
                }
            }
        }
    }

    /// A data-changing request failed on the backing: [`Recorder::backing_failed`].
    fn failed(&self, offset: u64, len: u64, is_write: bool, source: io::Error) -> CaptureError {
        let errno = source.raw_os_error().unwrap_or(0);
        self.recorder.backing_failed(offset, len, is_write, errno);
        CaptureError::Backing {
            path: self.path.clone(),
            source,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), CaptureError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(CaptureError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

/// Whether a failed data-changing backing operation may have changed part of its
/// range: a write always may (a short write, then ENOSPC; or its FUA sync failed); a
/// hole punch or zero-range that the backing does not support (EOPNOTSUPP) or refuses
/// (EINVAL) did nothing. Such a range is marked dirty rather than trusted unchanged, so
/// the replica gets what the backing holds; an unsupported discard costs no resync.
fn failure_may_change_data(is_write: bool, errno: i32) -> bool {
    is_write || !matches!(errno, libc::EOPNOTSUPP | libc::EINVAL)
}

/// The half of capture that follows a completed request: take the next seq and record
/// it, or mark its range dirty when the ring is full. The ublk server calls this from
/// its completion path; [`Capture::handle`] calls it after its own backing I/O.
pub struct Recorder {
    ring: Producer,
    /// The running digest pass, if any.
    digest: Option<DigestPass>,
    /// The persistent set of hot extents, if the volume has one.
    activity_log: Option<ActivityLog>,
    /// The `released_seq` the activity log was last scanned for cooling at.
    activity_log_scanned_at: u64,
    /// Resync dirty regions by comparing digests, waiting this long for the replica's
    /// before re-recording them whole; `None`: re-record them whole at once.
    compare_wait: Option<Duration>,
}

/// Label of the MARK that ends a resync pass.
const RESYNC_DONE_LABEL: &[u8] = b"resync-done";
/// Label of the MARK that begins a digest resync.
const RESYNC_BEGIN_LABEL: &[u8] = b"digest-resync-begin";

/// Largest piece a resync pass re-records at once.
pub const RESYNC_CHUNK_BYTES: u64 = 256 << 10;

impl Recorder {
    pub fn new(ring: Producer) -> Recorder {
        if resync_interrupted(&ring) {
            // Which regions the dead pass took is unknown: all of them.
            let size = ring.geometry().device_bytes;
            log::warn!("a resync pass was interrupted; resyncing the whole disk");
            ring.mark_dirty(0, size);
        }
        Recorder {
            ring,
            digest: None,
            activity_log: None,
            activity_log_scanned_at: 0,
            compare_wait: None,
        }
    }

    /// Resync dirty regions (after an overflow or an unclean stop) by comparing them
    /// with the replica's digests, waiting up to `wait` for those before re-recording
    /// the regions whole; `None` (the default) re-records them whole at once, which
    /// needs no recovery side.
    pub fn set_resync_compare(&mut self, wait: Option<Duration>) {
        self.compare_wait = wait;
    }

    /// A recorder with an activity log (see [`crate::activity_log`]). When the ring is
    /// new (the previous one was lost with the machine) the extents the log recovered
    /// hot are marked dirty, so the resync pass re-records exactly those, and seqs
    /// continue above every seq handed out before. When the ring survived (only the
    /// server restarted), the records it holds cover those extents already.
    pub fn with_activity_log(
        mut ring: Producer,
        mut log: ActivityLog,
        recovered: &Recovered,
    ) -> Result<Recorder, ActivityLogError> {
        if ring.is_new() {
            ring.raise_next_seq(recovered.seq_floor);
            for &(offset, len) in &recovered.extents {
                ring.mark_dirty(offset, len);
            }
            if recovered.hot > 0 {
                log::warn!(
                    "activity log {}: unclean stop; resyncing {} of {} extents ({} bytes)",
                    log.path().display(),
                    recovered.hot,
                    recovered.total,
                    recovered.extents.iter().map(|e| e.1).sum::<u64>()
                );
            }
        } else {
            // Every record before the restart is in the ring (or already staged).
            log.unpin(ring.own_next_seq().saturating_sub(1));
            if resync_interrupted(&ring) {
                // Extents stay hot while a resync is pending, so the hot ones cover
                // whatever the dead pass took from the bitmap.
                log::warn!(
                    "a resync pass was interrupted; resyncing the {} hot extents",
                    recovered.hot
                );
                for &(offset, len) in &recovered.extents {
                    ring.mark_dirty(offset, len);
                }
            }
        }
        log.reserve_seq(ring.next_seq_peek())?;
        Ok(Recorder {
            ring,
            digest: None,
            activity_log: Some(log),
            activity_log_scanned_at: 0,
            compare_wait: None,
        })
    }

    /// Makes the extents of `[offset, offset + len)` hot in the activity log, durably,
    /// before the caller writes them on the backing (no-op without a log).
    pub fn activity_log_ensure(&mut self, offset: u64, len: u64) -> Result<(), ActivityLogError> {
        match &mut self.activity_log {
            Some(log) => log.ensure(offset, len),
            None => Ok(()),
        }
    }

    /// The released seq to cool activity-log extents by, if any would cool now: only
    /// while no resync is pending (regions in the dirty bitmap have no record yet).
    /// The caller flushes the backing, then calls [`Recorder::activity_log_evict`] with
    /// it (see [`crate::activity_log`] for why the flush comes first).
    /// Scans the log only when `released_seq` moved since the last scan: `Capture`
    /// calls this before every request. Extents touched by `in_flight` writes do not
    /// count (they cannot cool yet: see [`Recorder::activity_log_evict`]), so they cost
    /// no flush; they can cool only once their records are released, which moves
    /// `released_seq` and brings a new scan.
    pub fn activity_log_evictable(&mut self, in_flight: &[(u64, u64)]) -> Option<u64> {
        let log = self.activity_log.as_ref()?;
        let released = self.ring.released_seq();
        if released == self.activity_log_scanned_at {
            return None;
        }
        let idle = !self.ring.overflowed() && !self.ring.resync_progress().resync;
        if !idle {
            return None; // scan again once the resync is over
        }
        self.activity_log_scanned_at = released;
        log.would_cool(released, in_flight).then_some(released)
    }

    /// Cools the extents whose records up to `released_seq` are staged, except those
    /// touched by `in_flight` writes (made hot, not yet recorded); call after the
    /// backing was flushed.
    pub fn activity_log_evict(&mut self, released_seq: u64, in_flight: &[(u64, u64)]) {
        if let Some(log) = &mut self.activity_log {
            if let Err(e) = log.evict(released_seq, in_flight) {
                log::warn!("{e}");
            }
        }
    }

    /// Whether a resync pass should run now: writes were lost to the bitmap and the
    /// ring is at most half full again. When resyncing by comparison, not while a
    /// digest pass is pending: one pass at a time, and a write lost meanwhile either
    /// touched a block that pass has yet to compare (it re-records it) or waits in the
    /// bitmap for the next pass.
    pub fn resync_due(&self) -> bool {
        self.ring.overflowed()
            && self.has_room_for_resync()
            && !(self.compare_wait.is_some() && self.digest_pending())
    }

    /// Whether the ring is at most half full: a resync pass records only then, so it
    /// does not overflow the ring itself.
    pub fn has_room_for_resync(&self) -> bool {
        self.ring.used_bytes() <= self.ring.geometry().capacity_bytes / 2
    }

    /// Starts a resync pass: takes the dirty regions from the bitmap and returns them
    /// cut into pieces of at most [`RESYNC_CHUNK_BYTES`] (and at most a quarter of the
    /// ring, so each fits) for the caller to re-record. When resyncing by comparison it
    /// starts a restricted digest pass over them instead and returns nothing.
    pub fn begin_resync(&mut self) -> Vec<(u64, u64)> {
        let regions = self.ring.begin_resync();
        if self.compare_wait.is_some() && !regions.is_empty() {
            self.begin_restricted_pass(&regions);
            return Vec::new();
        }
        let piece = RESYNC_CHUNK_BYTES
            .min(self.ring.geometry().capacity_bytes / 4 / 512 * 512)
            .max(512);
        let mut pieces = Vec::new();
        for (offset, len) in regions {
            let mut at = offset;
            while at < offset + len {
                let n = piece.min(offset + len - at);
                pieces.push((at, n));
                at += n;
            }
        }
        pieces
    }

    /// Marks a region dirty again (e.g. its resync read failed): the next pass takes it.
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        self.ring.mark_dirty(offset, len);
    }

    /// A data-changing request (a write when `is_write`, else a hole punch or
    /// zero-range) failed on the backing with `errno` and is not recorded. When it may
    /// have changed part of its range ([`failure_may_change_data`]) the range is marked
    /// dirty, so the resync sends whatever the backing now holds there. Returns whether
    /// it was marked.
    pub fn backing_failed(&self, offset: u64, len: u64, is_write: bool, errno: i32) -> bool {
        let suspect = failure_may_change_data(is_write, errno);
        if suspect {
            self.mark_dirty(offset, len);
        }
        suspect
    }

    /// Whether writes were lost to the bitmap and wait for a resync pass.
    pub fn needs_resync(&self) -> bool {
        self.ring.overflowed()
    }

    /// Ends a resync pass: if nothing overflowed meanwhile, records the MARK after
    /// which the stream is consistent again, then lowers RESYNC. The MARK goes first,
    /// so a reader that finds RESYNC down also finds the MARK in the ring (unread) or
    /// already read: it never sees a consistent-looking ring with resync data unread.
    pub fn end_resync(&mut self) {
        if self.ring.overflowed() || self.ring.digest_resync_wanted() {
            return; // RESYNC stays up; another pass is due or running.
        }
        if let Captured::Recorded(seq) = self.record(
            Op::Mark,
            0,
            RESYNC_DONE_LABEL.len() as u64,
            RESYNC_DONE_LABEL,
            MARK_RESYNC_DONE,
        ) {
            self.ring.end_resync();
            if let Some(log) = &mut self.activity_log {
                log.unpin(seq);
            }
        }
    }

    /// Starts a restricted digest pass over `regions` (taken from the bitmap; RESYNC is
    /// up): a lost write happened before the begin MARK, so a replica holding every
    /// record up to the MARK lacks it and its block differs (see [`DigestPass`]).
    fn begin_restricted_pass(&mut self, regions: &[(u64, u64)]) {
        let label = RESYNC_BEGIN_LABEL;
        let Captured::Recorded(gen) =
            self.record(Op::Mark, 0, label.len() as u64, label, MARK_RESYNC_BEGIN)
        else {
            // The ring filled up (the record marked the bitmap): the regions wait too.
            for &(offset, len) in regions {
                self.ring.mark_dirty(offset, len);
            }
            return;
        };
        let block = usable_block_bytes(self.ring.resync_progress().block_bytes);
        let size = self.ring.geometry().device_bytes;
        let mut pass = DigestPass::restricted(gen, block, size, regions);
        let blocks = pass.restricted_blocks().expect("restricted");
        log::info!(
            "digest resync {gen}: comparing {} bytes in doubt after an overflow or unclean stop ({} blocks); waiting for the replica's digests",
            pass.total_bytes(),
            blocks.len()
        );
        if let Err(e) = write_digest_blocks(self.ring.path(), gen, blocks) {
            log::warn!("digest resync {gen}: listing the blocks: {e}; re-recording them whole");
            pass.resend_all();
        }
        self.ring.begin_digest_pass(gen, pass.total_bytes(), true);
        self.digest = Some(pass);
    }

    /// Starts a digest pass that was asked for, or takes the replica digests once the
    /// consumer delivered them, or gives up waiting for them (a restricted pass, after
    /// the compare wait). Cheap when there is nothing to do: call it every tick.
    pub fn digest_poll(&mut self) {
        match &mut self.digest {
            None if self.ring.digest_resync_wanted() => {
                let label = RESYNC_BEGIN_LABEL;
                let len = label.len() as u64;
                // A full ring: the request stays up and the next poll tries again.
                if let Captured::Recorded(gen) =
                    self.record(Op::Mark, 0, len, label, MARK_RESYNC_BEGIN)
                {
                    let block = usable_block_bytes(self.ring.resync_progress().block_bytes);
                    let size = self.ring.geometry().device_bytes;
                    self.ring.begin_digest_pass(gen, size, false);
                    self.digest = Some(DigestPass::new(gen, block, size));
                    log::info!(
                        "digest resync {gen}: begun over {size} bytes in {block}-byte blocks; waiting for the replica's digests"
                    );
                }
            }
            Some(pass) if pass.waiting_for_digests() && self.ring.digests_ready() => {
                let path = digests_path(self.ring.path());
                let answer = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        bincode::deserialize::<DigestAnswer>(&b).map_err(|e| e.to_string())
                    })
                    .and_then(|answer| pass.accept(answer));
                match answer {
                    Ok(()) => log::info!("digest resync {}: comparing blocks", pass.gen()),
                    Err(e) => {
                        log::warn!(
                            "digest resync {}: {}: {e}; asking again",
                            pass.gen(),
                            path.display()
                        );
                        self.ring.reject_digests();
                    }
                }
            }
            Some(pass)
                if pass.waiting_for_digests()
                    && pass.restricted_blocks().is_some()
                    && self.compare_wait.is_some_and(|wait| pass.age() >= wait) =>
            {
                log::warn!(
                    "digest resync {}: no replica digests after {:.0?}; re-recording the {} bytes in doubt whole",
                    pass.gen(),
                    pass.age(),
                    pass.total_bytes()
                );
                pass.resend_all();
            }
            _ => {}
        }
    }

    /// The next block a digest pass compares, while the ring is at most half full.
    pub fn digest_next(&self) -> Option<(u64, u64)> {
        self.digest
            .as_ref()
            .filter(|_| self.has_room_for_resync())
            .and_then(DigestPass::next)
    }

    /// Compares the block [`Recorder::digest_next`] returned (its source bytes are
    /// `data`, read under the write claim) and re-records it if it differs.
    pub fn digest_compare(&mut self, offset: u64, data: &[u8]) {
        let pass = self.digest.as_mut().expect("digest_next returned a block");
        if pass.compare(data) {
            // Pieces of at most a quarter ring, so each fits once the ring has room.
            let piece = (self.ring.geometry().capacity_bytes / 4 / 512 * 512).max(512) as usize;
            for (i, chunk) in data.chunks(piece).enumerate() {
                let at = offset + (i * piece) as u64;
                self.record(Op::Write, at, chunk.len() as u64, chunk, 0);
            }
        }
        self.digest_step_done();
    }

    /// Skips a block whose read failed, leaving it to the overflow resync.
    pub fn digest_skip(&mut self, offset: u64, len: u64) {
        self.ring.mark_dirty(offset, len);
        if let Some(pass) = &mut self.digest {
            pass.skip();
        }
        self.digest_step_done();
    }

    fn digest_step_done(&mut self) {
        let Some(pass) = &self.digest else { return };
        self.ring
            .set_digest_progress(pass.done_bytes(), pass.sent_bytes());
        if pass.finished() {
            log::info!(
                "digest resync {}: done; {} of {} bytes differed and were re-recorded",
                pass.gen(),
                pass.sent_bytes(),
                pass.done_bytes()
            );
            self.digest = None;
            // ACTIVE goes down before the done MARK, so its reader sees it down.
            self.ring.finish_digest_pass();
            self.end_resync();
        }
    }

    /// Records the MARK operators asked for through the ring header (`shipper mark`),
    /// if any. A full ring leaves the request pending for the next tick.
    pub fn serve_mark_requests(&mut self) {
        let Some(req) = self.ring.pending_mark() else {
            return;
        };
        let (label, flags): (&[u8], u8) = if req.app_consistent {
            (b"app-consistent", MARK_APP_CONSISTENT)
        } else {
            (b"operator-mark", 0)
        };
        if let Captured::Recorded(seq) = self.record(Op::Mark, 0, label.len() as u64, label, flags)
        {
            self.ring.mark_served(req, seq);
            log::info!(
                "recorded {} MARK with seq {seq}",
                String::from_utf8_lossy(label)
            );
        }
    }

    /// Whether a digest resync is asked for or running.
    pub fn digest_pending(&self) -> bool {
        self.digest.is_some() || self.ring.digest_resync_wanted()
    }

    /// Records a completed request; on a full ring marks its range dirty instead.
    pub fn record(&mut self, op: Op, offset: u64, len: u64, data: &[u8], flags: u8) -> Captured {
        if let Some(pass) = &mut self.digest {
            if op.modifies_data() {
                pass.touch(offset, len);
            }
        }
        let seq = self.take_seq();
        if let (Some(log), true) = (&mut self.activity_log, op.modifies_data()) {
            log.note(offset, len, seq);
        }
        self.push(seq, op, offset, len, data, flags)
    }

    /// Takes the seq for a record. In a consistency group, first records one MARK for
    /// the group cuts below it that this ring has not recorded yet, with that seq, and
    /// takes another (which may show a newer cut: hence the loop); see
    /// [`crate::ring::group`].
    fn take_seq(&mut self) -> u64 {
        loop {
            let taken = self.ring.take_seq();
            if let Some(log) = &mut self.activity_log {
                // Seqs stay below the persisted reservation, so a new ring after a
                // crash can start above every seq handed out (see activity_log). In
                // a group other volumes take seqs too, so this checks the seq taken.
                if let Err(e) = log.reserve_seq(taken.seq + 1) {
                    log::error!("{e}");
                }
            }
            let Some(cuts) = taken.group_cut else {
                return taken.seq;
            };
            let label = cuts.encode();
            let label = label.as_bytes();
            let flags = if self.ring.group_cut_app_consistent(&cuts) {
                MARK_GROUP_CUT | MARK_APP_CONSISTENT
            } else {
                MARK_GROUP_CUT
            };
            let outcome = self.push(taken.seq, Op::Mark, 0, label.len() as u64, label, flags);
            self.ring.group_cut_recorded(cuts.last);
            log::debug!("group cuts {}..={}: {outcome:?}", cuts.first, cuts.last);
        }
    }

    /// Records the group cuts made since this ring's last request (an idle volume's
    /// share of a cut; a busy one records them with its next request).
    pub fn serve_group_cuts(&mut self) {
        if self.ring.group_cut_pending() {
            // The seq taken here is left unused: a gap, as after a killed producer.
            self.take_seq();
        }
    }

    /// Pushes one record with a seq already taken; on a full ring marks its range
    /// dirty instead.
    fn push(
        &mut self,
        seq: u64,
        op: Op,
        offset: u64,
        len: u64,
        data: &[u8],
        flags: u8,
    ) -> Captured {
        let record = RecordRef {
            seq,
            op,
            flags,
            offset,
            len: len as u32,
            data,
        };
        // A request longer than u32::MAX bytes cannot be one record; the bitmap covers it.
        if len <= u64::from(u32::MAX) && self.ring.try_push(&record).is_ok() {
            return Captured::Recorded(seq);
        }
        if op.modifies_data() {
            self.ring.mark_dirty(offset, len);
        } else {
            // A lost FLUSH or MARK carries no data; flag overflow so the next
            // consistent point waits for a resync.
            self.ring.mark_dirty(0, 0);
        }
        Captured::MarkedDirty(seq)
    }
}

/// Whether a previous producer died in a resync pass: RESYNC is up with nothing left
/// to explain it (no overflow, no digest pass asked for or running), so the regions it
/// took from the bitmap may never have been re-recorded.
fn resync_interrupted(ring: &Producer) -> bool {
    ring.resync_progress().resync && !ring.overflowed() && !ring.digest_resync_wanted()
}

/// Size in bytes of a regular file or block device.
pub fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

#[cfg(test)]
mod tests {
    use super::failure_may_change_data;

    #[test]
    fn failed_writes_are_always_suspect_unsupported_punches_never() {
        assert!(failure_may_change_data(true, libc::ENOSPC));
        assert!(failure_may_change_data(true, libc::EOPNOTSUPP));
        assert!(failure_may_change_data(false, libc::EIO));
        assert!(failure_may_change_data(false, libc::ENOSPC));
        assert!(!failure_may_change_data(false, libc::EOPNOTSUPP));
        assert!(!failure_may_change_data(false, libc::EINVAL));
    }
}
