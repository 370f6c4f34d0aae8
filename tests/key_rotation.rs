//! Key rotation (`shipper key rotate`): a running shipper keeps sealing with its key
//! until the recovery side proves it holds the new one (a `key-<id>.held` blob that
//! `ublk-target apply` writes once its key file has the key), then moves to it without
//! a restart; the hash chain runs on across the change and the replica converges. A
//! recovery side whose file lacks a key that sealed a segment stops before it, saying
//! so; `apply --follow` waits there for its key file — but exits at once when nothing
//! was ever applied with that file (a wrong key, not a rotation). Once a segment under
//! the new key is applied, one sealed with the retired key (forged by someone who holds
//! it) is refused. `shipper key forget` then drops the retired key. A digest resync
//! whose request was made under the old key still completes after the switch.

use blkfilter::workload::Workload;
use changelog::key::hex;
use changelog::{flags, Key, Op, PlainSegment, RecordRef, SealParams, TargetStore};
use e2e::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 8 << 20;

fn wait_for(what: &str, check: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "never saw: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ublk-target apply` of the fixture's volume into `replica` with key file `key`,
/// keeping applied segments in the store (the tests look at them).
fn apply_with_key(fixture: &Fixture, replica: &str, key: &Path) -> Command {
    let mut cmd = Command::new(bin("ublk-target"));
    cmd.args([
        "apply",
        "--volume",
        "vol0",
        "--keep-applied-segments",
        "--store",
    ])
    .arg(fixture.path("store"))
    .arg("--replica")
    .arg(fixture.path(replica))
    .arg("--key")
    .arg(key);
    cmd
}

fn applies(fixture: &Fixture, key: &Path) {
    let out = apply_with_key(fixture, "replica", key).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn shipper_key(args: &[&str], file: &Path) -> std::process::Output {
    Command::new(bin("shipper"))
        .arg("key")
        .args(args)
        .arg(file)
        .output()
        .unwrap()
}

/// Copies the key file to the recovery side's `target.key` the way an operator would
/// (a temporary file renamed over it).
fn copy_key_to_target(fixture: &Fixture) -> PathBuf {
    let target = fixture.path("target.key");
    std::fs::copy(fixture.path("key"), fixture.path("target.key.tmp")).unwrap();
    std::fs::rename(fixture.path("target.key.tmp"), &target).unwrap();
    target
}

/// The store's segment headers, in chain order.
fn store_headers(fixture: &Fixture) -> Vec<changelog::SegmentHeader> {
    fixture
        .store_segments()
        .iter()
        .map(|p| {
            changelog::read_info(&std::fs::read(p).unwrap(), "t")
                .unwrap()
                .header
        })
        .collect()
}

/// A protected volume with a running shipper (reading the key file as it changes)
/// and a recovery side that has applied what it shipped, its key file a copy of the
/// protected side's, rotated after that: the shipper has not moved to the new key.
struct Rotated {
    fixture: Fixture,
    capture: blkfilter::capture::Capture,
    model: Model,
    workload: Workload,
    control: std::sync::Arc<shipper::Control>,
    shipper: std::thread::JoinHandle<shipper::Result<shipper::RunSummary>>,
    old: Key,
    new: Key,
}

impl Rotated {
    fn new() -> Rotated {
        let fixture = Fixture::new(SIZE);
        let capture = fixture.capture(64 << 20);
        let mut config = fixture.shipper_config();
        config.key_file = Some(fixture.path("key"));
        let (control, shipper) = fixture.spawn_shipper(config);
        let mut rotated = Rotated {
            old: fixture.key.clone(),
            new: fixture.key.clone(),
            capture,
            model: Model::new(SIZE),
            workload: Workload::new(41, SIZE),
            control,
            shipper,
            fixture,
        };
        rotated.write_and_ship(60);
        sparse_file(&rotated.fixture.path("replica"), SIZE);
        let target = copy_key_to_target(&rotated.fixture);
        applies(&rotated.fixture, &target);

        let out = shipper_key(&["rotate"], &rotated.fixture.path("key"));
        assert!(out.status.success(), "{out:?}");
        rotated.new = Key::load(&rotated.fixture.path("key")).unwrap();
        assert_eq!(rotated.new.ids(), vec![rotated.old.id(), rotated.new.id()]);
        assert!(String::from_utf8_lossy(&out.stdout).contains(&hex(&rotated.new.id())));
        rotated
    }

    /// Captures `ops` more requests and waits until the store has them all.
    fn write_and_ship(&mut self, ops: usize) {
        let workload = self.workload.by_ref().take(ops);
        drive(&mut self.capture, &mut self.model, workload);
        let end = self.model.seqs().last().unwrap() + 1;
        wait_for("the store holding every write", &mut || {
            self.status().newest_uploaded_seq_end >= Some(end)
        });
    }

    fn status(&self) -> shipper::Status {
        shipper::Status::read(&self.fixture.path("status.json")).unwrap_or_default()
    }

    fn finish(self) -> (Fixture, Model, Key, Key) {
        self.control.drain();
        self.shipper.join().unwrap().expect("shipper");
        (self.fixture, self.model, self.old, self.new)
    }
}

#[test]
fn the_shipper_moves_to_a_rotated_key_once_the_recovery_side_proves_it() {
    let mut rotated = Rotated::new();
    let (old, new) = (rotated.old.clone(), rotated.new.clone());
    // The recovery side lacks the new key: the shipper goes on with the old one,
    // however long, and says so.
    rotated.write_and_ship(60);
    std::thread::sleep(Duration::from_secs(6)); // more than one look at the proofs
    assert_eq!(rotated.status().sealing_key_id, hex(&old.id()));
    assert!(store_headers(&rotated.fixture)
        .iter()
        .all(|h| h.key_id == old.id()));

    // The file reaches the recovery side; its next apply proves the key.
    let target = copy_key_to_target(&rotated.fixture);
    applies(&rotated.fixture, &target);
    let new_id = hex(&new.id());
    wait_for("the shipper sealing with the new key", &mut || {
        rotated.status().sealing_key_id == new_id
    });
    let switched_at = rotated.model.seqs().last().unwrap() + 1;
    rotated.write_and_ship(60);
    let (fixture, model, old, new) = rotated.finish();

    // Old key up to the switch, new key after it, in one chain.
    let headers = store_headers(&fixture);
    let first_new = headers
        .iter()
        .position(|h| h.key_id == new.id())
        .expect("a segment under the new key");
    assert!(headers[..first_new].iter().all(|h| h.key_id == old.id()));
    assert!(headers[first_new..].iter().all(|h| h.key_id == new.id()));
    assert!(headers[first_new].first_seq <= switched_at);
    let mut keyed = fixture;
    keyed.key = new.clone();
    assert_eq!(store_seqs(&keyed), model.seqs());
    applies(&keyed, &target);
    assert_eq!(
        file_sha256(&keyed.path("replica")),
        sha256(&model.final_image())
    );

    // Someone holding the retired key forges the next segment, correctly linked: it
    // is refused and nothing is applied.
    let last = changelog::read_info(
        &std::fs::read(keyed.store_segments().last().unwrap()).unwrap(),
        "t",
    )
    .unwrap();
    let mut plain = PlainSegment::with_buffer(Vec::new());
    plain.flags = flags::CRASH_POINT;
    plain.push(&RecordRef {
        seq: last.header.end_seq(),
        op: Op::Write,
        flags: 0,
        offset: 0,
        len: 4096,
        data: &[0x66; 4096],
    });
    let params = SealParams {
        volume: keyed.volume.clone(),
        epoch: last.header.epoch,
        index: last.header.index + 1,
        created_unix_ms: changelog::unix_ms_now(),
    };
    let forged = changelog::seal(&plain, &params, &old)
        .unwrap()
        .link(last.digest);
    keyed
        .store()
        .put(&keyed.volume, params.index, &forged.bytes)
        .unwrap();
    let out = apply_with_key(&keyed, "replica", &target).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a forged segment was applied");
    assert!(
        stderr.contains("retired") && stderr.contains(&hex(&old.id())),
        "{stderr}"
    );
    assert_eq!(
        file_sha256(&keyed.path("replica")),
        sha256(&model.final_image())
    );

    // With nothing left under it, the retired key is forgotten; the sealing one cannot
    // be; what is left still opens everything after the switch.
    let refused = Command::new(bin("shipper"))
        .args(["key", "forget"])
        .arg(keyed.path("key"))
        .arg(hex(&new.id()))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("the newest"));
    let forgot = Command::new(bin("shipper"))
        .args(["key", "forget"])
        .arg(keyed.path("key"))
        .arg(&hex(&old.id())[..8])
        .output()
        .unwrap();
    assert!(forgot.status.success(), "{forgot:?}");
    let listed = shipper_key(&["list"], &keyed.path("key"));
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        format!("{}  newest", hex(&new.id()))
    );
    // The trimmed file reaches the recovery side: it still applies (the forged segment
    // removed).
    std::fs::remove_file(keyed.store().segment_path(&keyed.volume, params.index)).unwrap();
    let target = copy_key_to_target(&keyed);
    applies(&keyed, &target);
    assert_eq!(
        file_sha256(&keyed.path("replica")),
        sha256(&model.final_image())
    );
}

