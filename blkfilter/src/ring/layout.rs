//! The one home of the ring's byte layout: header offsets, derived sizes, and the
//! encoding of slots. The grammar is in the parent module's doc.

use super::RingGeometry;
use changelog::{Op, RecordRef};

/// "UBLKDRNG", read as a little-endian u64 so it can be stored atomically.
pub const MAGIC: u64 = u64::from_le_bytes(*b"UBLKDRNG");
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: u64 = 4096;
const PAGE_BYTES: u64 = 4096;

/// Default device bytes per dirty-bitmap bit.
pub const DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;
/// Smallest data area a ring may have.
pub const MIN_CAPACITY_BYTES: u64 = 256;
/// Size of a record's fixed header in the ring (and of the smallest record).
pub const SLOT_HEADER_BYTES: usize = 32;

// Header fields, by byte offset.
pub const OFF_MAGIC: usize = 0;
pub const OFF_VERSION: usize = 8;
pub const OFF_HEADER_BYTES: usize = 12;
pub const OFF_CAPACITY: usize = 16;
pub const OFF_DEVICE_BYTES: usize = 24;
pub const OFF_CHUNK_BYTES: usize = 32;
pub const OFF_BITMAP_OFFSET: usize = 40;
pub const OFF_BITMAP_WORDS: usize = 48;
pub const OFF_DATA_OFFSET: usize = 56;
pub const OFF_PUBLISHED: usize = 64;
pub const OFF_RELEASED: usize = 128;
pub const OFF_NEXT_SEQ: usize = 192;
pub const OFF_FLAGS: usize = 256;
pub const OFF_WAKE: usize = 264;
pub const OFF_WAITERS: usize = 268;
pub const OFF_RESYNC_GEN: usize = 320;
pub const OFF_RESYNC_TOTAL: usize = 328;
pub const OFF_RESYNC_DONE: usize = 336;
pub const OFF_RESYNC_SENT: usize = 344;
pub const OFF_RESYNC_BLOCK: usize = 352;
pub const OFF_MARK_REQUESTED: usize = 384;
pub const OFF_MARK_DONE: usize = 392;
pub const OFF_MARK_SEQ: usize = 400;
pub const OFF_MARK_APP: usize = 408;
pub const OFF_RELEASED_SEQ: usize = 416;
pub const OFF_GROUP_CUTS_SEEN: usize = 424;
pub const OFF_GROUP_ID: usize = 432;

/// `flags` bit: records were lost to the dirty bitmap since it was last taken.
pub const FLAG_OVERFLOW: u64 = 1;
/// `flags` bit: the producer is re-recording the regions it took from the bitmap; the
/// replica is not consistent until the pass ends (with a resync-done MARK record).
pub const FLAG_RESYNC: u64 = 2;
/// `flags` bit: a whole-disk digest resync is asked for (by the shipper, or an operator
/// through `shipper resync`); the producer starts it and lowers this bit.
pub const FLAG_DIGEST_REQUEST: u64 = 4;
/// `flags` bit: the producer recorded a resync-begin MARK and runs a digest pass.
pub const FLAG_DIGEST_ACTIVE: u64 = 8;
/// `flags` bit: the consumer put the replica's digests for the active pass next to the
/// ring (`<ring>.digests`).
pub const FLAG_DIGESTS_READY: u64 = 16;
/// `flags` bit: the active digest pass is restricted to the blocks listed next to the
/// ring (`<ring>.digest-blocks`): the regions an overflow or an unclean stop left in
/// doubt.
pub const FLAG_DIGEST_RESTRICTED: u64 = 32;

/// The first sequence number of a new ring; 0 is never handed out.
pub const FIRST_SEQ: u64 = 1;

const REC_TAG: [u8; 4] = *b"REC1";
const WRAP_TAG: [u8; 4] = *b"WRAP";
/// A wrap marker: its tag and four zero bytes. It fits in any contiguous rest, which is
/// always a non-zero multiple of 8.
pub const WRAP_MARKER: [u8; 8] = [b'W', b'R', b'A', b'P', 0, 0, 0, 0];

/// Where the parts of a ring file are, derived from its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub bitmap_offset: u64,
    pub bitmap_words: u64,
    pub data_offset: u64,
    pub file_bytes: u64,
}

impl Layout {
    /// `None` when the sizes overflow (only a corrupt header can ask for that).
    pub fn of(geo: &RingGeometry) -> Option<Layout> {
        let chunk = u64::from(geo.chunk_bytes);
        if chunk == 0 {
            return None;
        }
        let chunks = geo.device_bytes.div_ceil(chunk);
        let bitmap_words = chunks.div_ceil(64);
        let bitmap_bytes = bitmap_words
            .checked_mul(8)?
            .checked_next_multiple_of(PAGE_BYTES)?;
        let data_offset = HEADER_BYTES.checked_add(bitmap_bytes)?;
        let file_bytes = data_offset.checked_add(geo.capacity_bytes)?;
        // The whole file is mapped, so it must fit the address space.
        usize::try_from(file_bytes).ok()?;
        Some(Layout {
            bitmap_offset: HEADER_BYTES,
            bitmap_words,
            data_offset,
            file_bytes,
        })
    }
}

