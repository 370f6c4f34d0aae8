//! `ublk-target`: the recovery-side command line.

use anyhow::{Context, Result};
use changelog::alert::{Alerts, Site};
use changelog::{Key, TargetStore, VolumeId};
use clap::{Args, Parser, Subcommand};
use objstore::StoreLocation;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_target::config::{TargetConfig, VolumeConfig};
use ublk_target::health::FollowHealth;
use ublk_target::{
    Applied, Applier, ApplyOptions, ReplicaPaths, Retention, TargetError, UndoMethod,
};

mod plan_cli;
mod status_cli;

/// Recovery side of ublk-dr: verify change-log segments and apply them to replica disks.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify and apply a volume's segments from a store to its replica image.
    ///
    /// Each segment is authenticated and checked against the hash chain before any of
    /// its bytes touch the replica. The applied position is kept in --state, so an
    /// interrupted run continues where it stopped.
    #[command(after_long_help = ublk_target::config::EXAMPLE)]
    Apply {
        /// Config file with the store, key, retention and one [[volume]] table per
        /// replica (format below); replaces --store, --key,
        /// --replica, --state, --journal and the retention options. Without --volume
        /// every volume in it is applied, each on its own thread.
        #[arg(
            long,
            conflicts_with_all = ["store", "key", "replica", "state", "journal", "keep_points", "keep_age", "keep_size", "thin_after", "thin_every"]
        )]
        config: Option<PathBuf>,
        /// Target store, the shipper's --store: a directory, az://CONTAINER/PREFIX,
        /// s3://BUCKET/PREFIX (credentials from the environment, see README) or a
        /// receiver's tcp://HOST:PORT or tls://HOST:PORT.
        #[arg(long, required_unless_present = "config")]
        store: Option<StoreLocation>,
        /// Volume id (with --config: only this volume of the file).
        #[arg(long, required_unless_present = "config")]
        volume: Option<VolumeId>,
        /// Replica image file or block device, the size of the volume (must exist).
        #[arg(long, required_unless_present = "config")]
        replica: Option<PathBuf>,
        /// Key file, the same as the shipper's.
        #[arg(long, required_unless_present = "config")]
        key: Option<PathBuf>,
        /// Where the applied position is kept [default: REPLICA.state].
        #[arg(long)]
        state: Option<PathBuf>,
        /// Undo journal directory, which keeps the older recovery points
        /// [default: REPLICA.journal].
        #[arg(long)]
        journal: Option<PathBuf>,
        #[command(flatten)]
        retention: RetentionArgs,
        /// Keep running and apply new segments as they arrive.
        #[arg(long)]
        follow: bool,
        /// How often --follow looks for new segments, in milliseconds [default: 200, or
        /// the config's poll_ms].
        #[arg(long)]
        poll_ms: Option<u64>,
        /// Answer resync requests so that every block is sent, not only the ones that
        /// differ: failback's "full download", or a replica that cannot be trusted.
        #[arg(long)]
        full_download: bool,
        /// Copy before-images into the undo journal, with a checksum, even where the
        /// filesystem (XFS, btrfs) could share the replica's blocks with it instead:
        /// slower, but a damaged journal is then detected.
        #[arg(long)]
        copy_undo: bool,
        /// Leave applied segments in the store. By default each is deleted once the
        /// replica's position after it is durable: the recovery points live in the undo
        /// journals, and the store would otherwise grow without end. Keep them when
        /// something else reads the store too (a second replica, an archive).
        #[arg(long)]
        keep_applied_segments: bool,
        /// With --follow: the RPO (how long ago the replica last held every write of
        /// the source) above which the volume's health is Warning, in ms [default:
        /// 60000, or the config's rpo_threshold_ms].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rpo_threshold_ms: Option<u64>,
        /// With --follow: run this shell command on each health change of a volume,
        /// with UBLK_DR_VOLUME, UBLK_DR_HEALTH, UBLK_DR_PREVIOUS_HEALTH, UBLK_DR_STATE,
        /// UBLK_DR_RPO_MS, UBLK_DR_SITE=recovery and UBLK_DR_HOST in its environment
        /// (e.g. to page someone when the protected site goes dark) [default: the
        /// config's alert_command].
        #[arg(long, value_name = "CMD")]
        alert_command: Option<String>,
        /// With --follow: how long a new health must hold before it is reported, in ms
        /// (Critical is reported at once) [default: 10000, or the config's
        /// alert_hold_ms].
        #[arg(long)]
        alert_hold_ms: Option<u64>,
    },
    /// List a replica's recovery points: the latest applied one and every older one
    /// whose undo journals are retained.
    Points {
        #[command(flatten)]
        replica: ReplicaArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the consistency-group cuts every one of the given volumes has a recovery
    /// point at (volumes attached with one `blkfilter --group-clock`): failing each
    /// volume over to its point of one cut (`failover VOLUME --group-cut N`) gives the
    /// whole group as it was at one instant, as after a power cut of all of them.
    GroupPoints {
        /// The group's volumes, by id in the config file (at least two, with --replica).
        #[arg(value_name = "VOLUME", required_unless_present = "replica")]
        volumes: Vec<VolumeId>,
        /// The recovery side's config file, for the VOLUMEs.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// A replica (with REPLICA.state and REPLICA.journal) instead of a VOLUME;
        /// repeatable.
        #[arg(long)]
        replica: Vec<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drop the oldest undo journals so that at most --keep-points points remain, none
    /// is older than --keep-age and the journals take at most --keep-size of disk (the
    /// latest point and points held by open views are always kept). Not while `apply`
    /// runs on the replica: give it the same options instead.
    Prune {
        #[command(flatten)]
        replica: ReplicaArgs,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Failover: make the replica equal its state at --point for real, so it can become
    /// the primary. Stop `apply` and close point views first. No further segment is
    /// applied to the replica afterwards, and older points are dropped. Safe to re-run
    /// after an interruption.
    Rollback {
        #[command(flatten)]
        replica: ReplicaArgs,
        /// The recovery point (see `ublk-target points`).
        #[arg(long)]
        point: u64,
    },
    /// Bring a volume up at the recovery site as /dev/ublkbN.
    ///
    /// --test: serve the replica as it was at --point (default: the latest) through a
    /// throw-away write overlay; the replica, its points and a running `apply` are not
    /// affected, and the view stays at the point while applying goes on. Remove it with
    /// `failover --cleanup --id N`.
    ///
    /// Without --test (unplanned failover; a planned one is the same after the source
    /// was detached, the shipper drained and every segment applied): roll the replica
    /// back to --point for real and serve it with capture into --ring, so it is
    /// protected from its first write and ready to replicate back (failback). Stop
    /// `apply` first. Then `ublk-target commit`.
    Failover {
        #[command(flatten)]
        replica: ReplicaArgs,
        /// The recovery point (see `ublk-target points`) [default: the latest].
        #[arg(long)]
        point: Option<u64>,
        /// The volume's recovery point at this consistency-group cut (see
        /// `ublk-target group-points`), instead of --point.
        #[arg(long, value_name = "N", conflicts_with_all = ["point", "cleanup"])]
        group_cut: Option<u64>,
        /// Test failover: a disposable view, nothing changes.
        #[arg(long, conflicts_with_all = ["ring", "cleanup"])]
        test: bool,
        /// End a test failover: delete view device --id and its overlay.
        #[arg(long, requires = "id", conflicts_with_all = ["volume", "replica", "point"])]
        cleanup: bool,
        /// Capture ring of the recovered volume (real failover).
        #[arg(long, required_unless_present_any = ["test", "cleanup"])]
        ring: Option<PathBuf>,
        /// Device id [default: the kernel picks].
        #[arg(long)]
        id: Option<i32>,
        /// Serve a test view in the foreground instead of daemonizing.
        #[arg(long)]
        foreground: bool,
        /// Where a daemonized server logs.
        #[arg(long, default_value = "/run/ublk-dr/ublk-target.log")]
        log: PathBuf,
    },
    /// After a failover: the recovered volume is the primary now. Records that in the
    /// replica's state, so nothing can apply the old direction's segments to it; the
    /// next step is protecting it back toward the original disk (failback).
    Commit {
        #[command(flatten)]
        replica: ReplicaArgs,
    },
    /// Write the replica as it was at --point to a file, without changing the replica.
    Export {
        #[command(flatten)]
        replica: ReplicaArgs,
        /// The recovery point (see `ublk-target points`).
        #[arg(long)]
        point: u64,
        /// Output image file (created or overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Receive segments from shippers over the network into a store directory: the
    /// recovery site's end of a tcp://HOST:PORT (or, with --tls-cert, tls://HOST:PORT)
    /// store.
    ///
    /// Shippers on other hosts use `--store tcp://THIS-HOST:PORT`; `ublk-target apply
    /// --store DIR` applies from the directory here. Each upload is answered after it is
    /// durable in DIR. Segments are encrypted and authenticated end to end, so the
    /// network sees only ciphertext; the token keeps strangers from writing here.
    ///
    /// Over plain TCP the token travels in clear and anything on the path could answer
    /// for this receiver. With --tls-cert and --tls-key only TLS clients are served
    /// (`--store tls://THIS-HOST:PORT`, trusting the CA in UBLK_DR_RECEIVER_CA), so the
    /// token is private and an answered upload comes from here.
    ///
    /// SIGHUP (`systemctl reload ublk-dr-receiver`) reads the token file, certificates,
    /// revocation list and client volumes again without dropping connections; a
    /// connected client they no longer admit is refused at its next call.
    Receive {
        /// Address to listen on, HOST:PORT (0.0.0.0:7087 for every interface).
        #[arg(long)]
        listen: String,
        /// Store directory (must exist); volumes' segments go to DIR/VOLUME/.
        #[arg(long)]
        store: PathBuf,
        #[command(flatten)]
        admission: AdmissionFiles,
    },
    /// Show each volume of the config file at this site: its health, its newest
    /// recovery point, the RPO (how long ago the replica last held every write of the
    /// source, by that point's time or the shipper's heartbeat: at most what a failover
    /// now would lose, as far as this site knows; Warning above the config's
    /// rpo_threshold_ms), the retained points, the segments waiting in the store, and
    /// whether it was failed over. Then each recovery plan of the file: the point its failover
    /// would take now and the age of the oldest of its volumes' points there (with group
    /// cuts, how long ago the group last had a common point).
    Status(status_cli::StatusArgs),
    /// Recovery plans: the volumes of a `[[plan]]` in the config file failed over
    /// together, step by step with hooks, at one choice of point (by default the latest
    /// consistency-group cut every volume has).
    #[command(subcommand)]
    Plan(plan_cli::PlanCommand),
    /// Print a segment's header, and with --key verify it and list its records.
    Inspect {
        /// A segment file (`<volume>/<index>.seg` in a store or staging directory).
        segment: PathBuf,
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

/// Which replica, with its state and journal: a volume of the config file, or paths.
#[derive(Args)]
struct ReplicaArgs {
    /// The volume, by its id in the config file (which names its replica, state and
    /// journal); or give --replica instead.
    #[arg(value_name = "VOLUME", conflicts_with = "replica")]
    volume: Option<VolumeId>,
    /// The recovery side's config file, for VOLUME (the one `apply --config` reads).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Replica image file or block device (instead of VOLUME).
    #[arg(long)]
    replica: Option<PathBuf>,
    /// The applied position [default: the config's, or REPLICA.state].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Undo journal directory [default: the config's, or REPLICA.journal].
    #[arg(long)]
    journal: Option<PathBuf>,
}

/// The point of `catalog` at group cut `cut`, refusing a cut that has none or is
/// ambiguous (the same number under two clocks: numbers start again with a new clock).
/// The replica's newest recovery point: its last applied segment when that is one
/// (from the state file alone), else the catalog's newest.
fn latest_point(paths: &ReplicaPaths) -> Result<u64> {
    let state = ublk_target::ApplyState::load(&paths.state, None)?;
    if let Some(last) = state.and_then(|s| s.last).filter(|l| l.is_crash_point()) {
        return Ok(last.index);
    }
    ublk_target::catalog(paths)?
        .latest_point()
        .map(|p| p.index)
        .context("the replica has no recovery point yet")
}

fn point_at_group_cut(
    catalog: &ublk_target::Catalog,
    cut: u64,
    replica: &std::path::Path,
) -> Result<u64> {
    match ublk_target::group_cuts::points_at(catalog, cut)[..] {
        [(_, point)] => Ok(point),
        [] => anyhow::bail!(
            "{} has no recovery point at group cut {cut}; see `ublk-target group-points` for \
             the cuts every volume of the group has",
            replica.display()
        ),
        ref several => anyhow::bail!(
            "group cut {cut} exists under {} group clocks here (cut numbers start again with \
             a new clock, e.g. after a reboot): points {}; see `ublk-target group-points` \
             and give --point",
            several.len(),
            several
                .iter()
                .map(|(clock, p)| format!("{p} (clock {clock:016x})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Where `ublk-target` looks for VOLUME's replica without --config (the systemd unit's).
const DEFAULT_CONFIG: &str = "/etc/ublk-dr/target.toml";

impl ReplicaArgs {
    fn paths(self) -> Result<ReplicaPaths> {
        let paths = match (self.volume, self.replica) {
            (_, Some(replica)) => ReplicaPaths::new(replica),
            (Some(volume), None) => {
                let config = TargetConfig::load(&self.config)?;
                let v = config
                    .volume(&volume)
                    .map_err(|what| anyhow::anyhow!("config {}: {what}", self.config.display()))?;
                v.paths()
            }
            (None, None) => anyhow::bail!(
                "which replica? name its VOLUME (from the config file, --config, default \
                 {DEFAULT_CONFIG}) or give --replica"
            ),
        };
        // --state and --journal override the config's (or the defaults).
        Ok(paths.with_state(self.state).with_journal(self.journal))
    }
}

#[derive(Args)]
struct RetentionArgs {
    /// Keep at most this many recovery points, counting the latest (at least 1).
    #[arg(long, value_parser = parse_keep_points)]
    keep_points: Option<usize>,
    /// Drop points older than this: seconds, or a number with s, m, h or d (30m, 2h,
    /// 15d). The latest point is always kept.
    #[arg(long, value_parser = ublk_target::points::parse_age)]
    keep_age: Option<Duration>,
    /// Let the undo journals take at most this much disk (512M, 50G, 2T: powers of
    /// 1024), dropping the oldest points first: a bounded journal, whose history is as
    /// long as the space allows. The latest point is always kept.
    #[arg(long, value_parser = ublk_target::points::parse_keep_size)]
    keep_size: Option<u64>,
    /// Thin out points older than this (30m, 2h, 1d), keeping one per --thin-every:
    /// fine-grained points for the recent past, sparse ones further back, with their
    /// undo journals merged (what a bucket's journals change, once).
    #[arg(long, value_parser = ublk_target::points::parse_age, requires = "thin_every")]
    thin_after: Option<Duration>,
    /// With --thin-after: keep the newest point of each interval this long (1h, 1d),
    /// by the source's clock.
    #[arg(long, value_parser = parse_thin_every, requires = "thin_after")]
    thin_every: Option<Duration>,
}

impl RetentionArgs {
    fn retention(&self) -> Retention {
        Retention {
            keep_points: self.keep_points,
            keep_age: self.keep_age,
            keep_size: self.keep_size,
            thin: self
                .thin_after
                .zip(self.thin_every)
                .map(|(after, every)| ublk_target::points::Thinning { after, every }),
        }
    }
}

fn parse_thin_every(text: &str) -> std::result::Result<Duration, String> {
    match ublk_target::points::parse_age(text)? {
        every if every.is_zero() => Err("must be more than 0".into()),
        every => Ok(every),
    }
}

fn parse_keep_points(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (the latest point is always kept)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a number of points")),
    }
}

/// Refuses, before anything is created, a replica that was never applied to.
fn require_applied(paths: &ReplicaPaths) -> Result<()> {
    if !paths.replica.exists() {
        anyhow::bail!(
            "replica {} does not exist (give the replica `apply` writes)",
            paths.replica.display()
        );
    }
    if !paths.state.exists() {
        anyhow::bail!(
            "no applied state {} for replica {}: nothing was applied to it yet, or give --state",
            paths.state.display(),
            paths.replica.display()
        );
    }
    Ok(())
}

/// The server of a test view: the replica at `point` through a throw-away overlay as
/// ublk device `id` (-1: the kernel picks), for `run_server` or `spawn_server`.
fn view_server(
    paths: &ReplicaPaths,
    point: u64,
    id: i32,
) -> impl FnOnce(blkfilter::daemon::Ready) -> ublk_target::Result<()> {
    // The view is opened in the server (after the fork), so its registration, which
    // keeps its journals from pruning, names the process that lives as long as it. A
    // bad point is still an error of this command: the server reports it back.
    let started = std::time::Instant::now();
    let paths = paths.clone();
    move |ready| {
        let view = ublk_target::PointView::open(&paths, point)?;
        let info = ublk_target::device::ViewInfo {
            replica: paths.replica.clone(),
            point,
            scratch: view.scratch_path().to_path_buf(),
        };
        ublk_target::device::serve(view, id, &info, move |id| {
            log::info!(
                "test failover of point {point} is /dev/ublkb{id} ({:.2} s to bring up)",
                started.elapsed().as_secs_f64()
            );
            ready(id)
        })
    }
}

/// Serves the rolled-back replica as a protected volume: `blkfilter attach` with
/// capture into `ring`. Returns the device's id.
fn attach_protected(
    replica: &std::path::Path,
    ring: &std::path::Path,
    id: Option<i32>,
) -> Result<u32> {
    let exe = std::env::current_exe().context("locating this program")?;
    let blkfilter = exe.with_file_name("blkfilter");
    let mut cmd = std::process::Command::new(&blkfilter);
    cmd.arg("attach")
        .arg("--backing")
        .arg(replica)
        .arg("--ring")
        .arg(ring);
    if let Some(id) = id {
        cmd.args(["--id", &id.to_string()]);
    }
    // Only the first line: the daemon blkfilter leaves behind must not be waited for.
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", blkfilter.display()))?;
    let mut printed = String::new();
    if let Some(stdout) = child.stdout.take() {
        use std::io::BufRead;
        let _ = std::io::BufReader::new(stdout).read_line(&mut printed);
    }
    let status = child.wait().context("waiting for blkfilter attach")?;
    anyhow::ensure!(
        status.success(),
        "blkfilter attach failed ({status}); the replica is rolled back, attach it by hand: blkfilter attach --backing {} --ring {}",
        replica.display(),
        ring.display()
    );
    // blkfilter prints the device it attached: "/dev/ublkbN".
    printed
        .trim()
        .strip_prefix("/dev/ublkb")
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("blkfilter attach printed {printed:?}, not /dev/ublkbN"))
}

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,libublk=warn"),
    )
    .init();
    raise_open_file_limit();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("ublk-target: error: {}", changelog::error::one_line(&*e));
        // 3: `apply --follow` stopped where retrying cannot help (see the systemd unit).
        let stopped = e.downcast_ref::<FollowStopped>().is_some();
        std::process::exit(if stopped { 3 } else { 1 });
    }
}

/// Raises the soft limit on open files to the hard one (systemd's is 524,288): `apply
/// --config` holds a replica, journal, lock and io_uring per volume, which for many
/// volumes passes the usual soft limit of 1,024, and a point view keeps up to a
/// sixteenth of the limit of its undo files open (reopening the others costs reads).
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a pointer to a live, initialized rlimit.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
            && limit.rlim_cur < limit.rlim_max
            && {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
            }
    };
    if raised {
        log::debug!("open file limit raised to {}", limit.rlim_cur);
    }
}

/// `apply --follow` stopped on an error met while applying that retrying cannot mend
/// (a segment that does not verify, a broken chain, an unreadable state; its Critical
/// alert was raised): an operator must act, so the service is not restarted over and
/// over. Errors of the setup before it (a store directory or replica not there yet)
/// end with status 1, which the unit restarts.
#[derive(Debug)]
struct FollowStopped(String);

impl std::fmt::Display for FollowStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FollowStopped {}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Apply {
            config,
            store,
            volume,
            replica,
            key,
            state,
            journal,
            retention,
            follow,
            poll_ms,
            full_download,
            copy_undo,
            keep_applied_segments,
            rpo_threshold_ms,
            alert_command,
            alert_hold_ms,
        } => {
            let from_ms =
                |ms: Option<u64>, default: Duration| ms.map_or(default, Duration::from_millis);
            let (jobs, poll) = match config {
                Some(path) => {
                    let config = TargetConfig::load(&path)?;
                    let key = Key::load(&config.key)?;
                    let picked: Vec<&VolumeConfig> = match &volume {
                        Some(id) => vec![config.volume(id).map_err(|what| {
                            anyhow::anyhow!("config {}: {what}", path.display())
                        })?],
                        None => config.volumes.iter().collect(),
                    };
                    let jobs = picked
                        .into_iter()
                        .map(|v| ApplyJob {
                            store: config.store.clone(),
                            volume: v.id.clone(),
                            replica: v.replica.clone(),
                            key: key.clone(),
                            key_file: config.key.clone(),
                            state: v.state.clone(),
                            journal: v.journal.clone(),
                            retention: config.retention(v).expect("checked on load"),
                            full_download: v.full_download || full_download,
                            copy_undo: v.copy_undo || copy_undo,
                            prune_store: !(config.keep_applied_segments || keep_applied_segments),
                            alerting: Alerting {
                                rpo_threshold: from_ms(rpo_threshold_ms, config.rpo_threshold()),
                                command: alert_command.clone().or(config.alert_command.clone()),
                                hold: from_ms(
                                    alert_hold_ms,
                                    Duration::from_millis(config.alert_hold_ms),
                                ),
                            },
                        })
                        .collect();
                    (jobs, poll_ms.map_or(config.poll(), Duration::from_millis))
                }
                None => {
                    let key_file = key.expect("clap requires it");
                    let job = ApplyJob {
                        store: store.expect("clap requires it"),
                        volume: volume.expect("clap requires it"),
                        replica: replica.expect("clap requires it"),
                        key: Key::load(&key_file)?,
                        key_file,
                        state,
                        journal,
                        retention: retention.retention(),
                        full_download,
                        copy_undo,
                        prune_store: !keep_applied_segments,
                        alerting: Alerting {
                            rpo_threshold: from_ms(
                                rpo_threshold_ms,
                                ublk_target::health::DEFAULT_RPO_THRESHOLD,
                            ),
                            command: alert_command,
                            hold: from_ms(alert_hold_ms, changelog::alert::DEFAULT_HOLD),
                        },
                    };
                    (vec![job], Duration::from_millis(poll_ms.unwrap_or(200)))
                }
            };
            let follow = follow.then_some(poll);
            if let [job] = &jobs[..] {
                return job.run(follow, true);
            }
            // One thread per volume: a volume that fails stops alone, and the command
            // exits non-zero once the others are done (with --follow, never unless all
            // failed).
            // Each failed volume, and whether it stopped for an operator.
            let failed: Vec<(String, bool)> = std::thread::scope(|scope| {
                let handles: Vec<_> = jobs
                    .iter()
                    .map(|job| (job, scope.spawn(move || job.run(follow, false))))
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|(job, handle)| match handle.join().expect("apply thread") {
                        Ok(()) => None,
                        Err(e) => {
                            eprintln!(
                                "ublk-target: volume {}: error: {}",
                                job.volume,
                                changelog::error::one_line(&*e)
                            );
                            let stopped = e.downcast_ref::<FollowStopped>().is_some();
                            Some((job.volume.to_string(), stopped))
                        }
                    })
                    .collect()
            });
            if failed.is_empty() {
                return Ok(());
            }
            let names: Vec<&str> = failed.iter().map(|(v, _)| v.as_str()).collect();
            let what = format!(
                "{} of {} volume(s) failed: {}",
                failed.len(),
                jobs.len(),
                names.join(", ")
            );
            // Not restarted (exit 3) only when restarting would help none of them.
            match failed.iter().all(|(_, stopped)| *stopped) {
                true => Err(FollowStopped(what).into()),
                false => Err(anyhow::anyhow!(what)),
            }
        }
        Command::Points { replica, json } => {
            let paths = replica.paths()?;
            require_applied(&paths)?;
            let catalog = ublk_target::catalog(&paths)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&catalog)?);
            } else {
                print!("{}", catalog.table());
            }
            Ok(())
        }
        Command::GroupPoints {
            volumes,
            config,
            replica,
            json,
        } => {
            let mut members = Vec::new();
            if !volumes.is_empty() {
                let file = TargetConfig::load(&config)?;
                for id in &volumes {
                    let v = file
                        .volume(id)
                        .map_err(|what| anyhow::anyhow!("config {}: {what}", config.display()))?;
                    members.push((id.to_string(), v.paths()));
                }
            }
            for r in replica {
                members.push((r.display().to_string(), ReplicaPaths::new(r)));
            }
            anyhow::ensure!(
                members.len() >= 2,
                "a consistency group has at least two volumes: name them all \
                 (`ublk-target points` lists one volume's points and cuts)"
            );
            let mut catalogs = Vec::new();
            for (name, paths) in members {
                require_applied(&paths)?;
                let catalog = ublk_target::catalog(&paths)
                    .with_context(|| format!("reading the recovery points of {name}"))?;
                catalogs.push((name, catalog));
            }
            let points = ublk_target::group_cuts::common_points(&catalogs);
            if json {
                println!("{}", serde_json::to_string_pretty(&points)?);
            } else {
                let names: Vec<String> = catalogs.iter().map(|(n, _)| n.clone()).collect();
                print!("{}", ublk_target::group_cuts::table(&names, &points));
                if points.is_empty() {
                    println!(
                        "no group cut has a recovery point on every volume yet (are they \
                         attached with one --group-clock, and does `shipper run` cut it?)"
                    );
                }
            }
            Ok(())
        }
        Command::Prune { replica, retention } => {
            let retention = retention.retention();
            if retention.is_unlimited() {
                anyhow::bail!("give --keep-points, --keep-age, --keep-size and/or --thin-after");
            }
            let paths = replica.paths()?;
            require_applied(&paths)?;
            let report = ublk_target::prune(&paths, &retention, changelog::unix_ms_now())?;
            let left = format!(
                "{} point(s) left, undo journals on {}",
                report.points_left,
                ublk_target::points::format_bytes(report.journal_bytes)
            );
            let first = report.removed.iter().map(|&(first, _)| first).min();
            let last = report.removed.iter().map(|&(_, last)| last).max();
            match (first, last) {
                (Some(first), Some(last)) => println!(
                    "removed {} undo file(s) of segments within {first}..={last}; {left}",
                    report.removed.len()
                ),
                _ => println!("nothing to remove; {left}"),
            }
            for view in report.held_by {
                println!(
                    "view {} holds point {} (its journals were kept)",
                    view.name,
                    view.point.map_or("?".into(), |p| p.to_string())
                );
            }
            Ok(())
        }
        Command::Rollback { replica, point } => {
            let paths = replica.paths()?;
            require_applied(&paths)?;
            let report = ublk_target::rollback_to(&paths, point)?;
            println!(
                "replica {} is at point {point} ({} segment(s) undone now); it is no longer \
                 applied to and can be used as the primary",
                paths.replica.display(),
                report.undone.len()
            );
            Ok(())
        }
        Command::Export {
            replica,
            point,
            out,
        } => {
            let paths = replica.paths()?;
            require_applied(&paths)?;
            let mut view = ublk_target::PointView::open(&paths, point)?;
            let bar = progress_bar(
                view.size(),
                "{bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            );
            ublk_target::view::export(&mut view, &out, |done| bar.set_position(done))?;
            bar.finish_and_clear();
            view.close()?;
            println!(
                "wrote point {point} of {} to {}",
                paths.replica.display(),
                out.display()
            );
            Ok(())
        }
        Command::Failover {
            replica,
            point,
            group_cut,
            test,
            cleanup,
            ring,
            id,
            foreground,
            log,
        } => {
            if cleanup {
                let id = id.expect("clap: --cleanup requires --id");
                let info = ublk_target::device::delete(id)?;
                println!(
                    "test failover /dev/ublkb{id} (point {} of {}) removed; its writes are gone",
                    info.point,
                    info.replica.display()
                );
                return Ok(());
            }
            let paths = replica.paths()?;
            require_applied(&paths)?;
            // The catalog reads every retained journal: only for a group cut (or when
            // the last applied segment is no point), so bringing a point up costs what
            // its own journals do, however many are retained.
            let point = match (point, group_cut) {
                (Some(p), _) => p,
                (None, Some(cut)) => {
                    point_at_group_cut(&ublk_target::catalog(&paths)?, cut, &paths.replica)?
                }
                (None, None) => latest_point(&paths)?,
            };
            if test {
                let server = view_server(&paths, point, id.unwrap_or(-1));
                return blkfilter::daemon::run_server(foreground, &log, server);
            }
            let report = ublk_target::rollback_to(&paths, point)?;
            eprintln!(
                "replica {} rolled back to point {point} ({} segment(s) undone); bringing it up with capture",
                paths.replica.display(),
                report.undone.len()
            );
            let ring = ring.expect("clap: ring unless test or cleanup");
            let id = attach_protected(&paths.replica, &ring, id)?;
            println!("/dev/ublkb{id}");
            Ok(())
        }
        Command::Commit { replica } => {
            let paths = replica.paths()?;
            require_applied(&paths)?;
            let point = ublk_target::commit(&paths)?;
            println!(
                "failover of {} to point {point} committed: it is the primary now; protect it \
                 back toward the original disk to fail back",
                paths.replica.display()
            );
            Ok(())
        }
        Command::Receive {
            listen,
            store,
            admission: files,
        } => {
            // Before any thread starts, so that they all inherit the mask and SIGHUP
            // reaches only the thread that waits for it.
            let hangup = block_hangup()?;
            let admission = files.load()?;
            if admission.token.is_empty() {
                log::warn!("no --token-file: any client that reaches {listen} may write");
            }
            let scheme = if admission.tls.is_some() {
                "tls"
            } else {
                "tcp"
            };
            let receiver = objstore::Receiver::bind(&listen, &store, admission)?;
            reload_on_hangup(hangup, files, receiver.admission());
            log::info!(
                "receiving on {scheme}://{} into {}",
                receiver.local_addr(),
                store.display()
            );
            Ok(receiver.serve()?)
        }
        Command::Status(args) => status_cli::run(args),
        Command::Plan(command) => plan_cli::run(command),
        Command::Inspect { segment, key } => {
            let key = key.map(|k| Key::load(&k)).transpose()?;
            let bytes = std::fs::read(&segment)
                .with_context(|| format!("reading {}", segment.display()))?;
            print!(
                "{}",
                changelog::inspect::inspect(bytes, &segment.display().to_string(), key.as_ref())?
            );
            Ok(())
        }
    }
}

