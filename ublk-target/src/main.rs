//! `ublk-target`: the recovery-side command line.

use anyhow::{Context, Result};
use changelog::{Key, LocalDirStore, VolumeId};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use ublk_target::{Applier, ApplyOptions};

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
        /// Keep running and apply new segments as they arrive.
        #[arg(long)]
        follow: bool,
        /// How often --follow looks for new segments, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
    },
    /// Print a segment's header, and with --key verify it and list its records.
    Inspect {
        /// A segment file (`<volume>/<index>.seg` in a store or staging directory).
        segment: PathBuf,
        #[arg(long)]
        key: Option<PathBuf>,
    },
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
                Arc::new(LocalDirStore::new(store)),
                volume,
                key,
                &replica,
                &state,
                &ApplyOptions {
                    journal_dir: journal,
                    ..ApplyOptions::default()
                },
            )?;
            loop {
                let applied = applier.apply_available()?;
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
