use super::group::GroupClock;
use super::layout::{
    FLAG_DIGESTS_READY, FLAG_DIGEST_ACTIVE, FLAG_DIGEST_REQUEST, FLAG_OVERFLOW, FLAG_RESYNC,
};
use super::layout::{OFF_GROUP_CUTS_SEEN, OFF_GROUP_ID};
use super::mark::{self, MarkRequest};
use super::proto::{ProducerCore, RingMem};
use super::resync::{self, ResyncProgress};
use super::shm::Shm;
use super::{futex, Full, RingError, RingGeometry};
use changelog::{GroupCutLabel, RecordRef};
use std::path::Path;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{fence, AtomicU64};

/// The writing end of a ring: blkfilter's capture layer. One per ring (enforced with a
/// lock on the file); `Send`, so it can live on the queue thread.
pub struct Producer {
    shm: Shm,
    core: ProducerCore,
    /// The consistency group's clock, when the volume is in one.
    group: Option<GroupClock>,
}

/// A seq from [`Producer::take_seq`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakenSeq {
    pub seq: u64,
    /// Group cuts below `seq` that this ring has no MARK of yet: record their MARK
    /// with `seq`, call [`Producer::group_cut_recorded`], and take another seq for the
    /// request (see [`super::group`]).
    pub group_cut: Option<GroupCutLabel>,
}

impl Producer {
    /// Creates the ring file at `path`, or reopens it with its positions, contents and
    /// sequence counter when it already exists with the same geometry (a producer
    /// restarting after a crash).
    ///
    /// Errors: [`RingError::GeometryMismatch`] if it exists with another geometry,
    /// [`RingError::Busy`] if another producer has it open, [`RingError::BadMagic`] if
    /// the path holds something else.
    pub fn create(path: &Path, geo: &RingGeometry) -> Result<Producer, RingError> {
        let shm = Shm::create(path, geo)?;
        let core = ProducerCore::resume(&shm);
        Ok(Producer {
            shm,
            core,
            group: None,
        })
    }

    /// Takes seqs from the consistency group's `clock` from now on. A ring that was in
    /// this clock's group before (a restarted server) carries on with the cuts it
    /// recorded; one that joins anew records the cuts made from now on. Either way the
    /// clock is raised above every seq this ring handed out, so its seqs keep growing.
    pub fn join_group(&mut self, clock: GroupClock) {
        let id = self.shm.header_u64(OFF_GROUP_ID).swap(clock.id(), Relaxed);
        let seen = self.shm.header_u64(OFF_GROUP_CUTS_SEEN);
        if id != clock.id() {
            seen.store(clock.cuts(), Relaxed);
        }
        clock.raise(self.shm.next_seq().load(Relaxed));
        self.group = Some(clock);
    }

    /// Takes seqs from the ring's own counter, out of any group it was in: a later
    /// [`Producer::join_group`] counts it as new there.
    pub fn leave_group(&mut self) {
        if self.shm.header_u64(OFF_GROUP_ID).swap(0, Relaxed) != 0 {
            log::warn!(
                "ring {} was in a consistency group and is attached without its group \
                 clock: it leaves the group (its volume has no share in later group cuts)",
                self.shm.path().display()
            );
        }
        self.group = None;
    }

    /// Copies `rec` into the ring and publishes it, waking the consumer if it sleeps.
    /// On [`Full`] nothing is written: mark the record's region with
    /// [`Producer::mark_dirty`] instead.
    ///
    /// # Panics
    /// If `rec.op` has a payload and `rec.data.len() != rec.len`.
    pub fn try_push(&mut self, rec: &RecordRef<'_>) -> Result<(), Full> {
        self.core.try_push(&self.shm, rec)?;
        self.wake_consumer();
        Ok(())
    }