/// A progress bar on stderr (drawn only when that is a terminal).
fn progress_bar(len: u64, figures: &str) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(&format!("[{{bar:30}}] {figures}"))
            .expect("valid template")
            .progress_chars("=> "),
    )
}

/// Applies every segment available now, with a progress bar over the segments the
/// store holds beyond the replica's position when there is more than one (a catch-up,
/// e.g. failback's final delta or a new replica).
fn apply_with_progress(
    applier: &mut Applier,
    store: &dyn TargetStore,
    on_applied: &mut dyn FnMut(&Applied),
) -> Result<usize> {
    let next = applier.cursor().next_index;
    let pending = store
        .list(&applier.cursor().volume)?
        .into_iter()
        .filter(|&i| i >= next)
        .count() as u64;
    if pending <= 1 {
        return Ok(applier.apply_available_with(on_applied)?);
    }
    let bar = progress_bar(pending, "{pos}/{len} segments, {msg} written, ETA {eta}");
    let mut written = 0u64;
    let applied = applier.apply_available_with(|a| {
        on_applied(a);
        written += a.bytes_written;
        bar.set_message(indicatif::HumanBytes(written).to_string());
        bar.inc(1);
    });
    bar.finish_and_clear();
    Ok(applied?)
}

/// The files a receiver's admission comes from, read at start and on SIGHUP.
#[derive(clap::Args)]
struct AdmissionFiles {
    /// File holding the token clients must present (their UBLK_DR_RECEIVER_TOKEN).
    /// Without it, any client that reaches the port may write.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve TLS only, with this certificate chain (PEM; its names must include the
    /// HOST that clients connect to).
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Serve only clients with a certificate signed by a CA in this PEM file (their
    /// UBLK_DR_RECEIVER_CLIENT_CERT and UBLK_DR_RECEIVER_CLIENT_KEY): a credential
    /// per protected host, checked before the token.
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
    /// Refuse the client certificates these revocation lists (PEM, from the client
    /// CA) name. Read again on SIGHUP (`systemctl reload ublk-dr-receiver`): a
    /// connected client it now names is cut off at its next call.
    #[arg(long, requires = "tls_client_ca", value_name = "PEM")]
    tls_client_crl: Option<PathBuf>,
    /// Give each client only its own volumes: a TOML file whose [clients] table maps
    /// the DNS name or IP address in a host's client certificate (subjectAltName) to
    /// the volumes it may reach, e.g. "host-a.example.com" = ["vol0", "vol1"] ("*":
    /// every volume). Calls about other volumes are refused; a wildcard certificate
    /// matches no entry. Read again on SIGHUP, as are the token file and the
    /// certificates: connected clients are checked against them at their next call.
    #[arg(long, requires = "tls_client_ca", value_name = "FILE")]
    client_volumes: Option<PathBuf>,
}

impl AdmissionFiles {
    fn load(&self) -> Result<objstore::Admission> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                objstore::tls::server_config(
                    cert,
                    key,
                    objstore::tls::ClientAuth {
                        ca: self.tls_client_ca.as_deref(),
                        crl: self.tls_client_crl.as_deref(),
                    },
                )
                .map_err(|what| anyhow::anyhow!(what))?,
            ),
            _ => None,
        };
        let token = match &self.token_file {
            Some(file) => {
                let token = std::fs::read_to_string(file)
                    .with_context(|| format!("reading the token file {}", file.display()))?
                    .trim()
                    .to_string();
                anyhow::ensure!(
                    !token.is_empty(),
                    "the token file {} is empty: put the token in it",
                    file.display()
                );
                token
            }
            None => String::new(),
        };
        let clients = self
            .client_volumes
            .as_deref()
            .map(objstore::ClientVolumes::load)
            .transpose()
            .map_err(|what| anyhow::anyhow!(what))?;
        Ok(objstore::Admission {
            token,
            tls,
            clients,
        })
    }
}

