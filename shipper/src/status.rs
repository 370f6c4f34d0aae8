//! The status a running shipper publishes for `shipper status` and monitoring.
//!
//! The file is JSON, replaced atomically (write + rename) a few times a second.
//! RPO here is the window of writes that would be lost if the source died now: the age
//! of the oldest captured write not yet in the target store, 0 when everything is.

use crate::error::{Result, ShipperError};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, Instant};

pub use changelog::alert::Health;

/// A dropped staged backlog (see [`crate::backlog`]): the event, kept in the status
/// and in `resync.owed` until the resync after it has completed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BacklogDrop {
    pub at_unix_ms: u64,
    /// Staged segments deleted, and their bytes.
    pub segments: u64,
    pub bytes: u64,
    /// The limit that was exceeded, in percent of `device_bytes`.
    pub limit_percent: u32,
    pub device_bytes: u64,
    /// The chain went on at this index, in this new protection epoch.
    pub continue_index: u64,
    pub epoch: u64,
    /// When the oldest dropped record was read: the RPO counts from it until a new
    /// recovery point is in the store.
    pub oldest_lost_unix_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub volume: String,
    pub pid: u32,
    pub updated_unix_ms: u64,
    /// Set for errors that need an operator; the volume stops shipping.
    pub critical: Option<String>,
    /// The ring overflowed: regions are in the dirty bitmap and need a resync (I7).
    pub ring_overflow: bool,
    /// The producer is re-recording regions lost to an overflow (I7).
    #[serde(default)]
    pub ring_resync: bool,
    /// A digest resync (initial replication, or asked for) and how far it is.
    #[serde(default)]
    pub resync: Option<blkfilter::ring::ResyncProgress>,
    pub ring_used_bytes: u64,
    pub ring_capacity_bytes: u64,
    pub newest_staged_index: Option<u64>,
    pub newest_uploaded_index: Option<u64>,
    /// The newest recovery point in the store: every record with seq below it.
    pub newest_uploaded_seq_end: Option<u64>,
    pub segments_pending_upload: u64,
    /// Bytes of the segments staged and not yet uploaded.
    #[serde(default)]
    pub staged_backlog_bytes: u64,
    /// Above this the staged backlog is dropped for a resync (0 = never).
    #[serde(default)]
    pub backlog_limit_bytes: u64,
    /// The last time the staged backlog was dropped.
    #[serde(default)]
    pub backlog_dropped: Option<BacklogDrop>,
    /// The whole-disk resync after that drop has not completed yet (I7).
    #[serde(default)]
    pub backlog_resync: bool,
    pub rpo_ms: u64,
    pub rpo_threshold_ms: u64,
    /// The shipping threads run in the background (SCHED_IDLE, `cpu_priority = yield`
    /// while shipping keeps up).
    #[serde(default)]
    pub background: bool,
    pub records_captured: u64,
    /// Record bytes read from the ring, and the segment bytes they were sealed to,
    /// since the shipper started.
    pub bytes_plain: u64,
    pub bytes_sealed: u64,
    /// Segment bytes the store has taken since the shipper started.
    #[serde(default)]
    pub bytes_uploaded: u64,
    /// Throughput over the last [`RATE_WINDOW`]: record bytes read from the ring per
    /// second (what the volume is being written at, as far as shipping keeps up), and
    /// segment bytes uploaded per second.
    #[serde(default)]
    pub capture_bytes_per_s: u64,
    #[serde(default)]
    pub upload_bytes_per_s: u64,
    /// Staging's file system is full: what happened and what to do. The stager waits
    /// for uploads to free space; the ring keeps the rest.
    #[serde(default)]
    pub staging_full: Option<String>,
    /// The upload limit now (`None`: unlimited) and the `[[throttle.window]]` that set
    /// it (`None`: the default limit).
    #[serde(default)]
    pub upload_limit_bytes_per_s: Option<u64>,
    #[serde(default)]
    pub upload_limit_window: Option<String>,
    /// How long this volume's uploads have waited for the limit since the shipper
    /// started.
    #[serde(default)]
    pub upload_throttled_ms: u64,
    /// The digest resync's exchange with the store keeps failing (the store is down,
    /// or a receiver refuses this host): the last error; `None` once it answers.
    #[serde(default)]
    pub resync_store_error: Option<String>,
    /// The id (hex) of the key new segments are sealed with: after `shipper key
    /// rotate`, shows whether this shipper has taken up the new key.
    #[serde(default)]
    pub sealing_key_id: String,
    /// When the last heartbeat went to the store (source clock): everything captured
    /// by then was in the store ([`changelog::heartbeat`]).
    #[serde(default)]
    pub heartbeat_unix_ms: Option<u64>,
    /// When the upload under way began (source clock, ms since the Unix epoch); `None`
    /// between uploads. One that lasts the whole RPO threshold is named in the state.
    #[serde(default)]
    pub upload_started_unix_ms: Option<u64>,
    /// The upload retry in progress (0 = none) and the error that caused it.
    pub retry_attempt: u32,
    pub last_error: Option<String>,
}

