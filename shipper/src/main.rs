//! `shipper`: the root service that replicates protected volumes.

use anyhow::{Context, Result};
use changelog::{Key, VolumeId};
use clap::{Parser, Subcommand};
use objstore::StoreLocation;
use shipper::config::ConfigFile;
use shipper::priority::CpuPriority;
use shipper::throttle::{Policy, Throttle};
use shipper::{Control, ShipperConfig, Status};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// ublk-dr shipper: turns a protected volume's capture ring into sealed change-log
/// segments (lz4, AES-256-GCM, SHA-256 chain) and ships them to a target store.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new 32-byte key file (mode 0600). Copy it to the recovery side.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// List, rotate or retire the keys of a key file.
    ///
    /// A key file holds keys oldest first; the newest one the recovery side has proved
    /// to hold seals new segments, the older ones only open what they sealed. Rotating
    /// appends a fresh key: copy the file to the recovery side, where `ublk-target
    /// apply` proves it holds the key (a blob in the store sealed with it); the running
    /// shippers, which read the file again when it changes, then seal with it. No
    /// restart, and nothing is ever sealed with a key the recovery side lacks.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Ship volumes: read each ring, seal, stage and upload segments until stopped.
    ///
    /// Either every volume of a config file (--config; see the shipper crate's config
    /// module docs for the format), or one volume given by flags.
    Run(RunArgs),
    /// Resync a volume by block digests: compare every block of the protected volume
    /// with the replica's and re-send only the blocks that differ.
    ///
    /// blkfilter and the shipper must be running; the recovery side (`ublk-target apply
    /// --follow`) answers with the replica's digests. Shows progress until done.
    Resync {
        #[command(flatten)]
        ring: RingArgs,
        /// Digest block size in KiB (a power of two, 4 to 1024).
        #[arg(long, default_value_t = 64)]
        block_kib: u32,
        /// Ask for the resync and return without waiting.
        #[arg(long, conflicts_with = "watch")]
        no_wait: bool,
        /// Ask for nothing: show the progress of the resync under way (e.g. the initial
        /// replication a new protection starts with) until it is done.
        #[arg(long)]
        watch: bool,
    },
    /// Cut a consistency group now: every volume attached with this group clock
    /// (`blkfilter attach --group-clock`) records a MARK at the same instant of the
    /// group's sequence clock, and the recovery side gets one recovery point per volume
    /// with this cut's number (`ublk-target group-points`). Busy volumes record it with
    /// their next write, idle ones at their next housekeeping tick (200 ms), one whose
    /// blkfilter is down once it is back. `shipper run` cuts on a schedule.
    ///
    /// With --ring (the group's rings), waits until every one of them recorded the cut.
    /// With --app-consistent, the cut is flagged application-consistent on every
    /// volume: run --pre, freeze each --freeze mount point (FIFREEZE), cut, wait for
    /// every --ring, thaw, run --post.
    GroupCut {
        /// The group clock file (e.g. /dev/shm/ublk-dr/db.clock).
        clock: PathBuf,
        /// A ring of the group's volumes to wait for (repeatable; needed with
        /// --app-consistent: every volume's).
        #[arg(long, value_name = "RING")]
        ring: Vec<PathBuf>,
        #[command(flatten)]
        quiesce: QuiesceArgs,
    },
    /// Record a MARK in a volume's change stream: a recovery point to fail over to.
    ///
    /// With --app-consistent, the point is flagged application-consistent: run --pre,
    /// freeze each --freeze mount point (FIFREEZE), record the MARK, thaw, run --post.
    Mark {
        #[command(flatten)]
        ring: RingArgs,
        #[command(flatten)]
        quiesce: QuiesceArgs,
    },
    /// Show running shippers' health, RPO and progress.
    ///
    /// With --config (default /etc/ublk-dr/shipper.toml): a table, one row per volume
    /// (VOLUME, HEALTH, RPO, RING used, PENDING segments, RESYNC progress, throughput
    /// IN from the ring and OUT to the store in MB/s over the last 10 s, STATE). With
    /// --status: the detailed view of that volume (--table for its row instead).
    Status {
        /// The status file the shipper writes (its --status).
        #[arg(long, conflicts_with = "config")]
        status: Option<PathBuf>,
        /// Show every volume of this config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the raw JSON (an array, one object per volume).
        #[arg(long)]
        json: bool,
        /// One row per volume even for a single --status file.
        #[arg(long, conflicts_with = "json")]
        table: bool,
        /// Print the Prometheus text format (for node_exporter's textfile collector):
        /// health, RPO, ring, pending, throughput, byte counters per volume, and
        /// ublk_dr_up 0 for a volume without a readable status (exit status 0 then).
        #[arg(long, conflicts_with_all = ["json", "table"])]
        prometheus: bool,
        /// A monitoring-plugin check (Nagios, Icinga, Zabbix, ...): one line of
        /// verdict, RPOs as perfdata, a line per volume; exit status 0 OK, 1 WARNING,
        /// 2 CRITICAL (a volume's health; a status missing or not updated for 10 s, as
        /// when the shipper stopped, is CRITICAL), 3 UNKNOWN (a bad config).
        #[arg(long, conflicts_with_all = ["json", "table", "prometheus"])]
        check: bool,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Print the id of every key in the file, oldest first. The newest seals once the
    /// recovery side holds it; `shipper status` shows the key each volume seals with.
    List {
        /// The key file (e.g. /etc/ublk-dr/key).
        file: PathBuf,
    },
    /// Append a fresh key; the others stay to open what they sealed. The file is
    /// replaced atomically (and locked against a second rotation at once).
    ///
    /// Then copy the file to the recovery side. Its `ublk-target apply` (with
    /// --follow: within seconds) proves it holds the new key, and the shippers move to
    /// it (`shipper status`: "sealing key"). Until then they go on with the old key.
    Rotate {
        /// The key file (e.g. /etc/ublk-dr/key).
        file: PathBuf,
    },
    /// Remove an older key, once nothing sealed with it is left: every shipper using
    /// the file seals with a newer key (`shipper status`: "sealing key") and has
    /// uploaded what it staged before, and the recovery side has applied that
    /// (`ublk-target status --json`: nothing waiting, and `key_id`, the key of the last
    /// applied segment, a newer one). Then copy the file to the recovery side again.
    /// The newest key cannot be removed.
    Forget {
        /// The key file (e.g. /etc/ublk-dr/key).
        file: PathBuf,
        /// The retired key's id (hex, or its first 4+ digits), from `shipper key list`.
        id: String,
    },
}

