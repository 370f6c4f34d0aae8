//! Consistency-group cuts on a schedule: the shipper's share of [`blkfilter::ring::group`].
//!
//! Volumes attached with one group clock (`blkfilter attach --group-clock`) take their
//! seqs from it; a cut makes every one of them record a MARK at the same instant of
//! that clock, and the shipper ends a segment there flagged `GROUP_MARK` (the MARK's
//! label names the clock and the cut). On the recovery side the points of one cut, one
//! per volume, together form a crash state of the whole group (`ublk-target
//! group-points`).
//!
//! A cut costs one atomic add on the clock and a MARK per volume; making them more
//! often only adds segments. A cut is taken whether or not the volumes are busy: an
//! idle volume records it from its housekeeping tick (every 200 ms).

use crate::error::{Result, ShipperError};
use crate::mark::{around_frozen, wait_for, MarkOptions};
use blkfilter::ring::RingControl;
use blkfilter::ring::{Cut, GroupClock};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Default time between two cuts of a group.
pub const DEFAULT_CUT_EVERY: Duration = Duration::from_secs(5);

/// One group's clock and how often to cut it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupCutSchedule {
    pub clock: PathBuf,
    pub every: Duration,
}

/// Makes one cut through the clock at `clock`, which the group's first volume created.
pub fn cut_now(clock: &Path) -> Result<Cut> {
    Ok(open(clock)?.cut()?)
}

fn open(clock: &Path) -> Result<GroupClock> {
    if !clock.exists() {
        return Err(ShipperError::NoGroupClock(clock.into()));
    }
    Ok(GroupClock::open(clock)?)
}

/// Makes one cut inside the hooks and freezes of `options` and waits until the volume
/// of every ring in `rings` recorded it, so file systems are thawed only then. With
/// `options.app_consistent` (file systems frozen, or a pre hook that quiesces the
/// application) the volumes flag the cut application-consistent.
pub fn cut_waiting(clock: &Path, rings: &[PathBuf], options: &MarkOptions) -> Result<Cut> {
    let group = open(clock)?;
    let controls = rings
        .iter()
        .map(|ring| {
            let control = RingControl::open(ring)?;
            if control.group_cuts_recorded().1 != group.id() {
                return Err(ShipperError::NotInGroup {
                    ring: ring.clone(),
                    clock: clock.into(),
                });
            }
            Ok(control)
        })
        .collect::<Result<Vec<_>>>()?;
    around_frozen(options, || {
        let cut = if options.app_consistent {
            group.cut_app_consistent()?
        } else {
            group.cut()?
        };
        for (ring, control) in rings.iter().zip(&controls) {
            let what = format!(
                "waiting for blkfilter to record group cut {} in {} (is the volume attached?)",
                cut.number,
                ring.display()
            );
            wait_for(options.timeout, &what, || {
                (control.group_cuts_recorded().0 >= cut.number).then_some(())
            })?;
        }
        Ok(cut)
    })
}

/// Cuts the group's clock every `schedule.every` until `done` is set. A clock that
/// cannot be opened or cut is an error (logged and retried at the next interval), never
/// a reason to stop shipping.
pub fn run(schedule: &GroupCutSchedule, done: &AtomicBool) {
    let mut next = Instant::now() + schedule.every;
    let mut failing = false;
    while !done.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        next = now + schedule.every;
        match cut_now(&schedule.clock) {
            Ok(cut) => {
                if std::mem::take(&mut failing) {
                    log::info!("group clock {}: cutting again", schedule.clock.display());
                }
                log::debug!(
                    "group clock {}: cut {} at seq {}",
                    schedule.clock.display(),
                    cut.number,
                    cut.seq
                );
            }
            Err(e) if !failing => {
                failing = true;
                log::error!("group cut: {e}; retrying every {:?}", schedule.every);
            }
            Err(_) => {}
        }
    }
}
