//! The ring through its public API: a model-based property test, two processes sharing
//! one ring, and overflow into the dirty bitmap.

use blkfilter::ring::{Consumer, Producer, RingGeometry};
use changelog::{Op, RecordRef};
use proptest::prelude::*;
use std::collections::{BTreeSet, VecDeque};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const DEVICE: u64 = 1 << 20;
const OPS: [Op; 6] = [
    Op::Write,
    Op::Flush,
    Op::Fua,
    Op::Discard,
    Op::WriteZeroes,
    Op::Mark,
];

/// A record owning its payload, as the model keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rec {
    seq: u64,
    op: Op,
    flags: u8,
    offset: u64,
    len: u32,
    data: Vec<u8>,
}

impl Rec {
    /// A record whose payload is derived from its seq, so a reader can check it alone.
    fn new(seq: u64, op: Op, offset: u64, len: u32) -> Rec {
        let data = if op.has_payload() {
            payload(seq, len as usize)
        } else {
            Vec::new()
        };
        Rec {
            seq,
            op,
            flags: (seq % 3) as u8,
            offset,
            len,
            data,
        }
    }

    fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            seq: self.seq,
            op: self.op,
            flags: self.flags,
            offset: self.offset,
            len: self.len,
            data: &self.data,
        }
    }

    fn of(r: &RecordRef<'_>) -> Rec {
        Rec {
            seq: r.seq,
            op: r.op,
            flags: r.flags,
            offset: r.offset,
            len: r.len,
            data: r.data.to_vec(),
        }
    }
}

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (seq.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Property test against a reference model.

#[derive(Clone, Debug)]
enum Step {
    Push { op: Op, len: u32 },
    Read,
    Release,
    ReopenProducer,
    ReopenConsumer,
}

fn steps(capacity: u64) -> impl Strategy<Value = Vec<Step>> {
    let max_len = (capacity * 3 / 4) as u32;
    let step = prop_oneof![
        6 => (0..OPS.len(), 0..max_len).prop_map(|(op, len)| Step::Push { op: OPS[op], len }),
        5 => Just(Step::Read),
        2 => Just(Step::Release),
        1 => Just(Step::ReopenProducer),
        1 => Just(Step::ReopenConsumer),
    ];
    proptest::collection::vec(step, 1..150)
}

/// What the ring should hold, by the rule in the ring's module doc, computed on positions
/// only.
struct Model {
    capacity: u64,
    published: u64,
    released: u64,
    read_pos: u64,
    /// Read but not released: read again after a consumer restart.
    read: VecDeque<(Rec, u64)>,
    unread: VecDeque<(Rec, u64)>,
}

impl Model {
    /// The end position after pushing a record with `payload` bytes, or `None` if Full.
    fn push(&mut self, payload: usize) -> Option<u64> {
        let size = (32 + payload as u64).next_multiple_of(8);
        if size > self.capacity / 2 {
            return None;
        }
        let contiguous = self.capacity - self.published % self.capacity;
        let need = if size <= contiguous {
            size
        } else {
            contiguous + size
        };
        if self.published + need > self.released + self.capacity {
            return None;
        }
        self.published += need;
        Some(self.published)
    }
}

fn run_model(capacity: u64, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let geo = RingGeometry::new(capacity, DEVICE);
    let mut producer = Producer::create(&path, &geo).unwrap();
    let mut consumer = Consumer::open(&path).unwrap();
    let mut m = Model {
        capacity,
        published: 0,
        released: 0,
        read_pos: 0,
        read: VecDeque::new(),
        unread: VecDeque::new(),
    };
    let mut next_seq = 1;
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Step::Push { op, len } => {
                let seq = producer.next_seq();
                prop_assert_eq!(seq, next_seq, "step {}: sequence numbers continue", i);
                next_seq += 1;
                let rec = Rec::new(seq, op, u64::from(len) * 512, len);
                let expected = m.push(rec.data.len());
                let pushed = producer.try_push(&rec.as_ref());
                prop_assert_eq!(
                    pushed.is_ok(),
                    expected.is_some(),
                    "step {}: push of {:?}",
                    i,
                    rec.op
                );
                if let Some(end) = expected {
                    prop_assert_eq!(producer.published(), end);
                    m.unread.push_back((rec, end));
                }
            }
            Step::Read => {
                let got = consumer
                    .peek(m.read_pos)
                    .unwrap()
                    .map(|(r, next)| (Rec::of(&r), next));
                let want = m.unread.pop_front();
                prop_assert_eq!(&got, &want, "step {}: read at {}", i, m.read_pos);
                if let Some(entry) = want {
                    m.read_pos = entry.1;
                    m.read.push_back(entry);
                }
            }
            Step::Release => {
                consumer.release(m.read_pos);
                m.released = m.read_pos;
                m.read.clear();
                prop_assert_eq!(consumer.released(), m.released);
            }
            Step::ReopenProducer => {
                drop(producer);
                producer = Producer::create(&path, &geo).unwrap();
                prop_assert_eq!(producer.published(), m.published);
            }
            Step::ReopenConsumer => {
                drop(consumer);
                consumer = Consumer::open(&path).unwrap();
                // Read but unreleased records come again.
                while let Some(entry) = m.read.pop_back() {
                    m.unread.push_front(entry);
                }
                m.read_pos = consumer.released();
                prop_assert_eq!(m.read_pos, m.released);
            }
        }
        prop_assert_eq!(consumer.published(), m.published);
    }
    // Everything still in the ring comes out, in order.
    let mut pos = m.read_pos;
    for (want, end) in m.unread {
        let (got, next) = consumer
            .peek(pos)
            .unwrap()
            .expect("a record the model still holds");
        prop_assert_eq!(Rec::of(&got), want);
        prop_assert_eq!(next, end);
        pos = next;
    }
    prop_assert!(consumer.peek(pos).unwrap().is_none());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn matches_the_model(
        (capacity, steps) in (32u64..=512).prop_flat_map(|words| (Just(words * 8), steps(words * 8)))
    ) {
        run_model(capacity, steps)?;
    }
}