impl Status {
    pub fn health(&self) -> Health {
        if self.critical.is_some() {
            Health::Critical
        } else if self.ring_overflow
            || self.ring_resync
            || self.backlog_resync
            || self.resync.is_some()
            || self.retry_attempt > 0
            || self.staging_full.is_some()
            || self.rpo_ms > self.rpo_threshold_ms
        {
            Health::Warning
        } else {
            Health::Healthy
        }
    }

    /// How long the upload under way has lasted, once that is the whole RPO threshold
    /// (as of the status's time).
    pub fn upload_stalled_ms(&self) -> Option<u64> {
        self.upload_started_unix_ms
            .map(|t| self.updated_unix_ms.saturating_sub(t))
            .filter(|&ms| ms >= self.rpo_threshold_ms)
    }

    /// One line saying what the volume is doing and why.
    pub fn state(&self) -> String {
        let resync_phase = |r: &blkfilter::ring::ResyncProgress| {
            if r.requested {
                "starting".to_string()
            } else if !r.digests_ready {
                "waiting for the replica's block digests".to_string()
            } else {
                format!(
                    "{:.1}% compared, {} MiB differed and re-sent",
                    r.done_bytes as f64 * 100.0 / r.total_bytes.max(1) as f64,
                    r.sent_bytes >> 20
                )
            }
        };
        if let Some(what) = &self.critical {
            format!("stopped shipping: {what}")
        } else if let Some(d) = self
            .backlog_dropped
            .as_ref()
            .filter(|_| self.backlog_resync)
        {
            let what = self.resync.as_ref().map_or(
                "compared, shipping the last re-sent blocks".to_string(),
                resync_phase,
            );
            format!(
                "degraded: staged backlog exceeded {}% of the disk; dropped {} segments ({} MiB), resyncing by digest: {what}; no new recovery points until it completes",
                d.limit_percent,
                d.segments,
                d.bytes >> 20
            )
        } else if let Some(what) = &self.staging_full {
            let overflow = if self.ring_overflow {
                "; the ring overflowed meanwhile (changed regions are in the dirty bitmap)"
            } else {
                ""
            };
            format!("waiting for staging space: {what}{overflow}")
        } else if let Some(r) = &self.resync {
            let why = if r.restricted {
                "of the regions an overflow or unclean stop left in doubt"
            } else {
                "(initial replication or on demand)"
            };
            let trouble = self
                .resync_store_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (the store fails: {e})"));
            format!(
                "degraded: digest resync {why}: {}{trouble}; no new recovery points until it completes",
                resync_phase(r)
            )
        } else if self.ring_overflow {
            "degraded: ring overflowed, changed regions are tracked in the dirty bitmap and are resynced once the ring has room; no new recovery points until then".into()
        } else if self.ring_resync {
            "degraded: resyncing regions lost to a ring overflow; no new recovery points until it completes".into()
        } else if self.retry_attempt > 0 {
            format!(
                "retrying upload (attempt {}): {}",
                self.retry_attempt,
                self.last_error.as_deref().unwrap_or("?")
            )
        } else if let Some(ms) = self.upload_stalled_ms() {
            format!(
                "an upload has been under way for {}: the store is slow or does not answer",
                changelog::short_duration(ms)
            )
        } else if self.rpo_ms > self.rpo_threshold_ms {
            format!(
                "RPO {} ms exceeds the threshold of {} ms",
                self.rpo_ms, self.rpo_threshold_ms
            )
        } else {
            "replicating".into()
        }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self).expect("status serializes");
        json.push(b'\n');
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| ShipperError::io(format!("writing status file {}", path.display()), e))
    }

    pub fn read(path: &Path) -> Result<Status> {
        let bytes = std::fs::read(path).map_err(|e| {
            ShipperError::io(
                format!(
                    "reading status file {} (is the shipper running with --status there?)",
                    path.display()
                ),
                e,
            )
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ShipperError::State {
            path: path.into(),
            what: e.to_string(),
        })
    }
}

