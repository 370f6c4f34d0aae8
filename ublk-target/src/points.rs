//! The recovery-point catalog, the views registry and retention.
//!
//! Point numbering: point `P` is segment index `P`; the state at point `P` is every
//! record with seq `<= last_seq(P)` applied, i.e. the replica right after segment `P`.
//! The replica holds the latest applied point `L`; an older point `k` can be
//! reconstructed while the undo journals `k+1 ..= L` are all retained (each one gives
//! back the bytes its segment overwrote). So the recovery points are:
//!
//! * `L`, if segment `L` carries the crash-point flag;
//! * every `k < L` whose journals `k+1 ..= L` are present, intact and chained, and
//!   whose segment carries the crash-point flag (its facts come from `undo_{k+1}`).
//!   A merged file of segments `j ..= k` stands for their journals: the points
//!   `j ..= k - 1` are then gone (thinned out), `j - 1` is described by it.
//!
//! Segments without the flag (initial sync, resync, a ring overflow) are no points: the
//! source never had that state (I3, I7).
//!
//! Views register in `JOURNAL/views/<name>` (text: `point P`, `pid N`) so that pruning
//! keeps what they read; an entry whose process is gone is ignored and removed.
//!
//! Retention ([`prune`]) drops the oldest undo files so that at most `keep_points`
//! points remain, none is older than `keep_age` (by its creation time) and the undo
//! journals take at most `keep_size` bytes of disk (their allocated blocks: what
//! deleting them frees), always keeping the latest point, and never a journal a
//! registered view needs. Points go oldest first while any limit says so (should the
//! source's clock have stepped back, a point older by time than a newer-numbered one
//! goes when that one does).
//!
//! **Thinning** (`thin_after`, `thin_every`) keeps fine-grained points for the recent
//! past and sparse ones further back, as long retentions need: of the points of an
//! interval of `thin_every` (by the source's clock) that is wholly older than
//! `thin_after`, only the newest stays (the newest at a group cut, where the interval
//! has one, filed by the time the cut was made so that the volumes of a group keep the
//! same cuts). The undo files between two points that stay become one merged file
//! ([`crate::journal`]), which undoes the whole run: a block rewritten a thousand times
//! in the hour is kept once. Merging copies the before-images (reading them, on XFS or
//! btrfs too): each interval's changes are read (verified, then copied), written once
//! and read back for the merged file's checksum (so that only one input file is open
//! at a time). An applier does it on a thread of its own, one run at a time, and goes
//! on applying meanwhile; `prune` does every merge due before it returns.
//!
//! An applier keeps what is retained in memory ([`Retained`]) from one segment to
//! the next, so what retention costs per segment does not grow with the journals
//! retained; the catalog, which reads every journal, is read once. Files are
//! deleted oldest first, so after a crash the retained journals are still one
//! contiguous run ending at `L`.

use crate::error::{Result, TargetError};
use crate::journal::Journal;
use crate::state::{ApplyState, PointFacts, ReplicaPaths};
use changelog::uring::Uring;
use changelog::GroupCutLabel;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

/// One recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryPoint {
    /// The point's number: the index of the segment it ends with.
    pub index: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Source clock, ms since the Unix epoch.
    pub created_unix_ms: u64,
    pub crash_consistent: bool,
    pub app_consistent: bool,
    /// The replica is at this point: serving it needs no journal.
    pub latest: bool,
    /// The consistency-group cuts the point is at, if any (see [`crate::group_cuts`]).
    pub group_cuts: Option<changelog::GroupCutLabel>,
}

impl RecoveryPoint {
    fn new(facts: &PointFacts, latest: bool) -> RecoveryPoint {
        RecoveryPoint {
            index: facts.index,
            first_seq: facts.first_seq,
            last_seq: facts.last_seq,
            created_unix_ms: facts.created_unix_ms,
            crash_consistent: facts.is_crash_point(),
            app_consistent: facts.is_app_consistent(),
            latest,
            group_cuts: None,
        }
    }
}

/// A registered point view.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ViewEntry {
    pub name: String,
    /// The point it shows; `None` when the entry is unreadable (it then holds every
    /// journal, to be safe).
    pub point: Option<u64>,
    pub pid: Option<u32>,
}

/// An undo file, by the segments it undoes (first, last), and the disk it takes.
pub type JournalSize = ((u64, u64), u64);

/// A replica's recovery points and journals.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Catalog {
    pub volume: Option<String>,
    /// The last applied segment.
    pub latest_applied: Option<u64>,
    /// Set when the replica was rolled back for failover.
    pub rolled_back_to: Option<u64>,
    /// The key that sealed the last applied segment, when known.
    pub key_id: Option<[u8; 8]>,
    /// The replica's chain position (where applying goes on).
    #[serde(skip)]
    pub cursor: Option<changelog::ChainCursor>,
    /// Oldest first.
    pub points: Vec<RecoveryPoint>,
    /// Undo files in the contiguous, chained run ending at the latest segment, oldest
    /// first, by the segments each undoes (first, last: more than one for a merged
    /// file).
    pub journals: Vec<(u64, u64)>,
    /// Disk space every undo file present takes (allocated blocks), in bytes.
    pub journal_bytes: u64,
    /// Every undo file present, by last segment, with the disk space it takes.
    #[serde(skip)]
    pub journal_sizes: Vec<JournalSize>,
    /// The undo journal of a segment whose apply was interrupted (index latest + 1).
    pub pending: Option<u64>,
    /// Journal files outside the run (below a missing or damaged one, or replaced by a
    /// merged file); prune removes them.
    pub unused_journals: Vec<(u64, u64)>,
    /// Journals that could not be read, with why.
    pub damaged: Vec<(u64, String)>,
    pub views: Vec<ViewEntry>,
}

impl Catalog {
    /// With the disk space of the undo files `present` (last: reading the headers
    /// comes first; a file pruned since it was listed counts 0).
    fn with_sizes(mut self, journal: &Journal, present: Vec<(u64, u64)>) -> Result<Catalog> {
        self.journal_sizes = present
            .into_iter()
            .map(|span| Ok((span, journal.disk_bytes(span)?)))
            .collect::<Result<_>>()?;
        self.journal_bytes = self.journal_sizes.iter().map(|&(_, bytes)| bytes).sum();
        Ok(self)
    }

