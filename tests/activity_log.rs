//! A power cut on the host, simulated: the shared-memory ring (and whatever records it
//! held) is lost, the backing, the activity log and the shipper's staging survive. On
//! restart only the extents the activity log lists are resynced, seqs continue above
//! the lost ones, no recovery point is claimed until the resync ends, and the replica
//! converges to the source.

use blkfilter::capture::Capture;
use blkfilter::ring::{Producer, RingGeometry};
use blkfilter::workload::{WorkOp, Workload};
use e2e::*;

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

#[test]
fn power_cut_resyncs_only_the_activity_log_extents() {
    let size = 64 * MIB; // 16 extents of 4 MiB
    let fixture = Fixture::new(size);
    let mut model = Model::new(size);
    let (mut capture, recovered) = open(&fixture);
    assert_eq!(recovered.hot, 0);

    // Phase A: writes all over the disk, all shipped; the extents cool.
    drive(&mut capture, &mut model, Workload::new(1, size).take(200));
    fixture.ship_drained();
    capture.tick().unwrap();
    // Phase B: writes into extents 5 and 6 only, never shipped.
    let phase_b = Workload::new(2, 8 * MIB)
        .take(150)
        .map(|op| shifted(op, 20 * MIB));
    drive(&mut capture, &mut model, phase_b);
    let lost_seq = *model.seqs().last().unwrap();

    // Power cut: the ring is gone with the memory; the backing, the log and staging stay.
    drop(capture);
    std::fs::remove_file(fixture.path("ring")).unwrap();
    let (mut capture, recovered) = open(&fixture);
    println!(
        "activity log after the power cut: {} of {} extents hot",
        recovered.hot, recovered.total
    );
    assert_eq!(recovered.total, 16);
    assert_eq!(recovered.hot, 2, "only the extents phase B wrote");
    assert_eq!(recovered.extents, vec![(20 * MIB, 8 * MIB)]);

    // The resync re-records those extents; new records continue above the lost seqs.
    assert!(capture.needs_resync());
    drive(&mut capture, &mut model, Workload::new(3, size).take(50));
    assert!(!capture.needs_resync());
    assert!(model.seqs().last().unwrap() > &lost_seq);
    fixture.ship_drained();

    let seen = apply_and_check_crash_points(&fixture, &model, "replica");
    assert!(seen.last_is_point, "{seen:?}");
    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
        "the replica did not converge after the power cut"
    );
    // Resync data re-sent: the two extents, not the disk.
    let resync_bytes: u64 = fixture
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
    assert_eq!(
        resync_bytes,
        8 * MIB,
        "exactly the hot extents were re-sent"
    );
}
