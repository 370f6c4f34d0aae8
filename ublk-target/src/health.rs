//! How current the replica is, as the recovery site knows it, and the health that
//! follows: what `ublk-target status` shows and what `apply --follow` raises alerts on.
//!
//! The recovery site is the one left to notice when the protected site goes dark, so
//! its RPO must not depend on the source being there: it is the age of the last time
//! the replica is *known* to have held every write of the source. That time is the
//! newer of
//!
//! * the newest recovery point's creation time (the segment's cut, source clock), and
//! * the time of a shipper heartbeat that vouches for the replica's exact position
//!   ([`changelog::heartbeat`]): a quiet volume makes no segments, and without the
//!   heartbeat its replica would look older every minute.
//!
//! Both are on the source's clock, judged against this one's: a source clock ahead of
//! this site's makes the replica look more current by as much (keep both on NTP).
//!
//! Health: Critical when the replica cannot be followed (its state unreadable, or
//! applying stopped on an error that needs an operator); Warning when the RPO is over
//! the threshold (the source, the link or applying is behind, or the source is gone),
//! when there is no recovery point yet, when the store cannot be reached, or when undo
//! journals are damaged; Healthy otherwise, and for a volume failed over here once its
//! rollback is complete (it is the primary now; nothing replicates into it; halfway,
//! it is a Warning).

use crate::error::Result;
use crate::state::{ApplyState, ReplicaPaths};
use crate::status::VolumeStatus;
use changelog::alert::{Alerts, Health};
use changelog::heartbeat::Heartbeat;
use changelog::{Key, SegmentHeader, TargetStore, VolumeId};
use std::time::{Duration, Instant};

/// The RPO above which the recovery side calls a volume's health Warning, by default:
/// the shipper's own threshold (30 s) plus room for its heartbeat interval (10 s) and
/// the trip through the store.
pub const DEFAULT_RPO_THRESHOLD: Duration = Duration::from_secs(60);

/// Reads and opens `volume`'s heartbeat (`None`: there is none). An error is advice
/// to log: without a heartbeat the RPO goes by recovery points only.
pub fn read_heartbeat(
    store: &dyn TargetStore,
    volume: &VolumeId,
    key: &Key,
) -> Result<Option<Heartbeat>> {
    let Some(bytes) = store.get_blob(volume, changelog::heartbeat::BLOB_NAME)? else {
        return Ok(None);
    };
    Ok(Some(Heartbeat::open(key, volume, bytes)?))
}

/// The heartbeat as `apply --follow` sees it: read again every `every`; a trouble
/// reading it is warned about once (until it changes) and keeps the last good one,
/// which stays true for its own time.
struct HeartbeatWatch {
    every: Duration,
    beat: Option<Heartbeat>,
    read_at: Option<Instant>,
    trouble: Option<String>,
}

impl HeartbeatWatch {
    fn get(&mut self, store: &dyn TargetStore, volume: &VolumeId, key: &Key) -> Option<Heartbeat> {
        if self.read_at.is_none_or(|t| t.elapsed() >= self.every) {
            self.read_at = Some(Instant::now());
            match read_heartbeat(store, volume, key) {
                Ok(beat) => {
                    self.beat = beat;
                    self.trouble = None;
                }
                Err(e) => {
                    let trouble = Some(e.to_string());
                    if trouble != self.trouble {
                        log::warn!("volume {volume}: the shipper's heartbeat, ignored: {e}");
                    }
                    self.trouble = trouble;
                }
            }
        }
        self.beat
    }
}

/// `apply --follow`'s view of one volume's health: judged after each round of
/// applying and at most every second within one, with an alert on each change
/// ([`changelog::alert`]).
pub struct FollowHealth {
    volume: VolumeId,
    threshold: Duration,
    /// What is known of the replica: its newest point, last applied segment and, when
    /// that is the point, its chain position (`VolumeStatus::at_point`).
    row: VolumeStatus,
    heartbeat: HeartbeatWatch,
    judged_at: Option<Instant>,
    /// The RPO last judged, for the alert when applying stops.
    rpo_ms: u64,
    /// A shipper heartbeat interval too close to the threshold was warned about.
    warned_interval: bool,
    alerts: Alerts,
}

