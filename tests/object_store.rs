//! The target store on object storage: Azure Blob through Microsoft's azurite emulator
//! and S3 through moto's server (real servers speaking the services' REST APIs; see
//! `support/emulator.rs`).
//!
//! * The store contract holds on both exactly as on a local directory.
//! * The shipper and ublk-target replicate through both from the command line.
//! * An outage (azurite killed while the shipper uploads, then started again over the
//!   same data) is a Warning that names the store, and nothing is lost.
//! * Bad store locations and missing credentials are clear errors.

use blkfilter::capture::Capture;
use blkfilter::ring::{Producer, RingGeometry};
use blkfilter::workload::Workload;
use changelog::{LocalDirStore, TargetStore, VolumeId};
use e2e::emulator::{Emulator, Service};
use e2e::{bin, sparse_file};
use objstore::StoreLocation;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;

/// A protected volume with `ops` random writes captured into its ring and a replica
/// that starts empty.
struct Volume {
    dir: tempfile::TempDir,
}

impl Volume {
    fn new(seed: u64, ops: usize) -> Volume {
        let volume = Volume {
            dir: tempfile::tempdir().unwrap(),
        };
        changelog::Key::generate_file(&volume.path("key")).unwrap();
        sparse_file(&volume.path("backing"), SIZE);
        sparse_file(&volume.path("replica"), SIZE);
        let ring =
            Producer::create(&volume.path("ring"), &RingGeometry::new(16 << 20, SIZE)).unwrap();
        let mut capture = Capture::open(&volume.path("backing"), ring, false).unwrap();
        for op in Workload::new(seed, SIZE).take(ops) {
            capture.handle(op.as_request()).unwrap();
        }
        volume
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    fn shipper(&self, store: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(bin("shipper"));
        command
            .args(["run", "--volume", "vol0", "--ring", &self.arg("ring")])
            .args(["--staging", &self.arg("staging"), "--store", store])
            .args(["--key", &self.arg("key"), "--status", &self.arg("status")])
            .args(["--max-segment-age-ms", "20", "--drain"])
            .args(extra);
        command
    }

    fn apply(&self, store: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(bin("ublk-target"));
        command
            .args(["apply", "--volume", "vol0", "--store", store])
            .args(["--replica", &self.arg("replica"), "--key", &self.arg("key")])
            .args(extra);
        command
    }

    fn replica_equals_source(&self) -> bool {
        std::fs::read(self.path("replica")).unwrap() == std::fs::read(self.path("backing")).unwrap()
    }
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is killed when the test ends, passed or failed.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same sequence of calls on a directory and on an object store gives the same
/// answers.
fn exercise_contract(store: &dyn TargetStore) -> Vec<String> {
    let mut seen = Vec::new();
    let vol = VolumeId::new("vol0").unwrap();
    let other = VolumeId::new("vol1").unwrap();
    let mut note = |what: &str, result: String| seen.push(format!("{what}: {result}"));
    note("empty list", format!("{:?}", store.list(&vol).unwrap()));
    note("absent get", format!("{:?}", store.get(&vol, 0).unwrap()));
    store.put(&vol, 1, b"one").unwrap();
    store.put(&vol, 0, b"zero").unwrap();
    store.put(&other, 5, b"five").unwrap();
    // A re-upload of the same bytes (after a crash, or a lost response) is fine.
    store.put(&vol, 1, b"one").unwrap();
    let conflict = store.put(&vol, 1, b"forged");
    note(
        "conflicting put",
        format!(
            "{}",
            matches!(conflict, Err(changelog::Error::Conflict { .. }))
        ),
    );
    note("get", format!("{:?}", store.get(&vol, 1).unwrap()));
    store.put_blob(&vol, "digests.req", b"req").unwrap();
    store.put_blob(&vol, "digests.req", b"req2").unwrap();
    store.put_blob(&vol, "digests.ans", b"ans").unwrap();
    note("list", format!("{:?}", store.list(&vol).unwrap()));
    note("other volume", format!("{:?}", store.list(&other).unwrap()));
    note("blobs", format!("{:?}", store.list_blobs(&vol).unwrap()));
    note(
        "blob",
        format!("{:?}", store.get_blob(&vol, "digests.req").unwrap()),
    );
    store.delete_blob(&vol, "digests.req").unwrap();
    store.delete_blob(&vol, "digests.req").unwrap();
    note(
        "after delete",
        format!("{:?}", store.list_blobs(&vol).unwrap()),
    );
    note(
        "bad blob name",
        format!("{}", store.put_blob(&vol, "../x", b"").is_err()),
    );
    seen
}

/// One test for both services: the stores are opened in this process, which has one
/// environment.
#[test]
fn the_store_contract_holds_on_object_storage_as_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let on_dir = exercise_contract(&LocalDirStore::new(dir.path()));
    for service in [Service::Azure, Service::S3] {
        let Some(emulator) = Emulator::start(service) else {
            continue;
        };
        emulator.export_env();
        emulator.create_bucket("contract");
        let location: StoreLocation = format!("{}://contract/site-a/dr", service.scheme())
            .parse()
            .unwrap();
        let on_service = exercise_contract(&*objstore::open(&location).unwrap());
        assert_eq!(on_service, on_dir, "{service:?}");
    }
    // Not vacuous: the answers are the expected ones.
    for expected in [
        "list: [0, 1]",
        "other volume: [5]",
        "conflicting put: true",
        "get: Some([111, 110, 101])",
        "blobs: [\"digests.ans\", \"digests.req\"]",
        "blob: Some([114, 101, 113, 50])",
        "after delete: [\"digests.ans\"]",
        "bad blob name: true",
    ] {
        assert!(
            on_dir.iter().any(|s| s == expected),
            "{expected}: {on_dir:?}"
        );
    }
}

/// The change log through object storage: the shipper with --drain, ublk-target apply --follow
/// polling the store beside it. (No initial sync: its resync pass needs a running
/// producer; the digest exchange's objects are in the contract test.)
fn replicate_through(service: Service) {
    let Some(emulator) = Emulator::start(service) else {
        return;
    };
    emulator.create_bucket("dr-store");
    let volume = Volume::new(7, 200);
    let store = &format!("{}://dr-store/site-a", service.scheme());
    let follower = Running(
        volume
            .apply(store, &["--follow", "--poll-ms", "50"])
            .envs(emulator.env())
            .spawn()
            .unwrap(),
    );
    let shipped = volume
        .shipper(store, &["--no-initial-sync"])
        .envs(emulator.env())
        .output()
        .unwrap();
    assert!(shipped.status.success(), "{}", text(&shipped));
    wait_until(
        "the replica equals the source",
        Duration::from_secs(60),
        || volume.replica_equals_source(),
    );
    drop(follower);
    // Nothing went to a local directory named after the URL.
    assert!(!Path::new("az:").exists() && !volume.path("az:").exists());
    let points = Command::new(bin("ublk-target"))
        .args(["points", "--replica", &volume.arg("replica"), "--json"])
        .output()
        .unwrap();
    assert!(
        points.status.success() && text(&points).contains("\"index\":"),
        "{}",
        text(&points)
    );
}

#[test]
fn shipper_and_apply_replicate_through_azurite() {
    replicate_through(Service::Azure);
}

#[test]
fn shipper_and_apply_replicate_through_s3() {
    replicate_through(Service::S3);
}

#[test]
fn an_outage_of_the_object_store_is_a_warning_and_loses_nothing() {
    let Some(mut emulator) = Emulator::start(Service::Azure) else {
        return;
    };
    emulator.create_bucket("dr-store");
    let volume = Volume::new(8, 300);
    emulator.stop();
    let store = "az://dr-store/site-b";
    let mut shipper = Running(
        volume
            .shipper(store, &["--no-initial-sync", "--retry-unit-ms", "50"])
            .envs(emulator.env())
            .spawn()
            .unwrap(),
    );
    let mut warned = None;
    wait_until(
        "status shows the failing upload",
        Duration::from_secs(60),
        || {
            warned = shipper::Status::read(&volume.path("status"))
                .ok()
                .filter(|s| s.retry_attempt > 0);
            warned.is_some()
        },
    );
    let warned = warned.unwrap();
    assert_eq!(warned.health(), shipper::Health::Warning);
    let error = warned.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("az://dr-store/site-b/vol0/") && warned.state().contains("retrying upload"),
        "{error} / {}",
        warned.state()
    );
    emulator.resume();
    // kill -9 can cost the emulator the container it had not saved yet (its metadata
    // is flushed every few seconds); a real service keeps it.
    emulator.create_bucket("dr-store");
    let mut exited = None;
    wait_until(
        "the shipper drains once the store is back",
        Duration::from_secs(60),
        || {
            exited = shipper.0.try_wait().unwrap();
            exited.is_some()
        },
    );
    assert!(exited.unwrap().success());
    let applied = volume
        .apply(store, &[])
        .envs(emulator.env())
        .output()
        .unwrap();
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(volume.replica_equals_source());
}

