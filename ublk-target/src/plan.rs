//! Recovery plans: several volumes failed over together, in steps, at one choice of
//! recovery point (ASR's recovery plans).
//!
//! A plan is a `[[plan]]` table of the recovery side's config: a name, a default point
//! choice and ordered `[[plan.step]]`s, each a list of volumes with optional `pre` and
//! `post` shell hooks. `ublk-target plan failover NAME` chooses every volume's point
//! first ([`choose`]) and changes nothing unless every volume has one; then, step by
//! step, it runs the step's `pre` hook, brings the step's volumes up (a test view, or a
//! rollback and a protected device), and runs its `post` hook. A failing hook stops the
//! plan there.
//!
//! Point choices ([`PointChoice`]): each volume's latest point, or its latest
//! app-consistent one, or the points of one consistency-group cut ([`crate::group_cuts`]):
//! the latest cut every volume of the plan has a point at (the default: the volumes
//! come up as one crash state, as after a power cut of all of them), the latest such
//! cut that is app-consistent on every volume, or cut N.
//!
//! Hooks run with `sh -c`, stdin closed, and get in their environment
//! ([`hook_env`]): `UBLK_DR_PLAN`, `UBLK_DR_STEP` (from 1), `UBLK_DR_TEST` (1 for a
//! test failover, else 0), `UBLK_DR_DEVICES` (`VOLUME=/dev/ublkbN` for every volume up
//! so far, space-separated) and `UBLK_DR_DEVICE_<VOLUME>` for each of them (the id in
//! upper case, other characters than letters and digits as `_`).

use crate::group_cuts::{common_points, GroupPoint};
use crate::points::{format_utc_ms, Catalog, RecoveryPoint};
use changelog::VolumeId;
use serde::Deserialize;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// One `[[plan]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub name: String,
    /// The point choice when the command line gives none.
    #[serde(default)]
    pub point: PointChoice,
    /// How long a hook may run before it is killed and the plan stops, in seconds.
    #[serde(default = "default_hook_timeout_s")]
    pub hook_timeout_s: u64,
    #[serde(rename = "step")]
    pub steps: Vec<StepConfig>,
}

/// One `[[plan.step]]`: volumes brought up together, between two hooks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    pub volumes: Vec<VolumeId>,
    pub pre: Option<String>,
    pub post: Option<String>,
}

fn default_hook_timeout_s() -> u64 {
    900
}

impl PlanConfig {
    /// A hook's time limit.
    pub fn hook_timeout(&self) -> Duration {
        Duration::from_secs(self.hook_timeout_s)
    }

    /// Every volume of the plan, step by step.
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeId> {
        self.steps.iter().flat_map(|s| s.volumes.iter())
    }