/// Blocks SIGHUP in this thread and the threads it starts after, for
/// [`reload_on_hangup`] to take.
fn block_hangup() -> Result<nix::sys::signal::SigSet> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGHUP);
    set.thread_block().context("blocking SIGHUP")?;
    Ok(set)
}

/// On each SIGHUP (`systemctl reload ublk-dr-receiver`), reads the receiver's files
/// again and, if they all load, replaces its admission; if not, keeps the one in force
/// and logs why.
fn reload_on_hangup(
    set: nix::sys::signal::SigSet,
    files: AdmissionFiles,
    switch: Arc<objstore::AdmissionSwitch>,
) {
    std::thread::spawn(move || {
        while set.wait().is_ok() {
            match files.load() {
                Ok(admission) => {
                    switch.replace(admission);
                    log::info!(
                        "SIGHUP: token, certificates, revocation list and client volumes read \
                         again; open connections are checked against them at their next call"
                    );
                }
                Err(e) => log::error!(
                    "SIGHUP: keeping the settings in force, the files do not load: {}",
                    changelog::error::one_line(&*e)
                ),
            }
        }
    });
}

/// How often `apply --follow` makes sure the store holds its key proofs.
const PROOF_REFRESH: Duration = Duration::from_secs(60);

/// How long `apply --follow` waits after a recoverable error before trying again
/// (at least its poll interval).
const RETRY_WAIT: Duration = Duration::from_secs(5);

