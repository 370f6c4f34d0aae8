//! The recovery side's configuration file (TOML): shared settings and one `[[volume]]`
//! table per replicated volume, for `ublk-target apply --config`. Unknown keys are
//! errors, so a typo never silently falls back to a default.
//!
//! The format, as `ublk-target apply --help` shows it: [`EXAMPLE`].

use crate::error::{Result, TargetError};
use crate::plan::PlanConfig;
use crate::points::{parse_age, Retention, Thinning};
use changelog::VolumeId;
use objstore::StoreLocation;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const EXAMPLE: &str = r#"Config file (--config), TOML; unknown keys are errors:

  key = "/etc/ublk-dr/key"      # required: the same key file as the shipper's
  store = "/srv/dr-store"       # required: the shipper's target store (a directory,
                                #   az://CONTAINER/PREFIX, s3://BUCKET/PREFIX
                                #   or a receiver's tcp:// or tls://HOST:PORT)
  poll_ms = 200                 # how often --follow looks for new segments
  keep_points = 1000            # retention for every volume (optional):
  keep_age = "15d"              #   at most this many points, none older than this,
  # keep_size = "50G"           #   the undo journals on at most this much disk (the
                                #   oldest points go first; `status` warns when it
                                #   keeps the history shorter than keep_age)
  # thin_after = "2h"           # points older than this kept one per thin_every
  # thin_every = "1h"           #   (the newest of each hour, at a group cut if any),
                                #   their undo journals merged
  # keep_applied_segments = false  (true: leave applied segments in the store, for a
  #                                  second reader; by default apply deletes them)
  rpo_threshold_ms = 60000      # health is Warning when the replica was last known
                                #   current longer ago than this (`status`, alerts);
                                #   leave room for the shipper's heartbeat_ms
  # alert_command = "/usr/local/bin/page"  (apply --follow runs it on each health
  #                 change, sh -c with UBLK_DR_VOLUME, UBLK_DR_HEALTH, UBLK_DR_STATE,
  #                 UBLK_DR_RPO_MS, UBLK_DR_SITE=recovery, ...; default: logged only)
  # alert_hold_ms = 10000       (a new health must hold this long; Critical: at once)

  [[volume]]
  id = "vol0"
  replica = "/srv/replicas/vol0.img"
  # state = "/srv/replicas/vol0.img.state"       (the default)
  # journal = "/srv/replicas/vol0.img.journal"   (the default)
  # keep_points = 100, keep_age = "2h", keep_size = "20G"   (override the shared retention)
  # full_download = false                        (failback's "full download")
  # copy_undo = false                            (copy before-images even on XFS or
  #                                                btrfs, where blocks can be shared)
  # failover_ring = "/dev/shm/ublk-dr/vol0.failover.ring"
  #                       (the default: capture of the volume once failed over by a plan)

  [[plan]]                      # a recovery plan (optional): `ublk-target plan`
  name = "shop"
  # point = "latest-cut"        (the default; or latest, latest-app, latest-app-cut)
  # hook_timeout_s = 900        (a hook still running then is killed; the plan stops)
  [[plan.step]]                 # steps come up in order, each between its hooks
  volumes = ["vol0"]
  # pre = "logger failing over"  (sh -c; stops the plan unless it exits 0)
  # post = "mount $UBLK_DR_DEVICE_VOL0 /srv/db"
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub key: PathBuf,
    pub store: StoreLocation,
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    pub keep_points: Option<usize>,
    pub keep_age: Option<String>,
    pub keep_size: Option<SizeSetting>,
    pub thin_after: Option<String>,
    pub thin_every: Option<String>,
    #[serde(default)]
    pub keep_applied_segments: bool,
    #[serde(default = "default_rpo_threshold_ms")]
    pub rpo_threshold_ms: u64,
    /// Run by `apply --follow` on each health change (see [`changelog::alert`]).
    pub alert_command: Option<String>,
    #[serde(default = "default_alert_hold_ms")]
    pub alert_hold_ms: u64,
    #[serde(rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default, rename = "plan")]
    pub plans: Vec<PlanConfig>,
}