    pub fn find(&self, point: u64) -> Option<&RecoveryPoint> {
        self.points.iter().find(|p| p.index == point)
    }

    pub fn latest_point(&self) -> Option<&RecoveryPoint> {
        self.points.last()
    }

    /// "points 3..=17 exist (9 of them)", for error messages.
    pub fn describe_available(&self) -> String {
        match (self.points.first(), self.points.last()) {
            (Some(first), Some(last)) if first.index == last.index => {
                format!("only point {} exists", first.index)
            }
            (Some(first), Some(last)) => format!(
                "points {}..={} exist ({} of them)",
                first.index,
                last.index,
                self.points.len()
            ),
            _ => "no recovery point exists yet".into(),
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        match self.latest_applied {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "volume {}: latest applied segment {l}",
                    self.volume.as_deref().unwrap_or("?")
                );
            }
            None => out.push_str("nothing applied yet\n"),
        }
        if let Some(p) = self.rolled_back_to {
            let _ = writeln!(
                out,
                "ROLLED BACK to point {p} for failover: no further segment is applied"
            );
        }
        if !self.points.is_empty() {
            let _ = writeln!(
                out,
                "{:>8}  {:<24}  {:>23}  kind",
                "point", "created (UTC)", "seqs"
            );
        }
        for p in &self.points {
            let mut kind = String::from("crash");
            if p.app_consistent {
                kind.push_str(", app");
            }
            if let Some(c) = &p.group_cuts {
                kind.push_str(&match c.first == c.last {
                    true => format!(", group cut {}", c.first),
                    false => format!(", group cuts {}..={}", c.first, c.last),
                });
            }
            if p.latest {
                kind.push_str(" (latest, on the replica)");
            }
            let _ = writeln!(
                out,
                "{:>8}  {:<24}  {:>23}  {kind}",
                p.index,
                format_utc_ms(p.created_unix_ms),
                format!("{}..={}", p.first_seq, p.last_seq)
            );
        }
        let _ = writeln!(out, "{}", self.describe_available());
        if let (Some((first, _)), Some((_, last))) = (self.journals.first(), self.journals.last()) {
            let _ = writeln!(
                out,
                "undo journals {first}..={last} ({} files; every undo file present takes {})",
                self.journals.len(),
                format_bytes(self.journal_bytes)
            );
        }
        if let Some(p) = self.pending {
            let _ = writeln!(
                out,
                "undo journal {p} belongs to an interrupted apply (it is re-applied next)"
            );
        }
        for (index, why) in &self.damaged {
            let _ = writeln!(out, "DAMAGED undo journal {index}: {why}");
        }
        if !self.unused_journals.is_empty() {
            let _ = writeln!(
                out,
                "{} undo file(s) below a gap, or replaced by a merged file, serve no point \
                 (prune removes them)",
                self.unused_journals.len()
            );
        }
        for v in &self.views {
            let _ = writeln!(
                out,
                "view {} at point {} (pid {})",
                v.name,
                v.point.map_or("?".into(), |p| p.to_string()),
                v.pid.map_or("?".into(), |p| p.to_string())
            );
        }
        out
    }
}

/// Reads the catalog of the replica at `paths`. Checks journal headers (not their
/// data; views and rollback verify that before use).
pub fn catalog(paths: &ReplicaPaths) -> Result<Catalog> {
    let journal = Journal::new(&paths.journal);
    let views = list_views(&paths.journal)?;
    // The state before the listing: an applier puts a segment's journal in place
    // before its state names the segment, so the listing has the latest one.
    let state = ApplyState::load(&paths.state, None)?;
    let Some(state) = state else {
        let present = journal.list_spans()?;
        let catalog = Catalog {
            views,
            unused_journals: present.clone(),
            ..Catalog::default()
        };
        return catalog.with_sizes(&journal, present);
    };
    let mut catalog = Catalog {
        volume: Some(state.cursor.volume.to_string()),
        latest_applied: state.latest(),
        rolled_back_to: state.rolled_back_to,
        key_id: state.key_id,
        cursor: Some(state.cursor.clone()),
        views,
        ..Catalog::default()
    };
    // Thinning in the applier deletes files inside the run: one that vanished under
    // the walk means listing again (not a damaged journal).
    let mut attempts = 0;
    let (present, mut points) = loop {
        let present = journal.list_spans()?;
        catalog.journals.clear();
        catalog.damaged.clear();
        // The last time, a file that vanished is where the walk ends, as a damaged
        // one would.
        let last_try = attempts == 3;
        match walk_down(&journal, &state, &present, &mut catalog, last_try) {
            Err(vanished) => {
                log::debug!("{vanished}; listing the journal again");
                attempts += 1;
            }
            Ok(points) => break (present, points),
        }
    };
    let next = state.cursor.next_index;
    if present.iter().any(|&(first, _)| first == next) {
        catalog.pending = Some(next);
    }
    catalog.journals.reverse();
    points.reverse();
    let cuts = crate::group_cuts::load(&paths.journal)?;
    for p in &mut points {
        p.group_cuts = cuts.get(&p.index).copied();
    }
    catalog.points = points;
    catalog.unused_journals = present
        .iter()
        .copied()
        .filter(|span| {
            span.0 < next
                && catalog.journals.binary_search(span).is_err()
                && !catalog.damaged.iter().any(|(d, _)| *d == span.1)
        })
        .collect();
    catalog.with_sizes(&journal, present)
}

