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
//! when there is no recovery point yet, when the store cannot be reached, when undo
//! journals are damaged, or when `keep_size` keeps the recovery points from reaching
//! as far back as `keep_age` asks (the journals are full: a burst of writes pushed the
//! oldest points out), or when the journal's file system is over nine tenths full and
//! the journals may grow past what is left (applying stops when it is full); Healthy
//! otherwise, and for a volume failed over here once its rollback is complete (it is
//! the primary now; nothing replicates into it; halfway, it is a Warning).

use crate::apply::Applied;
use crate::error::Result;
use crate::journal::Journal;
use crate::points::Retention;
use crate::state::{ApplyState, ReplicaPaths};
use crate::status::VolumeStatus;
use changelog::alert::{Alerts, Health};
use changelog::heartbeat::Heartbeat;
use changelog::{Key, TargetStore, VolumeId};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
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

/// `apply --follow`'s view of one volume's health, with an alert on each change
/// ([`changelog::alert`]). The applying thread feeds it: after each round
/// ([`FollowHealth::observe`], which also reads the shipper's heartbeat) and after
/// each segment ([`FollowHealth::applied`]). While a round lasts, a watchdog thread
/// judges it every second besides, so the RPO is seen to grow (and the alert raised)
/// also in a round that hangs in a store call or on a replica that does not answer:
/// the watchdog does no I/O itself.
pub struct FollowHealth {
    shared: Arc<Mutex<Judge>>,
    /// Read on the applying thread only (it may block).
    heartbeat: HeartbeatWatch,
    /// The replica's journal, whose file system's space is read on the applying thread.
    journal: Journal,
    /// Dropping the sender stops the watchdog.
    watchdog: Option<(Sender<()>, JoinHandle<()>)>,
}

/// What is judged, shared by the applying thread and the watchdog.
struct Judge {
    volume: VolumeId,
    threshold: Duration,
    /// What is known of the replica: its newest point, last applied segment and, when
    /// that is the point, its chain position (`VolumeStatus::at_point`).
    row: VolumeStatus,
    /// The newest heartbeat read (it counts only where it vouches for `row.at_point`).
    heartbeat: Option<Heartbeat>,
    /// How often the heartbeat is read, for the warning about its interval.
    heartbeat_every: Duration,
    judged_at: Instant,
    /// The applying thread has said something of the replica in this run (a segment
    /// applied, a round ended): until then the watchdog judges only a stall, as what
    /// it knows (the catalog, no heartbeat read yet) would make a current replica of
    /// a quiet volume look stale.
    fed: bool,
    /// The RPO last judged, for the alert when applying stops.
    rpo_ms: u64,
    /// The applying thread is in a round (not waiting for the next one), and its last
    /// step forward: a segment applied or a round ended.
    in_round: bool,
    progress_at: Instant,
    /// A stall was logged (until progress is made again).
    warned_stall: bool,
    /// A shipper heartbeat interval too close to the threshold was warned about.
    warned_interval: bool,
    alerts: Alerts,
}

