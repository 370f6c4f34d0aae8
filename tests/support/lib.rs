//! Shared pieces of the end-to-end tests: a reference model of the source volume, a
//! protected-volume fixture on the host (backing file + ring + capture), and helpers to
//! run the shipper and the applier.

pub mod emulator;

use blkfilter::capture::{Capture, Captured};
use blkfilter::ring::{Producer, RingGeometry};
use blkfilter::workload::WorkOp;
use changelog::{Key, LocalDirStore, TargetStore, VolumeId};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The source volume as it should be: every captured op with its seq, replayable to
/// any seq. Independent of the code under test: plain memory writes.
pub struct Model {
    /// The source before the first op.
    initial: Vec<u8>,
    log: Vec<(u64, WorkOp)>,
}

impl Model {
    pub fn new(size: u64) -> Model {
        Model::with_image(vec![0; size as usize])
    }

    /// A source that already holds `initial` when capture starts.
    pub fn with_image(initial: Vec<u8>) -> Model {
        Model {
            initial,
            log: Vec::new(),
        }
    }

    pub fn record(&mut self, seq: u64, op: WorkOp) {
        assert!(
            self.log.last().is_none_or(|(s, _)| *s < seq),
            "seqs must increase"
        );
        self.log.push((seq, op));
    }

    pub fn seqs(&self) -> Vec<u64> {
        self.log.iter().map(|(s, _)| *s).collect()
    }

    pub fn replayer(&self) -> Replayer<'_> {
        Replayer {
            model: self,
            next: 0,
            image: self.initial.clone(),
        }
    }

    pub fn final_image(&self) -> Vec<u8> {
        let mut r = self.replayer();
        r.advance_to(u64::MAX);
        r.image
    }
}

/// Replays a [`Model`] forward.
pub struct Replayer<'a> {
    model: &'a Model,
    next: usize,
    pub image: Vec<u8>,
}

impl Replayer<'_> {
    /// Applies every op with seq below `seq_end`.
    pub fn advance_to(&mut self, seq_end: u64) {
        while let Some((seq, op)) = self.model.log.get(self.next) {
            if *seq >= seq_end {
                break;
            }
            match op {
                WorkOp::Write { offset, data } | WorkOp::Fua { offset, data } => self.image
                    [*offset as usize..*offset as usize + data.len()]
                    .copy_from_slice(data),
                WorkOp::Discard { offset, len } | WorkOp::WriteZeroes { offset, len } => {
                    self.image[*offset as usize..(*offset + *len) as usize].fill(0)
                }
                WorkOp::Flush | WorkOp::Mark { .. } => {}
            }
            self.next += 1;
        }
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn file_sha256(path: &Path) -> [u8; 32] {
    sha256(&std::fs::read(path).expect("read file"))
}

/// A protected volume on the host: backing file, ring, capture, key, directories.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub volume: VolumeId,
    pub size: u64,
    pub key: Key,
}

