//! Sealing and opening segments.
//!
//! Sealing is split in two so that the expensive part runs on worker threads:
//! [`seal`] compresses (lz4 block, or stored when that is not smaller or probes of a
//! large body say lz4 would not shrink it) and encrypts
//! (AES-256-GCM, associated data = header bytes `0..136`) one segment's records
//! ([`seal_owned`] does the same without copying a stored body: a [`PlainSegment`]
//! keeps room for the header in front of its records);
//! [`SealedSegment::link`] then, in index order, writes the previous segment's digest
//! into the header and yields the file bytes and this segment's digest.
//!
//! Opening checks, in this order, before any record is handed out (I6): header
//! structure and checksum, the place in the chain ([`ChainCursor::check`]), the key id,
//! the AES-GCM tag, decompression to exactly the declared length, and every record
//! (known op, in-range seq strictly increasing, count as declared).

use crate::error::{Error, Result};
use crate::header::*;
use crate::key::{hex, Key, KEY_LEN};
use crate::record::{RecordDecoder, RecordRef};
use crate::volume::VolumeId;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

/// Largest plain body a segment may carry; bounds memory when opening hostile input.
pub const MAX_PLAIN_LEN: u64 = 1 << 30;

/// Records collected for one segment, encoded but not yet compressed or encrypted.
#[derive(Clone, Debug, Default)]
pub struct PlainSegment {
    /// Room for the header ([`HEADER_LEN`] bytes, once a record is pushed), then the
    /// encoded records: [`seal_owned`] encrypts a body it stores uncompressed in place,
    /// and this buffer becomes the segment file without a copy.
    buf: Vec<u8>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_count: u32,
    /// Header flags ([`flags`]) to seal with.
    pub flags: u32,
}

impl PlainSegment {
    /// An empty segment that collects its records in `buf` (cleared first), reusing its
    /// allocation: a fresh 8 MiB buffer costs a page fault and a zeroed page per 4 KiB.
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        PlainSegment {
            buf,
            ..Default::default()
        }
    }

    /// A segment whose body is `body` as given, well formed or not (for tests, fuzzing
    /// of what sealing accepts and opening refuses, and benchmarks), with room for the
    /// tag, so [`seal_owned`] can store it without moving it.
    pub fn from_raw_body(body: &[u8], first_seq: u64, last_seq: u64, record_count: u32) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
        buf.resize(HEADER_LEN, 0);
        buf.extend_from_slice(body);
        PlainSegment {
            buf,
            first_seq,
            last_seq,
            record_count,
            flags: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// The encoded records.
    pub fn body(&self) -> &[u8] {
        self.buf.get(HEADER_LEN..).unwrap_or_default()
    }

    /// Appends a record. Sequence numbers must strictly increase.
    pub fn push(&mut self, record: &RecordRef<'_>) {
        assert!(
            self.is_empty() || record.seq > self.last_seq,
            "records must be pushed in seq order"
        );
        if self.is_empty() {
            self.first_seq = record.seq;
        }
        if self.buf.len() < HEADER_LEN {
            self.buf.resize(HEADER_LEN, 0);
        }
        self.last_seq = record.seq;
        self.record_count += 1;
        record.encode_into(&mut self.buf);
    }

    /// Makes room for `additional` more bytes of records, as [`Vec::reserve`].
    pub fn reserve(&mut self, additional: usize) {
        self.buf.reserve(additional);
    }
}

/// Where a segment goes: everything its header says besides the records.
#[derive(Clone, Debug)]
pub struct SealParams {
    pub volume: VolumeId,
    pub epoch: u64,
    pub index: u64,
    pub created_unix_ms: u64,
}

/// A compressed and encrypted segment whose previous digest is not filled in yet.
pub struct SealedSegment {
    header: SegmentHeader,
    /// The whole file; the header area is written by [`SealedSegment::link`].
    bytes: Vec<u8>,
}

/// A finished segment file.
#[derive(Clone, Debug)]
pub struct LinkedSegment {
    pub header: SegmentHeader,
    pub digest: Digest32,
    pub bytes: Vec<u8>,
}