/// Whether trying again later may succeed: I/O trouble, not bad input.
fn is_recoverable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<TargetError>()
        .is_some_and(TargetError::is_recoverable)
        || e.downcast_ref::<changelog::Error>()
            .is_some_and(changelog::Error::is_recoverable)
}

/// Whether another command (prune, rollback) holds the replica's journal.
fn busy(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<TargetError>(),
        Some(TargetError::Busy { .. })
    )
}

/// The point the replica was rolled back to, if that is why applying refused.
fn rolled_back(e: &anyhow::Error) -> Option<u64> {
    match e.downcast_ref::<TargetError>() {
        Some(TargetError::RolledBack { point }) => Some(*point),
        _ => None,
    }
}

/// Whether a segment was sealed with a key the key file lacks.
fn lacks_key(e: &anyhow::Error) -> bool {
    let wrong_key = |e: &changelog::Error| matches!(e, changelog::Error::WrongKey { .. });
    match e.downcast_ref::<TargetError>() {
        Some(TargetError::Changelog(e)) => wrong_key(e),
        Some(_) => false,
        None => e.downcast_ref::<changelog::Error>().is_some_and(wrong_key),
    }
}

/// The error on one line, with what to do when a file system is full.
fn with_hint(e: &anyhow::Error) -> String {
    let line = changelog::error::one_line(&**e);
    if changelog::error::is_disk_full(&**e) {
        format!(
            "{line}. A file system is full: free space on the one named (the replica's, or \
             its undo journal's: keeping fewer recovery points with --keep-points or \
             --keep-age frees journals, and --keep-size bounds what they take). Nothing is lost: the replica's state still names \
             its last applied recovery point, and applying resumes from there"
        )
    } else {
        line
    }
}