impl Fixture {
    pub fn new(size: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = Key::generate_file(&dir.path().join("key")).expect("keygen");
        sparse_file(&dir.path().join("backing"), size);
        Fixture {
            dir,
            volume: VolumeId::new("vol0").unwrap(),
            size,
            key,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn capture(&self, ring_bytes: u64) -> Capture {
        let producer = Producer::create(
            &self.path("ring"),
            &RingGeometry::new(ring_bytes, self.size),
        )
        .expect("ring");
        Capture::open(&self.path("backing"), producer, false).expect("capture")
    }

    pub fn store(&self) -> Arc<LocalDirStore> {
        Arc::new(LocalDirStore::new(self.path("store")))
    }

    /// A shipper config with test-sized segments and a millisecond retry unit.
    pub fn shipper_config(&self) -> shipper::ShipperConfig {
        let mut config = shipper::ShipperConfig::new(
            self.volume.clone(),
            self.path("ring"),
            self.path("staging"),
            self.key.clone(),
        );
        config.max_segment_age = Duration::from_millis(20);
        config.max_segment_bytes = 256 << 10;
        config.retry_unit = Duration::from_millis(2);
        // Source and replica both start as zeroes here; the resync tests turn it on.
        config.initial_sync = false;
        // The disks here are a few MiB: a burst staged faster than it is uploaded could
        // pass half of one and drop the backlog; tests/backlog.rs turns it on.
        config.backlog_resync_percent = 0;
        config
    }

    /// Starts the shipper on a thread with `config` (status written to `status.json`);
    /// stop it with the returned control and join the handle.
    pub fn spawn_shipper(
        &self,
        mut config: shipper::ShipperConfig,
    ) -> (
        Arc<shipper::Control>,
        std::thread::JoinHandle<shipper::Result<shipper::RunSummary>>,
    ) {
        config.status_path = Some(self.path("status.json"));
        let control = Arc::new(shipper::Control::default());
        let (store, c) = (self.store(), control.clone());
        (
            control,
            std::thread::spawn(move || shipper::run(&config, store, c)),
        )
    }

    /// Runs the shipper in this process until everything in the ring is in the store.
    pub fn ship_drained(&self) -> shipper::RunSummary {
        let control = Arc::new(shipper::Control::default());
        control.drain();
        shipper::run(&self.shipper_config(), self.store(), control).expect("shipper run")
    }

    /// A fixture of `size` bytes whose store holds the first `ops` requests of
    /// workload `seed`, with the model of the source.
    pub fn shipped(size: u64, seed: u64, ops: usize) -> (Fixture, Model) {
        let fixture = Fixture::new(size);
        let mut capture = fixture.capture((size * 8).max(16 << 20));
        let mut model = Model::new(size);
        drive(
            &mut capture,
            &mut model,
            blkfilter::workload::Workload::new(seed, size).take(ops),
        );
        fixture.ship_drained();
        (fixture, model)
    }

    /// An applier over a fresh (zeroed) replica named `name`, journal in `name.journal`.
    pub fn applier(&self, name: &str, key: &Key) -> ublk_target::Result<ublk_target::Applier> {
        self.applier_with(name, key, &ublk_target::ApplyOptions::default())
    }

    /// [`Fixture::applier`] with options (journal directory, retention).
    pub fn applier_with(
        &self,
        name: &str,
        key: &Key,
        options: &ublk_target::ApplyOptions,
    ) -> ublk_target::Result<ublk_target::Applier> {
        let replica = self.path(name);
        if !replica.exists() {
            std::fs::File::create(&replica)
                .unwrap()
                .set_len(self.size)
                .unwrap();
        }
        ublk_target::Applier::open(
            self.store(),
            self.volume.clone(),
            key.clone(),
            &replica,
            &self.path(&format!("{name}.state")),
            options,
        )
    }

    /// The paths of replica `name` with the default state and journal locations.
    pub fn replica_paths(&self, name: &str) -> ublk_target::ReplicaPaths {
        ublk_target::ReplicaPaths::new(self.path(name))
    }

    /// Paths of the volume's segments in the store, in index order.
    pub fn store_segments(&self) -> Vec<PathBuf> {
        let store = self.store();
        store
            .list(&self.volume)
            .unwrap()
            .into_iter()
            .map(|i| store.segment_path(&self.volume, i))
            .collect()
    }
}

/// The recovery side as `ublk-target apply --follow` runs it, on a thread: applies new
/// segments and answers digest-resync requests until [`Follower::finish`].
pub struct Follower {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<ublk_target::Applier>,
}

impl Fixture {
    pub fn follow(&self, replica: &str) -> Follower {
        self.follow_with(replica, ublk_target::digests::AnswerMode::Compare)
    }

    pub fn follow_with(&self, replica: &str, mode: ublk_target::digests::AnswerMode) -> Follower {
        let mut applier = self.applier(replica, &self.key).expect("applier");
        let (store, volume, key) = (self.store(), self.volume.clone(), self.key.clone());
        let replica = self.path(replica);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Acquire) {
                applier.apply_available().expect("apply");
                let (next_seq, last_key) = (applier.cursor().next_seq, applier.state().key_id);
                ublk_target::digests::answer_requests(
                    &*store, &volume, &key, last_key, &replica, next_seq, mode,
                )
                .expect("answer digest requests");
                std::thread::sleep(Duration::from_millis(5));
            }
            applier
        });
        Follower { stop, handle }
    }
}

impl Follower {
    /// Stops following, applies whatever the store holds by now, returns the applier.
    pub fn finish(self) -> ublk_target::Applier {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let mut applier = self.handle.join().expect("follower thread");
        applier.apply_available().expect("apply");
        applier
    }
}

/// Runs `ops` through `capture`, recording each in `model`. Panics on a full ring:
/// callers size the ring so that does not happen unless they test it.
pub fn drive(capture: &mut Capture, model: &mut Model, ops: impl IntoIterator<Item = WorkOp>) {
    for op in ops {
        match capture.handle(op.as_request()).expect("capture") {
            Captured::Recorded(seq) => model.record(seq, op),
            Captured::MarkedDirty(_) => panic!("ring overflowed in a test that sized it not to"),
        }
    }
}

/// What [`apply_and_check_crash_points`] saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied {
    /// Segments whose end is a crash point; each was compared with the model.
    pub crash_points: usize,
    /// Segments that claim no crash point (written while writes were missing).
    pub others: usize,
    /// Whether the last segment is a crash point.
    pub last_is_point: bool,
}

