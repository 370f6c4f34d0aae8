//! The staged-backlog limit (DESIGN "Degraded modes and resync"): with the target store
//! down, the backlog in staging outgrows 50% of a 4 MiB disk; the shipper drops it,
//! continues the chain in a new epoch and asks for a whole-disk digest resync. Once the
//! store is back the replica converges to the source, no crash point is claimed from
//! the drop until the resync's done MARK (I7), the recovery side accepts the epoch
//! change, and its recovery points on both sides of it are right.

use blkfilter::ring::RingControl;
use blkfilter::workload::{Rng, WorkOp, Workload};
use changelog::flags;
use changelog::record::MARK_RESYNC_DONE;
use e2e::*;
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;
const BLOCK: u64 = 64 << 10;

/// Incompressible 64 KiB writes at random block offsets: they stage at full size.
fn random_writes(rng: &mut Rng, count: usize) -> Vec<WorkOp> {
    (0..count)
        .map(|_| {
            let mut data = vec![0u8; BLOCK as usize];
            for chunk in data.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            WorkOp::Write {
                offset: rng.below(SIZE / BLOCK) * BLOCK,
                data,
            }
        })
        .collect()
}

fn status(fixture: &Fixture) -> Option<shipper::Status> {
    shipper::Status::read(&fixture.path("status.json")).ok()
}