#[test]
fn apply_follow_waits_for_a_key_of_a_rotation_but_not_for_a_wrong_key() {
    // A recovery side whose key file lost the new key (an old copy put back) after
    // proving it: apply stops before the first segment under it, then --follow waits.
    let mut rotated = Rotated::new();
    let before = rotated.fixture.path("key.before");
    std::fs::copy(rotated.fixture.path("target.key"), &before).unwrap();
    let target = copy_key_to_target(&rotated.fixture);
    applies(&rotated.fixture, &target);
    let new_id = hex(&rotated.new.id());
    wait_for("the shipper sealing with the new key", &mut || {
        rotated.status().sealing_key_id == new_id
    });
    let replica = rotated.fixture.path("replica");
    let at_switch = file_sha256(&replica);
    rotated.write_and_ship(60);
    let (fixture, model, _, new) = rotated.finish();
    std::fs::copy(&before, &target).unwrap();

    let out = apply_with_key(&fixture, "replica", &target)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "applied without the new key: {stderr}"
    );
    assert!(
        stderr.contains(&hex(&new.id())) && stderr.contains("lacks"),
        "the error does not say which key is missing: {stderr}"
    );
    assert_eq!(file_sha256(&replica), at_switch, "the replica moved");

    let log = fixture.path("apply.log");
    let mut follow = apply_with_key(&fixture, "replica", &target)
        .args(["--follow", "--poll-ms", "50"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logged = |text: &str| std::fs::read_to_string(&log).unwrap().contains(text);
    wait_for("apply --follow waiting for the key", &mut || {
        logged("waiting for")
    });
    assert!(
        follow.try_wait().unwrap().is_none(),
        "apply --follow gave up"
    );
    copy_key_to_target(&fixture);
    let expected = sha256(&model.final_image());
    wait_for("the replica converging", &mut || {
        file_sha256(&replica) == expected
    });
    follow.kill().unwrap();
    follow.wait().unwrap();

    // A fresh replica with a key file that never opened anything here: a wrong key,
    // reported at once even with --follow.
    let stranger = fixture.path("stranger.key");
    Key::generate_file(&stranger).unwrap();
    sparse_file(&fixture.path("fresh"), SIZE);
    let mut wrong = apply_with_key(&fixture, "fresh", &stranger)
        .args(["--follow", "--poll-ms", "50"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut exited = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while exited.is_none() && Instant::now() < deadline {
        exited = wrong.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    if exited.is_none() {
        wrong.kill().unwrap();
        panic!("apply --follow with a wrong key kept waiting");
    }
    assert!(!exited.unwrap().success());
    let out = wrong.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("lacks"));
}

/// A digest resync asked for under the old key, whose answer is still owed when the
/// shipper moves to the new key: the recovery side no longer answers in a key older
/// than the segments it applied, so the shipper asks again in the new key, and the
/// initial replication completes.
#[test]
fn a_digest_resync_asked_under_the_old_key_completes_after_the_switch() {
    use blkfilter::ring::RingControl;
    use changelog::digests::{request_name, DigestRequest};
    let mut fixture = Fixture::new(SIZE);
    let initial: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(fixture.path("backing"), &initial).unwrap();
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::with_image(initial);
    let old = fixture.key.clone();
    let rotated = Key::rotate_file(&fixture.path("key")).unwrap();
    let store = fixture.store();
    // The recovery side holds (and has proved) only the old key.
    ublk_target::keys::publish_proofs(&*store, &fixture.volume, &old).unwrap();
    let mut config = fixture.shipper_config();
    config.initial_sync = true;
    config.key = rotated.clone();
    config.key_file = Some(fixture.path("key"));
    let (control, shipper) = fixture.spawn_shipper(config);

    // The initial replication asks for the replica's digests, under the old key.
    let ring = RingControl::open(&fixture.path("ring")).unwrap();
    let mut asked = None;
    wait_for("the digest request", &mut || {
        capture.tick().unwrap();
        let gen = ring.progress().gen;
        asked = store
            .get_blob(&fixture.volume, &request_name(gen))
            .unwrap()
            .map(|json| serde_json::from_slice::<DigestRequest>(&json).unwrap());
        asked.is_some()
    });
    assert_eq!(asked.unwrap().key_id, Some(hex(&old.id())));

    // The recovery side gets the new key and proves it; the shipper moves to it and
    // seals writes with it, before any answer.
    ublk_target::keys::publish_proofs(&*store, &fixture.volume, &rotated).unwrap();
    let new_id = hex(&rotated.id());
    let status = || shipper::Status::read(&fixture.path("status.json")).unwrap_or_default();
    wait_for("the shipper sealing with the new key", &mut || {
        status().sealing_key_id == new_id
    });
    drive(&mut capture, &mut model, Workload::new(43, SIZE).take(20));
    let end = model.seqs().last().unwrap() + 1;
    wait_for("the writes in the store", &mut || {
        status().newest_uploaded_seq_end >= Some(end)
    });

    // Now the recovery side follows: it applies segments under both keys, answers the
    // request in the new key, and the pass completes.
    fixture.key = rotated;
    let follower = fixture.follow("replica");
    wait_for("the initial replication", &mut || {
        !capture.tick().expect("digest resync")
    });
    control.drain();
    shipper.join().unwrap().expect("shipper");
    follower.finish();
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}