/// What `mark` and `group-cut` do around the point: hooks, frozen file systems.
#[derive(clap::Args)]
struct QuiesceArgs {
    /// Flag the point application-consistent (needs --freeze or --pre; for group-cut
    /// also --ring).
    #[arg(long)]
    app_consistent: bool,
    /// Freeze this mounted file system around the point (repeatable).
    #[arg(long, value_name = "MOUNTPOINT")]
    freeze: Vec<PathBuf>,
    /// Shell command run before freezing (e.g. put a database in backup mode).
    #[arg(long, value_name = "CMD")]
    pre: Option<String>,
    /// Shell command run after thawing.
    #[arg(long, value_name = "CMD")]
    post: Option<String>,
}

impl QuiesceArgs {
    /// The options, refusing an app-consistent point with nothing to quiesce the
    /// application (`what`: "point" or "cut").
    fn options(self, what: &str) -> Result<shipper::mark::MarkOptions> {
        anyhow::ensure!(
            !self.app_consistent || !self.freeze.is_empty() || self.pre.is_some(),
            "an app-consistent {what} needs --freeze MOUNTPOINT or a --pre hook that quiesces the application"
        );
        Ok(shipper::mark::MarkOptions {
            app_consistent: self.app_consistent,
            freeze: self.freeze,
            pre: self.pre,
            post: self.post,
            timeout: Duration::from_secs(10),
        })
    }
}

