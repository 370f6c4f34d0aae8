//! A producer faster than the consumer overflows the ring: every write that did not fit
//! is in the dirty bitmap, and the shipper's status says the volume is degraded (I7).

use blkfilter::capture::Captured;
use blkfilter::ring::Consumer;
use blkfilter::workload::{WorkOp, Workload};
use e2e::*;
use std::time::Duration;

#[test]
fn overflow_marks_dirty_regions_and_status_says_degraded() {
    let size = 16 << 20;
    let fixture = Fixture::new(size);
    // A 256 KiB ring with no consumer running: it fills quickly.
    let mut capture = fixture.capture(256 << 10);
    let mut lost: Vec<(u64, u64)> = Vec::new();
    let mut recorded = 0;
    for op in Workload::new(3, size).take(300) {
        let range = match &op {
            WorkOp::Write { offset, data } | WorkOp::Fua { offset, data } => {
                Some((*offset, data.len() as u64))
            }
            WorkOp::Discard { offset, len } | WorkOp::WriteZeroes { offset, len } => {
                Some((*offset, *len))
            }
            _ => None,
        };
        match capture.handle(op.as_request()) {
            Ok(Captured::Recorded(_)) => recorded += 1,
            Ok(Captured::MarkedDirty(_)) => lost.extend(range),
            Err(blkfilter::capture::CaptureError::MarkNotRecorded { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        recorded > 0 && !lost.is_empty(),
        "the workload must overflow the ring ({recorded} recorded)"
    );

    // The shipper sees the overflow and reports it.
    let (control, runner) = fixture.spawn_shipper(fixture.shipper_config());
    std::thread::sleep(Duration::from_millis(400));
    control.stop();
    runner.join().unwrap().expect("shipper");
    let status = shipper::Status::read(&fixture.path("status.json")).unwrap();
    assert!(status.ring_overflow);
    assert_eq!(status.health(), shipper::Health::Warning);
    assert!(status.state().contains("degraded"), "{}", status.state());

    // Every lost write lies inside the dirty extents.
    let consumer = Consumer::open(&fixture.path("ring")).unwrap();
    assert!(consumer.overflowed());
    let dirty = consumer.take_dirty();
    for (offset, len) in lost {
        let covered = dirty
            .iter()
            .any(|&(d, dl)| d <= offset && offset + len <= d + dl);
        assert!(
            covered,
            "lost write {offset}+{len} is not in the dirty bitmap {dirty:?}"
        );
    }
    assert!(
        !consumer.overflowed(),
        "taking the bitmap clears the overflow flag"
    );
    assert!(consumer.take_dirty().is_empty());
}

#[test]
fn segments_sealed_after_overflow_are_not_crash_points() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(64 << 10);
    for op in Workload::new(8, size).take(100) {
        let _ = capture.handle(op.as_request());
    }
    fixture.ship_drained();
    let segments = fixture.store_segments();
    assert!(!segments.is_empty());
    for path in segments {
        let info = changelog::read_info(&std::fs::read(&path).unwrap(), "t").unwrap();
        assert_eq!(
            info.header.flags & changelog::flags::CRASH_POINT,
            0,
            "{} claims a crash point",
            path.display()
        );
    }
}

/// Overflow, then resync: once the ring has room the producer re-records every lost
/// region; the replica converges to the source, no segment in between claims a crash
/// point, and every segment that does equals the model of the source at its end
/// (lost writes included: they kept their seq).
#[test]
fn resync_after_overflow_converges_and_restores_crash_points() {
    resync_after_overflow(None);
}

/// The same with a recovery side answering digests: the dirty regions are compared
/// with the replica instead of re-recorded whole.
#[test]
fn resync_by_comparison_after_overflow_converges_and_restores_crash_points() {
    resync_after_overflow(Some(Duration::from_secs(60)));
}

fn resync_after_overflow(compare: Option<Duration>) {
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(256 << 10);
    capture.set_resync_compare(compare);
    let follower = compare.map(|_| fixture.follow("followed"));
    let mut model = Model::new(size);
    let mut workload = Workload::new(21, size).with_max_io(64 << 10);
    let mut lost = 0;
    let mut step =
        |capture: &mut blkfilter::capture::Capture, model: &mut Model, op: WorkOp| match capture
            .handle(op.as_request())
        {
            Ok(Captured::Recorded(seq)) => model.record(seq, op),
            Ok(Captured::MarkedDirty(seq)) => {
                lost += 1;
                model.record(seq, op)
            }
            Err(blkfilter::capture::CaptureError::MarkNotRecorded { .. }) => {}
            Err(e) => panic!("{e}"),
        };
    // No consumer yet: the ring overflows.
    for op in workload.by_ref().take(200) {
        step(&mut capture, &mut model, op);
    }
    assert!(capture.needs_resync());

    let (control, runner) = fixture.spawn_shipper(fixture.shipper_config());
    // Writes go on while the shipper catches up; resync passes run between them.
    for op in workload.by_ref().take(200) {
        step(&mut capture, &mut model, op);
        std::thread::sleep(Duration::from_micros(300));
    }
    // A deadline, not a count of ticks: the compare variant waits for the follower to
    // apply and answer, which a loaded machine can make slow.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if !capture.needs_resync()
            && !shipper::Status::read(&fixture.path("status.json")).is_ok_and(|s| s.ring_resync)
        {
            break;
        }
        step(&mut capture, &mut model, WorkOp::Flush);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!capture.needs_resync(), "the resync never completed");
    assert!(lost > 0);
    control.drain();
    runner.join().unwrap().expect("shipper");
    if let Some(follower) = follower {
        follower.finish();
        assert!(std::fs::read(fixture.path("followed")).unwrap() == model.final_image());
        // Only blocks that differed were re-sent: the pass's figures are in the ring.
        let progress = blkfilter::ring::RingControl::open(&fixture.path("ring"))
            .unwrap()
            .progress();
        println!("last digest pass: {progress:?}");
        assert!(
            progress.gen > 0 && progress.total_bytes < size,
            "no digest pass over the dirty regions only ran"
        );
    }

    let seen = apply_and_check_crash_points(&fixture, &model, "replica");
    let (points, not_points, last_is_point) = (seen.crash_points, seen.others, seen.last_is_point);
    assert!(
        not_points > 0 && points > 0,
        "{points} crash points, {not_points} others"
    );
    assert!(last_is_point, "consistency was not regained");
    assert!(
        std::fs::read(fixture.path("replica")).unwrap()
            == std::fs::read(fixture.path("backing")).unwrap()
    );
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

/// A shipper that starts after a resync pass has ended but before its records are read
/// (the ring's flags are already down) must still claim no crash point inside the
/// resync data: it finds the unread resync-done MARK.
#[test]
fn shipper_started_after_a_finished_resync_pass_still_withholds_crash_points() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(1 << 20);
    let mut model = Model::new(size);
    let mut workload = Workload::new(33, size).with_max_io(16 << 10);
    fill_until_writes_are_lost(&mut capture, &mut model, &mut workload);
    // Lose more writes, so the resync pass has several pieces to re-record.
    for op in workload
        .by_ref()
        .filter(|op| matches!(op, WorkOp::Write { .. }))
        .take(3)
    {
        record(&mut capture, &mut model, op);
    }
    // Ship what was recorded; the ring is empty afterwards, OVERFLOW still up.
    fixture.ship_drained();
    // The next request runs the resync pass: resync data, then the MARK; flags down.
    record(&mut capture, &mut model, WorkOp::Flush);
    assert!(!capture.needs_resync());
    // A shipper with small segments cuts inside the resync data.
    let mut config = fixture.shipper_config();
    config.max_segment_bytes = 16 << 10;
    let control = std::sync::Arc::new(shipper::Control::default());
    control.drain();
    shipper::run(&config, fixture.store(), control).unwrap();

    let last_is_point = apply_and_check_crash_points(&fixture, &model, "replica").last_is_point;
    assert!(last_is_point);
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

/// blkfilter dies in a resync pass after taking the dirty regions from the bitmap and
/// before re-recording them: the next producer must not forget them.
#[test]
fn a_resync_pass_cut_short_by_a_crash_loses_nothing() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(1 << 20);
    let mut model = Model::new(size);
    let mut workload = Workload::new(44, size).with_max_io(64 << 10);
    fill_until_writes_are_lost(&mut capture, &mut model, &mut workload);
    fixture.ship_drained();
    // The pass takes the bitmap, then the process dies.
    drop(capture);
    let producer = blkfilter::ring::Producer::create(
        &fixture.path("ring"),
        &blkfilter::ring::RingGeometry::new(1 << 20, size),
    )
    .unwrap();
    assert!(!producer.begin_resync().is_empty());
    drop(producer);

    let mut capture = fixture.capture(1 << 20);
    assert!(
        capture.needs_resync(),
        "the regions of the dead pass were forgotten"
    );
    for _ in 0..100 {
        capture.tick().unwrap();
        fixture.ship_drained();
        if !capture.needs_resync() {
            break;
        }
    }
    assert!(!capture.needs_resync(), "the resync never completed");
    let seen = apply_and_check_crash_points(&fixture, &model, "replica");
    assert!(seen.last_is_point, "{seen:?}");
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

/// `shipper run --drain` promises that the store holds every write. With writes
/// waiting in the dirty bitmap for a resync it ships what the ring holds, then exits 1
/// saying why (a planned failover must not count on it); once the resync pass has
/// re-recorded them, a drain succeeds and the replica equals the source.
#[test]
fn a_drain_with_writes_awaiting_a_resync_fails_naming_why() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(1 << 20);
    let mut model = Model::new(size);
    let mut workload = Workload::new(45, size).with_max_io(64 << 10);
    fill_until_writes_are_lost(&mut capture, &mut model, &mut workload);
    let drain = || {
        let out = shipper_command(&fixture)
            .args(["--no-initial-sync", "--drain"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status, text)
    };
    let (status, text) = drain();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("drained, but the ring overflowed") && text.contains("fail over"),
        "{text}"
    );
    assert!(
        !fixture.store_segments().is_empty(),
        "what the ring held was shipped"
    );
    // The next request runs the resync pass; then the drain is complete.
    record(&mut capture, &mut model, WorkOp::Flush);
    assert!(!capture.needs_resync());
    let (status, text) = drain();
    assert!(status.success(), "{text}");
    assert!(apply_and_check_crash_points(&fixture, &model, "replica").last_is_point);
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

/// Runs `op` through `capture` and records it in `model`, lost to the bitmap or not.
fn record(capture: &mut blkfilter::capture::Capture, model: &mut Model, op: WorkOp) {
    match capture.handle(op.as_request()).unwrap() {
        Captured::Recorded(seq) | Captured::MarkedDirty(seq) => model.record(seq, op),
    }
}

/// Runs `workload` (without MARKs, which a full ring refuses) until writes are lost.
fn fill_until_writes_are_lost(
    capture: &mut blkfilter::capture::Capture,
    model: &mut Model,
    workload: &mut Workload,
) {
    while !capture.needs_resync() {
        let op = workload.next().unwrap();
        if !matches!(op, WorkOp::Mark { .. }) {
            record(capture, model, op);
        }
    }
}