/// Compresses and encrypts `plain`. Safe to call from many threads at once.
pub fn seal(plain: &PlainSegment, params: &SealParams, key: &Key) -> Result<SealedSegment> {
    check_sealable(plain, params)?;
    let body = plain.body();
    let mut bytes = Vec::new();
    if let Some(sealed) = compress(plain, params, key, &mut bytes)? {
        return Ok(sealed);
    }
    bytes.clear();
    bytes.reserve_exact(HEADER_LEN + body.len() + TAG_LEN);
    bytes.resize(HEADER_LEN, 0);
    bytes.extend_from_slice(body);
    encrypt(plain, body.len(), params, key, bytes, CODEC_STORED)
}

/// [`seal`] without copying: a body stored uncompressed is encrypted where it lies, in
/// `plain`'s buffer, which becomes the segment; `scratch` (any contents) receives the
/// compressed body otherwise. Returns the segment and the buffer it did not use, for
/// reuse. The output is byte for byte what [`seal`] gives.
pub fn seal_owned(
    mut plain: PlainSegment,
    params: &SealParams,
    key: &Key,
    mut scratch: Vec<u8>,
) -> Result<(SealedSegment, Vec<u8>)> {
    check_sealable(&plain, params)?;
    if let Some(sealed) = compress(&plain, params, key, &mut scratch)? {
        return Ok((sealed, plain.buf));
    }
    let plain_len = plain.body().len();
    let mut bytes = std::mem::take(&mut plain.buf);
    // Room for the header even if no record was pushed (a count set by hand), as `seal`.
    bytes.resize(bytes.len().max(HEADER_LEN), 0);
    let sealed = encrypt(&plain, plain_len, params, key, bytes, CODEC_STORED)?;
    Ok((sealed, scratch))
}

fn check_sealable(plain: &PlainSegment, params: &SealParams) -> Result<()> {
    if plain.is_empty() {
        return Err(Error::TooLarge {
            what: "a segment needs at least one record".into(),
        });
    }
    if params.index > u64::from(u32::MAX) {
        return Err(Error::TooLarge {
            what: format!(
                "segment index {} would reuse a nonce; start a new protection epoch",
                params.index
            ),
        });
    }
    let len = plain.body().len();
    if len as u64 > MAX_PLAIN_LEN {
        return Err(Error::TooLarge {
            what: format!("{len} bytes of records exceed {MAX_PLAIN_LEN}"),
        });
    }
    Ok(())
}

/// The segment sealed with lz4 in `out` (header room, then the compressed body), if
/// probes say lz4 is worth trying and it does shrink the body; else `None`.
fn compress(
    plain: &PlainSegment,
    params: &SealParams,
    key: &Key,
    out: &mut Vec<u8>,
) -> Result<Option<SealedSegment>> {
    let body = plain.body();
    if !worth_compressing(body) {
        return Ok(None);
    }
    // Not cleared first: lz4 overwrites what it uses, and a reused buffer then costs
    // no zero-fill.
    out.resize(
        HEADER_LEN + lz4_flex::block::get_maximum_output_size(body.len()),
        0,
    );
    let compressed = lz4_flex::block::compress_into(body, &mut out[HEADER_LEN..])
        .expect("output sized by get_maximum_output_size");
    if compressed >= body.len() {
        return Ok(None);
    }
    out.truncate(HEADER_LEN + compressed);
    encrypt(
        plain,
        body.len(),
        params,
        key,
        std::mem::take(out),
        CODEC_LZ4,
    )
    .map(Some)
}

/// Encrypts `bytes` (header room, then the `plain_len` bytes of records as `codec` left
/// them) in place, appends the tag, and writes the header without the previous digest
/// ([`SealedSegment::link`]). Only `plain`'s header fields are read.
fn encrypt(
    plain: &PlainSegment,
    plain_len: usize,
    params: &SealParams,
    key: &Key,
    mut bytes: Vec<u8>,
    codec: u8,
) -> Result<SealedSegment> {
    let header = SegmentHeader {
        flags: plain.flags,
        volume: params.volume.clone(),
        epoch: params.epoch,
        index: params.index,
        first_seq: plain.first_seq,
        last_seq: plain.last_seq,
        created_unix_ms: params.created_unix_ms,
        record_count: plain.record_count,
        codec,
        cipher: CIPHER_AES256GCM,
        key_id: key.id(),
        plain_len: plain_len as u64,
        body_len: (bytes.len() - HEADER_LEN) as u64,
        prev_digest: [0; 32],
    };
    let encoded = header.encode();
    let tag = cipher(key.bytes())
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(header.nonce()),
            Aad::from(aad(&encoded)),
            &mut bytes[HEADER_LEN..],
        )
        .map_err(|_| Error::TooLarge {
            what: "AES-GCM refused the body length".into(),
        })?;
    bytes.extend_from_slice(tag.as_ref());
    Ok(SealedSegment { header, bytes })
}

