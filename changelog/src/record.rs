//! Change records: what the capture layer saw, in the order it completed.
//!
//! A record is one completed request on the protected volume. Its encoding inside a
//! segment body (all integers little-endian, no padding between records):
//!
//! ```text
//! record      = seq:u64 op:u8 flags:u8 reserved:u16(=0) len:u32 offset:u64 payload
//! payload     = len bytes      if op is WRITE, FUA or MARK
//!             | (nothing)      if op is FLUSH, DISCARD or WRITE_ZEROES
//! ```
//!
//! * `WRITE`/`FUA`: `len` bytes of data written at byte `offset`. FUA = write + flush.
//! * `FLUSH`: `offset` = `len` = 0.
//! * `DISCARD`/`WRITE_ZEROES`: the byte range `[offset, offset + len)`, no payload.
//!   Both read back as zeroes on the replica.
//! * `MARK`: a named point (payload = label bytes); `flags & MARK_APP_CONSISTENT` tells
//!   an application-consistent point, `flags & MARK_RESYNC_BEGIN` the start of a digest
//!   resync, `flags & MARK_RESYNC_DONE` the end of a resync
//!   pass (every region lost to a ring overflow is re-recorded before it),
//!   `flags & MARK_GROUP_CUT` a consistency-group cut (payload [`GroupCutLabel`]).
//!   `offset` = 0.

/// Size of the fixed part of an encoded record.
pub const RECORD_HEADER_LEN: usize = 24;

/// `flags` bit of a MARK record: the point is application-consistent.
pub const MARK_APP_CONSISTENT: u8 = 1;

/// `flags` bit of a MARK record: a resync pass ended here; from this record on, the
/// stream is consistent again unless the ring has overflowed since.
pub const MARK_RESYNC_DONE: u8 = 2;

/// `flags` bit of a MARK record: a digest resync begins here; the recovery side's block
/// digests must describe a replica holding every record up to this one.
pub const MARK_RESYNC_BEGIN: u8 = 4;

/// `flags` bit of a MARK record: a consistency-group cut. Its payload is a
/// [`GroupCutLabel`]: every record of the group with a lower seq than the cut's lies
/// before it on each volume, every higher one after (see blkfilter's `ring::group`).
pub const MARK_GROUP_CUT: u8 = 8;

/// What a group-cut MARK stands for: cuts `first..=last` of group clock `clock` (one
/// MARK covers several cuts when a volume had no request between them; they all fall
/// at the same place in its stream). Encoded as the text
/// `group-cut <clock:016x> <first> <last>[ <first_unix_ms>]`; a label without the time
/// comes from a build before cut times (whose readers, the shipper's and the recovery
/// side's, do not take a label with it for a cut: upgrade the recovery side first, then
/// shipper and blkfilter together).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GroupCutLabel {
    /// The clock's random id: cut numbers start at 1 again with a new clock (after a
    /// reboot), so a cut is known by both.
    pub clock: u64,
    pub first: u64,
    pub last: u64,
    /// When cut `first` was made (Unix ms, by the coordinator's clock): the same on
    /// every volume of the group, unlike the times their segments were sealed. `None`
    /// where the producer could not tell (see blkfilter's `ring::group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_unix_ms: Option<u64>,
}

impl GroupCutLabel {
    pub fn encode(&self) -> String {
        let mut text = format!("group-cut {:016x} {} {}", self.clock, self.first, self.last);
        if let Some(ms) = self.first_unix_ms {
            text += &format!(" {ms}");
        }
        text
    }

    /// `None` if `payload` is not a well-formed label.
    pub fn parse(payload: &[u8]) -> Option<GroupCutLabel> {
        let text = std::str::from_utf8(payload)
            .ok()?
            .strip_prefix("group-cut ")?;
        let mut fields = text.split(' ');
        let label = GroupCutLabel {
            clock: u64::from_str_radix(fields.next()?, 16).ok()?,
            first: fields.next()?.parse().ok()?,
            last: fields.next()?.parse().ok()?,
            first_unix_ms: match fields.next() {
                Some(ms) => Some(ms.parse().ok()?),
                None => None,
            },
        };
        (fields.next().is_none() && 0 < label.first && label.first <= label.last).then_some(label)
    }

    pub fn contains(&self, cut: u64) -> bool {
        (self.first..=self.last).contains(&cut)
    }
}

/// The kind of a record. The discriminants are the on-disk (and in-ring) codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Write = 1,
    Flush = 2,
    Fua = 3,
    Discard = 4,
    WriteZeroes = 5,
    Mark = 6,
}

impl Op {
    /// Decodes an op code; `None` for codes this version does not know.
    pub fn from_code(code: u8) -> Option<Op> {
        Some(match code {
            1 => Op::Write,
            2 => Op::Flush,
            3 => Op::Fua,
            4 => Op::Discard,
            5 => Op::WriteZeroes,
            6 => Op::Mark,
            _ => return None,
        })
    }

    /// Whether records of this op carry `len` bytes of payload.
    pub fn has_payload(self) -> bool {
        matches!(self, Op::Write | Op::Fua | Op::Mark)
    }

    /// Whether this op changes the contents of the volume.
    pub fn modifies_data(self) -> bool {
        matches!(self, Op::Write | Op::Fua | Op::Discard | Op::WriteZeroes)
    }
}

/// A decoded record borrowing its payload from a segment body or a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub seq: u64,
    pub op: Op,
    pub flags: u8,
    pub offset: u64,
    pub len: u32,
    /// The payload: `len` bytes for ops with payload, empty otherwise.
    pub data: &'a [u8],
}

