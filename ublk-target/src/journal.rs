//! The undo journal: before applying segment `k`, the replica bytes it is about to
//! change are saved in `JOURNAL/<k:016x>.undo`.
//!
//! Contract (what views and rollback rely on):
//!
//! * `undo_k` holds, for every byte range segment `k` changes (WRITE/FUA data,
//!   DISCARD/WRITE_ZEROES ranges, merged), the replica's bytes *before any write of
//!   segment `k`*: the state at point `k - 1` for those ranges. Bytes past the end of
//!   the replica file read as zeroes.
//! * `undo_k` is in place (written to a temporary name, fsynced, renamed, directory
//!   fsynced) before the first replica write of segment `k`.
//! * If `undo_k` already exists when segment `k` is applied (a crash after it was saved
//!   and before the applied position moved), it is kept: reading again could capture
//!   bytes segment `k` already wrote. It must be the journal of the same segment (same
//!   digest); anything else is refused.
//! * A damaged file is refused with an error, never used (for version 2, damage to the
//!   header and extent table; its data has no checksum, see below).
//!
//! **Two ways to keep before-images.** Where the journal and the replica share a
//! filesystem that can share blocks between files (XFS, btrfs: [`crate::reflink`]),
//! the replica blocks a segment is about to overwrite are cloned into the undo file
//! (version 2): a metadata update instead of reading and writing every byte, and the
//! replica's next writes to those blocks go to new ones (copy-on-write). Elsewhere, or
//! for a segment that changes nothing or whose ranges, widened to whole blocks, reach
//! past the replica's last whole block, they are read and written into the file with a
//! SHA-256 of them (version 1). A version-2 file carries no checksum of its data: those are the
//! replica's own former blocks, and hashing them would mean reading them, the very
//! cost cloning saves; their integrity is the filesystem's, as the replica's is. Its
//! extents are the changed ranges widened to whole filesystem blocks: the widening
//! adds only bytes segment `k` does not change, whose before-image equals their
//! after-image, so showing or restoring them changes nothing.
//!
//! File format, little-endian:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `UBLKDRUN` |
//! | 8 | 2 | version: 1 (copied before-images), 2 (shared blocks) or 3 (merged, copied) |
//! | 10 | 2 | header length (256) |
//! | 12 | 4 | segment flags ([`changelog::flags`]) |
//! | 16 | 32 | volume id, ASCII, zero-padded |
//! | 48 | 8 | protection epoch |
//! | 56 | 8 | segment index `k` |
//! | 64 | 8 | first seq of `k` |
//! | 72 | 8 | last seq of `k` |
//! | 80 | 8 | creation time of `k`, ms since the Unix epoch |
//! | 88 | 32 | digest of segment `k` (as the chain computes it) |
//! | 120 | 32 | the applier's previous digest before `k` (the digest of `k - 1`) |
//! | 152 | 8 | the applier's next seq before `k` |
//! | 160 | 4 | bit 0: the epoch was fixed before `k`; bit 1: facts of `k - 1` follow; bit 2: the epoch before `k` differs from `k`'s and is at 208 |
//! | 164 | 4 | flags of segment `k - 1` |
//! | 168 | 8 | first seq of `k - 1` |
//! | 176 | 8 | last seq of `k - 1` |
//! | 184 | 8 | creation time of `k - 1` |
//! | 192 | 8 | extent count `n` |
//! | 200 | 8 | data length `D` (the sum of the extent lengths) |
//! | 208 | 8 | the epoch before `k` when bit 2 is set (`k` starts a new epoch, [`changelog::flags::NEW_EPOCH`]), else 0 |
//! | 216 | 8 | version 1: 0; version 2: data start `S`, at least `288 + 16n` (written as a multiple of the filesystem block; not checked on reading); version 3: the first segment `j` it undoes |
//! | 224 | 32 | versions 1 and 3: SHA-256 of the data area; version 2: 0 |
//! | 256 | 16·n | extents: replica offset (8), length (8); sorted, disjoint, non-empty |
//! | 256+16n | 32 | SHA-256 of everything before it (header and extent table) |
//! | 288+16n | D | versions 1 and 3: before-images, in extent order |
//! | S | D | version 2: before-images, in extent order (zeroes before `S`) |
//!
//! **Merged files** (version 3, [`Journal::merge`]) undo a run of segments `j ..= k` at
//! once, named `JOURNAL/<j:016x>-<k:016x>.undo`: for every byte some segment of the run
//! changes, the bytes before the first of them that changed it, i.e. the state at point
//! `j - 1`. Recovery-point thinning makes them (see [`crate::points`]): the points
//! `j ..= k - 1` are gone, `j - 1` and `k` remain. The header describes segment `k`
//! (its facts, epoch and digest) and the applier state before segment `j` (bytes
//! 120..216), so undoing the file puts the replica at `j - 1`, and the file chains like
//! the journal of one segment. A merged file is written whole under a temporary name
//! and renamed in place before the files it replaces are deleted: where both exist
//! (a crash in between) the merged one is used and the others are left over.
//!
//! Bytes 120..192 (and 208..216 when `k` changed the epoch) are the applier state
//! before segment `k`, so a rollback that undoes `k` can record exactly where the
//! replica then is, and the catalog can describe point `k - 1` after `undo_{k-1}` was
//! pruned. Opening checks the header and the extent table (cheap);
//! [`UndoFile::verify_data`] streams a version-1 data area against its checksum,
//! which views and rollback do before using a file.

use crate::error::{Result, TargetError};
use crate::reflink;
use crate::state::{ApplyState, PointFacts};
use changelog::uring::{sync_dir, AtomicFile, Uring};
use changelog::{ChainCursor, Digest32, OpenedSegment, VolumeId};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub const UNDO_MAGIC: [u8; 8] = *b"UBLKDRUN";
/// The format with copied, checksummed before-images.
pub const UNDO_VERSION_COPIED: u16 = 1;
/// The format whose before-images share the replica's former blocks.
pub const UNDO_VERSION_SHARED: u16 = 2;
/// The format of a merged file: copied, checksummed before-images of a run of segments.
pub const UNDO_VERSION_MERGED: u16 = 3;
pub const UNDO_HEADER_LEN: usize = 256;
const EXTENT_LEN: usize = 16;
const META_SUM_LEN: usize = 32;
const BEFORE_EPOCH_FIXED: u32 = 1;
const BEFORE_HAS_PREV: u32 = 2;
const BEFORE_EPOCH_OTHER: u32 = 4;
/// Before-images at least this large are hashed on a second thread while they are
/// written; below it a thread costs more than it saves.
const PARALLEL_HASH_MIN: usize = 1 << 20;
/// A save buffer larger than this is freed after use rather than kept for the next.
const KEEP_BUFFER_MAX: usize = 64 << 20;