/// A size in a config file: bytes, or text such as `"50G"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeSetting {
    Bytes(u64),
    Text(String),
}

impl SizeSetting {
    /// The size in bytes, at least one.
    fn bytes(&self) -> std::result::Result<u64, String> {
        match self {
            SizeSetting::Bytes(n) => crate::points::parse_keep_size(&n.to_string()),
            SizeSetting::Text(text) => crate::points::parse_keep_size(text),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub id: VolumeId,
    pub replica: PathBuf,
    pub state: Option<PathBuf>,
    pub journal: Option<PathBuf>,
    pub keep_points: Option<usize>,
    pub keep_age: Option<String>,
    pub keep_size: Option<SizeSetting>,
    pub thin_after: Option<String>,
    pub thin_every: Option<String>,
    #[serde(default)]
    pub full_download: bool,
    #[serde(default)]
    pub copy_undo: bool,
    /// Where the volume, failed over by a plan, captures its writes.
    pub failover_ring: Option<PathBuf>,
}

impl VolumeConfig {
    /// The volume's replica, state and journal: the paths given, else the defaults
    /// beside the replica.
    pub fn paths(&self) -> crate::state::ReplicaPaths {
        crate::state::ReplicaPaths::new(&self.replica)
            .with_state(self.state.clone())
            .with_journal(self.journal.clone())
    }

    /// The capture ring of the volume once a plan failed it over: `failover_ring`, or
    /// `/dev/shm/ublk-dr/ID.failover.ring`.
    pub fn failover_ring(&self) -> PathBuf {
        self.failover_ring
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/ublk-dr/{}.failover.ring", self.id)))
    }
}

fn default_poll_ms() -> u64 {
    200
}

fn default_rpo_threshold_ms() -> u64 {
    crate::health::DEFAULT_RPO_THRESHOLD.as_millis() as u64
}

fn default_alert_hold_ms() -> u64 {
    changelog::alert::DEFAULT_HOLD.as_millis() as u64
}

impl TargetConfig {
    /// Reads and checks a config file; every error names the file and what to fix.
    pub fn load(path: &Path) -> Result<TargetConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TargetError::io(
                format!(
                    "reading config {} (see `ublk-target apply --help` for its format)",
                    path.display()
                ),
                e,
            )
        })?;
        Self::parse(&text).map_err(|what| TargetError::Config {
            path: path.into(),
            what,
        })
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> std::result::Result<TargetConfig, String> {
        let config: TargetConfig =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        if config.volumes.is_empty() {
            return Err("no [[volume]] tables: add one per replicated volume (id, replica)".into());
        }
        let mut seen = HashSet::new();
        for v in &config.volumes {
            if !seen.insert(&v.id) {
                return Err(format!("volume {} appears twice", v.id));
            }
            config.retention(v)?;
        }
        if config.poll_ms == 0 {
            return Err("poll_ms must be greater than 0".into());
        }
        if config.rpo_threshold_ms == 0 {
            return Err("rpo_threshold_ms must be greater than 0".into());
        }
        let mut plans = HashSet::new();
        for plan in &config.plans {
            plan.check()?;
            if !plans.insert(&plan.name) {
                return Err(format!("plan {} appears twice", plan.name));
            }
            for v in plan.volumes() {
                config
                    .volume(v)
                    .map_err(|what| format!("plan {}: {what}", plan.name))?;
            }
        }
        Ok(config)
    }

