//! Unit tests of the ring on real mapped files.

use super::layout::{self, Layout};
use super::*;
use changelog::{Op, RecordRef};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEVICE: u64 = 1 << 30;

fn ring(capacity_bytes: u64) -> (tempfile::TempDir, PathBuf, Producer, Consumer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let producer = Producer::create(&path, &RingGeometry::new(capacity_bytes, DEVICE)).unwrap();
    let consumer = Consumer::open(&path).unwrap();
    (dir, path, producer, consumer)
}

fn write(seq: u64, offset: u64, data: &[u8]) -> RecordRef<'_> {
    RecordRef {
        seq,
        op: Op::Write,
        flags: 0,
        offset,
        len: data.len() as u32,
        data,
    }
}

fn poke(path: &Path, at: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

fn data_offset(consumer: &Consumer) -> u64 {
    Layout::of(&consumer.geometry()).unwrap().data_offset
}

/// Peeks everything published and releases it.
fn drain(consumer: &Consumer) -> Vec<(u64, Op, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = consumer.released();
    while let Some((rec, next)) = consumer.peek(pos).unwrap() {
        out.push((rec.seq, rec.op, rec.data.to_vec()));
        pos = next;
    }
    consumer.release(pos);
    out
}

#[test]
fn roles_are_send_and_sync() {
    fn send<T: Send>() {}
    fn sync<T: Send + Sync>() {}
    send::<Producer>();
    sync::<Consumer>();
}

#[test]
fn push_peek_release_each_op() {
    let (_dir, _path, mut p, c) = ring(4096);
    let data = [0xabu8; 13];
    let records = [
        write(1, 4096, &data),
        RecordRef {
            seq: 2,
            op: Op::Flush,
            flags: 0,
            offset: 0,
            len: 0,
            data: &[],
        },
        RecordRef {
            seq: 3,
            op: Op::Fua,
            flags: 0,
            offset: 512,
            len: 3,
            data: b"fua",
        },
        // No payload in the ring for a discard, whatever data the caller passes.
        RecordRef {
            seq: 4,
            op: Op::Discard,
            flags: 0,
            offset: 8192,
            len: 1 << 20,
            data: &[],
        },
        RecordRef {
            seq: 5,
            op: Op::WriteZeroes,
            flags: 0,
            offset: 0,
            len: 512,
            data: &[],
        },
        RecordRef {
            seq: 6,
            op: Op::Mark,
            flags: 1,
            offset: 0,
            len: 2,
            data: b"ok",
        },
    ];
    assert_eq!(c.peek(0).unwrap(), None);
    for r in &records {
        p.try_push(r).unwrap();
    }
    // 32-byte headers, payloads padded to 8: 13 -> 16, 3 -> 8, 2 -> 8.
    let expected_end = 48 + 32 + 40 + 32 + 32 + 40;
    assert_eq!((c.published(), p.published()), (expected_end, expected_end));
    let mut pos = 0;
    for r in &records {
        let (got, next) = c.peek(pos).unwrap().unwrap();
        assert_eq!(&got, r);
        assert_eq!(next - pos, layout::slot_bytes(got.data.len()));
        pos = next;
    }
    assert_eq!(c.peek(pos).unwrap(), None);
    assert_eq!(c.released(), 0);
    c.release(pos);
    assert_eq!(c.released(), expected_end);
    // Releasing behind the current position changes nothing.
    c.release(8);
    assert_eq!(c.released(), expected_end);
}

#[test]
fn wraps_around_with_a_marker() {
    let (_dir, _path, mut p, c) = ring(256);
    // Slots of 32 + 72 = 104 bytes: two fit (208), the third needs the 48-byte tail
    // skipped, so it must wait for the first to be released.
    let payload = |seq: u64| vec![seq as u8; 72];
    for seq in 1..=2 {
        p.try_push(&write(seq, seq * 4096, &payload(seq))).unwrap();
    }
    assert_eq!(p.try_push(&write(3, 3 * 4096, &payload(3))), Err(Full));
    let (first, next) = c.peek(0).unwrap().unwrap();
    assert_eq!(first.seq, 1);
    c.release(next);
    p.try_push(&write(3, 3 * 4096, &payload(3))).unwrap();
    assert_eq!(p.published(), 208 + 48 + 104);
    let got = drain(&c);
    assert_eq!(
        got,
        vec![(2, Op::Write, payload(2)), (3, Op::Write, payload(3))]
    );
    // Many more laps keep working.
    for seq in 4..200u64 {
        let data = vec![seq as u8; (seq % 90) as usize];
        p.try_push(&write(seq, 0, &data)).unwrap();
        assert_eq!(drain(&c), vec![(seq, Op::Write, data)]);
    }
}

#[test]
fn full_until_released() {
    let (_dir, _path, mut p, c) = ring(1024);
    let data = [1u8; 32]; // 64-byte slots
    for seq in 0..16 {
        p.try_push(&write(seq, 0, &data)).unwrap();
    }
    assert_eq!(
        p.try_push(&RecordRef {
            seq: 16,
            op: Op::Flush,
            flags: 0,
            offset: 0,
            len: 0,
            data: &[]
        }),
        Err(Full)
    );
    let (_, next) = c.peek(0).unwrap().unwrap();
    c.release(next);
    p.try_push(&write(16, 0, &data)).unwrap();
    assert_eq!(p.try_push(&write(17, 0, &data)), Err(Full));
    assert_eq!(drain(&c).len(), 16);
}

#[test]
fn oversize_record_is_always_full() {
    let (_dir, _path, mut p, c) = ring(1024);
    // Half the capacity is the largest slot: 512 = 32 + 480.
    let big = vec![7u8; 481];
    assert_eq!(p.try_push(&write(1, 0, &big)), Err(Full));
    let fits = vec![7u8; 480];
    p.try_push(&write(1, 0, &fits)).unwrap();
    assert_eq!(drain(&c), vec![(1, Op::Write, fits.clone())]);
    // Wherever the head is, an admissible record fits once the ring is drained.
    for shift in 1..40u64 {
        p.try_push(&write(shift, 0, &vec![0; (shift * 8) as usize]))
            .unwrap();
        drain(&c);
        p.try_push(&write(shift, 0, &fits)).unwrap();
        assert_eq!(drain(&c), vec![(shift, Op::Write, fits.clone())]);
    }
}

#[test]
#[should_panic(expected = "bytes of data")]
fn payload_length_mismatch_panics() {
    let (_dir, _path, mut p, _c) = ring(1024);
    let _ = p.try_push(&RecordRef {
        seq: 1,
        op: Op::Write,
        flags: 0,
        offset: 0,
        len: 10,
        data: b"short",
    });
}

#[test]
fn reopen_keeps_positions_contents_and_seq() {
    let (_dir, path, mut p, c) = ring(4096);
    let geo = p.geometry();
    assert_eq!((p.next_seq(), p.next_seq(), p.next_seq()), (1, 2, 3));
    p.try_push(&write(1, 0, b"one")).unwrap();
    p.try_push(&write(2, 0, b"two")).unwrap();
    let (_, next) = c.peek(0).unwrap().unwrap();
    c.release(next);
    let published = p.published();
    drop(p); // as after kill -9: nothing is flushed or cleaned up on drop
    drop(c);

    let mut p = Producer::create(&path, &geo).unwrap();
    assert_eq!(p.published(), published);
    assert_eq!(p.next_seq(), 4);
    p.try_push(&write(3, 0, b"three")).unwrap();
    let c = Consumer::open(&path).unwrap();
    assert_eq!(c.released(), next);
    assert_eq!(
        drain(&c),
        vec![
            (2, Op::Write, b"two".to_vec()),
            (3, Op::Write, b"three".to_vec())
        ]
    );

    let other = RingGeometry {
        chunk_bytes: 4096,
        ..geo
    };
    drop(p);
    match Producer::create(&path, &other) {
        Err(RingError::GeometryMismatch { found, wanted, .. }) => {
            assert_eq!((found, wanted), (geo, other))
        }
        r => panic!("expected a geometry mismatch, got {:?}", r.err()),
    }
}

#[test]
fn one_producer_and_one_consumer_at_a_time() {
    let (_dir, path, p, c) = ring(4096);
    assert!(matches!(Consumer::open(&path), Err(RingError::Busy { .. })));
    assert!(matches!(
        Producer::create(&path, &p.geometry()),
        Err(RingError::Busy { .. })
    ));
    drop(c);
    Consumer::open(&path).unwrap();
}

#[test]
fn bad_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let geo = RingGeometry::new(4096, DEVICE);

    let missing = dir.path().join("missing");
    assert!(matches!(
        Consumer::open(&missing),
        Err(RingError::Io { action: "open", .. })
    ));

    let short = dir.path().join("short");
    std::fs::write(&short, b"hello").unwrap();
    assert!(matches!(
        Consumer::open(&short),
        Err(RingError::BadMagic { .. })
    ));
    assert!(matches!(
        Producer::create(&short, &geo),
        Err(RingError::BadMagic { .. })
    ));
    assert_eq!(
        std::fs::read(&short).unwrap(),
        b"hello",
        "someone else's file is left alone"
    );

    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, vec![0x55u8; 10000]).unwrap();
    assert!(matches!(
        Producer::create(&foreign, &geo),
        Err(RingError::BadMagic { .. })
    ));

    assert!(matches!(
        Producer::create(&dir.path().join("g"), &RingGeometry::new(100, DEVICE)),
        Err(RingError::InvalidGeometry(_))
    ));
    assert!(matches!(
        Producer::create(
            &dir.path().join("g"),
            &RingGeometry {
                chunk_bytes: 1000,
                ..geo
            }
        ),
        Err(RingError::InvalidGeometry(_))
    ));
}

