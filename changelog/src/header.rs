//! The fixed segment header, format version 1.
//!
//! A segment file is `header ‖ body ‖ tag`. The header is 192 bytes, little-endian:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `UBLKDRSG` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | header length (192) |
//! | 12 | 4 | flags ([`flags`]) |
//! | 16 | 32 | volume id, ASCII, zero-padded |
//! | 48 | 8 | protection epoch (random per protection start, and per continuation after a dropped backlog: [`flags::NEW_EPOCH`]) |
//! | 56 | 8 | segment index (0, 1, 2, … within the epoch) |
//! | 64 | 8 | first seq |
//! | 72 | 8 | last seq (inclusive; the recovery point is `last seq + 1`) |
//! | 80 | 8 | creation time, ms since the Unix epoch |
//! | 88 | 4 | record count (≥ 1) |
//! | 92 | 1 | codec: 0 = stored, 1 = lz4 block |
//! | 93 | 1 | cipher: 1 = AES-256-GCM |
//! | 94 | 2 | reserved, 0 |
//! | 96 | 12 | nonce = epoch (8, LE) ‖ index (4, LE) |
//! | 108 | 4 | reserved, 0 |
//! | 112 | 8 | key id (see [`crate::Key::id`]) |
//! | 120 | 8 | plain length: the record bytes before compression |
//! | 128 | 8 | body length: the stored (compressed, encrypted) bytes; the 16-byte tag follows |
//! | 136 | 32 | previous segment's digest (zeroes for index 0) |
//! | 168 | 16 | reserved, 0 |
//! | 184 | 8 | header checksum: the first 8 bytes of SHA-256(header[0..184]) |
//!
//! Bytes `0..136` are the AES-GCM associated data, so every field that says what the
//! body is and where it belongs is authenticated by the tag. The previous digest is not
//! in the associated data, so segments can be sealed in parallel before their
//! predecessor's digest is known; it is bound instead by the chain: the segment digest is
//! `SHA-256(header ‖ tag)` over the whole header, and a verifier compares the field with
//! the digest it computed for the segment before.

use crate::error::{Error, Result};
use crate::key::hex;
use crate::volume::{VolumeId, VOLUME_ID_MAX};
use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 8] = *b"UBLKDRSG";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 192;
pub const TAG_LEN: usize = 16;
/// Bytes of the header covered by the AES-GCM associated data.
pub const AAD_LEN: usize = 136;
const PREV_DIGEST_AT: usize = 136;
const CHECKSUM_AT: usize = 184;

pub const CODEC_STORED: u8 = 0;
pub const CODEC_LZ4: u8 = 1;
pub const CIPHER_AES256GCM: u8 = 1;

/// Header flag bits.
pub mod flags {
    /// Written during initial replication: not a consistent point by itself (I7).
    pub const INITIAL_SYNC: u32 = 1;
    /// Written during a resync: not a consistent point by itself (I7).
    pub const RESYNC: u32 = 2;
    /// The segment end is a crash-consistent point (I3).
    pub const CRASH_POINT: u32 = 4;
    /// The segment ends with an application-consistent MARK.
    pub const APP_CONSISTENT: u32 = 8;
    /// The segment ends with a consistency-group cut's MARK (its label,
    /// [`crate::record::GroupCutLabel`], names the cuts): every volume of the group has
    /// a segment ending at the same cut, and together their states are one the group
    /// could have had after a power cut.
    pub const GROUP_MARK: u32 = 16;
    /// The segment continues its volume's chain under a new protection epoch: its
    /// epoch differs from its predecessor's, whose digest it links to as usual. The
    /// shipper starts one after dropping staged segments that never reached the store
    /// (a staged backlog over its limit): their indexes were sealed under the old
    /// epoch, and sealing those indexes again there would repeat a nonce. Only
    /// accepted at the next index with the right link ([`crate::ChainCursor::check`]).
    pub const NEW_EPOCH: u32 = 32;
    pub const ALL: u32 = 63;
}

pub type Digest32 = [u8; 32];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub flags: u32,
    pub volume: VolumeId,
    pub epoch: u64,
    pub index: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub created_unix_ms: u64,
    pub record_count: u32,
    pub codec: u8,
    pub cipher: u8,
    pub key_id: [u8; 8],
    pub plain_len: u64,
    pub body_len: u64,
    pub prev_digest: Digest32,
}

/// The AES-GCM nonce of segment `index` in `epoch`. Unique under one key as long as
/// epochs are random and indexes stay below 2^32 (checked when sealing).
pub fn nonce_for(epoch: u64, index: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&epoch.to_le_bytes());
    nonce[8..].copy_from_slice(&(index as u32).to_le_bytes());
    nonce
}

impl SegmentHeader {
    pub fn nonce(&self) -> [u8; 12] {
        nonce_for(self.epoch, self.index)
    }

