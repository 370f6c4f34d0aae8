//! Every bad input of I8 is refused with a clear error, and neither the replica nor the
//! applier's position changes: a flipped bit, a truncated file, a duplicate, a gap, a
//! swapped order, a segment of another volume, a wrong key (I6, I8).

use blkfilter::workload::Workload;
use changelog::Key;
use e2e::*;
use std::path::PathBuf;
use ublk_target::TargetError;

/// A store with several segments of which the replica has applied the first two.
fn setup() -> (Fixture, Vec<PathBuf>) {
    let (fixture, _) = Fixture::shipped(4 << 20, 5, 200);
    let segments = fixture.store_segments();
    assert!(segments.len() >= 5);
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    applier.apply_next().unwrap().unwrap();
    applier.apply_next().unwrap().unwrap();
    (fixture, segments)
}

/// Applies with `key` and expects a refusal that leaves replica and state untouched;
/// returns the error message.
fn refused(fixture: &Fixture, key: &Key) -> String {
    let replica_before = file_sha256(&fixture.path("replica"));
    let state_before = std::fs::read(fixture.path("replica.state")).unwrap();
    let mut applier = fixture.applier("replica", key).unwrap();
    let err = applier
        .apply_available()
        .expect_err("bad input must be refused");
    assert!(
        !err.is_recoverable(),
        "{err} must not be treated as a transient error"
    );
    assert_eq!(
        file_sha256(&fixture.path("replica")),
        replica_before,
        "replica changed by a refused segment"
    );
    assert_eq!(
        std::fs::read(fixture.path("replica.state")).unwrap(),
        state_before,
        "applier state moved"
    );
    let message = err.to_string();
    eprintln!("refused as expected: {message}");
    message
}

#[test]
fn flipped_bit() {
    let (fixture, segs) = setup();
    let mut bytes = std::fs::read(&segs[2]).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&segs[2], bytes).unwrap();
    assert!(refused(&fixture, &fixture.key).contains("authentication"));
}

#[test]
fn flipped_bit_in_header() {
    let (fixture, segs) = setup();
    let mut bytes = std::fs::read(&segs[2]).unwrap();
    bytes[60] ^= 1; // inside the index field
    std::fs::write(&segs[2], bytes).unwrap();
    assert!(refused(&fixture, &fixture.key).contains("checksum"));
}

#[test]
fn truncated() {
    let (fixture, segs) = setup();
    let bytes = std::fs::read(&segs[2]).unwrap();
    std::fs::write(&segs[2], &bytes[..bytes.len() - 100]).unwrap();
    assert!(refused(&fixture, &fixture.key).contains("truncated"));
}

#[test]
fn duplicate() {
    let (fixture, segs) = setup();
    std::fs::copy(&segs[1], &segs[2]).unwrap(); // an applied segment again in the next slot
    assert!(refused(&fixture, &fixture.key).contains("replay"));
}

#[test]
fn gap() {
    let (fixture, segs) = setup();
    std::fs::remove_file(&segs[2]).unwrap();
    let message = refused(&fixture, &fixture.key);
    assert!(message.contains("missing"), "{message}");
}

#[test]
fn swapped_order() {
    let (fixture, segs) = setup();
    let (a, b) = (
        std::fs::read(&segs[2]).unwrap(),
        std::fs::read(&segs[3]).unwrap(),
    );
    std::fs::write(&segs[2], b).unwrap();
    std::fs::write(&segs[3], a).unwrap();
    assert!(refused(&fixture, &fixture.key).contains("gap"));
}

#[test]
fn segment_of_another_volume() {
    let (fixture, segs) = setup();
    // Same key, same store, but sealed for another volume.
    let other = Fixture::new(4 << 20);
    std::fs::copy(fixture.path("key"), other.path("key2")).unwrap();
    let mut capture = other.capture(16 << 20);
    drive(
        &mut capture,
        &mut Model::new(4 << 20),
        Workload::new(6, 4 << 20).take(50),
    );
    let mut config = other.shipper_config();
    config.volume = changelog::VolumeId::new("vol1").unwrap();
    config.key = fixture.key.clone();
    let control = std::sync::Arc::new(shipper::Control::default());
    control.drain();
    shipper::run(&config, other.store(), control).expect("ship other volume");
    let foreign = other
        .path("store")
        .join("vol1")
        .join("0000000000000002.seg");
    std::fs::copy(foreign, &segs[2]).unwrap();
    assert!(refused(&fixture, &fixture.key).contains("belongs to volume"));
}

#[test]
fn wrong_key() {
    let (fixture, _) = setup();
    let message = refused(&fixture, &Key::from_bytes([0x42; 32]));
    assert!(message.contains("key id"), "{message}");
}

#[test]
fn cli_reports_bad_input_and_exits_nonzero() {
    let (fixture, segs) = setup();
    std::fs::remove_file(&segs[2]).unwrap();
    let before = file_sha256(&fixture.path("replica"));
    let out = apply_command(&fixture, "replica").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("error:") && stderr.contains("missing"),
        "{stderr}"
    );
    assert_eq!(file_sha256(&fixture.path("replica")), before);

    let short_key = fixture.path("short.key");
    std::fs::write(&short_key, [1u8; 16]).unwrap();
    let out = std::process::Command::new(bin("ublk-target"))
        .args([
            "apply",
            "--volume",
            "vol0",
            "--store",
            "/nonexistent",
            "--replica",
            "/tmp/x",
        ])
        .arg("--key")
        .arg(&short_key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("16 bytes"),
        "{stderr}"
    );

    // A mistyped replica path is refused, not created (an empty file would take the
    // segments and serve a volume of the wrong size), also by the service (--follow).
    let missing = fixture.path("no-such-replica");
    let out = apply_command(&fixture, "no-such-replica")
        .arg("--follow")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("does not exist: create it the size"),
        "{stderr}"
    );
    // A setup error: status 1, which the systemd unit restarts (3 would not be).
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!missing.exists());
}

#[test]
fn apply_errors_are_typed() {
    let (fixture, segs) = setup();
    std::fs::remove_file(&segs[3]).unwrap();
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    applier.apply_next().unwrap().expect("segment 2 is fine");
    assert!(matches!(
        applier.apply_next(),
        Err(TargetError::Gap { missing: 3, .. })
    ));
}
