//! The shipping pipeline of one volume:
//!
//! ```text
//! reader ──jobs──► sealers (N threads) ──sealed──► stager ──staged──► uploader ──► store
//!  ring             lz4 + AES-GCM                  link, write, fsync,            retry on
//!                                                  rename, release ring           the schedule
//! ```
//!
//! * The reader copies records from the ring into a [`PlainSegment`] and cuts it when it
//!   is `max_segment_age` old, `max_segment_bytes` large, or ends with a MARK.
//! * Sealers compress and encrypt in parallel; the stager puts segments back in index
//!   order, links each to its predecessor's digest, writes it durably into staging, and
//!   only then releases its ring space (I4) and saves the chain position.
//! * The uploader puts staged segments into the store in order, retrying recoverable
//!   errors on the [`RetrySchedule`], and removes each from staging once stored.
//!   A non-recoverable error makes the volume Critical and stops the run.
//! * Segment buffers go round: the reader fills one, a sealer encrypts it in place
//!   when it stores the body uncompressed (else compresses into a spare one and hands
//!   the plain one back), and the uploader returns it after the upload. A fresh 8 MiB
//!   buffer costs a page fault and a zeroed page per 4 KiB, and copying the body
//!   costs a sealer as much as AES-GCM does on hardware with VAES.
//! * When the staged backlog (staged, not uploaded) exceeds `backlog_resync_percent`
//!   of the disk, the reader drops it and the chain continues in a new epoch, with a
//!   whole-disk digest resync ([`crate::backlog`]).
//! * While everything captured is in the store, a thread writes the volume's
//!   heartbeat every `heartbeat_interval` ([`changelog::heartbeat`]); `caught_up`
//!   decides under the chain lock that it is true.

use crate::backlog;
use crate::chain_state;
use crate::error::{Result, ShipperError};
use crate::keys::SealingKey;
use crate::priority::{CpuPriority, Priority, ThreadPriority};
use crate::retry::RetrySchedule;
use crate::status::{RecentRate, Status, RATE_WINDOW};
use crate::throttle::{Rate, Throttle};
use blkfilter::ring::Consumer;
use changelog::alert::{Alerts, Site};
use changelog::heartbeat::Heartbeat;
use changelog::record::{MARK_APP_CONSISTENT, MARK_GROUP_CUT, MARK_RESYNC_DONE};
use changelog::segment::{seal_owned, SealParams, SealedSegment};
use changelog::store::{list_segment_dir, segment_file_name};
use changelog::uring::{sync_dir, write_file_atomic, Uring};
use changelog::GroupCutLabel;
use changelog::{flags, unix_ms_now, ChainCursor, Key, Op, PlainSegment, TargetStore, VolumeId};
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest sleep of the reader while a segment is open and the ring is empty.
const READER_NAP: Duration = Duration::from_millis(2);

/// Segment buffers kept for reuse (each up to `max_segment_bytes` + 1 MiB), besides
/// one per sealer.
const SPARE_BUFFERS: usize = 2;

/// How often the status file is rewritten.
const STATUS_INTERVAL: Duration = Duration::from_millis(200);

/// How often a caught-up shipper writes its heartbeat, by default: one small PUT per
/// volume every 10 s, and the recovery side's RPO of a quiet volume stays under it.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub volume: VolumeId,
    pub ring_path: PathBuf,
    /// Segments are staged in `staging_dir/<volume>/`.
    pub staging_dir: PathBuf,
    /// Every key of the key file ([`crate::keys`] picks the one that seals).
    pub key: Key,
    /// The key file `key` came from, read again when it changes (`None`: keys given
    /// in memory, never re-read).
    pub key_file: Option<PathBuf>,
    pub max_segment_age: Duration,
    pub max_segment_bytes: usize,
    pub sealers: usize,
    pub retry_unit: Duration,
    pub rpo_threshold: Duration,
    pub status_path: Option<PathBuf>,
    /// When a new protection epoch starts, run a digest resync of the whole disk (the
    /// initial replication of a volume that already holds data, I7).
    pub initial_sync: bool,
    /// Block size of digest resyncs this shipper asks for.
    pub resync_block_bytes: u32,
    /// When the staged backlog (segments staged but not uploaded) exceeds this percent
    /// of the disk, drop it and resync the whole disk by digest (0 = never).
    pub backlog_resync_percent: u32,
    /// How the pipeline threads are scheduled ([`crate::priority`]).
    pub cpu_priority: CpuPriority,
    /// The upload limit, shared with the other volumes of the process
    /// ([`crate::throttle`]).
    pub throttle: Arc<Throttle>,
    /// Run on each health change of the volume ([`changelog::alert`]); `None`: logged
    /// only.
    pub alert_command: Option<String>,
    /// How long a new health must hold before it is reported (Critical: at once).
    pub alert_hold: Duration,
    /// How often a caught-up shipper tells the recovery side so
    /// ([`changelog::heartbeat`]): a quiet volume's replica is then known to be current.
    pub heartbeat_interval: Duration,
}

impl ShipperConfig {
    /// A config with the defaults: 1 s segments of at most 8 MiB, two sealers, the
    /// retry unit a minute, RPO threshold 30 s, a heartbeat every 10 s while caught
    /// up, initial sync on, 64 KiB resync blocks,
    /// the staged backlog dropped above 50% of the disk, normal CPU priority (the
    /// `shipper` command yields by default), no upload limit, no alert command.
    pub fn new(volume: VolumeId, ring_path: PathBuf, staging_dir: PathBuf, key: Key) -> Self {
        ShipperConfig {
            volume,
            ring_path,
            staging_dir,
            key,
            key_file: None,
            max_segment_age: Duration::from_secs(1),
            max_segment_bytes: 8 << 20,
            sealers: 2,
            retry_unit: Duration::from_secs(60),
            rpo_threshold: Duration::from_secs(30),
            status_path: None,
            initial_sync: true,
            resync_block_bytes: changelog::digests::DEFAULT_BLOCK_BYTES,
            backlog_resync_percent: backlog::DEFAULT_PERCENT,
            cpu_priority: CpuPriority::Normal,
            throttle: Arc::new(Throttle::unlimited()),
            alert_command: None,
            alert_hold: changelog::alert::DEFAULT_HOLD,
            heartbeat_interval: DEFAULT_HEARTBEAT,
        }
    }

    pub fn volume_staging_dir(&self) -> PathBuf {
        self.staging_dir.join(self.volume.as_str())
    }
}

/// Tells a running pipeline to stop.
#[derive(Debug, Default)]
pub struct Control {
    stop: AtomicBool,
    drain: AtomicBool,
}