    /// A name for messages: `volume vol0 segment 000000000000002a`.
    pub fn describe(&self) -> String {
        format!("volume {} segment {:016x}", self.volume, self.index)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        h[12..16].copy_from_slice(&self.flags.to_le_bytes());
        h[16..48].copy_from_slice(&self.volume.to_field());
        h[48..56].copy_from_slice(&self.epoch.to_le_bytes());
        h[56..64].copy_from_slice(&self.index.to_le_bytes());
        h[64..72].copy_from_slice(&self.first_seq.to_le_bytes());
        h[72..80].copy_from_slice(&self.last_seq.to_le_bytes());
        h[80..88].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        h[88..92].copy_from_slice(&self.record_count.to_le_bytes());
        h[92] = self.codec;
        h[93] = self.cipher;
        h[96..108].copy_from_slice(&self.nonce());
        h[112..120].copy_from_slice(&self.key_id);
        h[120..128].copy_from_slice(&self.plain_len.to_le_bytes());
        h[128..136].copy_from_slice(&self.body_len.to_le_bytes());
        h[PREV_DIGEST_AT..PREV_DIGEST_AT + 32].copy_from_slice(&self.prev_digest);
        let checksum = header_checksum(&h);
        h[CHECKSUM_AT..].copy_from_slice(&checksum);
        h
    }

    /// Parses and checks a header. `name` is used in error messages (a path or
    /// store key). Only structure is checked here; authenticity needs the key.
    pub fn decode(bytes: &[u8], name: &str) -> Result<SegmentHeader> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::corrupt(
                name,
                format!(
                    "{} bytes is shorter than the {HEADER_LEN}-byte header",
                    bytes.len()
                ),
            ));
        }
        let h: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("length checked");
        if h[0..8] != MAGIC {
            return Err(Error::corrupt(name, "bad magic: not a ublk-dr segment"));
        }
        let u16_at = |at: usize| u16::from_le_bytes(h[at..at + 2].try_into().expect("2"));
        let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8"));
        let version = u16_at(8);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                segment: name.into(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if h[CHECKSUM_AT..] != header_checksum(h) {
            return Err(Error::corrupt(name, "header checksum mismatch"));
        }
        if usize::from(u16_at(10)) != HEADER_LEN {
            return Err(Error::corrupt(
                name,
                format!("header length {} is not {HEADER_LEN}", u16_at(10)),
            ));
        }
        let volume_field: &[u8; VOLUME_ID_MAX] = h[16..48].try_into().expect("32");
        let volume = VolumeId::from_field(volume_field)
            .ok_or_else(|| Error::corrupt(name, "volume id field is not a valid volume id"))?;
        let header = SegmentHeader {
            flags: u32_at(12),
            volume,
            epoch: u64_at(48),
            index: u64_at(56),
            first_seq: u64_at(64),
            last_seq: u64_at(72),
            created_unix_ms: u64_at(80),
            record_count: u32_at(88),
            codec: h[92],
            cipher: h[93],
            key_id: h[112..120].try_into().expect("8"),
            plain_len: u64_at(120),
            body_len: u64_at(128),
            prev_digest: h[PREV_DIGEST_AT..PREV_DIGEST_AT + 32]
                .try_into()
                .expect("32"),
        };
        let problem = if header.flags & !flags::ALL != 0 {
            Some(format!("unknown flags {:#x}", header.flags & !flags::ALL))
        } else if header.codec > CODEC_LZ4 {
            Some(format!("unknown codec {}", header.codec))
        } else if header.cipher != CIPHER_AES256GCM {
            Some(format!("unknown cipher {}", header.cipher))
        } else if h[94..96] != [0, 0] || h[108..112] != [0; 4] || h[168..184] != [0; 16] {
            Some("reserved bytes are not zero".into())
        } else if h[96..108] != header.nonce() {
            Some("nonce does not match epoch and index".into())
        } else if header.record_count == 0 || header.first_seq > header.last_seq {
            Some(format!(
                "record count {} / seq range {}..={} is empty",
                header.record_count, header.first_seq, header.last_seq
            ))
        } else if header.codec == CODEC_STORED && header.body_len != header.plain_len {
            Some("stored body length differs from plain length".into())
        } else {
            None
        };
        match problem {
            Some(what) => Err(Error::corrupt(name, what)),
            None => Ok(header),
        }
    }

    /// Total file size of a segment with this header.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + self.body_len + TAG_LEN as u64
    }

    /// The recovery point this segment completes: every record with seq below it.
    pub fn end_seq(&self) -> u64 {
        self.last_seq + 1
    }

    pub fn key_id_hex(&self) -> String {
        hex(&self.key_id)
    }
}

fn header_checksum(h: &[u8; HEADER_LEN]) -> [u8; 8] {
    Sha256::digest(&h[..CHECKSUM_AT])[..8]
        .try_into()
        .expect("8")
}

/// `SHA-256(header ‖ tag)`: what the next segment's header carries as previous digest.
pub fn segment_digest(header: &[u8; HEADER_LEN], tag: &[u8; TAG_LEN]) -> Digest32 {
    Sha256::new()
        .chain_update(header)
        .chain_update(tag)
        .finalize()
        .into()
}

/// The associated data of a header: its first [`AAD_LEN`] bytes.
pub fn aad(header: &[u8; HEADER_LEN]) -> &[u8] {
    &header[..AAD_LEN]
}