/// Walks the journals `present` down from the latest applied segment while they are
/// intact and chained, pushing each onto `catalog.journals` (newest first) and what
/// stops the walk onto `catalog.damaged`; where several files end at one segment, the
/// longest (a merged file and what it replaced, left by a crash). Returns the points,
/// newest first; `Err`: a file listed was gone when opened (unless `vanished_is_damage`:
/// then that ends the walk, as a damaged file does).
fn walk_down(
    journal: &Journal,
    state: &ApplyState,
    present: &[(u64, u64)],
    catalog: &mut Catalog,
    vanished_is_damage: bool,
) -> std::result::Result<Vec<RecoveryPoint>, TargetError> {
    let mut points = Vec::new();
    if let Some(last) = state.last.filter(|l| l.is_crash_point()) {
        points.push(RecoveryPoint::new(&last, true));
    }
    let mut longest_ending = std::collections::HashMap::new();
    for &(first, last) in present {
        let start = longest_ending.entry(last).or_insert(first);
        *start = first.min(*start);
    }
    let mut expect_digest = state.cursor.prev_digest;
    let mut expect_facts = state.last;
    let mut k = state.latest();
    while let Some(span) = k.and_then(|k| longest_ending.get(&k).map(|&first| (first, k))) {
        let undo = match journal.open_span(span) {
            Ok(undo) => undo,
            Err(TargetError::Io { source, context })
                if source.kind() == std::io::ErrorKind::NotFound && !vanished_is_damage =>
            {
                return Err(TargetError::Io { context, source });
            }
            Err(e) => {
                catalog.damaged.push((span.1, e.to_string()));
                break;
            }
        };
        let h = &undo.header;
        if h.digest != expect_digest
            || expect_facts.is_some_and(|f| f != h.segment)
            || h.cursor_before.volume != state.cursor.volume
        {
            catalog.damaged.push((
                span.1,
                "it does not belong to this replica's history (digest differs)".into(),
            ));
            break;
        }
        catalog.journals.push(span);
        if let Some(prev) = h.prev.filter(|p| p.is_crash_point()) {
            points.push(RecoveryPoint::new(&prev, false));
        }
        expect_digest = h.cursor_before.prev_digest;
        expect_facts = h.prev;
        k = span.0.checked_sub(1);
    }
    Ok(points)
}

/// Formats ms since the Unix epoch as `YYYY-MM-DD hh:mm:ss.mmm` (UTC).
pub fn format_utc_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

// ---- views registry ----

fn views_dir(journal_dir: &Path) -> PathBuf {
    journal_dir.join("views")
}

/// Whether a view name is usable as a file name: `[A-Za-z0-9._-]`, 1–64 bytes, not
/// starting with `.`.
pub fn valid_view_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks whether the process exists; nothing is delivered.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn parse_view(text: &str) -> (Option<u64>, Option<u32>) {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
    };
    (
        field("point "),
        field("pid ").and_then(|p| u32::try_from(p).ok()),
    )
}

/// The live registered views. Entries of processes that are gone are removed.
pub fn list_views(journal_dir: &Path) -> Result<Vec<ViewEntry>> {
    let dir = views_dir(journal_dir);
    let names = changelog::store::file_names(&dir)
        .map_err(|e| TargetError::io(format!("listing {}", dir.display()), e))?;
    let mut views = Vec::new();
    for name in names {
        if !valid_view_name(&name) {
            continue; // temporary files
        }
        let path = dir.join(&name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // just removed
            Err(e) => return Err(TargetError::io(format!("reading {}", path.display()), e)),
        };
        let (point, pid) = parse_view(&text);
        if let Some(pid) = pid.filter(|&p| !process_alive(p)) {
            log::warn!("view {name}: its process {pid} is gone; removing its registration");
            let _ = std::fs::remove_file(&path);
            continue;
        }
        views.push(ViewEntry { name, point, pid });
    }
    Ok(views) // in name order, as file_names lists them
}

/// Registers view `name` at `point` for this process; refuses a name a live view holds.
pub(crate) fn register_view(journal_dir: &Path, name: &str, point: u64) -> Result<PathBuf> {
    if !valid_view_name(name) {
        return Err(TargetError::View {
            what: format!(
                "view name {name:?} is not 1-64 characters of [A-Za-z0-9._-] not starting with '.'"
            ),
        });
    }
    let dir = views_dir(journal_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| TargetError::io(format!("creating {}", dir.display()), e))?;
    let path = dir.join(name);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let (_, Some(pid)) = parse_view(&text) {
            if process_alive(pid) {
                return Err(TargetError::View {
                    what: format!("a view named {name} is open (process {pid}); pick another name"),
                });
            }
        }
    }
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = format!("point {point}\npid {}\n", std::process::id());
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| TargetError::io(format!("registering view {}", path.display()), e))?;
    Ok(path)
}

// ---- retention ----

/// How many recovery points to keep. Both limits apply; the latest point is always
/// kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// At most this many points (counting the latest); 0 is treated as 1.
    pub keep_points: Option<usize>,
    /// No point older than this (by its creation time).
    pub keep_age: Option<Duration>,
    /// Undo journals take at most this many bytes of disk; the oldest points go first.
    pub keep_size: Option<u64>,
    /// Older points thinned out to one per interval.
    pub thin: Option<Thinning>,
}

/// Points older than `after` are kept one per `every` of the source's clock (the
/// newest of each), as long retentions keep fine-grained points only for the recent
/// past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thinning {
    pub after: Duration,
    pub every: Duration,
}

impl Retention {
    pub fn is_unlimited(&self) -> bool {
        self.keep_points.is_none()
            && self.keep_age.is_none()
            && self.keep_size.is_none()
            && self.thin.is_none()
    }
}

/// What [`prune`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Undo files deleted, by the segments each undid (first, last).
    pub removed: Vec<(u64, u64)>,
    /// Recovery points left, and when the oldest of them was created.
    pub points_left: usize,
    pub oldest_left_unix_ms: Option<u64>,
    /// Disk space the undo journals left take.
    pub journal_bytes: u64,
    /// Views that kept journals retention would have dropped.
    pub held_by: Vec<ViewEntry>,
}

