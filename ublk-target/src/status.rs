//! `ublk-target status`: the recovery site's view of each replicated volume, one row
//! per volume of the config file.
//!
//! The RPO shown here is what a failover now would lose at most, as far as this site
//! knows: how long ago the replica last held every write of the source (its newest
//! recovery point's time, or a shipper heartbeat's: see [`crate::health`]). HEALTH
//! judges it against the config's `rpo_threshold_ms`. WAITING counts the segments the
//! store holds beyond the replica, not applied yet (a stopped `apply`, or one that
//! falls behind, shows here first).

use crate::journal::FsSpace;
use crate::plan::PointChoice;
use crate::points::{Catalog, Retention};
use changelog::alert::Health;
use changelog::heartbeat::Heartbeat;
use changelog::{ChainCursor, VolumeId};
use std::fmt::Write;
use std::time::Duration;

/// One volume's row.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VolumeStatus {
    pub volume: String,
    /// Why the replica's state or journal could not be read (the rest is then empty).
    pub error: Option<String>,
    /// The last applied segment (a recovery point or not: none is exposed while a
    /// resync, such as the initial replication, is being applied).
    pub latest_applied: Option<u64>,
    /// The newest recovery point and its creation time (ms since the Unix epoch).
    pub latest_point: Option<u64>,
    pub latest_created_unix_ms: Option<u64>,
    /// Retained points, and when the oldest was created.
    pub points: usize,
    pub oldest_created_unix_ms: Option<u64>,
    /// Disk space the undo journals take, in bytes.
    pub journal_bytes: u64,
    /// The space of the undo journal's file system, when it could be read.
    pub journal_fs: Option<FsSpace>,
    /// The volume's retention limits, for the history check (see
    /// [`VolumeStatus::history_cut_short`]).
    pub keep_points: Option<usize>,
    pub keep_size: Option<u64>,
    pub keep_age_ms: Option<u64>,
    /// Segments in the store after the latest applied one; `None`: the store could not
    /// be listed (see `store_error`).
    pub waiting: Option<usize>,
    pub store_error: Option<String>,
    /// Failed over to this point (the replica is no longer applied to).
    pub rolled_back_to: Option<u64>,
    /// The failover was committed (`ublk-target commit`).
    pub committed: bool,
    /// Undo journals that could not be read.
    pub damaged_journals: usize,
    /// The id (hex) of the key that sealed the last applied segment: after a key
    /// rotation, shows that the replica has moved past the old key.
    pub key_id: Option<String>,
    /// Applying fails and is retried (`apply --follow` only, for its alerts): why.
    #[serde(skip)]
    pub apply_error: Option<String>,
    /// The replica's chain position when its newest point is its last applied
    /// segment: the only position a shipper heartbeat can vouch for (in the middle of
    /// a resync the replica is past its newest point, and not consistent).
    #[serde(skip)]
    pub at_point: Option<ChainCursor>,
    /// `apply --follow` has made no progress for this long, in the middle of a round
    /// (a store call or the replica not answering): why the RPO grows.
    #[serde(skip)]
    pub stalled_ms: Option<u64>,
    /// The newest shipper heartbeat read, and the last time the replica is known to
    /// have held every write of the source (source clock, ms since the Unix epoch).
    pub heartbeat_unix_ms: Option<u64>,
    pub current_as_of_unix_ms: Option<u64>,
    /// The age of `current_as_of_unix_ms` when judged, and the threshold it is judged
    /// against.
    pub rpo_ms: Option<u64>,
    pub rpo_threshold_ms: u64,
    /// Set by [`VolumeStatus::judged`]: how far back the points reach, when
    /// `keep_size` keeps that shorter than `keep_age` ([`VolumeStatus::history_cut_short`]).
    pub history_ms: Option<u64>,
    /// Set by [`VolumeStatus::judged`] (and for an unreadable replica: Critical).
    pub health: Option<Health>,
}

