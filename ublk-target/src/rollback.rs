//! Rollback for failover: make the replica equal its state at point `P` for real, so
//! it can become the primary.
//!
//! Steps, each durable before the next:
//!
//! 1. Verify every journal `P+1 ..= top` (all of it, data too) and that they chain onto
//!    the applied state; `top` is the latest applied segment, or past it when an
//!    interrupted apply (or rollback step) left a journal starting right after it. A
//!    merged file stands for the run of segments it undoes. Nothing is written if any
//!    check fails.
//! 2. Record in the applied state that the replica is rolled back to `P`: from here on
//!    no segment is applied to it ([`crate::TargetError::RolledBack`]).
//! 3. For `k = top` down to `P + 1`: write `undo_k`'s before-images to the replica,
//!    fdatasync, save the state "at `k - 1`" (the position recorded in `undo_k`), then
//!    delete `undo_k`.
//! 4. Delete the journals of older points: once the replica is written as a primary
//!    they no longer describe it.
//!
//! Re-running after a crash at any point continues where it stopped and ends in the
//! same replica: before-images are absolute bytes, so writing one twice is harmless,
//! and a journal whose step was recorded but not yet deleted is the "pending" journal
//! of the state, which is undone again (a no-op) and deleted.

use crate::error::{Result, TargetError};
use crate::journal::{Journal, UndoFile, UndoHeader};
use crate::points::{catalog, list_views};
use crate::state::{ApplyState, ReplicaPaths};
use changelog::uring::Uring;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

/// What a rollback did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RollbackReport {
    pub point: u64,
    /// Segments undone in this run, newest first.
    pub undone: Vec<u64>,
    /// Journals of older points deleted at the end.
    pub removed_older: usize,
    /// `false` when stopped early by `max_steps`.
    pub done: bool,
}

/// Rolls the replica at `paths` back to `point` (taking the journal lock: stop the
/// applier first).
pub fn rollback_to(paths: &ReplicaPaths, point: u64) -> Result<RollbackReport> {
    rollback_steps(paths, point, None)
}

/// [`rollback_to`] that stops after `max_steps` undo files (`None`: no limit; a merged
/// file is one step for all its segments), leaving the rollback to be finished by
/// another call — as a crash would.
pub fn rollback_steps(
    paths: &ReplicaPaths,
    point: u64,
    max_steps: Option<usize>,
) -> Result<RollbackReport> {
    let journal = Journal::new(&paths.journal);
    let _lock = journal.lock()?;
    let mut uring = Uring::new(4).map_err(|e| TargetError::io("io_uring setup", e))?;
    let replica = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&paths.replica)
        .map_err(|e| TargetError::io(format!("opening replica {}", paths.replica.display()), e))?;
    let state = applied_state(paths, point)?;
    rollback_locked(
        paths, &journal, &mut uring, &replica, state, point, max_steps,
    )
    .map(|(_, report)| report)
}

/// The rollback for a caller that holds the journal lock. Returns the final state.
pub(crate) fn rollback_locked(
    paths: &ReplicaPaths,
    journal: &Journal,
    uring: &mut Uring,
    replica: &File,
    mut state: ApplyState,
    point: u64,
    max_steps: Option<usize>,
) -> Result<(ApplyState, RollbackReport)> {
    let undo = verify(paths, journal, &state, point)?;

    // 2. From now on nothing is applied to this replica.
    if state.rolled_back_to.is_none() {
        state.rolled_back_to = Some(point);
        state.save(uring, &paths.state)?;
        log::warn!(
            "replica {}: rolling back to point {point} for failover",
            paths.replica.display()
        );
    }

    // 3. Undo the newest segment first.
    let mut report = RollbackReport {
        point,
        ..RollbackReport::default()
    };
    for (steps, header) in undo.iter().rev().enumerate() {
        if max_steps.is_some_and(|max| steps >= max) {
            return Ok((state, report));
        }
        // Opened again rather than kept open since step 1: the run can be more files
        // than a process may hold open. The journal lock keeps them as verified.
        let file = journal.open_span(header.span())?;
        if file.header != *header {
            return Err(TargetError::Journal {
                path: file.path().into(),
                what: "it changed during the rollback".into(),
            });
        }
        restore(&file, replica, paths)?;
        replica.sync_data().map_err(|e| {
            TargetError::io(format!("syncing replica {}", paths.replica.display()), e)
        })?;
        state = ApplyState {
            rolled_back_to: Some(point),
            ..file.header.state_before()
        };
        state.save(uring, &paths.state)?;
        journal.remove(file.span())?;
        journal.sync(uring)?;
        let (first, last) = file.span();
        report.undone.extend((first..=last).rev());
        log::info!("undid segments {first}..={last}");
    }

    // 4. Older points described the replica as a replica; it is a primary now.
    for span in journal.list_spans()? {
        journal.remove(span)?;
        report.removed_older += 1;
    }
    journal.sync(uring)?;
    crate::group_cuts::retain(&paths.journal, |index| index <= point)?;
    report.done = true;
    Ok((state, report))
}

