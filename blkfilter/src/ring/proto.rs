//! The lock-free core of the ring: how the producer and the consumer hand slots to each
//! other through two positions. It is generic over the memory it runs on ([`RingMem`]),
//! so the same code runs on the shared mapping ([`super::Producer`],
//! [`super::Consumer`]) and under the loom model checker over a heap buffer
//! (`tests/loom.rs`). Memory orderings are passed to [`RingMem`] explicitly, so a test
//! memory can also weaken them and show that loom catches the race.

use super::layout::{self, SlotHeader, SLOT_HEADER_BYTES, WRAP_MARKER};
use super::{Full, RingError};
use changelog::{Op, RecordRef};
use std::sync::atomic::Ordering::{self, Acquire, Relaxed, Release};

/// The memory a ring lives in: two positions and a data area of `capacity()` bytes.
pub trait RingMem {
    /// Bytes in the data area; a multiple of 8.
    fn capacity(&self) -> u64;
    fn load_published(&self, order: Ordering) -> u64;
    fn store_published(&self, pos: u64, order: Ordering);
    fn load_released(&self, order: Ordering) -> u64;
    /// Raises `released` to `pos` if it is behind; returns the previous value.
    fn fetch_max_released(&self, pos: u64, order: Ordering) -> u64;

    /// Copies `src` into the data area at index `at`.
    ///
    /// # Safety
    /// `at + src.len() <= capacity()`, and the protocol gives the caller these bytes: no
    /// other thread or process reads or writes them until the caller publishes.
    unsafe fn write(&self, at: u64, src: &[u8]);

    /// Copies `dst.len()` bytes from the data area at index `at` into `dst`.
    ///
    /// # Safety
    /// `at + dst.len() <= capacity()`, and the bytes are published and not yet released,
    /// so no one writes them meanwhile.
    unsafe fn read(&self, at: u64, dst: &mut [u8]);
}

/// The producer's side: its own copy of `published` (it is the only writer) and the
/// last `released` it saw, so it reads the consumer's cache line only when the ring
/// looks full.
#[derive(Debug)]
pub struct ProducerCore {
    published: u64,
    released_seen: u64,
}

impl ProducerCore {
    /// Continues from the positions in `mem` (a new ring, or one a killed producer left).
    pub fn resume<M: RingMem>(mem: &M) -> ProducerCore {
        ProducerCore {
            // Relaxed: no other producer exists, and a dead one's stores are visible.
            published: mem.load_published(Relaxed),
            released_seen: mem.load_released(Acquire),
        }
    }

    /// The producer position after the last successful push.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Copies `rec` into the ring and publishes it, or returns [`Full`] without writing
    /// anything visible.
    ///
    /// # Panics
    /// If `rec.op` carries a payload and `rec.data.len() != rec.len`: the record would
    /// be unreadable, so that is a bug in the caller.
    pub fn try_push<M: RingMem>(&mut self, mem: &M, rec: &RecordRef<'_>) -> Result<(), Full> {
        let payload: &[u8] = if rec.op.has_payload() { rec.data } else { &[] };
        assert_eq!(
            payload.len(),
            layout::payload_len(rec.op, rec.len),
            "record seq {}: {:?} with len {} but {} bytes of data",
            rec.seq,
            rec.op,
            rec.len,
            payload.len()
        );
        let capacity = mem.capacity();
        let size = layout::slot_bytes(payload.len());
        if size > layout::max_slot_bytes(capacity) {
            return Err(Full);
        }
        let index = self.published % capacity;
        let contiguous = capacity - index;
        let wraps = size > contiguous;
        let need = if wraps { contiguous + size } else { size };
        if !self.has_room(mem, need) {
            return Err(Full);
        }
        let at = if wraps { 0 } else { index };
        let header = SlotHeader::of(rec, size as u32).encode();
        // SAFETY: has_room showed [published, published + need) is below released +
        // capacity, so the consumer has released those bytes (and the Acquire load of
        // `released` ordered its reads before these writes); they map to [index,
        // capacity) plus [0, size) when wrapping, or [index, index + size) otherwise,
        // all inside the data area. Nobody reads them until the Release store below.
        unsafe {
            if wraps {
                mem.write(index, &WRAP_MARKER);
            }
            mem.write(at, &header);
            mem.write(at + SLOT_HEADER_BYTES as u64, payload);
        }
        // Padding bytes are left as they are: no reader looks at them.
        self.published += need;
        mem.store_published(self.published, Release);
        Ok(())
    }

