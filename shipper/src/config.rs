//! The shipper's configuration file (TOML): shared settings and one `[[volume]]` table
//! per protected volume. Unknown keys are errors, so a typo never silently falls back
//! to a default.
//!
//! ```toml
//! key = "/etc/ublk-dr/key"               # required: the key file (shipper keygen;
//!                                        # shipper key rotate adds a new key)
//! staging = "/var/lib/ublk-dr/staging"   # required: local staging directory
//! store = "/srv/dr-store"                # required: target store: a directory, or
//!                                        # az://CONTAINER/PREFIX, s3://BUCKET/PREFIX
//!                                        # or tcp:// or tls://HOST:PORT (a receiver)
//! status_dir = "/run/ublk-dr"            # status files: <status_dir>/<volume>.status.json
//! max_segment_age_ms = 1000
//! max_segment_bytes = 8388608
//! sealers = 2
//! retry_unit_ms = 60000                  # retry after 1, 2, 4, 8, 10, then every 30 units
//! rpo_threshold_ms = 30000               # health is Warning above this RPO
//! initial_sync = true                    # a new protection starts with a digest resync
//! resync_block_kib = 64                  # digest block: a power of two, 4..=1024 KiB
//! backlog_resync_percent = 50            # staged backlog above this % of the disk is
//!                                        # dropped for a whole-disk resync (0 = never)
//! cpu_priority = "yield"                 # or "normal": see shipper::priority
//! alert_command = "/usr/local/bin/page"  # run on each health change of a volume (sh -c,
//!                                        # UBLK_DR_VOLUME, UBLK_DR_HEALTH, ...: see
//!                                        # changelog::alert); default: logged only
//! alert_hold_ms = 10000                  # a new health must hold this long (Critical:
//!                                        # reported at once)
//! heartbeat_ms = 10000                   # while caught up, tell the recovery side so
//!                                        # this often (a quiet volume's RPO there)
//!
//! [throttle]                             # optional: one upload limit for every volume
//! limit = "200Mbit/s"                    # outside the windows (default: unlimited)
//! [[throttle.window]]                    # the first window holding the local time wins
//! days = "mon-fri"                       # default: every day
//! hours = "08:00-18:00"                  # may cross midnight: "22:00-06:00"
//! limit = "50Mbit/s"                     # see shipper::throttle; SIGHUP re-reads [throttle];
//!                                        # shared through <status_dir>/throttle.clock
//!
//! [[volume]]
//! id = "vol0"
//! ring = "/dev/shm/ublk-dr/vol0.ring"
//!
//! [[group]]                              # optional: a consistency group, its volumes
//! clock = "/dev/shm/ublk-dr/db.clock"    # attached with this --group-clock; cut this
//! volumes = ["vol0", "vol1"]             # often (see group_cuts) by the shipper that
//! cut_every_ms = 5000                    # ships the first of them
//! ```

use crate::error::{Result, ShipperError};
use crate::pipeline::ShipperConfig;
use crate::priority::CpuPriority;
use crate::throttle::{Policy, ThrottleConfig};
use changelog::{Key, VolumeId};
use objstore::StoreLocation;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/etc/ublk-dr/shipper.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub key: PathBuf,
    pub staging: PathBuf,
    pub store: StoreLocation,
    #[serde(default = "default_status_dir")]
    pub status_dir: PathBuf,
    #[serde(default = "default_age")]
    pub max_segment_age_ms: u64,
    #[serde(default = "default_bytes")]
    pub max_segment_bytes: usize,
    #[serde(default = "default_sealers")]
    pub sealers: usize,
    #[serde(default = "default_retry_unit")]
    pub retry_unit_ms: u64,
    #[serde(default = "default_rpo")]
    pub rpo_threshold_ms: u64,
    #[serde(default = "default_true")]
    pub initial_sync: bool,
    #[serde(default = "default_block_kib")]
    pub resync_block_kib: u32,
    #[serde(default = "default_backlog_percent")]
    pub backlog_resync_percent: u32,
    #[serde(default = "default_cpu_priority")]
    pub cpu_priority: CpuPriority,
    /// Run on each health change (see [`changelog::alert`]).
    #[serde(default)]
    pub alert_command: Option<String>,
    #[serde(default = "default_alert_hold")]
    pub alert_hold_ms: u64,
    /// How often a caught-up shipper writes its heartbeat to the store.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// The upload limit (see [`crate::throttle`]); unlimited when absent.
    #[serde(default)]
    pub throttle: ThrottleConfig,
    #[serde(rename = "volume")]
    pub volumes: Vec<VolumeEntry>,
    #[serde(rename = "group", default)]
    pub groups: Vec<GroupEntry>,
}

