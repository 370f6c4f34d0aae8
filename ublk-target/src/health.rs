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

use crate::state::{ApplyState, ReplicaPaths};
use crate::status::VolumeStatus;
use changelog::alert::{Alerts, Health};
use changelog::heartbeat::Heartbeat;
use changelog::{ChainCursor, Key, SegmentHeader, TargetStore, VolumeId};
use std::time::{Duration, Instant};

/// The RPO above which the recovery side calls a volume's health Warning, by default:
/// the shipper's own threshold (30 s) plus room for its heartbeat interval (10 s) and
/// the trip through the store.
pub const DEFAULT_RPO_THRESHOLD: Duration = Duration::from_secs(60);

/// How often `apply --follow` reads the heartbeat (a small GET), at most: a tenth of
/// the RPO threshold, if that is shorter.
const HEARTBEAT_READ: Duration = Duration::from_secs(2);

/// What the replica's own records say about how current it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Freshness {
    /// The newest recovery point's creation time (source clock).
    pub newest_point_unix_ms: Option<u64>,
    /// The replica's chain position when that point is also the last applied segment:
    /// the only position a heartbeat can vouch for (in the middle of a resync the
    /// replica is past its newest point, and not consistent).
    pub at_point: Option<ChainCursor>,
}

impl Freshness {
    /// What `catalog` says.
    pub fn of(catalog: &crate::Catalog) -> Freshness {
        let newest = catalog.points.last();
        Freshness {
            newest_point_unix_ms: newest.map(|p| p.created_unix_ms),
            at_point: catalog
                .cursor
                .clone()
                .filter(|_| newest.is_some_and(|p| p.latest)),
        }
    }

    /// The last time the replica is known to have held every write of the source.
    pub fn current_as_of(&self, heartbeat: Option<&Heartbeat>) -> Option<u64> {
        let vouched = heartbeat
            .filter(|h| self.at_point.as_ref().is_some_and(|c| h.vouches_for(c)))
            .map(|h| h.unix_ms);
        self.newest_point_unix_ms.max(vouched)
    }
}

/// Reads and opens `volume`'s heartbeat: `Ok(None)` when there is none, `Err` (why,
/// for a warning) when it cannot be read or does not open with `key`. A heartbeat is
/// advice: without one the RPO goes by recovery points only.
pub fn read_heartbeat(
    store: &dyn TargetStore,
    volume: &VolumeId,
    key: &Key,
) -> std::result::Result<Option<Heartbeat>, String> {
    let Some(bytes) = store
        .get_blob(volume, changelog::heartbeat::BLOB_NAME)
        .map_err(|e| format!("reading the shipper's heartbeat: {e}"))?
    else {
        return Ok(None);
    };
    Heartbeat::open(key, volume, bytes)
        .map(Some)
        .map_err(|e| format!("the shipper's heartbeat in the store is not valid, ignored: {e}"))
}