    fn has_room<M: RingMem>(&mut self, mem: &M, need: u64) -> bool {
        let capacity = mem.capacity();
        if self.published + need - self.released_seen <= capacity {
            return true;
        }
        self.released_seen = mem.load_released(Acquire);
        self.published + need - self.released_seen <= capacity
    }
}

/// A record slot found by [`peek`]: its header fields and where its payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub seq: u64,
    pub op: Op,
    pub flags: u8,
    pub offset: u64,
    pub len: u32,
    /// Data-area index of the payload.
    pub data_at: u64,
    /// Payload bytes: `len` for ops with a payload, otherwise 0.
    pub data_len: usize,
    /// Position just past this record (and past the wrap marker before it, if any).
    pub next: u64,
}

/// The record at `pos`, skipping a wrap marker; `None` when `pos` is the published
/// end. Validates everything it reads, so a corrupt ring gives an error, never an
/// out-of-bounds access.
pub fn peek<M: RingMem>(mem: &M, pos: u64) -> Result<Option<Slot>, RingError> {
    let capacity = mem.capacity();
    // Released first: whoever stored it had seen `published` at least that far, and the
    // Acquire makes our load of `published` below see that too, so released <=
    // published holds in any sound ring even while another thread releases.
    let released = mem.load_released(Acquire);
    let published = mem.load_published(Acquire);
    if published < released || published & 7 != 0 {
        let what = format!("published {published} is behind released {released} or unaligned");
        return Err(RingError::Corrupt {
            pos: published,
            what,
        });
    }
    // `published - pos > capacity` means the producer may have reused the bytes at pos:
    // someone released past pos while it was being read.
    if pos < released || pos > published || published - pos > capacity || pos & 7 != 0 {
        return Err(RingError::BadPosition {
            pos,
            released,
            published,
        });
    }
    if pos == published {
        return Ok(None);
    }
    let corrupt = |pos: u64, what: String| RingError::Corrupt { pos, what };
    let mut pos = pos;
    let mut index = pos % capacity;
    let mut tag = [0u8; 8];
    // SAFETY: index and capacity are multiples of 8, so index + 8 <= capacity; pos <
    // published and both are multiples of 8, so these bytes are published.
    unsafe { mem.read(index, &mut tag) };
    if layout::is_wrap(&tag) {
        let contiguous = capacity - index;
        // The producer publishes a marker together with the record after it.
        if published - pos <= contiguous {
            return Err(corrupt(pos, "wrap marker without a record after it".into()));
        }
        pos += contiguous;
        index = 0;
    }
    let avail = published - pos;
    let header_len = SLOT_HEADER_BYTES as u64;
    if avail < header_len || capacity - index < header_len {
        return Err(corrupt(
            pos,
            format!("record header cut off ({avail} bytes published)"),
        ));
    }
    let mut raw = [0u8; SLOT_HEADER_BYTES];
    // SAFETY: checked just above: in bounds and published.
    unsafe { mem.read(index, &mut raw) };
    let h = SlotHeader::decode(&raw).map_err(|what| corrupt(pos, what))?;
    let size = u64::from(h.size);
    if size > avail || size > capacity - index {
        let what = format!("slot of {size} bytes runs past the published end or the data area");
        return Err(corrupt(pos, what));
    }
    Ok(Some(Slot {
        seq: h.seq,
        op: h.op,
        flags: h.flags,
        offset: h.offset,
        len: h.len,
        data_at: index + header_len,
        data_len: layout::payload_len(h.op, h.len),
        next: pos + size,
    }))
}

/// Gives the bytes before `pos` back to the producer. Releasing at or behind the
/// current position changes nothing.
///
/// # Panics
/// If `pos` is past the published end or not 8-aligned: a bug in the caller, and
/// going on would let the producer overwrite records not yet read.
pub fn release<M: RingMem>(mem: &M, pos: u64) {
    let published = mem.load_published(Acquire);
    assert!(
        pos <= published && pos & 7 == 0,
        "release({pos}) past published {published} or unaligned"
    );
    // Release: our reads of the slots happen before the producer reuses them.
    mem.fetch_max_released(pos, Release);
}