/// Applies `retention` to the replica at `paths` (taking the journal lock: not while
/// an applier runs; an applier prunes itself, see `ApplyOptions::retention`).
/// `now_unix_ms` is the clock ages are measured against.
pub fn prune(paths: &ReplicaPaths, retention: &Retention, now_unix_ms: u64) -> Result<PruneReport> {
    let journal = Journal::new(&paths.journal);
    let _lock = journal.lock()?;
    let mut uring = Uring::new(4).map_err(|e| TargetError::io("io_uring setup", e))?;
    prune_locked(paths, &journal, &mut uring, retention, now_unix_ms)
}

/// [`prune`] for a caller that holds the journal lock.
pub(crate) fn prune_locked(
    paths: &ReplicaPaths,
    journal: &Journal,
    uring: &mut Uring,
    retention: &Retention,
    now_unix_ms: u64,
) -> Result<PruneReport> {
    let catalog = catalog(paths)?;
    if let Some(point) = catalog.rolled_back_to {
        return Err(TargetError::RolledBack { point });
    }
    let Some(latest) = catalog.latest_applied else {
        return Ok(PruneReport::default());
    };
    let mut retained = Retained::from_catalog(&catalog, paths)?;
    let report = retained.prune(paths, journal, uring, latest, retention, now_unix_ms, false)?;
    retained.drop_stale_cut_lines(paths, latest)?;
    Ok(report)
}

/// The retained recovery points and undo journals, as an applier keeps them from one
/// segment to the next: read from the catalog once (which reads every journal's
/// header), then told of each point applied, so retention after every segment does
/// not cost more as journals pile up.
#[derive(Debug)]
pub(crate) struct Retained {
    /// Retained points, oldest first: (index, creation time).
    points: VecDeque<(u64, u64)>,
    /// Retained points with group cuts, oldest first, with the time thinning files
    /// each under ([`cut_time`]), and how many lines the cut file still holds for
    /// points no longer retained: it is rewritten once those outnumber 16 plus a
    /// quarter of the retained ones, not at every prune (nothing reads them).
    cut_points: VecDeque<(u64, u64)>,
    stale_cut_lines: usize,
    /// Every undo file present, by last segment, with the disk space it takes, and
    /// their sum.
    journal_sizes: VecDeque<JournalSize>,
    journal_bytes: u64,
    /// Files a merged file replaced, left by a crash before they were deleted: deleted
    /// by the next prune.
    replaced: Vec<(u64, u64)>,
    /// Thinning failed halfway: what is kept here may no longer match the files.
    pub(crate) needs_reload: bool,
    /// Runs of undo files (after the point, up to the point) whose merge failed without
    /// changing anything, and when to try each again.
    merges_paused: std::collections::HashMap<(u64, u64), u64>,
    /// The merge under way, if any (one at a time).
    merging: Option<Merging>,
    /// When thinning walks the points next (Unix ms): see [`Retained::thin`].
    next_thin_walk_ms: u64,
}

/// A merge of the undo files between points `from` and `to` on a thread of its own, so
/// that applying goes on meanwhile. Until it is finished ([`Retained::finish_merge`])
/// its files and points stay; should retention's limits reach past `from`, it is
/// abandoned first.
#[derive(Debug)]
struct Merging {
    from: u64,
    to: u64,
    /// The files it replaces.
    spans: Vec<(u64, u64)>,
    /// How long to leave the run alone if the merge fails without changing anything.
    pause_ms: u64,
    /// Set to have the worker stop and leave nothing behind.
    abandon: std::sync::Arc<AtomicBool>,
    /// Returns the merged file's segments (first, last).
    worker: std::thread::JoinHandle<Result<(u64, u64)>>,
}

impl Drop for Retained {
    /// Abandons a merge under way and waits for its worker: its run is merged again
    /// later. One that got as far as renaming its file leaves it beside the ones it
    /// replaces, as a crash would, which every reader handles and the next prune
    /// tidies.
    fn drop(&mut self) {
        if let Some(merging) = self.merging.take() {
            merging.abandon.store(true, Relaxed);
            let _ = merging.worker.join();
        }
    }
}

/// The time a point at `cuts`, sealed at `created_unix_ms`, is filed under when thinning:
/// when its first cut was made, which every volume of the group agrees on, where the
/// label has it (never after the segment's own time, should the clocks disagree).
fn cut_time(cuts: &GroupCutLabel, created_unix_ms: u64) -> u64 {
    cuts.first_unix_ms
        .map_or(created_unix_ms, |ms| ms.min(created_unix_ms))
}

/// The filing time of point `index` if it is one of `cut_points` (sorted by index).
fn cut_point_time(cut_points: &VecDeque<(u64, u64)>, index: u64) -> Option<u64> {
    let at = cut_points
        .binary_search_by_key(&index, |&(point, _)| point)
        .ok()?;
    Some(cut_points[at].1)
}

fn is_cut_point(cut_points: &VecDeque<(u64, u64)>, index: u64) -> bool {
    cut_point_time(cut_points, index).is_some()
}

/// The times `points` (index, segment time; oldest first) are filed under when thinning:
/// a point at group cuts its [`cut_time`]; any other its segment's time, but no later
/// than the next point's filing time. A producer records a cut's MARK at its next
/// request or tick, so a segment sealed after the cut was made can come before the
/// cut's point; filed no later, the times stay in order and the intervals they fall in
/// stay runs.
fn filing_times(points: &[(u64, u64)], cut_points: &VecDeque<(u64, u64)>) -> Vec<u64> {
    let mut filed = vec![0; points.len()];
    let mut later = u64::MAX;
    for (k, &(index, created)) in points.iter().enumerate().rev() {
        filed[k] = cut_point_time(cut_points, index)
            .unwrap_or(created)
            .min(later);
        later = filed[k];
    }
    filed
}

/// What thinning works with, for one prune.
struct Thin<'a> {
    journal: &'a Journal,
    views: &'a [ViewEntry],
    removed: &'a mut Vec<(u64, u64)>,
    /// Merge on a thread of its own and go on (an applier), or wait for each (`prune`).
    background: bool,
}

impl Retained {
    /// What `paths`' catalog says is retained.
    pub(crate) fn load(paths: &ReplicaPaths) -> Result<Retained> {
        Retained::from_catalog(&catalog(paths)?, paths)
    }

