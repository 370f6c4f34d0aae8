//! The undo files a point view has loaded, kept open a few at a time.
//!
//! A view at an old point can need tens of thousands of undo files (a day of 1 s
//! segments), more than a process may hold open. So the view keeps what it read of
//! each file (header, extent table) and at most a sixteenth of the process's open-file
//! limit of them open (at least [`OPEN_UNDO_FILES`]), and all views of the process
//! together at most half of it, closing one to open another: the one opened longest
//! ago that was not read from since it was last passed over (CLOCK, a cheap LRU).
//! A file opened again must be the same inode, or else hold the same header and
//! extents (undo files never change once in place).
//!
//! Contract: [`UndoFiles::read`] returns the before-image the view took from the file
//! it loaded as number `u`, even after thinning merged that file away. Thinning leaves
//! everything after the oldest point a view shows alone, but a merge already under way
//! when the view registered may finish, deleting files the view loaded. Why the merged
//! file serves: it undoes whole files, segments `j ..= k`, and a merge that would thin
//! out a view's point is dropped, so for a view at `P` it has `j > P`; the view took a
//! byte from the file of segments `a ..= b` (within `j ..= k`) because no older file
//! after `P` covers it, so none of `j ..= a - 1` does, and the merged file (the
//! before-image of the oldest of its files that covers a byte) holds the same bytes. A
//! merged file is in place before the files it replaces are deleted, so a file
//! containing the span is always there; pruning keeps the files after a registered
//! view's point.
//!
//! A view that loaded a merged file between its rename and its booking, which the
//! applier then drops (a view registered meanwhile needs the points it thins out),
//! reads through the run of files it would have replaced, each byte from the oldest
//! that covers it, as the merged file held. One narrow race is refused with an error
//! on the read rather than served: a view registered at a point inside a merge's run
//! after the applier listed the views to book that merge (the run's files go; reading
//! one through the merged file would show a later point: "also undoes point P").
//!
//! A file's data is verified in full (its checksum) before the first read from it, not
//! when the view loads it: opening a view at a point far back then costs a header per
//! file, not a read of every before-image kept since (a merged file can be large: the
//! first read from it waits for that). A damaged file fails the reads that need it.

use crate::error::{Result, TargetError};
use crate::journal::{Journal, UndoFile};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// A view may keep this many undo files open whatever the open-file limit, more where
/// the limit is over 16 times this; the views of a process together keep at most half
/// the limit (but this many).
pub const OPEN_UNDO_FILES: usize = 64;

/// Undo files the views of this process hold open.
static OPEN_IN_PROCESS: AtomicUsize = AtomicUsize::new(0);

/// The soft limit on open files (1,024 if unknown).
fn open_file_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the live, initialized struct it is given.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX),
        _ => 1024,
    }
}

/// Where a loaded file's bytes are read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A file of `files`.
    File(usize),
    /// A run of `runs`.
    Run(usize),
}

pub(super) struct UndoFiles {
    journal: Journal,
    /// The view's point: a file replacing loaded ones must start after it.
    point: u64,
    /// The files loaded, oldest first, then merged files that replaced some of them.
    files: Vec<UndoFile>,
    /// For each file loaded, where its bytes are now: itself, the merged file that
    /// replaced it, or the run of files a dropped merged file stood for.
    resolved: Vec<Source>,
    /// Runs of files standing in for a merged file that is gone: its span, the files.
    runs: Vec<((u64, u64), Vec<usize>)>,
    /// The open ones among `files`, the one opened (or passed over) longest ago first.
    open: VecDeque<usize>,
    /// Whether each of `files` was read from since it was opened or passed over.
    read_since: Vec<bool>,
    /// Whether each of `files` had its data checked against its checksum.
    verified: Vec<bool>,
    open_allowed: usize,
    /// All views' open undo files may reach this before this one closes one of its own.
    process_allowed: usize,
}

impl Drop for UndoFiles {
    fn drop(&mut self) {
        OPEN_IN_PROCESS.fetch_sub(self.open.len(), Relaxed);
    }
}

impl UndoFiles {
    /// Files for a view at `point`, at most `open_allowed` of them open (default: a
    /// sixteenth of the open-file limit, at least [`OPEN_UNDO_FILES`]).
    pub(super) fn new(journal: Journal, point: u64, open_allowed: Option<usize>) -> UndoFiles {
        UndoFiles {
            journal,
            point,
            files: Vec::new(),
            resolved: Vec::new(),
            runs: Vec::new(),
            open: VecDeque::new(),
            read_since: Vec::new(),
            verified: Vec::new(),
            open_allowed: open_allowed
                .unwrap_or_else(|| (open_file_limit() / 16).max(OPEN_UNDO_FILES))
                .max(1),
            process_allowed: (open_file_limit() / 2).max(OPEN_UNDO_FILES),
        }
    }

    /// How many of its files it keeps open at most.
    pub(super) fn open_allowed(&self) -> usize {
        self.open_allowed
    }

    /// How many files were loaded.
    pub(super) fn len(&self) -> usize {
        self.resolved.len()
    }

    /// Adds `file` (open; header and extent table checked) as the next loaded file;
    /// returns its number.
    pub(super) fn push(&mut self, file: UndoFile) -> usize {
        let f = self.add(file);
        self.resolved.push(Source::File(f));
        self.resolved.len() - 1
    }

    /// Adds an open file to `files`; returns its place there.
    fn add(&mut self, file: UndoFile) -> usize {
        self.files.push(file);
        self.read_since.push(false);
        self.verified.push(false);
        self.opened(self.files.len() - 1);
        self.files.len() - 1
    }