    /// Marks the chunks covering `[offset, offset + len)` dirty and raises OVERFLOW; for
    /// a write that did not fit. A zero `len` (a lost FLUSH) raises only OVERFLOW.
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        self.shm.bitmap().mark(offset, len);
        // Release: a consumer that sees the flag (Acquire) sees the bits.
        self.shm.flags().fetch_or(FLAG_OVERFLOW, Release);
    }

    /// Whether records were lost to the dirty bitmap since the last resync pass began.
    pub fn overflowed(&self) -> bool {
        self.shm.flags().load(Acquire) & FLAG_OVERFLOW != 0
    }

    /// Bytes published but not yet released by the consumer.
    pub fn used_bytes(&self) -> u64 {
        self.core.published() - self.shm.load_released(Acquire)
    }

    /// Starts a resync pass: raises RESYNC, then takes the dirty extents (clearing the
    /// bitmap and OVERFLOW). The caller re-records every returned extent from the
    /// backing, then calls [`Producer::end_resync`]. Regions lost while the pass runs
    /// set OVERFLOW again and wait for the next pass.
    pub fn begin_resync(&self) -> Vec<(u64, u64)> {
        // RESYNC first: the consumer never sees both flags clear while regions are
        // still missing from the ring.
        self.shm.flags().fetch_or(FLAG_RESYNC, AcqRel);
        self.shm.flags().fetch_and(!FLAG_OVERFLOW, AcqRel);
        self.shm.bitmap().take()
    }

    /// Ends a resync pass; returns whether it lowered RESYNC. It stays up while
    /// another pass is due: the ring overflowed again meanwhile, or a digest resync is
    /// asked for or running.
    pub fn end_resync(&self) -> bool {
        let busy = FLAG_OVERFLOW | FLAG_DIGEST_REQUEST | FLAG_DIGEST_ACTIVE;
        self.shm
            .flags()
            .fetch_update(AcqRel, Acquire, |f| {
                (f & busy == 0).then_some(f & !FLAG_RESYNC)
            })
            .is_ok()
    }

    /// Whether a digest resync is asked for, or was running when a previous producer
    /// died (its touched-block set is gone, so it must start over).
    pub fn digest_resync_wanted(&self) -> bool {
        self.shm.flags().load(Acquire) & (FLAG_DIGEST_REQUEST | FLAG_DIGEST_ACTIVE) != 0
    }

    /// Starts a digest pass whose begin MARK has seq `gen` (see [`resync`]); a
    /// `restricted` one listed its blocks with [`resync::write_digest_blocks`] first.
    pub fn begin_digest_pass(&self, gen: u64, total_bytes: u64, restricted: bool) {
        resync::begin(&self.shm, gen, total_bytes, restricted);
    }

    /// Whether the consumer put the replica digests in place.
    pub fn digests_ready(&self) -> bool {
        self.shm.flags().load(Acquire) & FLAG_DIGESTS_READY != 0
    }

    /// The digests file was stale or unreadable: the consumer writes it again.
    pub fn reject_digests(&self) {
        resync::clear_ready(&self.shm);
    }

    pub fn set_digest_progress(&self, done_bytes: u64, sent_bytes: u64) {
        resync::set_progress(&self.shm, done_bytes, sent_bytes);
    }

    /// Lowers DIGEST_ACTIVE; the caller then records the done MARK and ends the resync.
    pub fn finish_digest_pass(&self) {
        resync::finish(&self.shm);
    }

    /// Every record up to this seq is durable in the shipper's staging.
    pub fn released_seq(&self) -> u64 {
        self.shm
            .header_u64(super::layout::OFF_RELEASED_SEQ)
            .load(Acquire)
    }

    /// Whether this ring has never recorded anything (just created, e.g. after the
    /// previous one was lost with the machine's memory).
    pub fn is_new(&self) -> bool {
        self.core.published() == 0 && self.shm.next_seq().load(Relaxed) == super::layout::FIRST_SEQ
    }

    /// Makes the next seq at least `floor` (seqs continue across a lost ring).
    pub fn raise_next_seq(&mut self, floor: u64) {
        self.shm.next_seq().fetch_max(floor, Relaxed);
        if let Some(clock) = &self.group {
            clock.raise(floor);
        }
    }

    /// MARKs operators asked for and the producer has not recorded yet.
    pub fn pending_mark(&self) -> Option<MarkRequest> {
        mark::pending(&self.shm)
    }

    /// Acknowledges the requests of `req`: their MARK has `seq`.
    pub fn mark_served(&self, req: MarkRequest, seq: u64) {
        mark::served(&self.shm, req, seq);
    }

    pub fn resync_progress(&self) -> ResyncProgress {
        resync::progress(&self.shm)
    }

    /// Takes the next sequence number: from the group clock in a consistency group,
    /// else from the ring's own counter. The ring's counter follows the group's, so a
    /// producer restarted outside the group continues above every seq it handed out.
    pub fn take_seq(&mut self) -> TakenSeq {
        let Some(clock) = &self.group else {
            return TakenSeq {
                seq: self.next_seq(),
                group_cut: None,
            };
        };
        let (seq, cuts) = clock.take();
        self.shm.next_seq().store(seq + 1, Relaxed);
        let recorded = self.group_cuts_recorded();
        TakenSeq {
            seq,
            group_cut: (cuts > recorded).then(|| GroupCutLabel {
                clock: clock.id(),
                first: recorded + 1,
                last: cuts,
                first_unix_ms: clock.cut_time(recorded + 1),
            }),
        }
    }

    fn group_cuts_recorded(&self) -> u64 {
        self.shm.header_u64(OFF_GROUP_CUTS_SEEN).load(Relaxed)
    }

    /// Whether the group clock has a cut this ring has not recorded (for an idle
    /// producer's housekeeping; recording it needs a seq from [`Producer::take_seq`]).
    pub fn group_cut_pending(&self) -> bool {
        self.group
            .as_ref()
            .is_some_and(|clock| clock.cuts() > self.group_cuts_recorded())
    }

    /// The MARK of group cuts up to `last` is in the ring (or, on a full ring, its loss
    /// is flagged as an overflow).
    pub fn group_cut_recorded(&mut self, last: u64) {
        // Release: a requester that sees it (RingControl) sees the MARK in the ring.
        self.shm
            .header_u64(OFF_GROUP_CUTS_SEEN)
            .fetch_max(last, Release);
    }

    /// Whether one of `cuts` was made application-consistent (file systems frozen).
    pub fn group_cut_app_consistent(&self, cuts: &GroupCutLabel) -> bool {
        self.group
            .as_ref()
            .and_then(|clock| clock.last_app_consistent_cut())
            .is_some_and(|cut| cuts.contains(cut))
    }

    /// Takes the next sequence number from the ring's own counter. The counter lives in
    /// the ring header, so a restarted producer continues where the dead one stopped.
    pub fn next_seq(&mut self) -> u64 {
        let counter: &AtomicU64 = self.shm.next_seq();
        // Relaxed: only the producer touches it; the value outlives the process in the
        // shared file either way.
        let seq = counter.load(Relaxed);
        counter.store(seq + 1, Relaxed);
        seq
    }

    /// The next seq of the ring's own counter: in a group, one above the last seq
    /// this ring took.
    pub fn own_next_seq(&self) -> u64 {
        self.shm.next_seq().load(Relaxed)
    }

    /// The seq [`Producer::take_seq`] would hand out next, without taking it (in a
    /// group, another volume may take it first).
    pub fn next_seq_peek(&self) -> u64 {
        match &self.group {
            Some(clock) => clock.peek().0,
            None => self.shm.next_seq().load(Relaxed),
        }
    }

    /// The producer position: bytes ever published.
    pub fn published(&self) -> u64 {
        self.core.published()
    }

    pub fn geometry(&self) -> RingGeometry {
        self.shm.geometry()
    }

    pub fn path(&self) -> &Path {
        self.shm.path()
    }

    fn wake_consumer(&self) {
        // Pairs with the fence in Consumer::wait: either the consumer sees the new
        // position before it sleeps, or we see it registered and wake it.
        fence(SeqCst);
        if self.shm.waiters().load(Relaxed) != 0 {
            // Release: a consumer that reads the new value sees the new position.
            self.shm.wake().fetch_add(1, Release);
            futex::wake_all(self.shm.wake());
        }
    }
}