/// The heartbeat as `apply --follow` sees it: read again every `every`, a trouble
/// reading it warned about once (until it changes).
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
            let read = read_heartbeat(store, volume, key);
            let trouble = read.as_ref().err().cloned();
            if trouble.is_some() && trouble != self.trouble {
                log::warn!(
                    "volume {volume}: {}",
                    trouble.as_deref().unwrap_or_default()
                );
            }
            self.trouble = trouble;
            self.beat = read.unwrap_or(None);
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
    /// The newest recovery point's index, and what the replica says of its freshness.
    latest_point: Option<u64>,
    latest_applied: Option<u64>,
    freshness: Freshness,
    heartbeat: HeartbeatWatch,
    judged_at: Option<Instant>,
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
        FollowHealth {
            volume,
            threshold,
            latest_point: catalog.latest_point().map(|p| p.index),
            latest_applied: catalog.latest_applied,
            freshness: Freshness::of(&catalog),
            // Often enough that a heartbeat read late cannot take the RPO over the
            // threshold, seldom enough to cost an object store little.
            heartbeat: HeartbeatWatch {
                every: (threshold / 10).clamp(Duration::from_millis(200), HEARTBEAT_READ),
                beat: None,
                read_at: None,
                trouble: None,
            },
            judged_at: None,
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
            self.latest_applied = state.latest();
            match state.last.filter(|last| last.is_crash_point()) {
                Some(last) => {
                    self.latest_point = Some(last.index);
                    self.freshness = Freshness {
                        newest_point_unix_ms: Some(last.created_unix_ms),
                        at_point: Some(state.cursor.clone()),
                    };
                }
                // Past the newest point: a resync being applied.
                None if state.latest().is_some() => self.freshness.at_point = None,
                None => {}
            }
        }
        self.judge(store, key, trouble);
    }

    /// Within a round: segment `header` was applied. Judged at most every second, so
    /// a long catch-up (or applying that cannot keep up) is seen while it lasts.
    pub fn applied(&mut self, store: &dyn TargetStore, key: &Key, header: &SegmentHeader) {
        self.latest_applied = Some(header.index);
        // Its chain position is known only at the round's end: no heartbeat counts.
        self.freshness.at_point = None;
        if header.flags & changelog::flags::CRASH_POINT != 0 {
            self.latest_point = Some(header.index);
            self.freshness.newest_point_unix_ms = Some(header.created_unix_ms);
        }
        if self
            .judged_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.judge(store, key, None);
        }
    }

    fn judge(&mut self, store: &dyn TargetStore, key: &Key, trouble: Option<String>) {
        self.judged_at = Some(Instant::now());
        let heartbeat = self.heartbeat.get(store, &self.volume, key);
        if let Some(beat) = heartbeat {
            let room = Duration::from_millis(beat.interval_ms) + self.heartbeat.every;
            if room >= self.threshold && !std::mem::replace(&mut self.warned_interval, true) {
                log::warn!(
                    "volume {}: the shipper writes its heartbeat every {} ms, and this side \
                     reads it every {} ms: with rpo_threshold_ms {} a quiet volume will \
                     look stale now and then; raise rpo_threshold_ms well above {} ms",
                    self.volume,
                    beat.interval_ms,
                    self.heartbeat.every.as_millis(),
                    self.threshold.as_millis(),
                    room.as_millis()
                );
            }
        }
        let row = VolumeStatus {
            volume: self.volume.to_string(),
            latest_applied: self.latest_applied,
            latest_point: self.latest_point,
            latest_created_unix_ms: self.freshness.newest_point_unix_ms,
            apply_error: trouble,
            ..Default::default()
        }
        .judged(
            &self.freshness,
            heartbeat.as_ref(),
            self.threshold,
            changelog::unix_ms_now(),
        );
        let health = row.health.expect("judged");
        self.alerts
            .observe(&row.volume, health, row.rpo_ms.unwrap_or(0), || row.state());
    }

    /// Applying stopped on an error that needs an operator: Critical, at once.
    pub fn stopped(&mut self, why: &str) {
        let rpo_ms = self
            .freshness
            .newest_point_unix_ms
            .map_or(0, |t| changelog::unix_ms_now().saturating_sub(t));
        self.alerts
            .observe(self.volume.as_str(), Health::Critical, rpo_ms, || {
                format!("stopped applying: {why}")
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(next_index: u64, digest: u8) -> ChainCursor {
        ChainCursor {
            next_index,
            prev_digest: [digest; 32],
            ..ChainCursor::start(VolumeId::new("vol0").unwrap())
        }
    }

    #[test]
    fn a_heartbeat_counts_only_at_the_position_it_names() {
        let at_point = Freshness {
            newest_point_unix_ms: Some(1_000),
            at_point: Some(cursor(5, 1)),
        };
        let beat = |next_index, digest, unix_ms| Heartbeat {
            unix_ms,
            next_index,
            prev_digest: [digest; 32],
            interval_ms: 1_000,
        };
        assert_eq!(at_point.current_as_of(None), Some(1_000));
        assert_eq!(
            at_point.current_as_of(Some(&beat(5, 1, 9_000))),
            Some(9_000)
        );
        // One older than the point changes nothing.
        assert_eq!(at_point.current_as_of(Some(&beat(5, 1, 500))), Some(1_000));
        // Segments the replica has not applied, or another history: the point's time.
        assert_eq!(
            at_point.current_as_of(Some(&beat(6, 1, 9_000))),
            Some(1_000)
        );
        assert_eq!(
            at_point.current_as_of(Some(&beat(5, 2, 9_000))),
            Some(1_000)
        );
        // A replica past its newest point (a resync applied halfway): only the point.
        let resyncing = Freshness {
            at_point: None,
            ..at_point
        };
        assert_eq!(
            resyncing.current_as_of(Some(&beat(5, 1, 9_000))),
            Some(1_000)
        );
        assert_eq!(
            Freshness::default().current_as_of(Some(&beat(0, 0, 9_000))),
            None
        );
    }
}
