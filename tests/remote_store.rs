//! Target stores reached over the network: Azure Blob through Microsoft's azurite
//! emulator and S3 through moto's server (real servers speaking the services' REST APIs;
//! see `support/emulator.rs`), and the project's own receiver (`ublk-target receive`).
//!
//! * The store contract holds on each exactly as on a local directory.
//! * The shipper and ublk-target replicate through each from the command line.
//! * An outage (the service killed while the shipper uploads, then started again over
//!   the same data) is a Warning that names the store, and nothing is lost.
//! * Bad store locations, missing credentials, a wrong token, a peer that is not a
//!   receiver and a client that sends garbage are clear errors that change nothing.

use blkfilter::capture::Capture;
use blkfilter::ring::{Producer, RingGeometry};
use blkfilter::workload::Workload;
use changelog::{LocalDirStore, TargetStore, VolumeId};
use e2e::emulator::{Emulator, Service};
use e2e::{bin, sparse_file};
use objstore::StoreLocation;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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
            // A 4 MiB disk: the backlog staged during an outage here could pass half of
            // it and be dropped for a resync, which no producer would serve (seen:
            // the drain then failed); tests/backlog.rs covers drops.
            .args(["--backlog-resync-percent", "0"])
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

    /// Waits until the shipper's status shows an upload being retried; checks it is a
    /// Warning.
    fn failing_upload_status(&self) -> shipper::Status {
        let mut warned = None;
        wait_until(
            "status shows the failing upload",
            Duration::from_secs(60),
            || {
                warned = shipper::Status::read(&self.path("status"))
                    .ok()
                    .filter(|s| s.retry_attempt > 0);
                warned.is_some()
            },
        );
        let warned = warned.unwrap();
        assert_eq!(warned.health(), shipper::Health::Warning);
        warned
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

impl Running {
    /// Waits for a `--drain` run to finish once the store is back, and checks it
    /// succeeded.
    fn exits_successfully(&mut self) {
        let mut exited = None;
        wait_until("the shipper drains", Duration::from_secs(60), || {
            exited = self.0.try_wait().unwrap();
            exited.is_some()
        });
        assert!(exited.unwrap().success());
    }
}

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
    // A head: the first bytes only, all of a shorter object, nothing of an absent one.
    note(
        "head",
        format!(
            "{:?} {:?} {:?}",
            store.get_head(&vol, 0, 2).unwrap(),
            store.get_head(&vol, 1, 100).unwrap(),
            store.get_head(&vol, 9, 2).unwrap()
        ),
    );
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
    // Applied segments are deleted by the recovery side; twice is fine.
    store.delete(&vol, 0).unwrap();
    store.delete(&vol, 0).unwrap();
    note(
        "after segment delete",
        format!(
            "{:?} {:?}",
            store.list(&vol).unwrap(),
            store.get(&vol, 0).unwrap()
        ),
    );
    seen
}

/// A free port on the loopback interface (free when this returns; the receiver
/// binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ublk-target receive` on a loopback port, storing into `store`; killed on drop.
struct ReceiverProcess {
    port: u16,
    store: PathBuf,
    token: Option<PathBuf>,
    /// TLS certificate and key files, and the CA of the clients' certificates.
    tls: Option<(PathBuf, PathBuf)>,
    client_ca: Option<PathBuf>,
    client_crl: Option<PathBuf>,
    client_volumes: Option<PathBuf>,
    child: Option<Running>,
}

impl ReceiverProcess {
    fn start(store: &Path, token: Option<&Path>) -> ReceiverProcess {
        Self::start_with(store, token, None)
    }

