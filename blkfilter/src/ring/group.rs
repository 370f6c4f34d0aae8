//! Consistency groups: one sequence clock shared by the rings of several volumes, and
//! cuts through it that every volume records at the same place (I2).
//!
//! A database with its data on one volume and its log on another needs a recovery
//! point that is a crash state of *both*: no write on one volume in it unless every
//! write acknowledged before it was issued, on any volume, is in it too. The volumes'
//! producers take their seqs from one counter, the *group clock*, at completion and
//! before the acknowledgement; a write issued after another's acknowledgement therefore
//! has the higher seq, and "every record of the group with seq < S" is such a state
//! for any S. A *cut* picks an S and has every volume record a MARK exactly there.
//!
//! # The clock file
//!
//! ```text
//! offset size field     meaning
//! 0      8    magic     "UBLKDRGC", stored last when the file is created
//! 8      4    version   1
//! 16     8    id        random, non-zero: which clock a ring joined
//! 64     8    word      seq:48 (low bits) | cuts mod 2^16 (high bits), own cache line
//! 128    8    cuts      cuts ever made (the full count, stored after the cut)
//! 136    8    cut_seq   S of the newest cut
//! 144    8    app_cut   the newest cut made with the group's file systems frozen
//! 256    8×480 cut_times when each of the last 480 cuts was made: slot n mod 480
//!                      holds unix_ms << 22 | n mod 2^22 (0: not known)
//! ```
//!
//! # Protocol
//!
//! * A producer takes a seq with one `fetch_add(1)` on `word`; the high bits of the
//!   value it gets say how many cuts came before its seq (mod 2^16; the whole count is
//!   `cuts`, read just before, brought up to date with those bits: [`whole_cuts`]).
//! * A cut is one `fetch_add(1 + 2^48)`: it takes S and counts the cut in the same
//!   atomic step. So for each seq a producer takes, it knows exactly which cuts lie
//!   below it, with no flag to wait for and nothing a dead coordinator can leave
//!   half-done (the next one numbers its cut from `word`, not from `cuts`).
//! * A producer that sees cuts it has not recorded records one MARK for them
//!   ([`changelog::GroupCutLabel`]: clock id, first and last cut) *before* the record
//!   it took the seq for (the MARK gets that seq; the record takes a new one). Its
//!   earlier records all had seqs below those cuts' (they saw fewer cuts), so in every
//!   ring the MARK of cut N separates the records below S_N from those above it. An
//!   idle producer records pending cuts from its housekeeping tick; one that was down
//!   records every cut it missed in one MARK when it is back.
//! * A coordinator stores the time of its cut in the cut's slot before making it (under
//!   the lock the next cut's number is the count plus one), so a producer that sees the
//!   cut finds its time: the label of its MARK carries the time of the first cut it
//!   stands for. That time is the same on every volume, where the times their segments
//!   were sealed are not: the recovery side's thinning keeps the same cuts of an
//!   interval on every volume of the group by it ([`changelog::GroupCutLabel`]). A
//!   slot names its cut (the low bits), so a producer that missed more than 480 cuts
//!   finds no time rather than a wrong one.
//! * The ring header keeps the last cut the ring recorded (`group_cuts`) and the id of
//!   the clock it joined (`group_id`), so a restarted producer carries on.
//!   Coordinators serialize on an exclusive `flock` of the file.
//! * Seqs are 48 bits in a group (2.8 · 10^14: nine years at a million writes a second).
//! * Cut numbers start at 1 with each new clock (a clock is lost with /dev/shm at a
//!   reboot), so the recovery side knows a cut by clock id and number.
//!
//! The clock lives in shared memory like the rings, so it serves the volumes of one
//! host. A power cut loses it with the rings; a new clock starts above every seq the
//! rings' activity logs reserved ([`super::Producer::raise_next_seq`]).

use super::layout::FIRST_SEQ;
use super::shm::io_err;
use super::RingError;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

