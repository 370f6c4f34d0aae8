//! Consistency groups at the ring level: producers of several volumes share one clock
//! while cuts are made concurrently, and every ring must hold each cut's MARK exactly
//! where the cut's seq falls (the contract of `blkfilter::ring::group`).

use blkfilter::capture::Recorder;
use blkfilter::ring::{Consumer, Cut, GroupClock, Producer, RingGeometry};
use changelog::record::MARK_GROUP_CUT;
use changelog::{GroupCutLabel, Op};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const DEVICE: u64 = 1 << 20;
/// Cuts made while the volumes write.
const CUTS: usize = 300;
/// Records per volume at most, so the ring never fills (a full ring loses MARKs).
const MAX_RECORDS: u64 = 200_000;

/// What one ring holds, in ring order: (seq, the cuts if the record is a group-cut
/// MARK).
fn read_ring(path: &Path) -> Vec<(u64, Option<GroupCutLabel>)> {
    let consumer = Consumer::open(path).unwrap();
    let mut pos = consumer.released();
    let mut out = Vec::new();
    while let Some((rec, next)) = consumer.peek(pos).unwrap() {
        let cut = (rec.op == Op::Mark && rec.flags & MARK_GROUP_CUT != 0)
            .then(|| GroupCutLabel::parse(rec.data).expect("a group-cut label"));
        out.push((rec.seq, cut));
        pos = next;
    }
    out
}

fn producer(dir: &Path, name: &str, clock: &Path) -> Producer {
    let mut ring = Producer::create(&dir.join(name), &RingGeometry::new(16 << 20, DEVICE)).unwrap();
    ring.join_group(GroupClock::open_or_create(clock).unwrap());
    ring
}

#[test]
fn every_ring_holds_each_cut_exactly_at_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let clock_path = dir.path().join("g.clock");
    let names = ["a.ring", "b.ring", "c.ring"];
    // Every volume joins before the first cut, so each owes every cut.
    let recorders: Vec<Recorder> = names
        .iter()
        .map(|name| Recorder::new(producer(dir.path(), name, &clock_path)))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let cuts = Arc::new(Mutex::new(Vec::<Cut>::new()));
    let coordinator = {
        let (done, cuts) = (done.clone(), cuts.clone());
        let clock = GroupClock::open_or_create(&clock_path).unwrap();
        std::thread::spawn(move || {
            for _ in 0..CUTS {
                cuts.lock().unwrap().push(clock.cut().unwrap());
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            done.store(true, Ordering::Release);
        })
    };
    let writers: Vec<_> = recorders
        .into_iter()
        .enumerate()
        .map(|(i, mut recorder)| {
            let done = done.clone();
            std::thread::spawn(move || {
                // The third volume stays idle but for its housekeeping tick.
                let mut n = 0u64;
                while i != 2 && !done.load(Ordering::Acquire) && n < MAX_RECORDS {
                    recorder.record(Op::Write, (n % 2048) * 512, 8, &n.to_le_bytes(), 0);
                    n += 1;
                }
                recorder
            })
        })
        .collect();
    coordinator.join().unwrap();
    let mut recorders: Vec<Recorder> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    // The idle producers' tick records the cuts made after their last request.
    for recorder in &mut recorders {
        recorder.serve_group_cuts();
    }
    let cuts = cuts.lock().unwrap().clone();
    assert!(
        cuts.len() > 10,
        "the coordinator made only {} cuts",
        cuts.len()
    );
    for name in names {
        let ring = read_ring(&dir.path().join(name));
        let seqs: Vec<u64> = ring.iter().map(|r| r.0).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{name}: seqs not increasing"
        );
        // Every cut, in order, in exactly one MARK; each MARK between the records
        // below and above the seq of every cut it stands for.
        let mut next_cut = 1;
        for (at, label) in ring
            .iter()
            .enumerate()
            .filter_map(|(at, r)| Some((at, r.1?)))
        {
            assert_eq!(label.first, next_cut, "{name}: cuts skipped or repeated");
            next_cut = label.last + 1;
            let records = |range: &[(u64, Option<GroupCutLabel>)]| {
                range
                    .iter()
                    .filter(|r| r.1.is_none())
                    .map(|r| r.0)
                    .collect::<Vec<_>>()
            };
            let (before, after) = (records(&ring[..at]), records(&ring[at + 1..]));
            for cut in &cuts[label.first as usize - 1..label.last as usize] {
                assert!(
                    before.iter().all(|&s| s < cut.seq) && after.iter().all(|&s| s > cut.seq),
                    "{name}: cut {} (seq {}) is not between the records below and above it",
                    cut.number,
                    cut.seq
                );
            }
        }
        assert_eq!(
            next_cut,
            cuts.len() as u64 + 1,
            "{name}: cuts missing at the end"
        );
    }
}