/// Bytes a record's payload takes in the ring.
pub fn payload_len(op: Op, len: u32) -> usize {
    if op.has_payload() {
        len as usize
    } else {
        0
    }
}

/// Bytes a slot with `payload` bytes of payload takes: header + payload, 8-aligned.
pub fn slot_bytes(payload: usize) -> u64 {
    (SLOT_HEADER_BYTES as u64 + payload as u64).next_multiple_of(8)
}

/// The largest slot a ring of `capacity` bytes accepts: half of it (so any admissible
/// record fits after a wrap once the ring is drained), and what `size:u32` can say.
pub fn max_slot_bytes(capacity: u64) -> u64 {
    (capacity / 2).min(u64::from(u32::MAX)) & !7
}

/// The fields of a record slot's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotHeader {
    pub seq: u64,
    pub op: Op,
    pub flags: u8,
    pub offset: u64,
    pub len: u32,
    /// Bytes the whole slot takes, header and padding included.
    pub size: u32,
}

impl SlotHeader {
    pub fn of(rec: &RecordRef<'_>, size: u32) -> SlotHeader {
        SlotHeader {
            seq: rec.seq,
            op: rec.op,
            flags: rec.flags,
            offset: rec.offset,
            len: rec.len,
            size,
        }
    }

    pub fn encode(&self) -> [u8; SLOT_HEADER_BYTES] {
        let mut b = [0u8; SLOT_HEADER_BYTES];
        b[0..4].copy_from_slice(&REC_TAG);
        b[4] = self.op as u8;
        b[5] = self.flags;
        // b[6..8] stays zero.
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Decodes and checks a header read from the ring; the error says what is wrong.
    pub fn decode(b: &[u8; SLOT_HEADER_BYTES]) -> Result<SlotHeader, String> {
        if b[0..4] != REC_TAG {
            return Err(format!("no record tag (found bytes {:02x?})", &b[0..4]));
        }
        let op = Op::from_code(b[4]).ok_or_else(|| format!("unknown op code {}", b[4]))?;
        if b[6..8] != [0, 0] {
            return Err("reserved header bytes are not zero".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let h = SlotHeader {
            seq: u64_at(16),
            op,
            flags: b[5],
            offset: u64_at(24),
            len: u32_at(8),
            size: u32_at(12),
        };
        let expected = slot_bytes(payload_len(op, h.len));
        if u64::from(h.size) != expected {
            return Err(format!(
                "slot size {} does not match its payload (expected {expected})",
                h.size
            ));
        }
        Ok(h)
    }
}

/// Whether the 8 bytes at a slot start are a wrap marker.
pub fn is_wrap(b: &[u8; 8]) -> bool {
    b[0..4] == WRAP_TAG
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_do_not_overlap_their_lines() {
        // Each position owned by a different party sits on its own 64-byte line.
        let owned = [OFF_PUBLISHED, OFF_RELEASED, OFF_NEXT_SEQ, OFF_FLAGS];
        for pair in owned.windows(2) {
            assert!(pair[1] - pair[0] >= 64);
        }
        assert!(OFF_WAITERS + 4 <= HEADER_BYTES as usize);
        assert_eq!(OFF_WAKE % 4, 0);
    }

    #[test]
    fn slot_header_round_trip_and_checks() {
        let data = [1u8; 5];
        let rec = RecordRef {
            seq: 9,
            op: Op::Write,
            flags: 2,
            offset: 4096,
            len: 5,
            data: &data,
        };
        let h = SlotHeader::of(&rec, slot_bytes(5) as u32);
        assert_eq!(h.size, 40);
        assert_eq!(SlotHeader::decode(&h.encode()), Ok(h));

        let mut bad = h.encode();
        bad[12] = 48;
        assert!(SlotHeader::decode(&bad).unwrap_err().contains("slot size"));
        let mut bad = h.encode();
        bad[4] = 77;
        assert!(SlotHeader::decode(&bad).unwrap_err().contains("op code 77"));
        let mut bad = h.encode();
        bad[7] = 1;
        assert!(SlotHeader::decode(&bad).is_err());
        assert!(SlotHeader::decode(&[0; 32])
            .unwrap_err()
            .contains("no record tag"));
    }

    #[test]
    fn layout_sizes() {
        let geo = RingGeometry {
            capacity_bytes: 1 << 20,
            device_bytes: 1 << 30,
            chunk_bytes: 65536,
        };
        let l = Layout::of(&geo).unwrap();
        assert_eq!(l.bitmap_words, (1 << 14) / 64);
        assert_eq!(l.data_offset, 4096 + 4096);
        assert_eq!(l.file_bytes, 8192 + (1 << 20));
        let huge = RingGeometry {
            capacity_bytes: u64::MAX - 8,
            device_bytes: 1,
            chunk_bytes: 512,
        };
        assert_eq!(Layout::of(&huge), None);
        assert_eq!(max_slot_bytes(256), 128);
        assert_eq!(max_slot_bytes(260), 128);
        assert_eq!(max_slot_bytes(1 << 40), u64::from(u32::MAX) & !7);
    }
}