impl VolumeStatus {
    /// The row for `volume` from its catalog and the indexes its store holds.
    pub fn new(
        volume: String,
        catalog: &Catalog,
        store_indexes: Result<Vec<u64>, String>,
        committed: bool,
    ) -> VolumeStatus {
        let latest = catalog.points.last();
        let after = catalog.latest_applied.map_or(0, |l| l + 1);
        let (waiting, store_error) = match store_indexes {
            Ok(ix) => (Some(ix.iter().filter(|&&i| i >= after).count()), None),
            Err(e) => (None, Some(e)),
        };
        VolumeStatus {
            volume,
            error: None,
            latest_applied: catalog.latest_applied,
            latest_point: latest.map(|p| p.index),
            latest_created_unix_ms: latest.map(|p| p.created_unix_ms),
            points: catalog.points.len(),
            oldest_created_unix_ms: catalog.points.first().map(|p| p.created_unix_ms),
            journal_bytes: catalog.journal_bytes,
            waiting,
            store_error,
            rolled_back_to: catalog.rolled_back_to,
            committed,
            damaged_journals: catalog.damaged.len(),
            key_id: catalog.key_id.map(|id| changelog::key::hex(&id)),
            at_point: catalog
                .cursor
                .clone()
                .filter(|_| latest.is_some_and(|p| p.latest)),
            ..Default::default()
        }
    }

    /// The row with the volume's retention, so that a history kept shorter than
    /// `keep_age` by `keep_size` is seen.
    pub fn with_retention(mut self, retention: &Retention) -> VolumeStatus {
        self.keep_points = retention.keep_points;
        self.keep_size = retention.keep_size;
        self.keep_age_ms = retention.keep_age.map(|age| age.as_millis() as u64);
        self
    }

    /// When the journals fill `keep_size` (nine tenths of it or more), the oldest point
    /// is younger than `keep_age` (by a tenth or more, so that neither limit's own
    /// point-by-point churn counts) and fewer points than `keep_points` are kept (else
    /// the count is what keeps the history short): how far back the points reach.
    /// Then the size limit, not the age, decides the history: a burst of writes (a bulk
    /// load, or ransomware encrypting the disk) pushes out the oldest points, the ones
    /// before it, sooner than the operator planned for. Where the journals of one step
    /// between points exceed a tenth of `keep_size`, the fill swings across nine tenths
    /// from one segment to the next, and so does this (alerts hold a change for 10 s
    /// before they report it).
    pub fn history_cut_short(&self, now_unix_ms: u64) -> Option<u64> {
        let (size, age_ms) = (self.keep_size?, self.keep_age_ms?);
        let history_ms = self
            .oldest_created_unix_ms
            .map_or(0, |t| now_unix_ms.saturating_sub(t));
        let full = u128::from(self.journal_bytes) * 10 >= u128::from(size) * 9;
        let short = u128::from(history_ms) * 10 < u128::from(age_ms) * 9;
        let counted_out = self.keep_points.is_some_and(|n| self.points >= n);
        (full && short && !counted_out && self.rolled_back_to.is_none()).then_some(history_ms)
    }

    /// When the undo journal's file system has less than a tenth of it free and the
    /// journals may grow by more than is free (no `keep_size`, or one that leaves them
    /// room beyond it): the space left, in bytes. Applying stops when it is full.
    pub fn journal_space_short(&self) -> Option<u64> {
        let fs = self.journal_fs?;
        let growth_left = self
            .keep_size
            .map_or(u64::MAX, |size| size.saturating_sub(self.journal_bytes));
        let short = u128::from(fs.free) * 10 < u128::from(fs.size) && growth_left > fs.free;
        (short && self.rolled_back_to.is_none()).then_some(fs.free)
    }

    /// The row of a volume whose replica state or journal could not be read.
    pub fn unreadable(volume: String, why: String) -> VolumeStatus {
        VolumeStatus {
            volume,
            error: Some(why),
            health: Some(Health::Critical),
            ..Default::default()
        }
    }