/// A byte range of the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The fixed part of an undo file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoHeader {
    /// The (last) segment this journal undoes (point `index`).
    pub segment: PointFacts,
    /// The first segment it undoes: `segment.index` but for a merged file.
    pub first: u64,
    pub epoch: u64,
    pub digest: Digest32,
    /// The applier position before the segment: undoing it puts the replica there.
    pub cursor_before: ChainCursor,
    /// The segment before it (point `index - 1`), when the applier knew it.
    pub prev: Option<PointFacts>,
    pub data_len: u64,
    pub data: DataArea,
}

/// How an undo file holds its before-images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataArea {
    /// Version 1: copied right after the extent table, with their SHA-256.
    Copied { sha: Digest32 },
    /// Version 2: sharing the replica's former blocks (reflink), from file offset
    /// `start` on; no checksum.
    Shared { start: u64 },
}

impl UndoHeader {
    pub fn index(&self) -> u64 {
        self.segment.index
    }

    /// The segments it undoes, first and last.
    pub fn span(&self) -> (u64, u64) {
        (self.first, self.index())
    }

    /// The applier state the replica is in once this journal is undone.
    pub fn state_before(&self) -> ApplyState {
        ApplyState {
            cursor: self.cursor_before.clone(),
            last: self.prev,
            rolled_back_to: None,
            key_id: None,
        }
    }

    /// Whether this journal's segments came right after `earlier`'s in one chain.
    pub fn follows(&self, earlier: &UndoHeader) -> bool {
        self.first == earlier.index() + 1
            && self.cursor_before.prev_digest == earlier.digest
            && self.cursor_before.volume == earlier.cursor_before.volume
            && self.prev == Some(earlier.segment)
    }