#[test]
fn a_restarted_producer_keeps_the_cuts_it_owes_and_a_new_member_starts_now() {
    let dir = tempfile::tempdir().unwrap();
    let clock_path = dir.path().join("g.clock");
    let clock = GroupClock::open_or_create(&clock_path).unwrap();
    let mut a = Recorder::new(producer(dir.path(), "a.ring", &clock_path));
    a.record(Op::Flush, 0, 0, &[], 0);
    let first = clock.cut().unwrap();
    drop(a);
    // Cut while a's server is down: the restarted one records it first.
    let second = clock.cut().unwrap();
    let mut a = Recorder::new(producer(dir.path(), "a.ring", &clock_path));
    a.record(Op::Flush, 0, 0, &[], 0);
    let ring = read_ring(&dir.path().join("a.ring"));
    let cuts: Vec<(u64, u64)> = ring
        .iter()
        .filter_map(|r| r.1.map(|l| (l.first, l.last)))
        .collect();
    // Cut 1 came after a's last request, cut 2 while it was down: one MARK for both.
    assert_eq!(cuts, [(first.number, second.number)]);
    // Down through more cuts than the clock's word counts (2^16): one MARK, all of them.
    drop(a);
    for _ in 0..70_000 {
        clock.cut().unwrap();
    }
    let mut a = Recorder::new(producer(dir.path(), "a.ring", &clock_path));
    a.record(Op::Flush, 0, 0, &[], 0);
    let last = read_ring(&dir.path().join("a.ring"))
        .iter()
        .filter_map(|r| r.1)
        .next_back()
        .unwrap();
    assert_eq!((last.first, last.last), (3, 70_002));
    assert_eq!(last.clock, clock.id());
    // A volume joining now owes no earlier cut.
    let mut b = Recorder::new(producer(dir.path(), "b.ring", &clock_path));
    b.record(Op::Flush, 0, 0, &[], 0);
    let ring = read_ring(&dir.path().join("b.ring"));
    assert!(ring.iter().all(|r| r.1.is_none()), "{ring:?}");
    // Seqs of a ring that left the group and joins again keep growing.
    let before = ring.last().unwrap().0;
    drop(b);
    let mut alone = Producer::create(
        &dir.path().join("b.ring"),
        &RingGeometry::new(16 << 20, DEVICE),
    )
    .unwrap();
    alone.leave_group();
    assert!(alone.take_seq().seq > before);
}

#[test]
fn a_cut_that_finds_the_ring_full_is_flagged_as_an_overflow_not_retried() {
    use blkfilter::capture::Captured;
    use blkfilter::ring::RingControl;
    let dir = tempfile::tempdir().unwrap();
    let clock_path = dir.path().join("g.clock");
    let ring_path = dir.path().join("a.ring");
    let mut ring = Producer::create(&ring_path, &RingGeometry::new(4096, DEVICE)).unwrap();
    ring.join_group(GroupClock::open_or_create(&clock_path).unwrap());
    let mut recorder = Recorder::new(ring);
    // Fill the ring: writes stop fitting, then even FLUSHes (the smallest record).
    while let Captured::Recorded(_) = recorder.record(Op::Write, 0, 512, &[1; 512], 0) {}
    while let Captured::Recorded(_) = recorder.record(Op::Flush, 0, 0, &[], 0) {}
    let cut = GroupClock::open(&clock_path).unwrap().cut().unwrap();
    recorder.serve_group_cuts();
    // No MARK could be written: the volume has no point at the cut (I7: overflow, so
    // no crash point until the resync), and the producer does not owe it any more.
    assert!(Consumer::open(&ring_path).unwrap().overflowed());
    assert!(read_ring(&ring_path).iter().all(|r| r.1.is_none()));
    assert_eq!(
        RingControl::open(&ring_path)
            .unwrap()
            .group_cuts_recorded()
            .0,
        cut.number
    );
    recorder.serve_group_cuts();
    assert!(read_ring(&ring_path).iter().all(|r| r.1.is_none()));
}
