//! Digest resync end to end on the host: initial replication of a volume that already
//! holds data while writes continue (I7), a resync that ships only the blocks that
//! differ, an on-demand resync that repairs a diverged replica, a forged digest
//! answer refused (I8), and a store failing the exchange named in the status.

use blkfilter::ring::RingControl;
use blkfilter::workload::{Rng, Workload};
use e2e::*;
use std::time::{Duration, Instant};
use ublk_target::digests::AnswerMode;

const BLOCK: u64 = 64 << 10;

/// Fills `len` bytes: every other 64 KiB block random, the rest zeroes.
fn some_data(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut image = vec![0u8; len as usize];
    for block in image.chunks_mut(BLOCK as usize).step_by(2) {
        rng.fill_half_compressible(block);
    }
    image
}

/// Drives the capture's digest pass (and 10 ops per round for the first 30 rounds, if a
/// workload is given: writes go on while the resync starts, without outrunning a
/// shipper slowed by a busy machine) until no digest resync is pending; returns the
/// statuses seen meanwhile.
fn run_until_resynced(
    fixture: &Fixture,
    capture: &mut blkfilter::capture::Capture,
    model: &mut Model,
    mut workload: Option<&mut Workload>,
) -> Vec<shipper::Status> {
    let deadline = Instant::now() + Duration::from_secs(180);
    // The shipper (started just before) asks for the initial sync when it starts.
    let ring = RingControl::open(&fixture.path("ring")).unwrap();
    while !ring.progress().pending() {
        assert!(Instant::now() < deadline, "no digest resync was asked for");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut statuses = Vec::new();
    for round in 0.. {
        if let Some(w) = workload.as_deref_mut().filter(|_| round < 30) {
            drive(capture, model, w.take(10));
        }
        if !capture.tick().expect("digest resync") {
            return statuses;
        }
        if let Ok(s) = shipper::Status::read(&fixture.path("status.json")) {
            statuses.push(s);
        }
        assert!(Instant::now() < deadline, "digest resync did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    unreachable!()
}

/// A new protection's initial digest resync with no writes meanwhile: the recovery side
/// answers in `mode`, then everything is shipped and applied. Returns the pass's figures.
fn initial_sync_alone(
    fixture: &Fixture,
    capture: &mut blkfilter::capture::Capture,
    model: &mut Model,
    mode: AnswerMode,
) -> blkfilter::ring::ResyncProgress {
    let follower = fixture.follow_with("replica", mode);
    let mut config = fixture.shipper_config();
    config.initial_sync = true;
    let (control, shipper) = fixture.spawn_shipper(config);
    run_until_resynced(fixture, capture, model, None);
    let progress = RingControl::open(&fixture.path("ring")).unwrap().progress();
    control.drain();
    shipper.join().unwrap().expect("shipper");
    follower.finish();
    progress
}

#[test]
fn initial_replication_of_a_used_volume_under_writes() {
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let initial = some_data(11, size);
    std::fs::write(fixture.path("backing"), &initial).unwrap();
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::with_image(initial);
    let follower = fixture.follow("replica");
    let mut config = fixture.shipper_config();
    config.initial_sync = true;
    let (control, shipper) = fixture.spawn_shipper(config);

    let mut workload = Workload::new(5, size).with_max_io(256 << 10);
    let statuses = run_until_resynced(&fixture, &mut capture, &mut model, Some(&mut workload));
    drive(&mut capture, &mut model, workload.take(100));
    control.drain();
    shipper.join().unwrap().expect("shipper");
    follower.finish();

    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
        "replica differs from the source after initial replication"
    );
    assert!(
        statuses.iter().any(|s| s.resync.is_some()
            && s.health() == shipper::Health::Warning
            && s.state().contains("digest resync")),
        "status never showed the initial replication"
    );
    // Replay the store from scratch: no point before the copy is complete claims to be
    // a crash state, and every later one equals the source at its seq.
    let seen = apply_and_check_crash_points(&fixture, &model, "check");
    assert!(
        seen.others > 0,
        "segments during the copy must not be points"
    );
    assert!(seen.crash_points > 0 && seen.last_is_point, "{seen:?}");
}

#[test]
fn digest_resync_ships_only_changed_blocks() {
    let size = 32 << 20;
    let fixture = Fixture::new(size);
    let source = some_data(21, size);
    std::fs::write(fixture.path("backing"), &source).unwrap();
    // The replica is the source with 1% of its blocks changed.
    let blocks = size / BLOCK;
    let changed = blocks / 100;
    let mut replica = source.clone();
    let mut rng = Rng::new(3);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < changed {
        picked.insert(rng.below(blocks));
    }
    for &b in &picked {
        replica[(b * BLOCK + 100) as usize] ^= 0x5a;
    }
    std::fs::write(fixture.path("replica"), &replica).unwrap();

    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::with_image(source.clone());
    let progress = initial_sync_alone(&fixture, &mut capture, &mut model, AnswerMode::Compare);

    println!(
        "digest resync: {} of {} blocks changed; {} bytes re-sent = {:.2}% of the {} MiB disk",
        changed,
        blocks,
        progress.sent_bytes,
        progress.sent_bytes as f64 * 100.0 / size as f64,
        size >> 20
    );
    assert_eq!(progress.total_bytes, size);
    assert_eq!(
        progress.sent_bytes,
        changed * BLOCK,
        "exactly the changed blocks"
    );
    assert!(progress.sent_bytes * 50 <= size, "more than 2% shipped");
    assert!(std::fs::read(fixture.path("replica")).unwrap() == source);
}

#[test]
fn full_download_sends_every_block() {
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let source = some_data(31, size);
    std::fs::write(fixture.path("backing"), &source).unwrap();
    // The replica already equals the source; a full download sends it all anyway.
    std::fs::write(fixture.path("replica"), &source).unwrap();
    let mut capture = fixture.capture(32 << 20);
    let mut model = Model::with_image(source.clone());
    let progress = initial_sync_alone(&fixture, &mut capture, &mut model, AnswerMode::FullDownload);
    assert_eq!(progress.sent_bytes, size, "every block was sent");
    assert!(std::fs::read(fixture.path("replica")).unwrap() == source);
}

#[test]
fn on_demand_resync_repairs_a_diverged_replica_under_writes() {
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::new(size);
    let follower = fixture.follow("replica");
    let (control, shipper) = fixture.spawn_shipper(fixture.shipper_config());
    let mut workload = Workload::new(9, size).with_max_io(256 << 10);
    drive(&mut capture, &mut model, workload.by_ref().take(200));

    // Damage the replica behind the applier's back, then ask for a resync while
    // writes go on.
    let damage = |offset: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(fixture.path("replica"))
            .unwrap();
        f.write_all_at(&[0xee; 3000], offset).unwrap();
    };
    for offset in [0, 3 << 20, size - 4096] {
        damage(offset);
    }
    RingControl::open(&fixture.path("ring"))
        .unwrap()
        .request_digest_resync(16 << 10);
    run_until_resynced(&fixture, &mut capture, &mut model, Some(&mut workload));
    drive(&mut capture, &mut model, workload.take(100));
    control.drain();
    shipper.join().unwrap().expect("shipper");
    follower.finish();
    let progress = RingControl::open(&fixture.path("ring")).unwrap().progress();
    assert_eq!(progress.block_bytes, 16 << 10);
    assert!(progress.sent_bytes > 0);
    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
        "the resync did not repair the replica"
    );
}