#[test]
fn corrupt_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let geo = RingGeometry::new(4096, DEVICE);
    let fresh = || {
        let _ = std::fs::remove_file(&path);
        drop(Producer::create(&path, &geo).unwrap());
    };
    let cases: [(usize, &[u8], &str); 6] = [
        (layout::OFF_MAGIC, b"NOTARING", "BadMagic"),
        (
            layout::OFF_VERSION,
            &9u32.to_le_bytes(),
            "UnsupportedVersion",
        ),
        (
            layout::OFF_CAPACITY,
            &8192u64.to_le_bytes(),
            "CorruptHeader",
        ),
        (
            layout::OFF_CAPACITY,
            &4100u64.to_le_bytes(),
            "CorruptHeader",
        ),
        (
            layout::OFF_BITMAP_WORDS,
            &1u64.to_le_bytes(),
            "CorruptHeader",
        ),
        (
            layout::OFF_PUBLISHED,
            &5000u64.to_le_bytes(),
            "CorruptHeader",
        ),
    ];
    for (offset, bytes, want) in cases {
        fresh();
        poke(&path, offset as u64, bytes);
        let err = Consumer::open(&path)
            .err()
            .expect("corrupt header accepted");
        assert!(
            format!("{err:?}").starts_with(want),
            "offset {offset}: {err:?}"
        );
        // The producer refuses it too rather than reinitializing over it.
        assert!(Producer::create(&path, &geo).is_err());
    }
    // released ahead of published.
    fresh();
    poke(&path, layout::OFF_RELEASED as u64, &64u64.to_le_bytes());
    assert!(matches!(
        Consumer::open(&path),
        Err(RingError::CorruptHeader { .. })
    ));
}