/// Which volume's ring: VOLUME of the config file, or --ring.
#[derive(clap::Args)]
struct RingArgs {
    /// The volume, by its id in the config file (which names its ring); or give --ring.
    #[arg(value_name = "VOLUME", conflicts_with = "ring")]
    volume: Option<VolumeId>,
    /// The config file, for VOLUME.
    #[arg(long, value_name = "FILE", default_value = shipper::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// The volume's capture ring (instead of VOLUME).
    #[arg(long)]
    ring: Option<PathBuf>,
    /// VOLUME as a flag (`--config F --volume V`, the older form).
    #[arg(long = "volume", hide = true, conflicts_with_all = ["volume", "ring"])]
    volume_flag: Option<VolumeId>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file with every volume to ship (TOML: key, staging, store, [[volume]] id
    /// and ring, optional limits). The flags below are then not used.
    #[arg(long, conflicts_with_all = ["ring", "staging", "store", "key", "status"])]
    config: Option<PathBuf>,
    /// Volume id (1-32 of A-Z a-z 0-9 . _ -); with --config, ship only this volume.
    #[arg(long, required_unless_present = "config")]
    volume: Option<VolumeId>,
    /// The volume's capture ring (made by blkfilter).
    #[arg(long, required_unless_present = "config")]
    ring: Option<PathBuf>,
    /// Local staging directory (segments wait here until uploaded).
    #[arg(long, required_unless_present = "config")]
    staging: Option<PathBuf>,
    /// Target store: a directory; az://CONTAINER/PREFIX (Azure Blob) or
    /// s3://BUCKET/PREFIX, with credentials from the environment (see README); or
    /// tcp://HOST:PORT, a receiver (`ublk-target receive`) at the recovery site, or
    /// tls://HOST:PORT for one serving TLS (its CA certificate in UBLK_DR_RECEIVER_CA).
    #[arg(long, required_unless_present = "config")]
    store: Option<StoreLocation>,
    /// Key file (see `shipper keygen`).
    #[arg(long, required_unless_present = "config")]
    key: Option<PathBuf>,
    /// Seal a segment once its oldest record is this old.
    #[arg(long, default_value_t = 1000)]
    max_segment_age_ms: u64,
    /// Seal a segment once it holds this many bytes of records.
    #[arg(long, default_value_t = 8 << 20)]
    max_segment_bytes: usize,
    /// Threads that compress and encrypt.
    #[arg(long, default_value_t = 2)]
    sealers: usize,
    /// Unit of the retry schedule (1, 2, 4, 8, 10, then every 30 units), in ms.
    #[arg(long, default_value_t = 60_000)]
    retry_unit_ms: u64,
    /// RPO above which the volume's health is Warning, in ms.
    #[arg(long, default_value_t = 30_000)]
    rpo_threshold_ms: u64,
    /// Run this shell command on each health change of the volume, with
    /// UBLK_DR_VOLUME, UBLK_DR_HEALTH, UBLK_DR_PREVIOUS_HEALTH, UBLK_DR_STATE,
    /// UBLK_DR_RPO_MS and UBLK_DR_HOST in its environment (e.g. to page someone).
    #[arg(long, value_name = "CMD")]
    alert_command: Option<String>,
    /// How long a new health must hold before it is reported, in ms (Critical is
    /// reported at once).
    #[arg(long, default_value_t = 10_000)]
    alert_hold_ms: u64,
    /// While everything captured is in the store, write a heartbeat there this often,
    /// in ms: the recovery side then knows a quiet volume's replica is current, and
    /// tells a quiet volume from a protected site gone dark.
    #[arg(
        long,
        default_value_t = shipper::pipeline::DEFAULT_HEARTBEAT.as_millis() as u64,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    heartbeat_ms: u64,
    /// Where to publish status (JSON).
    #[arg(long)]
    status: Option<PathBuf>,
    /// Do not start a new protection with a digest resync. Only for a volume known to
    /// be identical to its replica (or empty on both sides).
    #[arg(long)]
    no_initial_sync: bool,
    /// Digest resync block size in KiB (a power of two, 4 to 1024).
    #[arg(long, default_value_t = 64)]
    resync_block_kib: u32,
    /// When the staged backlog (segments not yet in the store) exceeds this percent of
    /// the disk, drop it and resync the whole disk by digest (0 = never, at most 100).
    #[arg(long, default_value_t = shipper::backlog::DEFAULT_PERCENT)]
    backlog_resync_percent: u32,
    /// How the shipping threads are scheduled: `yield` runs them in the background
    /// (SCHED_IDLE, only on CPU the application leaves idle) until the ring is half full
    /// or the RPO reaches half of --rpo-threshold-ms, then at normal priority until it
    /// caught up; `normal` always at normal priority.
    #[arg(long, value_enum, default_value_t = CpuPriority::SERVICE_DEFAULT)]
    cpu_priority: CpuPriority,
    /// Ship everything already in the ring, then exit: 0 once the store holds every
    /// write, 1 (naming why) if some still wait for a digest resync (after a ring
    /// overflow, a backlog dropped while the store was unreachable, or on a new
    /// protection without --no-initial-sync, its initial replication).
    #[arg(long)]
    drain: bool,
    /// Cut this consistency group's clock (the volumes' `blkfilter attach
    /// --group-clock`) every --group-cut-every-ms, so they share recovery points.
    /// With --config, its [[group]] tables say this instead.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    group_clock: Option<PathBuf>,
    /// Time between two group cuts, in ms.
    #[arg(long, requires = "group_clock", default_value_t = shipper::group_cuts::DEFAULT_CUT_EVERY.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    group_cut_every_ms: u64,
    /// Limit uploads, for every volume together, to this rate: bytes (50MiB/s, 20MB/s)
    /// or bits (400Mbit/s, 1Gbps), or `unlimited`. Overrides the config's [throttle]
    /// table and its windows (e.g. a planned failover's drain at full speed).
    #[arg(long, value_name = "RATE", value_parser = parse_upload_limit)]
    upload_limit: Option<UploadLimit>,
}

/// `--upload-limit`: a rate, or `unlimited` (`None`).
#[derive(Clone, Copy)]
struct UploadLimit(Option<shipper::throttle::Rate>);

fn parse_upload_limit(text: &str) -> std::result::Result<UploadLimit, String> {
    shipper::throttle::parse_limit(text).map(UploadLimit)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("shipper: error: {}", changelog::error::one_line(&*e));
        // 3 = Critical: retrying cannot help, an operator must act (see the systemd unit).
        let critical = matches!(
            e.downcast_ref(),
            Some(shipper::ShipperError::Critical { .. })
        );
        std::process::exit(if critical { 3 } else { 1 });
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            let key = Key::generate_file(&out)?;
            println!(
                "wrote key {} (id {})",
                out.display(),
                changelog::key::hex(&key.id())
            );
            Ok(())
        }
        Command::Key { action } => key_command(action),
        Command::Run(args) => ship(args),
        Command::GroupCut {
            clock,
            ring,
            quiesce,
        } => {
            anyhow::ensure!(
                !quiesce.app_consistent || !ring.is_empty(),
                "an app-consistent cut needs --ring for every volume of the group, so file \
                 systems are thawed only once every volume recorded it"
            );
            let options = quiesce.options("cut")?;
            let app_consistent = options.app_consistent;
            let cut = shipper::group_cuts::cut_waiting(&clock, &ring, &options)?;
            println!(
                "{} group cut {} at seq {} of clock {}{}",
                if app_consistent {
                    "app-consistent"
                } else {
                    "made"
                },
                cut.number,
                cut.seq,
                clock.display(),
                if ring.is_empty() {
                    String::new()
                } else {
                    format!(", recorded by {} volume(s)", ring.len())
                }
            );
            Ok(())
        }
        Command::Mark { ring, quiesce } => {
            let ring = ring.path()?;
            let options = quiesce.options("point")?;
            let app_consistent = options.app_consistent;
            let seq = shipper::mark::mark(&ring, &options)?;
            println!(
                "recorded {} MARK with seq {seq}",
                if app_consistent {
                    "an app-consistent"
                } else {
                    "a"
                }
            );
            Ok(())
        }
        Command::Resync {
            ring,
            block_kib,
            no_wait,
            watch,
        } => {
            let ring = ring.path()?;
            let block = shipper::config::resync_block_bytes(block_kib)
                .map_err(|e| anyhow::anyhow!("--block-kib: {e}"))?;
            resync(&ring, block, !watch, !no_wait)
        }
        Command::Status {
            status,
            config,
            json,
            table,
            prometheus,
            check,
        } => {
            if check {
                let (text, code) = match status_files(status, config) {
                    Ok((files, _)) => {
                        let rows: Vec<_> = files
                            .iter()
                            .map(|(name, p)| {
                                (name.clone(), Status::read(p).map_err(|e| e.to_string()))
                            })
                            .collect();
                        changelog::check::report(
                            "UBLK-DR SHIPPER",
                            &shipper::status::check_rows(&rows, changelog::unix_ms_now()),
                        )
                    }
                    Err(e) => changelog::check::unknown("UBLK-DR SHIPPER", &format!("{e:#}")),
                };
                print!("{text}");
                std::io::Write::flush(&mut std::io::stdout())?;
                std::process::exit(code);
            }
            let (files, from_config) = status_files(status, config)?;
            // Every volume of a config file: a table of them.
            let table = table || from_config;
            if prometheus {
                let rows: Vec<_> = files
                    .iter()
                    .map(|(name, p)| (name.clone(), Status::read(p).map_err(|e| e.to_string())))
                    .collect();
                print!(
                    "{}",
                    shipper::status::prometheus(&rows, changelog::unix_ms_now())
                );
            } else if json {
                let statuses = files
                    .iter()
                    .map(|(_, p)| Status::read(p))
                    .collect::<Result<Vec<_>, _>>()?;
                println!("{}", serde_json::to_string_pretty(&statuses)?);
            } else if table {
                let rows: Vec<_> = files
                    .iter()
                    .map(|(name, p)| (name.clone(), Status::read(p).map_err(|e| e.to_string())))
                    .collect();
                let width = std::env::var("COLUMNS")
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(120);
                print!(
                    "{}",
                    shipper::status::table(&rows, changelog::unix_ms_now(), width)
                );
                let missing = rows.iter().filter(|(_, r)| r.is_err()).count();
                anyhow::ensure!(
                    missing == 0,
                    "{missing} of {} volume(s) have no readable status (is the shipper running?)",
                    rows.len()
                );
            } else {
                let status = Status::read(&files[0].1)?;
                print_status(&status);
            }
            Ok(())
        }
    }
}