    fn encode(&self, extents: &[Extent]) -> [u8; UNDO_HEADER_LEN] {
        let mut h = [0u8; UNDO_HEADER_LEN];
        let put = |h: &mut [u8; UNDO_HEADER_LEN], at: usize, v: u64| {
            h[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        h[0..8].copy_from_slice(&UNDO_MAGIC);
        let merged = self.first != self.segment.index;
        assert!(
            !merged || matches!(self.data, DataArea::Copied { .. }),
            "a merged undo file copies its before-images"
        );
        let version = match self.data {
            DataArea::Copied { .. } if merged => UNDO_VERSION_MERGED,
            DataArea::Copied { .. } => UNDO_VERSION_COPIED,
            DataArea::Shared { .. } => UNDO_VERSION_SHARED,
        };
        h[8..10].copy_from_slice(&version.to_le_bytes());
        h[10..12].copy_from_slice(&(UNDO_HEADER_LEN as u16).to_le_bytes());
        h[12..16].copy_from_slice(&self.segment.flags.to_le_bytes());
        let volume = self.cursor_before.volume.as_str().as_bytes();
        h[16..16 + volume.len()].copy_from_slice(volume);
        put(&mut h, 48, self.epoch);
        put(&mut h, 56, self.segment.index);
        put(&mut h, 64, self.segment.first_seq);
        put(&mut h, 72, self.segment.last_seq);
        put(&mut h, 80, self.segment.created_unix_ms);
        h[88..120].copy_from_slice(&self.digest);
        h[120..152].copy_from_slice(&self.cursor_before.prev_digest);
        put(&mut h, 152, self.cursor_before.next_seq);
        let mut before = 0u32;
        if let Some(epoch) = self.cursor_before.epoch {
            before |= BEFORE_EPOCH_FIXED;
            if epoch != self.epoch {
                // Segment `k` continues the chain under a new epoch.
                before |= BEFORE_EPOCH_OTHER;
                put(&mut h, 208, epoch);
            }
        }
        if let Some(prev) = &self.prev {
            before |= BEFORE_HAS_PREV;
            h[164..168].copy_from_slice(&prev.flags.to_le_bytes());
            put(&mut h, 168, prev.first_seq);
            put(&mut h, 176, prev.last_seq);
            put(&mut h, 184, prev.created_unix_ms);
        }
        h[160..164].copy_from_slice(&before.to_le_bytes());
        put(&mut h, 192, extents.len() as u64);
        put(&mut h, 200, self.data_len);
        match self.data {
            DataArea::Copied { sha } => h[224..256].copy_from_slice(&sha),
            DataArea::Shared { start } => put(&mut h, 216, start),
        }
        if merged {
            put(&mut h, 216, self.first);
        }
        h
    }

    /// Parses the fixed header; `Err(what)` names the problem.
    fn decode(h: &[u8; UNDO_HEADER_LEN]) -> std::result::Result<(UndoHeader, u64), String> {
        if h[0..8] != UNDO_MAGIC {
            return Err("bad magic: not a ublk-dr undo journal".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8"));
        let version = u16::from_le_bytes([h[8], h[9]]);
        if !(UNDO_VERSION_COPIED..=UNDO_VERSION_MERGED).contains(&version) {
            return Err(format!(
                "format version {version}, this build reads versions \
                 {UNDO_VERSION_COPIED} to {UNDO_VERSION_MERGED}"
            ));
        }
        if usize::from(u16::from_le_bytes([h[10], h[11]])) != UNDO_HEADER_LEN {
            return Err("header length is not 256".into());
        }
        let volume_end = h[16..48].iter().position(|&b| b == 0).unwrap_or(32);
        let volume = std::str::from_utf8(&h[16..16 + volume_end])
            .ok()
            .filter(|_| h[16 + volume_end..48].iter().all(|&b| b == 0))
            .and_then(|v| VolumeId::new(v).ok())
            .ok_or("volume id field is not a valid volume id")?;
        let epoch = u64_at(48);
        let index = u64_at(56);
        let first = match version {
            UNDO_VERSION_MERGED if u64_at(216) < index => u64_at(216),
            UNDO_VERSION_MERGED => {
                return Err("a merged file's first segment is not before its last".into())
            }
            _ => index,
        };
        let before = u32_at(160);
        let other_epoch = before & BEFORE_EPOCH_OTHER != 0;
        if before & !(BEFORE_EPOCH_FIXED | BEFORE_HAS_PREV | BEFORE_EPOCH_OTHER) != 0
            || (version == UNDO_VERSION_COPIED && h[216..224] != [0; 8])
            || (version == UNDO_VERSION_SHARED && h[224..256] != [0; 32])
            || (!other_epoch && h[208..216] != [0; 8])
        {
            return Err("reserved bits are not zero".into());
        }
        let epoch_before = if other_epoch {
            if before & BEFORE_EPOCH_FIXED == 0 || u64_at(208) == epoch {
                return Err("the epoch before the segment is marked different but is not".into());
            }
            u64_at(208)
        } else {
            epoch
        };
        let prev = (before & BEFORE_HAS_PREV != 0).then(|| PointFacts {
            index: first.wrapping_sub(1),
            flags: u32_at(164),
            first_seq: u64_at(168),
            last_seq: u64_at(176),
            created_unix_ms: u64_at(184),
        });
        if prev.is_some() && first == 0 {
            return Err("segment 0 cannot have a previous segment".into());
        }
        let header = UndoHeader {
            segment: PointFacts {
                index,
                flags: u32_at(12),
                first_seq: u64_at(64),
                last_seq: u64_at(72),
                created_unix_ms: u64_at(80),
            },
            first,
            epoch,
            digest: h[88..120].try_into().expect("32"),
            cursor_before: ChainCursor {
                volume,
                epoch: (before & BEFORE_EPOCH_FIXED != 0).then_some(epoch_before),
                next_index: first,
                prev_digest: h[120..152].try_into().expect("32"),
                next_seq: u64_at(152),
            },
            prev,
            data_len: u64_at(200),
            data: if version != UNDO_VERSION_SHARED {
                DataArea::Copied {
                    sha: h[224..256].try_into().expect("32"),
                }
            } else {
                DataArea::Shared { start: u64_at(216) }
            },
        };
        Ok((header, u64_at(192)))
    }
}

/// An opened undo file whose header and extent table were checked.
#[derive(Debug)]
pub struct UndoFile {
    pub header: UndoHeader,
    pub extents: Vec<Extent>,
    /// File offset of each extent's before-image.
    data_at: Vec<u64>,
    /// `None` while closed ([`UndoFile::close`]) by a holder of many.
    file: Option<File>,
    /// Device and inode: what [`UndoFile::reopen`] checks.
    identity: (u64, u64),
    path: PathBuf,
}

impl UndoFile {
    /// Opens `path` and checks the header and extent table.
    pub fn open(path: &Path) -> Result<UndoFile> {
        let damaged = |what: String| TargetError::Journal {
            path: path.into(),
            what,
        };
        let file = File::open(path)
            .map_err(|e| TargetError::io(format!("opening undo journal {}", path.display()), e))?;
        let metadata = file
            .metadata()
            .map_err(|e| TargetError::io(format!("stat {}", path.display()), e))?;
        let file_len = metadata.len();
        let read = |buf: &mut [u8], at: u64| {
            file.read_exact_at(buf, at).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => damaged(format!(
                    "truncated: {file_len} bytes end before the {} bytes at {at}",
                    buf.len()
                )),
                _ => TargetError::io(format!("reading {}", path.display()), e),
            })
        };
        let mut h = [0u8; UNDO_HEADER_LEN];
        read(&mut h, 0)?;
        let (header, count) = UndoHeader::decode(&h).map_err(damaged)?;
        let table_len = count
            .checked_mul(EXTENT_LEN as u64)
            .filter(|&t| t <= file_len)
            .ok_or_else(|| damaged(format!("extent count {count} exceeds the file")))?;
        let table_end = UNDO_HEADER_LEN as u64 + table_len + META_SUM_LEN as u64;
        let data_start = match header.data {
            DataArea::Copied { .. } => table_end,
            DataArea::Shared { start } if start >= table_end => start,
            DataArea::Shared { start } => {
                return Err(damaged(format!(
                    "data start {start} lies inside the {table_end} bytes of header and \
                     extent table"
                )))
            }
        };
        if data_start.checked_add(header.data_len) != Some(file_len) {
            return Err(damaged(format!(
                "file is {file_len} bytes, header declares {} extents and {} data bytes \
                 (truncated or padded)",
                count, header.data_len
            )));
        }
        let mut table = vec![0u8; table_len as usize + META_SUM_LEN];
        read(&mut table, UNDO_HEADER_LEN as u64)?;
        let (table, sum) = table.split_at(table_len as usize);
        let computed: Digest32 = Sha256::new()
            .chain_update(h)
            .chain_update(table)
            .finalize()
            .into();
        if computed[..] != sum[..] {
            return Err(damaged("header checksum mismatch".into()));
        }
        let mut extents = Vec::with_capacity(count as usize);
        let mut data_at = Vec::with_capacity(count as usize);
        let mut at = data_start;
        for chunk in table.chunks_exact(EXTENT_LEN) {
            let offset = u64::from_le_bytes(chunk[..8].try_into().expect("8"));
            let len = u64::from_le_bytes(chunk[8..].try_into().expect("8"));
            let sorted = extents.last().is_none_or(|e: &Extent| e.end() <= offset);
            if len == 0 || offset.checked_add(len).is_none() || !sorted {
                return Err(damaged(format!(
                    "extent {offset}+{len} is empty, overflows or overlaps the one before"
                )));
            }
            extents.push(Extent { offset, len });
            data_at.push(at);
            at += len;
        }
        if at != file_len {
            return Err(damaged(
                "extent lengths do not add up to the data length".into(),
            ));
        }
        Ok(UndoFile {
            header,
            extents,
            data_at,
            file: Some(file),
            identity: (metadata.dev(), metadata.ino()),
            path: path.into(),
        })
    }

    /// Closes the file's descriptor, keeping what was read from it; reading needs
    /// [`UndoFile::reopen`] first.
    pub(crate) fn close(&mut self) {
        self.file = None;
    }

    pub(crate) fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// Opens a closed file again: `Ok(false)` if it is gone (deleted), an error if
    /// another file now has its name. Undo files never change once in place, so the
    /// same inode holds what was checked when it was first opened; a new inode (the
    /// same merge made again) must hold the same header and extents.
    pub(crate) fn reopen(&mut self) -> Result<bool> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(TargetError::io(
                    format!("opening undo journal {}", self.path.display()),
                    e,
                ))
            }
        };
        let metadata = file
            .metadata()
            .map_err(|e| TargetError::io(format!("stat {}", self.path.display()), e))?;
        if (metadata.dev(), metadata.ino()) != self.identity {
            let made_again = UndoFile::open(&self.path)?;
            if made_again.header != self.header || made_again.extents != self.extents {
                return Err(TargetError::Journal {
                    path: self.path.clone(),
                    what: "it was replaced by another file since it was opened".into(),
                });
            }
            made_again.verify_data()?;
            *self = made_again;
            return Ok(true);
        }
        self.file = Some(file);
        Ok(true)
    }

    fn file(&self) -> Result<&File> {
        self.file.as_ref().ok_or_else(|| TargetError::Journal {
            path: self.path.clone(),
            what: "read while closed".into(),
        })
    }

    pub fn index(&self) -> u64 {
        self.header.index()
    }

    /// The segments it undoes, first and last.
    pub fn span(&self) -> (u64, u64) {
        self.header.span()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the whole data area and compares it with its checksum (version 1; a
    /// version-2 file has none: see the module documentation).
    pub fn verify_data(&self) -> Result<()> {
        self.verify_data_unless(&AtomicBool::new(false))
    }

    /// [`UndoFile::verify_data`], stopping with an error once `abandon` is set.
    fn verify_data_unless(&self, abandon: &AtomicBool) -> Result<()> {
        let DataArea::Copied { sha: expected } = self.header.data else {
            return Ok(());
        };
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let start = self.data_at.first().copied().unwrap_or(0);
        let mut done = 0u64;
        while done < self.header.data_len {
            if abandon.load(Relaxed) {
                return Err(merge_abandoned(&self.path));
            }
            let n = buf.len().min((self.header.data_len - done) as usize);
            self.file()?
                .read_exact_at(&mut buf[..n], start + done)
                .map_err(|e| TargetError::io(format!("reading {}", self.path.display()), e))?;
            sha.update(&buf[..n]);
            done += n as u64;
        }
        if <[u8; 32]>::from(sha.finalize()) != expected {
            return Err(TargetError::Journal {
                path: self.path.clone(),
                what: "before-image data checksum mismatch".into(),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of extent `i`'s before-image starting `within` it.
    pub fn read_extent(&self, i: usize, within: u64, buf: &mut [u8]) -> Result<()> {
        debug_assert!(within + buf.len() as u64 <= self.extents[i].len);
        self.file()?
            .read_exact_at(buf, self.data_at[i] + within)
            .map_err(|e| TargetError::io(format!("reading {}", self.path.display()), e))
    }

    /// Reads the before-image of the `buf.len()` replica bytes at `offset`, which this
    /// file's extents must cover.
    pub fn read_range(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = self.extents.partition_point(|e| e.end() <= pos);
            let Some(extent) = self.extents.get(i).filter(|e| e.offset <= pos) else {
                return Err(TargetError::Journal {
                    path: self.path.clone(),
                    what: format!("it holds no before-image of replica byte {pos}"),
                });
            };
            let n = ((extent.end() - pos) as usize).min(buf.len() - done);
            self.read_extent(i, pos - extent.offset, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

/// The byte ranges a segment changes, sorted and merged (overlapping or adjacent
/// ranges become one).
pub fn changed_ranges(segment: &OpenedSegment) -> Vec<Extent> {
    let mut ranges: Vec<Extent> = segment
        .records()
        .filter(|r| r.op.modifies_data() && r.len > 0)
        .map(|r| Extent {
            offset: r.offset,
            len: u64::from(r.len),
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<Extent> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.offset <= last.end() => {
                let end = last.end().max(r.end());
                last.len = end - last.offset;
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// Reads `buf.len()` bytes at `offset` from `file`; bytes past its end read as zeroes.
pub(crate) fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// File name of undo journal `index`.
pub fn undo_file_name(index: u64) -> String {
    format!("{index:016x}.undo")
}

/// File name of the undo file of segments `first ..= last` (one segment's, or merged).
pub fn span_file_name(first: u64, last: u64) -> String {
    match first == last {
        true => undo_file_name(last),
        false => format!("{first:016x}-{last:016x}.undo"),
    }
}

/// The segments (first, last) an undo file name says it undoes, `None` for other files.
pub fn parse_span_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".undo")?;
    // Lowercase only, as the files are named: another name is not one of ours.
    let hex = |h: &str| {
        (h.len() == 16 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| u64::from_str_radix(h, 16).ok())
            .flatten()
    };
    match stem.split_once('-') {
        None => hex(stem).map(|i| (i, i)),
        Some((first, last)) => Some((hex(first)?, hex(last)?)).filter(|(f, l)| f < l),
    }
}

/// The index named by the undo file name of one segment, `None` for other files
/// (merged ones included).
pub fn parse_undo_file_name(name: &str) -> Option<u64> {
    parse_span_file_name(name)
        .filter(|(first, last)| first == last)
        .map(|(_, last)| last)
}

/// The replica file as the journal reads it, with its path for messages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReplicaFile<'a> {
    pub file: &'a File,
    pub path: &'a Path,
}

/// How [`Journal::save_undo`] keeps before-images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UndoMethod {
    /// Share the replica's blocks ([`crate::reflink`]), `block` being the filesystem
    /// block; falls back to copying where the filesystem refuses.
    Share { block: u64 },
    /// Copy them, with a checksum.
    Copy,
}

impl UndoMethod {
    /// Sharing, on `replica`'s filesystem block, when the replica is a file on XFS or
    /// btrfs ([`reflink::shareable_block`]) and `copy` does not ask otherwise.
    pub fn for_replica(replica: &File, copy: bool) -> UndoMethod {
        match reflink::shareable_block(replica) {
            Some(block) if !copy => UndoMethod::Share { block },
            _ => UndoMethod::Copy,
        }
    }
}

/// The header of undo file `segment.header.index` before the applier's `state`.
fn undo_header(
    segment: &OpenedSegment,
    state: &ApplyState,
    data_len: u64,
    data: DataArea,
) -> UndoHeader {
    debug_assert_eq!(state.cursor.next_index, segment.header.index);
    UndoHeader {
        segment: PointFacts::from_header(&segment.header),
        epoch: segment.header.epoch,
        digest: segment.digest,
        cursor_before: state.cursor.clone(),
        prev: state.last,
        first: segment.header.index,
        data_len,
        data,
    }
}

/// Fills `meta` (header, extent table, their checksum: `288 + 16n` bytes) for
/// `header` and `extents`.
fn write_meta(header: &UndoHeader, extents: &[Extent], meta: &mut [u8]) {
    let table_end = UNDO_HEADER_LEN + extents.len() * EXTENT_LEN;
    meta[..UNDO_HEADER_LEN].copy_from_slice(&header.encode(extents));
    for (e, at) in extents.iter().zip((UNDO_HEADER_LEN..).step_by(EXTENT_LEN)) {
        meta[at..at + 8].copy_from_slice(&e.offset.to_le_bytes());
        meta[at + 8..at + 16].copy_from_slice(&e.len.to_le_bytes());
    }
    let sum = Sha256::digest(&meta[..table_end]);
    meta[table_end..].copy_from_slice(&sum);
}

/// `extents` (sorted, disjoint) widened to whole `block`s, merging those that then
/// touch.
fn widen_to_blocks(extents: &[Extent], block: u64) -> Vec<Extent> {
    let mut widened: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        let start = e.offset / block * block;
        let end = e.end().div_ceil(block) * block;
        match widened.last_mut() {
            Some(last) if start <= last.end() => last.len = end.max(last.end()) - last.offset,
            _ => widened.push(Extent {
                offset: start,
                len: end - start,
            }),
        }
    }
    widened
}

/// What [`Journal::save_undo`] did.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UndoSaved {
    /// Whether a file was written (`false`: kept from an interrupted apply).
    pub saved: bool,
    /// Time spent reading the before-images.
    pub read: Duration,
    /// Time spent hashing them and writing the file durably in place.
    pub save: Duration,
}

/// A replica's journal directory.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

/// A file system's space, in bytes: what an unprivileged writer may still use, and that
/// plus what is used (as `df` counts its size for the use percentage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsSpace {
    pub free: u64,
    pub size: u64,
}

/// The exclusive right to change a replica and its journal (apply, prune, rollback).
/// Views do not take it. Released when dropped (or when the process dies).
#[derive(Debug)]
pub struct JournalLock {
    _file: File,
}

impl Journal {
    pub fn new(dir: impl Into<PathBuf>) -> Journal {
        Journal { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, index: u64) -> PathBuf {
        self.dir.join(undo_file_name(index))
    }

    /// The path of the undo file of segments `first ..= last`.
    pub fn path_of_span(&self, (first, last): (u64, u64)) -> PathBuf {
        self.dir.join(span_file_name(first, last))
    }

    pub fn exists(&self, index: u64) -> bool {
        self.path_of(index).exists()
    }

    /// The space of the file system the journal is on (its directory's, or the
    /// nearest existing parent's before it is created); `None` if that cannot be read.
    pub fn fs_space(&self) -> Option<FsSpace> {
        let dir = self.dir.ancestors().find(|d| d.exists())?;
        let stat = nix::sys::statvfs::statvfs(dir).ok()?;
        let unit = stat.fragment_size();
        // As df counts: what is used plus what is available (blocks reserved for root,
        // or otherwise held back, are neither).
        let used = stat.blocks().saturating_sub(stat.blocks_free());
        Some(FsSpace {
            free: stat.blocks_available() * unit,
            size: (used + stat.blocks_available()) * unit,
        })
    }

    /// The disk space undo file `index` takes (its allocated blocks: what deleting it
    /// frees, once the replica has overwritten the blocks a shared file took from it);
    /// 0 if it does not exist.
    pub fn disk_bytes(&self, span: (u64, u64)) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path_of_span(span);
        match std::fs::metadata(&path) {
            Ok(meta) => Ok(meta.blocks() * 512),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(TargetError::io(format!("reading {}", path.display()), e)),
        }
    }

    pub fn open(&self, index: u64) -> Result<UndoFile> {
        self.open_span((index, index))
    }

    /// Opens the undo file of segments `first ..= last` (checking that it is).
    pub fn open_span(&self, span: (u64, u64)) -> Result<UndoFile> {
        let file = UndoFile::open(&self.path_of_span(span))?;
        if file.span() != span {
            return Err(TargetError::Journal {
                path: self.path_of_span(span),
                what: format!(
                    "it holds segments {:016x}..={:016x}",
                    file.span().0,
                    file.span().1
                ),
            });
        }
        Ok(file)
    }

    /// The segments (first, last) of every undo file present, ordered by last, then
    /// first. A missing directory is empty.
    pub fn list_spans(&self) -> Result<Vec<(u64, u64)>> {
        let names = changelog::store::file_names(&self.dir)
            .map_err(|e| TargetError::io(format!("listing {}", self.dir.display()), e))?;
        let mut spans: Vec<(u64, u64)> = names
            .iter()
            .filter_map(|n| parse_span_file_name(n))
            .collect();
        spans.sort_unstable_by_key(|&(first, last)| (last, first));
        Ok(spans)
    }

    /// The undo files that take the replica from `latest` back to point `to`, oldest
    /// first: a run of files whose segments follow on from `to + 1` to `latest`, the
    /// longest file wherever several start at one segment (a merged file and the ones
    /// it replaced, left by a crash). `Err(k)`: no file starts at segment `k`.
    pub fn run_from(
        &self,
        to: u64,
        latest: u64,
    ) -> Result<std::result::Result<Vec<(u64, u64)>, u64>> {
        let mut longest = std::collections::BTreeMap::new();
        for (first, last) in self.list_spans()? {
            if last <= latest {
                let end = longest.entry(first).or_insert(last);
                *end = last.max(*end);
            }
        }
        let mut run = Vec::new();
        let mut next = to + 1;
        while next <= latest {
            let Some(&last) = longest.get(&next) else {
                return Ok(Err(next));
            };
            run.push((next, last));
            next = last + 1;
        }
        Ok(Ok(run))
    }

    /// Creates the directory (and its `views/` and `scratch/`) if missing.
    pub fn create(&self) -> Result<()> {
        for dir in [
            self.dir.clone(),
            self.dir.join("views"),
            self.dir.join("scratch"),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| TargetError::io(format!("creating {}", dir.display()), e))?;
        }
        Ok(())
    }

    /// Takes the journal's lock; [`TargetError::Busy`] when another applier, prune or
    /// rollback holds it. The directory must exist (the applier creates it).
    pub fn lock(&self) -> Result<JournalLock> {
        if !self.dir.is_dir() {
            return Err(TargetError::io(
                format!(
                    "journal directory {} (nothing applied to this replica yet, or give --journal)",
                    self.dir.display()
                ),
                std::io::ErrorKind::NotFound.into(),
            ));
        }
        let path = self.dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| TargetError::io(format!("opening {}", path.display()), e))?;
        // A lock just released may still be held for a moment by a child process that
        // a thread of the previous holder forked (it shares the open file until its
        // exec closes it), so a busy lock is tried again for up to a second.
        for attempt in 0..50 {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(JournalLock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(TargetError::io(format!("locking {}", path.display()), e));
            }
            if attempt < 49 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Err(TargetError::Busy {
            journal: self.dir.clone(),
        })
    }

    /// Saves the before-images of everything `segment` changes, unless its undo file
    /// already exists (then it is checked to belong to this segment and kept). `state`
    /// is the applier state before the segment; `buf` is scratch space kept by the
    /// caller from one call to the next; `method` says whether to try sharing blocks,
    /// and is turned to [`UndoMethod::Copy`] for good when the filesystem refuses.
    /// Returns whether a file was written, and the time taken. Must run after the
    /// segment was authenticated and before any replica write.
    pub(crate) fn save_undo(
        &self,
        uring: &mut Uring,
        segment: &OpenedSegment,
        state: &ApplyState,
        replica: &ReplicaFile,
        buf: &mut Vec<u8>,
        method: &mut UndoMethod,
    ) -> Result<UndoSaved> {
        let index = segment.header.index;
        let path = self.path_of(index);
        if path.exists() {
            self.check_kept(segment)?;
            return Ok(UndoSaved::default());
        }
        let started = Instant::now();
        let extents = changed_ranges(segment);
        if let UndoMethod::Share { block } = *method {
            match self.save_shared(uring, segment, state, replica, &extents, block) {
                Ok(true) => {
                    return Ok(UndoSaved {
                        saved: true,
                        read: Duration::ZERO,
                        save: started.elapsed(),
                    })
                }
                // This segment's ranges do not fit whole blocks of the replica.
                Ok(false) => {}
                Err(e) if reflink::is_unsupported(&e) => {
                    log::warn!(
                        "undo journal {}: cannot share blocks with replica {} ({e}: the \
                         journal is on another filesystem, or this one refuses); \
                         before-images are copied, which is slower",
                        self.dir.display(),
                        replica.path.display()
                    );
                    *method = UndoMethod::Copy;
                }
                Err(e) => return Err(self.saving(index, e)),
            }
        }
        self.save_copied(uring, segment, state, replica, &extents, buf)
    }

    /// The error of writing undo file `index`.
    fn saving(&self, index: u64, e: std::io::Error) -> TargetError {
        TargetError::io(
            format!("saving undo journal {}", self.path_of(index).display()),
            e,
        )
    }

    /// Checks that the undo file an interrupted apply left behind belongs to `segment`.
    fn check_kept(&self, segment: &OpenedSegment) -> Result<()> {
        let index = segment.header.index;
        // Only an interrupted apply of this segment leaves its journal behind; the
        // replica may hold some of its writes, so the journal cannot be made again.
        let existing = self.open(index).map_err(|e| match e {
            TargetError::Journal { path, what } => TargetError::Journal {
                path,
                what: format!(
                    "{what}; it was saved by an interrupted apply of this segment, so \
                     applying cannot go on safely: restore the file, or delete it only \
                     if the replica is known to hold no write of segment {index}"
                ),
            },
            other => other,
        })?;
        if existing.header.digest != segment.digest {
            return Err(TargetError::Journal {
                path: self.path_of(index),
                what: "it belongs to a different segment with the same index \
                       (another history); move it away only if the replica never \
                       received that segment"
                    .into(),
            });
        }
        log::info!(
            "{}: kept the undo journal saved before an interrupted apply",
            segment.header.describe()
        );
        Ok(())
    }

    /// Version 2: clones the replica blocks under `extents` (widened to whole blocks)
    /// into the file, then writes header and extent table; then fsync, rename,
    /// directory fsync. `Ok(false)` (nothing written) when the ranges are empty or reach
    /// past the replica's last whole block: sharing cannot hold those.
    fn save_shared(
        &self,
        uring: &mut Uring,
        segment: &OpenedSegment,
        state: &ApplyState,
        replica: &ReplicaFile,
        extents: &[Extent],
        block: u64,
    ) -> std::io::Result<bool> {
        let replica_len = replica.file.metadata()?.len();
        if extents.last().is_none_or(|last| last.end() > replica_len) {
            return Ok(false);
        }
        let blocks = widen_to_blocks(extents, block);
        match blocks.last() {
            Some(last) if last.end() <= replica_len / block * block => {}
            _ => return Ok(false),
        }
        let table_end = (UNDO_HEADER_LEN + blocks.len() * EXTENT_LEN + META_SUM_LEN) as u64;
        let start = table_end.div_ceil(block) * block;
        let file = AtomicFile::create(&self.dir, &undo_file_name(segment.header.index))?;
        let mut at = start;
        for e in &blocks {
            reflink::clone_range(replica.file, e.offset, e.len, file.fd(), at)?;
            at += e.len;
        }
        // A clone that reports success must have covered everything (checked here, not
        // first when a view or rollback opens the file).
        let cloned = file.written_len()?;
        if cloned != at {
            return Err(std::io::Error::other(format!(
                "cloning before-images made the file {cloned} bytes, not {at}"
            )));
        }
        let header = undo_header(segment, state, at - start, DataArea::Shared { start });
        let mut meta = vec![0u8; table_end as usize];
        write_meta(&header, &blocks, &mut meta);
        uring.write_all_at(file.fd(), &meta, 0)?;
        file.commit(uring)?;
        Ok(true)
    }

    /// Version 1: reads the before-images in one batch
    /// ([`Uring::read_batch_or_zero`]), writes them while a second thread hashes them,
    /// then the header and extent table, which carry the hash; then fsync, rename,
    /// directory fsync.
    fn save_copied(
        &self,
        uring: &mut Uring,
        segment: &OpenedSegment,
        state: &ApplyState,
        replica: &ReplicaFile,
        extents: &[Extent],
        buf: &mut Vec<u8>,
    ) -> Result<UndoSaved> {
        let saving = |e| self.saving(segment.header.index, e);
        let started = Instant::now();
        let data_len: u64 = extents.iter().map(|e| e.len).sum();
        let data_start = UNDO_HEADER_LEN + extents.len() * EXTENT_LEN + META_SUM_LEN;
        let total = data_start + data_len as usize;
        // The buffer is kept from segment to segment (every byte of it is written below
        // before it is used): no fresh zeroed buffer per segment.
        if buf.len() < total {
            buf.resize(total, 0);
        }
        let (meta, data) = buf[..total].split_at_mut(data_start);
        let mut rest = &mut data[..];
        let mut reads = Vec::with_capacity(extents.len());
        for e in extents {
            let (this, more) = rest.split_at_mut(e.len as usize);
            reads.push((e.offset, this));
            rest = more;
        }
        uring
            .read_batch_or_zero(replica.file.as_raw_fd(), reads)
            .map_err(|e| {
                TargetError::io(format!("reading replica {}", replica.path.display()), e)
            })?;
        let data = &*data;
        let read = started.elapsed();
        let file =
            AtomicFile::create(&self.dir, &undo_file_name(segment.header.index)).map_err(saving)?;
        // The data area goes to the file while another thread hashes it: both only read
        // the buffer, and the header that carries the hash is written after both.
        let sha: Digest32 = std::thread::scope(|scope| {
            let hasher = (data.len() >= PARALLEL_HASH_MIN)
                .then(|| scope.spawn(|| Sha256::digest(data).into()));
            uring.write_all_at(file.fd(), data, data_start as u64)?;
            Ok::<_, std::io::Error>(match hasher {
                Some(hasher) => hasher.join().expect("hashing thread"),
                None => Sha256::digest(data).into(),
            })
        })
        .map_err(saving)?;
        let header = undo_header(segment, state, data_len, DataArea::Copied { sha });
        write_meta(&header, extents, meta);
        uring.write_all_at(file.fd(), meta, 0).map_err(saving)?;
        file.commit(uring).map_err(saving)?;
        if buf.len() > KEEP_BUFFER_MAX {
            *buf = Vec::new();
        }
        Ok(UndoSaved {
            saved: true,
            read,
            save: started.elapsed() - read,
        })
    }

    /// Writes one undo file that undoes the chained run of undo files `spans` (oldest
    /// first, at least two) at once: for every byte one of them covers, the
    /// before-image of the oldest that does. Verifies each file's data first. The
    /// merged file is durable and in place when this returns; deleting the files it
    /// replaces is the caller's (a crash before that leaves both, and the merged one is
    /// used). Returns its segments (first, last). Once `abandon` is set it stops,
    /// leaving nothing behind.
    ///
    /// At most one of the files is open at a time (a run can be thousands of files,
    /// past any open-file limit): a first pass verifies each and maps which parts of
    /// it the merged file takes, a second copies those parts file by file to their
    /// places, and the checksum of the data area is computed by reading it back.
    pub(crate) fn merge(
        &self,
        uring: &mut Uring,
        spans: &[(u64, u64)],
        abandon: &AtomicBool,
    ) -> Result<(u64, u64)> {
        if spans.len() < 2 {
            return Err(TargetError::Journal {
                path: self.dir.clone(),
                what: "nothing to merge".into(),
            });
        }
        // Pieces by replica offset: (end, file, extent, offset within the extent). A
        // file adds the parts of its extents no older file covers.
        let mut pieces: std::collections::BTreeMap<u64, (u64, usize, usize, u64)> =
            std::collections::BTreeMap::new();
        let mut headers: Vec<UndoHeader> = Vec::with_capacity(spans.len());
        for (f, &span) in spans.iter().enumerate() {
            let file = self.open_span(span)?;
            if let Some(before) = headers.last() {
                if !file.header.follows(before) {
                    return Err(TargetError::Journal {
                        path: file.path().into(),
                        what: format!(
                            "it does not follow {}",
                            self.path_of_span(spans[f - 1]).display()
                        ),
                    });
                }
            }
            file.verify_data_unless(abandon)?;
            for (x, e) in file.extents.iter().enumerate() {
                for (start, end) in uncovered(&pieces, |p| p.0, e) {
                    pieces.insert(start, (end, f, x, start - e.offset));
                }
            }
            headers.push(file.header);
        }
        let mut extents: Vec<Extent> = Vec::new();
        // What to copy from each file: (extent, offset within it, length, where to).
        let mut copies: Vec<Vec<(usize, u64, u64, u64)>> = vec![Vec::new(); spans.len()];
        let mut data_len = 0;
        for (&start, &(end, f, x, within)) in &pieces {
            match extents.last_mut() {
                Some(last) if last.end() == start => last.len += end - start,
                _ => extents.push(Extent {
                    offset: start,
                    len: end - start,
                }),
            }
            copies[f].push((x, within, end - start, data_len));
            data_len += end - start;
        }
        drop(pieces);
        let meta_len = UNDO_HEADER_LEN + extents.len() * EXTENT_LEN + META_SUM_LEN;
        let (oldest, newest) = (&headers[0], &headers[headers.len() - 1]);
        let span = (oldest.first, newest.index());
        let path = self.path_of_span(span);
        let saving = |e: std::io::Error| {
            TargetError::io(format!("saving merged undo journal {}", path.display()), e)
        };
        let file =
            AtomicFile::create(&self.dir, &span_file_name(span.0, span.1)).map_err(saving)?;
        let mut buf = vec![0u8; 1 << 20];
        for ((&input, copies), header) in spans.iter().zip(&copies).zip(&headers) {
            if copies.is_empty() {
                continue; // every byte it covers, an older file covers too
            }
            let input = self.open_span(input)?;
            if input.header != *header {
                return Err(TargetError::Journal {
                    path: input.path().into(),
                    what: "it changed while it was being merged".into(),
                });
            }
            for &(x, within, len, to) in copies {
                let mut done = 0;
                while done < len {
                    if abandon.load(Relaxed) {
                        return Err(merge_abandoned(&path));
                    }
                    let n = buf.len().min((len - done) as usize);
                    input.read_extent(x, within + done, &mut buf[..n])?;
                    let at = meta_len as u64 + to + done;
                    uring
                        .write_all_at(file.fd(), &buf[..n], at)
                        .map_err(saving)?;
                    done += n as u64;
                }
            }
        }
        let mut sha = Sha256::new();
        let mut done = 0;
        while done < data_len {
            if abandon.load(Relaxed) {
                return Err(merge_abandoned(&path));
            }
            let n = buf.len().min((data_len - done) as usize);
            file.file()
                .read_exact_at(&mut buf[..n], meta_len as u64 + done)
                .map_err(saving)?;
            sha.update(&buf[..n]);
            done += n as u64;
        }
        let header = UndoHeader {
            segment: newest.segment,
            first: oldest.first,
            epoch: newest.epoch,
            digest: newest.digest,
            cursor_before: oldest.cursor_before.clone(),
            prev: oldest.prev,
            data_len,
            data: DataArea::Copied {
                sha: sha.finalize().into(),
            },
        };
        let mut meta = vec![0u8; meta_len];
        write_meta(&header, &extents, &mut meta);
        uring.write_all_at(file.fd(), &meta, 0).map_err(saving)?;
        file.commit(uring).map_err(saving)?;
        Ok(span)
    }

    /// Deletes the temporary files of undo files being written when a writer was killed
    /// (a merged one can be as large as an interval's changes); returns how many. Only
    /// for the holder of the journal lock: nobody else writes them.
    pub(crate) fn remove_temporary_files(&self) -> Result<usize> {
        let names = changelog::store::file_names(&self.dir)
            .map_err(|e| TargetError::io(format!("listing {}", self.dir.display()), e))?;
        let mut removed = 0;
        for name in names {
            let undo_name = changelog::uring::AtomicFile::name_of_temporary(&name);
            if undo_name.is_some_and(|n| parse_span_file_name(n).is_some()) {
                let path = self.dir.join(&name);
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(TargetError::io(format!("removing {}", path.display()), e))
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Deletes the undo file of segments `first ..= last` (absent is fine); says
    /// whether it was there. The caller syncs the directory.
    pub(crate) fn remove(&self, span: (u64, u64)) -> Result<bool> {
        let path = self.path_of_span(span);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(TargetError::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Makes removals and creations in the directory durable.
    pub(crate) fn sync(&self, uring: &mut Uring) -> Result<()> {
        sync_dir(uring, &self.dir)
            .map_err(|e| TargetError::io(format!("syncing {}", self.dir.display()), e))
    }
}

/// The parts of `extent` that no piece of `pieces` (disjoint, by start offset; `end`
/// gives a piece's end) covers, in order: where a newer undo file's before-images
/// count when the oldest file covering a byte wins.
pub(crate) fn uncovered<P>(
    pieces: &std::collections::BTreeMap<u64, P>,
    end: impl Fn(&P) -> u64,
    extent: &Extent,
) -> Vec<(u64, u64)> {
    let mut pos = extent.offset;
    if let Some((_, piece)) = pieces.range(..pos).next_back() {
        pos = pos.max(end(piece));
    }
    let mut gaps = Vec::new();
    if pos >= extent.end() {
        return gaps; // covered by older files already
    }
    for (&start, piece) in pieces.range(pos..extent.end()) {
        if start > pos {
            gaps.push((pos, start));
        }
        pos = pos.max(end(piece));
    }
    if pos < extent.end() {
        gaps.push((pos, extent.end()));
    }
    gaps
}

fn merge_abandoned(path: &Path) -> TargetError {
    TargetError::Journal {
        path: path.into(),
        what: "merge abandoned".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(undo_file_name(42), "000000000000002a.undo");
        assert_eq!(parse_undo_file_name("000000000000002a.undo"), Some(42));
        for bad in [
            "2a.undo",
            ".000000000000002a.undo.tmp",
            "000000000000002a.seg",
        ] {
            assert_eq!(parse_undo_file_name(bad), None, "{bad}");
        }
        assert_eq!(span_file_name(3, 3), "0000000000000003.undo");
        assert_eq!(
            span_file_name(3, 42),
            "0000000000000003-000000000000002a.undo"
        );
        assert_eq!(parse_span_file_name(&span_file_name(3, 42)), Some((3, 42)));
        assert_eq!(
            parse_span_file_name("000000000000002a.undo"),
            Some((42, 42))
        );
        for bad in [
            "000000000000002a-0000000000000003.undo",
            "0000000000000003-0000000000000003.undo",
            "3-42.undo",
            "000000000000002A.undo",
            ".0000000000000003-000000000000002a.undo.tmp",
        ] {
            assert_eq!(parse_span_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn header_round_trip() {
        let volume = VolumeId::new("vol0").unwrap();
        let header = UndoHeader {
            segment: PointFacts {
                index: 5,
                first_seq: 100,
                last_seq: 120,
                created_unix_ms: 1234,
                flags: changelog::flags::CRASH_POINT,
            },
            first: 5,
            epoch: 99,
            digest: [7; 32],
            cursor_before: ChainCursor {
                volume,
                epoch: Some(99),
                next_index: 5,
                prev_digest: [3; 32],
                next_seq: 100,
            },
            prev: Some(PointFacts {
                index: 4,
                first_seq: 90,
                last_seq: 99,
                created_unix_ms: 1200,
                flags: 0,
            }),
            data_len: 4096,
            data: DataArea::Copied { sha: [1; 32] },
        };
        let one = [Extent {
            offset: 0,
            len: 4096,
        }];
        let encoded = header.encode(&one);
        assert_eq!(UndoHeader::decode(&encoded).unwrap(), (header.clone(), 1));
        let shared = UndoHeader {
            data: DataArea::Shared { start: 4096 },
            ..header.clone()
        };
        let encoded = shared.encode(&one);
        assert_eq!(encoded[8..10], 2u16.to_le_bytes());
        // A merged file: segments 3..=5, the state before segment 3.
        let merged = UndoHeader {
            first: 3,
            cursor_before: ChainCursor {
                next_index: 3,
                ..header.cursor_before.clone()
            },
            prev: header.prev.map(|p| PointFacts { index: 2, ..p }),
            ..header.clone()
        };
        let encoded_merged = merged.encode(&one);
        assert_eq!(encoded_merged[8..10], 3u16.to_le_bytes());
        assert_eq!(UndoHeader::decode(&encoded_merged).unwrap(), (merged, 1));
        let mut bad = encoded_merged;
        bad[216..224].copy_from_slice(&5u64.to_le_bytes());
        assert!(
            UndoHeader::decode(&bad).is_err(),
            "a merged file whose first segment is its last"
        );
        assert_eq!(UndoHeader::decode(&encoded).unwrap(), (shared, 1));
        let mut bad = encoded;
        bad[224] = 1;
        assert!(
            UndoHeader::decode(&bad).is_err(),
            "version 2 with a data checksum"
        );

        // A segment that starts a new epoch: the position before it is in the old one.
        let continuation = UndoHeader {
            epoch: 0xbeef,
            ..header
        };
        let encoded = continuation.encode(&[]);
        let (decoded, _) = UndoHeader::decode(&encoded).unwrap();
        assert_eq!(decoded, continuation);
        assert_eq!(decoded.cursor_before.epoch, Some(99));
        let mut bad = encoded;
        bad[208..216].copy_from_slice(&0xbeefu64.to_le_bytes());
        assert!(UndoHeader::decode(&bad).is_err(), "same epoch marked other");
    }

    #[test]
    fn widening_covers_whole_blocks_and_merges() {
        let e = |offset, len| Extent { offset, len };
        assert_eq!(
            widen_to_blocks(&[e(512, 512), e(3584, 1024), e(12288, 4096)], 4096),
            vec![e(0, 8192), e(12288, 4096)]
        );
        assert_eq!(
            widen_to_blocks(&[e(0, 512), e(5000, 100), e(8191, 2)], 4096),
            vec![e(0, 12288)]
        );
        assert!(widen_to_blocks(&[], 4096).is_empty());
    }
}