#[test]
fn interrupted_creation_is_redone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let geo = RingGeometry::new(4096, DEVICE);
    // A creator that died after sizing the file but before storing the magic.
    let len = Layout::of(&geo).unwrap().file_bytes;
    std::fs::write(&path, vec![0u8; len as usize]).unwrap();
    assert!(matches!(
        Consumer::open(&path),
        Err(RingError::BadMagic { .. })
    ));
    let mut p = Producer::create(&path, &geo).unwrap();
    assert_eq!(p.next_seq(), 1);
    Consumer::open(&path).unwrap();
}

#[test]
fn corrupt_records_are_errors_not_panics() {
    let (_dir, path, mut p, c) = ring(4096);
    let data_at = data_offset(&c);
    p.try_push(&write(1, 0, b"abcdefgh")).unwrap();
    let end = p.published();
    let corruptions: [(u64, &[u8]); 5] = [
        (0, b"JUNK"),                 // tag
        (4, &[99]),                   // op code
        (12, &200u32.to_le_bytes()),  // size past the published end
        (12, &48u32.to_le_bytes()),   // size disagrees with len
        (8, &u32::MAX.to_le_bytes()), // len far beyond everything
    ];
    let good = std::fs::read(&path).unwrap();
    for (at, bytes) in corruptions {
        poke(&path, 0, &good);
        poke(&path, data_at + at, bytes);
        match c.peek(0) {
            Err(RingError::Corrupt { pos: 0, what }) => assert!(!what.is_empty()),
            r => panic!("corruption at {at} not detected: {r:?}"),
        }
    }
    poke(&path, 0, &good);
    assert_eq!(c.peek(0).unwrap().unwrap().1, end);
    // A wrap marker where the data area does not end with one record after it.
    poke(&path, data_at, &layout::WRAP_MARKER);
    assert!(matches!(c.peek(0), Err(RingError::Corrupt { .. })));
    // Positions moved by a broken producer.
    poke(
        &path,
        layout::OFF_PUBLISHED as u64,
        &(end + 4).to_le_bytes(),
    );
    assert!(matches!(c.peek(0), Err(RingError::Corrupt { .. })));
}