/// The status files `shipper status` shows, (volume name, file): the one given, or
/// every volume's of the config file (then `true`).
fn status_files(
    status: Option<PathBuf>,
    config: Option<PathBuf>,
) -> Result<(Vec<(String, PathBuf)>, bool)> {
    Ok(match (status, config) {
        (Some(status), _) => {
            let name = status
                .file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .trim_end_matches(".status.json")
                        .to_string()
                })
                .unwrap_or_default();
            (vec![(name, status)], false)
        }
        (None, config) => {
            let path = config.unwrap_or_else(|| shipper::config::DEFAULT_CONFIG.into());
            let file = ConfigFile::load(&path)?;
            let files = file
                .volumes
                .iter()
                .map(|v| (v.id.to_string(), file.status_path(&v.id)))
                .collect();
            (files, true)
        }
    })
}

fn key_command(action: KeyAction) -> Result<()> {
    let list = |key: &Key| {
        let ids = key.ids();
        for (i, id) in ids.iter().enumerate() {
            let role = if i + 1 == ids.len() {
                "newest"
            } else {
                "older"
            };
            println!("{}  {role}", changelog::key::hex(id));
        }
    };
    match action {
        KeyAction::List { file } => list(&Key::load(&file)?),
        KeyAction::Rotate { file } => {
            let key = Key::rotate_file(&file)?;
            list(&key);
            println!(
                "added key {} to {}: copy the file to the recovery side; the shippers seal \
                 with the new key once the recovery side has proved it holds it \
                 (`shipper status` shows the sealing key)",
                changelog::key::hex(&key.id()),
                file.display()
            );
        }
        KeyAction::Forget { file, id } => {
            let key = Key::forget_file(&file, &id)?;
            list(&key);
            println!(
                "removed key {id} from {}: copy the file to the recovery side",
                file.display()
            );
        }
    }
    Ok(())
}

