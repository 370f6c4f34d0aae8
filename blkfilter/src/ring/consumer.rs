use super::layout::{FLAG_OVERFLOW, FLAG_RESYNC};
use super::proto::{self, RingMem};
use super::resync::{self, ResyncProgress};
use super::shm::Shm;
use super::{futex, RingError, RingGeometry};
use changelog::RecordRef;
use std::path::Path;
use std::sync::atomic::fence;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use std::time::{Duration, Instant};

/// The reading end of a ring: the shipper. One per ring (enforced with a lock on the
/// file); `Send + Sync`, so a reader thread can peek while a stager thread releases.
///
/// The bytes in `[released(), published())` belong to the consumer. A record returned
/// by [`Consumer::peek`] borrows them and stays valid until [`Consumer::release`]
/// passes it: copy what you need first.
pub struct Consumer {
    shm: Shm,
}

impl Consumer {
    /// Opens an existing ring. [`RingError::Busy`] if another consumer has it open.
    pub fn open(path: &Path) -> Result<Consumer, RingError> {
        let shm = Shm::open(path)?;
        // A consumer killed in `wait` left its registration behind; we hold the
        // consumer lock, so nobody else is waiting.
        shm.waiters().store(0, Relaxed);
        Ok(Consumer { shm })
    }

    /// The consumer position: bytes ever released.
    pub fn released(&self) -> u64 {
        self.shm.load_released(Acquire)
    }

    /// The producer position: bytes ever published.
    pub fn published(&self) -> u64 {
        self.shm.load_published(Acquire)
    }

    /// The record at `pos` and the position after it; `None` when `pos` is the
    /// published end. `pos` is [`Consumer::released`] or a position returned by an
    /// earlier peek. A corrupt slot gives [`RingError::Corrupt`], a position outside
    /// `[released, published]` [`RingError::BadPosition`].
    pub fn peek(&self, pos: u64) -> Result<Option<(RecordRef<'_>, u64)>, RingError> {
        let Some(slot) = proto::peek(&self.shm, pos)? else {
            return Ok(None);
        };
        // SAFETY: peek validated that the payload lies inside a published slot at or
        // after `released`; the producer leaves it alone until it is released, which the
        // documented contract forbids while the returned record is in use.
        let data = unsafe { self.shm.data_slice(slot.data_at, slot.data_len) };
        let rec = RecordRef {
            seq: slot.seq,
            op: slot.op,
            flags: slot.flags,
            offset: slot.offset,
            len: slot.len,
            data,
        };
        Ok(Some((rec, slot.next)))
    }

    /// Gives everything before `pos` back to the producer (after the records are durable
    /// elsewhere, I4). Releasing at or behind [`Consumer::released`] changes nothing.
    ///
    /// # Panics
    /// If `pos` is past [`Consumer::published`] or not 8-aligned.
    pub fn release(&self, pos: u64) {
        proto::release(&self.shm, pos);
    }

    /// Tells the producer every record up to `seq` is durable in staging (after the
    /// matching [`Consumer::release`]); its activity log cools extents by it.
    pub fn set_released_seq(&self, seq: u64) {
        self.shm
            .header_u64(super::layout::OFF_RELEASED_SEQ)
            .fetch_max(seq, AcqRel);
    }

    /// Sleeps until `published() > pos` or `timeout` passes, without spinning; returns
    /// whether data is there.
    pub fn wait(&self, pos: u64, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let (wake, waiters) = (self.shm.wake(), self.shm.waiters());
        loop {
            if self.published() > pos {
                return true;
            }
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if remaining.is_zero() {
                return false;
            }
            waiters.fetch_add(1, SeqCst);
            // Pairs with the fence in Producer::wake_consumer (see there).
            fence(SeqCst);
            let seen = wake.load(Acquire);
            if self.published() <= pos {
                futex::wait(wake, seen, remaining);
            }
            waiters.fetch_sub(1, Relaxed);
        }
    }

    /// Whether records were lost to the dirty bitmap since it was last taken.
    pub fn overflowed(&self) -> bool {
        self.shm.flags().load(Acquire) & FLAG_OVERFLOW != 0
    }

    /// Whether the producer is re-recording regions lost to an overflow.
    pub fn resyncing(&self) -> bool {
        self.shm.flags().load(Acquire) & FLAG_RESYNC != 0
    }

    /// The digest-resync handshake's state (see [`resync`]).
    pub fn resync_progress(&self) -> ResyncProgress {
        resync::progress(&self.shm)
    }

    /// Asks the producer for a whole-disk digest resync (step 1 of [`resync`]).
    pub fn request_digest_resync(&self, block_bytes: u32) {
        resync::request(&self.shm, block_bytes);
    }

    /// Tells the producer the replica digests are at [`resync::digests_path`].
    pub fn mark_digests_ready(&self) {
        resync::mark_ready(&self.shm);
    }

    /// Takes the dirty extents `(offset, len)`, merged and in order, clearing the bitmap
    /// and the OVERFLOW flag. Regions marked while this runs are either in the result or
    /// left marked with OVERFLOW set, never lost.
    pub fn take_dirty(&self) -> Vec<(u64, u64)> {
        // Flag first: a region marked after this sets the flag again, so nothing can
        // remain marked with the flag clear.
        self.shm.flags().fetch_and(!FLAG_OVERFLOW, AcqRel);
        self.shm.bitmap().take()
    }

    /// Bytes in the data area.
    pub fn capacity(&self) -> u64 {
        self.shm.capacity()
    }

    pub fn geometry(&self) -> RingGeometry {
        self.shm.geometry()
    }

    pub fn path(&self) -> &Path {
        self.shm.path()
    }
}
