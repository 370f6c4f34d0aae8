//! `ublk-target status`: each volume of the config file as this site knows it (see
//! [`ublk_target::status`] and [`ublk_target::health`]), as a table, JSON, the
//! Prometheus text format or a monitoring-plugin check.
//!
//! The store is asked (segments waiting, the shipper's heartbeat) for every volume at
//! once, each on a thread of its own, and given [`STORE_ANSWER_LIMIT`] in all: a
//! store that does not answer (a hung mount, a network that drops packets) makes its
//! volumes' rows say so (Warning), never a status that hangs. Threads still waiting
//! are left behind; the process ends without them.

use crate::DEFAULT_CONFIG;
use anyhow::Result;
use changelog::heartbeat::Heartbeat;
use changelog::{Key, TargetStore, VolumeId};
use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_target::config::{TargetConfig, VolumeConfig};
use ublk_target::status::{PlanStatus, VolumeStatus};

/// How long `status` waits for the store's answers, for all volumes together.
pub const STORE_ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// The name `--check` reports under.
const CHECK_NAME: &str = "UBLK-DR TARGET";

#[derive(Args)]
pub struct StatusArgs {
    /// Only this volume of the config file.
    #[arg(value_name = "VOLUME")]
    volume: Option<VolumeId>,
    /// The recovery side's config file (the one `apply --config` reads).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Print the Prometheus text format (for node_exporter's textfile collector):
    /// per volume health, RPO and its threshold, the newest point and its age,
    /// points, segments waiting; ublk_dr_target_up 0 (and health 2) for a replica
    /// that cannot be read (exit status 0 then).
    #[arg(long, conflicts_with = "json")]
    prometheus: bool,
    /// A monitoring-plugin check (Nagios, Icinga, Zabbix, ...): one line of verdict,
    /// RPOs as perfdata, a line per volume; exit status 0 OK, 1 WARNING, 2 CRITICAL
    /// (the worst volume's health), 3 UNKNOWN (a bad config). Run it as root (sudo
    /// from the monitoring agent): it reads the key, without which the shipper's
    /// heartbeats do not count and a quiet volume looks stale.
    #[arg(long, conflicts_with_all = ["json", "prometheus"])]
    check: bool,
}

pub fn run(args: StatusArgs) -> Result<()> {
    let judged = TargetConfig::load(&args.config)
        .map_err(anyhow::Error::from)
        .and_then(|config| Ok((rows(&args, &config)?, config)));
    if args.check {
        let (text, code) = match judged {
            Ok(((rows, _), _)) => changelog::check::report(CHECK_NAME, &check_rows(&rows)),
            Err(e) => changelog::check::unknown(CHECK_NAME, &format!("{e:#}")),
        };
        print!("{text}");
        std::io::Write::flush(&mut std::io::stdout())?;
        std::process::exit(code);
    }
    let ((rows, catalogs), config) = judged?;
    let now = changelog::unix_ms_now();
    if args.prometheus {
        print!("{}", ublk_target::status::prometheus(&rows, now));
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", ublk_target::status::table(&rows, now));
        // Each plan, in the table of every volume.
        if args.volume.is_none() {
            let plans = plans(&config, &rows, &catalogs);
            if !plans.is_empty() {
                print!("\n{}", ublk_target::status::plans_table(&plans, now));
            }
        }
    }
    let unreadable = rows.iter().filter(|r| r.error.is_some()).count();
    anyhow::ensure!(
        unreadable == 0,
        "{unreadable} volume(s) could not be read (see STATE)"
    );
    Ok(())
}

/// The judged row of each volume asked for, and the catalogs of those whose replica
/// could be read.
fn rows(
    args: &StatusArgs,
    config: &TargetConfig,
) -> Result<(Vec<VolumeStatus>, HashMap<VolumeId, ublk_target::Catalog>)> {
    let picked: Vec<&VolumeConfig> = match &args.volume {
        Some(id) => vec![config
            .volume(id)
            .map_err(|what| anyhow::anyhow!("config {}: {what}", args.config.display()))?],
        None => config.volumes.iter().collect(),
    };
    let store = objstore::open(&config.store).map_err(|e| changelog::error::one_line(&e));
    // For the shipper's heartbeats: without the key, RPOs go by points only.
    let key = Key::load(&config.key)
        .map_err(|e| log::warn!("{e}: RPOs go by recovery points only"))
        .ok();
    let ids: Vec<VolumeId> = picked.iter().map(|v| v.id.clone()).collect();
    let mut answers = ask_store(&store, key, &ids).into_iter();
    let now = changelog::unix_ms_now();
    let mut rows = Vec::new();
    let mut catalogs = HashMap::new();
    for v in picked {
        let answer = answers.next().expect("an answer per volume");
        let paths = v.paths();
        let catalog = match ublk_target::catalog(&paths) {
            Ok(catalog) => catalog,
            Err(e) => {
                let why = changelog::error::one_line(&e);
                rows.push(VolumeStatus::unreadable(v.id.to_string(), why));
                continue;
            }
        };
        let committed = ublk_target::rollback::committed_marker(&paths).exists();
        // The config was checked when it was read: its retention parses.
        let retention = config.retention(v).unwrap_or_default();
        let mut row = VolumeStatus::new(v.id.to_string(), &catalog, answer.indexes, committed)
            .with_retention(&retention);
        row.journal_fs = ublk_target::journal::Journal::new(&paths.journal).fs_space();
        if answer.heartbeat_silent.is_some() {
            row.store_error = answer.heartbeat_silent;
        }
        rows.push(row.judged(answer.heartbeat.as_ref(), config.rpo_threshold(), now));
        catalogs.insert(v.id.clone(), catalog);
    }
    Ok((rows, catalogs))
}

