//! Property tests of the segment format: round trips, and every single-bit flip or
//! truncation of a sealed file is refused.

use changelog::segment::{open, seal, seal_owned, ChainCursor, PlainSegment, SealParams};
use changelog::{flags, Error, Key, Op, RecordRef, VolumeId};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Rec {
    op: Op,
    offset: u64,
    len: u32,
    data: Vec<u8>,
}

fn rec_strategy() -> impl Strategy<Value = Rec> {
    let op = prop_oneof![
        4 => Just(Op::Write),
        1 => Just(Op::Flush),
        1 => Just(Op::Fua),
        1 => Just(Op::Discard),
        1 => Just(Op::WriteZeroes),
        1 => Just(Op::Mark),
    ];
    (op, 0u64..1 << 40, 0usize..3000, any::<u8>(), any::<bool>()).prop_map(
        |(op, offset, len, byte, compressible)| {
            let data: Vec<u8> = if !op.has_payload() {
                Vec::new()
            } else if compressible {
                vec![byte; len]
            } else {
                (0..len)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(byte) ^ (i >> 3) as u8)
                    .collect()
            };
            let (offset, len) = match op {
                Op::Flush => (0, 0),
                Op::Mark => (0, len as u32),
                _ => (offset, len as u32),
            };
            Rec {
                op,
                offset,
                len,
                data,
            }
        },
    )
}

/// The records in a segment whose buffer has room to spare, as the shipper's have.
fn plain(records: &[Rec], first_seq: u64) -> PlainSegment {
    let mut plain = PlainSegment::with_buffer(Vec::with_capacity(128 << 10));
    plain.flags = flags::CRASH_POINT;
    for (i, r) in records.iter().enumerate() {
        plain.push(&RecordRef {
            seq: first_seq + i as u64 * 3,
            op: r.op,
            flags: 0,
            offset: r.offset,
            len: r.len,
            data: &r.data,
        });
    }
    plain
}

fn params(index: u64) -> SealParams {
    SealParams {
        volume: VolumeId::new("vol0").unwrap(),
        epoch: 0xfeed,
        index,
        created_unix_ms: 1234,
    }
}

fn key_bytes() -> [u8; 32] {
    [7; 32]
}

