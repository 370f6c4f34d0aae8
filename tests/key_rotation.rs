//! Key rotation (`shipper key rotate`): segments sealed after the shippers restart use
//! the new key, the hash chain runs on across the change, and the recovery side opens
//! both kinds once its key file has the new key. A recovery side whose file lacks it
//! stops at the first segment sealed with it — a clear error, the replica at the point
//! before — and `apply --follow` waits there, reading the file again until it has it.
//! `shipper key forget` then drops the retired key, after which everything still opens.

use blkfilter::workload::Workload;
use changelog::key::hex;
use changelog::Key;
use e2e::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 8 << 20;

/// Runs `shipper run --drain` on the fixture (a shipper start and stop).
fn ship_with_the_binary(fixture: &Fixture) {
    let status = shipper_command(fixture)
        .args(["--drain", "--no-initial-sync", "--max-segment-age-ms", "20"])
        .args(["--max-segment-bytes", "262144"])
        .arg("--status")
        .arg(fixture.path("status.json"))
        .status()
        .unwrap();
    assert!(status.success(), "shipper run --drain: {status}");
}

/// `ublk-target apply` of the fixture's volume into `replica` with key file `key`.
fn apply_with_key(fixture: &Fixture, replica: &str, key: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin("ublk-target"));
    cmd.args(["apply", "--volume", "vol0", "--store"])
        .arg(fixture.path("store"))
        .arg("--replica")
        .arg(fixture.path(replica))
        .arg("--key")
        .arg(key);
    cmd
}

fn key_command(args: &[&str], file: &std::path::Path) -> std::process::Output {
    Command::new(bin("shipper"))
        .arg("key")
        .args(args)
        .arg(file)
        .output()
        .unwrap()
}

/// The key id the shipper's status says it seals with.
fn sealing_key_in_status(fixture: &Fixture) -> String {
    shipper::Status::read(&fixture.path("status.json"))
        .unwrap()
        .sealing_key_id
}

/// A volume shipped under its first key, rotated, then shipped under the second:
/// returns the fixture (key file rotated), its model, a copy of the key file from
/// before the rotation, and the seq of the first record sealed with the new key.
fn shipped_across_a_rotation() -> (Fixture, Model, std::path::PathBuf, u64) {
    let fixture = Fixture::new(SIZE);
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::new(SIZE);
    drive(&mut capture, &mut model, Workload::new(31, SIZE).take(80));
    ship_with_the_binary(&fixture);

    let before = fixture.path("key.before");
    std::fs::copy(fixture.path("key"), &before).unwrap();
    let rotated = key_command(&["rotate"], &fixture.path("key"));
    assert!(rotated.status.success(), "{rotated:?}");
    let new_key = Key::load(&fixture.path("key")).unwrap();
    assert_eq!(new_key.ids().len(), 2);
    let out = String::from_utf8_lossy(&rotated.stdout);
    assert!(out.contains(&hex(&new_key.id())), "{out}");

    let old_key = Key::load(&before).unwrap();
    assert_eq!(sealing_key_in_status(&fixture), hex(&old_key.id()));
    let first_new_seq = model.seqs().last().unwrap() + 1;
    drive(&mut capture, &mut model, Workload::new(32, SIZE).take(80));
    ship_with_the_binary(&fixture);
    assert_eq!(sealing_key_in_status(&fixture), hex(&new_key.id()));
    (fixture, model, before, first_new_seq)
}