const MAGIC: [u8; 8] = *b"UBLKDRGC";
const VERSION: u32 = 1;
const FILE_BYTES: u64 = 4096;
const OFF_ID: usize = 16;
const OFF_WORD: usize = 64;
const OFF_CUTS: usize = 128;
const OFF_CUT_SEQ: usize = 136;
const OFF_APP_CUT: usize = 144;
const OFF_CUT_TIMES: usize = 256;
const CUT_TIME_SLOTS: u64 = (FILE_BYTES - OFF_CUT_TIMES as u64) / 8;
/// Bits of a cut-time slot that name the cut (its number mod 2^22).
const CUT_NUMBER_BITS: u32 = 22;
const CUT_NUMBER_MASK: u64 = (1 << CUT_NUMBER_BITS) - 1;

/// Bits of `word` that hold the seq.
const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// What one cut adds to `word`: a seq (S) and one cut.
const CUT_STEP: u64 = (1 << SEQ_BITS) + 1;

/// The seq and the cut count (mod 2^16) in a value of `word`.
fn split(word: u64) -> (u64, u16) {
    (word & SEQ_MASK, (word >> SEQ_BITS) as u16)
}

/// The whole cut count, given the whole count `seen` some time earlier and the count
/// mod 2^16 now (fewer than 2^16 cuts apart).
pub fn whole_cuts(seen: u64, now_mod: u16) -> u64 {
    seen + u64::from(now_mod.wrapping_sub(seen as u16))
}

/// A group clock file, mapped.
pub struct GroupClock {
    path: PathBuf,
    map: MmapRaw,
    file: File,
}

/// A cut just made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The cut's number, 1, 2, 3, … per clock.
    pub number: u64,
    /// Every record of the group with a lower seq is before the cut's MARK on its
    /// volume, every record with a higher one after it.
    pub seq: u64,
}

impl GroupClock {
    /// Opens the clock at `path`, creating it when it does not exist. Creation is
    /// atomic (the finished file is linked into place), so producers attaching at
    /// the same time share one clock.
    pub fn open_or_create(path: &Path) -> Result<GroupClock, RingError> {
        match GroupClock::open(path) {
            Err(RingError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create the directory of"))?;
        let tmp = dir.join(format!(
            ".group-clock.{}.{}",
            std::process::id(),
            random_id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        let mut header = vec![0u8; FILE_BYTES as usize];
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[OFF_ID..OFF_ID + 8].copy_from_slice(&random_id().to_le_bytes());
        header[OFF_WORD..OFF_WORD + 8].copy_from_slice(&FIRST_SEQ.to_le_bytes());
        header[0..8].copy_from_slice(&MAGIC);
        let linked =
            file.write_all_at(&header, 0)
                .and_then(|()| match std::fs::hard_link(&tmp, path) {
                    // Another producer made it first: use theirs.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                    other => other,
                });
        let _ = std::fs::remove_file(&tmp);
        linked.map_err(io_err(path, "create"))?;
        GroupClock::open(path)
    }

    /// Opens an existing clock.
    pub fn open(path: &Path) -> Result<GroupClock, RingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path, "open the group clock"))?;
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let mut head = [0u8; 12];
        let bad = |why: String| RingError::NotAGroupClock {
            path: path.to_owned(),
            why,
        };
        if len != FILE_BYTES || file.read_exact_at(&mut head, 0).is_err() {
            return Err(bad(format!("{len} bytes, a group clock has {FILE_BYTES}")));
        }
        if head[0..8] != MAGIC {
            return Err(bad("no group-clock magic".into()));
        }
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4"));
        if version != VERSION {
            return Err(RingError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
                supported: VERSION,
            });
        }
        let map = MmapOptions::new()
            .map_raw(&file)
            .map_err(io_err(path, "map"))?;
        Ok(GroupClock {
            path: path.to_owned(),
            map,
            file,
        })
    }

    /// Which clock this is (rings remember the clock they joined).
    pub fn id(&self) -> u64 {
        self.u64_at(OFF_ID).load(Relaxed)
    }