    /// The row judged at `now_unix_ms`: how current the replica is (its newest point,
    /// or `heartbeat` where it vouches for the replica's position), its RPO and health
    /// against `threshold`.
    pub fn judged(
        mut self,
        heartbeat: Option<&Heartbeat>,
        threshold: Duration,
        now_unix_ms: u64,
    ) -> VolumeStatus {
        self.heartbeat_unix_ms = heartbeat.map(|h| h.unix_ms);
        self.current_as_of_unix_ms = self.current_as_of(heartbeat);
        self.rpo_ms = self
            .current_as_of_unix_ms
            .map(|t| now_unix_ms.saturating_sub(t));
        self.rpo_threshold_ms = threshold.as_millis() as u64;
        self.history_ms = self.history_cut_short(now_unix_ms);
        self.health = Some(self.assess());
        self
    }

    /// The last time the replica is known to have held every write of the source:
    /// its newest point's, or a heartbeat's that vouches for its position.
    fn current_as_of(&self, heartbeat: Option<&Heartbeat>) -> Option<u64> {
        let vouched = heartbeat
            .filter(|h| self.at_point.as_ref().is_some_and(|c| h.vouches_for(c)))
            .map(|h| h.unix_ms);
        self.latest_created_unix_ms.max(vouched)
    }

    /// See [`crate::health`] for the rules.
    fn assess(&self) -> Health {
        if self.error.is_some() {
            Health::Critical
        } else if let Some(point) = self.rolled_back_to {
            // Failed over here: the primary now, once the rollback is complete.
            if self.latest_applied == Some(point) {
                Health::Healthy
            } else {
                Health::Warning
            }
        } else if self.latest_point.is_none()
            || self.store_error.is_some()
            || self.apply_error.is_some()
            || self.damaged_journals > 0
            || self.over_threshold()
            || self.history_ms.is_some()
            || self.journal_space_short().is_some()
        {
            Health::Warning
        } else {
            Health::Healthy
        }
    }

    fn over_threshold(&self) -> bool {
        self.rpo_ms.is_some_and(|rpo| rpo > self.rpo_threshold_ms)
    }

    /// What an operator should know first, in a few words.
    pub fn state(&self) -> String {
        if let Some(e) = &self.error {
            return format!("error: {e}");
        }
        match (self.rolled_back_to, self.committed) {
            (Some(p), _) if self.latest_applied != Some(p) => {
                return format!(
                    "the rollback to point {p} was interrupted halfway: run `ublk-target \
                     rollback {} --point {p}` again",
                    self.volume
                )
            }
            (Some(p), true) => return format!("failed over to point {p}, committed"),
            (Some(p), false) => return format!("failed over to point {p} (not committed)"),
            (None, _) => {}
        }
        let mut parts = Vec::new();
        if let Some(e) = &self.apply_error {
            parts.push(format!("applying fails, retrying: {e}"));
        }
        if let Some(e) = &self.store_error {
            parts.push(format!("store: {e}"));
        }
        if let Some(ms) = self.stalled_ms {
            parts.push(format!(
                "applying has made no progress for {}: a store call or the replica is \
                 slow or does not answer",
                changelog::short_duration(ms)
            ));
        }
        if self.over_threshold() {
            let rpo = changelog::short_duration(self.rpo_ms.unwrap_or(0));
            let threshold = changelog::short_duration(self.rpo_threshold_ms);
            parts.push(format!(
                "not current for {rpo}, over its {threshold} threshold: the source, the \
                 link or applying is behind, or the source is down"
            ));
        }
        match self.waiting {
            Some(0) if self.latest_applied.is_some() && parts.is_empty() => {
                parts.push("up to date".into())
            }
            Some(0) | None => {}
            Some(n) => parts.push(format!("{n} segment(s) to apply")),
        }
        if self.latest_applied.is_none() {
            parts.push("nothing applied yet".into());
        } else if self.latest_point.is_none() {
            parts.push("no recovery point yet (a resync is being applied)".into());
        }
        if self.damaged_journals > 0 {
            parts.push(format!("{} damaged undo journal(s)", self.damaged_journals));
        }
        if let (Some(free), Some(fs)) = (self.journal_space_short(), self.journal_fs) {
            parts.push(format!(
                "the undo journal's file system is {}% full ({} free) and the journals may \
                 grow past that: applying stops when it is full (set keep_size below what \
                 they can take, or free space)",
                100 - free * 100 / fs.size.max(1),
                crate::points::format_bytes(free)
            ));
        }
        if let (Some(history), Some(size), Some(age)) =
            (self.history_ms, self.keep_size, self.keep_age_ms)
        {
            parts.push(format!(
                "recovery points reach back {} of the {} keep_age: the undo journals fill \
                 keep_size {} (raise it, or expect the shorter history)",
                changelog::short_duration(history),
                changelog::short_duration(age),
                crate::points::format_bytes(size)
            ));
        }
        if parts.is_empty() {
            parts.push("current".into());
        }
        parts.join("; ")
    }
}