fn key() -> Key {
    Key::from_bytes(key_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip(records in prop::collection::vec(rec_strategy(), 1..40), first_seq in 0u64..1 << 50) {
        let plain = plain(&records, first_seq);
        let linked = seal(&plain, &params(0), &key()).unwrap().link([0; 32]);
        let opened = ChainCursor::start(VolumeId::new("vol0").unwrap()).open_next(linked.bytes.clone(), "t", &key()).unwrap();
        prop_assert_eq!(opened.digest, linked.digest);
        prop_assert_eq!(opened.header.first_seq, first_seq);
        let got: Vec<_> = opened.records().collect();
        prop_assert_eq!(got.len(), records.len());
        for (i, (g, r)) in got.iter().zip(&records).enumerate() {
            prop_assert_eq!(g.seq, first_seq + i as u64 * 3);
            prop_assert_eq!((g.op, g.offset, g.len), (r.op, r.offset, r.len));
            prop_assert_eq!(g.data, &r.data[..]);
        }
    }

    /// Sealing in place gives the very bytes the copying seal gives, stored (random
    /// data: lz4 does not shrink it) or compressed, whatever the scratch buffer held.
    #[test]
    fn seal_owned_matches_seal(records in prop::collection::vec(rec_strategy(), 1..20), noise in prop::collection::vec(any::<u8>(), 0..3000), junk in prop::collection::vec(any::<u8>(), 0..5000)) {
        let mut records = records;
        let len = noise.len() as u32;
        records.push(Rec { op: Op::Write, offset: 4096, len, data: noise });
        let plain = plain(&records, 5);
        let expected = seal(&plain, &params(2), &key()).unwrap().link([9; 32]);
        let buffer_at = plain.body().as_ptr();
        let (sealed, _) = seal_owned(plain.clone(), &params(2), &key(), junk).unwrap();
        let linked = sealed.link([9; 32]);
        prop_assert!(linked.bytes == expected.bytes);
        prop_assert_eq!(linked.digest, expected.digest);
        // The clone above has a buffer of its own; sealing `plain` itself in place
        // must not move its records when it stores them.
        let (sealed, _) = seal_owned(plain, &params(2), &key(), Vec::new()).unwrap();
        if sealed.header().codec == changelog::header::CODEC_STORED {
            let linked = sealed.link([9; 32]);
            prop_assert_eq!(linked.bytes[changelog::header::HEADER_LEN..].as_ptr(), buffer_at);
        }
    }

    #[test]
    fn any_flipped_bit_is_refused(records in prop::collection::vec(rec_strategy(), 1..8), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
        let linked = seal(&plain(&records, 1), &params(0), &key()).unwrap().link([0; 32]);
        let mut bytes = linked.bytes;
        let at = pick.index(bytes.len());
        bytes[at] ^= 1 << bit;
        let result = ChainCursor::start(VolumeId::new("vol0").unwrap()).open_next(bytes, "t", &key());
        prop_assert!(result.is_err(), "flip at byte {} bit {} accepted", at, bit);
    }

    #[test]
    fn truncation_is_refused(records in prop::collection::vec(rec_strategy(), 1..8), cut in any::<prop::sample::Index>()) {
        let linked = seal(&plain(&records, 1), &params(0), &key()).unwrap().link([0; 32]);
        let keep = cut.index(linked.bytes.len());
        let result = open(linked.bytes[..keep].to_vec(), "t", &key());
        prop_assert!(matches!(result, Err(Error::Corrupt { .. })), "cut to {} bytes: {:?}", keep, result.err());
    }
}

#[test]
fn chain_refuses_gap_replay_swap_foreign_and_wrong_key() {
    let vol = VolumeId::new("vol0").unwrap();
    let records = [Rec {
        op: Op::Write,
        offset: 0,
        len: 4,
        data: b"abcd".to_vec(),
    }];
    let mut prev = [0; 32];
    let mut segs = Vec::new();
    for index in 0..4 {
        let linked = seal(&plain(&records, 10 * index + 1), &params(index), &key())
            .unwrap()
            .link(prev);
        prev = linked.digest;
        segs.push(linked);
    }
    let mut cursor = ChainCursor::start(vol.clone());
    let s0 = cursor
        .open_next(segs[0].bytes.clone(), "s0", &key())
        .unwrap();
    cursor.advance(&s0.header, s0.digest);

    let err = |bytes: &[u8], key: &Key| cursor.open_next(bytes.to_vec(), "s", key).unwrap_err();
    assert!(
        matches!(err(&segs[2].bytes, &key()), Error::Chain { .. }),
        "gap"
    );
    assert!(
        matches!(err(&segs[0].bytes, &key()), Error::Chain { .. }),
        "replay"
    );
    assert!(matches!(
        err(&segs[1].bytes, &Key::from_bytes([8; 32])),
        Error::WrongKey { .. }
    ));
    // After a rotation the file holds the retired key too, before or after the new
    // one: either way the segment opens with the key that sealed it.
    let retired = key_bytes();
    for keys in [vec![retired, [8; 32]], vec![[8; 32], retired]] {
        let rotated = Key::from_keys(keys);
        let s1 = cursor
            .open_next(segs[1].bytes.clone(), "s1", &rotated)
            .unwrap();
        assert_eq!(s1.header.index, 1);
    }
    let message = err(&segs[1].bytes, &Key::from_keys(vec![[8; 32], [9; 32]])).to_string();
    for id in [
        Key::from_bytes([8; 32]).id(),
        Key::from_bytes([9; 32]).id(),
        key().id(),
    ] {
        assert!(message.contains(&changelog::key::hex(&id)), "{message}");
    }

    let other_vol = SealParams {
        volume: VolumeId::new("vol1").unwrap(),
        ..params(1)
    };
    let foreign = seal(&plain(&records, 11), &other_vol, &key())
        .unwrap()
        .link(s0.digest);
    assert!(matches!(
        err(&foreign.bytes, &key()),
        Error::ForeignVolume { .. }
    ));
    let other_epoch = SealParams {
        epoch: 1,
        ..params(1)
    };
    let foreign = seal(&plain(&records, 11), &other_epoch, &key())
        .unwrap()
        .link(s0.digest);
    assert!(matches!(
        err(&foreign.bytes, &key()),
        Error::ForeignEpoch { .. }
    ));
    // Same index and epoch, other contents: a splice. The digest link catches it.
    let spliced = seal(&plain(&records, 11), &params(1), &key())
        .unwrap()
        .link([9; 32]);
    assert!(matches!(err(&spliced.bytes, &key()), Error::Chain { .. }));

    let s1 = cursor
        .open_next(segs[1].bytes.clone(), "s1", &key())
        .unwrap();
    cursor.advance(&s1.header, s1.digest);
    assert!(cursor
        .open_next(segs[2].bytes.clone(), "s2", &key())
        .is_ok());
}

/// A continuation under a new protection epoch (after the shipper dropped a staged
/// backlog) is accepted only when it announces it (NEW_EPOCH), sits at the next index
/// and links to the digest applied last; then the chain goes on in the new epoch.
#[test]
fn new_epoch_continuation_is_chained_and_announced() {
    let vol = VolumeId::new("vol0").unwrap();
    let records = [Rec {
        op: Op::Write,
        offset: 0,
        len: 4,
        data: b"abcd".to_vec(),
    }];
    let s0 = seal(&plain(&records, 1), &params(0), &key())
        .unwrap()
        .link([0; 32]);
    let mut cursor = ChainCursor::start(vol);
    let opened = cursor.open_next(s0.bytes.clone(), "s0", &key()).unwrap();
    cursor.advance(&opened.header, opened.digest);
    // Segment 1 of the old epoch was sealed and dropped; segment 1 of epoch 0xbeef
    // continues (same index, other content, other nonce).
    let continuation = |epoch: u64, flags_: u32, index: u64, prev: [u8; 32]| {
        let mut p = plain(&records, 50);
        p.flags |= flags_;
        let params = SealParams {
            epoch,
            ..params(index)
        };
        seal(&p, &params, &key()).unwrap().link(prev)
    };
    let err = |cursor: &ChainCursor, bytes: &[u8]| {
        cursor.open_next(bytes.to_vec(), "s", &key()).unwrap_err()
    };
    let unannounced = continuation(0xbeef, 0, 1, s0.digest);
    assert!(matches!(
        err(&cursor, &unannounced.bytes),
        Error::ForeignEpoch { .. }
    ));
    let unlinked = continuation(0xbeef, flags::NEW_EPOCH, 1, [3; 32]);
    assert!(matches!(err(&cursor, &unlinked.bytes), Error::Chain { .. }));
    let skipping = continuation(0xbeef, flags::NEW_EPOCH, 2, s0.digest);
    assert!(matches!(err(&cursor, &skipping.bytes), Error::Chain { .. }));
    let same_epoch = continuation(0xfeed, flags::NEW_EPOCH, 1, s0.digest);
    assert!(matches!(
        err(&cursor, &same_epoch.bytes),
        Error::Chain { .. }
    ));

    let good = continuation(0xbeef, flags::NEW_EPOCH, 1, s0.digest);
    let opened = cursor.open_next(good.bytes.clone(), "s1", &key()).unwrap();
    assert_eq!(
        opened.header.nonce(),
        changelog::header::nonce_for(0xbeef, 1)
    );
    cursor.advance(&opened.header, opened.digest);
    assert_eq!(cursor.epoch, Some(0xbeef));
    // The new epoch is the chain's now: the old one is foreign from here on.
    let next_params = SealParams {
        epoch: 0xbeef,
        ..params(2)
    };
    let next = seal(&plain(&records, 60), &next_params, &key())
        .unwrap()
        .link(good.digest);
    assert!(cursor.open_next(next.bytes.clone(), "s2", &key()).is_ok());
    let old_epoch = seal(&plain(&records, 90), &params(2), &key())
        .unwrap()
        .link(good.digest);
    assert!(matches!(
        err(&cursor, &old_epoch.bytes),
        Error::ForeignEpoch { .. }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The fuzz target's second half as a property test, so CI runs it on stable:
    /// arbitrary plaintext bodies that pass authentication are refused cleanly.
    #[test]
    fn arbitrary_authentic_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..600), first_seq in any::<u64>(), count in 1u32..50) {
        let plain = PlainSegment::from_raw_body(&body, first_seq, first_seq.saturating_add(u64::from(count)), count);
        if let Ok(sealed) = seal(&plain, &params(0), &key()) {
            let _ = open(sealed.link([0; 32]).bytes, "t", &key());
        }
    }

    /// Arbitrary files never panic the reader.
    #[test]
    fn arbitrary_files_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1000)) {
        let _ = ChainCursor::start(VolumeId::new("vol0").unwrap()).open_next(bytes, "t", &key());
    }
}