#[test]
fn forged_digest_answer_stops_the_volume() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    std::fs::write(fixture.path("backing"), some_data(1, size)).unwrap();
    let mut capture = fixture.capture(16 << 20);
    let mut config = fixture.shipper_config();
    config.initial_sync = true;
    let (_control, shipper) = fixture.spawn_shipper(config);
    // The begin MARK goes out; instead of the recovery side, a forger answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let store = fixture.store();
    let gen = loop {
        capture.tick().unwrap();
        let names = changelog::TargetStore::list_blobs(&*store, &fixture.volume).unwrap();
        if let Some(gen) = names
            .iter()
            .find_map(|n| changelog::digests::parse_request_name(n))
        {
            break gen;
        }
        assert!(Instant::now() < deadline, "no digest request appeared");
        std::thread::sleep(Duration::from_millis(10));
    };
    let forged = changelog::digests::DigestAnswer {
        gen,
        block_bytes: BLOCK as u32,
        device_bytes: size,
        blocks: None,
        digests: vec![[0; 32]; (size / BLOCK) as usize],
    }
    .seal(&changelog::Key::from_bytes([9; 32]), "vol0")
    .unwrap();
    changelog::TargetStore::put_blob(
        &*store,
        &fixture.volume,
        &changelog::digests::answer_name(gen),
        &forged,
    )
    .unwrap();
    let err = shipper
        .join()
        .unwrap()
        .expect_err("a forged answer must stop the volume");
    let msg = err.to_string();
    assert!(
        matches!(err, shipper::ShipperError::Critical { .. }) && msg.contains("verification"),
        "{msg}"
    );
    let status = shipper::Status::read(&fixture.path("status.json")).unwrap();
    assert_eq!(status.health(), shipper::Health::Critical);
    // The producer never got digests: nothing was compared or skipped.
    let progress = RingControl::open(&fixture.path("ring")).unwrap().progress();
    assert!(progress.active && !progress.digests_ready && progress.done_bytes == 0);
}

