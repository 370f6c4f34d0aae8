//! The shared-memory ring between the capture layer and the shipper.
//!
//! One file per volume (in `/dev/shm` or a configured path), mapped by two processes:
//! blkfilter's ublk server is the single [`Producer`], the shipper the single
//! [`Consumer`]. The producer copies every completed request into the ring as a change
//! record (I1); the consumer reads the records in order and releases them once the
//! segment holding them is durable in staging (I4). When a record does not fit, the
//! producer marks its byte range in the dirty bitmap and raises OVERFLOW instead of
//! waiting; the shipper takes the dirty extents and resyncs them (I7).
//!
//! # File layout
//!
//! All integers little-endian, offsets in bytes from the start of the file. The fields
//! at 0..64 are written once at creation (magic last) and never change.
//!
//! ```text
//! file     = header bitmap data
//! header   = 4096 bytes:
//!   offset size field          written by  meaning
//!   0      8    magic          creator     "UBLKDRNG", stored last when the file is created
//!   8      4    version        creator     1
//!   12     4    header_bytes   creator     4096
//!   16     8    capacity       creator     bytes in the data area, multiple of 8, >= 256
//!   24     8    device_bytes   creator     size of the protected device
//!   32     4    chunk_bytes    creator     device bytes per bitmap bit, power of two >= 512
//!   36     4    reserved       creator     0
//!   40     8    bitmap_offset  creator     4096
//!   48     8    bitmap_words   creator     ceil(ceil(device_bytes / chunk_bytes) / 64)
//!   56     8    data_offset    creator     bitmap_offset + bitmap bytes rounded up to 4096
//!   64     8    published      producer    bytes ever published      (own cache line)
//!   128    8    released       consumer    bytes ever released       (own cache line)
//!   192    8    next_seq       producer    next sequence number      (own cache line)
//!   256    8    flags          both        bit 0 OVERFLOW: set by the producer, cleared
//!                                          by the consumer when it takes the bitmap
//!                                          bit 1 RESYNC: the stream is not consistent
//!                                          until the next resync-done MARK
//!                                          bit 2 DIGEST_REQUEST, bit 3 DIGEST_ACTIVE,
//!                                          bit 4 DIGESTS_READY, bit 5
//!                                          DIGEST_RESTRICTED: the digest resync
//!                                          handshake, see `resync`
//!   264    4    wake           producer    futex word, bumped to wake a sleeping consumer
//!   268    4    waiters        consumer    consumer threads about to sleep on `wake`
//!   320    8    resync_gen     producer    seq of the active digest pass's begin MARK
//!   328    8    resync_total   producer    bytes the digest pass compares
//!   336    8    resync_done    producer    bytes compared so far
//!   344    8    resync_sent    producer    bytes re-recorded because they differed
//!   352    4    resync_block   requester   digest block size (0 = 64 KiB)
//!   384    8    mark_requested requester   MARKs asked for by operators (a counter)
//!   392    8    mark_done      producer    MARK requests recorded (a counter)
//!   400    8    mark_seq       producer    seq of the last MARK recorded for a request
//!   408    8    mark_app       requester   1 if the asked MARK is app-consistent
//!   416    8    released_seq   consumer    every record up to this seq is durable in
//!                                          staging (for the activity log)
//!   424    8    group_cuts     producer    group cuts recorded in this ring (see `group`)
//!   432    8    group_id       producer    id of the group clock it takes seqs from, 0: none
//! bitmap   = bitmap_words x u64; bit b of word w set = chunk 64*w+b holds lost writes
//! data     = capacity bytes: a circular sequence of slots
//! slot     = record | wrap
//! record   = "REC1" op:u8 flags:u8 zero:u16 len:u32 size:u32 seq:u64 offset:u64 payload pad
//! payload  = len bytes if op has a payload (WRITE, FUA, MARK), else nothing
//! pad      = up to 7 bytes, so that size = align8(32 + payload length)
//! wrap     = "WRAP" zero:u32, then filler up to the end of the data area
//! ```
//!
//! # Positions and invariants
//!
//! `published` and `released` are monotonic byte counts; position `p` lives at data index
//! `p % capacity`. They never wrap (2^64 bytes is centuries of writes).
//!
//! * `released <= published <= released + capacity`, both multiples of 8 (checked on
//!   open and on every [`Consumer::peek`]).
//! * The bytes in `[released, published)` are whole slots, completely written before
//!   `published` passed them. They belong to the consumer; the producer writes only
//!   in `[published, released + capacity)`.
//! * A record never straddles the end of the data area: when the contiguous rest is too
//!   short, the producer writes a wrap marker there and the record at index 0, and
//!   publishes both with one store.
//! * Ordering: the producer writes a slot, then stores `published` with Release; the
//!   consumer loads it with Acquire before reading. The consumer finishes reading, then
//!   stores `released` with Release; the producer loads it with Acquire before it
//!   overwrites. The loom tests (`tests/loom.rs`) check exactly this handoff, on the
//!   same code ([`proto`]) that runs on the mapping.
//!
//! # When a record fits
//!
//! With `size = align8(32 + payload length)` and `contiguous = capacity - published %
//! capacity`, a record needs `size` bytes, or `contiguous + size` when it must wrap. It
//! is pushed when `size <= capacity / 2` and `published + need <= released + capacity`,
//! otherwise [`Producer::try_push`] returns [`Full`]. The half-capacity limit guarantees
//! that every admissible record fits once the consumer has caught up, wherever the head
//! is; larger records are always `Full` and go to the dirty bitmap.
//!
//! # Contract with the consumer
//!
//! A [`changelog::RecordRef`] borrowed from [`Consumer::peek`] points into the shared
//! mapping. It stays valid until the consumer releases past it; the caller must copy
//! what it needs before [`Consumer::release`]. The consumer may peek ahead of
//! `released` (the shipper reads records into a segment, then releases the whole
//! segment once it is durable).
//!
//! # Restarts
//!
//! * Producer killed: [`Producer::create`] with the same geometry reopens the ring and
//!   continues at `published` and `next_seq`. A slot it was writing but had not
//!   published is invisible and gets overwritten. A sequence number taken but not
//!   pushed leaves a gap in the sequence; numbers never repeat.
//! * Consumer killed: [`Consumer::open`] continues at `released`. Records it had read
//!   but not released are read again, so the shipper sees them at least once.
//!
//! Each role holds an open-file-description lock on its own byte of the file (producer
//! byte 0, consumer byte 1), so a second producer or consumer gets [`RingError::Busy`]
//! while the first is alive; the kernel drops the lock when a process dies.

