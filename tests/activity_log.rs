//! A power cut on the host, simulated: the shared-memory ring (and whatever records it
//! held) is lost, the backing, the activity log and the shipper's staging survive. On
//! restart only the extents the activity log lists are resynced, seqs continue above
//! the lost ones, no recovery point is claimed until the resync ends, and the replica
//! converges to the source.

use blkfilter::capture::Capture;
use blkfilter::ring::{Producer, RingGeometry};
use blkfilter::workload::{WorkOp, Workload};
use e2e::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Moves a workload generated over a small volume to `base` on the real one.
fn shifted(op: WorkOp, base: u64) -> WorkOp {
    match op {
        WorkOp::Write { offset, data } => WorkOp::Write {
            offset: offset + base,
            data,
        },
        WorkOp::Fua { offset, data } => WorkOp::Fua {
            offset: offset + base,
            data,
        },
        WorkOp::Discard { offset, len } => WorkOp::Discard {
            offset: offset + base,
            len,
        },
        WorkOp::WriteZeroes { offset, len } => WorkOp::WriteZeroes {
            offset: offset + base,
            len,
        },
        other => other,
    }
}

fn open(fixture: &Fixture) -> (Capture, blkfilter::activity_log::Recovered) {
    let ring = Producer::create(
        &fixture.path("ring"),
        &RingGeometry::new(64 * MIB, fixture.size),
    )
    .unwrap();
    Capture::open_with_activity_log(
        &fixture.path("backing"),
        ring,
        false,
        &fixture.path("backing.al"),
    )
    .unwrap()
}

/// What [`power_cut`] saw.
struct AfterCut {
    /// Bytes of the extents the activity log recovered hot.
    hot_bytes: u64,
    /// Bytes the resync re-recorded.
    resent_bytes: u64,
}