/// Bodies up to this size are always given to lz4 whole.
const SAMPLE_ABOVE: usize = 256 << 10;
/// Bytes in each of [`SAMPLES`] probes spread over a larger body.
const SAMPLE_BYTES: usize = 16 << 10;
const SAMPLES: usize = 4;

/// Whether lz4 is likely to shrink `body` enough to pay for itself: a large body is
/// compressed whole only when probes spread over it shrink by at least an eighth (the
/// rule ZFS applies to each block). Data that is already compressed or encrypted
/// (media, archives, encrypted filesystems) or barely compressible (fio's buffers
/// shrink by about 5 %) then costs no lz4 pass, which is most of a seal's CPU on
/// hardware with AES-NI and about half of it in the TCG guest (bench/RESULTS.md,
/// seal-pipeline and ublk). A wrong guess only costs bytes, never data.
fn worth_compressing(body: &[u8]) -> bool {
    if body.len() <= SAMPLE_ABOVE {
        return true;
    }
    let stride = (body.len() - SAMPLE_BYTES) / (SAMPLES - 1);
    let mut scratch = vec![0u8; lz4_flex::block::get_maximum_output_size(SAMPLE_BYTES)];
    let compressed: usize = (0..SAMPLES)
        .map(|i| {
            let probe = &body[i * stride..i * stride + SAMPLE_BYTES];
            lz4_flex::block::compress_into(probe, &mut scratch)
                .expect("output sized by get_maximum_output_size")
        })
        .sum();
    compressed * 8 <= SAMPLES * SAMPLE_BYTES * 7
}

impl SealedSegment {
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// Fills in the previous segment's digest; returns the file and its digest.
    pub fn link(mut self, prev_digest: Digest32) -> LinkedSegment {
        self.header.prev_digest = prev_digest;
        let encoded = self.header.encode();
        self.bytes[..HEADER_LEN].copy_from_slice(&encoded);
        let tag: &[u8; TAG_LEN] = self.bytes[self.bytes.len() - TAG_LEN..]
            .try_into()
            .expect("tag");
        let digest = segment_digest(&encoded, tag);
        LinkedSegment {
            header: self.header,
            digest,
            bytes: self.bytes,
        }
    }
}

/// AES-256-GCM from `ring`: about four times RustCrypto's `aes-gcm` on this project's
/// machines (see bench/RESULTS.md); the format is standard AES-GCM either way.
fn cipher(key: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key fits AES-256"))
}

/// A segment's header and digest, read without the key.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    pub header: SegmentHeader,
    pub digest: Digest32,
}

/// Parses a segment file's header and computes its digest; checks the file length.
pub fn read_info(bytes: &[u8], name: &str) -> Result<SegmentInfo> {
    let header = SegmentHeader::decode(bytes, name)?;
    if header.plain_len > MAX_PLAIN_LEN || header.body_len > MAX_PLAIN_LEN + MAX_PLAIN_LEN / 64 {
        return Err(Error::corrupt(
            name,
            format!(
                "declared lengths {}/{} are too large",
                header.plain_len, header.body_len
            ),
        ));
    }
    if bytes.len() as u64 != header.file_len() {
        return Err(Error::corrupt(
            name,
            format!(
                "file is {} bytes, header declares {} (truncated or padded)",
                bytes.len(),
                header.file_len()
            ),
        ));
    }
    let encoded: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("length checked");
    let tag: &[u8; TAG_LEN] = bytes[bytes.len() - TAG_LEN..]
        .try_into()
        .expect("length checked");
    Ok(SegmentInfo {
        digest: segment_digest(encoded, tag),
        header,
    })
}

/// An authenticated, decoded segment whose records have all been validated.
#[derive(Debug)]
pub struct OpenedSegment {
    pub header: SegmentHeader,
    pub digest: Digest32,
    /// The plain body from `body_at` on: the decrypted file (a stored body is left where
    /// it was decrypted, after the header, rather than moved down) or the decompressed
    /// body.
    body: Vec<u8>,
    body_at: usize,
}