/// The format is standard AES-256-GCM: an independent implementation (RustCrypto
/// `aes-gcm`) decrypts a sealed body with the header's first 136 bytes as AAD, and the
/// plaintext is the lz4 block of the records.
#[test]
fn independent_aes_gcm_and_lz4_read_the_format() {
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::{Aes256Gcm, KeyInit};
    use changelog::header::{AAD_LEN, HEADER_LEN, TAG_LEN};
    let records: Vec<Rec> = (0..20)
        .map(|i| Rec {
            op: Op::Write,
            offset: i * 512,
            len: 512,
            data: vec![i as u8; 512],
        })
        .collect();
    let plain = plain(&records, 1);
    let linked = seal(&plain, &params(3), &key()).unwrap().link([5; 32]);
    let bytes = &linked.bytes;
    let mut body = bytes[HEADER_LEN..bytes.len() - TAG_LEN].to_vec();
    let tag = aes_gcm::Tag::clone_from_slice(&bytes[bytes.len() - TAG_LEN..]);
    let nonce = changelog::header::nonce_for(0xfeed, 3);
    Aes256Gcm::new(&[7u8; 32].into())
        .decrypt_in_place_detached(
            aes_gcm::Nonce::from_slice(&nonce),
            &bytes[..AAD_LEN],
            &mut body,
            &tag,
        )
        .expect("RustCrypto AES-GCM opens the segment");
    assert_eq!(linked.header.codec, changelog::header::CODEC_LZ4);
    let decompressed = lz4_flex::block::decompress(&body, plain.body().len()).unwrap();
    assert_eq!(decompressed, plain.body());
}