/// The window the status's throughput figures are averaged over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The rate of a growing counter over the last `window`, from samples of its total.
#[derive(Debug)]
pub struct RecentRate {
    window: Duration,
    /// (when, total then), oldest first; the oldest is at least `window` old once the
    /// counter has been sampled that long, so the rate spans the whole window.
    samples: VecDeque<(Instant, u64)>,
}

impl RecentRate {
    /// The rate of a counter that was 0 at `started`. Starting from a known zero (not
    /// from the first sample) counts what grew before the first sample: a shipper
    /// that drains a full ring at once shows that as throughput.
    pub fn from_zero(window: Duration, started: Instant) -> RecentRate {
        RecentRate {
            window,
            samples: VecDeque::from([(started, 0)]),
        }
    }

    /// Records the counter's `total` at `now` and returns its rate per second since
    /// the oldest sample within the window.
    pub fn sample(&mut self, now: Instant, total: u64) -> u64 {
        self.samples.push_back((now, total));
        // Keep one sample at or before the window's start as the base.
        while self
            .samples
            .get(1)
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= self.window)
        {
            self.samples.pop_front();
        }
        let (since, base) = self.samples[0];
        let span = now.saturating_duration_since(since).as_secs_f64();
        if span <= 0.0 {
            return 0;
        }
        (total.saturating_sub(base) as f64 / span) as u64
    }
}

/// "12.3 MB/s" (decimal megabytes, as disks and links are sold).
pub fn megabytes_per_s(bytes_per_s: u64) -> String {
    format!("{:.1} MB/s", bytes_per_s as f64 / 1e6)
}

/// A status file not updated for longer than this belongs to a shipper that stopped.
const STALE_MS: u64 = 10_000;

/// The rows of `shipper status --check` ([`changelog::check`]): a volume without a
/// readable status, or whose status was not updated for [`STALE_MS`] (its shipper
/// stopped or hangs), is Critical: nothing ships it.
pub fn check_rows(
    rows: &[(String, std::result::Result<Status, String>)],
    now_unix_ms: u64,
) -> Vec<changelog::check::CheckRow> {
    rows.iter()
        .map(|(name, status)| match status {
            Ok(s) => {
                let age = now_unix_ms.saturating_sub(s.updated_unix_ms);
                let stale = age > STALE_MS && s.critical.is_none();
                changelog::check::CheckRow {
                    volume: name.clone(),
                    health: if stale { Health::Critical } else { s.health() },
                    // Stale: what it was, and at least as much older since.
                    rpo_ms: Some(if stale { s.rpo_ms + age } else { s.rpo_ms }),
                    rpo_threshold_ms: s.rpo_threshold_ms,
                    state: if stale {
                        stale_state(age, s)
                    } else {
                        s.state()
                    },
                }
            }
            Err(e) => changelog::check::CheckRow {
                volume: name.clone(),
                health: Health::Critical,
                rpo_ms: None,
                rpo_threshold_ms: 0,
                state: format!("no readable status: {e}"),
            },
        })
        .collect()
}