#[test]
fn bad_store_locations_and_missing_credentials_are_clear_errors() {
    let volume = Volume::new(9, 10);
    let unsupported = volume.shipper("ftp://host/dr", &[]).output().unwrap();
    assert!(
        !unsupported.status.success() && text(&unsupported).contains("unsupported store scheme"),
        "{}",
        text(&unsupported)
    );
    let no_account = volume
        .apply("az://dr", &[])
        .env_remove("AZURE_STORAGE_USE_EMULATOR")
        .env_remove("AZURE_STORAGE_ACCOUNT_NAME")
        .output()
        .unwrap();
    assert!(
        !no_account.status.success()
            && text(&no_account).contains("set AZURE_STORAGE_ACCOUNT_NAME"),
        "{}",
        text(&no_account)
    );
    // Nothing listens there: apply (without --follow) fails naming the store.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = volume
        .apply("az://dr/x", &[])
        .env("AZURE_STORAGE_USE_EMULATOR", "true")
        .env(
            "AZURITE_BLOB_STORAGE_URL",
            format!("http://127.0.0.1:{port}"),
        )
        .output()
        .unwrap();
    assert!(
        !unreachable.status.success() && text(&unreachable).contains("az://dr/x/vol0"),
        "{}",
        text(&unreachable)
    );
    // The failed runs left the replica as it was.
    let replica = std::fs::read(volume.path("replica")).unwrap();
    assert!(replica.iter().all(|&b| b == 0));
}