impl Control {
    /// Stop soon; records not yet staged stay in the ring for the next run.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Ship everything published to the ring so far, then stop.
    pub fn drain(&self) {
        self.drain.store(true, Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn draining(&self) -> bool {
        self.drain.load(Ordering::Acquire)
    }
}

/// What a finished run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub segments_uploaded: u64,
    /// The chain position after the last staged segment.
    pub cursor: ChainCursor,
    /// Why some writes were not in the stream when the run ended but wait for a digest
    /// resync (a drain did not bring the store up to the source), if so.
    pub resync_pending: Option<&'static str>,
}

struct SealJob {
    index: u64,
    epoch: u64,
    plain: PlainSegment,
    /// Ring position just past the job's last record: released once it is staged.
    ring_end: u64,
    created_unix_ms: u64,
    /// The key to seal with, chosen when the segment is cut: segments are cut in chain
    /// order, so the keys only move forward along the chain whichever sealer is faster.
    key: Key,
}

/// A segment durable in staging, on its way to the uploader.
struct Staged {
    index: u64,
    /// The drop generation it was staged under; skipped once a drop passed it.
    generation: u64,
    /// The file's bytes, unless the upload queue was long (then read back from staging).
    bytes: Option<Vec<u8>>,
}

/// Staged segments handed to the uploader with their bytes in memory, at most.
const UPLOAD_QUEUE_IN_MEMORY: usize = 8;

struct Sealed {
    job_index: u64,
    ring_end: u64,
    plain_len: usize,
    segment: SealedSegment,
}

/// Shared state the stages report into; published as the status file.
struct Board {
    status: Mutex<Status>,
    /// Index → time its oldest record was read, for segments not yet in the store.
    pending_since: Mutex<BTreeMap<u64, u64>>,
    /// When the reader's open segment got its first record (0 = empty).
    open_since_ms: AtomicU64,
    /// Bytes of the segments staged and not yet uploaded.
    staged_bytes: AtomicU64,
    /// When the oldest record of a dropped backlog was read (0 = none): no recovery
    /// point in the store covers it until a crash point after the drop is uploaded.
    lost_since_ms: AtomicU64,
    /// How long this volume's uploads have waited for the upload limit in all.
    throttled_us: AtomicU64,
    /// Capture (bytes read from the ring) and upload throughput, sampled at each
    /// status write.
    rates: Mutex<[RecentRate; 2]>,
}

/// What the stager, the uploader and a backlog drop share.
struct Chain {
    /// The stager's position: after the newest staged segment. Held while staging one.
    cursor: Mutex<ChainCursor>,
    /// Held by the uploader around each upload attempt, and by a drop.
    upload: Mutex<()>,
    /// Bumped by each drop, with both locks held.
    generation: AtomicU64,
    /// A whole-disk resync is owed for a dropped backlog (`resync.owed` exists).
    owed: AtomicBool,
}

impl Board {
    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    fn snapshot(&self, ring: &Consumer) -> Status {
        let now = unix_ms_now();
        let oldest_pending = self
            .pending_since
            .lock()
            .expect("pending lock")
            .values()
            .min()
            .copied();
        let open = self.open_since_ms.load(Ordering::Relaxed);
        let lost = self.lost_since_ms.load(Ordering::Relaxed);
        let oldest = [
            oldest_pending,
            (open != 0).then_some(open),
            (lost != 0).then_some(lost),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut status = self.status.lock().expect("status lock").clone();
        status.updated_unix_ms = now;
        status.rpo_ms = oldest.map_or(0, |t| now.saturating_sub(t));
        status.ring_used_bytes = ring.published() - ring.released();
        status.ring_capacity_bytes = ring.capacity();
        status.ring_overflow = ring.overflowed();
        status.ring_resync = ring.resyncing();
        status.staged_backlog_bytes = self.staged_bytes.load(Ordering::Relaxed);
        status.resync = Some(ring.resync_progress()).filter(|p| p.pending());
        status.upload_throttled_ms = self.throttled_us.load(Ordering::Relaxed) / 1000;
        let [capture, upload] = &mut *self.rates.lock().expect("rates lock");
        let now = Instant::now();
        status.capture_bytes_per_s = capture.sample(now, status.bytes_plain);
        status.upload_bytes_per_s = upload.sample(now, status.bytes_uploaded);
        status
    }
}

/// Runs the pipeline until `control` stops it (or it drains), or a non-recoverable
/// error. Takes the ring's consumer side exclusively.
pub fn run(
    config: &ShipperConfig,
    store: Arc<dyn TargetStore>,
    control: Arc<Control>,
) -> Result<RunSummary> {
    let ring = Arc::new(Consumer::open(&config.ring_path)?);
    let dir = config.volume_staging_dir();
    std::fs::create_dir_all(&dir).map_err(|e| {
        ShipperError::io(format!("creating staging directory {}", dir.display()), e)
    })?;
    let cursor = chain_state::recover(&dir, &config.volume, &config.key)?;
    let keys = SealingKey::open(
        &config.volume,
        config.key.clone(),
        config.key_file.as_deref(),
        &dir,
    );
    // A new protection with a key file of several keys: which of them the recovery
    // side holds decides the key, so nothing is sealed before the proofs are read
    // (the ring holds the writes meanwhile).
    let mut warned = false;
    while keys.is_a_guess() && !control.stopping() {
        if let Err(e) = keys.refresh(store.as_ref()) {
            if !std::mem::replace(&mut warned, true) {
                log::warn!(
                    "volume {}: waiting for the store to read the recovery side's key proofs \
                     before sealing anything (the key file has several keys): {e}",
                    config.volume
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let backlog: Vec<u64> = list_segment_dir(&dir)?;
    let mut staged_bytes = 0;
    for &index in &backlog {
        let path = dir.join(segment_file_name(index));
        staged_bytes += std::fs::metadata(&path)
            .map_err(|e| ShipperError::io(format!("reading {}", path.display()), e))?
            .len();
    }
    let owed = backlog::owed(&dir)?;
    let no_resync_pending = !ring.resync_progress().pending()
        && !unread_resync_done(&ring, ring.released(), cursor.next_seq)?;
    if let (Some(_), true) = (&owed, no_resync_pending) {
        // A host crash lost the ring with the request (see crate::backlog).
        log::warn!(
            "volume {}: a whole-disk digest resync is owed for a dropped staged backlog: asking again",
            config.volume
        );
        ring.request_digest_resync(config.resync_block_bytes);
    }
    // No segment staged yet: a resync pending now is this protection's initial one.
    let new_protection = config.initial_sync && cursor.next_index == 0;
    if owed.is_none() && new_protection && no_resync_pending {
        log::info!(
            "volume {}: new protection epoch: initial replication by digest resync",
            config.volume
        );
        ring.request_digest_resync(config.resync_block_bytes);
    }
    log::info!(
        "volume {}: shipping from {} (next segment {:016x}, seq {}), {} staged segment(s) to upload to {}",
        config.volume,
        config.ring_path.display(),
        cursor.next_index,
        cursor.next_seq,
        backlog.len(),
        store.describe()
    );
    let mut alerts = Alerts::new(
        config.alert_command.clone(),
        config.alert_hold,
        Site::Source,
    );
    let board = Arc::new(Board {
        status: Mutex::new(Status {
            volume: config.volume.to_string(),
            pid: std::process::id(),
            sealing_key_id: changelog::key::hex(&keys.sealing().id()),
            rpo_threshold_ms: config.rpo_threshold.as_millis() as u64,
            newest_staged_index: cursor.next_index.checked_sub(1),
            segments_pending_upload: backlog.len() as u64,
            backlog_limit_bytes: backlog::limit_bytes(
                config.backlog_resync_percent,
                ring.geometry().device_bytes,
            )
            .unwrap_or(0),
            backlog_resync: owed.is_some(),
            backlog_dropped: owed.clone(),
            ..Default::default()
        }),
        pending_since: Mutex::new(backlog.iter().map(|&i| (i, unix_ms_now())).collect()),
        open_since_ms: Default::default(),
        staged_bytes: AtomicU64::new(staged_bytes),
        lost_since_ms: AtomicU64::new(owed.as_ref().map_or(0, |d| d.oldest_lost_unix_ms)),
        throttled_us: AtomicU64::new(0),
        rates: Mutex::new([
            RecentRate::from_zero(RATE_WINDOW, Instant::now()),
            RecentRate::from_zero(RATE_WINDOW, Instant::now()),
        ]),
    });
    let chain = Chain {
        cursor: Mutex::new(cursor.clone()),
        upload: Mutex::new(()),
        generation: AtomicU64::new(0),
        owed: AtomicBool::new(owed.is_some()),
    };
    let sealers = config.sealers.max(1);
    let (job_tx, job_rx) = bounded::<SealJob>(sealers * 2);
    // Buffers go round (see the module docs); a full pool drops the extra ones.
    let (spare_tx, spare_rx) = bounded::<Vec<u8>>(SPARE_BUFFERS + sealers);
    let (sealed_tx, sealed_rx) = bounded::<Result<Sealed>>(sealers * 2);
    let (staged_tx, staged_rx) = unbounded::<Staged>();

    let priority = Priority::new(config.cpu_priority);
    let priority = &priority;
    let finished = AtomicBool::new(false);
    // The reader, the stager and the uploader each hold a sender; the main loop below
    // sleeps on the receiver until all three have ended (disconnected) or a status
    // update is due. A polling loop here cost an idle shipper ~4 % of a vCPU under TCG.
    let (alive_tx, all_ended) = bounded::<()>(0);
    let result: Result<(ChainCursor, u64)> = std::thread::scope(|scope| {
        let alive = alive_tx.clone();
        let reader = spawn_named(scope, "ship-reader", || {
            let _alive = alive;
            let r = read_ring(
                config, &keys, &dir, &ring, &cursor, &chain, &board, &control, job_tx, &spare_rx,
                priority,
            );
            stop_on_err(&r, &control);
            r
        });
        for _ in 0..sealers {
            let (jobs, out) = (job_rx.clone(), sealed_tx.clone());
            let spare = (spare_tx.clone(), spare_rx.clone());
            spawn_named(scope, "ship-sealer", move || {
                seal_jobs(config, &jobs, &out, &spare, priority)
            });
        }
        drop((job_rx, sealed_tx));
        let alive = alive_tx.clone();
        let stager = spawn_named(scope, "ship-stager", || {
            let _alive = alive;
            let r = stage(
                config, &dir, &ring, &chain, &board, &control, sealed_rx, staged_tx, &spare_tx,
                priority,
            );
            stop_on_err(&r, &control);
            r
        });
        let uploader = spawn_named(scope, "ship-uploader", || {
            let _alive = alive_tx;
            let r = upload(
                config,
                &dir,
                store.as_ref(),
                backlog,
                staged_rx,
                &chain,
                &board,
                &control,
                &spare_tx,
                priority,
            );
            stop_on_err(&r, &control);
            r
        });
        let finished = &finished;
        let coordinator = spawn_named(scope, "ship-resync", || {
            let report = |error| board.update(|s| s.resync_store_error = error);
            let r =
                crate::resync::coordinate(config, &keys, &ring, store.as_ref(), finished, &report);
            stop_on_err(&r, &control);
            r
        });
        spawn_named(scope, "ship-keys", || {
            watch_keys(config, &keys, store.as_ref(), &board, finished)
        });
        spawn_named(scope, "ship-heartbeat", || {
            send_heartbeats(
                config,
                &keys,
                store.as_ref(),
                &ring,
                &chain,
                &board,
                finished,
            )
        });
        // Nothing is ever sent: the wait ends by timeout or when all three have ended.
        loop {
            publish(config, &board, &ring, priority, &mut alerts);
            if let Err(RecvTimeoutError::Disconnected) = all_ended.recv_timeout(STATUS_INTERVAL) {
                break;
            }
        }
        finished.store(true, Ordering::Release);
        let panicked = "a shipper pipeline thread panicked";
        let (read, staged, uploaded, coordinated) = (
            reader.join().expect(panicked),
            stager.join().expect(panicked),
            uploader.join().expect(panicked),
            coordinator.join().expect(panicked),
        );
        read?;
        coordinated?;
        Ok((staged?, uploaded?))
    });
    match &result {
        // A drain (a planned failover, say) ends with everything in the store: the
        // recovery side may know so at once. (Not on a stop: a hung store must not
        // hold it up.)
        Ok(_) if control.draining() => {
            if let Some(Err(e)) =
                send_heartbeat(config, &keys, store.as_ref(), &ring, &chain, &board)
            {
                log::warn!(
                    "volume {}: writing the heartbeat after the drain: {e}",
                    config.volume
                );
            }
        }
        Ok(_) => {}
        Err(e) => {
            let what = e.to_string();
            board.update(|s| s.critical = Some(what));
        }
    }
    publish(config, &board, &ring, priority, &mut alerts);
    let (cursor, segments_uploaded) = result?;
    Ok(RunSummary {
        segments_uploaded,
        cursor,
        resync_pending: resync_pending(&chain, &ring, new_protection),
    })
}

/// Why writes are still waiting for a digest resync rather than in the stream (I7):
/// a backlog dropped while the store was unreachable, an overflow whose regions are
/// not resynced yet, or a resync under way (on a `new_protection`, the initial
/// replication this run asked for). `None`: the stream holds every write.
fn resync_pending(chain: &Chain, ring: &Consumer, new_protection: bool) -> Option<&'static str> {
    if chain.owed.load(Ordering::Acquire) {
        Some(
            "a whole-disk digest resync is still owed for the staged backlog dropped while \
             the store was unreachable",
        )
    } else if ring.overflowed() {
        Some("the ring overflowed and the regions written meanwhile are not resynced yet")
    } else if new_protection && (ring.resyncing() || ring.resync_progress().pending()) {
        // Typically a first `--drain` without `--no-initial-sync`: the resync it asked
        // for needs the recovery side's digests, so it cannot finish within the drain.
        Some(
            "this new protection's initial replication (a digest resync of the whole volume \
             against the replica) is not finished (a protection whose replica is known to \
             equal the source, or both blank, is started with --no-initial-sync, or \
             initial_sync = false in the config file; this one has asked for it)",
        )
    } else if ring.resyncing() || ring.resync_progress().pending() {
        Some("a resync is still under way (or was cut short)")
    } else {
        None
    }
}

/// Threads get names so that `top -H`, perf and panics say which stage is which.
fn spawn_named<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn_scoped(scope, f)
        .expect("spawning a pipeline thread")
}

/// A failed stage stops the others; its error is what the run returns.
fn stop_on_err<T>(r: &Result<T>, control: &Control) {
    if r.is_err() {
        control.stop();
    }
}

/// Takes a status snapshot: moves the threads' CPU priority by it, and writes it to
/// the status file if there is one.
fn publish(
    config: &ShipperConfig,
    board: &Board,
    ring: &Consumer,
    priority: &Priority,
    alerts: &mut Alerts,
) {
    let mut status = board.snapshot(ring);
    priority.update(
        status.ring_used_bytes,
        status.ring_capacity_bytes,
        status.rpo_ms,
        config.rpo_threshold.as_millis() as u64,
    );
    status.background = priority.background();
    let (limit, window) = config.throttle.limit_now();
    status.upload_limit_bytes_per_s = limit.map(Rate::bytes_per_s);
    status.upload_limit_window = window;
    alerts.observe(&status.volume, status.health(), status.rpo_ms, || {
        status.state()
    });
    if let Some(path) = &config.status_path {
        if let Err(e) = status.write(path) {
            log::warn!("{e}");
        }
    }
}

/// How often the key file and the recovery side's key proofs are looked at.
const KEY_REFRESH: Duration = Duration::from_secs(5);

/// Moves the sealing key forward as the recovery side proves newer keys
/// ([`crate::keys`]), until the pipeline has finished.
fn watch_keys(
    config: &ShipperConfig,
    keys: &SealingKey,
    store: &dyn TargetStore,
    board: &Board,
    finished: &AtomicBool,
) {
    let mut next = Instant::now();
    while !finished.load(Ordering::Acquire) {
        if Instant::now() >= next {
            next = Instant::now() + KEY_REFRESH;
            match keys.refresh(store) {
                Ok(Some(id)) => board.update(|s| s.sealing_key_id = changelog::key::hex(&id)),
                Ok(None) => {}
                Err(e) => log::debug!(
                    "volume {}: looking for the recovery side's key proofs: {e}",
                    config.volume
                ),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes the volume's heartbeat every `heartbeat_interval` while everything captured
/// is in the store ([`changelog::heartbeat`]). A failed write is logged (a warning
/// when the trouble is new: the recovery side will see this volume go stale) and tried
/// again at the next interval; the uploader reports a store that is down.
fn send_heartbeats(
    config: &ShipperConfig,
    keys: &SealingKey,
    store: &dyn TargetStore,
    ring: &Consumer,
    chain: &Chain,
    board: &Board,
    finished: &AtomicBool,
) {
    let mut next = Instant::now() + config.heartbeat_interval;
    let mut trouble = None;
    while !finished.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() < next {
            continue;
        }
        // Not caught up: try again soon (segments meanwhile speak for the source).
        let Some(sent) = send_heartbeat(config, keys, store, ring, chain, board) else {
            continue;
        };
        next = Instant::now() + config.heartbeat_interval;
        let now = sent.err().map(|e| e.to_string());
        match (&now, &trouble) {
            (Some(e), Some(before)) if e == before => {
                log::debug!("volume {}: writing the heartbeat: {e}", config.volume)
            }
            (Some(e), _) => log::warn!(
                "volume {}: writing the heartbeat: {e} (the recovery side sees this volume \
                 as current only by its recovery points meanwhile)",
                config.volume
            ),
            (None, Some(_)) => log::info!("volume {}: heartbeat written again", config.volume),
            (None, None) => {}
        }
        trouble = now;
    }
}

/// Writes the heartbeat if everything captured is in the store (`None` if it is not).
fn send_heartbeat(
    config: &ShipperConfig,
    keys: &SealingKey,
    store: &dyn TargetStore,
    ring: &Consumer,
    chain: &Chain,
    board: &Board,
) -> Option<changelog::Result<()>> {
    let beat = caught_up(ring, chain, board, config.heartbeat_interval)?;
    // A key the recovery side may not hold yet: it could not open the heartbeat.
    if keys.is_a_guess() {
        return Some(Ok(()));
    }
    let sent = beat
        .seal(&keys.sealing(), &config.volume)
        .and_then(|sealed| {
            store.put_blob(&config.volume, changelog::heartbeat::BLOB_NAME, &sealed)
        });
    if sent.is_ok() {
        board.update(|s| s.heartbeat_unix_ms = Some(beat.unix_ms));
    }
    Some(sent)
}

/// The heartbeat that is true now, if everything captured is in the store. All of it
/// under the chain lock, which the stager holds from staging a segment to saving the
/// cursor past it and a backlog drop holds throughout: the time first, then no write
/// waiting for a resync (an overflow stays flagged until the regions it lost are
/// re-recorded into the ring), every record the ring published staged (so in a
/// segment before the cursor), and none of those segments waiting for upload.
fn caught_up(
    ring: &Consumer,
    chain: &Chain,
    board: &Board,
    interval: Duration,
) -> Option<Heartbeat> {
    let cursor = chain.cursor.lock().expect("cursor lock");
    let now = unix_ms_now();
    let waiting_for_resync = chain.owed.load(Ordering::Acquire)
        || board.lost_since_ms.load(Ordering::Relaxed) != 0
        || ring.overflowed()
        || ring.resyncing()
        || ring.resync_progress().pending();
    if waiting_for_resync
        || ring.published() != ring.released()
        || !board.pending_since.lock().expect("pending lock").is_empty()
    {
        return None;
    }
    Some(Heartbeat::at(&cursor, now, interval.as_millis() as u64))
}

/// The reader: ring → plain segments.
#[allow(clippy::too_many_arguments)]
fn read_ring(
    config: &ShipperConfig,
    keys: &SealingKey,
    dir: &Path,
    ring: &Consumer,
    cursor: &ChainCursor,
    chain: &Chain,
    board: &Board,
    control: &Control,
    jobs: Sender<SealJob>,
    spare_buffers: &Receiver<Vec<u8>>,
    priority: &Priority,
) -> Result<()> {
    let mut thread_priority = ThreadPriority::new(priority);
    let mut pos = ring.released();
    let mut next_index = cursor.next_index;
    let mut epoch = cursor.epoch.expect("recover() fixes the epoch");
    // The next segment cut starts a new epoch (after a backlog drop, possibly made by a
    // run that stopped before cutting it).
    let mut announce_epoch = backlog::must_announce(dir, next_index);
    let backlog_limit =
        backlog::limit_bytes(config.backlog_resync_percent, ring.geometry().device_bytes);
    // Room for a full segment plus a typical record crossing the limit, so buffers
    // rarely reallocate (each reallocation copies the whole body).
    let new_plain = || {
        let mut buf = spare_buffers.try_recv().unwrap_or_default();
        buf.clear();
        buf.reserve(config.max_segment_bytes + (1 << 20));
        let mut plain = PlainSegment::with_buffer(buf);
        plain.flags = flags::CRASH_POINT;
        plain
    };
    let mut plain = new_plain();
    let mut opened_at = Instant::now();
    // Whether replaying the stream up to the current position gives a crash state: not
    // from an overflow (writes went to the bitmap) until the producer's resync pass has
    // re-recorded them and its resync-done MARK is read (I7).
    let lost = || ring.overflowed() || ring.resyncing();
    // (RESYNC is also up from a digest resync request until its done MARK.)
    let mut consistent = !lost() && !unread_resync_done(ring, pos, cursor.next_seq)?;
    let cut = |plain: &mut PlainSegment,
               pos: u64,
               next_index: &mut u64,
               epoch: u64,
               announce_epoch: &mut bool,
               consistent: bool|
     -> bool {
        if !consistent || lost() {
            plain.flags &= !flags::CRASH_POINT;
        }
        if std::mem::take(announce_epoch) {
            plain.flags |= flags::NEW_EPOCH;
        }
        let job = SealJob {
            index: *next_index,
            epoch,
            plain: std::mem::replace(plain, new_plain()),
            ring_end: pos,
            created_unix_ms: unix_ms_now(),
            key: keys.sealing(),
        };
        board
            .pending_since
            .lock()
            .expect("pending lock")
            .insert(job.index, board.open_since_ms.swap(0, Ordering::Relaxed));
        *next_index += 1;
        jobs.send(job).is_ok()
    };
    loop {
        if control.stopping() {
            return Ok(());
        }
        thread_priority.follow();
        let staged = board.staged_bytes.load(Ordering::Relaxed);
        if let Some(limit) = backlog_limit.filter(|&limit| staged > limit) {
            match drop_backlog(config, dir, ring, chain, board, control, next_index, limit)? {
                DropOutcome::Stopping => return Ok(()),
                DropOutcome::WithinLimit => {}
                DropOutcome::Dropped(continuation) => {
                    next_index = continuation.next_index;
                    epoch = continuation.epoch.expect("a drop sets the epoch");
                    announce_epoch = true;
                    // The records read from here on miss the dropped ones: no crash
                    // point until the resync asked for has ended (its done MARK).
                    consistent = false;
                    plain.flags &= !flags::CRASH_POINT;
                }
            }
        }
        // Whether to cut the open segment now, and whether the ring is empty.
        let (cut_now, idle) = match ring.peek(pos)? {
            Some((record, next)) => {
                pos = next;
                if record.seq < cursor.next_seq {
                    continue; // already in a staged segment; see chain_state
                }
                if plain.is_empty() {
                    opened_at = Instant::now();
                    board.open_since_ms.store(unix_ms_now(), Ordering::Relaxed);
                }
                if record.op == Op::Mark && record.flags & MARK_APP_CONSISTENT != 0 {
                    plain.flags |= flags::APP_CONSISTENT;
                }
                if record.op == Op::Mark && record.flags & MARK_GROUP_CUT != 0 {
                    // The MARK ends this segment: its end is the group's cut.
                    if GroupCutLabel::parse(record.data).is_some() {
                        plain.flags |= flags::GROUP_MARK;
                    } else {
                        log::warn!(
                            "seq {}: a group-cut MARK with an unusable label {:?}",
                            record.seq,
                            String::from_utf8_lossy(record.data)
                        );
                    }
                }
                plain.push(&record);
                if record.op == Op::Mark && record.flags & MARK_RESYNC_DONE != 0 {
                    // The producer lowers RESYNC right after this record, and lowered
                    // DIGEST_ACTIVE before it (ring::resync).
                    consistent = !ring.overflowed() && !ring.resync_progress().pending();
                    if consistent {
                        await_resync_lowered(ring);
                    }
                } else if lost() {
                    consistent = false;
                }
                board.update(|s| {
                    s.records_captured += 1;
                    s.bytes_plain += record.encoded_len() as u64;
                });
                let full = plain.body().len() >= config.max_segment_bytes;
                let aged = opened_at.elapsed() >= config.max_segment_age;
                (full || record.op == Op::Mark || aged, false)
            }
            None => {
                let due = opened_at.elapsed() >= config.max_segment_age || control.draining();
                (!plain.is_empty() && due, true)
            }
        };
        if cut_now
            && !cut(
                &mut plain,
                pos,
                &mut next_index,
                epoch,
                &mut announce_epoch,
                consistent,
            )
        {
            return Ok(());
        }
        if !idle {
            continue;
        }
        if control.draining() {
            return Ok(());
        }
        if plain.is_empty() {
            ring.wait(pos, Duration::from_millis(100));
        } else {
            // A segment is open: gather records with short sleeps rather than a futex
            // wait, so the producer does not pay a wake-up syscall per request (it only
            // wakes a consumer that registered as waiting).
            let left = config.max_segment_age.saturating_sub(opened_at.elapsed());
            std::thread::sleep(left.clamp(Duration::from_micros(100), READER_NAP));
        }
    }
}

enum DropOutcome {
    Stopping,
    /// The uploader brought staging back within the limit meanwhile.
    WithinLimit,
    /// Dropped; the chain continues at this position (a new epoch).
    Dropped(ChainCursor),
}

/// Drops the staged backlog ([`crate::backlog`]) if it still exceeds `limit` bytes
/// once nothing is being staged or uploaded. `next_index` is the index the reader
/// would give its next segment: every segment before it was cut.
#[allow(clippy::too_many_arguments)]
fn drop_backlog(
    config: &ShipperConfig,
    dir: &Path,
    ring: &Consumer,
    chain: &Chain,
    board: &Board,
    control: &Control,
    next_index: u64,
    limit: u64,
) -> Result<DropOutcome> {
    // Wait until every segment cut is staged: no sealed segment of the old numbering
    // is in flight, the sealers and the stager are idle.
    while chain.cursor.lock().expect("cursor lock").next_index != next_index {
        if control.stopping() {
            return Ok(DropOutcome::Stopping);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Lock order: cursor, then upload (the stager and the uploader each take one).
    let mut cursor = chain.cursor.lock().expect("cursor lock");
    let _no_upload = chain.upload.lock().expect("upload lock");
    let oldest_pending = board
        .pending_since
        .lock()
        .expect("pending lock")
        .values()
        .copied()
        .filter(|&t| t != 0)
        .min();
    let oldest_lost = [
        oldest_pending,
        Some(board.lost_since_ms.load(Ordering::Relaxed)).filter(|&t| t != 0),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or_else(unix_ms_now);
    let dropped = match backlog::drop_staged(config, dir, ring, &cursor, limit, oldest_lost)? {
        backlog::DropResult::Dropped(dropped) => dropped,
        backlog::DropResult::WithinLimit { bytes } => {
            // The uploader caught up meanwhile (the count follows it, under the lock).
            board.staged_bytes.store(bytes, Ordering::Relaxed);
            return Ok(DropOutcome::WithinLimit);
        }
    };
    let from = dropped.continuation.next_index;
    board
        .pending_since
        .lock()
        .expect("pending lock")
        .retain(|&index, _| index < from);
    *cursor = dropped.continuation.clone();
    chain.generation.fetch_add(1, Ordering::AcqRel);
    chain.owed.store(true, Ordering::Release);
    board.staged_bytes.store(0, Ordering::Relaxed);
    board.lost_since_ms.store(oldest_lost, Ordering::Relaxed);
    board.update(|s| {
        s.segments_pending_upload = 0;
        s.newest_staged_index = from.checked_sub(1);
        s.backlog_dropped = Some(dropped.record);
        s.backlog_resync = true;
    });
    Ok(DropOutcome::Dropped(dropped.continuation))
}

/// Whether the unread part of the ring holds a resync-done MARK: then the records
/// before it are resync data, and the stream is not consistent until it is read, even
/// though the ring's flags are already down (a shipper restarted mid-resync).
/// Waits briefly for the producer to lower RESYNC after the resync-done MARK just read,
/// so that the segment the MARK ends is cut as the crash point it is (the cut checks
/// RESYNC too). A producer that died in between leaves RESYNC up: then, after 100 ms,
/// the segment is cut without the crash point, which is safe.
fn await_resync_lowered(ring: &Consumer) {
    let deadline = Instant::now() + Duration::from_millis(100);
    while ring.resyncing() && !ring.overflowed() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn unread_resync_done(ring: &Consumer, mut pos: u64, next_seq: u64) -> Result<bool> {
    while let Some((record, next)) = ring.peek(pos)? {
        if record.seq >= next_seq && record.op == Op::Mark && record.flags & MARK_RESYNC_DONE != 0 {
            return Ok(true);
        }
        pos = next;
    }
    Ok(false)
}

/// A sealer worker: compress + encrypt, in whatever order jobs arrive.
fn seal_jobs(
    config: &ShipperConfig,
    jobs: &Receiver<SealJob>,
    out: &Sender<Result<Sealed>>,
    (spare_tx, spare_rx): &(Sender<Vec<u8>>, Receiver<Vec<u8>>),
    priority: &Priority,
) {
    let mut thread_priority = ThreadPriority::new(priority);
    for job in jobs {
        thread_priority.follow();
        let params = SealParams {
            volume: config.volume.clone(),
            epoch: job.epoch,
            index: job.index,
            created_unix_ms: job.created_unix_ms,
        };
        let plain_len = job.plain.body().len();
        // Receives the compressed body when lz4 is tried; the buffer left over is the
        // plain one when lz4 was kept, else this one.
        let scratch = spare_rx.try_recv().unwrap_or_default();
        let sealed = seal_owned(job.plain, &params, &job.key, scratch)
            .map_err(ShipperError::from)
            .map(|(segment, left_over)| {
                let _ = spare_tx.try_send(left_over); // dropped when enough wait
                Sealed {
                    job_index: job.index,
                    ring_end: job.ring_end,
                    plain_len,
                    segment,
                }
            });
        if out.send(sealed).is_err() {
            return;
        }
    }
}

/// The stager: put sealed segments in order, link, write durably, release the ring.
#[allow(clippy::too_many_arguments)]
fn stage(
    config: &ShipperConfig,
    dir: &Path,
    ring: &Consumer,
    chain: &Chain,
    board: &Board,
    control: &Control,
    sealed: Receiver<Result<Sealed>>,
    staged: Sender<Staged>,
    spare_buffers: &Sender<Vec<u8>>,
    priority: &Priority,
) -> Result<ChainCursor> {
    let mut thread_priority = ThreadPriority::new(priority);
    let mut uring = Uring::new(8).map_err(|e| ShipperError::io("io_uring setup", e))?;
    let mut waiting: BTreeMap<u64, Sealed> = BTreeMap::new();
    for item in sealed {
        thread_priority.follow();
        let item = item?;
        waiting.insert(item.job_index, item);
        loop {
            // Held while staging one segment, so a backlog drop never sees half of it.
            let mut cursor = chain.cursor.lock().expect("cursor lock");
            let Some(next) = waiting.remove(&cursor.next_index) else {
                break;
            };
            let linked = next.segment.link(cursor.prev_digest);
            let name = segment_file_name(linked.header.index);
            // On a full staging this waits with the cursor held: a backlog drop waits
            // too, and so does the reader, leaving the records in the ring.
            let staged_ok = retry_while_staging_full(config, dir, board, control, || {
                write_file_atomic(&mut uring, dir, &name, &linked.bytes).map_err(|e| {
                    ShipperError::io(format!("staging {}", dir.join(&name).display()), e)
                })
            })?;
            if !staged_ok {
                break; // stopping: the segment stays in the ring for the next run
            }
            ring.release(next.ring_end);
            // For blkfilter's activity log: everything up to here is durable.
            ring.set_released_seq(linked.header.last_seq);
            cursor.advance(&linked.header, linked.digest);
            let saved = retry_while_staging_full(config, dir, board, control, || {
                chain_state::save(&mut uring, dir, &cursor)
            })?;
            if !saved {
                break; // the next run finds the segment staged and recovers the position
            }
            let len = linked.bytes.len() as u64;
            board.staged_bytes.fetch_add(len, Ordering::Relaxed);
            board.update(|s| {
                s.newest_staged_index = Some(linked.header.index);
                s.bytes_sealed += len;
                s.segments_pending_upload += 1;
            });
            log::debug!(
                "volume {}: staged {name}: seq {}..={}, {} -> {} bytes",
                config.volume,
                linked.header.first_seq,
                linked.header.last_seq,
                next.plain_len,
                len
            );
            if linked.header.flags & flags::CRASH_POINT != 0 && chain.owed.load(Ordering::Acquire) {
                // The reader flags a crash point after a drop only once the resync
                // asked for by the drop has ended: nothing is owed any more.
                crate::backlog::settle(&mut uring, dir)?;
                chain.owed.store(false, Ordering::Release);
                board.update(|s| s.backlog_resync = false);
                log::info!(
                    "volume {}: the resync after the dropped backlog has completed; recovery points resume at segment {name}",
                    config.volume
                );
            }
            // Hand the bytes over while the uploader keeps up; past that, it reads
            // them back from staging, so a store outage cannot fill memory.
            let bytes = if staged.len() < UPLOAD_QUEUE_IN_MEMORY {
                Some(linked.bytes)
            } else {
                let _ = spare_buffers.try_send(linked.bytes);
                None
            };
            let _ = staged.send(Staged {
                index: linked.header.index,
                generation: chain.generation.load(Ordering::Acquire),
                bytes,
            });
        }
    }
    Ok(chain.cursor.lock().expect("cursor lock").clone())
}

/// Runs `op` (a write into staging) until it succeeds. While staging's file system is
/// full (ENOSPC, EDQUOT) it waits, with a Warning in the status saying what to do,
/// until the uploader has freed some staged bytes or the retry schedule's next delay
/// has passed, and tries again; the ring keeps what is not staged (and overflows into
/// its dirty bitmap if this lasts), so nothing is lost. Any other error is returned.
/// False if the pipeline is stopping.
fn retry_while_staging_full(
    config: &ShipperConfig,
    dir: &Path,
    board: &Board,
    control: &Control,
    mut op: impl FnMut() -> Result<()>,
) -> Result<bool> {
    let schedule = RetrySchedule {
        unit: config.retry_unit,
    };
    let mut attempt = 0;
    loop {
        let err = match op() {
            Ok(()) => {
                if attempt > 0 {
                    log::info!("volume {}: staging has room again", config.volume);
                    board.update(|s| s.staging_full = None);
                }
                return Ok(true);
            }
            Err(e) if changelog::error::is_disk_full(&e) => e,
            Err(e) => return Err(e),
        };
        attempt += 1;
        let staged = board.staged_bytes.load(Ordering::Relaxed);
        let message = format!(
            "{err}; staging holds {} segment(s), {} MiB, not yet uploaded; free space on \
             the file system of {} or give staging a larger one",
            board.pending_since.lock().expect("pending lock").len(),
            staged >> 20,
            dir.display()
        );
        if attempt == 1 {
            log::warn!("volume {}: {message}", config.volume);
        }
        board.update(|s| s.staging_full = Some(message));
        let uploaded = || board.staged_bytes.load(Ordering::Relaxed) < staged;
        if !wait_unless_stopped(schedule.delay(attempt), control, uploaded) {
            return Ok(false);
        }
    }
}

/// The uploader: staged segments → store, in order, with retries.
#[allow(clippy::too_many_arguments)]
fn upload(
    config: &ShipperConfig,
    dir: &Path,
    store: &dyn TargetStore,
    backlog: Vec<u64>,
    staged: Receiver<Staged>,
    chain: &Chain,
    board: &Board,
    control: &Control,
    spare_buffers: &Sender<Vec<u8>>,
    priority: &Priority,
) -> Result<u64> {
    let mut thread_priority = ThreadPriority::new(priority);
    let schedule = RetrySchedule {
        unit: config.retry_unit,
    };
    let mut uring = Uring::new(2).map_err(|e| ShipperError::io("io_uring setup", e))?;
    let mut uploaded = 0u64;
    let backlog = backlog.into_iter().map(|index| Staged {
        index,
        generation: 0,
        bytes: None,
    });
    for Staged {
        index,
        generation,
        mut bytes,
    } in backlog.chain(staged)
    {
        thread_priority.follow();
        let path = dir.join(segment_file_name(index));
        // A dropped segment's file is gone: it is skipped below, whatever it weighs.
        let len = bytes.as_ref().map_or_else(
            || std::fs::metadata(&path).map_or(0, |m| m.len()),
            |b| b.len() as u64,
        );
        let dropped = || generation != chain.generation.load(Ordering::Acquire);
        let mut attempt = 0u32;
        loop {
            // Before the gate, so a backlog drop does not wait for the limit; and not
            // for a segment dropped already (its file may be gone: len 0).
            if !dropped() && len > 0 {
                let Some(slept) = config.throttle.admit(len, || control.stopping()) else {
                    return Ok(uploaded);
                };
                board
                    .throttled_us
                    .fetch_add(slept.as_micros() as u64, Ordering::Relaxed);
            }
            // Held for the attempt: a backlog drop waits for it, and after a drop the
            // segments staged before it are gone (skipped here).
            let gate = chain.upload.lock().expect("upload lock");
            if dropped() {
                log::debug!(
                    "volume {}: segment {index:016x} was dropped with the staged backlog",
                    config.volume
                );
                break;
            }
            let data = match bytes.take() {
                Some(data) => data,
                None => std::fs::read(&path).map_err(|e| {
                    ShipperError::io(format!("reading staged {}", path.display()), e)
                })?,
            };
            let info = changelog::read_info(&data, &path.display().to_string())?;
            board.update(|s| s.upload_started_unix_ms = Some(unix_ms_now()));
            let put = store.put_staged(&config.volume, index, &data, &path);
            board.update(|s| s.upload_started_unix_ms = None);
            match put {
                Ok(()) => {
                    std::fs::remove_file(&path).map_err(|e| {
                        ShipperError::io(format!("removing uploaded {}", path.display()), e)
                    })?;
                    sync_dir(&mut uring, dir)
                        .map_err(|e| ShipperError::io(format!("syncing {}", dir.display()), e))?;
                    uploaded += 1;
                    board
                        .pending_since
                        .lock()
                        .expect("pending lock")
                        .remove(&index);
                    let len = data.len() as u64;
                    let _ = board.staged_bytes.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |b| Some(b.saturating_sub(len)),
                    );
                    if info.header.flags & flags::CRASH_POINT != 0 {
                        // A recovery point after any dropped backlog is in the store.
                        board.lost_since_ms.store(0, Ordering::Relaxed);
                    }
                    board.update(|s| {
                        s.retry_attempt = 0;
                        s.newest_uploaded_index = Some(index);
                        s.newest_uploaded_seq_end = Some(info.header.end_seq());
                        s.segments_pending_upload = s.segments_pending_upload.saturating_sub(1);
                        s.bytes_uploaded += len;
                    });
                    let _ = spare_buffers.try_send(data);
                    break;
                }
                Err(e) if e.is_recoverable() => {
                    bytes = Some(data);
                    attempt += 1;
                    let delay = schedule.delay(attempt);
                    log::warn!("volume {}: upload of segment {index:016x} failed ({e}); retry {attempt} in {delay:?}", config.volume);
                    let message = e.to_string();
                    board.update(|s| {
                        s.retry_attempt = attempt;
                        s.last_error = Some(message);
                    });
                    drop(gate);
                    if !sleep_unless_stopped(delay, control) {
                        return Ok(uploaded);
                    }
                }
                Err(e) => {
                    let hint = if info.header.flags & flags::NEW_EPOCH != 0
                        && matches!(e, changelog::Error::Conflict { .. })
                    {
                        " (this segment continues the chain after a dropped staged backlog; \
                         the store holds another segment under its index, most likely a \
                         dropped one whose upload was reported as failed but landed: \
                         remove it from the store, restart, and let the resync run)"
                    } else {
                        ""
                    };
                    return Err(ShipperError::Critical {
                        volume: config.volume.to_string(),
                        what: format!(
                            "uploading segment {index:016x} to {}: {e}{hint}",
                            store.describe()
                        ),
                    });
                }
            }
        }
    }
    Ok(uploaded)
}

/// Sleeps `total` in short steps; false if the pipeline is stopping.
fn sleep_unless_stopped(total: Duration, control: &Control) -> bool {
    wait_unless_stopped(total, control, || false)
}

/// Sleeps `total` in short steps, or less once `done` holds; false if the pipeline is
/// stopping.
fn wait_unless_stopped(total: Duration, control: &Control, done: impl Fn() -> bool) -> bool {
    let until = Instant::now() + total;
    while Instant::now() < until && !done() {
        if control.stopping() {
            return false;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(20)));
    }
    !control.stopping()
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkfilter::ring::{Producer, RingGeometry};

    fn board() -> Board {
        Board {
            status: Mutex::new(Status::default()),
            pending_since: Mutex::new(BTreeMap::new()),
            open_since_ms: AtomicU64::new(0),
            staged_bytes: AtomicU64::new(0),
            lost_since_ms: AtomicU64::new(0),
            throttled_us: AtomicU64::new(0),
            rates: Mutex::new([
                RecentRate::from_zero(RATE_WINDOW, Instant::now()),
                RecentRate::from_zero(RATE_WINDOW, Instant::now()),
            ]),
        }
    }

    #[test]
    fn no_heartbeat_while_a_write_is_outside_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring");
        let producer = Producer::create(&path, &RingGeometry::new(1 << 20, 1 << 20)).unwrap();
        let ring = Consumer::open(&path).unwrap();
        let volume = VolumeId::new("vol0").unwrap();
        let chain = Chain {
            cursor: Mutex::new(ChainCursor::start(volume)),
            upload: Mutex::new(()),
            generation: AtomicU64::new(0),
            owed: AtomicBool::new(false),
        };
        let board = board();
        assert!(
            caught_up(&ring, &chain, &board, DEFAULT_HEARTBEAT).is_some(),
            "an empty ring"
        );
        let beat = |why: &str| {
            let beat = caught_up(&ring, &chain, &board, DEFAULT_HEARTBEAT);
            eprintln!("{why}: {beat:?}");
            beat.is_some()
        };
        // I7: writes in the dirty bitmap are in no segment: no heartbeat from the
        // overflow until the pass that re-records them has ended.
        producer.mark_dirty(0, 4096);
        assert!(!beat("overflowed"));
        assert_eq!(producer.begin_resync().len(), 1);
        assert!(!beat("resyncing"));
        assert!(producer.end_resync());
        assert!(beat("resynced"));
        board.lost_since_ms.store(1, Ordering::Relaxed);
        assert!(!beat("a dropped backlog not yet covered by a point"));
        board.lost_since_ms.store(0, Ordering::Relaxed);
        board.pending_since.lock().unwrap().insert(0, 1);
        assert!(
            caught_up(&ring, &chain, &board, DEFAULT_HEARTBEAT).is_none(),
            "a segment to upload"
        );
        // A drop holds the cursor while it empties the upload queue and owes a resync:
        // a heartbeat that started meanwhile sees the owed resync, not an empty queue.
        std::thread::scope(|scope| {
            let mut cursor = chain.cursor.lock().unwrap();
            let beat = scope.spawn(|| caught_up(&ring, &chain, &board, DEFAULT_HEARTBEAT));
            std::thread::sleep(Duration::from_millis(50));
            board.pending_since.lock().unwrap().clear();
            cursor.next_index = 1;
            chain.owed.store(true, Ordering::Release);
            drop(cursor);
            assert_eq!(beat.join().unwrap(), None);
        });
        chain.owed.store(false, Ordering::Release);
        assert_eq!(
            caught_up(&ring, &chain, &board, DEFAULT_HEARTBEAT).map(|b| b.next_index),
            Some(1)
        );
    }
}
