//! A point view: the replica as it was at recovery point `P`, without copying it, with
//! a throw-away write overlay (test failover).
//!
//! Reads resolve each byte, in this order, from:
//!
//! 1. the scratch overlay: bytes written (or discarded / zeroed) through the view;
//! 2. the undo overlay: the before-image from the *oldest* undo journal with index
//!    `> P` that covers the byte;
//! 3. the replica.
//!
//! Why (2) gives the state at `P`: `undo_k` holds the bytes segment `k` overwrote, i.e.
//! the state at `k - 1` for the ranges `k` changes (a merged file of segments `j ..= k`
//! is to this argument what the journals `j ..= k` together are: for each byte, the
//! before-image of the oldest of them that covers it). For a byte first changed after `P`
//! by segment `k`, segments `P+1 .. k-1` did not touch it, so the state at `k - 1` is
//! the state at `P` there. A byte no segment after `P` changed is still as it was at
//! `P` on the replica.
//!
//! Staying at `P` while the applier keeps going in another process: the view knows
//! journals `P+1 ..= N`. The applier puts `undo_{N+1}` in place (renamed, directory
//! synced) *before* its first replica write of segment `N+1`, and applies segments in
//! order. After every read that touched the replica, the view checks whether
//! `undo_{N+1}` exists. If not, no write of `N+1` (or later) had started when the read
//! finished, so what it read is unchanged since `N`. If it does, the view loads it (and
//! any further ones), whose before-images now cover exactly the ranges those segments
//! change, and reads again. The view registers itself (see [`crate::points`]) before
//! it looks at journals, so pruning keeps every journal after its point and thinning
//! changes none of them (but a merge under way when it registered may finish). It
//! keeps a bounded number of journals open ([`undo_files`]); one it loaded that such a
//! merge replaced is read through the merged file, which holds the same bytes for it.
//!
//! Every journal's header and extent table are checked, and that it chains onto the
//! one before, when the view loads it; its data is checked against its checksum before
//! the first read from it ([`undo_files`]), so a view at a point far back opens in the
//! time it takes to read a header per journal.
//!
//! A view is driven from one thread (`&mut self`); a ublk server calls [`PointView::read_at`],
//! [`PointView::write_at`], [`PointView::discard`] / [`PointView::write_zeroes`] and
//! [`PointView::flush`]. Dropping it deletes the scratch file and deregisters it.

mod undo_files;

use crate::error::{Result, TargetError};
use crate::journal::{read_or_zero, uncovered, Journal, UndoHeader};
use crate::points::{catalog, register_view};
use crate::state::{ApplyState, PointFacts, ReplicaPaths};
use changelog::Digest32;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use undo_files::UndoFiles;
pub use undo_files::OPEN_UNDO_FILES;

/// How to open a view.
#[derive(Clone, Debug, Default)]
pub struct ViewOptions {
    /// Registry name [default: `view-<pid>-<n>`].
    pub name: Option<String>,
    /// Scratch file for writes [default: `JOURNAL/scratch/<name>`]. Created (sparse),
    /// deleted when the view is dropped.
    pub scratch: Option<PathBuf>,
    /// Device size [default: the replica's size, or the end of the furthest journal
    /// extent when that is larger].
    pub size: Option<u64>,
    /// Undo files kept open at most; the others are opened again as reads need them
    /// [default: a sixteenth of the process's open-file limit, at least
    /// [`OPEN_UNDO_FILES`]].
    pub undo_files_open: Option<usize>,
}

/// A piece of the undo overlay: `[start, end)` comes from loaded undo file `undo`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    end: u64,
    undo: usize,
}

/// Removes the registry entry when dropped.
struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            log::warn!("deregistering view {}: {e}", self.0.display());
        }
    }
}

/// Deletes the scratch file when dropped.
struct Scratch {
    file: File,
    path: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("removing view scratch {}: {e}", self.path.display());
        }
    }
}

static VIEW_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The replica at one recovery point, with a scratch write overlay.
pub struct PointView {
    journal: Journal,
    point: PointFacts,
    name: String,
    replica: File,
    replica_path: PathBuf,
    size: u64,
    /// The journals loaded, oldest first: they undo segments `point + 1 .. next`.
    undo: UndoFiles,
    /// The header of the newest, which the next must follow.
    newest: Option<UndoHeader>,
    next: u64,
    /// The digest of segment `point`, when known, to check the first journal against.
    anchor: Option<Digest32>,
    /// The undo overlay: disjoint pieces by start offset.
    pieces: BTreeMap<u64, Piece>,
    /// Ranges written through the view: disjoint, merged, start → end.
    written: BTreeMap<u64, u64>,
    // Dropped after the fields above, in this order: scratch file, then registration.
    scratch: Scratch,
    _registration: Registration,
}