impl OpenedSegment {
    /// The records, in seq order. Validated by [`open`], so decoding cannot fail.
    pub fn records(&self) -> impl Iterator<Item = RecordRef<'_>> {
        RecordDecoder::new(self.body()).map(|r| r.expect("validated when opened"))
    }

    /// The plain (decompressed) body size.
    pub fn plain_len(&self) -> usize {
        self.body().len()
    }

    fn body(&self) -> &[u8] {
        &self.body[self.body_at..]
    }
}

/// Authenticates and decodes a segment file (without checking its place in a chain;
/// see [`ChainCursor::open_next`] for that).
pub fn open(mut bytes: Vec<u8>, name: &str, key: &Key) -> Result<OpenedSegment> {
    let SegmentInfo { header, digest } = read_info(&bytes, name)?;
    let Some(sealed_with) = key.bytes_for(header.key_id) else {
        return Err(Error::WrongKey {
            segment: name.into(),
            expected: key.describe_ids(),
            found: header.key_id_hex(),
        });
    };
    let tag_at = bytes.len() - TAG_LEN;
    let tag: [u8; TAG_LEN] = bytes[tag_at..].try_into().expect("length checked");
    let encoded: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("length checked");
    cipher(sealed_with)
        .open_in_place_separate_tag(
            Nonce::assume_unique_for_key(header.nonce()),
            Aad::from(aad(&encoded)),
            Tag::from(tag),
            &mut bytes[HEADER_LEN..tag_at],
            0..,
        )
        .map_err(|_| Error::Auth {
            segment: name.into(),
        })?;
    let stored = &bytes[HEADER_LEN..tag_at];
    let (body, body_at) = if header.codec == CODEC_LZ4 {
        let mut body = vec![0u8; header.plain_len as usize];
        match lz4_flex::block::decompress_into(stored, &mut body) {
            Ok(n) if n as u64 == header.plain_len => (body, 0),
            Ok(n) => {
                return Err(Error::corrupt(
                    name,
                    format!(
                        "body decompressed to {n} bytes, header says {}",
                        header.plain_len
                    ),
                ))
            }
            Err(e) => {
                return Err(Error::corrupt(
                    name,
                    format!("lz4 body does not decompress: {e}"),
                ))
            }
        }
    } else {
        bytes.truncate(tag_at);
        (bytes, HEADER_LEN)
    };
    validate_records(&header, &body[body_at..], name)?;
    Ok(OpenedSegment {
        header,
        digest,
        body,
        body_at,
    })
}

fn validate_records(header: &SegmentHeader, body: &[u8], name: &str) -> Result<()> {
    let mut count = 0u32;
    let mut last: Option<u64> = None;
    for record in RecordDecoder::new(body) {
        let record = record.map_err(|e| Error::corrupt(name, e.0))?;
        let in_order = last.is_none_or(|l| record.seq > l);
        if !in_order || record.seq < header.first_seq || record.seq > header.last_seq {
            return Err(Error::corrupt(
                name,
                format!(
                    "record seq {} out of order or outside the header's range",
                    record.seq
                ),
            ));
        }
        if last.is_none() && record.seq != header.first_seq {
            return Err(Error::corrupt(
                name,
                "first record's seq differs from the header",
            ));
        }
        last = Some(record.seq);
        count += 1;
    }
    if count != header.record_count || last != Some(header.last_seq) {
        return Err(Error::corrupt(
            name,
            format!(
                "body holds {count} records ending at {last:?}, header says {} ending at {}",
                header.record_count, header.last_seq
            ),
        ));
    }
    Ok(())
}

/// The verifier's position in one volume's chain: which segment must come next and
/// what it must link to. Persisted by both ends (serde) as their chain position.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainCursor {
    pub volume: VolumeId,
    /// The protection epoch, once the first segment fixed it.
    pub epoch: Option<u64>,
    pub next_index: u64,
    pub prev_digest: Digest32,
    /// Every record of the next segment must have a seq at least this.
    pub next_seq: u64,
}

impl ChainCursor {
    /// The cursor before segment 0 of `volume`.
    pub fn start(volume: VolumeId) -> ChainCursor {
        ChainCursor {
            volume,
            epoch: None,
            next_index: 0,
            prev_digest: [0; 32],
            next_seq: 0,
        }
    }