fn ship(args: RunArgs) -> Result<()> {
    // First of all: a SIGHUP (`systemctl reload`) while starting must not end the
    // process, and a SIGTERM then is kept until the signal thread takes it.
    let signals = block_signals()?;
    let mut group_cuts = Vec::new();
    // The upload limit, and the clock file through which the shippers of one config
    // file share it.
    let (mut policy, mut throttle_clock) = (Policy::unlimited(), None);
    let (mut configs, store) = match &args.config {
        Some(path) => {
            let file = ConfigFile::load(path)?;
            group_cuts = file.group_cuts(args.volume.as_ref());
            policy = file.throttle_policy().map_err(anyhow::Error::msg)?;
            throttle_clock = Some(file.throttle_clock());
            (file.pipelines()?, file.store.clone())
        }
        None => {
            let missing = "clap requires these without --config";
            let key_file = args.key.clone().expect(missing);
            let volume = args.volume.clone().expect(missing);
            let mut config = ShipperConfig::new(
                volume,
                args.ring.clone().expect(missing),
                args.staging.clone().expect(missing),
                Key::load(&key_file)?,
            );
            config.key_file = Some(key_file);
            config.max_segment_age = Duration::from_millis(args.max_segment_age_ms);
            config.max_segment_bytes = args.max_segment_bytes;
            config.sealers = args.sealers;
            config.retry_unit = Duration::from_millis(args.retry_unit_ms);
            config.rpo_threshold = Duration::from_millis(args.rpo_threshold_ms);
            config.alert_command = args.alert_command.clone();
            config.alert_hold = Duration::from_millis(args.alert_hold_ms);
            config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
            config.cpu_priority = args.cpu_priority;
            config.status_path = args.status.clone();
            config.initial_sync = !args.no_initial_sync;
            config.resync_block_bytes = shipper::config::resync_block_bytes(args.resync_block_kib)
                .map_err(|e| anyhow::anyhow!("--resync-block-kib: {e}"))?;
            config.backlog_resync_percent =
                shipper::backlog::check_percent(args.backlog_resync_percent)
                    .map_err(|e| anyhow::anyhow!("--backlog-resync-percent: {e}"))?;
            if let Some(clock) = &args.group_clock {
                group_cuts.push(shipper::group_cuts::GroupCutSchedule {
                    clock: clock.clone(),
                    every: Duration::from_millis(args.group_cut_every_ms),
                });
            }
            (vec![config], args.store.clone().expect(missing))
        }
    };
    if let (Some(only), Some(_)) = (&args.volume, &args.config) {
        configs.retain(|c| &c.volume == only);
        anyhow::ensure!(
            !configs.is_empty(),
            "volume {only} is not in the config file"
        );
    }
    if let Some(dir) = store.dir() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating store directory {}", dir.display()))?;
    }
    for dir in configs
        .iter()
        .filter_map(|c| c.status_path.as_ref()?.parent())
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating status directory {}", dir.display()))?;
    }
    // The uploads of every volume share one limit; SIGHUP re-reads the config's.
    if let Some(UploadLimit(limit)) = args.upload_limit {
        policy = Policy::constant(limit);
    }
    let throttle = Arc::new(match &throttle_clock {
        Some(clock) => Throttle::shared(policy, clock),
        None => Throttle::new(policy),
    });
    for config in &mut configs {
        config.throttle = throttle.clone();
    }
    let reload = match (&args.config, args.upload_limit) {
        (Some(path), None) => Some(Reload {
            config: path.clone(),
            throttle,
        }),
        _ => None,
    };
    let control = Arc::new(Control::default());
    if args.drain {
        control.drain();
    }
    handle_signals(signals, control.clone(), reload);
    let store = objstore::open(&store)?;
    // One pipeline per volume; a volume that fails (e.g. goes Critical) does not stop
    // the others, and the exit status reports it.
    let pipelines_done = AtomicBool::new(false);
    let results: Vec<_> = std::thread::scope(|scope| {
        for schedule in &group_cuts {
            let done = &pipelines_done;
            scope.spawn(move || shipper::group_cuts::run(schedule, done));
        }
        let handles: Vec<_> = configs
            .iter()
            .map(|config| {
                let (store, control) = (store.clone(), control.clone());
                scope.spawn(move || (config.volume.clone(), shipper::run(config, store, control)))
            })
            .collect();
        let results = handles
            .into_iter()
            .map(|h| h.join().expect("volume thread panicked"))
            .collect();
        pipelines_done.store(true, Ordering::Release);
        results
    });
    let mut first_error = None;
    for (volume, result) in results {
        // A drain promises the store holds every write: say so when it cannot.
        let result = result.and_then(|summary| match summary.resync_pending {
            Some(why) if args.drain => Err(shipper::ShipperError::DrainIncomplete {
                volume: volume.to_string(),
                why: why.into(),
            }),
            _ => Ok(summary),
        });
        match result {
            Ok(summary) => log::info!(
                "volume {volume} stopped: {} segment(s) uploaded; next segment {}, next seq {}",
                summary.segments_uploaded,
                summary.cursor.next_index,
                summary.cursor.next_seq
            ),
            Err(e) => {
                log::error!("volume {volume}: {e}");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

impl RingArgs {
    /// The ring named by --ring, or VOLUME's in --config.
    fn path(self) -> Result<PathBuf> {
        if let Some(ring) = self.ring {
            return Ok(ring);
        }
        let volume = self.volume.or(self.volume_flag).with_context(|| {
            format!(
                "which volume? name it (VOLUME, from the config file, --config, default {}) \
                 or give --ring",
                shipper::config::DEFAULT_CONFIG
            )
        })?;
        let file = ConfigFile::load(&self.config)?;
        file.volumes
            .iter()
            .find(|v| v.id == volume)
            .map(|v| v.ring.clone())
            .with_context(|| {
                format!(
                    "volume {volume} is not in the config file {}",
                    self.config.display()
                )
            })
    }
}

/// Asks for a digest resync through the ring header and follows its progress there.
fn resync(ring: &std::path::Path, block_bytes: u32, request: bool, wait: bool) -> Result<()> {
    let control = blkfilter::ring::RingControl::open(ring).with_context(|| {
        format!(
            "opening ring {} (is the volume attached with blkfilter?)",
            ring.display()
        )
    })?;
    if request {
        control.request_digest_resync(block_bytes);
        println!(
            "digest resync of {} asked for ({} KiB blocks)",
            ring.display(),
            block_bytes / 1024
        );
    } else if !control.progress().pending() {
        let p = control.progress();
        if p.gen == 0 {
            println!("no digest resync is under way on {}", ring.display());
        } else {
            println!(
                "no digest resync is under way; the last one ({}) is done: {} of {} bytes differed and were re-sent ({:.2}%)",
                p.gen,
                p.sent_bytes,
                p.total_bytes,
                p.sent_bytes as f64 * 100.0 / p.total_bytes.max(1) as f64
            );
        }
        return Ok(());
    }
    if !wait {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(control.device_bytes()).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    loop {
        let p = control.progress();
        if !p.pending() {
            break;
        }
        let msg = if p.requested {
            "waiting for blkfilter"
        } else if !p.digests_ready {
            "waiting for replica digests"
        } else {
            "comparing blocks"
        };
        bar.set_message(msg);
        if p.active && p.total_bytes > 0 {
            // A pass restricted to regions in doubt compares less than the disk.
            bar.set_length(p.total_bytes);
        }
        bar.set_position(if p.active { p.done_bytes } else { 0 });
        std::thread::sleep(Duration::from_millis(200));
    }
    let p = control.progress();
    bar.finish_and_clear();
    println!(
        "digest resync {} done: {} of {} bytes differed and were re-sent ({:.2}%)",
        p.gen,
        p.sent_bytes,
        p.total_bytes,
        p.sent_bytes as f64 * 100.0 / p.total_bytes.max(1) as f64
    );
    Ok(())
}

/// What SIGHUP re-reads: the [throttle] table of the config file.
struct Reload {
    config: PathBuf,
    throttle: Arc<Throttle>,
}

impl Reload {
    /// Takes up the config file's upload limit; a bad file keeps the one in force.
    fn run(&self) {
        let policy = ConfigFile::load(&self.config)
            .map_err(|e| e.to_string())
            .and_then(|file| file.throttle_policy());
        match policy {
            Ok(policy) => {
                self.throttle.set_policy(policy);
                let (limit, window) = self.throttle.limit_now();
                log::info!(
                    "SIGHUP: upload limit re-read from {}: now {}",
                    self.config.display(),
                    describe_limit(limit, window.as_deref())
                );
            }
            Err(e) => log::error!(
                "SIGHUP: keeping the upload limit in force, the config does not load: {e}"
            ),
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and the threads it starts after
/// (they inherit the mask), for [`handle_signals`] to take.
fn block_signals() -> Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block()
        .context("blocking SIGTERM/SIGINT/SIGHUP")?;
    Ok(set)
}

/// Takes the blocked signals on a thread of its own with sigwait. SIGTERM or SIGINT
/// stops the pipeline cleanly: records not yet staged stay in the ring for the next
/// run. SIGHUP re-reads the config's upload limit (other settings need a restart).
fn handle_signals(set: nix::sys::signal::SigSet, control: Arc<Control>, reload: Option<Reload>) {
    use nix::sys::signal::Signal;
    std::thread::spawn(move || {
        while let Ok(signal) = set.wait() {
            if signal != Signal::SIGHUP {
                log::info!("{signal}: stopping");
                control.stop();
                return;
            }
            match &reload {
                Some(reload) => reload.run(),
                None => log::info!(
                    "SIGHUP: nothing to re-read (the upload limit comes from --upload-limit, or there is no --config)"
                ),
            }
        }
    });
}

/// "6.25 MB/s (50.0 Mbit/s) in window mon-fri 08:00-18:00", or "unlimited".
fn describe_limit(limit: Option<shipper::throttle::Rate>, window: Option<&str>) -> String {
    let rate = limit.map_or("unlimited".to_string(), |r| r.to_string());
    match window {
        Some(w) => format!("{rate} in window {w}"),
        None => rate,
    }
}

fn print_status(s: &Status) {
    let age = changelog::unix_ms_now().saturating_sub(s.updated_unix_ms);
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v:016x}"));
    println!("volume           {}", s.volume);
    println!("health           {:?}", s.health());
    println!("state            {}", s.state());
    println!(
        "RPO              {:.1} s (threshold {:.1} s)",
        s.rpo_ms as f64 / 1e3,
        s.rpo_threshold_ms as f64 / 1e3
    );
    println!(
        "ring             {} / {} bytes used{}",
        s.ring_used_bytes,
        s.ring_capacity_bytes,
        if s.ring_overflow { ", OVERFLOWED" } else { "" }
    );
    println!(
        "staged           {} (pending upload: {} segments, {} bytes{})",
        opt(s.newest_staged_index),
        s.segments_pending_upload,
        s.staged_backlog_bytes,
        if s.backlog_limit_bytes > 0 {
            format!("; dropped above {}", s.backlog_limit_bytes)
        } else {
            String::new()
        }
    );
    if let Some(d) = &s.backlog_dropped {
        println!(
            "backlog dropped  {:.1} s ago: {} segments, {} bytes (over {}% of {} bytes); chain continued at {:016x} in epoch {:016x}{}",
            changelog::unix_ms_now().saturating_sub(d.at_unix_ms) as f64 / 1e3,
            d.segments,
            d.bytes,
            d.limit_percent,
            d.device_bytes,
            d.continue_index,
            d.epoch,
            if s.backlog_resync {
                "; resync in progress"
            } else {
                "; resynced"
            }
        );
    }
    println!(
        "uploaded         {} (recovery point: seq < {})",
        opt(s.newest_uploaded_index),
        s.newest_uploaded_seq_end
            .map_or("-".into(), |v| v.to_string())
    );
    if let Some(at) = s.heartbeat_unix_ms {
        println!(
            "heartbeat        {:.1} s ago (everything captured then was in the store)",
            changelog::unix_ms_now().saturating_sub(at) as f64 / 1e3
        );
    }
    println!(
        "captured         {} records, {} bytes -> {} sealed, {} uploaded",
        s.records_captured, s.bytes_plain, s.bytes_sealed, s.bytes_uploaded
    );
    println!(
        "throughput       {} from the ring, {} to the store (last {} s)",
        shipper::status::megabytes_per_s(s.capture_bytes_per_s),
        shipper::status::megabytes_per_s(s.upload_bytes_per_s),
        shipper::status::RATE_WINDOW.as_secs()
    );
    println!(
        "CPU              {}",
        if s.background {
            "background (SCHED_IDLE: keeping up)"
        } else {
            "normal priority"
        }
    );
    println!(
        "upload limit     {}{}",
        describe_limit(
            s.upload_limit_bytes_per_s
                .and_then(shipper::throttle::Rate::new),
            s.upload_limit_window.as_deref()
        ),
        if s.upload_throttled_ms > 0 {
            format!(
                "; uploads waited {:.1} s for it",
                s.upload_throttled_ms as f64 / 1e3
            )
        } else {
            String::new()
        }
    );
    if !s.sealing_key_id.is_empty() {
        println!("sealing key      {}", s.sealing_key_id);
    }
    if let Some(e) = &s.last_error {
        println!("last error       {e}");
    }
    println!(
        "updated          {:.1} s ago (pid {})",
        age as f64 / 1e3,
        s.pid
    );
}