impl std::fmt::Debug for PointView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointView")
            .field("name", &self.name)
            .field("point", &self.point)
            .field("journals", &self.undo.len())
            .finish()
    }
}

impl PointView {
    /// Opens the replica at `paths` as it was at `point`.
    pub fn open(paths: &ReplicaPaths, point: u64) -> Result<PointView> {
        PointView::open_with(paths, point, &ViewOptions::default())
    }

    pub fn open_with(paths: &ReplicaPaths, point: u64, options: &ViewOptions) -> Result<PointView> {
        let journal = Journal::new(&paths.journal);
        let unavailable = |why: String| {
            let available = catalog(paths)
                .map(|c| c.describe_available())
                .unwrap_or_else(|e| format!("the catalog is unreadable ({e})"));
            TargetError::PointUnavailable {
                point,
                why,
                available,
            }
        };
        let name = options.name.clone().unwrap_or_else(|| {
            format!(
                "view-{}-{}",
                std::process::id(),
                VIEW_COUNTER.fetch_add(1, Ordering::Relaxed)
            )
        });
        if !paths.journal.is_dir() {
            return Err(unavailable(format!(
                "there is no journal directory {} (nothing applied to this replica, or give \
                 the journal directory)",
                paths.journal.display()
            )));
        }
        // Register before looking at any journal, so a prune from now on keeps them.
        journal.create()?;
        let registration = Registration(register_view(&paths.journal, &name, point)?);

        let Some(state) = ApplyState::load(&paths.state, None)? else {
            return Err(unavailable(
                "nothing has been applied to this replica".into(),
            ));
        };
        if let Some(q) = state.rolled_back_to {
            return Err(unavailable(format!(
                "the replica was rolled back to point {q} for failover and no longer keeps points"
            )));
        }
        let Some(latest) = state.latest() else {
            return Err(unavailable(
                "nothing has been applied to this replica".into(),
            ));
        };
        if point > latest {
            return Err(unavailable(format!(
                "it is newer than the latest applied segment {latest}"
            )));
        }
        // The files that undo segments `point + 1 ..= latest`.
        let run = match journal.run_from(point, latest)? {
            Ok(run) => run,
            Err(k) if k == point + 1 => Vec::new(),
            Err(k) => return Err(unavailable(format!("undo journal {k} is gone (pruned)"))),
        };
        let (facts, anchor) = if point == latest {
            let facts = state.last.ok_or_else(|| {
                unavailable(
                    "the latest segment's facts are unknown (state from an older version); \
                     apply one more segment"
                        .into(),
                )
            })?;
            (facts, Some(state.cursor.prev_digest))
        } else {
            let first = match run.first() {
                Some(&span) => journal.open_span(span)?,
                None => {
                    return Err(unavailable(format!(
                        "undo journal {} is gone (pruned)",
                        point + 1
                    )))
                }
            };
            let facts = first
                .header
                .prev
                .ok_or_else(|| unavailable("the journal after it does not describe it".into()))?;
            (facts, None)
        };
        if !facts.is_crash_point() {
            return Err(unavailable(
                "its segment is not a crash-consistent point (written during initial sync, \
                 resync or after a ring overflow)"
                    .into(),
            ));
        }
        let replica = File::open(&paths.replica).map_err(|e| {
            TargetError::io(format!("opening replica {}", paths.replica.display()), e)
        })?;
        let replica_len = (&replica)
            .seek(SeekFrom::End(0))
            .map_err(|e| TargetError::io(format!("sizing {}", paths.replica.display()), e))?;
        let scratch_path = options
            .scratch
            .clone()
            .unwrap_or_else(|| paths.journal.join("scratch").join(&name));
        let scratch_file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&scratch_path)
            .map_err(|e| TargetError::io(format!("creating {}", scratch_path.display()), e))?;
        let scratch = Scratch {
            file: scratch_file,
            path: scratch_path,
        };
        let mut view = PointView {
            undo: UndoFiles::new(journal.clone(), point, options.undo_files_open),
            journal,
            point: facts,
            name,
            replica,
            replica_path: paths.replica.clone(),
            size: 0,
            newest: None,
            next: point + 1,
            anchor,
            pieces: BTreeMap::new(),
            written: BTreeMap::new(),
            scratch,
            _registration: registration,
        };
        for span in run {
            if !view.journal.path_of_span(span).exists() {
                return Err(unavailable(format!(
                    "undo journal {} is missing (pruned while opening?)",
                    span.0
                )));
            }
            view.load(span)?;
        }
        if let Some(last) = &view.newest {
            if last.digest != state.cursor.prev_digest {
                return Err(TargetError::Journal {
                    path: view.journal.path_of_span(last.span()),
                    what: "it is not the journal of the replica's latest segment".into(),
                });
            }
        }
        view.load_newer()?;
        let furthest = view.pieces.values().map(|p| p.end).max().unwrap_or(0);
        view.size = options.size.unwrap_or(replica_len.max(furthest));
        view.scratch
            .file
            .set_len(view.size)
            .map_err(|e| TargetError::io(format!("sizing {}", view.scratch.path.display()), e))?;
        log::info!(
            "view {} of {} at point {point} (segments {}..={}, {} journal file(s))",
            view.name,
            view.replica_path.display(),
            point + 1,
            view.next - 1,
            view.undo.len()
        );
        Ok(view)
    }

    /// The recovery point shown.
    pub fn point(&self) -> &PointFacts {
        &self.point
    }

    /// The registry name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where writes through the view go (deleted when the view is dropped).
    pub fn scratch_path(&self) -> &std::path::Path {
        &self.scratch.path
    }

    /// How many undo files it keeps open at most (it opens the others again as reads
    /// need them).
    pub fn undo_files_kept_open(&self) -> usize {
        self.undo.open_allowed()
    }

    /// How many segments applied after its point the view knows of (undoes).
    pub fn journals_loaded(&self) -> usize {
        (self.next - self.point.index - 1) as usize
    }

    /// Reads `buf.len()` bytes at `offset` of the state at the view's point (with the
    /// view's own writes on top).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let at = (pos - offset) as usize;
            if let Some(written_end) = self.written_end_at(pos) {
                let n = (written_end.min(end) - pos) as usize;
                read_or_zero(&self.scratch.file, &mut buf[at..at + n], pos).map_err(|e| {
                    TargetError::io(format!("reading {}", self.scratch.path.display()), e)
                })?;
                pos += n as u64;
            } else {
                let next = self.written.range(pos..end).next().map_or(end, |(&s, _)| s);
                let n = (next - pos) as usize;
                self.read_base(&mut buf[at..at + n], pos)?;
                pos = next;
            }
        }
        Ok(())
    }

    /// Writes through the view: into the scratch overlay only.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.scratch
            .file
            .write_all_at(data, offset)
            .map_err(|e| TargetError::io(format!("writing {}", self.scratch.path.display()), e))?;
        self.mark_written(offset, offset + data.len() as u64);
        Ok(())
    }

    /// Zeroes a range of the view (in the overlay).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let fd = self.scratch.file.as_raw_fd();
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor we own; no memory is involved.
        let punched = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) } == 0;
        if !punched {
            // A file system without hole punching: write the zeroes.
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0u64;
            while done < len {
                let n = zeroes.len().min((len - done) as usize);
                self.scratch
                    .file
                    .write_all_at(&zeroes[..n], offset + done)
                    .map_err(|e| {
                        TargetError::io(format!("zeroing {}", self.scratch.path.display()), e)
                    })?;
                done += n as u64;
            }
        }
        self.mark_written(offset, offset + len);
        Ok(())
    }

    /// Discards a range: reads back as zeroes, like the replica does.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    /// A flush has nothing to make durable: the overlay is thrown away on cleanup.
    pub fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    /// Cleanup: deletes the scratch file and deregisters (as dropping does, but
    /// reporting errors).
    pub fn close(self) -> Result<()> {
        let scratch = self.scratch.path.clone();
        let registration = self._registration.0.clone();
        drop(self);
        for path in [scratch, registration] {
            if path.exists() {
                return Err(TargetError::View {
                    what: format!("{} could not be removed", path.display()),
                });
            }
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(TargetError::View {
                what: format!(
                    "{len} bytes at {offset} reach past the end of the {}-byte view",
                    self.size
                ),
            });
        }
        Ok(())
    }

    /// The end of the written range containing `pos`, if any.
    fn written_end_at(&self, pos: u64) -> Option<u64> {
        self.written
            .range(..=pos)
            .next_back()
            .map(|(_, &e)| e)
            .filter(|&e| e > pos)
    }

    fn mark_written(&mut self, mut start: u64, mut end: u64) {
        // Merge with every range that overlaps or touches [start, end).
        if let Some((&s, &e)) = self.written.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let absorbed: Vec<(u64, u64)> = self
            .written
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in absorbed {
            self.written.remove(&s);
            end = end.max(e);
        }
        self.written.insert(start, end);
    }

    /// Reads the state at the point (undo overlay over the replica), re-reading when a
    /// newer journal appeared meanwhile.
    fn read_base(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        loop {
            let used_replica = self.read_overlay(buf, offset)?;
            if !used_replica || !self.load_newer()? {
                return Ok(());
            }
        }
    }

    /// One pass of [`Self::read_base`]; returns whether any byte came from the replica.
    fn read_overlay(&mut self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let mut used_replica = false;
        while pos < end {
            let at = (pos - offset) as usize;
            let covering = self
                .pieces
                .range(..=pos)
                .next_back()
                .filter(|(_, p)| p.end > pos);
            if let Some((_, &piece)) = covering {
                let n = (piece.end.min(end) - pos) as usize;
                self.undo.read(piece.undo, pos, &mut buf[at..at + n])?;
                pos += n as u64;
            } else {
                let next = self.pieces.range(pos..end).next().map_or(end, |(&s, _)| s);
                let n = (next - pos) as usize;
                read_or_zero(&self.replica, &mut buf[at..at + n], pos).map_err(|e| {
                    TargetError::io(
                        format!("reading replica {}", self.replica_path.display()),
                        e,
                    )
                })?;
                used_replica = true;
                pos = next;
            }
        }
        Ok(used_replica)
    }

    /// Loads the journals of segments applied (or being applied) since the view last
    /// looked. Returns whether there were any.
    fn load_newer(&mut self) -> Result<bool> {
        let mut any = false;
        loop {
            let next = self.next;
            if !self.journal.exists(next) {
                return Ok(any);
            }
            self.load((next, next))?;
            any = true;
        }
    }

    /// Opens the journal of segments `span` (the next ones), chains it onto the ones
    /// before, and adds its before-images where no older journal covers (its data is
    /// verified before the first read from it).
    fn load(&mut self, span: (u64, u64)) -> Result<()> {
        debug_assert_eq!(span.0, self.next);
        let undo = self.journal.open_span(span)?;
        let chained = match &self.newest {
            Some(before) => undo.header.follows(before),
            None => {
                undo.header.prev == Some(self.point)
                    && self
                        .anchor
                        .is_none_or(|d| d == undo.header.cursor_before.prev_digest)
            }
        };
        if !chained {
            return Err(TargetError::Journal {
                path: undo.path().into(),
                what: format!(
                    "it does not follow segment {} of this replica's history",
                    span.0 - 1
                ),
            });
        }
        let u = self.undo.len();
        for e in &undo.extents {
            for (start, end) in uncovered(&self.pieces, |p| p.end, e) {
                self.pieces.insert(start, Piece { end, undo: u });
            }
        }
        self.newest = Some(undo.header.clone());
        self.undo.push(undo);
        self.next = span.1 + 1;
        Ok(())
    }
}

/// Reads a whole view into `out` (a file or device) in 1 MiB chunks; `progress` gets
/// the bytes done.
pub fn export(view: &mut PointView, out: &Path, mut progress: impl FnMut(u64)) -> Result<()> {
    let file =
        File::create(out).map_err(|e| TargetError::io(format!("creating {}", out.display()), e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < view.size() {
        let n = buf.len().min((view.size() - pos) as usize);
        view.read_at(&mut buf[..n], pos)?;
        file.write_all_at(&buf[..n], pos)
            .map_err(|e| TargetError::io(format!("writing {}", out.display()), e))?;
        pos += n as u64;
        progress(pos);
    }
    file.sync_all()
        .map_err(|e| TargetError::io(format!("syncing {}", out.display()), e))
}