impl FollowHealth {
    /// Starts from the replica's catalog at `paths` (its newest point before this run),
    /// and the watchdog.
    pub fn new(
        volume: VolumeId,
        paths: &ReplicaPaths,
        retention: &Retention,
        threshold: Duration,
        alerts: Alerts,
    ) -> FollowHealth {
        let catalog = crate::catalog(paths).unwrap_or_default();
        let mut row = VolumeStatus::new(volume.to_string(), &catalog, Ok(Vec::new()), false)
            .with_retention(retention);
        // What the store holds is not listed here.
        row.waiting = None;
        // A heartbeat read late adds to the RPO judged: a tenth of the threshold at
        // most, and an object store is asked seldom.
        let heartbeat_every = (threshold / 10).max(Duration::from_millis(200));
        let shared = Arc::new(Mutex::new(Judge {
            volume: volume.clone(),
            threshold,
            row,
            heartbeat: None,
            heartbeat_every,
            judged_at: Instant::now(),
            fed: false,
            rpo_ms: 0,
            in_round: false,
            progress_at: Instant::now(),
            warned_stall: false,
            warned_interval: false,
            alerts,
        }));
        let (stop, stopped) = channel::<()>();
        let watched = shared.clone();
        let watchdog = std::thread::Builder::new()
            .name(format!("health-{volume}"))
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(WATCH_EVERY) {
                    let mut judge = watched.lock().expect("health lock");
                    // Between rounds the applying thread judges itself, after
                    // reading the heartbeat: judged here, a quiet volume's RPO would
                    // grow by the poll interval.
                    let due = judge.in_round && (judge.fed || judge.stalled().is_some());
                    if due && judge.judged_at.elapsed() >= WATCH_EVERY {
                        judge.judge();
                    }
                }
            })
            .expect("spawning the health watchdog");
        FollowHealth {
            shared,
            heartbeat: HeartbeatWatch {
                every: heartbeat_every,
                beat: None,
                read_at: None,
                trouble: None,
            },
            journal: Journal::new(&paths.journal),
            watchdog: Some((stop, watchdog)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Judge> {
        self.shared.lock().expect("health lock")
    }

    /// A round of applying begins.
    pub fn round_begins(&self) {
        let mut judge = self.lock();
        if !judge.in_round {
            judge.in_round = true;
            judge.progress_at = Instant::now();
        }
    }

    /// After a round: the replica's state (`None` while no applier is open) and the
    /// error applying is retrying, if it is. Reads the shipper's heartbeat (when it
    /// can count), then judges.
    pub fn observe(
        &mut self,
        store: &dyn TargetStore,
        key: &Key,
        state: Option<&ApplyState>,
        trouble: Option<String>,
    ) {
        let (volume, at_point) = {
            let mut judge = self.lock();
            judge.row.apply_error = trouble;
            if let Some(state) = state {
                judge.row.latest_applied = state.latest();
                match state.last.filter(|last| last.is_crash_point()) {
                    Some(last) => {
                        judge.row.latest_point = Some(last.index);
                        judge.row.latest_created_unix_ms = Some(last.created_unix_ms);
                        judge.row.at_point = Some(state.cursor.clone());
                    }
                    // Past the newest point: a resync being applied.
                    None if state.latest().is_some() => judge.row.at_point = None,
                    None => {}
                }
            }
            (judge.volume.clone(), judge.row.at_point.is_some())
        };
        // Only a replica at a point can be vouched for: no read otherwise. The read may
        // hang (a store that does not answer): outside the lock, while the watchdog
        // judges.
        let heartbeat = if at_point {
            self.heartbeat.get(store, &volume, key)
        } else {
            None
        };
        let journal_fs = self.journal.fs_space();
        let mut judge = self.lock();
        judge.heartbeat = heartbeat;
        judge.row.journal_fs = journal_fs;
        judge.in_round = false;
        judge.progress(Instant::now());
        judge.judge();
    }

    /// Within a round: a segment was applied (the watchdog judges meanwhile).
    pub fn applied(&self, applied: &Applied) {
        let header = &applied.header;
        let mut judge = self.lock();
        if let Some(pruned) = &applied.pruned {
            judge.row.points = pruned.points_left;
            judge.row.oldest_created_unix_ms = pruned.oldest_left_unix_ms;
            judge.row.journal_bytes = pruned.journal_bytes;
        }
        judge.row.latest_applied = Some(header.index);
        // Its chain position is known only at the round's end: no heartbeat counts.
        judge.row.at_point = None;
        judge.row.apply_error = None;
        if header.flags & changelog::flags::CRASH_POINT != 0 {
            judge.row.latest_point = Some(header.index);
            judge.row.latest_created_unix_ms = Some(header.created_unix_ms);
        }
        judge.progress(Instant::now());
    }

    /// Applying stopped on an error that needs an operator: Critical, at once.
    pub fn stopped(&mut self, why: &str) {
        let mut judge = self.lock();
        let (volume, rpo_ms) = (judge.row.volume.clone(), judge.rpo_ms);
        judge.alerts.observe(&volume, Health::Critical, rpo_ms, || {
            format!("stopped applying: {why}")
        });
    }
}

impl Drop for FollowHealth {
    fn drop(&mut self) {
        if let Some((stop, watchdog)) = self.watchdog.take() {
            drop(stop);
            let _ = watchdog.join();
        }
    }
}

/// How often the watchdog judges a volume.
const WATCH_EVERY: Duration = Duration::from_secs(1);

impl Judge {
    /// How long the round under way has gone without a step forward, once that is
    /// the whole threshold: worth naming, as the RPO is over the threshold by then
    /// and this says why.
    fn stalled(&self) -> Option<Duration> {
        let stalled = self.progress_at.elapsed();
        (self.in_round && stalled >= self.threshold).then_some(stalled)
    }

    fn progress(&mut self, now: Instant) {
        self.progress_at = now;
        self.fed = true;
        if std::mem::take(&mut self.warned_stall) {
            log::info!("volume {}: applying makes progress again", self.volume);
        }
    }

    fn judge(&mut self) {
        self.judged_at = Instant::now();
        if let Some(beat) = &self.heartbeat {
            let room = Duration::from_millis(beat.interval_ms) + self.heartbeat_every;
            if room >= self.threshold && !std::mem::replace(&mut self.warned_interval, true) {
                log::warn!(
                    "volume {}: the shipper writes its heartbeat every {} ms, and this \
                     side reads it every {} ms: with rpo_threshold_ms {} a quiet volume will \
                     look stale now and then; raise rpo_threshold_ms well above {} ms",
                    self.volume,
                    beat.interval_ms,
                    self.heartbeat_every.as_millis(),
                    self.threshold.as_millis(),
                    room.as_millis()
                );
            }
        }
        self.row.stalled_ms = self.stalled().map(|t| t.as_millis() as u64);
        if let Some(ms) = self.row.stalled_ms {
            if !std::mem::replace(&mut self.warned_stall, true) {
                log::warn!(
                    "volume {}: applying has made no progress for {}: a store call or the \
                     replica is slow or does not answer",
                    self.volume,
                    changelog::short_duration(ms)
                );
            }
        }
        let row = self.row.clone().judged(
            self.heartbeat.as_ref(),
            self.threshold,
            changelog::unix_ms_now(),
        );
        self.rpo_ms = row.rpo_ms.unwrap_or(0);
        let health = row.health.expect("judged");
        self.alerts
            .observe(&row.volume, health, self.rpo_ms, || row.state());
    }
}