    fn start_with(
        store: &Path,
        token: Option<&Path>,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> ReceiverProcess {
        std::fs::create_dir_all(store).unwrap();
        let mut receiver = ReceiverProcess {
            port: free_port(),
            store: store.to_path_buf(),
            token: token.map(Path::to_path_buf),
            tls,
            client_ca: None,
            client_crl: None,
            client_volumes: None,
            child: None,
        };
        receiver.resume();
        receiver
    }

    fn location(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and store, and waits until it accepts.
    fn resume(&mut self) {
        let mut command = Command::new(bin("ublk-target"));
        command
            .args(["receive", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--store")
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(token) = &self.token {
            command.arg("--token-file").arg(token);
        }
        if let Some((cert, key)) = &self.tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        if let Some(ca) = &self.client_ca {
            command.arg("--tls-client-ca").arg(ca);
        }
        if let Some(crl) = &self.client_crl {
            command.arg("--tls-client-crl").arg(crl);
        }
        if let Some(file) = &self.client_volumes {
            command.arg("--client-volumes").arg(file);
        }
        let child = Running(command.spawn().unwrap());
        self.child = Some(child);
        wait_until("the receiver accepts", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// kill -9.
    fn stop(&mut self) {
        self.child = None;
    }
}

/// One test for every remote store: object stores are opened in this process, which
/// has one environment.
#[test]
fn the_store_contract_holds_on_every_remote_store_as_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let on_dir = exercise_contract(&LocalDirStore::new(dir.path().join("local")));
    let receiver = ReceiverProcess::start(&dir.path().join("received"), None);
    let location: StoreLocation = receiver.location().parse().unwrap();
    let on_receiver = exercise_contract(&*objstore::open(&location).unwrap());
    assert_eq!(on_receiver, on_dir, "receiver");
    // What the receiver stored is a directory store that apply can read directly.
    let received = LocalDirStore::new(dir.path().join("received"));
    assert_eq!(
        received.get(&VolumeId::new("vol0").unwrap(), 1).unwrap(),
        Some(b"one".to_vec())
    );
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
        "head: Some([122, 101]) Some([111, 110, 101]) None",
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

/// The deployment the receiver is for: the shipper uploads over TCP, the recovery side
/// applies from the receiver's directory. The receiver is down when the shipper starts
/// (a Warning naming it), comes up, is killed with -9 once segments have arrived (the
/// shipper may or may not be done by then) and comes back; the replica equals the
/// source.
#[test]
fn shipper_replicates_through_a_receiver_that_comes_and_goes() {
    let volume = Volume::new(10, 300);
    std::fs::write(volume.path("token"), "s3cret-token\n").unwrap();
    let received = volume.path("received");
    let mut receiver = ReceiverProcess::start(&received, Some(&volume.path("token")));
    receiver.stop();
    let store = &receiver.location();
    let mut shipper = Running(
        volume
            .shipper(store, &["--no-initial-sync", "--retry-unit-ms", "50"])
            .env(objstore::TOKEN_ENV, "s3cret-token")
            .spawn()
            .unwrap(),
    );
    let warned = volume.failing_upload_status();
    let error = warned.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!("receiver {store}")) && error.contains("refused"),
        "{error}"
    );
    receiver.resume();
    let vol0 = VolumeId::new("vol0").unwrap();
    let arrived = || LocalDirStore::new(&received).list(&vol0).unwrap().len();
    wait_until("segments arrive", Duration::from_secs(60), || arrived() > 0);
    receiver.stop();
    receiver.resume();
    shipper.exits_successfully();
    assert!(arrived() > 1, "the workload spans several segments");
    let applied = volume
        .apply(received.to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(volume.replica_equals_source());
}

/// A client keeps its connection; when the receiver restarts, the next call renews it
/// without an error (every call is safe to repeat), and while it is down calls fail
/// naming it.
#[test]
fn a_kept_connection_to_a_restarted_receiver_is_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = ReceiverProcess::start(dir.path(), None);
    let store = objstore::open(&receiver.location().parse().unwrap()).unwrap();
    let vol0 = VolumeId::new("vol0").unwrap();
    store.put(&vol0, 0, b"zero").unwrap();
    receiver.stop();
    receiver.resume();
    store.put(&vol0, 1, b"one").unwrap();
    store.put(&vol0, 1, b"one").unwrap();
    assert_eq!(store.list(&vol0).unwrap(), vec![0, 1]);
    receiver.stop();
    let err = store.list(&vol0).unwrap_err().to_string();
    assert!(err.contains(&receiver.location()), "{err}");
}

/// A wrong token, a peer that is not a receiver, a receiver without its directory or
/// on a taken port: clear errors, and the replica is untouched.
#[test]
fn receiver_refusals_are_clear_errors() {
    let volume = Volume::new(11, 10);
    std::fs::write(volume.path("token"), "right").unwrap();
    let receiver = ReceiverProcess::start(&volume.path("received"), Some(&volume.path("token")));
    let fails_saying = |command: &mut Command, says: &str| {
        let out = command.output().unwrap();
        assert!(
            !out.status.success() && text(&out).contains(says),
            "expected a failure saying {says:?}: {}",
            text(&out)
        );
    };
    fails_saying(
        volume
            .apply(&receiver.location(), &[])
            .env(objstore::TOKEN_ENV, "wrong"),
        "wrong or missing token",
    );
    fails_saying(
        volume
            .apply(&receiver.location(), &[])
            .env_remove(objstore::TOKEN_ENV),
        "wrong or missing token",
    );
    // An HTTP server where a receiver should be.
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = http.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in http.incoming() {
            let mut stream = stream.unwrap();
            let _ = stream.read(&mut [0u8; 512]);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    fails_saying(
        &mut volume.apply(&format!("tcp://127.0.0.1:{http_port}"), &[]),
        "not a ublk-dr receiver",
    );
    fails_saying(
        &mut volume.apply("tcp://127.0.0.1", &[]),
        "with a port number",
    );
    fails_saying(
        Command::new(bin("ublk-target")).args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &volume.arg("no-such-dir"),
        ]),
        "does not exist",
    );
    fails_saying(
        Command::new(bin("ublk-target")).args([
            "receive",
            "--listen",
            &format!("127.0.0.1:{}", receiver.port),
            "--store",
            &volume.arg("received"),
        ]),
        "Address already in use",
    );
    let replica = std::fs::read(volume.path("replica")).unwrap();
    assert!(replica.iter().all(|&b| b == 0));
}

/// Clients that send garbage, lie about lengths or hang up in the middle of a segment
/// lose their connection and store nothing; the receiver goes on serving others.
#[test]
fn a_misbehaving_client_costs_the_receiver_nothing() {
    use objstore::wire::{self, Hello, Request};
    let dir = tempfile::tempdir().unwrap();
    let receiver = ReceiverProcess::start(&dir.path().join("received"), None);
    let connect = || TcpStream::connect(("127.0.0.1", receiver.port)).unwrap();
    let greeted = || {
        let mut stream = connect();
        let hello = Hello {
            magic: wire::MAGIC,
            version: wire::VERSION,
            token: String::new(),
        };
        wire::write_frame(&mut stream, &hello, &[]).unwrap();
        let welcome: Option<(wire::Welcome, Vec<u8>)> = wire::read_frame(&mut stream).unwrap();
        assert!(matches!(welcome, Some((wire::Welcome::Accepted, _))));
        stream
    };
    // Garbage instead of a hello; lengths over the limits after one.
    connect().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    greeted().write_all(&[0xff; 64]).unwrap();
    // Half a segment, then the connection drops.
    let mut stream = greeted();
    let request = Request::Put {
        volume: "vol0".into(),
        index: 0,
    };
    let mut frame = Vec::new();
    wire::write_frame(&mut frame, &request, &[7u8; 1 << 20]).unwrap();
    stream.write_all(&frame[..frame.len() / 2]).unwrap();
    drop(stream);
    // A newer protocol version is refused with a reason.
    let mut stream = connect();
    let hello = Hello {
        magic: wire::MAGIC,
        version: wire::VERSION + 1,
        token: String::new(),
    };
    wire::write_frame(&mut stream, &hello, &[]).unwrap();
    let refused: Option<(wire::Welcome, Vec<u8>)> = wire::read_frame(&mut stream).unwrap();
    assert!(
        matches!(&refused, Some((wire::Welcome::Refused { reason }, _)) if reason.contains("same ublk-dr version")),
        "{refused:?}"
    );
    // Still serving, and nothing of the half segment was stored.
    let store = objstore::open(&receiver.location().parse().unwrap()).unwrap();
    let vol0 = VolumeId::new("vol0").unwrap();
    assert_eq!(store.list(&vol0).unwrap(), Vec::<u64>::new());
    store.put(&vol0, 0, b"whole").unwrap();
    assert_eq!(store.get(&vol0, 0).unwrap(), Some(b"whole".to_vec()));
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
    let warned = volume.failing_upload_status();
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
    shipper.exits_successfully();
    let applied = volume
        .apply(store, &[])
        .envs(emulator.env())
        .output()
        .unwrap();
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(volume.replica_equals_source(), "{}", text(&applied));
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
    let port = free_port();
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

/// `openssl` in `dir`: a CA (`NAME-ca.pem`) and a server certificate it signed
/// (`NAME.pem`, key `NAME.key`) for the names in `san` ("DNS:localhost,IP:127.0.0.1").
fn certificates(dir: &Path, name: &str, san: &str) -> (PathBuf, PathBuf, PathBuf) {
    let path = |suffix: &str| dir.join(format!("{name}{suffix}"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/test.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let (ca, ca_key) = (format!("{name}-ca.pem"), format!("{name}-ca.key"));
    let (cert, key, csr) = (
        format!("{name}.pem"),
        format!("{name}.key"),
        format!("{name}.csr"),
    );
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                &ca_key,
                "-out",
                &ca,
                "-days",
                "2",
                "-subj",
                "/CN=ublk-dr test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &["-keyout", &key, "-out", &csr, "-subj", "/CN=receiver"],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    (path("-ca.pem"), path(".pem"), path(".key"))
}

/// `openssl` in `dir`: a client certificate `NAME.pem` (key `NAME.key`) for the name
/// `NAME.dr.example` (subjectAltName) signed by the CA `CA-ca.pem` that [`certificates`]
/// made.
fn client_certificate(dir: &Path, name: &str, ca: &str) -> (PathBuf, PathBuf) {
    client_certificate_for(dir, name, ca, &format!("DNS:{name}.dr.example"))
}

/// [`client_certificate`] with the subjectAltName `san`.
fn client_certificate_for(dir: &Path, name: &str, ca: &str, san: &str) -> (PathBuf, PathBuf) {
    let (key, csr, cert) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!("extendedKeyUsage=clientAuth\nsubjectAltName={san}\n"),
    )
    .unwrap();
    let (ca_cert, ca_key) = (format!("{ca}-ca.pem"), format!("{ca}-ca.key"));
    let subject = format!("/CN={name}");
    for args in [
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ]
        .into_iter()
        .chain(["-keyout", &key, "-out", &csr, "-subj", &subject])
        .collect::<Vec<&str>>(),
        vec![
            "x509",
            "-req",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-CAcreateserial",
        ]
        .into_iter()
        .chain([
            "-in", &csr, "-out", &cert, "-CA", &ca_cert, "-CAkey", &ca_key,
        ])
        .collect(),
    ] {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    }
    (dir.join(cert), dir.join(key))
}

/// `openssl ca` in `dir` as the CA `hosts-ca.pem` ([`certificates`] named "hosts"):
/// revokes the certificates in the files `revoke` and writes the revocation list
/// `hosts.crl` of every certificate revoked so far (none: an empty list).
fn hosts_crl(dir: &Path, revoke: &[&str]) -> PathBuf {
    if !dir.join("ca.cnf").exists() {
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("crlnumber"), "01\n").unwrap();
        std::fs::write(
            dir.join("ca.cnf"),
            "[ca]\ndefault_ca = hosts\n[hosts]\ndatabase = index.txt\ncrlnumber = crlnumber\n\
             default_md = sha256\ndefault_crl_days = 2\n",
        )
        .unwrap();
    }
    let ca_args = [
        "-config",
        "ca.cnf",
        "-keyfile",
        "hosts-ca.key",
        "-cert",
        "hosts-ca.pem",
    ];
    let revocations = revoke.iter().map(|cert| vec!["ca", "-revoke", cert]);
    let crl = ["ca", "-gencrl", "-out", "hosts.crl"].to_vec();
    for args in revocations.chain([crl]) {
        let out = Command::new("openssl")
            .args(&args)
            .args(ca_args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    }
    dir.join("hosts.crl")
}

/// With --tls-client-ca the receiver serves only clients presenting a certificate its
/// CA signed, and the token still applies: a protected host with both ships and
/// applies through it; one without a certificate, with another CA's or with a wrong
/// token is refused, saying which, and stores nothing.
#[test]
fn a_receiver_with_a_client_ca_serves_only_clients_it_signed() {
    let volume = Volume::new(13, 50);
    let dir = volume.dir.path();
    let (ca, cert, key) = certificates(dir, "receiver", "DNS:localhost");
    let (hosts_ca, _, _) = certificates(dir, "hosts", "DNS:unused");
    let host = client_certificate(dir, "host1", "hosts");
    let rogue = client_certificate(dir, "rogue", "receiver");
    let received = volume.path("received");
    std::fs::create_dir_all(&received).unwrap();
    std::fs::write(volume.path("token"), "mtls-token").unwrap();
    let mut receiver = ReceiverProcess {
        port: free_port(),
        store: received.clone(),
        token: Some(volume.path("token")),
        tls: Some((cert.clone(), key.clone())),
        client_ca: Some(hosts_ca.clone()),
        client_crl: None,
        client_volumes: None,
        child: None,
    };
    receiver.resume();
    let addr = format!("localhost:{}", receiver.port);
    let vol0 = VolumeId::new("vol0").unwrap();
    // Refused: no certificate, another CA's, and the right one with a wrong token
    // (the token still applies); none of them stores anything.
    let client = |identity: Option<&(PathBuf, PathBuf)>| {
        let identity = identity.map(|(c, k)| (c.as_path(), k.as_path()));
        let config = objstore::tls::client_config(&ca, identity).unwrap();
        objstore::ReceiverStore::new(&addr, Some(config))
    };
    for (identity, says) in [
        (None, "the receiver wants a client certificate"),
        (Some(&rogue), "does not accept this client's certificate"),
        (Some(&host), "wrong or missing token"),
    ] {
        let err = client(identity)
            .put(&vol0, 0, b"segment")
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{identity:?}: {err}");
    }
    assert!(LocalDirStore::new(&received)
        .list(&vol0)
        .unwrap()
        .is_empty());
    // A host with its certificate in the environment ships, and apply reads back.
    let with_identity = |command: &mut Command| {
        let mut command = std::mem::replace(command, Command::new("false"));
        command
            .env(objstore::TOKEN_ENV, "mtls-token")
            .env(objstore::tls::CA_ENV, &ca)
            .env(objstore::tls::CLIENT_CERT_ENV, &host.0)
            .env(objstore::tls::CLIENT_KEY_ENV, &host.1);
        command
    };
    let store = format!("tls://{addr}");
    let shipped = with_identity(&mut volume.shipper(&store, &["--no-initial-sync"]))
        .output()
        .unwrap();
    assert!(shipped.status.success(), "{}", text(&shipped));
    let applied = with_identity(&mut volume.apply(&store, &[]))
        .output()
        .unwrap();
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(volume.replica_equals_source());
    // Half an identity in the environment is named.
    let out = with_identity(&mut volume.apply(&store, &[]))
        .env_remove(objstore::tls::CLIENT_KEY_ENV)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out).contains("set both"),
        "{}",
        text(&out)
    );

    // Revoking one host: a receiver with the client CA's revocation list refuses it
    // and still serves the others.
    let revoked = client_certificate(dir, "host2", "hosts");
    let crl = hosts_crl(dir, &["host2.pem"]);
    let mut guarded = ReceiverProcess {
        port: free_port(),
        store: volume.path("guarded"),
        token: None,
        tls: Some((cert, key)),
        client_ca: Some(hosts_ca),
        client_crl: Some(crl),
        client_volumes: None,
        child: None,
    };
    std::fs::create_dir_all(&guarded.store).unwrap();
    guarded.resume();
    let guarded_client = |identity: &(PathBuf, PathBuf)| {
        let config = objstore::tls::client_config(&ca, Some((&identity.0, &identity.1))).unwrap();
        objstore::ReceiverStore::new(&format!("localhost:{}", guarded.port), Some(config))
    };
    let err = guarded_client(&revoked)
        .list(&vol0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("was revoked"), "{err}");
    assert_eq!(
        guarded_client(&host).list(&vol0).unwrap(),
        Vec::<u64>::new()
    );
}

/// With --client-volumes each protected host reaches only the volumes listed for the
/// name on its certificate: host1 ships and applies vol0; host2, signed by the same CA,
/// can neither write, read, list nor delete anything of vol0 (told why) while its own
/// vol1 goes on; an admin entry ("*") reaches both; a certificate named nowhere in the
/// file is refused, and so is a wildcard one that would match every host's name; and a
/// broken file stops the receiver from starting, saying what is wrong.
#[test]
fn a_receiver_gives_each_client_certificate_only_its_own_volumes() {
    let volume = Volume::new(14, 50);
    let dir = volume.dir.path();
    let (ca, cert, key) = certificates(dir, "receiver", "DNS:localhost");
    let (hosts_ca, _, _) = certificates(dir, "hosts", "DNS:unused");
    let host1 = client_certificate(dir, "host1", "hosts");
    let host2 = client_certificate(dir, "host2", "hosts");
    let stranger = client_certificate(dir, "host3", "hosts");
    let wildcard = client_certificate_for(dir, "wild", "hosts", "DNS:*.dr.example");
    let admin = client_certificate(dir, "admin", "hosts");
    let clients = volume.path("clients.toml");
    std::fs::write(
        &clients,
        "[clients]\n\"host1.dr.example\" = [\"vol0\"]\n\"host2.dr.example\" = [\"vol1\"]\n\
         \"admin.dr.example\" = [\"*\"]\n",
    )
    .unwrap();
    let received = volume.path("received");
    std::fs::create_dir_all(&received).unwrap();
    let mut receiver = ReceiverProcess {
        port: free_port(),
        store: received.clone(),
        token: None,
        tls: Some((cert.clone(), key.clone())),
        client_ca: Some(hosts_ca.clone()),
        client_crl: None,
        client_volumes: Some(clients.clone()),
        child: None,
    };
    receiver.resume();
    let addr = format!("localhost:{}", receiver.port);
    let store = format!("tls://{addr}");
    let as_host1 = |mut command: Command| {
        command
            .env(objstore::tls::CA_ENV, &ca)
            .env(objstore::tls::CLIENT_CERT_ENV, &host1.0)
            .env(objstore::tls::CLIENT_KEY_ENV, &host1.1);
        command
    };
    let shipped = as_host1(volume.shipper(&store, &["--no-initial-sync"]))
        .output()
        .unwrap();
    assert!(shipped.status.success(), "{}", text(&shipped));
    let vol0 = VolumeId::new("vol0").unwrap();
    let vol1 = VolumeId::new("vol1").unwrap();
    let on_disk = LocalDirStore::new(&received);
    assert!(!on_disk.list(&vol0).unwrap().is_empty());
    let applied = as_host1(volume.apply(&store, &[])).output().unwrap();
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(volume.replica_equals_source());
    // Applying pruned the store through the receiver: host1 may delete its own.
    assert_eq!(on_disk.list(&vol0).unwrap(), Vec::<u64>::new());

    let client = |identity: &(PathBuf, PathBuf)| {
        let config = objstore::tls::client_config(&ca, Some((&identity.0, &identity.1))).unwrap();
        objstore::ReceiverStore::new(&addr, Some(config))
    };
    client(&host1).put(&vol0, 1000, b"host1's segment").unwrap();
    let blobs = on_disk.list_blobs(&vol0).unwrap();
    let host2_store = client(&host2);
    let refusals = [
        host2_store.put(&vol0, 1001, b"forged").err(),
        host2_store.get(&vol0, 1000).err(),
        host2_store.delete(&vol0, 1000).err(),
        host2_store.list(&vol0).err(),
        host2_store.delete_blob(&vol0, "anything").err(),
        host2_store.put_blob(&vol0, "anything", b"x").err(),
    ];
    for (call, e) in refusals.into_iter().enumerate() {
        let e = e
            .unwrap_or_else(|| panic!("call {call}: host2 reached vol0"))
            .to_string();
        assert!(
            e.contains("client host2.dr.example may not reach volume vol0")
                && e.contains("gives it: vol1"),
            "{e}"
        );
    }
    // Its own volume goes on; vol0 is as host1 left it.
    host2_store.put(&vol1, 0, b"host2's segment").unwrap();
    assert_eq!(host2_store.list(&vol1).unwrap(), vec![0]);
    assert_eq!(on_disk.list(&vol0).unwrap(), vec![1000]);
    assert_eq!(on_disk.list_blobs(&vol0).unwrap(), blobs);
    // host1 reaches vol0 only, too.
    let e = client(&host1).list(&vol1).unwrap_err().to_string();
    assert!(
        e.contains("client host1.dr.example may not reach volume vol1"),
        "{e}"
    );
    for who in [&stranger, &wildcard] {
        let e = client(who).list(&vol0).unwrap_err().to_string();
        assert!(e.contains("names none of the clients"), "{e}");
    }
    assert_eq!(client(&admin).list(&vol0).unwrap(), vec![1000]);
    assert_eq!(client(&admin).list(&vol1).unwrap(), vec![0]);

    // A broken file: the receiver does not start, and says what to fix.
    std::fs::write(
        &clients,
        "[clients]\n\"host1.dr.example\" = [\"../vol0\"]\n",
    )
    .unwrap();
    let mut refused = Running(
        Command::new(bin("ublk-target"))
            .args(["receive", "--listen", "127.0.0.1:0", "--store"])
            .arg(&received)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-client-ca")
            .arg(&hosts_ca)
            .arg("--client-volumes")
            .arg(&clients)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // A receiver that accepted the file would serve on: killed (on drop) rather than
    // waited for.
    let mut exit = None;
    wait_until(
        "the receiver refuses to start",
        Duration::from_secs(20),
        || {
            exit = refused.0.try_wait().unwrap();
            exit.is_some()
        },
    );
    let mut stderr = String::new();
    refused
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!exit.unwrap().success());
    assert!(
        stderr.contains("clients.toml: client host1.dr.example"),
        "{stderr}"
    );
}

/// SIGHUP makes a receiver read its files again without dropping connections: a host
/// whose volumes changed is held to the new list from its next call on its open
/// connection, a host the new revocation list names is cut off at its next call (told
/// why) and refused when it reconnects, the others go on on their open connections;
/// files that do not load keep the settings in force and the receiver running.
#[test]
fn a_reloaded_receiver_holds_open_connections_to_its_new_settings() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (ca, cert, key) = certificates(dir, "receiver", "DNS:localhost");
    let (hosts_ca, _, _) = certificates(dir, "hosts", "DNS:unused");
    let host1 = client_certificate(dir, "host1", "hosts");
    let host2 = client_certificate(dir, "host2", "hosts");
    let crl = hosts_crl(dir, &[]);
    let clients = dir.join("clients.toml");
    let grant = |host1_volume: &str| {
        std::fs::write(
            &clients,
            format!(
                "[clients]\n\"host1.dr.example\" = [\"{host1_volume}\"]\n\
                 \"host2.dr.example\" = [\"vol1\"]\n"
            ),
        )
        .unwrap()
    };
    grant("vol0");
    let received = dir.join("received");
    std::fs::create_dir_all(&received).unwrap();
    let port = free_port();
    let log = dir.join("receiver.log");
    let receiver = Running(
        Command::new(bin("ublk-target"))
            .args(["receive", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--store")
            .arg(&received)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-client-ca")
            .arg(&hosts_ca)
            .arg("--tls-client-crl")
            .arg(&crl)
            .arg("--client-volumes")
            .arg(&clients)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until("the receiver accepts", Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let hangup = || {
        let pid = receiver.0.id().to_string();
        let out = Command::new("kill").args(["-HUP", &pid]).output().unwrap();
        assert!(out.status.success(), "kill -HUP: {}", text(&out));
    };
    let client = |identity: &(PathBuf, PathBuf)| {
        let config = objstore::tls::client_config(&ca, Some((&identity.0, &identity.1))).unwrap();
        objstore::ReceiverStore::new(&format!("localhost:{port}"), Some(config))
    };
    let (vol0, vol1, vol2) = (
        VolumeId::new("vol0").unwrap(),
        VolumeId::new("vol1").unwrap(),
        VolumeId::new("vol2").unwrap(),
    );
    let on_disk = LocalDirStore::new(&received);
    // Each host with its connection open.
    let (open1, open2) = (client(&host1), client(&host2));
    open1.put(&vol0, 0, b"host1's first").unwrap();
    open2.put(&vol1, 0, b"host2's first").unwrap();

    // host1 is given vol2 instead of vol0.
    grant("vol2");
    hangup();
    wait_until("the new volumes in force", Duration::from_secs(20), || {
        client(&host1).list(&vol0).is_err()
    });
    let e = open1.put(&vol0, 1, b"after the reload").unwrap_err();
    assert!(
        e.to_string()
            .contains("client host1.dr.example may not reach volume vol0"),
        "{e}"
    );
    open1.put(&vol2, 0, b"host1's new volume").unwrap();
    open2.put(&vol1, 1, b"host2 goes on").unwrap();
    assert_eq!(on_disk.list(&vol0).unwrap(), vec![0]);

    // host2's certificate is revoked.
    hosts_crl(dir, &["host2.pem"]);
    hangup();
    wait_until(
        "the new revocation list in force",
        Duration::from_secs(20),
        || {
            client(&host2)
                .list(&vol1)
                .is_err_and(|e| e.to_string().contains("was revoked"))
        },
    );
    let e = open2.put(&vol1, 2, b"revoked").unwrap_err().to_string();
    assert!(
        e.contains("settings changed") && e.contains("was revoked"),
        "{e}"
    );
    let e = open2
        .put(&vol1, 2, b"revoked, again")
        .unwrap_err()
        .to_string();
    assert!(e.contains("was revoked"), "reconnecting: {e}");
    assert_eq!(on_disk.list(&vol1).unwrap(), vec![0, 1]);
    open1.put(&vol2, 1, b"host1 goes on").unwrap();

    // A broken file keeps the settings in force.
    std::fs::write(
        &clients,
        "[clients]\n\"host1.dr.example\" = [\"../vol0\"]\n",
    )
    .unwrap();
    hangup();
    wait_until("the broken file logged", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("keeping the settings in force")
    });
    open1.put(&vol2, 2, b"still served").unwrap();
    client(&host1).put(&vol2, 3, b"and reconnecting").unwrap();
    assert_eq!(on_disk.list(&vol2).unwrap(), vec![0, 1, 2, 3]);
    assert!(client(&host2).list(&vol1).is_err());
}

/// A receiver with --tls-cert serves TLS only: a shipper with `tls://` and the CA
/// replicates through it; a plain client, a client trusting another CA or none, a
/// certificate without the name connected to, and a TLS client of a plain receiver are
/// refused with errors that say which, before any store call.
#[test]
fn a_tls_receiver_serves_tls_clients_that_trust_its_ca_and_only_them() {
    let volume = Volume::new(12, 300);
    let dir = volume.dir.path();
    let (ca, cert, key) = certificates(dir, "receiver", "DNS:localhost,IP:127.0.0.1");
    let (other_ca, _, _) = certificates(dir, "stranger", "DNS:localhost");
    std::fs::write(volume.path("token"), "tls-token").unwrap();
    let received = volume.path("received");
    let receiver =
        ReceiverProcess::start_with(&received, Some(&volume.path("token")), Some((cert, key)));
    let tls = format!("tls://localhost:{}", receiver.port);
    let fails_saying = |command: &mut Command, says: &[&str]| {
        let out = command.output().unwrap();
        assert!(
            !out.status.success() && says.iter().all(|s| text(&out).contains(s)),
            "expected a failure saying {says:?}: {}",
            text(&out)
        );
    };
    let with = |command: &mut Command, ca: &Path| {
        let mut command = std::mem::replace(command, Command::new("false"));
        command
            .env(objstore::TOKEN_ENV, "tls-token")
            .env(objstore::tls::CA_ENV, ca);
        command
    };
    fails_saying(
        &mut with(&mut volume.apply(&receiver.location(), &[]), &ca),
        &["takes TLS only", "tls://"],
    );
    fails_saying(
        &mut with(&mut volume.apply(&tls, &[]), &other_ca),
        &[
            "TLS handshake failed",
            "not signed by a CA in UBLK_DR_RECEIVER_CA",
        ],
    );
    fails_saying(
        volume
            .apply(&tls, &[])
            .env(objstore::TOKEN_ENV, "tls-token")
            .env_remove(objstore::tls::CA_ENV),
        &["UBLK_DR_RECEIVER_CA is not set"],
    );
    // The stranger's certificate names only localhost: connecting to 127.0.0.1 with it
    // as the receiver's is refused by name.
    let named = ReceiverProcess::start_with(
        &volume.path("named"),
        None,
        Some((dir.join("stranger.pem"), dir.join("stranger.key"))),
    );
    fails_saying(
        &mut with(
            &mut volume.apply(&format!("tls://127.0.0.1:{}", named.port), &[]),
            &other_ca,
        ),
        &["TLS handshake failed", "does not name 127.0.0.1"],
    );
    // A TLS client of a plain receiver.
    let plain = ReceiverProcess::start(&volume.path("plain"), None);
    fails_saying(
        &mut with(
            &mut volume.apply(&format!("tls://localhost:{}", plain.port), &[]),
            &ca,
        ),
        &[
            "TLS handshake failed",
            "is the receiver started with --tls-cert",
        ],
    );
    // Bad identities for the receiver: not PEM, a key that is not the certificate's.
    let receive = |cert: &Path, key: &Path| {
        let mut command = Command::new(bin("ublk-target"));
        command
            .args(["receive", "--listen", "127.0.0.1:0", "--store"])
            .arg(&received)
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key);
        command
    };
    let (cert, key) = (dir.join("receiver.pem"), dir.join("receiver.key"));
    fails_saying(
        &mut receive(&volume.path("token"), &key),
        &["holds no certificate"],
    );
    fails_saying(
        &mut receive(&cert, &dir.join("stranger.key")),
        &["do not make a TLS identity"],
    );
    // Uploads from a client trusting another CA, and from a plain one, store nothing.
    let vol0 = VolumeId::new("vol0").unwrap();
    let stranger = objstore::ReceiverStore::new(
        &format!("localhost:{}", receiver.port),
        Some(objstore::tls::client_config(&other_ca, None).unwrap()),
    );
    let err = stranger.put(&vol0, 0, b"segment").unwrap_err().to_string();
    assert!(err.contains("not signed by a CA"), "{err}");
    let plain_client = objstore::ReceiverStore::new(&format!("127.0.0.1:{}", receiver.port), None);
    let err = plain_client
        .put(&vol0, 0, b"segment")
        .unwrap_err()
        .to_string();
    assert!(err.contains("takes TLS only"), "{err}");
    assert!(LocalDirStore::new(&received)
        .list(&vol0)
        .unwrap()
        .is_empty());

    // The real thing: ship over TLS, apply from what arrived.
    let shipped = with(
        &mut volume.shipper(&tls, &["--no-initial-sync", "--retry-unit-ms", "50"]),
        &ca,
    )
    .output()
    .unwrap();
    assert!(shipped.status.success(), "{}", text(&shipped));
    assert!(LocalDirStore::new(&received).list(&vol0).unwrap().len() > 1);
    let listed = with(&mut volume.apply(&tls, &[]), &ca).output().unwrap();
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(volume.replica_equals_source());
}