/// Waits (up to 30 s) for a status that satisfies `pred`, calling `between` meanwhile.
fn wait_for(
    fixture: &Fixture,
    what: &str,
    mut between: impl FnMut(),
    pred: impl Fn(&shipper::Status) -> bool,
) -> shipper::Status {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = status(fixture).filter(|s| pred(s)) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        between();
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn staged_backlog_over_half_the_disk_is_dropped_and_resynced() {
    let fixture = Fixture::new(SIZE);
    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::new(SIZE);
    let mut config = fixture.shipper_config();
    config.backlog_resync_percent = shipper::backlog::DEFAULT_PERCENT;
    assert_eq!(config.backlog_resync_percent, 50);
    let (control, shipper) = fixture.spawn_shipper(config.clone());
    // Small I/Os, so that what is written after the drop stays well below the limit
    // (one drop in this test).
    let mut workload = Workload::new(31, SIZE).with_max_io(16 << 10);
    let mut rng = Rng::new(32);

    // Replicating normally: everything written so far reaches the store.
    drive(&mut capture, &mut model, workload.by_ref().take(100));
    let end = *model.seqs().last().unwrap() + 1;
    wait_for(
        &fixture,
        "the first writes to be uploaded",
        || {},
        |s| s.newest_uploaded_seq_end >= Some(end) && s.segments_pending_upload == 0,
    );

    // The store goes away (its volume directory becomes a file); writes go on and the
    // staged backlog grows until it passes half the disk.
    let volume_dir = fixture.path("store").join("vol0");
    swap_store_volume(&volume_dir, &fixture.path("store-away"));
    let mut written_in_outage = 0u64;
    let dropped = wait_for(
        &fixture,
        "the staged backlog to be dropped",
        || {
            drive(&mut capture, &mut model, random_writes(&mut rng, 1));
            written_in_outage += BLOCK;
            std::thread::sleep(Duration::from_millis(20));
        },
        |s| s.backlog_dropped.is_some(),
    );
    let drop = dropped.backlog_dropped.clone().unwrap();
    println!("{drop:?} after {written_in_outage} bytes written in the outage");
    assert!(
        drop.bytes > SIZE / 2 && drop.segments > 0 && drop.limit_percent == 50,
        "{drop:?}"
    );
    assert_eq!(drop.device_bytes, SIZE);
    assert!(dropped.backlog_resync);
    assert_eq!(dropped.health(), shipper::Health::Warning);
    assert!(
        dropped.state().starts_with(&format!(
            "degraded: staged backlog exceeded 50% of the disk; dropped {} segments",
            drop.segments
        )) && dropped.state().contains("resyncing by digest"),
        "{}",
        dropped.state()
    );
    assert!(
        dropped.staged_backlog_bytes <= SIZE / 2,
        "the backlog stopped growing: {}",
        dropped.staged_backlog_bytes
    );
    let ring = RingControl::open(&fixture.path("ring")).unwrap();
    assert!(ring.progress().pending(), "no digest resync was asked for");
    let staging = fixture.path("staging").join("vol0");
    assert!(staging.join(shipper::backlog::OWED_FILE).exists());

    // A restart in the outage goes on from the rewound chain, still owing the resync.
    control.stop();
    shipper.join().unwrap().expect("shipper stopped cleanly");
    std::fs::remove_file(fixture.path("status.json")).unwrap();
    let (control, shipper) = fixture.spawn_shipper(config);
    drive(&mut capture, &mut model, random_writes(&mut rng, 4));
    drive(&mut capture, &mut model, workload.by_ref().take(30));
    let restarted = wait_for(
        &fixture,
        "the restarted shipper's status",
        || {
            capture.tick().unwrap();
        },
        |s| s.records_captured > 0,
    );
    assert!(
        restarted.backlog_resync && restarted.state().contains("staged backlog exceeded"),
        "{}",
        restarted.state()
    );

    // The store comes back with what it held; the recovery side follows and answers
    // the digest request; the producer compares and re-sends what the replica lacks.
    swap_store_volume(&volume_dir, &fixture.path("store-away"));
    let follower = fixture.follow("replica");
    let mut states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while capture.tick().expect("digest resync") {
        drive(&mut capture, &mut model, workload.by_ref().take(5));
        if let Some(s) = status(&fixture) {
            states.push(s.state());
        }
        assert!(Instant::now() < deadline, "the resync did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        states.iter().any(|s| s.contains("staged backlog exceeded")),
        "status never said why it resyncs: {states:?}"
    );
    drive(&mut capture, &mut model, workload.take(50));
    let settled = wait_for(
        &fixture,
        "the resync after the drop to settle",
        || {},
        |s| !s.backlog_resync,
    );
    assert!(settled.backlog_dropped.is_some(), "the event stays visible");
    control.drain();
    shipper.join().unwrap().expect("shipper");
    follower.finish();
    assert!(!staging.join(shipper::backlog::OWED_FILE).exists());
    let after = status(&fixture).unwrap();
    assert_eq!(
        after.health(),
        shipper::Health::Healthy,
        "{}",
        after.state()
    );
    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
        "the replica did not converge to the source"
    );

    // The store: the dropped records never reached it; the chain changes epoch once,
    // announced and linked; from there until the resync's done MARK no segment claims
    // a crash point.
    let stored: std::collections::BTreeSet<u64> = store_seqs(&fixture).into_iter().collect();
    let missing = model.seqs().iter().filter(|s| !stored.contains(s)).count();
    assert!(missing > 0, "no record was dropped");
    let segments: Vec<changelog::OpenedSegment> = fixture
        .store_segments()
        .iter()
        .map(|p| changelog::open(std::fs::read(p).unwrap(), "t", &fixture.key).unwrap())
        .collect();
    let switch: Vec<usize> = (0..segments.len())
        .filter(|&i| segments[i].header.flags & flags::NEW_EPOCH != 0)
        .collect();
    assert_eq!(switch.len(), 1, "one epoch change");
    let switch = switch[0];
    assert_eq!(segments[switch].header.index, drop.continue_index);
    assert_eq!(segments[switch].header.epoch, drop.epoch);
    assert_ne!(
        segments[switch].header.epoch,
        segments[switch - 1].header.epoch
    );
    assert_eq!(
        segments[switch].header.prev_digest,
        segments[switch - 1].digest
    );
    let done = (switch..segments.len())
        .find(|&i| {
            segments[i]
                .records()
                .any(|r| r.op == changelog::Op::Mark && r.flags & MARK_RESYNC_DONE != 0)
        })
        .expect("the resync's done MARK is in the store");
    for segment in &segments[switch..done] {
        assert_eq!(
            segment.header.flags & flags::CRASH_POINT,
            0,
            "segment {} claims a crash point between the drop and the resync's end",
            segment.header.index
        );
    }
    assert!(segments[done..]
        .iter()
        .all(|s| s.header.epoch == drop.epoch));

    // Replayed from scratch, every claimed crash point equals the source at its seq.
    let seen = apply_and_check_crash_points(&fixture, &model, "check");
    assert!(
        seen.others >= done - switch && seen.crash_points > switch && seen.last_is_point,
        "{seen:?}"
    );

    // Recovery points across the epoch change: the last one before the drop is still
    // a point (its undo journals chain through the new epoch), and rolling back to it
    // undoes the continuation.
    let paths = fixture.replica_paths("check");
    let catalog = ublk_target::catalog(&paths).unwrap();
    let before = *catalog
        .points
        .iter()
        .rfind(|p| p.index < drop.continue_index)
        .expect("a point before the drop");
    assert!(catalog.points.iter().any(|p| p.index > drop.continue_index));
    let mut replay = model.replayer();
    replay.advance_to(before.last_seq + 1);
    let report = ublk_target::rollback_to(&paths, before.index).unwrap();
    assert!(report.undone.contains(&drop.continue_index), "{report:?}");
    assert!(
        std::fs::read(fixture.path("check")).unwrap() == replay.image,
        "rollback across the epoch change differs from the model at seq {}",
        before.last_seq + 1
    );
    let state = ublk_target::ApplyState::load(&paths.state, Some(&fixture.volume))
        .unwrap()
        .unwrap();
    assert_eq!(state.cursor.next_index, before.index + 1);
    assert_eq!(
        state.cursor.epoch,
        Some(segments[switch - 1].header.epoch),
        "the position before the continuation is in the old epoch"
    );
}