/// One volume for `apply`: from the command line or a config file.
struct ApplyJob {
    store: StoreLocation,
    volume: VolumeId,
    replica: PathBuf,
    key: Key,
    /// Where `key` came from: with --follow, read again whenever it changes.
    key_file: PathBuf,
    state: Option<PathBuf>,
    journal: Option<PathBuf>,
    retention: Retention,
    full_download: bool,
    copy_undo: bool,
    /// Delete applied segments from the store.
    prune_store: bool,
    /// With `follow`: how the volume's health is judged and reported.
    alerting: Alerting,
}

/// `apply --follow`'s health settings (see [`ublk_target::health`]).
struct Alerting {
    rpo_threshold: Duration,
    command: Option<String>,
    hold: Duration,
}

impl ApplyJob {
    /// Applies what the store holds, answers digest requests; with `follow`, keeps
    /// doing so every `follow` interval. `progress`: a bar over the first catch-up (for
    /// one volume at a time only: bars of several threads would overwrite each other).
    /// With `follow`, a recoverable error (disk full, store I/O) is logged, judged a
    /// Warning and retried after [`RETRY_WAIT`] with a freshly opened applier, as after
    /// a restart (the undo journal makes a half-applied segment safe to apply again);
    /// any other ends the run with a Critical alert, except that a replica failed over
    /// here ends it quietly (it is the primary now). Either way a full file system gets
    /// a hint on what to do.
    fn run(&self, follow: Option<Duration>, progress: bool) -> Result<()> {
        let mut health = follow.map(|_| {
            let paths = ReplicaPaths::new(&self.replica)
                .with_state(self.state.clone())
                .with_journal(self.journal.clone());
            let alerts = Alerts::new(
                self.alerting.command.clone(),
                self.alerting.hold,
                Site::Recovery,
            );
            FollowHealth::new(
                self.volume.clone(),
                &paths,
                &self.retention,
                self.alerting.rpo_threshold,
                alerts,
            )
        });
        self.apply_loop(follow, progress, &mut health)
    }