/// Applies segments one at a time; at every segment that claims a crash point, the
/// replica must equal the model of the source at that seq (I3, I7).
pub fn apply_and_check_crash_points(fixture: &Fixture, model: &Model, replica: &str) -> Applied {
    let mut applier = fixture.applier(replica, &fixture.key).expect("applier");
    let mut replay = model.replayer();
    let mut seen = Applied::default();
    while let Some(applied) = applier.apply_next().expect("apply") {
        seen.last_is_point = applied.header.flags & changelog::flags::CRASH_POINT != 0;
        if !seen.last_is_point {
            seen.others += 1;
            continue;
        }
        replay.advance_to(applied.header.end_seq());
        assert!(
            file_sha256(&fixture.path(replica)) == sha256(&replay.image),
            "segment {} claims a crash point but differs from the model at seq {}",
            applied.header.index,
            applied.header.end_seq()
        );
        seen.crash_points += 1;
    }
    seen
}

/// Applies segments one at a time and checks the replica against the model at every
/// segment end: all of them must be crash points. Returns the number applied.
pub fn apply_and_check_every_point(fixture: &Fixture, model: &Model, replica: &str) -> usize {
    let seen = apply_and_check_crash_points(fixture, model, replica);
    assert_eq!(
        seen.others, 0,
        "segments without a crash point where none was lost"
    );
    seen.crash_points
}

/// `shipper run` for the fixture's volume, ring, staging, store and key (logging warnings
/// only); callers add the rest.
pub fn shipper_command(fixture: &Fixture) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("shipper"));
    cmd.args(["run", "--volume", "vol0"])
        .arg("--ring")
        .arg(fixture.path("ring"))
        .arg("--staging")
        .arg(fixture.path("staging"))
        .arg("--store")
        .arg(fixture.path("store"))
        .arg("--key")
        .arg(fixture.path("key"))
        .env("RUST_LOG", "warn");
    cmd
}

/// `ublk-target apply` for the fixture's volume, store, replica `replica` and key.
pub fn apply_command(fixture: &Fixture, replica: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("ublk-target"));
    cmd.args(["apply", "--volume", "vol0"])
        .arg("--store")
        .arg(fixture.path("store"))
        .arg("--replica")
        .arg(fixture.path(replica))
        .arg("--key")
        .arg(fixture.path("key"));
    cmd
}

/// Every record seq in the store's segments, in chain order; checks that each segment
/// opens with the fixture's key.
pub fn store_seqs(fixture: &Fixture) -> Vec<u64> {
    let mut seqs = Vec::new();
    for path in fixture.store_segments() {
        let segment = changelog::open(std::fs::read(&path).unwrap(), "t", &fixture.key)
            .expect("segment opens");
        seqs.extend(segment.records().map(|r| r.seq));
    }
    seqs
}

/// A child process that is killed and reaped when dropped, so a failing test leaves
/// no daemon (`apply --follow`, a receiver) running behind it.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A store that is down, and back: its volume directory `volume_dir` swapped with a
/// file in one step (`renameat2` with `RENAME_EXCHANGE`), so a put running meanwhile
/// cannot recreate the directory between a rename and a write. Call it again to
/// bring the store back; `aside` holds whichever is not in use.
pub fn swap_store_volume(volume_dir: &Path, aside: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if !aside.exists() {
        std::fs::write(aside, b"not a directory: the store is down").unwrap();
    }
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let (a, b) = (c(volume_dir), c(aside));
    // SAFETY: both are valid NUL-terminated paths, relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(
        rc,
        0,
        "swapping {volume_dir:?} and {aside:?}: {}",
        std::io::Error::last_os_error()
    );
}

/// Creates (or truncates) `path` as a sparse file of `size` bytes: a source backing or
/// a replica of a `size`-byte volume.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Path of a workspace binary built next to the test executable
/// (`cargo test --workspace` builds them; so does `cargo build --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    path
}

/// One upload a [`RecordingStore`] saw.
#[derive(Clone, Copy, Debug)]
pub struct UploadAttempt {
    /// When the store was asked (before the put).
    pub at: std::time::Instant,
    pub bytes: usize,
    pub ok: bool,
}

/// A real store that notes every segment upload: when it was asked, its size, whether
/// it succeeded.
pub struct RecordingStore<S> {
    inner: S,
    attempts: std::sync::Mutex<Vec<UploadAttempt>>,
}

impl<S: TargetStore> RecordingStore<S> {
    pub fn new(inner: S) -> RecordingStore<S> {
        RecordingStore {
            inner,
            attempts: Default::default(),
        }
    }

    /// The uploads so far, in the order they were asked.
    pub fn attempts(&self) -> Vec<UploadAttempt> {
        self.attempts.lock().unwrap().clone()
    }
}