    /// Takes a seq: returns it and the number of cuts made before it.
    pub fn take(&self) -> (u64, u64) {
        let published = self.u64_at(OFF_CUTS).load(Acquire);
        let (seq, cuts_mod) = split(self.word().fetch_add(1, SeqCst));
        assert!(
            seq < SEQ_MASK,
            "group clock {} ran out of seqs",
            self.path.display()
        );
        (seq, whole_cuts(published, cuts_mod))
    }

    /// The next seq and the number of cuts made so far, without taking anything.
    pub fn peek(&self) -> (u64, u64) {
        let published = self.u64_at(OFF_CUTS).load(Acquire);
        let (seq, cuts_mod) = split(self.word().load(SeqCst));
        (seq, whole_cuts(published, cuts_mod))
    }

    /// The number of cuts made so far.
    pub fn cuts(&self) -> u64 {
        self.peek().1
    }

    /// Makes the next seq at least `floor`.
    pub fn raise(&self, floor: u64) {
        let floor = floor.min(SEQ_MASK);
        let _ = self.word().fetch_update(SeqCst, SeqCst, |word| {
            let (seq, _) = split(word);
            (seq < floor).then_some(word - seq + floor)
        });
    }

    /// Makes a cut: every producer of the group records its MARK at S (see the module
    /// docs). Returns at once; producers record it on their next request or tick.
    pub fn cut(&self) -> Result<Cut, RingError> {
        self.cut_flagged(false)
    }

    /// [`GroupClock::cut`] for a caller that froze every file system of the group
    /// first: the volumes flag their MARK application-consistent.
    pub fn cut_app_consistent(&self) -> Result<Cut, RingError> {
        self.cut_flagged(true)
    }

    fn cut_flagged(&self, app_consistent: bool) -> Result<Cut, RingError> {
        let _lock = Flock::exclusive(&self.file).map_err(io_err(&self.path, "lock"))?;
        // Before the cut exists, so no producer records it without its time or flag.
        // (Under the lock, the next cut's number is the count now plus one.)
        let next = self.cuts() + 1;
        let now_ms = changelog::unix_ms_now();
        self.cut_time_slot(next)
            .store(now_ms << CUT_NUMBER_BITS | next & CUT_NUMBER_MASK, Release);
        if app_consistent {
            self.u64_at(OFF_APP_CUT).store(next, Release);
        }
        let published = self.u64_at(OFF_CUTS).load(Relaxed);
        let (seq, cuts_mod) = split(self.word().fetch_add(CUT_STEP, SeqCst));
        // From `word`, not `cuts + 1`: a coordinator killed before storing `cuts` left
        // it behind by its cut.
        let number = whole_cuts(published, cuts_mod.wrapping_add(1));
        self.u64_at(OFF_CUT_SEQ).store(seq, Relaxed);
        self.u64_at(OFF_CUTS).store(number, Release);
        Ok(Cut { number, seq })
    }

    /// When cut `number` was made (Unix ms), if its slot still holds it: the slots keep
    /// the last 480 cuts, and clocks made by a build before cut times had none.
    pub fn cut_time(&self, number: u64) -> Option<u64> {
        let slot = self.cut_time_slot(number).load(Acquire);
        (slot & CUT_NUMBER_MASK == number & CUT_NUMBER_MASK && slot >> CUT_NUMBER_BITS > 0)
            .then_some(slot >> CUT_NUMBER_BITS)
    }

    fn cut_time_slot(&self, number: u64) -> &AtomicU64 {
        self.u64_at(OFF_CUT_TIMES + 8 * (number % CUT_TIME_SLOTS) as usize)
    }

    /// The newest application-consistent cut, if any.
    pub fn last_app_consistent_cut(&self) -> Option<u64> {
        Some(self.u64_at(OFF_APP_CUT).load(Acquire)).filter(|&cut| cut > 0)
    }