// ---------------------------------------------------------------------------------------
// Two processes: this test re-runs its own binary as the producer.

const CHILD_ENV: &str = "BLKFILTER_RING_TEST_PRODUCER";
const TWO_PROCESS_RECORDS: u64 = 20_000;

fn two_process_geometry() -> RingGeometry {
    RingGeometry::new(64 * 1024, DEVICE)
}

/// The record the producer pushes as its `i`-th, for sequence number `seq`.
fn two_process_record(i: u64, seq: u64) -> Rec {
    let op = OPS[(i % OPS.len() as u64) as usize];
    let len = ((i * 7919) % 9000) as u32;
    Rec::new(seq, op, i * 4096, len)
}

fn produce(path: &Path) {
    let mut producer = Producer::create(path, &two_process_geometry()).unwrap();
    for i in 0..TWO_PROCESS_RECORDS {
        let seq = producer.next_seq();
        let rec = two_process_record(i, seq);
        // A test producer waits for room; blkfilter would mark the region dirty.
        while producer.try_push(&rec.as_ref()).is_err() {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

#[test]
fn two_processes() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        return produce(Path::new(&path));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    // Create the ring so that the consumer can open it before the producer starts.
    drop(Producer::create(&path, &two_process_geometry()).unwrap());
    let consumer = Consumer::open(&path).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "two_processes",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::null()) // the child harness's chatter; its panics go to stderr
        .spawn()
        .unwrap();

    let mut pos = consumer.released();
    let mut waits = 0;
    for i in 0..TWO_PROCESS_RECORDS {
        let mut idle = 0;
        let (rec, next) = loop {
            if let Some(found) = consumer.peek(pos).unwrap() {
                break found;
            }
            // Nothing more to read: hand back what was read (a shipper seals its
            // segment when input pauses), or a producer waiting for room never gets it.
            consumer.release(pos);
            waits += 1;
            if consumer.wait(pos, Duration::from_secs(1)) {
                continue;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("producer exited ({status}) after {i} records");
            }
            idle += 1;
            if idle == 30 {
                let _ = child.kill();
                panic!("no record for 30 s after {i} records");
            }
        };
        assert_eq!(Rec::of(&rec), two_process_record(i, i + 1), "record {i}");
        pos = next;
        // Release in batches, as the shipper does per segment.
        if i % 100 == 99 {
            consumer.release(pos);
        }
    }
    consumer.release(pos);
    let status = child.wait().unwrap();
    assert!(status.success(), "producer failed: {status}");
    assert!(consumer.peek(pos).unwrap().is_none());
    eprintln!("two_processes: {TWO_PROCESS_RECORDS} records, consumer slept {waits} times");
}

// ---------------------------------------------------------------------------------------
// Overflow: a fast producer, a slow consumer and a tiny ring.

#[test]
fn overflow_marks_every_lost_record() {
    const RECORDS: u64 = 3000;
    const CHUNK: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let geo = RingGeometry {
        capacity_bytes: 512,
        device_bytes: DEVICE,
        chunk_bytes: CHUNK as u32,
    };
    let mut producer = Producer::create(&path, &geo).unwrap();
    let consumer = Arc::new(Consumer::open(&path).unwrap());
    let done = Arc::new(AtomicBool::new(false));

    // The consumer reads slowly and takes the bitmap now and then, as the shipper would.
    let reader = {
        let (consumer, done) = (Arc::clone(&consumer), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut taken = Vec::new();
            let mut pos = consumer.released();
            loop {
                match consumer.peek(pos).unwrap() {
                    Some((rec, next)) => {
                        seen.push(Rec::of(&rec));
                        pos = next;
                        consumer.release(pos);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    None if done.load(Ordering::Acquire) => break,
                    None => {
                        consumer.wait(pos, Duration::from_millis(5));
                    }
                }
                if seen.len() % 50 == 0 && consumer.overflowed() {
                    taken.extend(consumer.take_dirty());
                }
            }
            (seen, taken)
        })
    };

    let mut all = Vec::new();
    let mut lost = Vec::new();
    for i in 0..RECORDS {
        let seq = producer.next_seq();
        let len = 8 + ((i * 37) % 200) as u32;
        // Offsets that often straddle a chunk boundary.
        let offset = ((i * 7919) % (DEVICE / CHUNK)) * CHUNK + CHUNK - 100;
        let offset = offset.min(DEVICE - u64::from(len));
        let rec = Rec::new(seq, Op::Write, offset, len);
        if producer.try_push(&rec.as_ref()).is_err() {
            producer.mark_dirty(rec.offset, u64::from(rec.len));
            lost.push(rec.clone());
        }
        all.push(rec);
    }
    done.store(true, Ordering::Release);
    let (seen, mut taken) = reader.join().unwrap();

    assert!(
        !lost.is_empty() && !seen.is_empty(),
        "the test must overflow and deliver: {} lost",
        lost.len()
    );
    // Every record went to exactly one place, and the delivered ones in order.
    let lost_seqs: BTreeSet<u64> = lost.iter().map(|r| r.seq).collect();
    let delivered: Vec<Rec> = all
        .iter()
        .filter(|r| !lost_seqs.contains(&r.seq))
        .cloned()
        .collect();
    assert_eq!(seen, delivered);

    // Whatever is still marked has OVERFLOW raised.
    let flagged = consumer.overflowed();
    let rest = consumer.take_dirty();
    assert!(
        rest.is_empty() || flagged,
        "dirty regions left with OVERFLOW clear: {rest:?}"
    );
    taken.extend(rest);
    assert!(!consumer.overflowed());
    assert_eq!(consumer.take_dirty(), vec![]);

    // The chunks taken are exactly the chunks the lost records touched.
    let chunks = |extents: &mut dyn Iterator<Item = (u64, u64)>| -> BTreeSet<u64> {
        extents
            .flat_map(|(off, len)| off / CHUNK..(off + len).div_ceil(CHUNK))
            .collect()
    };
    let want = chunks(&mut lost.iter().map(|r| (r.offset, u64::from(r.len))));
    let got = chunks(&mut taken.iter().copied());
    assert_eq!(got, want);
}