impl<S: TargetStore> TargetStore for RecordingStore<S> {
    fn put(&self, volume: &VolumeId, index: u64, bytes: &[u8]) -> changelog::Result<()> {
        let at = std::time::Instant::now();
        let result = self.inner.put(volume, index, bytes);
        self.attempts.lock().unwrap().push(UploadAttempt {
            at,
            bytes: bytes.len(),
            ok: result.is_ok(),
        });
        result
    }
    fn delete(&self, volume: &VolumeId, index: u64) -> changelog::Result<()> {
        self.inner.delete(volume, index)
    }
    fn get(&self, volume: &VolumeId, index: u64) -> changelog::Result<Option<Vec<u8>>> {
        self.inner.get(volume, index)
    }
    fn get_head(
        &self,
        volume: &VolumeId,
        index: u64,
        len: usize,
    ) -> changelog::Result<Option<Vec<u8>>> {
        self.inner.get_head(volume, index, len)
    }
    fn list(&self, volume: &VolumeId) -> changelog::Result<Vec<u64>> {
        self.inner.list(volume)
    }
    fn put_blob(&self, volume: &VolumeId, name: &str, bytes: &[u8]) -> changelog::Result<()> {
        self.inner.put_blob(volume, name, bytes)
    }
    fn get_blob(&self, volume: &VolumeId, name: &str) -> changelog::Result<Option<Vec<u8>>> {
        self.inner.get_blob(volume, name)
    }
    fn delete_blob(&self, volume: &VolumeId, name: &str) -> changelog::Result<()> {
        self.inner.delete_blob(volume, name)
    }
    fn list_blobs(&self, volume: &VolumeId) -> changelog::Result<Vec<String>> {
        self.inner.list_blobs(volume)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A call a [`HookedStore`] is about to pass on.
#[derive(Clone, Copy, Debug)]
pub enum StoreCall {
    /// Putting segment `index` (the shipper's uploads).
    Put(u64),
    /// Deleting segment `index` (the recovery side's pruning).
    Delete(u64),
    /// Any call on small objects (the digest exchange).
    Blob,
}

/// A real store that asks `before` first on segment puts and deletes and small-object
/// calls;
/// an error from it answers the call instead (a store that fails, or a test that
/// notes what it saw then).
pub struct HookedStore<S> {
    inner: S,
    before: Box<dyn Fn(StoreCall) -> changelog::Result<()> + Send + Sync>,
}

impl<S: TargetStore> HookedStore<S> {
    pub fn new(
        inner: S,
        before: impl Fn(StoreCall) -> changelog::Result<()> + Send + Sync + 'static,
    ) -> HookedStore<S> {
        HookedStore {
            inner,
            before: Box::new(before),
        }
    }
}

impl<S: TargetStore> TargetStore for HookedStore<S> {
    fn put(&self, volume: &VolumeId, index: u64, bytes: &[u8]) -> changelog::Result<()> {
        (self.before)(StoreCall::Put(index))?;
        self.inner.put(volume, index, bytes)
    }
    fn delete(&self, volume: &VolumeId, index: u64) -> changelog::Result<()> {
        (self.before)(StoreCall::Delete(index))?;
        self.inner.delete(volume, index)
    }
    fn get(&self, volume: &VolumeId, index: u64) -> changelog::Result<Option<Vec<u8>>> {
        self.inner.get(volume, index)
    }
    fn get_head(
        &self,
        volume: &VolumeId,
        index: u64,
        len: usize,
    ) -> changelog::Result<Option<Vec<u8>>> {
        self.inner.get_head(volume, index, len)
    }
    fn list(&self, volume: &VolumeId) -> changelog::Result<Vec<u64>> {
        self.inner.list(volume)
    }
    fn put_blob(&self, volume: &VolumeId, name: &str, bytes: &[u8]) -> changelog::Result<()> {
        (self.before)(StoreCall::Blob)?;
        self.inner.put_blob(volume, name, bytes)
    }
    fn get_blob(&self, volume: &VolumeId, name: &str) -> changelog::Result<Option<Vec<u8>>> {
        (self.before)(StoreCall::Blob)?;
        self.inner.get_blob(volume, name)
    }
    fn delete_blob(&self, volume: &VolumeId, name: &str) -> changelog::Result<()> {
        (self.before)(StoreCall::Blob)?;
        self.inner.delete_blob(volume, name)
    }
    fn list_blobs(&self, volume: &VolumeId) -> changelog::Result<Vec<String>> {
        (self.before)(StoreCall::Blob)?;
        self.inner.list_blobs(volume)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Retention that only thins: every point is past the horizon at once, intervals of
/// `every_ms`.
pub fn thinning_every(every_ms: u64) -> ublk_target::Retention {
    ublk_target::Retention {
        thin: Some(ublk_target::points::Thinning {
            after: std::time::Duration::ZERO,
            every: std::time::Duration::from_millis(every_ms),
        }),
        ..Default::default()
    }
}