    /// Checks that `header` is the segment that must come next (I6, I8): same volume,
    /// same epoch (or a new one announced by [`flags::NEW_EPOCH`]), the next index,
    /// linked to the previous digest, later seqs.
    ///
    /// An epoch change is accepted only from a segment that carries `NEW_EPOCH` — a
    /// flag inside the authenticated header, so only the key holder can set it — and
    /// that passes every other check: it sits at the next index and links to the
    /// digest of the segment applied last, which covers that segment's epoch. A
    /// segment of another protection of the same volume and key (or of the reverse
    /// direction after a failover) therefore stays a foreign epoch: its links are to
    /// digests of its own chain.
    pub fn check(&self, header: &SegmentHeader, name: &str) -> Result<()> {
        if header.volume != self.volume {
            return Err(Error::ForeignVolume {
                segment: name.into(),
                expected: self.volume.to_string(),
                found: header.volume.to_string(),
            });
        }
        let chain = |what: String| {
            Err(Error::Chain {
                segment: name.into(),
                what,
            })
        };
        let new_epoch = header.flags & flags::NEW_EPOCH != 0;
        match self.epoch {
            Some(epoch) if epoch != header.epoch && !new_epoch => {
                return Err(Error::ForeignEpoch {
                    segment: name.into(),
                    expected: epoch,
                    found: header.epoch,
                });
            }
            Some(epoch) if epoch == header.epoch && new_epoch => {
                return chain(format!(
                    "it announces a new protection epoch but keeps epoch {epoch:016x}"
                ));
            }
            _ => {}
        }
        if header.index != self.next_index {
            let kind = if header.index < self.next_index {
                "a replay of an already applied segment"
            } else {
                "a gap"
            };
            return chain(format!(
                "it has index {:016x} where {:016x} must come next ({kind})",
                header.index, self.next_index
            ));
        }
        if header.prev_digest != self.prev_digest {
            return chain(format!(
                "its previous digest {} is not the digest {} of the segment before (spliced or reordered history)",
                &hex(&header.prev_digest)[..16],
                &hex(&self.prev_digest)[..16]
            ));
        }
        if header.first_seq < self.next_seq {
            return chain(format!(
                "its first seq {} repeats seqs below {}",
                header.first_seq, self.next_seq
            ));
        }
        Ok(())
    }

    /// Moves past a segment that passed [`ChainCursor::check`] and was applied.
    pub fn advance(&mut self, header: &SegmentHeader, digest: Digest32) {
        self.epoch = Some(header.epoch);
        self.next_index = header.index + 1;
        self.prev_digest = digest;
        self.next_seq = header.last_seq + 1;
    }

    /// Checks the chain position, then authenticates and decodes. Nothing of the body
    /// is trusted before this returns `Ok`.
    pub fn open_next(&self, bytes: Vec<u8>, name: &str, key: &Key) -> Result<OpenedSegment> {
        let info = read_info(&bytes, name)?;
        self.check(&info.header, name)?;
        open(bytes, name, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that lz4 cannot shrink.
    fn noise(len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        getrandom::getrandom(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn probes_skip_lz4_only_for_large_incompressible_bodies() {
        assert!(
            worth_compressing(&noise(SAMPLE_ABOVE)),
            "small: lz4 decides"
        );
        assert!(!worth_compressing(&noise(8 << 20)));
        // Half noise, half zeros in 4 KiB stripes, like a volume of mixed data.
        let mixed: Vec<u8> = noise(4 << 20)
            .chunks(4096)
            .flat_map(|c| c.iter().copied().chain(std::iter::repeat_n(0, 4096)))
            .collect();
        assert!(worth_compressing(&mixed));
        // Noise with a run of zeros in every 4 KiB: lz4 saves about the run's share.
        let with_zero_runs = |zeros: usize| -> Vec<u8> {
            let mut body = noise(8 << 20);
            for block in body.chunks_mut(4096) {
                block[..zeros].fill(0);
            }
            body
        };
        assert!(
            !worth_compressing(&with_zero_runs(300)),
            "7 %: not worth it"
        );
        assert!(worth_compressing(&with_zero_runs(800)), "20 %: worth it");
    }
}