impl RecordRef<'_> {
    /// Encoded size of this record inside a segment body.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.data.len()
    }

    /// Appends the encoding of this record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        debug_assert_eq!(
            self.data.len(),
            if self.op.has_payload() {
                self.len as usize
            } else {
                0
            }
        );
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.push(self.op as u8);
        out.push(self.flags);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(self.data);
    }
}

/// Why a body failed to decode; the caller adds which segment it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub String);

/// Iterates the records of a decoded (plaintext) body, validating each one.
pub struct RecordDecoder<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> RecordDecoder<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        RecordDecoder { body, pos: 0 }
    }
}

impl<'a> Iterator for RecordDecoder<'a> {
    type Item = Result<RecordRef<'a>, BodyError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.body[self.pos..];
        if rest.is_empty() {
            return None;
        }
        if rest.len() < RECORD_HEADER_LEN {
            self.pos = self.body.len();
            return Some(Err(BodyError(format!(
                "record header at body offset {} is truncated ({} of {RECORD_HEADER_LEN} bytes)",
                self.pos,
                rest.len()
            ))));
        }
        let u64_at = |at: usize| u64::from_le_bytes(rest[at..at + 8].try_into().expect("8 bytes"));
        let seq = u64_at(0);
        let code = rest[8];
        let flags = rest[9];
        let reserved = u16::from_le_bytes([rest[10], rest[11]]);
        let len = u32::from_le_bytes(rest[12..16].try_into().expect("4 bytes"));
        let offset = u64_at(16);
        let at = self.pos;
        let fail = |this: &mut Self, msg: String| {
            this.pos = this.body.len();
            Some(Err(BodyError(format!("record at body offset {at}: {msg}"))))
        };
        let Some(op) = Op::from_code(code) else {
            return fail(self, format!("unknown op code {code}"));
        };
        if reserved != 0 {
            return fail(self, format!("reserved field is {reserved}, expected 0"));
        }
        if offset.checked_add(u64::from(len)).is_none() {
            return fail(self, format!("range {offset}+{len} overflows"));
        }
        if matches!(op, Op::Flush) && (len != 0 || offset != 0) {
            return fail(self, "FLUSH with a non-empty range".into());
        }
        let payload_len = if op.has_payload() { len as usize } else { 0 };
        if rest.len() - RECORD_HEADER_LEN < payload_len {
            return fail(
                self,
                format!(
                    "payload of {payload_len} bytes runs past the end of the body ({} left)",
                    rest.len() - RECORD_HEADER_LEN
                ),
            );
        }
        let data = &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len];
        self.pos += RECORD_HEADER_LEN + payload_len;
        Some(Ok(RecordRef {
            seq,
            op,
            flags,
            offset,
            len,
            data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_cut_labels_round_trip_and_garbage_is_refused() {
        let mut label = GroupCutLabel {
            clock: 0xfeed,
            first: 3,
            last: 5,
            first_unix_ms: None,
        };
        assert_eq!(label.encode(), "group-cut 000000000000feed 3 5");
        assert_eq!(GroupCutLabel::parse(label.encode().as_bytes()), Some(label));
        label.first_unix_ms = Some(1_796_000_000_123);
        assert_eq!(
            label.encode(),
            "group-cut 000000000000feed 3 5 1796000000123"
        );
        assert_eq!(GroupCutLabel::parse(label.encode().as_bytes()), Some(label));
        for bad in [
            "group-cut feed 5 3",
            "group-cut feed 0 1",
            "group-cut feed 1",
            "operator-mark",
            "group-cut feed 1 2 x",
            "group-cut feed 1 2 3 4",
        ] {
            assert_eq!(GroupCutLabel::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn encode_decode_each_op() {
        let data = [7u8; 10];
        let records = [
            RecordRef {
                seq: 1,
                op: Op::Write,
                flags: 0,
                offset: 4096,
                len: 10,
                data: &data,
            },
            RecordRef {
                seq: 2,
                op: Op::Flush,
                flags: 0,
                offset: 0,
                len: 0,
                data: &[],
            },
            RecordRef {
                seq: 3,
                op: Op::Fua,
                flags: 0,
                offset: 0,
                len: 10,
                data: &data,
            },
            RecordRef {
                seq: 4,
                op: Op::Discard,
                flags: 0,
                offset: 8192,
                len: 4096,
                data: &[],
            },
            RecordRef {
                seq: 5,
                op: Op::WriteZeroes,
                flags: 0,
                offset: 0,
                len: 512,
                data: &[],
            },
            RecordRef {
                seq: 6,
                op: Op::Mark,
                flags: MARK_APP_CONSISTENT,
                offset: 0,
                len: 3,
                data: b"app",
            },
        ];
        let mut body = Vec::new();
        for r in &records {
            r.encode_into(&mut body);
        }
        let decoded: Vec<_> = RecordDecoder::new(&body).collect::<Result<_, _>>().unwrap();
        assert_eq!(decoded, records);
    }

    #[test]
    fn truncated_and_unknown_are_errors() {
        let mut body = Vec::new();
        RecordRef {
            seq: 1,
            op: Op::Write,
            flags: 0,
            offset: 0,
            len: 4,
            data: b"abcd",
        }
        .encode_into(&mut body);
        assert!(RecordDecoder::new(&body[..body.len() - 1]).any(|r| r.is_err()));
        let mut bad = body.clone();
        bad[8] = 99;
        assert!(RecordDecoder::new(&bad).next().unwrap().is_err());
    }
}