/// Writes all over a 64 MiB disk (shipped, the extents cool), then into extents 5 and 6
/// (shipped, but still hot), then a few small writes there that are never shipped, and
/// cuts the power. After the restart the resync runs with `compare` (and a recovery
/// side answering digests if `follower`) while writes go on, then everything is shipped.
/// Checks the activity log's extents, seq continuity, every crash point of a replay
/// from scratch against the model, and convergence.
fn power_cut(compare: Option<Duration>, follower: bool) -> AfterCut {
    let size = 64 * MIB; // 16 extents of 4 MiB
    let fixture = Fixture::new(size);
    let mut model = Model::new(size);
    let (mut capture, recovered) = open(&fixture);
    assert_eq!(recovered.hot, 0);

    // Phase A: writes all over the disk, all shipped; the extents cool.
    drive(&mut capture, &mut model, Workload::new(1, size).take(200));
    fixture.ship_drained();
    capture.tick().unwrap();
    // Phase B: writes into extents 5 and 6, shipped.
    let in_5_and_6 = |seed, max_io| {
        Workload::new(seed, 8 * MIB)
            .with_max_io(max_io)
            .map(|op| shifted(op, 20 * MIB))
    };
    drive(&mut capture, &mut model, in_5_and_6(2, 1 << 20).take(150));
    fixture.ship_drained();
    // Phase C: a few small writes there, never shipped.
    drive(&mut capture, &mut model, in_5_and_6(3, 16 << 10).take(6));
    let lost_seq = *model.seqs().last().unwrap();

    // Power cut: the ring is gone with the memory; the backing, the log and staging stay.
    drop(capture);
    std::fs::remove_file(fixture.path("ring")).unwrap();
    let (mut capture, recovered) = open(&fixture);
    capture.set_resync_compare(compare);
    let hot_bytes: u64 = recovered.extents.iter().map(|e| e.1).sum();
    println!(
        "activity log after the power cut: {} of {} extents hot ({hot_bytes} bytes)",
        recovered.hot, recovered.total
    );
    assert_eq!(recovered.total, 16);
    assert!(
        (1..=2).contains(&recovered.hot),
        "only extents phase C wrote"
    );
    assert!(recovered
        .extents
        .iter()
        .all(|&(offset, len)| offset >= 20 * MIB && offset + len <= 28 * MIB));

    // The resync, while writes go on; new records continue above the lost seqs.
    assert!(capture.needs_resync());
    let follower = follower.then(|| fixture.follow("replica"));
    let shipper = follower
        .is_some()
        .then(|| fixture.spawn_shipper(fixture.shipper_config()));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut workload = Workload::new(4, size);
    drive(&mut capture, &mut model, workload.by_ref().take(50));
    while capture.tick().unwrap() || capture.needs_resync() {
        assert!(
            std::time::Instant::now() < deadline,
            "the resync did not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drive(&mut capture, &mut model, workload.take(20));
    assert!(model.seqs().last().unwrap() > &lost_seq);
    match shipper {
        Some((control, handle)) => {
            control.drain();
            handle.join().unwrap().expect("shipper");
        }
        None => drop(fixture.ship_drained()),
    }
    if let Some(follower) = follower {
        follower.finish();
        assert!(
            std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
            "the follower's replica did not converge"
        );
    }

    let seen = apply_and_check_crash_points(&fixture, &model, "check");
    assert!(seen.last_is_point, "{seen:?}");
    assert!(
        std::fs::read(fixture.path("check")).unwrap() == model.final_image(),
        "the replica did not converge after the power cut"
    );
    // Resync data: WRITE records after the cut that no request made.
    let resent_bytes: u64 = fixture
        .store_segments()
        .iter()
        .map(|p| changelog::open(std::fs::read(p).unwrap(), "s", &fixture.key).unwrap())
        .flat_map(|s| {
            s.records()
                .filter(|r| r.seq > lost_seq && r.op == changelog::Op::Write)
                .map(|r| (r.seq, u64::from(r.len)))
                .collect::<Vec<_>>()
        })
        .filter(|(seq, _)| !model.seqs().contains(seq))
        .map(|(_, len)| len)
        .sum();
    AfterCut {
        hot_bytes,
        resent_bytes,
    }
}

#[test]
fn power_cut_resyncs_only_the_activity_log_extents() {
    let cut = power_cut(None, false);
    assert_eq!(
        cut.resent_bytes, cut.hot_bytes,
        "exactly the hot extents were re-sent"
    );
}

#[test]
fn power_cut_compares_the_activity_log_extents_with_the_replica() {
    let cut = power_cut(Some(Duration::from_secs(60)), true);
    println!(
        "re-sent {} of {} bytes in hot extents",
        cut.resent_bytes, cut.hot_bytes
    );
    // Phase C wrote 6 requests of at most 16 KiB: at most 2 blocks of 64 KiB each,
    // plus blocks the writes after the cut touched while the pass ran.
    assert!(cut.resent_bytes > 0, "phase C's blocks differ");
    assert!(
        cut.resent_bytes <= cut.hot_bytes / 4,
        "only blocks that differ from the replica are re-sent"
    );
}

#[test]
fn power_cut_without_a_recovery_side_re_records_after_the_compare_wait() {
    let cut = power_cut(Some(Duration::from_millis(300)), false);
    assert_eq!(cut.resent_bytes, cut.hot_bytes);
}

/// The activity log cools an extent once the shipper's `released_seq` passed its
/// records, so that seq must never run ahead of what is durably staged (I4): every
/// value seen while the shipper runs is covered by a segment already in staging or in
/// the store.
#[test]
fn released_seq_never_runs_ahead_of_staging() {
    let size = 16 * MIB;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(64 * MIB);
    let mut model = Model::new(size);
    let (control, shipper) = fixture.spawn_shipper(fixture.shipper_config());
    let ring = blkfilter::ring::RingControl::open(&fixture.path("ring")).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let covered = |dir: &std::path::Path| -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| changelog::open(b, "s", &fixture.key).ok())
            .map(|s| s.header.last_seq)
            .max()
            .unwrap_or(0)
    };
    let checked = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let (mut last, mut checked) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let released = ring.released_seq();
                if released != last {
                    // Staging first: a segment leaves it only after it is in the store.
                    let staged = covered(&fixture.path("staging").join("vol0"));
                    let stored = covered(&fixture.path("store").join("vol0"));
                    assert!(
                        staged.max(stored) >= released,
                        "released_seq {released} is ahead of staging ({staged}) and the store ({stored})"
                    );
                    (last, checked) = (released, checked + 1);
                }
            }
            checked
        });
        for _ in 0..40 {
            drive(&mut capture, &mut model, Workload::new(9, size).take(20));
            std::thread::sleep(Duration::from_millis(15));
        }
        control.drain();
        shipper.join().unwrap().expect("shipper");
        stop.store(true, std::sync::atomic::Ordering::Release);
        watcher.join().unwrap()
    });
    assert!(checked > 10, "only {checked} released seqs were seen");
}