    /// [`ApplyJob::run`]'s loop, judging `health` (with `follow`) as it goes.
    fn apply_loop(
        &self,
        follow: Option<Duration>,
        progress: bool,
        health: &mut Option<FollowHealth>,
    ) -> Result<()> {
        if let Some(dir) = self.store.dir().filter(|dir| !dir.is_dir()) {
            anyhow::bail!(
                "store directory {} does not exist (use the shipper's --store path)",
                dir.display()
            );
        }
        if !self.replica.exists() {
            anyhow::bail!(
                "replica {} does not exist: create it the size of the protected volume \
                 (`truncate -s SIZE {}` for an image file) or name the disk it is",
                self.replica.display(),
                self.replica.display()
            );
        }
        let store = objstore::open(&self.store)?;
        let mut progress = progress;
        let mut applier: Option<Applier> = None;
        let mut failing = false;
        let mut opened_once = false;
        let mut key_file = changelog::key::WatchedKeyFile::new(&self.key_file, self.key.clone());
        let mut proved_at = Instant::now();
        loop {
            if let Some(health) = health.as_ref() {
                health.round_begins();
            }
            // A rotation copied here: apply with the new key (reopening proves it).
            if follow.is_some()
                && key_file
                    .changed(&format!("volume {}", self.volume))
                    .is_some()
            {
                applier = None;
            }
            // Now and then, in case the store lost the proofs.
            if applier.is_some() && proved_at.elapsed() >= PROOF_REFRESH {
                proved_at = Instant::now();
                if let Err(e) =
                    ublk_target::keys::publish_proofs(&*store, &self.volume, key_file.keys())
                {
                    log::warn!(
                        "volume {}: proving the keys this side holds: {e}",
                        self.volume
                    );
                }
            }
            let key = key_file.keys().clone();
            let mut on_applied = |applied: &Applied| {
                if let Some(health) = health.as_ref() {
                    health.applied(applied);
                }
            };
            let result = self.apply_once(
                &key,
                &mut applier,
                &store,
                std::mem::take(&mut progress),
                &mut on_applied,
            );
            if let (false, Some(opened)) = (opened_once, &applier) {
                self.log_undo_method(opened.undo_method());
            }
            opened_once |= applier.is_some();
            let mut judge = |applier: &Option<Applier>, trouble: Option<String>| {
                if let Some(health) = health.as_mut() {
                    let state = applier.as_ref().map(Applier::state);
                    health.observe(&*store, key_file.keys(), state, trouble);
                }
            };
            // The file holds the key of the last applied segment: a segment under a key
            // it lacks is a rotation not copied here yet, not a wrong key file. (A
            // state from before key ids were kept: any applied segment counts.)
            let rotating = applier.as_ref().is_some_and(|a| match a.state().key_id {
                Some(last) => key_file.keys().has(last),
                None => a.state().latest().is_some(),
            });
            match (result, follow) {
                (Ok(()), None) => {
                    let cursor = applier.as_ref().expect("applied").cursor();
                    println!(
                        "replica {} at segment {} (every record with seq < {})",
                        self.replica.display(),
                        cursor.next_index,
                        cursor.next_seq
                    );
                    return Ok(());
                }
                (Ok(()), Some(poll)) => {
                    if std::mem::take(&mut failing) {
                        log::info!("volume {}: applying again", self.volume);
                    }
                    judge(&applier, None);
                    std::thread::sleep(poll);
                }
                (Err(e), Some(poll)) if rotating && lacks_key(&e) => {
                    let why = format!(
                        "{}; waiting for {} to have it",
                        changelog::error::one_line(&*e),
                        self.key_file.display(),
                    );
                    log::warn!(
                        "volume {}: {why} (checked every {} s)",
                        self.volume,
                        RETRY_WAIT.max(poll).as_secs()
                    );
                    judge(&applier, Some(why));
                    failing = true;
                    std::thread::sleep(RETRY_WAIT.max(poll));
                }
                // I/O trouble once the applier has opened (the store down, a full
                // disk), or another command holding the replica: a Warning, retried.
                // (Failing to open it the first time is a setup problem: a wrong path,
                // no permission.)
                (Err(e), Some(poll)) if (opened_once && is_recoverable(&e)) || busy(&e) => {
                    log::warn!(
                        "volume {}: {}; retrying in {} s",
                        self.volume,
                        with_hint(&e),
                        RETRY_WAIT.max(poll).as_secs()
                    );
                    judge(&applier, Some(changelog::error::one_line(&*e)));
                    failing = true;
                    applier = None;
                    std::thread::sleep(RETRY_WAIT.max(poll));
                }
                // A replica failed over here is the primary now: nothing to follow.
                (Err(e), Some(_)) if rolled_back(&e).is_some() => {
                    let point = rolled_back(&e).unwrap_or_default();
                    log::info!(
                        "volume {}: replica {} was failed over to point {}: nothing is \
                         applied to it any more; stopping (disable this service, or \
                         protect the volume back toward the original disk: failback)",
                        self.volume,
                        self.replica.display(),
                        point
                    );
                    return Ok(());
                }
                (Err(e), None) => return Err(anyhow::anyhow!(with_hint(&e))),
                (Err(e), Some(_)) => {
                    let why = with_hint(&e);
                    if let Some(health) = health.as_mut() {
                        health.stopped(&why);
                    }
                    return Err(FollowStopped(why).into());
                }
            }
        }
    }