    /// (The caller holds the journal lock.)
    fn from_catalog(catalog: &Catalog, paths: &ReplicaPaths) -> Result<Retained> {
        match Journal::new(&paths.journal).remove_temporary_files() {
            Ok(0) => {}
            Ok(n) => log::info!("removed {n} unfinished undo file(s) left by a killed writer"),
            Err(e) => log::warn!("{e}; unfinished undo files left by a killed writer stay"),
        }
        let within_run = |&(first, last): &(u64, u64)| {
            catalog
                .journals
                .iter()
                .any(|&(a, b)| a <= first && last <= b)
        };
        let cut_points: VecDeque<(u64, u64)> = catalog
            .points
            .iter()
            .filter_map(|p| Some((p.index, cut_time(&p.group_cuts?, p.created_unix_ms))))
            .collect();
        let latest = catalog.latest_applied.unwrap_or(0);
        let stale_cut_lines = crate::group_cuts::load(&paths.journal)?
            .keys()
            .filter(|&&i| i <= latest && !is_cut_point(&cut_points, i))
            .count();
        Ok(Retained {
            points: catalog
                .points
                .iter()
                .map(|p| (p.index, p.created_unix_ms))
                .collect(),
            cut_points,
            stale_cut_lines,
            needs_reload: false,
            merges_paused: std::collections::HashMap::new(),
            merging: None,
            next_thin_walk_ms: 0,
            journal_sizes: catalog.journal_sizes.iter().copied().collect(),
            journal_bytes: catalog.journal_bytes,
            replaced: catalog
                .unused_journals
                .iter()
                .copied()
                .filter(within_run)
                .collect(),
        })
    }

    /// Segment `facts` was applied (its position durable), ending at `group_cuts` or
    /// not; its undo file takes `journal_bytes` of disk.
    pub(crate) fn applied(
        &mut self,
        facts: &PointFacts,
        group_cuts: Option<&GroupCutLabel>,
        journal_bytes: u64,
    ) {
        let span = (facts.index, facts.index);
        // An undo file kept from an interrupted apply of this segment is counted once.
        if let Some(&(last, bytes)) = self.journal_sizes.back() {
            if last == span {
                self.journal_sizes.pop_back();
                self.journal_bytes -= bytes;
            }
        }
        self.journal_sizes.push_back((span, journal_bytes));
        self.journal_bytes += journal_bytes;
        if facts.is_crash_point() {
            self.points.push_back((facts.index, facts.created_unix_ms));
            if let Some(cuts) = group_cuts {
                let time = cut_time(cuts, facts.created_unix_ms);
                self.cut_points.push_back((facts.index, time));
            }
        }
    }

    /// Rewrites the cut file with the lines of retained points (and of segments not
    /// applied yet) only.
    fn drop_stale_cut_lines(&mut self, paths: &ReplicaPaths, latest: u64) -> Result<()> {
        if self.stale_cut_lines > 0 {
            let kept = &self.cut_points;
            crate::group_cuts::retain(&paths.journal, |index| {
                index > latest || is_cut_point(kept, index)
            })?;
            self.stale_cut_lines = 0;
        }
        Ok(())
    }

    /// Points `dropped` (indexes, ascending) are no longer retained.
    fn forget_points(&mut self, dropped: &[u64]) {
        let gone = |index: &u64| dropped.binary_search(index).is_ok();
        self.points.retain(|(index, _)| !gone(index));
        let cuts_before = self.cut_points.len();
        self.cut_points.retain(|(index, _)| !gone(index));
        self.stale_cut_lines += cuts_before - self.cut_points.len();
    }

    /// Deletes undo file `span` and forgets it; notes it in `removed` if it was there.
    fn remove_file(
        &mut self,
        journal: &Journal,
        span: (u64, u64),
        removed: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        if journal.remove(span)? {
            removed.push(span);
        }
        if let Some(at) = self.journal_sizes.iter().position(|&(s, _)| s == span) {
            let (_, bytes) = self.journal_sizes.remove(at).expect("present");
            self.journal_bytes -= bytes;
        }
        Ok(())
    }

