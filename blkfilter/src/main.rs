//! `blkfilter`: the capture side's command line.

use anyhow::{Context, Result};
use blkfilter::capture::{Capture, Captured};
use blkfilter::daemon::run_server;
use blkfilter::ring::{Producer, RingGeometry};
use blkfilter::server::{self, AttachOptions};
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
    /// Protect a volume: create /dev/ublkbN in front of BACKING and capture every change
    /// into the ring. Returns once the device is live; the server keeps running in the
    /// background (or in the foreground with --foreground, for systemd).
    Attach(AttachArgs),
    /// Take back a device whose server died (state QUIESCED); in-flight requests are
    /// re-issued to the new server and nothing acknowledged is lost.
    Recover {
        /// Device id (N of /dev/ublkbN).
        #[arg(long)]
        id: i32,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Delete a blkfilter device; its server exits.
    Detach {
        #[arg(long)]
        id: i32,
    },
    /// List blkfilter devices with their state, backing and ring.
    List,
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

#[derive(clap::Args)]
struct AttachArgs {
    /// Backing file or block device (its size is the volume size).
    #[arg(long)]
    backing: PathBuf,
    /// Capture ring file (created if missing), e.g. /dev/shm/ublk-dr/vol0.ring.
    #[arg(long, required_unless_present = "no_capture")]
    ring: Option<PathBuf>,
    /// Serve the device without capture (to measure what capture costs).
    #[arg(long, conflicts_with = "ring")]
    no_capture: bool,
    /// Ring data capacity in MiB, when the ring is created.
    #[arg(long, default_value_t = 256)]
    ring_mib: u64,
    /// Device id (N of /dev/ublkbN); by default the kernel picks one.
    #[arg(long, default_value_t = -1)]
    id: i32,
    /// Requests in flight per device.
    #[arg(long, default_value_t = 64)]
    queue_depth: u16,
    /// Largest request in KiB.
    #[arg(long, default_value_t = 512)]
    max_io_kib: u32,
    /// Use buffered I/O on the backing instead of O_DIRECT.
    #[arg(long)]
    buffered: bool,
    /// Activity log: the persistent set of hot extents, so that after a power cut only
    /// those are resynced. Keep it on persistent storage [default: BACKING.al for a
    /// file backing, /var/lib/ublk-dr/NAME.al for a block device].
    #[arg(long, conflicts_with = "no_activity_log")]
    activity_log: Option<PathBuf>,
    /// No activity log: after an unclean stop, resync the whole disk (`shipper resync`).
    #[arg(long)]
    no_activity_log: bool,
    /// After a ring overflow or an unclean stop, resync the regions in doubt by
    /// comparing block digests with the replica (only differing blocks are sent),
    /// waiting this many seconds for the recovery side's digests before sending the
    /// regions whole. 0: send them whole at once.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    resync_compare_wait: u64,
    /// Put the volume in a consistency group: its writes take their sequence numbers
    /// from this shared clock file (created if missing, e.g.
    /// /dev/shm/ublk-dr/GROUP.clock), so `shipper group-cut` gives every volume
    /// attached with the same clock a recovery point at one common instant.
    #[arg(long, value_name = "PATH", conflicts_with = "no_capture")]
    group_clock: Option<PathBuf>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// The default activity log of a backing: beside a file, under /var/lib/ublk-dr for a
/// block device (whose directory, /dev, is not persistent).
fn default_activity_log(backing: &std::path::Path) -> PathBuf {
    let is_file = std::fs::metadata(backing).is_ok_and(|m| m.is_file());
    if is_file {
        let mut name = backing.as_os_str().to_owned();
        name.push(".al");
        PathBuf::from(name)
    } else {
        let name = backing
            .file_name()
            .map_or("volume".into(), |n| n.to_string_lossy().into_owned());
        PathBuf::from(format!("/var/lib/ublk-dr/{name}.al"))
    }
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Stay in the foreground (systemd, debugging) instead of daemonizing.
    #[arg(long)]
    foreground: bool,
    /// Where a daemonized server logs.
    #[arg(long, default_value = "/run/ublk-dr/blkfilter.log")]
    log: PathBuf,
}

/// Prints `table` in one write. A reader that stopped early (`blkfilter list | grep -q
/// ...`, `| head`) is not an error, as for other Unix tools.
fn print_table(table: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(table.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,libublk=warn"),
    )
    .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("blkfilter: error: {}", changelog::error::one_line(&*e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Attach(args) => {
            let activity_log = (args.ring.is_some() && !args.no_capture && !args.no_activity_log)
                .then(|| {
                    args.activity_log
                        .clone()
                        .unwrap_or_else(|| default_activity_log(&args.backing))
                });
            let opts = AttachOptions {
                backing: args.backing,
                ring: if args.no_capture { None } else { args.ring },
                ring_bytes: args.ring_mib << 20,
                id: args.id,
                queue_depth: args.queue_depth,
                io_buf_bytes: args.max_io_kib << 10,
                direct: !args.buffered,
                activity_log,
                resync_compare_wait: (args.resync_compare_wait > 0)
                    .then(|| std::time::Duration::from_secs(args.resync_compare_wait)),
                group_clock: args.group_clock,
            };
            // Attaching the same backing to a device whose server died takes it back
            // (what a restarted systemd unit wants) instead of failing on the id.
            if server::quiesced_with_backing(args.id, &opts.backing) {
                let id = args.id;
                log::info!("/dev/ublkb{id} is QUIESCED over the same backing: recovering it");
                let opts = server::recovery_plan(id)?;
                return run_server(args.daemon.foreground, &args.daemon.log, move |ready| {
                    server::serve(&opts, Some(id), ready)
                });
            }
            run_server(args.daemon.foreground, &args.daemon.log, move |ready| {
                server::serve(&opts, None, ready)
            })
        }
        Command::Recover { id, daemon } => {
            let opts = server::recovery_plan(id)?;
            run_server(daemon.foreground, &daemon.log, move |ready| {
                server::serve(&opts, Some(id), ready)
            })
        }
        Command::Detach { id } => {
            server::detach(id)?;
            println!("deleted /dev/ublkb{id}");
            Ok(())
        }
        Command::List => {
            let mut table = format!(
                "{:<4} {:<9} {:>12} {:>8}  BACKING -> RING\n",
                "ID", "STATE", "SIZE", "PID"
            );
            for d in server::list()? {
                let (backing, ring) = d.target.map_or(("?".into(), "?".into()), |t| {
                    let ring = t
                        .ring
                        .map_or("(no capture)".into(), |r| r.display().to_string());
                    let group = t
                        .group_clock
                        .map(|c| format!(" (group clock {})", c.display()));
                    (
                        t.backing.display().to_string(),
                        ring + &group.unwrap_or_default(),
                    )
                });
                table += &format!(
                    "{:<4} {:<9} {:>12} {:>8}  {backing} -> {ring}\n",
                    d.id, d.state, d.size_bytes, d.pid
                );
            }
            print_table(&table)
        }
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
                    Ok(Captured::MarkedDirty(_))
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