    /// The newest cut, if any.
    pub fn last_cut(&self) -> Option<Cut> {
        let number = self.u64_at(OFF_CUTS).load(Acquire);
        (number > 0).then(|| Cut {
            number,
            seq: self.u64_at(OFF_CUT_SEQ).load(Relaxed),
        })
    }

    fn word(&self) -> &AtomicU64 {
        self.u64_at(OFF_WORD)
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset & 7 == 0 && offset + 8 <= self.map.len());
        // SAFETY: the mapping is page-aligned and FILE_BYTES long (checked on open), so
        // this is an aligned, in-bounds u64 living as long as `self.map`; the clock's
        // words are only ever accessed atomically, by every process that maps it.
        unsafe { &*self.map.as_mut_ptr().add(offset).cast::<AtomicU64>() }
    }
}

/// An exclusive `flock`, released on drop.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn exclusive(file: &'a File) -> io::Result<Flock<'a>> {
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Flock(file))
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: plain syscall on an fd we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn random_id() -> u64 {
    let mut bytes = [0u8; 8];
    loop {
        getrandom::getrandom(&mut bytes).expect("the OS random source");
        let id = u64::from_le_bytes(bytes);
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_cuts_follows_the_count_across_the_16_bit_wrap() {
        assert_eq!(whole_cuts(5, 5), 5);
        assert_eq!(whole_cuts(5, 7), 7);
        assert_eq!(whole_cuts(65_535, 1), 65_537);
        assert_eq!(whole_cuts(3 << 16, 0), 3 << 16);
    }

    #[test]
    fn a_cut_takes_a_seq_and_counts_itself_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let clock = GroupClock::open_or_create(&dir.path().join("g.clock")).unwrap();
        assert_eq!(clock.take(), (FIRST_SEQ, 0));
        let cut = clock.cut().unwrap();
        assert_eq!(cut, Cut { number: 1, seq: 2 });
        assert_eq!(clock.take(), (3, 1));
        assert_eq!(clock.cuts(), 1);
        assert_eq!(clock.last_cut(), Some(cut));
        clock.raise(100);
        assert_eq!(clock.take(), (100, 1), "raising keeps the cut count");
        clock.raise(10);
        assert_eq!(clock.peek(), (101, 1), "never lowers");
        // Past the 16 bits the word keeps, the count stays whole.
        for _ in 0..70_000 {
            clock.cut().unwrap();
        }
        assert_eq!(clock.take().1, 70_001);
        // A coordinator that died between its add and storing the count: the next
        // one numbers its cut from the word.
        clock.word().fetch_add(CUT_STEP, SeqCst);
        assert_eq!(clock.cut().unwrap().number, 70_003);
    }

    #[test]
    fn a_cut_knows_its_time_until_its_slot_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let clock = GroupClock::open_or_create(&dir.path().join("g.clock")).unwrap();
        let before = changelog::unix_ms_now();
        let first = clock.cut().unwrap().number;
        let after = changelog::unix_ms_now();
        let time = clock.cut_time(first).expect("the cut's time");
        assert!(
            (before..=after).contains(&time),
            "{before} <= {time} <= {after}"
        );
        assert_eq!(clock.cut_time(first + 1), None, "not made yet");
        for _ in 0..CUT_TIME_SLOTS {
            clock.cut().unwrap();
        }
        assert_eq!(clock.cut_time(first), None, "its slot holds a newer cut");
        assert!(clock.cut_time(first + CUT_TIME_SLOTS).is_some());
    }

    #[test]
    fn a_second_opener_shares_the_clock_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.clock");
        let a = GroupClock::open_or_create(&path).unwrap();
        let b = GroupClock::open_or_create(&path).unwrap();
        assert_eq!(a.id(), b.id());
        a.take();
        assert_eq!(b.take().0, FIRST_SEQ + 1);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![7u8; FILE_BYTES as usize]).unwrap();
        let err = GroupClock::open(&junk).err().unwrap().to_string();
        assert!(err.contains("group-clock magic"), "{err}");
    }
}