    /// Applies `retention` with the replica at segment `latest` (see [`prune`]). When
    /// thinning, `background` (an applier) starts one merge of undo files at a time on a
    /// thread of its own and finishes it at a later call once it is done, so applying
    /// goes on while it copies; otherwise (`prune`) every merge due is made now.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prune(
        &mut self,
        paths: &ReplicaPaths,
        journal: &Journal,
        uring: &mut Uring,
        latest: u64,
        retention: &Retention,
        now_unix_ms: u64,
        background: bool,
    ) -> Result<PruneReport> {
        let mut removed = Vec::new();
        for span in std::mem::take(&mut self.replaced) {
            self.remove_file(journal, span, &mut removed)?;
        }
        // Oldest first, while a limit says so (a step per point dropped, not per point
        // kept); the latest point always stays.
        let keep_points = retention.keep_points.unwrap_or(usize::MAX).max(1);
        let over = self.points.len().saturating_sub(keep_points);
        let mut first_kept = 0;
        // The journals at or below the oldest point kept serve nothing: what they take
        // (`freed`, the first `freeing` of them) goes with them.
        let (mut freeing, mut freed) = (0, 0);
        while first_kept + 1 < self.points.len() {
            let (index, created_unix_ms) = self.points[first_kept];
            while let Some(&(_, bytes)) = self
                .journal_sizes
                .get(freeing)
                .filter(|&&((_, last), _)| last <= index)
            {
                freed += bytes;
                freeing += 1;
            }
            let age_ms = now_unix_ms.saturating_sub(created_unix_ms);
            let too_old = retention
                .keep_age
                .is_some_and(|max| u128::from(age_ms) > max.as_millis());
            let too_big = retention
                .keep_size
                .is_some_and(|max| self.journal_bytes - freed > max);
            if first_kept < over || too_old || too_big {
                first_kept += 1;
            } else {
                break;
            }
        }
        let oldest_kept = self.points.get(first_kept).map(|&(index, _)| index);
        // Journals up to the oldest kept point serve nothing; with no point at all,
        // every journal of an applied segment goes.
        let wanted_limit = oldest_kept.unwrap_or(latest);
        let views = list_views(&paths.journal)?;
        let mut limit = wanted_limit;
        let mut held_by = Vec::new();
        for view in &views {
            let needs = view.point.unwrap_or(0);
            limit = limit.min(needs);
            if needs < wanted_limit {
                held_by.push(view.clone());
            }
        }
        if let Some(merging) = self.merging.as_ref().filter(|m| limit > m.from) {
            // The limits reach into the run being merged: merging it is pointless now.
            merging.abandon.store(true, Relaxed);
            self.finish_merge(journal, &mut removed, true, now_unix_ms)?;
        }
        let last_removed = limit.min(latest);
        while let Some(&(span, _)) = self.journal_sizes.front() {
            if span.1 > last_removed {
                break;
            }
            self.remove_file(journal, span, &mut removed)?;
        }
        let dropped: Vec<u64> = self
            .points
            .iter()
            .map(|&(index, _)| index)
            .take_while(|&index| index < limit)
            .collect();
        self.forget_points(&dropped);
        if let Some(thinning) = retention.thin {
            // Thinning is housekeeping: trouble with it (a full disk, a damaged journal)
            // is told, that run tried again an interval later, and applying goes on.
            let mut thin = Thin {
                journal,
                views: &views,
                removed: &mut removed,
                background,
            };
            if let Err(e) = self.thin(&mut thin, &thinning, now_unix_ms) {
                log::warn!("thinning recovery points: {e}; the journal is read again");
                self.needs_reload = true;
            }
        }
        if !removed.is_empty() {
            journal.sync(uring)?;
            if self.stale_cut_lines > 16 + self.cut_points.len() / 4 {
                self.drop_stale_cut_lines(paths, latest)?;
            }
            log::info!(
                "removed {} undo file(s) (points older than {limit} dropped, or thinned out)",
                removed.len()
            );
        }
        Ok(PruneReport {
            points_left: self.points.len(),
            oldest_left_unix_ms: self.points.front().map(|&(_, created)| created),
            journal_bytes: self.journal_bytes,
            removed,
            held_by,
        })
    }

    /// Thins the points older than `thinning.after`. The source's clock is cut into
    /// intervals of `thinning.every` (aligned to the Unix epoch); of the points of an
    /// interval wholly older than `after`, one stays: the newest with a group cut if
    /// there is one, else the newest. A point at group cuts falls in the interval of
    /// the time its first cut was made ([`cut_time`]), the other points in the interval
    /// of their segment's time unless a newer cut's time is earlier ([`filing_times`]).
    /// So every volume of a group keeps the point at the newest cut made in each
    /// interval (the one whose cuts start in it and the next one's do not, a fact of
    /// the clock), however late each volume sealed it. The latest point stays, and no
    /// merge starts at or after the oldest point a view shows (a view loads the
    /// journals of segments applied after it opened one by one, by name). Between two
    /// points that stay for good, the undo files become one merged file
    /// ([`Journal::merge`]), made once: a pair whose newer point's interval is not
    /// over, or whose newer point is the latest, waits. Before the oldest point that
    /// stays, the files just go.
    ///
    /// The walk over the retained points costs in proportion to them (those of the
    /// recent past included, `thin_after` of them at every segment), and what it decides
    /// changes only as intervals end, hours from the newest points: so it runs at most
    /// every tenth of an interval (10 s at most), and again as soon as a merge ends.
    fn thin(&mut self, thin: &mut Thin, thinning: &Thinning, now_unix_ms: u64) -> Result<()> {
        self.finish_merge(thin.journal, thin.removed, false, now_unix_ms)?;
        let every_tenth = (thinning.every.as_millis() as u64 / 10).min(10_000);
        let soon = now_unix_ms.saturating_add(every_tenth);
        // (A clock that stepped back does not hold the walk off.)
        if now_unix_ms < self.next_thin_walk_ms && self.next_thin_walk_ms <= soon {
            return Ok(());
        }
        self.next_thin_walk_ms = soon;
        let Some(held_from) = thin
            .views
            .iter()
            .map(|v| v.point)
            .try_fold(u64::MAX, |min, point| point.map(|p| p.min(min)))
        else {
            return Ok(()); // an unreadable registration holds everything
        };
        let every = (thinning.every.as_millis() as u64).max(1);
        let horizon = now_unix_ms.saturating_sub(thinning.after.as_millis() as u64);
        let over = |created: u64| (created / every + 1).saturating_mul(every) <= horizon;
        let points: Vec<(u64, u64)> = self
            .points
            .iter()
            .copied()
            .take_while(|&(index, _)| index <= held_from)
            .collect();
        let Some(last) = points.len().checked_sub(1) else {
            return Ok(());
        };
        let filed = filing_times(&points, &self.cut_points);
        let mut stays = vec![true; points.len()];
        let mut i = 0;
        while i < last && over(filed[i]) {
            let interval = filed[i] / every;
            let mut j = i;
            while j < last && filed[j + 1] / every == interval {
                j += 1;
            }
            if j == last {
                // The latest point's interval waits for a newer one: until then its
                // choice may change with each point (a backlog of old segments), and
                // what was merged would be merged again.
                break;
            }
            let cut = (i..=j)
                .rev()
                .find(|&k| is_cut_point(&self.cut_points, points[k].0));
            let chosen = cut.unwrap_or(j);
            for (k, stay) in stays.iter_mut().enumerate().take(j + 1).skip(i) {
                *stay = k == chosen;
            }
            i = j + 1;
        }
        // The newest point looked at (the latest, or a view's) stays; points from `i`
        // on are in intervals not over: they stay too.
        stays[last] = true;
        let staying: Vec<usize> = (0..points.len()).filter(|&k| stays[k]).collect();
        // Before the oldest that stays: its files serve nothing (but a merge under way
        // keeps its own).
        let merging_from = self.merging.as_ref().map_or(u64::MAX, |m| m.from);
        if staying[0] > 0 && points[staying[0]].0 <= merging_from {
            let oldest = points[staying[0]].0;
            let spans: Vec<(u64, u64)> = self
                .journal_sizes
                .iter()
                .map(|&(span, _)| span)
                .take_while(|&(_, last)| last <= oldest)
                .collect();
            for span in spans {
                self.remove_file(thin.journal, span, thin.removed)?;
            }
            let dropped: Vec<u64> = points[..staying[0]]
                .iter()
                .map(|&(index, _)| index)
                .collect();
            self.forget_points(&dropped);
        }
        for pair in staying.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            // Nothing between them, or the newer one may go yet: its interval is not
            // over, or it is the newest looked at (once newer points come, it goes
            // unless it is its interval's choice).
            if b == a + 1 || b >= i || b == last {
                continue;
            }
            let (from, to) = (points[a].0, points[b].0);
            if self
                .merges_paused
                .get(&(from, to))
                .is_some_and(|&until| now_unix_ms < until)
            {
                continue;
            }
            if self.merging.is_some() {
                break; // one at a time
            }
            let pause_ms = (thinning.every.as_millis() as u64).max(60_000);
            match self.start_merge(thin.journal, from, to, pause_ms) {
                Ok(()) if thin.background => break,
                Ok(()) => self.finish_merge(thin.journal, thin.removed, true, now_unix_ms)?,
                Err(e) => self.merge_failed(from, to, pause_ms, now_unix_ms, &e),
            }
        }
        Ok(())
    }

    /// Starts merging the undo files of segments `from + 1 ..= to` into one, on a
    /// thread of its own. An error here changed nothing.
    fn start_merge(&mut self, journal: &Journal, from: u64, to: u64, pause_ms: u64) -> Result<()> {
        let spans: Vec<(u64, u64)> = self
            .journal_sizes
            .iter()
            .map(|&(span, _)| span)
            .filter(|&(first, last)| first > from && last <= to)
            .collect();
        let tiles = spans.first().is_some_and(|s| s.0 == from + 1)
            && spans.last().is_some_and(|s| s.1 == to)
            && spans.windows(2).all(|w| w[1].0 == w[0].1 + 1);
        if !tiles || spans.len() < 2 {
            return Err(TargetError::Journal {
                path: journal.path_of(to),
                what: format!(
                    "the undo files of segments {}..={to} are not a run of two or more",
                    from + 1
                ),
            });
        }
        let worker_journal = journal.clone();
        let abandon = std::sync::Arc::new(AtomicBool::new(false));
        let (worker_abandon, worker_spans) = (abandon.clone(), spans.clone());
        let worker = std::thread::Builder::new()
            .name("undo-merge".into())
            .spawn(move || {
                let mut uring = Uring::new(4).map_err(|e| TargetError::io("io_uring setup", e))?;
                worker_journal.merge(&mut uring, &worker_spans, &worker_abandon)
            })
            .map_err(|e| TargetError::io("starting a thread to merge undo files", e))?;
        self.merging = Some(Merging {
            from,
            to,
            spans,
            pause_ms,
            abandon,
            worker,
        });
        Ok(())
    }

    /// Finishes the merge under way, if any, once it is done (or waits for it, with
    /// `wait`): puts the merged file in the place of the files it replaces, deletes
    /// those (into `removed`) and forgets the points between. A merge that failed
    /// before its file was in place is paused for that run, and so is one a view
    /// registered since needs undone (a view, listed once the merge is done, shows a
    /// point it thins out: its file goes, the files it would replace stay); an error
    /// returned means what is kept here may no longer match the files.
    fn finish_merge(
        &mut self,
        journal: &Journal,
        removed: &mut Vec<(u64, u64)>,
        wait: bool,
        now_unix_ms: u64,
    ) -> Result<()> {
        if !self.merge_to_finish(wait) {
            return Ok(());
        }
        let Some(merging) = self.merging.take() else {
            return Ok(());
        };
        self.next_thin_walk_ms = 0; // the next run may be merged now
        let Merging {
            from,
            to,
            spans,
            pause_ms,
            abandon,
            worker,
        } = merging;
        let merged = match worker.join() {
            Ok(result) => result,
            Err(_) => Err(TargetError::Journal {
                path: journal.path_of(to),
                what: "the thread merging undo files panicked".into(),
            }),
        };
        let merged = match merged {
            Ok(merged) => merged,
            // Failing after its rename (syncing the directory), it is in place.
            Err(e) if journal.path_of_span((from + 1, to)).exists() => return Err(e),
            Err(e) if abandon.load(Relaxed) => {
                log::debug!("merging the undo files between points {from} and {to}: {e}");
                return Ok(());
            }
            Err(e) => {
                self.merge_failed(from, to, pause_ms, now_unix_ms, &e);
                return Ok(());
            }
        };
        // Listed now, not when the merge started: a view may have registered since.
        let views = list_views(journal.dir())?;
        let needed = views
            .iter()
            .find(|v| v.point.is_none_or(|p| from < p && p < to));
        if let Some(view) = needed {
            // Its inputs are all there: the merged file just goes again.
            journal.remove(merged)?;
            let e = TargetError::Journal {
                path: journal.path_of_span(merged),
                what: format!(
                    "view {} registered meanwhile needs the points it thins out",
                    view.name
                ),
            };
            self.merge_failed(from, to, pause_ms, now_unix_ms, &e);
            return Ok(());
        }
        self.merges_paused.remove(&(from, to));
        let bytes = journal.disk_bytes(merged)?;
        let at = self
            .journal_sizes
            .iter()
            .position(|&((_, last), _)| last >= merged.1)
            .unwrap_or(self.journal_sizes.len());
        self.journal_sizes.insert(at, (merged, bytes));
        self.journal_bytes += bytes;
        for span in spans {
            self.remove_file(journal, span, removed)?;
        }
        let between: Vec<u64> = self
            .points
            .iter()
            .map(|&(index, _)| index)
            .filter(|&index| from < index && index < to)
            .collect();
        if let (Some(first), Some(last)) = (between.first(), between.last()) {
            log::info!(
                "thinned out points {first}..={last} (between points {from} and {to}): \
                 their undo files merged into one of {}",
                format_bytes(bytes)
            );
        }
        self.forget_points(&between);
        Ok(())
    }

    /// A merge of the run between `from` and `to` failed without changing anything:
    /// that run is left alone for `pause_ms` while the others are thinned.
    fn merge_failed(
        &mut self,
        from: u64,
        to: u64,
        pause_ms: u64,
        now_unix_ms: u64,
        e: &TargetError,
    ) {
        self.merges_paused
            .insert((from, to), now_unix_ms.saturating_add(pause_ms));
        log::warn!(
            "thinning out the points between {from} and {to}: {e}; those files are left as \
             they were, tried again in {}",
            changelog::short_duration(pause_ms)
        );
    }

    /// Finishes a merge that is done (see [`Retained::finish_merge`]) between two
    /// segments, for an applier with nothing to apply; with `wait`, waits for it.
    /// Returns how many undo files that removed.
    pub(crate) fn settle_merge(
        &mut self,
        journal: &Journal,
        uring: &mut Uring,
        wait: bool,
    ) -> Result<usize> {
        if !self.merge_to_finish(wait) {
            return Ok(0); // the common case, between batches: no listing of the views
        }
        let mut removed = Vec::new();
        let finished = self.finish_merge(journal, &mut removed, wait, changelog::unix_ms_now());
        if !removed.is_empty() {
            journal.sync(uring)?;
        }
        finished.map(|()| removed.len())
    }

    pub(crate) fn merge_under_way(&self) -> bool {
        self.merging.is_some()
    }

    /// Whether there is a merge to finish now: one that is done, or any, with `wait`.
    fn merge_to_finish(&self, wait: bool) -> bool {
        self.merging
            .as_ref()
            .is_some_and(|m| wait || m.worker.is_finished())
    }
}