mod bitmap;
mod consumer;
mod error;
mod futex;
pub mod group;
mod layout;
pub mod mark;
mod producer;
pub mod proto;
pub mod resync;
mod shm;
#[cfg(test)]
mod tests;

pub use consumer::Consumer;
pub use error::{Full, RingError};
pub use group::{Cut, GroupClock};
pub use layout::{DEFAULT_CHUNK_BYTES, MIN_CAPACITY_BYTES, SLOT_HEADER_BYTES};
pub use mark::MarkRequest;
pub use producer::{Producer, TakenSeq};
pub use resync::{digest_blocks_path, digests_path, ResyncProgress, RingControl};

use std::fmt;

/// The sizes a ring is created with; fixed for the life of the ring file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    /// Bytes in the data area: a multiple of 8, at least [`MIN_CAPACITY_BYTES`].
    pub capacity_bytes: u64,
    /// Size of the protected device; the dirty bitmap covers `[0, device_bytes)`.
    pub device_bytes: u64,
    /// Device bytes per dirty-bitmap bit: a power of two, at least 512.
    pub chunk_bytes: u32,
}

impl RingGeometry {
    /// A geometry with the default bitmap chunk ([`DEFAULT_CHUNK_BYTES`]).
    pub fn new(capacity_bytes: u64, device_bytes: u64) -> Self {
        RingGeometry {
            capacity_bytes,
            device_bytes,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }

    /// Checks the rules on each field, with a message saying which one is wrong.
    pub fn validate(&self) -> Result<(), RingError> {
        let bad = |what: String| Err(RingError::InvalidGeometry(what));
        if self.capacity_bytes & 7 != 0 || self.capacity_bytes < MIN_CAPACITY_BYTES {
            return bad(format!(
                "capacity {} bytes: must be a multiple of 8 and at least {MIN_CAPACITY_BYTES}",
                self.capacity_bytes
            ));
        }
        if !self.chunk_bytes.is_power_of_two() || self.chunk_bytes < 512 {
            return bad(format!(
                "bitmap chunk {} bytes: must be a power of two and at least 512",
                self.chunk_bytes
            ));
        }
        if layout::Layout::of(self).is_none() {
            return bad(format!("{self} does not fit in a 64-bit file size"));
        }
        Ok(())
    }
}

impl fmt::Display for RingGeometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "capacity {} bytes, device {} bytes, bitmap chunk {} bytes",
            self.capacity_bytes, self.device_bytes, self.chunk_bytes
        )
    }
}