impl FollowHealth {
    /// Starts from the replica's catalog at `paths` (its newest point before this run).
    pub fn new(
        volume: VolumeId,
        paths: &ReplicaPaths,
        threshold: Duration,
        alerts: Alerts,
    ) -> FollowHealth {
        let catalog = crate::catalog(paths).unwrap_or_default();
        let mut row = VolumeStatus::new(volume.to_string(), &catalog, Ok(Vec::new()), false);
        // What the store holds is not listed here.
        row.waiting = None;
        FollowHealth {
            volume,
            threshold,
            row,
            // A heartbeat read late adds to the RPO judged: a tenth of the threshold
            // at most, and an object store is asked seldom.
            heartbeat: HeartbeatWatch {
                every: (threshold / 10).max(Duration::from_millis(200)),
                beat: None,
                read_at: None,
                trouble: None,
            },
            judged_at: None,
            rpo_ms: 0,
            warned_interval: false,
            alerts,
        }
    }

    /// After a round: the replica's state (`None` while no applier is open) and the
    /// error applying is retrying, if it is.
    pub fn observe(
        &mut self,
        store: &dyn TargetStore,
        key: &Key,
        state: Option<&ApplyState>,
        trouble: Option<String>,
    ) {
        if let Some(state) = state {
            self.row.latest_applied = state.latest();
            match state.last.filter(|last| last.is_crash_point()) {
                Some(last) => {
                    self.row.latest_point = Some(last.index);
                    self.row.latest_created_unix_ms = Some(last.created_unix_ms);
                    self.row.at_point = Some(state.cursor.clone());
                }
                // Past the newest point: a resync being applied.
                None if state.latest().is_some() => self.row.at_point = None,
                None => {}
            }
        }
        self.row.apply_error = trouble;
        self.judge(store, key);
    }

    /// Within a round: segment `header` was applied. Judged at most every second, so
    /// a long catch-up (or applying that cannot keep up) is seen while it lasts.
    pub fn applied(&mut self, store: &dyn TargetStore, key: &Key, header: &SegmentHeader) {
        self.row.latest_applied = Some(header.index);
        // Its chain position is known only at the round's end: no heartbeat counts.
        self.row.at_point = None;
        self.row.apply_error = None;
        if header.flags & changelog::flags::CRASH_POINT != 0 {
            self.row.latest_point = Some(header.index);
            self.row.latest_created_unix_ms = Some(header.created_unix_ms);
        }
        if self
            .judged_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.judge(store, key);
        }
    }

    fn judge(&mut self, store: &dyn TargetStore, key: &Key) {
        self.judged_at = Some(Instant::now());
        // Only a replica at a point can be vouched for: no read otherwise.
        let heartbeat = match self.row.at_point {
            Some(_) => self.heartbeat.get(store, &self.volume, key),
            None => None,
        };
        if let Some(beat) = heartbeat {
            let room = Duration::from_millis(beat.interval_ms) + self.heartbeat.every;
            if room >= self.threshold && !std::mem::replace(&mut self.warned_interval, true) {
                log::warn!(
                    "volume {}: the shipper writes its heartbeat every {} ms, and this \
                     side reads it every {} ms: with rpo_threshold_ms {} a quiet volume will \
                     look stale now and then; raise rpo_threshold_ms well above {} ms",
                    self.volume,
                    beat.interval_ms,
                    self.heartbeat.every.as_millis(),
                    self.threshold.as_millis(),
                    room.as_millis()
                );
            }
        }
        let row =
            self.row
                .clone()
                .judged(heartbeat.as_ref(), self.threshold, changelog::unix_ms_now());
        self.rpo_ms = row.rpo_ms.unwrap_or(0);
        let health = row.health.expect("judged");
        self.alerts
            .observe(&row.volume, health, self.rpo_ms, || row.state());
    }

    /// Applying stopped on an error that needs an operator: Critical, at once.
    pub fn stopped(&mut self, why: &str) {
        self.alerts
            .observe(&self.row.volume, Health::Critical, self.rpo_ms, || {
                format!("stopped applying: {why}")
            });
    }
}
