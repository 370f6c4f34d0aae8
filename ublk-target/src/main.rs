//! `ublk-target`: the recovery-side command line.

use anyhow::{Context, Result};
use changelog::{Key, LocalDirStore, VolumeId};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use ublk_target::{Applier, ApplyOptions, ReplicaPaths, Retention};

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
    Apply {
        /// Target store directory (the shipper's --store).
        #[arg(long)]
        store: PathBuf,
        /// Volume id.
        #[arg(long)]
        volume: VolumeId,
        /// Replica image file or block device (a file is created if missing).
        #[arg(long)]
        replica: PathBuf,
        /// Key file, the same as the shipper's.
        #[arg(long)]
        key: PathBuf,
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
        /// How often --follow looks for new segments, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
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
    /// Drop the oldest undo journals so that at most --keep-points points remain and
    /// none is older than --keep-age (the latest point and points held by open views
    /// are always kept). Not while `apply` runs on the replica: give it the same
    /// options instead.
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
    /// Print a segment's header, and with --key verify it and list its records.
    Inspect {
        /// A segment file (`<volume>/<index>.seg` in a store or staging directory).
        segment: PathBuf,
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

/// Which replica, with its state and journal.
#[derive(Args)]
struct ReplicaArgs {
    /// Replica image file or block device.
    #[arg(long)]
    replica: PathBuf,
    /// The applied position [default: REPLICA.state].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Undo journal directory [default: REPLICA.journal].
    #[arg(long)]
    journal: Option<PathBuf>,
}

impl ReplicaArgs {
    fn paths(self) -> ReplicaPaths {
        ReplicaPaths::new(self.replica)
            .with_state(self.state)
            .with_journal(self.journal)
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
}

impl RetentionArgs {
    fn retention(&self) -> Retention {
        Retention {
            keep_points: self.keep_points,
            keep_age: self.keep_age,
        }
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

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("ublk-target: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Apply {
            store,
            volume,
            replica,
            key,
            state,
            journal,
            retention,
            follow,
            poll_ms,
        } => {
            let key = Key::load(&key)?;
            if !store.is_dir() {
                anyhow::bail!(
                    "store directory {} does not exist (use the shipper's --store path)",
                    store.display()
                );
            }
            let state =
                state.unwrap_or_else(|| PathBuf::from(format!("{}.state", replica.display())));
            let mut applier = Applier::open(
                Arc::new(LocalDirStore::new(&store)),
                volume,
                key.clone(),
                &replica,
                &state,
                &ApplyOptions {
                    journal_dir: journal,
                    retention: retention.retention(),
                },
            )?;
            let store = LocalDirStore::new(store);
            loop {
                let applied = applier.apply_available()?;
                ublk_target::digests::answer_requests(
                    &store,
                    &applier.cursor().volume,
                    &key,
                    &replica,
                    applier.cursor().next_seq,
                )?;
                if applied > 0 {
                    let c = applier.cursor();
                    log::info!(
                        "applied {applied} segment(s); replica now at segment {} (seq < {})",
                        c.next_index,
                        c.next_seq
                    );
                }
                if !follow {
                    println!(
                        "replica {} at segment {} (every record with seq < {})",
                        replica.display(),
                        applier.cursor().next_index,
                        applier.cursor().next_seq
                    );
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(poll_ms));
            }
        }
        Command::Points { replica, json } => {
            let paths = replica.paths();
            require_applied(&paths)?;
            let catalog = ublk_target::catalog(&paths)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&catalog)?);
            } else {
                print!("{}", catalog.table());
            }
            Ok(())
        }
        Command::Prune { replica, retention } => {
            let retention = retention.retention();
            if retention.is_unlimited() {
                anyhow::bail!("give --keep-points and/or --keep-age");
            }
            let paths = replica.paths();
            require_applied(&paths)?;
            let report = ublk_target::prune(&paths, &retention, changelog::unix_ms_now())?;
            match (report.removed.first(), report.removed.last()) {
                (Some(first), Some(last)) => println!(
                    "removed undo journals {first}..={last}; {} point(s) left",
                    report.points_left
                ),
                _ => println!("nothing to remove; {} point(s) left", report.points_left),
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
            let paths = replica.paths();
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
            let paths = replica.paths();
            require_applied(&paths)?;
            let mut view = ublk_target::PointView::open(&paths, point)?;
            ublk_target::view::export(&mut view, &out)?;
            view.close()?;
            println!(
                "wrote point {point} of {} to {}",
                paths.replica.display(),
                out.display()
            );
            Ok(())
        }
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
