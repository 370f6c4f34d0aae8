//! Loom model checking of the ring's position protocol ([`blkfilter::ring::proto`]), the
//! same code that runs on the shared mapping, here over a heap buffer whose bytes are
//! loom cells, so a read that is not ordered after the write it sees is reported.
//!
//! Run: `cargo test -p blkfilter --features loom --test loom --release`

#![cfg(feature = "loom")]

use blkfilter::ring::proto::{self, ProducerCore, RingMem};
use changelog::{Op, RecordRef};
use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;

/// A ring in loom-tracked memory.
struct HeapRing {
    published: AtomicU64,
    released: AtomicU64,
    data: Vec<UnsafeCell<u8>>,
}

impl HeapRing {
    fn new(capacity: usize) -> HeapRing {
        HeapRing {
            published: AtomicU64::new(0),
            released: AtomicU64::new(0),
            data: (0..capacity).map(|_| UnsafeCell::new(0)).collect(),
        }
    }
}

// SAFETY: the cells are shared between the model's threads on purpose: that is what
// loom checks. The protocol decides who may touch which byte when.
unsafe impl Sync for HeapRing {}

impl RingMem for HeapRing {
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }
    fn load_published(&self, order: Ordering) -> u64 {
        self.published.load(order)
    }
    fn store_published(&self, pos: u64, order: Ordering) {
        self.published.store(pos, order)
    }
    fn load_released(&self, order: Ordering) -> u64 {
        self.released.load(order)
    }
    fn fetch_max_released(&self, pos: u64, order: Ordering) -> u64 {
        self.released.fetch_max(pos, order)
    }
    unsafe fn write(&self, at: u64, src: &[u8]) {
        for (cell, &b) in self.data[at as usize..][..src.len()].iter().zip(src) {
            // SAFETY: loom checks the exclusivity the caller promises.
            cell.with_mut(|p| unsafe { *p = b });
        }
    }
    unsafe fn read(&self, at: u64, dst: &mut [u8]) {
        for (cell, b) in self.data[at as usize..][..dst.len()].iter().zip(dst) {
            // SAFETY: loom checks that no write races with this read.
            *b = cell.with(|p| unsafe { *p });
        }
    }
}

/// A memory that ignores the orderings the protocol asks for and uses Relaxed: the
/// protocol is then wrong, and loom must say so.
struct AllRelaxed(HeapRing);

impl RingMem for AllRelaxed {
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }
    fn load_published(&self, _: Ordering) -> u64 {
        self.0.load_published(Ordering::Relaxed)
    }
    fn store_published(&self, pos: u64, _: Ordering) {
        self.0.store_published(pos, Ordering::Relaxed)
    }
    fn load_released(&self, _: Ordering) -> u64 {
        self.0.load_released(Ordering::Relaxed)
    }
    fn fetch_max_released(&self, pos: u64, _: Ordering) -> u64 {
        self.0.fetch_max_released(pos, Ordering::Relaxed)
    }
    unsafe fn write(&self, at: u64, src: &[u8]) {
        // SAFETY: forwarded contract.
        unsafe { self.0.write(at, src) }
    }
    unsafe fn read(&self, at: u64, dst: &mut [u8]) {
        // SAFETY: forwarded contract.
        unsafe { self.0.read(at, dst) }
    }
}

/// Record `i`: payloads chosen so that a 96-byte ring wraps: slots of 40, 32 and 40
/// bytes; the third finds 24 bytes before the end and must wait for the first to be
/// released, then overwrites the bytes the consumer read from it.
fn record(i: u64) -> (Op, u32, Vec<u8>) {
    match i {
        0 => (Op::Write, 5, vec![0xa0; 5]),
        1 => (Op::Discard, 4096, Vec::new()),
        _ => (Op::Write, 8, vec![0xa0 + i as u8; 8]),
    }
}

const RECORDS: u64 = 3;
const CAPACITY: usize = 96;

fn produce<M: RingMem>(ring: &M) {
    let mut core = ProducerCore::resume(ring);
    for i in 0..RECORDS {
        let (op, len, data) = record(i);
        let rec = RecordRef {
            seq: i,
            op,
            flags: 0,
            offset: i * 512,
            len,
            data: &data,
        };
        while core.try_push(ring, &rec).is_err() {
            thread::yield_now();
        }
    }
}

/// Reads every record, checking order and content; releases after each record, or
/// after every `batch` records (the shipper's read-ahead).
fn consume<M: RingMem>(ring: &M, batch: u64) {
    let mut pos = 0;
    for i in 0..RECORDS {
        let slot = loop {
            match proto::peek(ring, pos).expect("a sound ring") {
                Some(slot) => break slot,
                None => thread::yield_now(),
            }
        };
        let (op, len, data) = record(i);
        assert_eq!(
            (slot.seq, slot.op, slot.offset, slot.len),
            (i, op, i * 512, len)
        );
        let mut got = vec![0u8; slot.data_len];
        // SAFETY: the slot is published and not released.
        unsafe { ring.read(slot.data_at, &mut got) };
        assert_eq!(got, data);
        pos = slot.next;
        if (i + 1) % batch == 0 || i + 1 == RECORDS {
            proto::release(ring, pos);
        }
    }
    assert_eq!(proto::peek(ring, pos).expect("a sound ring"), None);
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    // Bounded preemptions keep the run to seconds; the races here need one or two.
    builder.preemption_bound = Some(3);
    builder.check(f);
}

fn run<M: RingMem + Send + Sync + 'static>(make: fn() -> M, batch: u64) {
    model(move || {
        let ring = Arc::new(make());
        let producer = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || produce(&*ring))
        };
        consume(&*ring, batch);
        producer.join().unwrap();
    });
}

#[test]
fn push_and_consume_across_a_wrap() {
    run(|| HeapRing::new(CAPACITY), 1);
}

#[test]
fn consumer_reads_ahead_of_release() {
    // Releases only after two records: the producer must see the room only then.
    run(|| HeapRing::new(CAPACITY), 2);
}

#[test]
#[should_panic]
fn relaxed_orderings_are_caught() {
    run(|| AllRelaxed(HeapRing::new(CAPACITY)), 1);
}