    /// Checks the plan's own shape (that its volumes exist is the config's check).
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.chars().any(char::is_whitespace) {
            return Err(format!(
                "plan name {:?} must be non-empty and without spaces",
                self.name
            ));
        }
        if self.hook_timeout_s == 0 {
            return Err(format!(
                "plan {}: hook_timeout_s must be at least 1",
                self.name
            ));
        }
        if self.steps.is_empty() {
            return Err(format!(
                "plan {}: no [[plan.step]]: add one with the volumes to bring up",
                self.name
            ));
        }
        let mut seen = std::collections::HashSet::new();
        // Hooks find each device by its variable, which must name one volume.
        let mut variables = std::collections::HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            if step.volumes.is_empty() {
                return Err(format!("plan {} step {}: no volumes", self.name, i + 1));
            }
            for v in &step.volumes {
                if !seen.insert(v) {
                    return Err(format!(
                        "plan {}: volume {v} appears twice (a volume is brought up once)",
                        self.name
                    ));
                }
                if let Some(other) = variables.insert(device_var(v), v) {
                    return Err(format!(
                        "plan {}: volumes {other} and {v} would both be ${} in the hooks; \
                         rename one",
                        self.name,
                        device_var(v)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Which recovery point each volume of a plan fails over to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum PointChoice {
    /// Each volume's latest point (the lowest loss, no consistency across volumes).
    Latest,
    /// Each volume's latest app-consistent point.
    LatestApp,
    /// The latest consistency-group cut every volume has a point at.
    #[default]
    LatestCut,
    /// The latest group cut that is app-consistent on every volume.
    LatestAppCut,
    /// Group cut N.
    Cut(u64),
}

/// What `--point` accepts, for help texts.
pub const POINT_CHOICES: &str = "latest, latest-app, latest-cut, latest-app-cut or cut:N";

impl FromStr for PointChoice {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "latest" => PointChoice::Latest,
            "latest-app" => PointChoice::LatestApp,
            "latest-cut" => PointChoice::LatestCut,
            "latest-app-cut" => PointChoice::LatestAppCut,
            _ => match text.strip_prefix("cut:").map(str::parse) {
                Some(Ok(n)) => PointChoice::Cut(n),
                _ => return Err(format!("{text:?} is not a point choice: {POINT_CHOICES}")),
            },
        })
    }
}

impl TryFrom<String> for PointChoice {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl fmt::Display for PointChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointChoice::Latest => f.write_str("latest"),
            PointChoice::LatestApp => f.write_str("latest-app"),
            PointChoice::LatestCut => f.write_str("latest-cut"),
            PointChoice::LatestAppCut => f.write_str("latest-app-cut"),
            PointChoice::Cut(n) => write!(f, "cut:{n}"),
        }
    }
}

/// The points a choice gives, one per volume in the order of the catalogs, and what
/// they are ("group cut 12 (clock …) of 2026-12-06 07:40:01.120").
#[derive(Debug, PartialEq, Eq)]
pub struct Chosen {
    pub points: Vec<RecoveryPoint>,
    pub what: String,
}

/// Chooses every volume's point, or says which volume has none for `choice` and what
/// to choose instead. `catalogs`: (volume name, its catalog).
pub fn choose(choice: PointChoice, catalogs: &[(String, Catalog)]) -> Result<Chosen, String> {
    let per_volume = |app: bool| -> Result<Chosen, String> {
        let mut points = Vec::new();
        let mut missing = Vec::new();
        for (name, catalog) in catalogs {
            match catalog
                .points
                .iter()
                .rev()
                .find(|p| !app || p.app_consistent)
            {
                Some(p) => points.push(*p),
                None => missing.push(name.as_str()),
            }
        }
        if !missing.is_empty() {
            let what = if app {
                "app-consistent recovery point (`shipper mark --app-consistent` makes one)"
            } else {
                "recovery point (nothing applied yet?)"
            };
            let has = if missing.len() == 1 { "has" } else { "have" };
            return Err(format!("{} {has} no {what}", missing.join(", ")));
        }
        let what = if app {
            "each volume's latest app-consistent point"
        } else {
            "each volume's latest point"
        };
        Ok(Chosen {
            points,
            what: what.into(),
        })
    };
    let at_cut = |app: bool, cut: Option<u64>| -> Result<Chosen, String> {
        let rows = common_points(catalogs);
        let no_common = || {
            format!(
                "{} have no group cut in common (are they attached with one \
                 `blkfilter --group-clock`, and does `shipper run` cut it?); \
                 `--point latest` takes each volume's latest point instead",
                names(catalogs)
            )
        };
        if rows.is_empty() {
            return Err(no_common());
        }
        // (cut number, its row).
        let candidates: Vec<(u64, &GroupPoint)> = rows
            .iter()
            .flat_map(|row| (row.first..=row.last).map(move |c| (c, row)))
            .filter(|(c, _)| cut.is_none_or(|n| n == *c))
            .filter(|(_, row)| !app || row.points.iter().all(|(_, p)| p.app_consistent))
            .collect();
        let (number, row) = match (cut, &candidates[..]) {
            (Some(n), []) => {
                return Err(format!(
                    "group cut {n} has no recovery point on every one of {}; see \
                     `ublk-target group-points` for the cuts they share",
                    names(catalogs)
                ))
            }
            (Some(n), [_, _, ..]) => {
                return Err(format!(
                    "group cut {n} exists under {} group clocks (cut numbers start again \
                     with a new clock, e.g. after a reboot); see `ublk-target group-points`",
                    candidates.len()
                ))
            }
            (None, []) => {
                return Err(format!(
                    "no group cut shared by {} is app-consistent on all of them \
                     (`shipper group-cut --app-consistent` makes one)",
                    names(catalogs)
                ))
            }
            // The latest: by the time of the points (clocks are random ids), then number.
            (_, found) => *found
                .iter()
                .max_by_key(|(c, row)| (row.newest_unix_ms(), *c))
                .expect("not empty"),
        };
        let when = row.shown_unix_ms().map_or("-".into(), format_utc_ms);
        Ok(Chosen {
            points: row.points.iter().map(|(_, p)| *p).collect(),
            what: format!("group cut {number} (clock {:016x}) of {when}", row.clock),
        })
    };
    match choice {
        PointChoice::Latest => per_volume(false),
        PointChoice::LatestApp => per_volume(true),
        PointChoice::LatestCut => at_cut(false, None),
        PointChoice::LatestAppCut => at_cut(true, None),
        PointChoice::Cut(n) => at_cut(false, Some(n)),
    }
}