/// Step 1: every refusal a rollback of the replica (in `state`, journal locked) to
/// `point` can meet before it writes anything. Returns the headers of the journals to
/// undo, oldest first (one file open at a time: see step 3).
fn verify(
    paths: &ReplicaPaths,
    journal: &Journal,
    state: &ApplyState,
    point: u64,
) -> Result<Vec<UndoHeader>> {
    let refuse = |what: String| TargetError::Rollback { point, what };
    if let Some(q) = state.rolled_back_to.filter(|&q| q != point) {
        return Err(refuse(format!(
            "the replica was already rolled back to point {q}; only that rollback can be \
             finished (`ublk-target rollback --point {q}`)"
        )));
    }
    let Some(latest) = state.latest() else {
        return Err(refuse("nothing has been applied to this replica".into()));
    };
    let unavailable = |why: String| TargetError::PointUnavailable {
        point,
        why,
        available: catalog(paths)
            .map(|c| c.describe_available())
            .unwrap_or_else(|e| format!("the catalog is unreadable ({e})")),
    };
    if point > latest {
        return Err(unavailable(format!(
            "it is newer than the latest applied segment {latest}"
        )));
    }
    let views = list_views(journal.dir())?;
    if !views.is_empty() {
        let names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
        return Err(refuse(format!(
            "point views are open ({}); close them (end the test failover) first",
            names.join(", ")
        )));
    }

    // 1. Verify everything needed before writing anything.
    let mut run = match journal.run_from(point, latest)? {
        Ok(run) => run,
        Err(k) => return Err(unavailable(format!("undo journal {k} is gone (pruned)"))),
    };
    // A journal starting right after the latest segment: an interrupted step.
    let pending = journal
        .list_spans()?
        .into_iter()
        .filter(|&(first, _)| first == latest + 1)
        .max_by_key(|&(_, last)| last);
    run.extend(pending);
    let mut undo: Vec<UndoHeader> = Vec::new();
    for span in run {
        let file = journal.open_span(span)?;
        file.verify_data()?;
        let chained = undo.last().is_none_or(|before| file.header.follows(before));
        let fits = if span.0 == latest + 1 {
            file.header.cursor_before == state.cursor && file.header.prev == state.last
        } else if span.1 == latest {
            file.header.digest == state.cursor.prev_digest
        } else {
            true
        };
        if !chained || !fits {
            return Err(TargetError::Journal {
                path: file.path().into(),
                what: "it does not chain onto the replica's history".into(),
            });
        }
        undo.push(file.header);
    }
    let facts = if point == latest {
        state.last
    } else {
        undo[0].prev
    };
    match facts {
        Some(f) if f.is_crash_point() => {}
        Some(_) => {
            return Err(unavailable(
                "its segment is not a crash-consistent point".into(),
            ))
        }
        None => return Err(unavailable("nothing describes its segment".into())),
    }
    Ok(undo)
}

/// Checks, without writing anything, that [`rollback_to`] of the replica to `point`
/// would start now: the journal is free (no `apply` running), no point view is open,
/// and every undo journal it needs is intact. For commands that roll back several
/// replicas, so that one refusal stops them before any replica changed.
pub fn preflight(paths: &ReplicaPaths, point: u64) -> Result<()> {
    let journal = Journal::new(&paths.journal);
    let _lock = journal.lock()?;
    let state = applied_state(paths, point)?;
    verify(paths, &journal, &state, point).map(drop)
}

/// The replica's applied state, which a rollback to `point` needs.
fn applied_state(paths: &ReplicaPaths, point: u64) -> Result<ApplyState> {
    ApplyState::load(&paths.state, None)?.ok_or_else(|| TargetError::Rollback {
        point,
        what: format!(
            "nothing has been applied ({} is missing)",
            paths.state.display()
        ),
    })
}

/// Writes a journal's before-images to the replica.
fn restore(file: &UndoFile, replica: &File, paths: &ReplicaPaths) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for (i, e) in file.extents.iter().enumerate() {
        let mut done = 0u64;
        while done < e.len {
            let n = buf.len().min((e.len - done) as usize);
            file.read_extent(i, done, &mut buf[..n])?;
            replica
                .write_all_at(&buf[..n], e.offset + done)
                .map_err(|err| {
                    TargetError::io(format!("writing replica {}", paths.replica.display()), err)
                })?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Commits a failover: the rolled-back replica is the primary from now on. Writes a
/// marker beside it (`REPLICA.committed`) saying so; the state already refuses every
/// further segment of the old direction. Returns the point it was failed over to.
pub fn commit(paths: &ReplicaPaths) -> Result<u64> {
    let point = committable(paths)?;
    let marker = committed_marker(paths);
    let text = format!(
        "failed over to point {point}; committed at {} (unix ms)\n",
        changelog::unix_ms_now()
    );
    std::fs::write(&marker, text)
        .map_err(|e| TargetError::io(format!("writing {}", marker.display()), e))?;
    Ok(point)
}

/// What [`commit`] checks before it writes anything: the replica was failed over and
/// its rollback finished. Returns the point it was failed over to.
pub fn committable(paths: &ReplicaPaths) -> Result<u64> {
    let state = ApplyState::load(&paths.state, None)?.ok_or_else(|| TargetError::State {
        path: paths.state.clone(),
        what: "missing".into(),
    })?;
    let Some(point) = state.rolled_back_to else {
        return Err(TargetError::Rollback {
            point: state.latest().unwrap_or(0),
            what: "nothing to commit: the replica was not failed over (run `ublk-target failover` first)".into(),
        });
    };
    if state.latest() != Some(point) {
        return Err(TargetError::Rollback {
            point,
            what: "the rollback was interrupted; run `ublk-target failover` again to finish it"
                .into(),
        });
    }
    Ok(point)
}

/// The file that records a committed failover.
pub fn committed_marker(paths: &ReplicaPaths) -> std::path::PathBuf {
    let mut name = paths.replica.as_os_str().to_owned();
    name.push(".committed");
    name.into()
}