/// The rows as a table: VOLUME, HEALTH, POINT (the newest), RPO (how long ago the
/// replica was last known current), POINTS (retained, back to the oldest's age),
/// JOURNALS (the disk the undo journals take), WAITING, STATE.
pub fn table(rows: &[VolumeStatus], now_unix_ms: u64) -> String {
    let age = |ms: Option<u64>| {
        ms.map_or("-".into(), |t| {
            changelog::short_duration(now_unix_ms.saturating_sub(t))
        })
    };
    let mut out = format!(
        "{:<16} {:<8} {:>8} {:>8} {:>16} {:>9} {:>8}  STATE\n",
        "VOLUME", "HEALTH", "POINT", "RPO", "POINTS", "JOURNALS", "WAITING"
    );
    for row in rows {
        let point = row.latest_point.map_or("-".into(), |p| p.to_string());
        let points = match row.points {
            0 => "0".to_string(),
            n => format!("{n} ({} back)", age(row.oldest_created_unix_ms)),
        };
        let waiting = row.waiting.map_or("?".into(), |n| n.to_string());
        let health = row.health.map_or("?".into(), |h| format!("{h:?}"));
        let rpo = row.rpo_ms.map_or("-".into(), changelog::short_duration);
        let journals = crate::points::format_bytes(row.journal_bytes);
        let _ = writeln!(
            out,
            "{:<16} {health:<8} {point:>8} {rpo:>8} {points:>16} {journals:>9} {waiting:>8}  {}",
            row.volume,
            row.state()
        );
    }
    out
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

/// The rows in the Prometheus text format (`ublk-target status --prometheus`), labelled
/// by volume, with the `ublk_dr_target_` prefix: `up` (0 when the replica's state or
/// journal could not be read: then only `health`, Critical, is given too), the RPO as this
/// site knows it and its threshold, the newest point's index and age, retained points,
/// the oldest one's age (the history), what the undo journals take and the space left
/// on their file system, segments waiting, whether the store could be listed, failed over, damaged journals.
pub fn prometheus(rows: &[VolumeStatus], now_unix_ms: u64) -> String {
    type Figure = fn(&VolumeStatus, u64) -> Option<f64>;
    let families: [(&str, &str, Figure); 12] = [
        (
            "rpo_seconds",
            "how long ago the replica last held every write of the source (its newest \
             point, or a heartbeat; source clock)",
            |r, _| r.rpo_ms.map(|ms| ms as f64 / 1e3),
        ),
        (
            "rpo_threshold_seconds",
            "RPO above which health is Warning",
            |r, _| Some(r.rpo_threshold_ms as f64 / 1e3),
        ),
        (
            "latest_point",
            "index of the newest recovery point",
            |r, _| r.latest_point.map(|p| p as f64),
        ),
        (
            "latest_point_age_seconds",
            "age of the newest recovery point (source clock)",
            |r, now| {
                r.latest_created_unix_ms
                    .map(|t| now.saturating_sub(t) as f64 / 1e3)
            },
        ),
        ("points", "recovery points retained", |r, _| {
            Some(r.points as f64)
        }),
        (
            "history_seconds",
            "age of the oldest recovery point retained (source clock)",
            |r, now| {
                r.oldest_created_unix_ms
                    .map(|t| now.saturating_sub(t) as f64 / 1e3)
            },
        ),
        (
            "journal_bytes",
            "disk space the undo journals take",
            |r, _| Some(r.journal_bytes as f64),
        ),
        (
            "journal_fs_free_bytes",
            "space left on the undo journal's file system",
            |r, _| r.journal_fs.map(|fs| fs.free as f64),
        ),
        (
            "segments_waiting",
            "segments in the store not applied yet",
            |r, _| r.waiting.map(|n| n as f64),
        ),
        (
            "store_reachable",
            "1 if the store could be listed",
            |r, _| Some(flag(r.store_error.is_none())),
        ),
        (
            "failed_over",
            "1 once the replica was rolled back for failover",
            |r, _| Some(flag(r.rolled_back_to.is_some())),
        ),
        (
            "damaged_journals",
            "undo journals that could not be read",
            |r, _| Some(r.damaged_journals as f64),
        ),
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ublk_dr_target_up 1 if the replica's state was read"
    );
    let _ = writeln!(out, "# TYPE ublk_dr_target_up gauge");
    for row in rows {
        let up = row.error.is_none() as u8;
        let _ = writeln!(out, "ublk_dr_target_up{{volume=\"{}\"}} {up}", row.volume);
    }
    // Health for every row: an unreadable replica is Critical, and a rule on health
    // alone must see it.
    let _ = writeln!(
        out,
        "# HELP ublk_dr_target_health 0 Healthy, 1 Warning, 2 Critical"
    );
    let _ = writeln!(out, "# TYPE ublk_dr_target_health gauge");
    for row in rows {
        if let Some(health) = row.health {
            let _ = writeln!(
                out,
                "ublk_dr_target_health{{volume=\"{}\"}} {}",
                row.volume,
                health.gauge()
            );
        }
    }
    for (family, help, figure) in families {
        let _ = writeln!(out, "# HELP ublk_dr_target_{family} {help}");
        let _ = writeln!(out, "# TYPE ublk_dr_target_{family} gauge");
        for row in rows.iter().filter(|r| r.error.is_none()) {
            if let Some(value) = figure(row, now_unix_ms) {
                let _ = writeln!(
                    out,
                    "ublk_dr_target_{family}{{volume=\"{}\"}} {value}",
                    row.volume
                );
            }
        }
    }
    out
}

/// One recovery plan's row: the points its failover would take now (its default point
/// choice) and the plan's RPO: how long ago the oldest of them was known current.
#[derive(Clone, Debug)]
pub struct PlanStatus {
    pub plan: String,
    pub choice: String,
    /// What the points are ("group cut 12 (clock …) of …"), or why there are none.
    pub at: Result<String, String>,
    /// Since when a failover now would lose the writes (ms since the Unix epoch): the
    /// oldest chosen point's creation time; with each volume's latest point (the
    /// replica as it is), the oldest of the volumes' last-known-current times, which a
    /// shipper heartbeat keeps up for a quiet volume.
    pub current_as_of_unix_ms: Option<u64>,
}

impl PlanStatus {
    /// `current_as_of`: each volume's last-known-current time (its status row's).
    pub fn new(
        plan: &crate::plan::PlanConfig,
        chosen: Result<crate::plan::Chosen, String>,
        current_as_of: impl Fn(&VolumeId) -> Option<u64>,
    ) -> PlanStatus {
        let as_of = match (&chosen, plan.point) {
            (Ok(_), PointChoice::Latest) => plan
                .volumes()
                .map(current_as_of)
                .collect::<Option<Vec<u64>>>()
                .and_then(|times| times.into_iter().min()),
            (Ok(c), _) => c.points.iter().map(|p| p.created_unix_ms).min(),
            (Err(_), _) => None,
        };
        PlanStatus {
            plan: plan.name.clone(),
            choice: plan.point.to_string(),
            at: chosen.map(|c| c.what),
            current_as_of_unix_ms: as_of,
        }
    }
}

/// The plans as a table: PLAN, POINT (its choice), RPO (see
/// [`PlanStatus::current_as_of_unix_ms`]: with group cuts, how long ago the group last
/// had a common point), AT.
pub fn plans_table(rows: &[PlanStatus], now_unix_ms: u64) -> String {
    let mut out = format!("{:<16} {:>14} {:>8}  AT\n", "PLAN", "POINT", "RPO");
    for row in rows {
        let rpo = row.current_as_of_unix_ms.map_or("-".into(), |t| {
            changelog::short_duration(now_unix_ms.saturating_sub(t))
        });
        let at = match &row.at {
            Ok(what) => what.clone(),
            Err(why) => format!("no failover possible: {why}"),
        };
        let _ = writeln!(out, "{:<16} {:>14} {rpo:>8}  {at}", row.plan, row.choice);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_counts_only_at_the_position_it_names() {
        let cursor = |next_index, digest| ChainCursor {
            next_index,
            prev_digest: [digest; 32],
            ..ChainCursor::start(changelog::VolumeId::new("vol0").unwrap())
        };
        let beat = |next_index, digest, unix_ms| Heartbeat {
            unix_ms,
            next_index,
            prev_digest: [digest; 32],
            interval_ms: 1_000,
        };
        let at_point = VolumeStatus {
            latest_created_unix_ms: Some(1_000),
            at_point: Some(cursor(5, 1)),
            ..Default::default()
        };
        let as_of = |row: &VolumeStatus, b: Option<Heartbeat>| row.current_as_of(b.as_ref());
        assert_eq!(as_of(&at_point, None), Some(1_000));
        assert_eq!(as_of(&at_point, Some(beat(5, 1, 9_000))), Some(9_000));
        // One older than the point changes nothing.
        assert_eq!(as_of(&at_point, Some(beat(5, 1, 500))), Some(1_000));
        // Segments the replica has not applied, or another history: the point's time.
        assert_eq!(as_of(&at_point, Some(beat(6, 1, 9_000))), Some(1_000));
        assert_eq!(as_of(&at_point, Some(beat(5, 2, 9_000))), Some(1_000));
        // A replica past its newest point (a resync applied halfway): only the point.
        let resyncing = VolumeStatus {
            at_point: None,
            ..at_point
        };
        assert_eq!(as_of(&resyncing, Some(beat(5, 1, 9_000))), Some(1_000));
        assert_eq!(
            as_of(&VolumeStatus::default(), Some(beat(0, 0, 9_000))),
            None
        );
    }

    #[test]
    fn a_history_the_size_limit_cuts_short_is_a_warning() {
        let retention = Retention {
            keep_points: None,
            keep_age: Some(Duration::from_secs(100)),
            keep_size: Some(1000),
            thin: None,
        };
        let now = 1_000_000;
        // Journals taking `bytes`, the oldest point `back` ms old.
        let row = |bytes: u64, back: u64, retention: &Retention| {
            VolumeStatus {
                volume: "vol0".into(),
                latest_applied: Some(7),
                latest_point: Some(7),
                latest_created_unix_ms: Some(now),
                oldest_created_unix_ms: Some(now - back),
                points: 3,
                waiting: Some(0),
                journal_bytes: bytes,
                ..Default::default()
            }
            .with_retention(retention)
            .judged(None, Duration::from_secs(60), now)
        };
        let short = row(950, 30_000, &retention);
        assert_eq!(short.health, Some(Health::Warning));
        assert_eq!(short.history_ms, Some(30_000));
        let state = short.state();
        assert!(
            state.contains("recovery points reach back 30.0s of the 1m40s keep_age")
                && state.contains("keep_size 1000 B"),
            "{state}"
        );
        // Room left in the journals, a history near keep_age (age pruning at work),
        // no age wanted, or no size limit: nothing to say.
        for (bytes, back, retention) in [
            (850, 30_000, retention),
            (1000, 95_000, retention),
            (
                1000,
                30_000,
                Retention {
                    keep_age: None,
                    ..retention
                },
            ),
            (
                1000,
                30_000,
                Retention {
                    keep_size: None,
                    ..retention
                },
            ),
            (
                1000,
                30_000,
                Retention {
                    keep_points: Some(3),
                    ..retention
                },
            ),
        ] {
            let row = row(bytes, back, &retention);
            assert_eq!(
                row.health,
                Some(Health::Healthy),
                "{bytes} {back} {retention:?}"
            );
            assert_eq!(row.state(), "up to date");
        }
        let text = prometheus(&[short], now);
        assert!(
            text.contains("ublk_dr_target_journal_bytes{volume=\"vol0\"} 950"),
            "{text}"
        );
        assert!(
            text.contains("ublk_dr_target_history_seconds{volume=\"vol0\"} 30"),
            "{text}"
        );
    }

    #[test]
    fn a_nearly_full_journal_file_system_is_a_warning_unless_keep_size_fits() {
        let row = |free: u64, keep_size: Option<u64>| {
            VolumeStatus {
                volume: "vol0".into(),
                latest_applied: Some(7),
                latest_point: Some(7),
                latest_created_unix_ms: Some(1_000),
                waiting: Some(0),
                journal_bytes: 300 << 20,
                journal_fs: Some(FsSpace {
                    free,
                    size: 10 << 30,
                }),
                keep_size,
                ..Default::default()
            }
            .judged(None, Duration::from_secs(60), 1_000)
        };
        let short = row(512 << 20, None);
        assert_eq!(short.health, Some(Health::Warning));
        let state = short.state();
        assert!(
            state.contains("file system is 95% full (512 MiB free)")
                && state.contains("applying stops when it is full"),
            "{state}"
        );
        // Room for what keep_size lets them grow by, or a tenth free: Healthy.
        for (free, keep_size) in [(512 << 20, Some(800 << 20)), (1200 << 20, None)] {
            let row = row(free, keep_size);
            assert_eq!(row.health, Some(Health::Healthy), "{free} {keep_size:?}");
        }
        // keep_size beyond the space left: the journals can still fill it.
        assert_eq!(row(512 << 20, Some(1 << 30)).health, Some(Health::Warning));
        let text = prometheus(&[short], 1_000);
        assert!(
            text.contains(&format!(
                "ublk_dr_target_journal_fs_free_bytes{{volume=\"vol0\"}} {}",
                512u64 << 20
            )),
            "{text}"
        );
    }

    #[test]
    fn health_goes_by_the_rpo_and_what_stops_following() {
        let threshold = Duration::from_secs(60);
        let judged = |row: VolumeStatus, newest: u64| {
            let row = VolumeStatus {
                latest_created_unix_ms: Some(newest),
                ..row
            }
            .judged(None, threshold, 100_000);
            (row.health.unwrap(), row.state())
        };
        let applied = VolumeStatus {
            volume: "vol0".into(),
            latest_applied: Some(7),
            latest_point: Some(7),
            waiting: Some(0),
            ..Default::default()
        };
        assert_eq!(judged(applied.clone(), 90_000).0, Health::Healthy);
        let (health, state) = judged(applied.clone(), 30_000);
        assert_eq!(health, Health::Warning);
        assert!(
            state.starts_with("not current for 1m10s, over its 1m00s"),
            "{state}"
        );
        let retrying = VolumeStatus {
            apply_error: Some("disk full".into()),
            ..applied.clone()
        };
        assert_eq!(judged(retrying, 90_000).0, Health::Warning);
        let no_point = VolumeStatus {
            latest_point: None,
            ..applied.clone()
        };
        assert_eq!(judged(no_point, 90_000).0, Health::Warning);
        // Failed over: the primary now, however old its point, once the rollback is
        // complete; halfway, it says what to re-run.
        let failed_over = VolumeStatus {
            rolled_back_to: Some(7),
            ..applied.clone()
        };
        assert_eq!(judged(failed_over, 0).0, Health::Healthy);
        let halfway = VolumeStatus {
            rolled_back_to: Some(5),
            ..applied
        };
        let (health, state) = judged(halfway, 90_000);
        assert_eq!(health, Health::Warning);
        assert!(state.contains("rollback vol0 --point 5"), "{state}");
    }

    #[test]
    fn a_plan_at_latest_points_is_as_current_as_its_stalest_volume() {
        let config = crate::config::TargetConfig::parse(
            "key = \"/k\"\nstore = \"/s\"\n\
             [[volume]]\nid = \"a\"\nreplica = \"/a\"\n\
             [[volume]]\nid = \"b\"\nreplica = \"/b\"\n\
             [[plan]]\nname = \"latest\"\npoint = \"latest\"\n\
             [[plan.step]]\nvolumes = [\"a\", \"b\"]\n\
             [[plan]]\nname = \"app\"\npoint = \"latest-app\"\n\
             [[plan.step]]\nvolumes = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let point = |created_unix_ms| crate::RecoveryPoint {
            index: 1,
            first_seq: 0,
            last_seq: 1,
            created_unix_ms,
            crash_consistent: true,
            app_consistent: true,
            latest: true,
            group_cuts: None,
        };
        let chosen = || {
            Ok(crate::plan::Chosen {
                points: vec![point(1_000), point(2_000)],
                what: "points".into(),
            })
        };
        // Heartbeats keep both volumes current well past their points.
        let as_of = |v: &VolumeId| Some(if v.as_str() == "a" { 9_000 } else { 8_000 });
        let latest = PlanStatus::new(&config.plans[0], chosen(), as_of);
        assert_eq!(latest.current_as_of_unix_ms, Some(8_000));
        // An app-consistent point loses what came after it, however current the replica.
        let app = PlanStatus::new(&config.plans[1], chosen(), as_of);
        assert_eq!(app.current_as_of_unix_ms, Some(1_000));
        // A volume not known current: no figure rather than a flattering one.
        let unknown = PlanStatus::new(&config.plans[0], chosen(), |v: &VolumeId| {
            as_of(v).filter(|_| v.as_str() == "a")
        });
        assert_eq!(unknown.current_as_of_unix_ms, None);
    }

    #[test]
    fn prometheus_gives_an_unreadable_replica_only_up_0() {
        let good = VolumeStatus {
            volume: "vol0".into(),
            latest_point: Some(7),
            latest_created_unix_ms: Some(1_000),
            points: 3,
            waiting: Some(2),
            ..Default::default()
        };
        let bad = VolumeStatus::unreadable("vol1".into(), "state unreadable".into());
        let good = good.judged(None, Duration::from_secs(2), 4_000);
        let text = prometheus(&[good, bad], 4_000);
        for line in [
            "ublk_dr_target_up{volume=\"vol0\"} 1",
            "ublk_dr_target_up{volume=\"vol1\"} 0",
            "ublk_dr_target_health{volume=\"vol0\"} 1",
            "ublk_dr_target_latest_point{volume=\"vol0\"} 7",
            "ublk_dr_target_rpo_seconds{volume=\"vol0\"} 3",
            "ublk_dr_target_rpo_threshold_seconds{volume=\"vol0\"} 2",
            "ublk_dr_target_latest_point_age_seconds{volume=\"vol0\"} 3",
            "ublk_dr_target_segments_waiting{volume=\"vol0\"} 2",
            "ublk_dr_target_store_reachable{volume=\"vol0\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
        assert!(
            text.lines()
                .any(|l| l == "ublk_dr_target_health{volume=\"vol1\"} 2"),
            "{text}"
        );
        assert_eq!(text.matches("vol1").count(), 2, "{text}");
    }
}