/// The first `shipper run --drain` of a new protection (without `--no-initial-sync`)
/// asks for the initial replication, which needs the recovery side's digests and so
/// cannot finish within the drain: it ships what the ring holds, then exits 1 naming
/// the initial replication and the flag, rather than a puzzling "a resync is under way".
#[test]
fn a_first_drain_names_the_initial_replication_it_cannot_finish() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(1 << 20);
    let mut model = Model::new(size);
    drive(&mut capture, &mut model, Workload::new(7, size).take(20));
    let drain = || {
        let out = shipper_command(&fixture).arg("--drain").output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, text) = drain();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("initial replication") && text.contains("--no-initial-sync"),
        "{text}"
    );
    assert!(!fixture.store_segments().is_empty(), "the ring was shipped");
    // Once segments are staged the protection is no longer new: the next drain still
    // fails (the resync has not run) and says so in general terms.
    let (status, text) = drain();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("a resync is still under way"), "{text}");
}

/// While the store fails the digest exchange, the status says so in its state line
/// (not only the log); once it answers, the resync goes on and the replica converges.
#[test]
fn a_failing_digest_exchange_shows_in_the_status_and_recovers() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let initial = some_data(21, size);
    std::fs::write(fixture.path("backing"), &initial).unwrap();
    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::with_image(initial);
    let follower = fixture.follow("replica");
    // The store's small objects (the digest exchange) fail while `down` is set: a
    // store that is unreachable, or a receiver refusing this host.
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let store = {
        let down = down.clone();
        std::sync::Arc::new(HookedStore::new(
            changelog::LocalDirStore::new(fixture.path("store")),
            move |call| match call {
                StoreCall::Blob if down.load(std::sync::atomic::Ordering::Acquire) => {
                    Err(changelog::Error::io(
                        "the test's store",
                        std::io::Error::other("refused: blobs are down"),
                    ))
                }
                _ => Ok(()),
            },
        ))
    };
    let mut config = fixture.shipper_config();
    config.initial_sync = true;
    config.status_path = Some(fixture.path("status.json"));
    let control = std::sync::Arc::new(shipper::Control::default());
    let shipper = {
        let (store, control) = (store.clone(), control.clone());
        std::thread::spawn(move || shipper::run(&config, store, control))
    };
    let ring = RingControl::open(&fixture.path("ring")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let failing = loop {
        capture.tick().unwrap();
        let status = shipper::Status::read(&fixture.path("status.json")).ok();
        if let Some(s) = status.filter(|s| s.resync_store_error.is_some()) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the failing exchange never showed"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let state = failing.state();
    assert!(
        state.contains("digest resync")
            && state.contains("the store fails")
            && state.contains("blobs are down"),
        "{state}"
    );
    assert!(!ring.progress().digests_ready);
    down.store(false, std::sync::atomic::Ordering::Release);
    run_until_resynced(&fixture, &mut capture, &mut model, None);
    control.drain();
    shipper.join().unwrap().expect("shipper");
    follower.finish();
    assert_eq!(
        shipper::Status::read(&fixture.path("status.json"))
            .unwrap()
            .resync_store_error,
        None
    );
    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
        "replica differs from the source after the resync"
    );
}
