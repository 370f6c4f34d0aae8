//! The undo files a point view has loaded, kept open a few at a time.
//!
//! A view at an old point can need tens of thousands of undo files (a day of 1 s
//! segments), more than a process may hold open. So the view remembers each file by
//! its span and its segment's digest, and this cache opens at most
//! [`OPEN_UNDO_FILES`] of them, dropping the one opened longest ago to open another.
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
//! A file is verified in full (data checksum) once, when the view loads it or first
//! reads through the merged file that replaced it; opening it again checks its header
//! and extent table, and that it is the file loaded.

use crate::error::{Result, TargetError};
use crate::journal::{Journal, UndoFile};
use changelog::Digest32;
use std::collections::{HashMap, VecDeque};

/// At most this many undo files are open per view: a server with several views (a
/// recovery plan's test failover), its queues and devices stays well under the usual
/// soft limit of 1,024 open files.
pub const OPEN_UNDO_FILES: usize = 64;

pub(super) struct UndoFiles {
    journal: Journal,
    /// The view's point: a file replacing loaded ones must start after it.
    point: u64,
    /// The files loaded, oldest first: (span, digest of its last segment).
    loaded: Vec<((u64, u64), Digest32)>,
    /// Where each loaded file's bytes are now: its own span, or that of the merged
    /// file that replaced it.
    resolved: Vec<(u64, u64)>,
    open: HashMap<(u64, u64), UndoFile>,
    opened: VecDeque<(u64, u64)>,
}

impl UndoFiles {
    pub(super) fn new(journal: Journal, point: u64) -> UndoFiles {
        UndoFiles {
            journal,
            point,
            loaded: Vec::new(),
            resolved: Vec::new(),
            open: HashMap::new(),
            opened: VecDeque::new(),
        }
    }

    /// How many files were loaded.
    pub(super) fn len(&self) -> usize {
        self.loaded.len()
    }

    /// Adds `file` (verified by the caller) as the next loaded file; returns its number.
    pub(super) fn push(&mut self, file: UndoFile) -> usize {
        let span = file.span();
        self.loaded.push((span, file.header.digest));
        self.resolved.push(span);
        self.keep_open(span, file);
        self.loaded.len() - 1
    }

    /// Reads `buf.len()` bytes of before-image at replica offset `offset` from loaded
    /// file `u` (which covers them).
    pub(super) fn read(&mut self, u: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file(u)?.read_range(offset, buf)
    }

    fn keep_open(&mut self, span: (u64, u64), file: UndoFile) {
        while self.open.len() >= OPEN_UNDO_FILES {
            let Some(oldest) = self.opened.pop_front() else {
                break;
            };
            self.open.remove(&oldest);
        }
        self.open.insert(span, file);
        self.opened.push_back(span);
    }

    /// Loaded file `u`, or the merged file that now holds its bytes, opened.
    fn file(&mut self, u: usize) -> Result<&UndoFile> {
        if !self.open.contains_key(&self.resolved[u]) {
            let file = self.reopen(u)?;
            self.keep_open(file.span(), file);
        }
        Ok(&self.open[&self.resolved[u]])
    }

    fn reopen(&mut self, u: usize) -> Result<UndoFile> {
        let (span, digest) = self.loaded[u];
        let resolved = self.resolved[u];
        match self.journal.open_span(resolved) {
            Ok(file) if resolved != span || file.header.digest == digest => return Ok(file),
            Ok(file) => {
                return Err(TargetError::Journal {
                    path: file.path().into(),
                    what: "it is not the undo file this view loaded".into(),
                })
            }
            Err(_) if !self.journal.path_of_span(resolved).exists() => {}
            Err(e) => return Err(e),
        }
        // Merged away (perhaps again): find the file that holds the span now. Retried,
        // as that file may itself be merged away between listing and opening it.
        for _ in 0..8 {
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
            file.verify_data()?;
            // Every loaded file within it reads from it from now on.
            for (loaded, resolved) in self.loaded.iter().zip(self.resolved.iter_mut()) {
                if merged.0 <= loaded.0 .0 && loaded.0 .1 <= merged.1 {
                    *resolved = merged;
                }
            }
            return Ok(file);
        }
        Err(TargetError::Journal {
            path: self.journal.path_of_span(span),
            what: "it is gone, and no undo file took its place".into(),
        })
    }
}