fn stale_state(age_ms: u64, status: &Status) -> String {
    format!(
        "not updated for {} (shipper stopped?); was: {}",
        changelog::short_duration(age_ms),
        status.state()
    )
}

/// `text` cut to at most `max` characters, ending with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// `shipper status` as a table: one row per volume (its name, and its status or why
/// there is none), fitted to `width` columns by truncating the STATE column.
pub fn table(
    rows: &[(String, std::result::Result<Status, String>)],
    now_unix_ms: u64,
    width: usize,
) -> String {
    const HEADER: [&str; 8] = [
        "VOLUME",
        "HEALTH",
        "RPO",
        "RING",
        "PENDING",
        "RESYNC",
        "IN/OUT MB/s",
        "STATE",
    ];
    const STATE: usize = HEADER.len() - 1;
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|(name, status)| match status {
            Ok(s) => {
                let ring = (s.ring_used_bytes * 100)
                    .checked_div(s.ring_capacity_bytes)
                    .map_or("-".to_string(), |pct| {
                        format!("{pct}%{}", if s.ring_overflow { " ovf" } else { "" })
                    });
                let resync = s.resync.as_ref().map_or("-".to_string(), |r| {
                    let done = if r.active && r.digests_ready {
                        r.done_bytes
                    } else {
                        0
                    };
                    format!("{}%", done * 100 / r.total_bytes.max(1))
                });
                let age = now_unix_ms.saturating_sub(s.updated_unix_ms);
                let state = if age > STALE_MS && s.critical.is_none() {
                    stale_state(age, s)
                } else {
                    s.state()
                };
                [
                    s.volume.clone(),
                    format!("{:?}", s.health()),
                    changelog::short_duration(s.rpo_ms),
                    ring,
                    s.segments_pending_upload.to_string(),
                    resync,
                    format!(
                        "{:.1}/{:.1}",
                        s.capture_bytes_per_s as f64 / 1e6,
                        s.upload_bytes_per_s as f64 / 1e6
                    ),
                    state,
                ]
            }
            Err(e) => [
                name.clone(),
                "?".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("no status: {e}"),
            ],
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row).take(STATE) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let fixed: usize = widths[..STATE].iter().map(|w| w + 2).sum();
    let state_width = width.saturating_sub(fixed).max(24);
    let mut out = String::new();
    let header = HEADER.map(String::from);
    for row in std::iter::once(&header).chain(&cells) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(STATE) {
            // Names left, numbers right.
            let cell = if (2..STATE).contains(&i) {
                format!("{cell:>w$}  ", w = widths[i])
            } else {
                format!("{cell:<w$}  ", w = widths[i])
            };
            line.push_str(&cell);
        }
        line.push_str(&truncate(&row[STATE], state_width));
        out.push_str(line.trim_end());
        out.push('\n');
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

/// `shipper status --prometheus`: every volume's status in the Prometheus text format
/// (for node_exporter's textfile collector, or any scraper of a file), one family per
/// figure, labelled by volume. A volume without a readable status has only
/// `ublk_dr_up 0`.
pub fn prometheus(
    rows: &[(String, std::result::Result<Status, String>)],
    now_unix_ms: u64,
) -> String {
    type Figure = fn(&Status, u64) -> f64;
    let families: [(&str, &str, &str, Figure); 19] = [
        (
            "health",
            "gauge",
            "0 Healthy, 1 Warning, 2 Critical",
            |s, _| s.health().gauge(),
        ),
        (
            "rpo_seconds",
            "gauge",
            "age of the oldest captured write not yet in the store",
            |s, _| s.rpo_ms as f64 / 1e3,
        ),
        (
            "rpo_threshold_seconds",
            "gauge",
            "RPO above which health is Warning",
            |s, _| s.rpo_threshold_ms as f64 / 1e3,
        ),
        (
            "status_age_seconds",
            "gauge",
            "time since the shipper last wrote its status",
            |s, now| now.saturating_sub(s.updated_unix_ms) as f64 / 1e3,
        ),
        (
            "upload_in_flight_seconds",
            "gauge",
            "how long the upload under way has lasted (0 between uploads)",
            |s, _| {
                s.upload_started_unix_ms
                    .map_or(0.0, |t| s.updated_unix_ms.saturating_sub(t) as f64 / 1e3)
            },
        ),
        (
            "ring_used_bytes",
            "gauge",
            "capture ring bytes not yet staged",
            |s, _| s.ring_used_bytes as f64,
        ),
        (
            "ring_capacity_bytes",
            "gauge",
            "capture ring size",
            |s, _| s.ring_capacity_bytes as f64,
        ),
        (
            "ring_overflowed",
            "gauge",
            "1 while changed regions are in the dirty bitmap",
            |s, _| flag(s.ring_overflow),
        ),
        (
            "resyncing",
            "gauge",
            "1 while a resync runs (no new recovery points)",
            |s, _| flag(s.resync.is_some() || s.ring_resync || s.backlog_resync),
        ),
        (
            "segments_pending",
            "gauge",
            "segments staged and not yet uploaded",
            |s, _| s.segments_pending_upload as f64,
        ),
        (
            "staged_backlog_bytes",
            "gauge",
            "bytes staged and not yet uploaded",
            |s, _| s.staged_backlog_bytes as f64,
        ),
        (
            "capture_bytes_per_second",
            "gauge",
            "record bytes read from the ring, last 10 s",
            |s, _| s.capture_bytes_per_s as f64,
        ),
        (
            "upload_bytes_per_second",
            "gauge",
            "segment bytes uploaded, last 10 s",
            |s, _| s.upload_bytes_per_s as f64,
        ),
        (
            "captured_bytes_total",
            "counter",
            "record bytes read from the ring since start",
            |s, _| s.bytes_plain as f64,
        ),
        (
            "sealed_bytes_total",
            "counter",
            "segment bytes sealed since start",
            |s, _| s.bytes_sealed as f64,
        ),
        (
            "uploaded_bytes_total",
            "counter",
            "segment bytes the store took since start",
            |s, _| s.bytes_uploaded as f64,
        ),
        (
            "upload_retry_attempt",
            "gauge",
            "the upload retry in progress (0 = none)",
            |s, _| s.retry_attempt.into(),
        ),
        (
            "upload_throttled_seconds_total",
            "counter",
            "time uploads waited for the upload limit",
            |s, _| s.upload_throttled_ms as f64 / 1e3,
        ),
        (
            "staging_full",
            "gauge",
            "1 while staging's file system is full",
            |s, _| flag(s.staging_full.is_some()),
        ),
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ublk_dr_up 1 if the volume's status file was read"
    );
    let _ = writeln!(out, "# TYPE ublk_dr_up gauge");
    for (name, status) in rows {
        let _ = writeln!(
            out,
            "ublk_dr_up{{volume=\"{name}\"}} {}",
            status.is_ok() as u8
        );
    }
    for (family, kind, help, figure) in families {
        let _ = writeln!(out, "# HELP ublk_dr_{family} {help}");
        let _ = writeln!(out, "# TYPE ublk_dr_{family} {kind}");
        for (name, status) in rows {
            if let Ok(s) = status {
                let _ = writeln!(
                    out,
                    "ublk_dr_{family}{{volume=\"{name}\"}} {}",
                    figure(s, now_unix_ms)
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_calls_a_stopped_or_missing_shipper_critical() {
        let now = 1_000_000;
        let healthy = Status {
            volume: "vol0".into(),
            updated_unix_ms: now - 1_000,
            rpo_ms: 400,
            rpo_threshold_ms: 30_000,
            ..Default::default()
        };
        let behind = Status {
            rpo_ms: 45_000,
            ..healthy.clone()
        };
        let stale = Status {
            updated_unix_ms: now - STALE_MS - 1,
            ..healthy.clone()
        };
        let rows = vec![
            ("a".to_string(), Ok(healthy)),
            ("b".to_string(), Ok(behind)),
            ("c".to_string(), Ok(stale)),
            ("d".to_string(), Err("reading /x: No such file".to_string())),
        ];
        let checked = check_rows(&rows, now);
        let health: Vec<Health> = checked.iter().map(|r| r.health).collect();
        use Health::*;
        assert_eq!(health, [Healthy, Warning, Critical, Critical]);
        assert_eq!(checked[1].rpo_ms, Some(45_000));
        assert_eq!(checked[2].rpo_ms, Some(400 + STALE_MS + 1));
        assert!(checked[2]
            .state
            .starts_with("not updated for 10.0s (shipper stopped?)"));
        assert_eq!(
            checked[3].state,
            "no readable status: reading /x: No such file"
        );
        assert_eq!(checked[3].rpo_ms, None);
    }

    #[test]
    fn table_has_a_row_per_volume_and_fits() {
        let now = 1_000_000;
        let healthy = Status {
            volume: "vol0".into(),
            updated_unix_ms: now,
            rpo_ms: 400,
            rpo_threshold_ms: 30_000,
            ring_used_bytes: 1 << 20,
            ring_capacity_bytes: 4 << 20,
            segments_pending_upload: 3,
            capture_bytes_per_s: 12_345_678,
            upload_bytes_per_s: 6_100_000,
            ..Default::default()
        };
        let resyncing = Status {
            volume: "db-1".into(),
            rpo_ms: 245_000,
            resync: Some(blkfilter::ring::ResyncProgress {
                active: true,
                digests_ready: true,
                total_bytes: 1000,
                done_bytes: 425,
                ..Default::default()
            }),
            ..healthy.clone()
        };
        let stale = Status {
            volume: "old".into(),
            updated_unix_ms: now - 60_000,
            ..healthy.clone()
        };
        let rows = vec![
            ("vol0".to_string(), Ok(healthy)),
            ("db-1".to_string(), Ok(resyncing)),
            ("old".to_string(), Ok(stale)),
            (
                "gone".to_string(),
                Err("reading status file /x: No such file".to_string()),
            ),
        ];
        let text = table(&rows, now, 100);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        for (line, words) in lines.iter().zip([
            &[
                "VOLUME",
                "HEALTH",
                "RPO",
                "RING",
                "PENDING",
                "RESYNC",
                "IN/OUT MB/s",
                "STATE",
            ][..],
            &[
                "vol0",
                "Healthy",
                "0.4s",
                "25%",
                "3",
                "-",
                "12.3/6.1",
                "replicating",
            ],
            &[
                "db-1",
                "Warning",
                "4m05s",
                "25%",
                "3",
                "42%",
                "degraded: digest resync",
            ],
            &["old", "Healthy", "not updated for 1m00s"],
            &["gone", "?", "no status: reading status file"],
        ]) {
            for word in words {
                assert!(line.contains(word), "{word:?} not in {line:?}");
            }
            assert!(line.chars().count() <= 100, "{line:?} is wider than 100");
        }
        assert!(
            lines[2].ends_with('…'),
            "a long state is cut: {:?}",
            lines[2]
        );
        // Columns line up: every row's RPO ends where the header's does.
        let rpo_end = lines[0].find("RPO").unwrap() + 3;
        for line in &lines[1..3] {
            assert_eq!(&line[rpo_end..rpo_end + 2], "  ", "{line:?}");
        }
    }

    #[test]
    fn a_recent_rate_spans_its_window_and_forgets_what_is_older() {
        let t0 = Instant::now();
        let mut rate = RecentRate::from_zero(Duration::from_secs(10), t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        // 1 MB/s for 20 s.
        for s in 1..=20 {
            assert_eq!(rate.sample(at(s), s * 1_000_000), 1_000_000, "at {s} s");
        }
        // Then 3 MB/s: the rate is the last 10 s's, whatever came before.
        for s in 21..=30 {
            let total = 20_000_000 + (s - 20) * 3_000_000;
            let ten_seconds_ago = (s - 10) * 1_000_000;
            assert_eq!(
                rate.sample(at(s), total),
                (total - ten_seconds_ago) / 10,
                "at {s} s"
            );
        }
        assert_eq!(rate.sample(at(31), 20_000_000 + 33_000_000), 3_000_000);
        // Idle: the rate falls to 0 once the window holds no growth.
        let idle = 20_000_000 + 33_000_000;
        assert_eq!(rate.sample(at(41), idle), 0);
        assert!(rate.samples.len() <= 3, "{:?}", rate.samples);
    }

    #[test]
    fn a_recent_rate_counts_what_grew_before_its_first_sample() {
        let t0 = Instant::now();
        let mut rate = RecentRate::from_zero(Duration::from_secs(10), t0);
        // A full ring drained before the first status write: 8 MB in the first 2 s.
        assert_eq!(
            rate.sample(t0 + Duration::from_secs(2), 8_000_000),
            4_000_000
        );
        assert_eq!(
            rate.sample(t0 + Duration::from_secs(4), 8_000_000),
            2_000_000
        );
    }

    #[test]
    fn prometheus_has_a_line_per_volume_and_figure() {
        let s = Status {
            volume: "vol0".into(),
            updated_unix_ms: 10_000,
            rpo_ms: 1500,
            rpo_threshold_ms: 1000,
            bytes_uploaded: 4096,
            segments_pending_upload: 2,
            upload_started_unix_ms: Some(7_000),
            ..Default::default()
        };
        let rows = vec![
            ("vol0".to_string(), Ok(s)),
            ("gone".to_string(), Err("no status file".to_string())),
        ];
        let text = prometheus(&rows, 12_500);
        for line in [
            "ublk_dr_up{volume=\"vol0\"} 1",
            "ublk_dr_up{volume=\"gone\"} 0",
            "ublk_dr_health{volume=\"vol0\"} 1",
            "ublk_dr_rpo_seconds{volume=\"vol0\"} 1.5",
            "ublk_dr_status_age_seconds{volume=\"vol0\"} 2.5",
            "ublk_dr_upload_in_flight_seconds{volume=\"vol0\"} 3",
            "ublk_dr_segments_pending{volume=\"vol0\"} 2",
            "ublk_dr_uploaded_bytes_total{volume=\"vol0\"} 4096",
            "# TYPE ublk_dr_uploaded_bytes_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
        assert!(
            !text.contains("volume=\"gone\"} 0\nublk_dr_health"),
            "{text}"
        );
        assert_eq!(text.matches("volume=\"gone\"").count(), 1, "{text}");
        // Every sample line is NAME{LABELS} VALUE with a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn health_follows_state() {
        let mut s = Status {
            rpo_threshold_ms: 1000,
            ..Default::default()
        };
        assert_eq!(s.health(), Health::Healthy);
        s.rpo_ms = 2000;
        assert_eq!(s.health(), Health::Warning);
        s.rpo_ms = 0;
        s.ring_overflow = true;
        assert_eq!(s.health(), Health::Warning);
        assert!(s.state().contains("degraded"));
        s.ring_overflow = false;
        s.staging_full = Some("staging is full".into());
        assert_eq!(s.health(), Health::Warning);
        assert!(s
            .state()
            .starts_with("waiting for staging space: staging is full"));
        s.staging_full = None;
        s.backlog_dropped = Some(BacklogDrop {
            segments: 12,
            bytes: 3 << 20,
            limit_percent: 50,
            ..Default::default()
        });
        assert_eq!(s.health(), Health::Healthy, "an old drop is history");
        s.backlog_resync = true;
        assert_eq!(s.health(), Health::Warning);
        assert!(
            s.state().starts_with(
                "degraded: staged backlog exceeded 50% of the disk; dropped 12 segments (3 MiB), resyncing by digest"
            ),
            "{}",
            s.state()
        );
        s.critical = Some("broken chain".into());
        assert_eq!(s.health(), Health::Critical);
        let dir = tempfile::tempdir().unwrap();
        s.write(&dir.path().join("s.json")).unwrap();
        assert_eq!(Status::read(&dir.path().join("s.json")).unwrap(), s);
    }
}