#[test]
fn bad_positions() {
    let (_dir, _path, mut p, c) = ring(4096);
    p.try_push(&write(1, 0, b"x")).unwrap();
    assert!(matches!(c.peek(48), Err(RingError::BadPosition { .. })));
    assert!(matches!(c.peek(4), Err(RingError::BadPosition { .. })));
    c.release(40);
    assert!(matches!(c.peek(0), Err(RingError::BadPosition { .. })));
}

#[test]
#[should_panic(expected = "past published")]
fn release_past_published_panics() {
    let (_dir, _path, _p, c) = ring(4096);
    c.release(8);
}

#[test]
fn wait_times_out_and_wakes() {
    let (_dir, _path, mut p, c) = ring(4096);
    let t = Instant::now();
    assert!(!c.wait(0, Duration::from_millis(100)));
    assert!(t.elapsed() >= Duration::from_millis(100));

    let c = Arc::new(c);
    let waiter = {
        let c = Arc::clone(&c);
        std::thread::spawn(move || {
            let t = Instant::now();
            (c.wait(0, Duration::from_secs(20)), t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    p.try_push(&write(1, 0, b"wake")).unwrap();
    let (woken, took) = waiter.join().unwrap();
    assert!(woken);
    assert!(
        took < Duration::from_secs(10),
        "the push did not wake the waiter ({took:?})"
    );
    assert!(
        c.wait(0, Duration::ZERO),
        "data already there returns at once"
    );
}

#[test]
fn dirty_marks_and_overflow_flag() {
    let (_dir, _path, p, c) = ring(4096);
    assert!(!c.overflowed());
    assert_eq!(c.take_dirty(), vec![]);
    p.mark_dirty(65536 * 3 + 5, 65536); // chunks 3 and 4
    p.mark_dirty(0, 0); // a lost flush: flag only
    assert!(c.overflowed());
    assert_eq!(c.take_dirty(), vec![(65536 * 3, 65536 * 2)]);
    assert!(!c.overflowed());
    p.mark_dirty(DEVICE - 1, 100); // clipped at the device end
    assert_eq!(c.take_dirty(), vec![(DEVICE - 65536, 65536)]);
}