/// What the store says of a volume: the segment indexes it holds (or why not), the
/// shipper's heartbeat (not read from a store that could not be listed), and why the
/// heartbeat is missing when the store did not answer for it in time.
struct StoreAnswer {
    indexes: Result<Vec<u64>, String>,
    heartbeat: Option<Heartbeat>,
    heartbeat_silent: Option<String>,
}

/// One reply of a volume's thread: its listing first, then its heartbeat.
enum Reply {
    Listed(Result<Vec<u64>, String>),
    Heartbeat(Option<Heartbeat>),
}

/// Asks the store about every volume at once, waiting [`STORE_ANSWER_LIMIT`] at most.
fn ask_store(
    store: &Result<Arc<dyn TargetStore>, String>,
    key: Option<Key>,
    volumes: &[VolumeId],
) -> Vec<StoreAnswer> {
    let answer = |indexes, heartbeat_silent| StoreAnswer {
        indexes,
        heartbeat: None,
        heartbeat_silent,
    };
    let store = match store {
        Ok(store) => store,
        Err(e) => {
            return volumes
                .iter()
                .map(|_| answer(Err(e.clone()), None))
                .collect()
        }
    };
    let (reply, replies) = channel::<(usize, Reply)>();
    for (i, volume) in volumes.iter().enumerate() {
        let (store, key, volume, reply) =
            (store.clone(), key.clone(), volume.clone(), reply.clone());
        std::thread::spawn(move || {
            let indexes = store.list(&volume).map_err(|e| e.to_string());
            let listed = indexes.is_ok();
            let _ = reply.send((i, Reply::Listed(indexes)));
            let heartbeat = match &key {
                Some(key) if listed => ublk_target::health::read_heartbeat(&*store, &volume, key)
                    .unwrap_or_else(|e| {
                        log::warn!("volume {volume}: the shipper's heartbeat, ignored: {e}");
                        None
                    }),
                _ => None,
            };
            let _ = reply.send((i, Reply::Heartbeat(heartbeat)));
        });
    }
    drop(reply);
    let mut listed: Vec<Option<Result<Vec<u64>, String>>> = volumes.iter().map(|_| None).collect();
    let mut beats: Vec<Option<Option<Heartbeat>>> = volumes.iter().map(|_| None).collect();
    let deadline = Instant::now() + STORE_ANSWER_LIMIT;
    while beats.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match replies.recv_timeout(left) {
            Ok((i, Reply::Listed(indexes))) => listed[i] = Some(indexes),
            Ok((i, Reply::Heartbeat(beat))) => beats[i] = Some(beat),
            Err(_) => break,
        }
    }
    let silent = |what: &str| {
        format!(
            "{} gave no answer within {} s {what} (a hung mount or network?)",
            store.describe(),
            STORE_ANSWER_LIMIT.as_secs()
        )
    };
    listed
        .into_iter()
        .zip(beats)
        .map(|(indexes, beat)| match (indexes, beat) {
            (Some(indexes), Some(heartbeat)) => StoreAnswer {
                indexes,
                heartbeat,
                heartbeat_silent: None,
            },
            (Some(indexes), None) => answer(indexes, Some(silent("for the heartbeat"))),
            (None, _) => answer(Err(silent("for the listing")), None),
        })
        .collect()
}

/// Each plan of `config`: the points its failover would take now, and how old the
/// oldest is.
fn plans(
    config: &TargetConfig,
    rows: &[VolumeStatus],
    catalogs: &HashMap<VolumeId, ublk_target::Catalog>,
) -> Vec<PlanStatus> {
    config
        .plans
        .iter()
        .map(|plan| {
            let named: Option<Vec<(String, ublk_target::Catalog)>> = plan
                .volumes()
                .map(|id| catalogs.get(id).map(|c| (id.to_string(), c.clone())))
                .collect();
            let chosen = match named {
                Some(named) => ublk_target::plan::choose(plan.point, &named),
                None => Err("a volume's replica could not be read (see STATE)".into()),
            };
            PlanStatus::new(plan, chosen, |id| {
                rows.iter()
                    .find(|r| r.volume == id.as_str())
                    .and_then(|r| r.current_as_of_unix_ms)
            })
        })
        .collect()
}

/// The rows as `--check` judges them.
fn check_rows(rows: &[VolumeStatus]) -> Vec<changelog::check::CheckRow> {
    rows.iter()
        .map(|r| changelog::check::CheckRow {
            volume: r.volume.clone(),
            health: r.health.unwrap_or(changelog::alert::Health::Critical),
            rpo_ms: r.rpo_ms,
            rpo_threshold_ms: r.rpo_threshold_ms,
            state: r.state(),
        })
        .collect()
}