    /// The volume `id`, or an error listing the ones there are.
    pub fn volume(&self, id: &VolumeId) -> std::result::Result<&VolumeConfig, String> {
        self.volumes.iter().find(|v| &v.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.volumes.iter().map(|v| v.id.as_str()).collect();
            format!("volume {id} is not in it (it has {})", ids.join(", "))
        })
    }

    /// The plan `name`, or an error listing the ones there are.
    pub fn plan(&self, name: &str) -> std::result::Result<&PlanConfig, String> {
        self.plans.iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.plans.iter().map(|p| p.name.as_str()).collect();
            if names.is_empty() {
                format!("it has no plans: add a [[plan]] table for {name} (see `ublk-target plan --help`)")
            } else {
                format!("plan {name} is not in it (it has {})", names.join(", "))
            }
        })
    }

    /// A volume's retention: its own settings over the shared ones.
    pub fn retention(&self, volume: &VolumeConfig) -> std::result::Result<Retention, String> {
        let keep_points = volume.keep_points.or(self.keep_points);
        if keep_points == Some(0) {
            return Err(format!(
                "volume {}: keep_points must be at least 1 (the latest point is always kept)",
                volume.id
            ));
        }
        let keep_age = match volume.keep_age.as_ref().or(self.keep_age.as_ref()) {
            Some(age) => {
                Some(parse_age(age).map_err(|e| format!("volume {}: keep_age {e}", volume.id))?)
            }
            None => None,
        };
        let keep_size = match volume.keep_size.as_ref().or(self.keep_size.as_ref()) {
            Some(size) => Some(
                size.bytes()
                    .map_err(|e| format!("volume {}: keep_size {e}", volume.id))?,
            ),
            None => None,
        };
        let age = |name: &str, text: Option<&String>| {
            text.map(|t| parse_age(t).map_err(|e| format!("volume {}: {name} {e}", volume.id)))
                .transpose()
        };
        let thin_after = age(
            "thin_after",
            volume.thin_after.as_ref().or(self.thin_after.as_ref()),
        )?;
        let thin_every = age(
            "thin_every",
            volume.thin_every.as_ref().or(self.thin_every.as_ref()),
        )?;
        let thin = match (thin_after, thin_every) {
            (Some(after), Some(every)) if !every.is_zero() => Some(Thinning { after, every }),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(format!(
                    "volume {}: thin_every must be more than 0",
                    volume.id
                ))
            }
            _ => {
                return Err(format!(
                    "volume {}: thin_after and thin_every go together (e.g. thin_after = \
                     \"2h\", thin_every = \"1h\": points older than 2 hours kept one per hour)",
                    volume.id
                ))
            }
        };
        Ok(Retention {
            keep_points,
            keep_age,
            keep_size,
            thin,
        })
    }

    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }

    pub fn rpo_threshold(&self) -> Duration {
        Duration::from_millis(self.rpo_threshold_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
key = "/k"
store = "/s"
keep_points = 10
keep_age = "2h"
[[volume]]
id = "a"
replica = "/r/a"
[[volume]]
id = "b"
replica = "/r/b"
keep_points = 3
keep_size = "512M"
full_download = true
"#;

    #[test]
    fn volumes_inherit_and_override_retention() {
        let config = TargetConfig::parse(GOOD).unwrap();
        let a = config.volume(&VolumeId::new("a").unwrap()).unwrap();
        let b = config.volume(&VolumeId::new("b").unwrap()).unwrap();
        assert_eq!(
            config.retention(a).unwrap(),
            Retention {
                keep_points: Some(10),
                keep_age: Some(Duration::from_secs(7200)),
                keep_size: None,
                thin: None,
            }
        );
        assert_eq!(
            config.retention(b).unwrap(),
            Retention {
                keep_points: Some(3),
                keep_age: Some(Duration::from_secs(7200)),
                keep_size: Some(512 << 20),
                thin: None,
            }
        );
        assert!(b.full_download && !a.full_download);
        // A bare number of bytes is a size too.
        let bytes = TargetConfig::parse(&GOOD.replace("\"512M\"", "1048576")).unwrap();
        assert_eq!(
            bytes.retention(&bytes.volumes[1]).unwrap().keep_size,
            Some(1 << 20)
        );
        assert_eq!(config.poll(), Duration::from_millis(200));
        let missing = config.volume(&VolumeId::new("c").unwrap()).unwrap_err();
        assert!(missing.contains("it has a, b"), "{missing}");
    }

    #[test]
    fn the_help_example_parses() {
        let (_, toml) = EXAMPLE.split_once("\n\n").unwrap();
        let config = TargetConfig::parse(toml).unwrap();
        assert_eq!(config.volumes.len(), 1);
        assert_eq!(
            config.retention(&config.volumes[0]).unwrap().keep_points,
            Some(1000)
        );
    }

    #[test]
    fn plans_name_existing_volumes_once() {
        let plan = "[[plan]]\nname = \"shop\"\n[[plan.step]]\nvolumes = [\"a\"]\npost = \"true\"\n\
                    [[plan.step]]\nvolumes = [\"b\"]\n";
        let config = TargetConfig::parse(&format!("{GOOD}{plan}")).unwrap();
        let shop = config.plan("shop").unwrap();
        assert_eq!(shop.point, crate::plan::PointChoice::LatestCut);
        let order: Vec<&str> = shop.volumes().map(|v| v.as_str()).collect();
        assert_eq!(order, ["a", "b"]);
        assert_eq!(shop.steps[0].post.as_deref(), Some("true"));
        assert!(config.plan("web").unwrap_err().contains("it has shop"));
        assert!(TargetConfig::parse(GOOD)
            .unwrap()
            .plan("shop")
            .unwrap_err()
            .contains("no plans"));
        let a = config.volume(&VolumeId::new("a").unwrap()).unwrap();
        assert_eq!(
            a.failover_ring(),
            Path::new("/dev/shm/ublk-dr/a.failover.ring")
        );
        for (bad, expected) in [
            (
                plan.replace("[\"b\"]", "[\"c\"]"),
                "plan shop: volume c is not in it",
            ),
            (plan.replace("[\"b\"]", "[\"a\"]"), "volume a appears twice"),
            (
                plan.replace("[\"b\"]", "[]"),
                "plan shop step 2: no volumes",
            ),
            (
                format!("{plan}[[plan]]\nname = \"x\"\n[[plan.step]]\nvolumes = [\"a\", \"A\"]\n"),
                "would both be $UBLK_DR_DEVICE_A",
            ),
            (format!("{plan}{plan}"), "plan shop appears twice"),
            (
                plan.replace("name = \"shop\"", "name = \"my shop\""),
                "without spaces",
            ),
            (
                plan.replace("name = \"shop\"", "name = \"shop\"\npoint = \"newest\""),
                "latest-app-cut",
            ),
            (plan.replace("post", "after"), "after"),
            (
                "[[plan]]\nname = \"x\"\nstep = []\n".into(),
                "no [[plan.step]]",
            ),
        ] {
            let err = TargetConfig::parse(&format!("{GOOD}{bad}")).unwrap_err();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        for (text, expected) in [
            (
                GOOD.replace("keep_age = \"2h\"", "keep_age = \"2 weeks\""),
                "keep_age",
            ),
            (
                GOOD.replace("keep_points = 3", "keep_points = 0"),
                "keep_points",
            ),
            (
                GOOD.replace("keep_size = \"512M\"", "keep_size = \"half the disk\""),
                "volume b: keep_size \"half the disk\" is not a size",
            ),
            (
                GOOD.replace("keep_size = \"512M\"", "keep_size = 0"),
                "volume b: keep_size must be more than 0",
            ),
            (
                GOOD.replace("replica = \"/r/a\"", "replika = \"/r/a\""),
                "replika",
            ),
            (GOOD.replace("id = \"b\"", "id = \"a\""), "appears twice"),
            (GOOD.replace("id = \"b\"", "id = \"no/slash\""), "no/slash"),
            (
                "key = \"/k\"\nstore = \"/s\"\nvolume = []\n".to_string(),
                "no [[volume]]",
            ),
            (GOOD.replace("store = \"/s\"\n", ""), "store"),
        ] {
            let err = TargetConfig::parse(&text).unwrap_err();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }
}