#[test]
fn segments_after_a_rotation_use_the_new_key_and_the_chain_runs_on() {
    let (fixture, model, before, first_new_seq) = shipped_across_a_rotation();
    let old = Key::load(&before).unwrap();
    let new = Key::load(&fixture.path("key")).unwrap();

    // Every segment whose records start before the rotation is under the old key,
    // every later one under the new key, in one unbroken chain (store_seqs opens each
    // with the rotated file and checks the chain's seqs below).
    let headers: Vec<_> = fixture
        .store_segments()
        .iter()
        .map(|p| {
            changelog::read_info(&std::fs::read(p).unwrap(), "t")
                .unwrap()
                .header
        })
        .collect();
    assert!(headers.iter().any(|h| h.key_id == old.id()));
    assert!(headers.iter().any(|h| h.key_id == new.id()));
    for h in &headers {
        let expected = if h.first_seq < first_new_seq {
            old.id()
        } else {
            new.id()
        };
        assert_eq!(
            h.key_id, expected,
            "segment {} ({}..)",
            h.index, h.first_seq
        );
    }
    let mut keyed = Fixture { ..fixture };
    keyed.key = new;
    assert_eq!(store_seqs(&keyed), model.seqs());

    // A recovery side with the rotated file applies everything.
    let replica = keyed.path("replica");
    sparse_file(&replica, SIZE);
    let out = apply_command(&keyed, "replica").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_sha256(&replica), sha256(&model.final_image()));
}

#[test]
fn a_recovery_side_without_the_new_key_stops_before_it_and_loses_nothing() {
    let (fixture, model, before, first_new_seq) = shipped_across_a_rotation();
    let new = Key::load(&fixture.path("key")).unwrap();
    let replica = fixture.path("replica");
    sparse_file(&replica, SIZE);

    let out = apply_with_key(&fixture, "replica", &before)
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
    // The replica holds exactly what the old key sealed.
    let mut at_rotation = model.replayer();
    at_rotation.advance_to(first_new_seq);
    assert_eq!(file_sha256(&replica), sha256(&at_rotation.image));

    // The same command with the rotated file goes on from there.
    let out = apply_command(&fixture, "replica").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_sha256(&replica), sha256(&model.final_image()));
}

#[test]
fn apply_follow_waits_for_the_new_key_then_goes_on_and_retired_keys_can_be_forgotten() {
    let (fixture, model, before, _) = shipped_across_a_rotation();
    let target_key = fixture.path("target.key");
    std::fs::copy(&before, &target_key).unwrap();
    let replica = fixture.path("replica");
    sparse_file(&replica, SIZE);
    let log = fixture.path("apply.log");
    let mut follow = apply_with_key(&fixture, "replica", &target_key)
        .args(["--follow", "--poll-ms", "50"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let wait_for = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(Instant::now() < deadline, "never saw: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let logged = |text: &str| std::fs::read_to_string(&log).unwrap().contains(text);
    wait_for("apply --follow waiting for the key", &|| logged("lacks"));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "apply --follow gave up"
    );

    // The operator copies the rotated file over (atomically, as scp to a temp + mv).
    std::fs::copy(fixture.path("key"), fixture.path("target.key.tmp")).unwrap();
    std::fs::rename(fixture.path("target.key.tmp"), &target_key).unwrap();
    let expected = sha256(&model.final_image());
    wait_for("the replica converging", &|| {
        file_sha256(&replica) == expected
    });
    assert!(
        logged("read again"),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    follow.kill().unwrap();
    follow.wait().unwrap();

    // Everything is applied: the retired key can go; the sealing one cannot.
    let keys = Key::load(&fixture.path("key")).unwrap();
    let refused = key_command(&["forget"], &fixture.path("key"));
    assert!(!refused.status.success(), "forget without an id");
    let sealing = Command::new(bin("shipper"))
        .args(["key", "forget"])
        .arg(fixture.path("key"))
        .arg(hex(&keys.id()))
        .output()
        .unwrap();
    assert!(!sealing.status.success());
    assert!(String::from_utf8_lossy(&sealing.stderr).contains("the one that seals"));
    let forgot = Command::new(bin("shipper"))
        .args(["key", "forget"])
        .arg(fixture.path("key"))
        .arg(&hex(&keys.ids()[0])[..8])
        .output()
        .unwrap();
    assert!(forgot.status.success(), "{forgot:?}");
    let listed = key_command(&["list"], &fixture.path("key"));
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert_eq!(listed.trim(), format!("{}  seals", hex(&keys.id())));
}