/// Parses a retention age: `90` or `90s` (seconds), `30m`, `2h`, `15d`.
pub fn parse_age(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
            "{text:?}: unknown unit {unit:?}; use a number with s, m, h or d (e.g. 30m, 2h, 15d)"
        ))
        }
    };
    let n: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not an age; use a number with s, m, h or d (e.g. 30m, 2h, 15d)")
    })?;
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a size in bytes: a number, or one with K, M, G or T (powers of 1024; `KiB`,
/// `MiB`, ... and `KB`, `MB`, ... mean the same).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a size; use bytes or a number with K, M, G or T (e.g. 50G)")
    })?;
    let unit = unit.trim();
    // `K`, `KB` or `KiB`; bytes alone as `` or `B`.
    let prefix = match (unit.strip_suffix("iB"), unit.strip_suffix('B')) {
        (Some(prefix), _) if !prefix.is_empty() => prefix,
        (Some(_), _) => unit,
        (None, Some(prefix)) => prefix,
        (None, None) => unit,
    };
    let shift = match prefix {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use bytes or a number with K, M, G or T \
                 (e.g. 512M, 50G)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a `keep_size`: a size ([`parse_size`]) of at least one byte.
pub fn parse_keep_size(text: &str) -> std::result::Result<u64, String> {
    match parse_size(text)? {
        0 => Err("must be more than 0 (to keep only the latest point: keep_points 1)".into()),
        n => Ok(n),
    }
}

/// `1.5 GiB`, `512 KiB`, `17 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value < 10.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_age("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_age("15d"), Ok(Duration::from_secs(15 * 86_400)));
        for bad in ["", "m", "3w", "1.5h", "-1s", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn points_at_cuts_are_filed_under_the_cut_time_and_the_times_stay_in_order() {
        // Point 2 was sealed after cut 3's time (its MARK came with the next request),
        // point 3 is at that cut, point 5 at a cut whose label has no time.
        let points = [(1, 100), (2, 230), (3, 240), (4, 300), (5, 400)];
        let cut_points: VecDeque<(u64, u64)> = [(3, 200), (5, 400)].into();
        assert_eq!(
            filing_times(&points, &cut_points),
            [100, 200, 200, 300, 400]
        );
        let label = |first_unix_ms| GroupCutLabel {
            clock: 1,
            first: 1,
            last: 1,
            first_unix_ms,
        };
        assert_eq!(cut_time(&label(Some(200)), 240), 200);
        assert_eq!(cut_time(&label(None), 240), 240);
        assert_eq!(
            cut_time(&label(Some(300)), 240),
            240,
            "never after the seal"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("50G"), Ok(50 << 30));
        assert_eq!(parse_size("50GiB"), Ok(50 << 30));
        assert_eq!(parse_size("2 TB"), Ok(2 << 40));
        assert_eq!(parse_size("8k"), Ok(8 << 10));
        assert_eq!(parse_size("100B"), Ok(100));
        for bad in [
            "",
            "G",
            "1.5G",
            "-1G",
            "3P",
            "5GiBs",
            "5GBB",
            "5iB",
            "99999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_bytes(17), "17 B");
        assert_eq!(format_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(format_bytes(512 << 10), "512 KiB");
    }

    #[test]
    fn utc() {
        assert_eq!(format_utc_ms(0), "1970-01-01 00:00:00.000");
        assert_eq!(format_utc_ms(951_782_400_123), "2000-02-29 00:00:00.123");
        assert_eq!(format_utc_ms(1_767_225_599_999), "2025-12-31 23:59:59.999");
    }

    #[test]
    fn view_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = register_view(dir.path(), "test-a", 4).unwrap();
        assert!(
            register_view(dir.path(), "test-a", 5).is_err(),
            "live name reused"
        );
        assert!(register_view(dir.path(), "../x", 5).is_err());
        let views = list_views(dir.path()).unwrap();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].point, Some(4));
        // A registration of a process that is gone is dropped.
        std::fs::write(&path, format!("point 4\npid {}\n", i32::MAX)).unwrap();
        assert!(list_views(dir.path()).unwrap().is_empty());
        assert!(!path.exists());
    }
}
