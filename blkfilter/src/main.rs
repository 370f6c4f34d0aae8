//! `blkfilter`: the capture side's command line.

use anyhow::{Context, Result};
use blkfilter::capture::{Capture, Captured};
use blkfilter::ring::{Producer, RingGeometry};
use blkfilter::workload::Workload;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;

/// ublk-dr capture: puts a protected volume in front of a backing disk and records every
/// write, flush, FUA, discard and write-zeroes into a shared-memory ring for the shipper.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive the capture path with a seeded synthetic workload, without a ublk device.
    ///
    /// Each request goes through exactly the code the ublk server runs: the backing I/O
    /// through io_uring, then the record into the ring. For demos, tests and benchmarks
    /// on hosts whose kernel has no ublk.
    Exercise {
        /// Backing file (must exist; its size is the volume size).
        #[arg(long)]
        backing: PathBuf,
        /// Ring file (created if missing, e.g. /dev/shm/ublk-dr/vol0.ring).
        #[arg(long)]
        ring: PathBuf,
        /// Ring data capacity in MiB, when the ring is created.
        #[arg(long, default_value_t = 64)]
        ring_mib: u64,
        /// Number of requests.
        #[arg(long, default_value_t = 1000)]
        ops: usize,
        /// Workload seed (the same seed gives the same requests).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Largest single write in KiB.
        #[arg(long, default_value_t = 1024)]
        max_io_kib: u64,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("blkfilter: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Exercise {
            backing,
            ring,
            ring_mib,
            ops,
            seed,
            max_io_kib,
        } => {
            let size = std::fs::metadata(&backing)
                .with_context(|| {
                    format!(
                        "backing {} (create it first, e.g. truncate -s 256M FILE)",
                        backing.display()
                    )
                })?
                .len();
            if size < 4096 || size % 512 != 0 {
                anyhow::bail!(
                    "backing {} is {size} bytes; it must be a multiple of 512 and at least 4096",
                    backing.display()
                );
            }
            if let Some(dir) = ring.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let producer = Producer::create(&ring, &RingGeometry::new(ring_mib << 20, size))?;
            let mut capture = Capture::open(&backing, producer, false)?;
            let started = Instant::now();
            let (mut recorded, mut dirty, mut bytes) = (0u64, 0u64, 0u64);
            for op in Workload::new(seed, size)
                .with_max_io(max_io_kib << 10)
                .take(ops)
            {
                if let blkfilter::workload::WorkOp::Write { data, .. }
                | blkfilter::workload::WorkOp::Fua { data, .. } = &op
                {
                    bytes += data.len() as u64;
                }
                match capture.handle(op.as_request()) {
                    Ok(Captured::Recorded(_)) => recorded += 1,
                    Ok(Captured::MarkedDirty)
                    | Err(blkfilter::capture::CaptureError::MarkNotRecorded { .. }) => dirty += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{ops} requests ({:.1} MiB written) in {secs:.2} s: {recorded} recorded, {dirty} marked dirty (ring full)",
                bytes as f64 / (1 << 20) as f64
            );
            Ok(())
        }
    }
}