/// A large segment of incompressible writes is stored, not compressed (the probes
/// skip lz4), and opens to the same records; one of compressible writes is lz4.
#[test]
fn large_segments_are_stored_or_compressed_by_their_data() {
    let mut noise = vec![0; 4 << 20];
    getrandom::getrandom(&mut noise).unwrap();
    for (data, codec) in [
        (noise, changelog::header::CODEC_STORED),
        (vec![0x5a; 4 << 20], changelog::header::CODEC_LZ4),
    ] {
        let records: Vec<Rec> = data
            .chunks(64 << 10)
            .enumerate()
            .map(|(i, chunk)| Rec {
                op: Op::Write,
                offset: i as u64 * (64 << 10),
                len: chunk.len() as u32,
                data: chunk.to_vec(),
            })
            .collect();
        let plain = plain(&records, 1);
        let linked = seal(&plain, &params(0), &key()).unwrap().link([0; 32]);
        assert_eq!(linked.header.codec, codec);
        let (owned, _) = seal_owned(plain, &params(0), &key(), vec![7; 100]).unwrap();
        assert!(
            owned.link([0; 32]).bytes == linked.bytes,
            "seal_owned differs"
        );
        let opened = open(linked.bytes, "s", &key()).unwrap();
        let back: Vec<u8> = opened.records().flat_map(|r| r.data.to_vec()).collect();
        assert_eq!(back, data);
    }
}
