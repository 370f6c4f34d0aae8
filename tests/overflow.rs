//! A producer faster than the consumer overflows the ring: every write that did not fit
//! is in the dirty bitmap, and the shipper's status says the volume is degraded (I7).

use blkfilter::capture::Captured;
use blkfilter::ring::Consumer;
use blkfilter::workload::{WorkOp, Workload};
use e2e::*;
use std::sync::Arc;
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
            Ok(Captured::MarkedDirty) => lost.extend(range),
            Err(blkfilter::capture::CaptureError::MarkNotRecorded { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        recorded > 0 && !lost.is_empty(),
        "the workload must overflow the ring ({recorded} recorded)"
    );

    // The shipper sees the overflow and reports it.
    let mut config = fixture.shipper_config();
    config.status_path = Some(fixture.path("status.json"));
    let control = Arc::new(shipper::Control::default());
    let runner = {
        let (control, store) = (control.clone(), fixture.store());
        std::thread::spawn(move || shipper::run(&config, store, control))
    };
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
