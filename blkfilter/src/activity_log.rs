//! The activity log: a persistent set of *hot* extents of the protected volume, as DRBD
//! keeps one, so that after a power cut or host crash (which loses the shared-memory
//! ring and whatever it held) only the hot extents need a resync, not the whole disk.
//!
//! Contract (checked by `tests/activity_log.rs` and the VM power-cut test):
//!
//! * An extent is hot from before any write to it reaches the backing until every
//!   record of a write to it is durable in the shipper's staging (the ring's
//!   `released_seq` has passed the extent's last seq, I4). [`ActivityLog::ensure`] makes
//!   an extent hot *durably* (pwrite + fdatasync) before the caller writes the backing,
//!   so any change the ring may lose lies in an extent the file lists.
//! * Cooling ([`ActivityLog::evict`]) needs no sync of the log: an extent still listed
//!   after a crash only costs a needless resync of it. It does need the *backing*
//!   flushed first: a write whose record is staged may still sit in the backing's
//!   volatile cache, and a power cut losing it there would leave the replica with data
//!   the source no longer has, in an extent nobody resyncs. So the caller takes
//!   `released_seq`, flushes the backing, then evicts with that seq.
//! * Sequence numbers survive the ring: the file reserves seqs ahead
//!   (`seq_reserved`, persisted before any seq at or above the old reservation is
//!   handed out), and a new ring after a crash starts at the reservation, so seqs keep
//!   increasing across the loss and the shipper never mistakes new records for old.
//!
//! File layout (little-endian): a 4096-byte header — magic `UBLKDRAL`, version 1 (u32),
//! extent_bytes (u32), device_bytes (u64), seq_reserved (u64), the SHA-256 of the
//! preceding 32 bytes — then the bitmap, one bit per extent, in whole 4096-byte pages.
//! A page is written whole; a torn page write can only happen while an `ensure` is
//! unacknowledged, and the write it guards has not started.

use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Default extent size (DRBD's activity-log extent is 4 MiB too).
pub const DEFAULT_EXTENT_BYTES: u32 = 4 << 20;
const MAGIC: &[u8; 8] = b"UBLKDRAL";
const VERSION: u32 = 1;
const PAGE: u64 = 4096;
/// Seqs reserved per header write.
const SEQ_RESERVATION: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ActivityLogError {
    #[error("activity log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("activity log {path} is not usable: {what}. Move it away to start without one (the next start then resyncs the whole disk: `shipper resync`)")]
    Corrupt { path: PathBuf, what: String },
}

/// What a previous run left in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Hot extents as byte ranges `(offset, len)`, merged and in order.
    pub extents: Vec<(u64, u64)>,
    pub hot: u64,
    pub total: u64,
    /// No seq below this was ever handed out... or at least none above it was.
    pub seq_floor: u64,
}

pub struct ActivityLog {
    file: File,
    path: PathBuf,
    extent_bytes: u64,
    device_bytes: u64,
    bits: Vec<u64>,
    /// Per extent, the highest seq recorded for a write to it in this run.
    last_seq: Vec<u64>,
    /// Extents recovered hot at open: they stay hot until the resync that re-records
    /// them has ended ([`ActivityLog::unpin`]).
    pinned: Vec<bool>,
    seq_reserved: u64,
}

fn header_bytes(extent_bytes: u32, device_bytes: u64, seq_reserved: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(PAGE as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&extent_bytes.to_le_bytes());
    h.extend_from_slice(&device_bytes.to_le_bytes());
    h.extend_from_slice(&seq_reserved.to_le_bytes());
    let sum = Sha256::digest(&h);
    h.extend_from_slice(&sum);
    h.resize(PAGE as usize, 0);
    h
}