fn names(catalogs: &[(String, Catalog)]) -> String {
    let names: Vec<&str> = catalogs.iter().map(|(n, _)| n.as_str()).collect();
    names.join(", ")
}

/// The environment variable naming `volume`'s device: `UBLK_DR_DEVICE_DB_DATA` for
/// `db-data`.
pub fn device_var(volume: &VolumeId) -> String {
    let id: String = volume
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("UBLK_DR_DEVICE_{id}")
}

/// The environment of a hook of step `step` (from 1): see the module docs. `up`: every
/// volume up so far with its device id.
pub fn hook_env(
    plan: &str,
    step: usize,
    test: bool,
    up: &[(VolumeId, u32)],
) -> Vec<(String, String)> {
    let devices: Vec<String> = up
        .iter()
        .map(|(v, id)| format!("{v}=/dev/ublkb{id}"))
        .collect();
    let mut env = vec![
        ("UBLK_DR_PLAN".to_string(), plan.to_string()),
        ("UBLK_DR_STEP".to_string(), step.to_string()),
        ("UBLK_DR_TEST".to_string(), u8::from(test).to_string()),
        ("UBLK_DR_DEVICES".to_string(), devices.join(" ")),
    ];
    env.extend(
        up.iter()
            .map(|(v, id)| (device_var(v), format!("/dev/ublkb{id}"))),
    );
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use changelog::GroupCutLabel;

    fn point(index: u64, ms: u64, app: bool, cuts: Option<(u64, u64, u64)>) -> RecoveryPoint {
        RecoveryPoint {
            index,
            first_seq: index * 10,
            last_seq: index * 10 + 9,
            created_unix_ms: ms,
            crash_consistent: true,
            app_consistent: app,
            latest: false,
            group_cuts: cuts.map(|(clock, first, last)| GroupCutLabel {
                clock,
                first,
                last,
                first_unix_ms: None,
            }),
        }
    }

    fn catalog(points: Vec<RecoveryPoint>) -> Catalog {
        Catalog {
            points,
            ..Catalog::default()
        }
    }

    /// Two volumes: cuts 1..=3 of clock 7 on both (cut 2 app-consistent on `a` only,
    /// cut 1 on both), `a` has a later point with cut 4 that `b` lacks, and each has a
    /// latest point past every cut.
    fn pair() -> Vec<(String, Catalog)> {
        let a = catalog(vec![
            point(1, 100, true, Some((7, 1, 1))),
            point(2, 200, true, Some((7, 2, 3))),
            point(3, 300, false, Some((7, 4, 4))),
            point(4, 400, false, None),
        ]);
        let b = catalog(vec![
            point(10, 101, true, Some((7, 1, 1))),
            point(11, 150, false, Some((7, 2, 2))),
            point(12, 210, false, Some((7, 3, 3))),
            point(13, 500, false, None),
        ]);
        vec![("a".into(), a), ("b".into(), b)]
    }

    fn indexes(chosen: &Chosen) -> Vec<u64> {
        chosen.points.iter().map(|p| p.index).collect()
    }

    #[test]
    fn each_choice_picks_the_points_it_names() {
        let pair = pair();
        let pick = |c: PointChoice| indexes(&choose(c, &pair).unwrap());
        assert_eq!(pick(PointChoice::Latest), [4, 13]);
        assert_eq!(pick(PointChoice::LatestApp), [2, 10]);
        assert_eq!(pick(PointChoice::LatestCut), [2, 12]);
        assert_eq!(pick(PointChoice::LatestAppCut), [1, 10]);
        assert_eq!(pick(PointChoice::Cut(2)), [2, 11]);
        let what = choose(PointChoice::LatestCut, &pair).unwrap().what;
        assert!(
            what.starts_with("group cut 3 (clock 0000000000000007)"),
            "{what}"
        );
    }

    #[test]
    fn a_choice_some_volume_lacks_is_refused_by_name() {
        let mut pair = pair();
        let err = choose(PointChoice::Cut(4), &pair).unwrap_err();
        assert!(err.contains("group cut 4 has no recovery point"), "{err}");
        pair[1].1.points.retain(|p| !p.app_consistent);
        let err = choose(PointChoice::LatestApp, &pair).unwrap_err();
        assert!(
            err.contains("b has no app-consistent recovery point"),
            "{err}"
        );
        let err = choose(PointChoice::LatestAppCut, &pair).unwrap_err();
        assert!(err.contains("is app-consistent on all"), "{err}");
        pair[1].1.points.retain(|p| p.group_cuts.is_none());
        let err = choose(PointChoice::LatestCut, &pair).unwrap_err();
        assert!(err.contains("a, b have no group cut in common"), "{err}");
    }

    #[test]
    fn the_latest_cut_is_the_newest_across_clocks_and_a_number_under_two_is_ambiguous() {
        let mut pair = pair();
        // A newer clock (a reboot) whose id sorts lower, with its own cut 1.
        pair[0].1.points.push(point(5, 600, false, Some((3, 1, 1))));
        pair[1]
            .1
            .points
            .push(point(14, 601, false, Some((3, 1, 1))));
        assert_eq!(
            indexes(&choose(PointChoice::LatestCut, &pair).unwrap()),
            [5, 14]
        );
        let err = choose(PointChoice::Cut(1), &pair).unwrap_err();
        assert!(err.contains("under 2 group clocks"), "{err}");
    }

    #[test]
    fn choices_parse_and_print_back() {
        for text in [
            "latest",
            "latest-app",
            "latest-cut",
            "latest-app-cut",
            "cut:12",
        ] {
            assert_eq!(text.parse::<PointChoice>().unwrap().to_string(), text);
        }
        for bad in ["", "cut:", "cut:x", "newest"] {
            assert!(bad
                .parse::<PointChoice>()
                .unwrap_err()
                .contains("latest-app-cut"));
        }
    }

    #[test]
    fn hooks_see_the_devices_up_so_far() {
        let up = [
            (VolumeId::new("db-data").unwrap(), 3),
            (VolumeId::new("web").unwrap(), 5),
        ];
        let env = hook_env("shop", 2, true, &up);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        crate::hook::run(
            &format!(
                "echo \"$UBLK_DR_PLAN $UBLK_DR_STEP $UBLK_DR_TEST $UBLK_DR_DEVICE_DB_DATA|$UBLK_DR_DEVICES\" > {}",
                out.display()
            ),
            &env,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "shop 2 1 /dev/ublkb3|db-data=/dev/ublkb3 web=/dev/ublkb5\n"
        );
        let err = crate::hook::run("exit 3", &env, Duration::from_secs(10)).unwrap_err();
        assert!(
            err.contains("`exit 3` failed") && err.contains('3'),
            "{err}"
        );
    }
}