    /// Says once how undo journals keep before-images, as it decides what applying
    /// costs: copying writes every changed block twice.
    fn log_undo_method(&self, method: UndoMethod) {
        match method {
            UndoMethod::Share { .. } => log::info!(
                "volume {}: undo journals share the replica's blocks (reflink)",
                self.volume
            ),
            UndoMethod::Copy if self.copy_undo => {}
            UndoMethod::Copy => log::info!(
                "volume {}: undo journals copy before-images, as replica {} is not a \
                 regular file on XFS or btrfs: every changed block is written twice \
                 (journal, then replica); on XFS (reflink) or btrfs they share blocks",
                self.volume,
                self.replica.display()
            ),
        }
    }

    /// One pass: opens the applier if there is none, applies what is available (telling
    /// `on_applied` of each segment) and answers digest requests.
    fn apply_once(
        &self,
        key: &Key,
        applier: &mut Option<Applier>,
        store: &Arc<dyn TargetStore>,
        progress: bool,
        on_applied: &mut dyn FnMut(&Applied),
    ) -> Result<()> {
        let replica = &self.replica;
        if applier.is_none() {
            let state = ReplicaPaths::new(replica)
                .with_state(self.state.clone())
                .state;
            *applier = Some(Applier::open(
                store.clone(),
                self.volume.clone(),
                key.clone(),
                replica,
                &state,
                &ApplyOptions {
                    journal_dir: self.journal.clone(),
                    retention: self.retention,
                    copy_undo: self.copy_undo,
                    prune_store: self.prune_store,
                },
            )?);
            let opened = applier.as_mut().expect("opened above");
            // A replica failed over here: said before any store call (the store may
            // be unreachable after a disaster).
            if let Some(point) = opened.state().rolled_back_to {
                return Err(TargetError::RolledBack { point }.into());
            }
            ublk_target::keys::publish_proofs(&**store, &self.volume, key)?;
            match opened.sweep_store() {
                Ok(0) => {}
                Ok(n) => log::info!(
                    "volume {}: deleted {n} applied segment(s) an earlier run left in the store",
                    self.volume
                ),
                Err(e) => log::warn!(
                    "volume {}: applied segments an earlier run left in the store stay there: {e}",
                    self.volume
                ),
            }
        }
        let applier = applier.as_mut().expect("opened above");
        // The bar is for the catch-up at start; later polls skip its store listing.
        let applied = if progress {
            apply_with_progress(applier, &**store, on_applied)?
        } else {
            applier.apply_available_with(on_applied)?
        };
        let mode = if self.full_download {
            ublk_target::digests::AnswerMode::FullDownload
        } else {
            ublk_target::digests::AnswerMode::Compare
        };
        let (volume, next_seq) = (&applier.cursor().volume, applier.cursor().next_seq);
        let last_key = applier.state().key_id;
        ublk_target::digests::answer_requests(
            &**store, volume, key, last_key, replica, next_seq, mode,
        )?;
        if applied > 0 {
            let c = applier.cursor();
            log::info!(
                "volume {}: applied {applied} segment(s); replica now at segment {} (seq < {})",
                c.volume,
                c.next_index,
                c.next_seq
            );
        }
        Ok(())
    }
}
