//! Consistency-group cuts on a schedule: the shipper's share of [`blkfilter::ring::group`].
//!
//! Volumes attached with one group clock (`blkfilter attach --group-clock`) take their
//! seqs from it; a cut makes every one of them record a MARK at the same instant of
//! that clock, and the shipper ends a segment there flagged `GROUP_MARK` with the cut's
//! number. On the recovery side the points with one cut number, one per volume,
//! together form a crash state of the whole group (`ublk-target group-points`).
//!
//! A cut costs one atomic add on the clock and a MARK per volume; making them more
//! often only adds segments. A cut is taken whether or not the volumes are busy: an
//! idle volume records it from its housekeeping tick (every 200 ms).

use crate::error::{Result, ShipperError};
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
    if !clock.exists() {
        return Err(ShipperError::NoGroupClock(clock.into()));
    }
    Ok(GroupClock::open(clock)?.cut()?)
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
