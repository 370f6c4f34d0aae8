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
//! Two narrow races are refused with an error on the read rather than served: a view
//! registered at a point inside a merge's run after the applier listed the views to
//! book that merge (the run's files go; reading one through the merged file would
//! show a later point: "also undoes point P"), and a view that loaded a merged file
//! in the moment between its rename and its booking, when the booking then drops it
//! for another view ("no undo file took its place").
//!
//! A file's data is verified in full (its checksum) before the first read from it, not
//! when the view loads it: opening a view at a point far back then costs a header per
//! file, not a read of every before-image kept since (a merged file can be large: the
//! first read from it waits for that). A damaged file fails the reads that need it.

use crate::error::{Result, TargetError};
use crate::journal::{Journal, UndoFile};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// A view may keep this many undo files open whatever the open-file limit (and the
/// views of a process together this many each), more where the limit is over 16 times
/// this.
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

pub(super) struct UndoFiles {
    journal: Journal,
    /// The view's point: a file replacing loaded ones must start after it.
    point: u64,
    /// The files loaded, oldest first, then merged files that replaced some of them.
    files: Vec<UndoFile>,
    /// For each file loaded, the one in `files` that holds its bytes now: itself, or
    /// the merged file that replaced it.
    resolved: Vec<usize>,
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
        self.resolved.push(f);
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
        let f = self.open_resolved(u)?;
        if !self.verified[f] {
            self.files[f].verify_data()?;
            self.verified[f] = true;
        }
        self.read_since[f] = true;
        self.files[f].read_range(offset, buf)
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

    /// The file holding loaded file `u`'s bytes now, open.
    fn open_resolved(&mut self, u: usize) -> Result<usize> {
        for _ in 0..8 {
            let f = self.resolved[u];
            if self.files[f].is_open() {
                return Ok(f);
            }
            if self.files[f].reopen()? {
                self.opened(f);
                return Ok(f);
            }
            // Merged away (perhaps again): find the file that holds its span now. A
            // merged file is in place before the ones it replaces go; it may itself be
            // merged away before it is opened, hence the retries.
            let span = self.files[f].span();
            let containing = self
                .journal
                .list_spans()?
                .into_iter()
                .filter(|&(first, last)| first <= span.0 && span.1 <= last)
                .max_by_key(|&(first, last)| last - first);
            let Some(merged) = containing else {
                break;
            };
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
            let file = match self.journal.open_span(merged) {
                Ok(file) => file,
                Err(_) if !self.journal.path_of_span(merged).exists() => continue,
                Err(e) => return Err(e),
            };
            let m = self.add(file);
            // Every loaded file within it reads from it from now on.
            for resolved in &mut self.resolved {
                let (first, last) = self.files[*resolved].span();
                if merged.0 <= first && last <= merged.1 {
                    *resolved = m;
                }
            }
        }
        let span = self.files[self.resolved[u]].span();
        Err(TargetError::Journal {
            path: self.journal.path_of_span(span),
            what: "it is gone, and no undo file took its place".into(),
        })
    }
}