impl ActivityLog {
    /// Opens the log at `path`, creating it (empty) when missing. Returns what the
    /// previous run left hot. A log made for another device size or extent size is
    /// refused.
    pub fn open(
        path: &Path,
        device_bytes: u64,
        extent_bytes: u32,
    ) -> Result<(ActivityLog, Recovered), ActivityLogError> {
        let io_err = |source| ActivityLogError::Io {
            path: path.into(),
            source,
        };
        let corrupt = |what: String| ActivityLogError::Corrupt {
            path: path.into(),
            what,
        };
        if !extent_bytes.is_power_of_two() || u64::from(extent_bytes) < PAGE {
            return Err(corrupt(format!("extent size {extent_bytes}")));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let extents = device_bytes.div_ceil(u64::from(extent_bytes));
        let words = extents.div_ceil(64) as usize;
        let file_len = PAGE + (words as u64 * 8).next_multiple_of(PAGE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let mut log = ActivityLog {
            file,
            path: path.into(),
            extent_bytes: u64::from(extent_bytes),
            device_bytes,
            bits: vec![0; words],
            last_seq: vec![0; extents as usize],
            pinned: vec![false; extents as usize],
            seq_reserved: 0,
        };
        if len == 0 {
            log.file.set_len(file_len).map_err(io_err)?;
            log.write_header()?;
            return Ok((
                log,
                Recovered {
                    extents: Vec::new(),
                    hot: 0,
                    total: extents,
                    seq_floor: 0,
                },
            ));
        }
        if len != file_len {
            return Err(corrupt(format!(
                "it is {len} bytes; a log of this device takes {file_len} (made for another device?)"
            )));
        }
        let mut head = vec![0u8; PAGE as usize];
        log.file.read_exact_at(&mut head, 0).map_err(io_err)?;
        if &head[..8] != MAGIC {
            return Err(corrupt("no activity-log magic".into()));
        }
        if Sha256::digest(&head[..32])[..] != head[32..64] {
            return Err(corrupt("header checksum mismatch".into()));
        }
        let field = |at: usize, n: usize| {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&head[at..at + n]);
            u64::from_le_bytes(b)
        };
        if field(8, 4) != u64::from(VERSION)
            || field(12, 4) != u64::from(extent_bytes)
            || field(16, 8) != device_bytes
        {
            return Err(corrupt(format!(
                "made for version {}, {}-byte extents over {} bytes; this volume is {device_bytes} bytes with {extent_bytes}-byte extents",
                field(8, 4),
                field(12, 4),
                field(16, 8)
            )));
        }
        log.seq_reserved = field(24, 8);
        let mut bitmap = vec![0u8; words * 8];
        log.file.read_exact_at(&mut bitmap, PAGE).map_err(io_err)?;
        for (w, chunk) in bitmap.chunks(8).enumerate() {
            log.bits[w] = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        // Bits past the last extent can only come from damage; ignore them. Recovered
        // extents stay hot until the resync that re-records them ends.
        let mut recovered = Recovered {
            extents: Vec::new(),
            hot: 0,
            total: extents,
            seq_floor: log.seq_reserved,
        };
        for e in 0..extents {
            if log.is_hot(e) {
                log.pinned[e as usize] = true;
                recovered.hot += 1;
                let start = e * log.extent_bytes;
                let len = log.extent_bytes.min(device_bytes - start);
                match recovered.extents.last_mut() {
                    Some((o, l)) if *o + *l == start => *l += len,
                    _ => recovered.extents.push((start, len)),
                }
            }
        }
        Ok((log, recovered))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn is_hot(&self, extent: u64) -> bool {
        self.bits[(extent / 64) as usize] & (1 << (extent % 64)) != 0
    }

    fn extents_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        if len == 0 || offset >= self.device_bytes {
            #[allow(clippy::reversed_empty_ranges)]
            return 1..=0;
        }
        let last = (offset + len - 1).min(self.device_bytes - 1);
        offset / self.extent_bytes..=last / self.extent_bytes
    }

    /// Makes every extent touching `[offset, offset + len)` hot, durably, before the
    /// caller writes there. Cheap when they already are.
    pub fn ensure(&mut self, offset: u64, len: u64) -> Result<(), ActivityLogError> {
        let mut pages = Vec::new();
        for e in self.extents_of(offset, len) {
            if !self.is_hot(e) {
                self.bits[(e / 64) as usize] |= 1 << (e % 64);
                let page = e / 64 * 8 / PAGE;
                if pages.last() != Some(&page) {
                    pages.push(page);
                }
            }
        }
        if pages.is_empty() {
            return Ok(());
        }
        for page in pages {
            self.write_page(page)?;
        }
        self.sync()
    }

    /// Notes that the record with `seq` changed `[offset, offset + len)`.
    pub fn note(&mut self, offset: u64, len: u64, seq: u64) {
        for e in self.extents_of(offset, len) {
            let last = &mut self.last_seq[e as usize];
            *last = (*last).max(seq);
        }
    }

    /// A resync ended with the record `seq`: extents recovered hot at open may cool
    /// once that record is durable in staging.
    pub fn unpin(&mut self, seq: u64) {
        for (pinned, last) in self.pinned.iter_mut().zip(&mut self.last_seq) {
            if std::mem::take(pinned) {
                *last = (*last).max(seq);
            }
        }
    }

    /// Reserves seqs ahead so that `next_seq` is below the persisted reservation.
    pub fn reserve_seq(&mut self, next_seq: u64) -> Result<(), ActivityLogError> {
        if next_seq < self.seq_reserved {
            return Ok(());
        }
        self.seq_reserved = next_seq + SEQ_RESERVATION;
        self.write_header()?;
        self.sync()
    }

    /// Cools every hot extent whose last record is at or below `released_seq` (durable
    /// in staging). Returns how many cooled. No sync: see the module docs. Call it only
    /// while no resync is pending: a region waiting in the ring's dirty bitmap has no
    /// record yet.
    ///
    /// `in_flight` are the byte ranges `[start, end)` of writes made hot by
    /// [`ActivityLog::ensure`] whose records are not noted yet: a write may be on the
    /// backing already while its extent's last *noted* seq is released, so the extents
    /// they touch stay hot.
    pub fn evict(
        &mut self,
        released_seq: u64,
        in_flight: &[(u64, u64)],
    ) -> Result<u64, ActivityLogError> {
        let mut cooled = 0;
        let mut pages = Vec::new();
        for e in self.coolable(released_seq, in_flight) {
            self.bits[(e / 64) as usize] &= !(1 << (e % 64));
            cooled += 1;
            let page = e / 64 * 8 / PAGE;
            if pages.last() != Some(&page) {
                pages.push(page);
            }
        }
        for page in pages {
            self.write_page(page)?;
        }
        Ok(cooled)
    }

    /// Whether [`ActivityLog::evict`] with the same arguments would cool anything.
    pub fn would_cool(&self, released_seq: u64, in_flight: &[(u64, u64)]) -> bool {
        !self.coolable(released_seq, in_flight).is_empty()
    }

    /// The extents [`ActivityLog::evict`] cools, in order.
    fn coolable(&self, released_seq: u64, in_flight: &[(u64, u64)]) -> Vec<u64> {
        let mut busy = vec![false; self.last_seq.len()];
        for &(start, end) in in_flight.iter().filter(|(s, e)| s < e) {
            for e in self.extents_of(start, end - start) {
                busy[e as usize] = true;
            }
        }
        (0..self.last_seq.len())
            .filter(|&e| {
                self.is_hot(e as u64)
                    && !self.pinned[e]
                    && !busy[e]
                    && self.last_seq[e] <= released_seq
            })
            .map(|e| e as u64)
            .collect()
    }

    /// Hot extents now, and all extents.
    pub fn hot_count(&self) -> (u64, u64) {
        let hot = self.bits.iter().map(|w| u64::from(w.count_ones())).sum();
        (hot, self.last_seq.len() as u64)
    }

    fn write_header(&mut self) -> Result<(), ActivityLogError> {
        let head = header_bytes(
            self.extent_bytes as u32,
            self.device_bytes,
            self.seq_reserved,
        );
        self.file
            .write_all_at(&head, 0)
            .map_err(|source| ActivityLogError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn write_page(&mut self, page: u64) -> Result<(), ActivityLogError> {
        let words_per_page = (PAGE / 8) as usize;
        let first = page as usize * words_per_page;
        let last = (first + words_per_page).min(self.bits.len());
        let mut bytes = vec![0u8; PAGE as usize];
        for (i, w) in self.bits[first..last].iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        self.file
            .write_all_at(&bytes, PAGE + page * PAGE)
            .map_err(|source| ActivityLogError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn sync(&self) -> Result<(), ActivityLogError> {
        self.file
            .sync_data()
            .map_err(|source| ActivityLogError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_extents_survive_reopen_and_cool_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("al");
        let size = 100 << 20; // 25 extents of 4 MiB
        let (mut log, rec) = ActivityLog::open(&path, size, DEFAULT_EXTENT_BYTES).unwrap();
        assert_eq!((rec.hot, rec.total), (0, 25));
        log.reserve_seq(1).unwrap();
        log.ensure(4 << 20, 1).unwrap(); // extent 1
        log.note(4 << 20, 1, 10);
        log.ensure((8 << 20) - 512, 1024).unwrap(); // extents 1 and 2
        log.note((8 << 20) - 512, 1024, 11);
        log.ensure(99 << 20, 4096).unwrap(); // extent 24 (the last)
        log.note(99 << 20, 4096, 12);
        drop(log);
        let (mut log, rec) = ActivityLog::open(&path, size, DEFAULT_EXTENT_BYTES).unwrap();
        assert_eq!(rec.hot, 3);
        assert_eq!(rec.extents, vec![(4 << 20, 8 << 20), (96 << 20, 4 << 20)]);
        assert!(rec.seq_floor > 12, "seqs are reserved ahead");
        // Recovered extents stay hot until the resync that re-records them ended.
        assert_eq!(log.evict(1000, &[]).unwrap(), 0);
        log.note(4 << 20, 1, 20); // extent 1 written again in this run
        log.unpin(14); // the resync ended with seq 14
        assert_eq!(
            log.evict(15, &[]).unwrap(),
            2,
            "extents 2 and 24 cool, 1 waits for 20"
        );
        assert_eq!(log.hot_count(), (1, 25));
        drop(log);
        let (_, rec) = ActivityLog::open(&path, size, DEFAULT_EXTENT_BYTES).unwrap();
        assert_eq!(rec.extents, vec![(4 << 20, 4 << 20)]);
    }

    #[test]
    fn extents_with_a_write_in_flight_stay_hot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) =
            ActivityLog::open(&dir.path().join("al"), 64 << 20, DEFAULT_EXTENT_BYTES).unwrap();
        log.reserve_seq(1).unwrap();
        // Extent 3 took a write recorded as seq 5; a second write to it (and one
        // straddling extents 6 and 7) is on its way to the backing, not yet recorded.
        log.ensure(12 << 20, 4096).unwrap();
        log.note(12 << 20, 4096, 5);
        log.ensure((13 << 20) + 8192, 4096).unwrap();
        log.ensure((28 << 20) - 512, 1024).unwrap();
        let in_flight = [
            ((13 << 20) + 8192, (13 << 20) + 12288),
            ((28 << 20) - 512, (28 << 20) + 512),
        ];
        assert!(
            !log.would_cool(5, &in_flight),
            "no flush for nothing to cool"
        );
        assert!(log.would_cool(5, &[]));
        assert_eq!(log.evict(5, &in_flight).unwrap(), 0);
        assert_eq!(log.hot_count(), (3, 16));
        // Once recorded and released they cool.
        log.note((13 << 20) + 8192, 4096, 6);
        log.note((28 << 20) - 512, 1024, 7);
        assert_eq!(log.evict(7, &[]).unwrap(), 3);
    }

    #[test]
    fn foreign_or_damaged_logs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("al");
        ActivityLog::open(&path, 64 << 20, DEFAULT_EXTENT_BYTES).unwrap();
        let err = ActivityLog::open(&path, 128 << 20, DEFAULT_EXTENT_BYTES)
            .err()
            .unwrap();
        assert!(err.to_string().contains("made for"), "{err}");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], 20).unwrap();
        let err = ActivityLog::open(&path, 64 << 20, DEFAULT_EXTENT_BYTES)
            .err()
            .unwrap();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
