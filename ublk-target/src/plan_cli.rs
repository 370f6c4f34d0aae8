//! `ublk-target plan`: the binary's recovery-plan commands (see the library's
//! `ublk_target::plan` for what a plan is).

use crate::{attach_protected, require_applied, view_server, DEFAULT_CONFIG};
use anyhow::{Context, Result};
use changelog::VolumeId;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use ublk_target::config::{TargetConfig, VolumeConfig};
use ublk_target::plan::{self, PlanConfig, PointChoice};
use ublk_target::Catalog;

#[derive(Subcommand)]
pub enum PlanCommand {
    /// List the plans, or show one: its steps, volumes, hooks and the point each volume
    /// would fail over to now. Changes nothing.
    Show {
        /// The plan (all of them without it).
        name: Option<String>,
        /// The recovery side's config file, with the [[plan]] tables.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The point choice to show [default: the plan's point, else latest-cut]:
        /// latest, latest-app, latest-cut, latest-app-cut or cut:N.
        #[arg(long, value_name = "CHOICE")]
        point: Option<PointChoice>,
        /// Print JSON (a list of plans) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fail every volume of the plan over, step by step: the step's pre hook, its
    /// volumes brought up, its post hook.
    ///
    /// Every volume's point is chosen first; if one has none, nothing is done. --test
    /// brings each volume up as a test-failover view (nothing changes; end it with `plan
    /// cleanup`). Without --test (stop `apply` first): each replica is rolled back to
    /// its point and served with capture into its failover_ring, ready to replicate
    /// back; then `plan commit`. A failing step stops the plan; fix the cause and
    /// continue with --from-step.
    Failover {
        #[command(flatten)]
        plan: PlanArgs,
        /// The point choice [default: the plan's point, else latest-cut]: latest,
        /// latest-app, latest-cut (the latest consistency-group cut every volume has a
        /// point at), latest-app-cut or cut:N.
        #[arg(long, value_name = "CHOICE")]
        point: Option<PointChoice>,
        /// Test failover: disposable views, nothing changes.
        #[arg(long)]
        test: bool,
        /// Start at this step (from 1), after the earlier ones are up.
        #[arg(long, value_name = "N", default_value_t = 1)]
        from_step: usize,
        /// Where the test views' servers log.
        #[arg(long, default_value = "/run/ublk-dr/ublk-target.log")]
        log: PathBuf,
    },
    /// End the plan's test failover: delete the test views of its volumes (their writes
    /// are gone).
    Cleanup {
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// After `plan failover`: commit every volume of the plan (see `ublk-target
    /// commit`). Refused, with nothing committed, unless every volume was failed over.
    Commit {
        #[command(flatten)]
        plan: PlanArgs,
    },
}

/// Which plan, in which config file.
#[derive(Args)]
pub struct PlanArgs {
    /// The plan's name (its [[plan]] table's `name`).
    name: String,
    /// The recovery side's config file, with the [[plan]] tables (format: `ublk-target
    /// apply --help`).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

/// A config file loaded.
struct Loaded {
    config: TargetConfig,
    path: PathBuf,
}

impl Loaded {
    fn load(path: &Path) -> Result<Loaded> {
        Ok(Loaded {
            config: TargetConfig::load(path)?,
            path: path.into(),
        })
    }

    fn plan(&self, name: &str) -> Result<&PlanConfig> {
        self.config
            .plan(name)
            .map_err(|what| anyhow::anyhow!("config {}: {what}", self.path.display()))
    }

    fn volume(&self, id: &VolumeId) -> &VolumeConfig {
        self.config.volume(id).expect("plans name config volumes")
    }

    /// Every volume of `plan` with its catalog, refusing a replica never applied to.
    fn catalogs(&self, plan: &PlanConfig) -> Result<Vec<(String, Catalog)>> {
        plan.volumes()
            .map(|id| {
                let paths = self.volume(id).paths();
                require_applied(&paths).with_context(|| format!("volume {id}"))?;
                let catalog = ublk_target::catalog(&paths)
                    .with_context(|| format!("reading the recovery points of {id}"))?;
                Ok((id.to_string(), catalog))
            })
            .collect()
    }

    /// Chooses the point of every volume of `plan` (in [`PlanConfig::volumes`] order).
    fn choose(&self, plan: &PlanConfig, point: Option<PointChoice>) -> Result<plan::Chosen> {
        let choice = point.unwrap_or(plan.point);
        plan::choose(choice, &self.catalogs(plan)?).map_err(|why| {
            anyhow::anyhow!("plan {}: no point for `--point {choice}`: {why}", plan.name)
        })
    }
}

pub fn run(command: PlanCommand) -> Result<()> {
    match command {
        PlanCommand::Show {
            name,
            config,
            point,
            json,
        } => {
            let loaded = Loaded::load(&config)?;
            let plans: Vec<&PlanConfig> = match &name {
                Some(name) => vec![loaded.plan(name)?],
                None => loaded.config.plans.iter().collect(),
            };
            let reports: Vec<PlanReport> = plans
                .into_iter()
                .map(|plan| PlanReport::new(&loaded, plan, point))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else if reports.is_empty() {
                println!(
                    "{} has no [[plan]] tables (see `ublk-target apply --help` for the format)",
                    config.display()
                );
            } else {
                reports.iter().for_each(PlanReport::print);
            }
            Ok(())
        }
        PlanCommand::Failover {
            plan: PlanArgs { name, config },
            point,
            test,
            from_step,
            log,
        } => {
            let loaded = Loaded::load(&config)?;
            let plan = loaded.plan(&name)?;
            failover(&loaded, plan, point, test, from_step, &log)
        }
        PlanCommand::Cleanup {
            plan: PlanArgs { name, config },
        } => {
            let loaded = Loaded::load(&config)?;
            let plan = loaded.plan(&name)?;
            let replicas: Vec<PathBuf> = plan
                .volumes()
                .map(|id| loaded.volume(id).replica.clone())
                .collect();
            let views: Vec<(u32, ublk_target::device::ViewInfo)> =
                off_thread(ublk_target::device::views)?
                    .into_iter()
                    .filter(|(_, info)| replicas.iter().any(|r| same_file(r, &info.replica)))
                    .collect();
            anyhow::ensure!(
                !views.is_empty(),
                "plan {name} has no test failover up (no test view of its replicas; \
                 already cleaned up?)"
            );
            for (id, _) in views {
                let info = ublk_target::device::delete(id as i32)?;
                println!(
                    "test failover /dev/ublkb{id} (point {} of {}) removed",
                    info.point,
                    info.replica.display()
                );
            }
            Ok(())
        }
        PlanCommand::Commit {
            plan: PlanArgs { name, config },
        } => {
            let loaded = Loaded::load(&config)?;
            let plan = loaded.plan(&name)?;
            // Every volume passes what `commit` checks before any is committed.
            let mut not_failed_over = Vec::new();
            for id in plan.volumes() {
                let paths = loaded.volume(id).paths();
                require_applied(&paths).with_context(|| format!("volume {id}"))?;
                if ublk_target::rollback::committable(&paths).is_err() {
                    not_failed_over.push(id.as_str());
                }
            }
            anyhow::ensure!(
                not_failed_over.is_empty(),
                "plan {name}: {} not failed over, or the rollback did not finish; nothing \
                 committed (run `ublk-target plan failover {name}` first, or again)",
                not_failed_over.join(", ")
            );
            for id in plan.volumes() {
                let point = ublk_target::commit(&loaded.volume(id).paths())?;
                println!("volume {id}: failover to point {point} committed");
            }
            println!("plan {name} committed: its volumes are the primaries now");
            Ok(())
        }
    }
}

/// A plan as `plan show` reports it: its steps and the point each volume would get.
#[derive(serde::Serialize)]
struct PlanReport {
    plan: String,
    choice: String,
    /// What the points are, or `None` with `error` saying why there are none.
    at: Option<String>,
    error: Option<String>,
    steps: Vec<StepReport>,
}

#[derive(serde::Serialize)]
struct StepReport {
    pre: Option<String>,
    post: Option<String>,
    volumes: Vec<VolumeReport>,
}

#[derive(serde::Serialize)]
struct VolumeReport {
    volume: String,
    replica: PathBuf,
    point: Option<ublk_target::RecoveryPoint>,
}

impl PlanReport {
    fn new(loaded: &Loaded, plan: &PlanConfig, point: Option<PointChoice>) -> PlanReport {
        let chosen = loaded.choose(plan, point);
        let mut points = chosen.as_ref().ok().map(|c| c.points.iter());
        let steps = plan
            .steps
            .iter()
            .map(|step| StepReport {
                pre: step.pre.clone(),
                post: step.post.clone(),
                volumes: step
                    .volumes
                    .iter()
                    .map(|id| VolumeReport {
                        volume: id.to_string(),
                        replica: loaded.volume(id).replica.clone(),
                        point: points.as_mut().and_then(Iterator::next).copied(),
                    })
                    .collect(),
            })
            .collect();
        let (at, error) = match chosen {
            Ok(chosen) => (Some(chosen.what), None),
            Err(e) => (None, Some(changelog::error::one_line(&*e))),
        };
        PlanReport {
            plan: plan.name.clone(),
            choice: point.unwrap_or(plan.point).to_string(),
            at,
            error,
            steps,
        }
    }

    fn print(&self) {
        println!("plan {} (point {}):", self.plan, self.choice);
        if let Some(at) = &self.at {
            println!("  at {at}");
        }
        for (i, step) in self.steps.iter().enumerate() {
            println!("  step {}:", i + 1);
            if let Some(pre) = &step.pre {
                println!("    pre:  {pre}");
            }
            for v in &step.volumes {
                let at = match &v.point {
                    Some(p) => format!(
                        "point {} ({}{})",
                        p.index,
                        ublk_target::points::format_utc_ms(p.created_unix_ms),
                        if p.app_consistent { ", app" } else { "" }
                    ),
                    None => "-".into(),
                };
                println!("    {}: {at}, replica {}", v.volume, v.replica.display());
            }
            if let Some(post) = &step.post {
                println!("    post: {post}");
            }
        }
        if let Some(error) = &self.error {
            println!("  no failover possible now: {error}");
        }
    }
}

/// `plan failover`: see [`PlanCommand::Failover`].
fn failover(
    loaded: &Loaded,
    plan: &PlanConfig,
    point: Option<PointChoice>,
    test: bool,
    from_step: usize,
    log: &Path,
) -> Result<()> {
    let steps = plan.steps.len();
    anyhow::ensure!(
        (1..=steps).contains(&from_step),
        "--from-step {from_step}: plan {} has steps 1..={steps}",
        plan.name
    );
    let chosen = loaded.choose(plan, point)?;
    // Whatever would stop the plan halfway, checked before anything changes.
    let first = plan.steps[..from_step - 1]
        .iter()
        .map(|s| s.volumes.len())
        .sum::<usize>();
    if !test {
        for (id, p) in plan.volumes().zip(&chosen.points).skip(first) {
            ublk_target::rollback::preflight(&loaded.volume(id).paths(), p.index).map_err(|e| {
                anyhow::anyhow!(
                    "plan {}: volume {id} cannot fail over: {e}; nothing was changed",
                    plan.name
                )
            })?;
        }
        // Only once every volume passed, so "nothing was changed" holds above.
        for id in plan.volumes().skip(first) {
            if let Some(dir) = loaded.volume(id).failover_ring().parent() {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!(
                        "volume {id}: creating {} for its failover ring; nothing was changed",
                        dir.display()
                    )
                })?;
            }
        }
        let blkfilter = std::env::current_exe()?.with_file_name("blkfilter");
        anyhow::ensure!(
            blkfilter.exists(),
            "{} is missing (it serves the failed-over volumes; install it beside \
             ublk-target); nothing was changed",
            blkfilter.display()
        );
    }
    blkfilter::server::check_ublk().context("nothing was changed")?;
    let kind = if test { "test failover" } else { "failover" };
    println!("plan {}: {kind} at {}", plan.name, chosen.what);
    // A drill's figures: how long each step and the whole plan took (its part of the RTO).
    let started = std::time::Instant::now();
    let mut points = plan.volumes().zip(chosen.points.iter().map(|p| p.index));
    // Volumes of the steps before --from-step are up already: found, not brought up.
    let mut up: Vec<(VolumeId, u32)> = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let number = i + 1;
        let step_started = std::time::Instant::now();
        let step_points: Vec<(&VolumeId, u64)> = points.by_ref().take(step.volumes.len()).collect();
        if number < from_step {
            for (id, point) in step_points {
                match device_of(&loaded.volume(id).replica, point, test)? {
                    Some(dev) => up.push((id.clone(), dev)),
                    None => log::warn!(
                        "volume {id} of step {number} is not up; its hooks' variables are missing"
                    ),
                }
            }
            continue;
        }
        let stopped = |up: &[(VolumeId, u32)], what: String| {
            let up_now: Vec<String> = up
                .iter()
                .map(|(v, id)| format!("{v} /dev/ublkb{id}"))
                .collect();
            let undo = if test {
                format!(
                    "; `ublk-target plan cleanup {}` removes what is up",
                    plan.name
                )
            } else {
                String::new()
            };
            anyhow::anyhow!(
                "plan {} stopped at step {number}: {what}. Up: {}. Fix the cause and continue \
                 with `--from-step {number}`{undo}",
                plan.name,
                if up_now.is_empty() {
                    "nothing".into()
                } else {
                    up_now.join(", ")
                }
            )
        };
        if let Some(pre) = &step.pre {
            let env = plan::hook_env(&plan.name, number, test, &up);
            ublk_target::hook::run(pre, &env, plan.hook_timeout())
                .map_err(|e| stopped(&up, format!("pre hook {e}")))?;
        }
        for (id, point) in step_points {
            let volume = loaded.volume(id);
            // Up already: a re-run with --from-step after a later part of this step
            // failed (its post hook, another volume).
            if let Some(dev) = device_of(&volume.replica, point, test)? {
                println!("step {number}: {id} at point {point} is up already as /dev/ublkb{dev}");
                up.push((id.clone(), dev));
                continue;
            }
            let dev = bring_up(volume, point, test, log).map_err(|e| {
                stopped(
                    &up,
                    format!("volume {id}: {}", changelog::error::one_line(&*e)),
                )
            })?;
            println!("step {number}: {id} at point {point} is /dev/ublkb{dev}");
            up.push((id.clone(), dev));
        }
        if let Some(post) = &step.post {
            let env = plan::hook_env(&plan.name, number, test, &up);
            ublk_target::hook::run(post, &env, plan.hook_timeout())
                .map_err(|e| stopped(&up, format!("post hook {e}")))?;
        }
        println!(
            "step {number} done in {:.2} s",
            step_started.elapsed().as_secs_f64()
        );
    }
    if test {
        println!(
            "plan {}: test failover up in {:.2} s; end it with `ublk-target plan cleanup {}`",
            plan.name,
            started.elapsed().as_secs_f64(),
            plan.name
        );
    } else {
        println!(
            "plan {}: failed over in {:.2} s; `ublk-target plan commit {}` makes it final",
            plan.name,
            started.elapsed().as_secs_f64(),
            plan.name
        );
    }
    Ok(())
}