    /// Reads `buf.len()` bytes of before-image at replica offset `offset` from loaded
    /// file `u` (which covers them).
    pub(super) fn read(&mut self, u: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        // A file resolves at most once per merge that replaced it: a few rounds.
        for _ in 0..8 {
            match self.resolved[u] {
                Source::File(f) => {
                    if self.ready(f)? {
                        self.read_since[f] = true;
                        return self.files[f].read_range(offset, buf);
                    }
                    self.resolve_gone(self.files[f].span())?;
                }
                Source::Run(r) => match self.read_run(r, offset, buf)? {
                    true => return Ok(()),
                    false => self.resolve_gone(self.runs[r].0)?,
                },
            }
        }
        Err(TargetError::Journal {
            path: self.journal.dir().into(),
            what: format!("the undo files kept changing under a read at {offset}"),
        })
    }

    /// Opens file `f` if closed and verifies its data if not done yet; `Ok(false)` if
    /// it is gone.
    fn ready(&mut self, f: usize) -> Result<bool> {
        if !self.files[f].is_open() {
            if !self.files[f].reopen()? {
                return Ok(false);
            }
            self.opened(f);
        }
        if !self.verified[f] {
            self.files[f].verify_data()?;
            self.verified[f] = true;
        }
        Ok(true)
    }

    /// Reads through run `r`: each byte from the oldest of its files that covers it,
    /// as the merged file it stands for would. `Ok(false)` if one of them is gone.
    fn read_run(&mut self, r: usize, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let run = self.runs[r].1.clone();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            // The oldest file covering `pos`, up to where it stops covering or an
            // older one starts.
            let mut limit = end;
            let mut chosen = None;
            for &f in &run {
                if !self.ready(f)? {
                    return Ok(false);
                }
                let extents = &self.files[f].extents;
                match extents.get(extents.partition_point(|e| e.end() <= pos)) {
                    Some(e) if e.offset <= pos => {
                        chosen = Some(f);
                        limit = limit.min(e.end());
                        break;
                    }
                    Some(e) => limit = limit.min(e.offset),
                    None => {}
                }
            }
            let Some(f) = chosen else {
                return Err(TargetError::Journal {
                    path: self.journal.path_of_span(self.runs[r].0),
                    what: format!("none of the files it replaced holds replica byte {pos}"),
                });
            };
            let at = (pos - offset) as usize;
            let n = (limit - pos) as usize;
            self.read_since[f] = true;
            self.files[f].read_range(pos, &mut buf[at..at + n])?;
            pos = limit;
        }
        Ok(true)
    }

    /// Notes file `f` as open, closing the one opened longest ago when that makes too
    /// many for this view or for the process.
    fn opened(&mut self, f: usize) {
        while self.open.len() >= self.open_allowed
            || OPEN_IN_PROCESS.load(Relaxed) >= self.process_allowed
        {
            let Some(oldest) = self.open.pop_front() else {
                break;
            };
            if std::mem::take(&mut self.read_since[oldest]) {
                self.open.push_back(oldest); // a second chance
                continue;
            }
            self.files[oldest].close();
            OPEN_IN_PROCESS.fetch_sub(1, Relaxed);
        }
        self.open.push_back(f);
        OPEN_IN_PROCESS.fetch_add(1, Relaxed);
    }

    /// The span of what `source` reads.
    fn span_of(&self, source: Source) -> (u64, u64) {
        match source {
            Source::File(f) => self.files[f].span(),
            Source::Run(r) => self.runs[r].0,
        }
    }

    /// The file of segments `span` is gone: finds what holds its bytes now and points
    /// every loaded file it held there. That is the merged file containing it (a merge
    /// puts its file in place before the ones it replaces go), or, for a merged file
    /// the applier dropped after the view loaded it (a view registered meanwhile needed
    /// the points it thins out), the run of files it would have replaced.
    fn resolve_gone(&mut self, span: (u64, u64)) -> Result<()> {
        let spans = self.journal.list_spans()?;
        let containing = spans
            .iter()
            .copied()
            .filter(|&(first, last)| first <= span.0 && span.1 <= last)
            .max_by_key(|&(first, last)| last - first);
        if let Some(merged) = containing {
            if merged.0 <= self.point {
                return Err(TargetError::Journal {
                    path: self.journal.path_of_span(merged),
                    what: format!(
                        "it replaced undo file {}..={} but also undoes point {}, which this \
                         view shows",
                        span.0, span.1, self.point
                    ),
                });
            }
            // It may be merged away in turn before it opens: the caller goes round.
            let file = match self.journal.open_span(merged) {
                Ok(file) => file,
                Err(_) if !self.journal.path_of_span(merged).exists() => return Ok(()),
                Err(e) => return Err(e),
            };
            let m = self.add(file);
            self.point_within(merged, Source::File(m));
            return Ok(());
        }
        let mut run = Vec::new();
        let mut next = span.0;
        for &(first, last) in spans.iter().filter(|s| span.0 <= s.0 && s.1 <= span.1) {
            if first != next {
                break;
            }
            run.push((first, last));
            next = last + 1;
        }
        if next != span.1 + 1 {
            return Err(TargetError::Journal {
                path: self.journal.path_of_span(span),
                what: "it is gone, and no undo file took its place".into(),
            });
        }
        let mut files = Vec::with_capacity(run.len());
        for &(first, last) in &run {
            let file = self.journal.open_span((first, last))?;
            files.push(self.add(file));
        }
        self.runs.push((span, files));
        self.point_within(span, Source::Run(self.runs.len() - 1));
        Ok(())
    }

    /// Points every loaded file that `span` contains at `source`.
    fn point_within(&mut self, span: (u64, u64), source: Source) {
        for u in 0..self.resolved.len() {
            let (first, last) = self.span_of(self.resolved[u]);
            if span.0 <= first && last <= span.1 {
                self.resolved[u] = source;
            }
        }
    }
}