/// A consistency group to cut on a schedule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    pub clock: PathBuf,
    /// The group's volumes (ids of `[[volume]]` tables). The shipper that ships the
    /// first one cuts the group, so one-shipper-per-volume services cut it once.
    pub volumes: Vec<VolumeId>,
    #[serde(default = "default_cut_every")]
    pub cut_every_ms: u64,
}

fn default_cut_every() -> u64 {
    crate::group_cuts::DEFAULT_CUT_EVERY.as_millis() as u64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeEntry {
    pub id: VolumeId,
    pub ring: PathBuf,
}

fn default_heartbeat() -> u64 {
    crate::pipeline::DEFAULT_HEARTBEAT.as_millis() as u64
}
fn default_alert_hold() -> u64 {
    changelog::alert::DEFAULT_HOLD.as_millis() as u64
}
fn default_status_dir() -> PathBuf {
    "/run/ublk-dr".into()
}
fn default_age() -> u64 {
    1000
}
fn default_bytes() -> usize {
    8 << 20
}
fn default_sealers() -> usize {
    2
}
fn default_retry_unit() -> u64 {
    60_000
}
fn default_rpo() -> u64 {
    30_000
}
fn default_true() -> bool {
    true
}
fn default_block_kib() -> u32 {
    changelog::digests::DEFAULT_BLOCK_BYTES / 1024
}
fn default_cpu_priority() -> CpuPriority {
    CpuPriority::SERVICE_DEFAULT
}
fn default_backlog_percent() -> u32 {
    crate::backlog::DEFAULT_PERCENT
}

/// Checks a digest block size given in KiB; returns it in bytes.
pub fn resync_block_bytes(kib: u32) -> std::result::Result<u32, String> {
    if kib.is_power_of_two() && (4..=1024).contains(&kib) {
        Ok(kib * 1024)
    } else {
        Err(format!(
            "resync_block_kib must be a power of two from 4 to 1024, not {kib}"
        ))
    }
}

impl ConfigFile {
    /// Reads and checks a config file; every error names the file and what to fix.
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ShipperError::io(
                format!(
                    "reading config {} (see `shipper run --help` for its format)",
                    path.display()
                ),
                e,
            )
        })?;
        Self::parse(&text).map_err(|what| ShipperError::Config {
            path: path.into(),
            what,
        })
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> std::result::Result<ConfigFile, String> {
        let config: ConfigFile =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.volumes.is_empty() {
            return Err("no [[volume]] tables: add one per protected volume (id, ring)".into());
        }
        let mut seen = HashSet::new();
        for v in &self.volumes {
            if !seen.insert(&v.id) {
                return Err(format!("volume {} appears twice", v.id));
            }
        }
        let positive = [
            ("max_segment_age_ms", self.max_segment_age_ms),
            ("max_segment_bytes", self.max_segment_bytes as u64),
            ("sealers", self.sealers as u64),
            ("retry_unit_ms", self.retry_unit_ms),
            ("rpo_threshold_ms", self.rpo_threshold_ms),
            ("heartbeat_ms", self.heartbeat_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be greater than 0"));
        }
        for g in &self.groups {
            let clock = g.clock.display();
            if g.cut_every_ms == 0 {
                return Err(format!(
                    "[[group]] {clock}: cut_every_ms must be greater than 0"
                ));
            }
            if g.volumes.len() < 2 {
                return Err(format!(
                    "[[group]] {clock}: a consistency group needs at least two volumes"
                ));
            }
            if let Some(v) = g.volumes.iter().find(|v| !seen.contains(v)) {
                return Err(format!(
                    "[[group]] {clock}: volume {v} has no [[volume]] table"
                ));
            }
        }
        resync_block_bytes(self.resync_block_kib)?;
        crate::backlog::check_percent(self.backlog_resync_percent)?;
        self.throttle_policy()?;
        if self.max_segment_bytes > changelog::segment::MAX_PLAIN_LEN as usize / 2 {
            return Err(format!(
                "max_segment_bytes must be at most {}",
                changelog::segment::MAX_PLAIN_LEN / 2
            ));
        }
        Ok(())
    }

    /// The `[throttle]` table as a policy; the error says what to fix.
    pub fn throttle_policy(&self) -> std::result::Result<Policy, String> {
        Policy::from_config(&self.throttle).map_err(|e| format!("[throttle]: {e}"))
    }

    /// The file through which every shipper process of this config shares the upload
    /// limit's budget ([`crate::throttle::Throttle::shared`]).
    pub fn throttle_clock(&self) -> PathBuf {
        self.status_dir.join("throttle.clock")
    }

    /// One pipeline config per volume (loads the key once), without an upload limit:
    /// the caller gives them one shared throttle.
    pub fn pipelines(&self) -> Result<Vec<ShipperConfig>> {
        let key = Key::load(&self.key)?;
        Ok(self
            .volumes
            .iter()
            .map(|v| {
                let mut c = ShipperConfig::new(
                    v.id.clone(),
                    v.ring.clone(),
                    self.staging.clone(),
                    key.clone(),
                );
                c.max_segment_age = Duration::from_millis(self.max_segment_age_ms);
                c.max_segment_bytes = self.max_segment_bytes;
                c.sealers = self.sealers;
                c.retry_unit = Duration::from_millis(self.retry_unit_ms);
                c.rpo_threshold = Duration::from_millis(self.rpo_threshold_ms);
                c.key_file = Some(self.key.clone());
                c.alert_command = self.alert_command.clone();
                c.alert_hold = Duration::from_millis(self.alert_hold_ms);
                c.heartbeat_interval = Duration::from_millis(self.heartbeat_ms);
                c.status_path = Some(self.status_path(&v.id));
                c.initial_sync = self.initial_sync;
                c.resync_block_bytes =
                    resync_block_bytes(self.resync_block_kib).expect("checked on load");
                c.backlog_resync_percent = self.backlog_resync_percent;
                c.cpu_priority = self.cpu_priority;
                c
            })
            .collect())
    }

    /// The groups to cut, and how often: all of them, or with `only` (a shipper of one
    /// volume) those whose first volume it is.
    pub fn group_cuts(&self, only: Option<&VolumeId>) -> Vec<crate::group_cuts::GroupCutSchedule> {
        self.groups
            .iter()
            .filter(|g| only.is_none_or(|v| g.volumes.first() == Some(v)))
            .map(|g| crate::group_cuts::GroupCutSchedule {
                clock: g.clock.clone(),
                every: Duration::from_millis(g.cut_every_ms),
            })
            .collect()
    }

    pub fn status_path(&self, volume: &VolumeId) -> PathBuf {
        self.status_dir.join(format!("{volume}.status.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
key = "/k"
staging = "/s"
store = "/t"
retry_unit_ms = 5
[[volume]]
id = "vol0"
ring = "/r0"
[[volume]]
id = "vol1"
ring = "/r1"
"#;

    #[test]
    fn good_config_with_defaults() {
        let never = GOOD.replace("retry_unit_ms = 5", "backlog_resync_percent = 0");
        assert_eq!(ConfigFile::parse(&never).unwrap().backlog_resync_percent, 0);
        let c = ConfigFile::parse(GOOD).unwrap();
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.retry_unit_ms, 5);
        assert_eq!(c.max_segment_age_ms, 1000);
        assert_eq!(c.backlog_resync_percent, 50);
        assert_eq!(c.cpu_priority, CpuPriority::Yield);
        let normal = GOOD.replace("retry_unit_ms = 5", "cpu_priority = \"normal\"");
        assert_eq!(
            ConfigFile::parse(&normal).unwrap().cpu_priority,
            CpuPriority::Normal
        );
        assert_eq!(
            c.status_path(&c.volumes[1].id),
            PathBuf::from("/run/ublk-dr/vol1.status.json")
        );
        assert!(c.group_cuts(None).is_empty());
        assert_eq!(c.throttle_policy(), Ok(Policy::unlimited()));
        let throttled = format!(
            "{GOOD}[throttle]\nlimit = \"8Mbit/s\"\n[[throttle.window]]\ndays = \"sat,sun\"\n\
             hours = \"00:00-24:00\"\nlimit = \"unlimited\"\n"
        );
        let throttled = ConfigFile::parse(&throttled).unwrap();
        let weekday = crate::throttle::LocalTime {
            weekday: 2,
            minute: 600,
        };
        let sunday = crate::throttle::LocalTime {
            weekday: 6,
            minute: 600,
        };
        let policy = throttled.throttle_policy().unwrap();
        assert_eq!(
            policy.limit_at(weekday).0.map(|r| r.bytes_per_s()),
            Some(1_000_000)
        );
        assert_eq!(policy.limit_at(sunday), (None, Some("sat,sun 00:00-24:00")));
        let grouped = format!(
            "{GOOD}[[group]]\nclock = \"/g\"\nvolumes = [\"vol0\", \"vol1\"]\n\
             [[group]]\nclock = \"/h\"\nvolumes = [\"vol1\", \"vol0\"]\ncut_every_ms = 250\n"
        );
        let grouped = ConfigFile::parse(&grouped).unwrap();
        let cuts = grouped.group_cuts(None);
        assert_eq!(
            cuts.iter()
                .map(|g| (g.clock.to_str().unwrap(), g.every.as_millis()))
                .collect::<Vec<_>>(),
            [("/g", 5000), ("/h", 250)]
        );
        // A shipper of one volume cuts the groups that volume comes first in.
        let vol1 = VolumeId::new("vol1").unwrap();
        let mine = grouped.group_cuts(Some(&vol1));
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].clock, PathBuf::from("/h"));
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (
                GOOD.replace("retry_unit_ms", "retry_unt_ms"),
                "retry_unt_ms",
            ),
            (GOOD.replace("\"vol1\"", "\"../x\""), "invalid volume id"),
            (GOOD.replace("\"vol1\"", "\"vol0\""), "appears twice"),
            (
                GOOD.replace("retry_unit_ms = 5", "retry_unit_ms = 0"),
                "retry_unit_ms must be",
            ),
            (
                GOOD.replace("retry_unit_ms = 5", "retry_unit_ms = \"5\""),
                "retry_unit_ms",
            ),
            (GOOD.replace("key = \"/k\"", ""), "key"),
            (GOOD.replace("ring = \"/r0\"", ""), "ring"),
            (
                "key = \"/k\"\nstaging = \"/s\"\nstore = \"/t\"\nvolume = []".to_string(),
                "no [[volume]]",
            ),
            ("key = ".to_string(), "line 1"),
            (
                GOOD.replace("retry_unit_ms = 5", "resync_block_kib = 48"),
                "resync_block_kib must be",
            ),
            (
                GOOD.replace("retry_unit_ms = 5", "cpu_priority = \"fast\""),
                "unknown variant `fast`, expected `yield` or `normal`",
            ),
            (
                GOOD.replace("retry_unit_ms = 5", "backlog_resync_percent = 101"),
                "backlog_resync_percent must be from 0",
            ),
            (
                GOOD.replace("retry_unit_ms = 5", "backlog_resync_percent = -1"),
                "backlog_resync_percent",
            ),
            (
                format!("{GOOD}[[group]]\nclock = \"/g\"\nvolumes = [\"vol0\", \"vol1\"]\ncut_every_ms = 0\n"),
                "cut_every_ms must be greater",
            ),
            (format!("{GOOD}[[group]]\nclok = \"/g\"\n"), "clok"),
            (
                format!("{GOOD}[[group]]\nclock = \"/g\"\nvolumes = [\"vol0\"]\n"),
                "needs at least two volumes",
            ),
            (
                format!("{GOOD}[[group]]\nclock = \"/g\"\nvolumes = [\"vol0\", \"vol9\"]\n"),
                "volume vol9 has no [[volume]] table",
            ),
            (
                format!("{GOOD}[throttle]\nlimit = \"100\"\n"),
                "[throttle]: upload limit \"100\": no unit",
            ),
            (
                format!("{GOOD}[throttle]\n[[throttle.window]]\nhours = \"8-18\"\nlimit = \"1MB/s\"\n"),
                "[throttle]: window mon-sun 8-18: hours",
            ),
            (format!("{GOOD}[throttle]\nlimt = \"1MB/s\"\n"), "limt"),
        ];
        for (text, expect) in cases {
            let err = ConfigFile::parse(&text).expect_err(&text);
            assert!(err.contains(expect), "{expect:?} not in {err:?}");
        }
    }
}
