//! The status a running shipper publishes for `shipper status` and monitoring.
//!
//! The file is JSON, replaced atomically (write + rename) a few times a second.
//! RPO here is the window of writes that would be lost if the source died now: the age
//! of the oldest captured write not yet in the target store, 0 when everything is.

use crate::error::{Result, ShipperError};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Healthy,
    Warning,
    Critical,
}

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
    pub records_captured: u64,
    pub bytes_plain: u64,
    pub bytes_sealed: u64,
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
            || self.rpo_ms > self.rpo_threshold_ms
        {
            Health::Warning
        } else {
            Health::Healthy
        }
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
        } else if let Some(r) = &self.resync {
            format!("degraded: digest resync (initial replication or on demand): {}; no new recovery points until it completes", resync_phase(r))
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

#[cfg(test)]
mod tests {
    use super::*;

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