/// Brings one volume up at `point`: a test view, or rolled back and protected.
fn bring_up(volume: &VolumeConfig, point: u64, test: bool, log: &Path) -> Result<u32> {
    let paths = volume.paths();
    if test {
        return blkfilter::daemon::spawn_server(log, view_server(&paths, point, -1));
    }
    ublk_target::rollback_to(&paths, point)?;
    attach_protected(&paths.replica, &volume.failover_ring(), None)
}

/// The device serving `replica` at `point` now: its test view of that point, or the
/// protected volume over it (a replica is served so only once failed over).
fn device_of(replica: &Path, point: u64, test: bool) -> Result<Option<u32>> {
    if test {
        let views = off_thread(ublk_target::device::views)?;
        return Ok(views
            .into_iter()
            .find(|(_, info)| info.point == point && same_file(&info.replica, replica))
            .map(|(id, _)| id));
    }
    let devices = off_thread(blkfilter::server::list)?;
    Ok(devices
        .into_iter()
        .find(|d| {
            d.target
                .as_ref()
                .is_some_and(|t| same_file(&t.backing, replica))
        })
        .map(|d| d.id))
}

/// Runs `f` on a thread of its own, joined before returning. For calls through
/// libublk's control: its io_uring lives in a thread-local, and one made on the main
/// thread would be inherited by every test view server `spawn_server` forks later.
fn off_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| scope.spawn(f).join().expect("device lookup thread"))
}

/// Whether two paths name one file (as given, or once resolved).
fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(a), Ok(b)) if a == b
        )
}
