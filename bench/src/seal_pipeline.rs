//! Pipeline benchmark: a synthetic write stream through ring → seal → staging → store,
//! beside the speed of each stage alone on the same data, measured in the same run.
//!
//! Streams: 4 KiB writes at random offsets and 1 MiB sequential writes, with
//! half-compressible data, and 4 KiB random writes of incompressible data (as fio
//! writes by default; `seal` skips lz4 for them). For each it prints MB/s (of record
//! bytes) for lz4 alone, AES-256-GCM alone (RustCrypto `aes-gcm` and `ring`, each on a
//! copy of the body), `seal` on one core (lz4 + GCM into a new buffer), `seal_owned` on
//! one core (what the shipper runs: a body stored uncompressed is encrypted in place;
//! the single-core stage limit), the whole pipeline with N sealer threads, and the
//! pipeline's ratio to N × the single-core limit. Staging and
//! store live on tmpfs (/dev/shm) so the disk is not what is measured; uploads go to a
//! store that drops them (the path measured is ring → seal → staging).
//!
//! With `STORE_AB=DIR` it measures instead the whole path into a local-directory store
//! under DIR, the uploader hard-linking staged segments into the store against copying
//! them (`TargetStore::put_staged` against `put`).
//!
//! Usage: seal-pipeline [MiB per stream, default 512]

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use blkfilter::ring::{Producer, RingGeometry};
use blkfilter::workload::Rng;
use changelog::{
    seal, seal_owned, Key, Op, PlainSegment, RecordRef, SealParams, TargetStore, VolumeId,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEGMENT_BYTES: usize = 8 << 20;

struct Stream {
    name: &'static str,
    /// (offset, data) of every write.
    writes: Vec<(u64, Vec<u8>)>,
}

impl Stream {
    fn bytes(&self) -> u64 {
        self.writes
            .iter()
            .map(|(_, d)| d.len() as u64 + changelog::record::RECORD_HEADER_LEN as u64)
            .sum()
    }

    /// The stream cut into plain segment bodies as the shipper would.
    fn segments(&self) -> Vec<PlainSegment> {
        let mut out = vec![PlainSegment::default()];
        for (seq, (offset, data)) in self.writes.iter().enumerate() {
            let record = RecordRef {
                seq: seq as u64,
                op: Op::Write,
                flags: 0,
                offset: *offset,
                len: data.len() as u32,
                data,
            };
            let last = out.last_mut().expect("non-empty");
            last.push(&record);
            if last.body().len() >= SEGMENT_BYTES {
                out.push(PlainSegment::default());
            }
        }
        out.retain(|p| !p.is_empty());
        out
    }
}

fn make_stream(name: &'static str, total: u64, io: usize, random: bool, noise: bool) -> Stream {
    let mut rng = Rng::new(7);
    let device = 64u64 << 30;
    let mut writes = Vec::new();
    let mut offset = 0u64;
    while (writes.len() * io) < total as usize {
        let mut data = vec![0u8; io];
        if noise {
            data.chunks_mut(8)
                .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]));
        } else {
            rng.fill_half_compressible(&mut data);
        }
        let at = if random {
            rng.below(device / io as u64) * io as u64
        } else {
            offset
        };
        offset += io as u64;
        writes.push((at, data));
    }
    Stream { name, writes }
}

fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// Runs `f` over the stream's segments, best of 3 rounds, and returns MB/s of record bytes.
fn stage_speed(segments: &[PlainSegment], mut f: impl FnMut(&PlainSegment)) -> f64 {
    let bytes: u64 = segments.iter().map(|s| s.body().len() as u64).sum();
    (0..3)
        .map(|_| {
            let started = Instant::now();
            segments.iter().for_each(&mut f);
            mbps(bytes, started.elapsed())
        })
        .fold(0.0, f64::max)
}

/// MB/s of `seal_owned` over `segments` on one core, best of 3, as the shipper's
/// sealers run it: on buffers already in memory with room to spare, the buffer left
/// over becoming the next scratch. Only the `seal_owned` calls are timed (making each
/// owned copy and freeing each sealed segment are not).
fn seal_owned_speed(segments: &[PlainSegment], params: &SealParams, key: &Key) -> f64 {
    let bytes: u64 = segments.iter().map(|s| s.body().len() as u64).sum();
    (0..3)
        .map(|_| {
            let mut scratch = Vec::with_capacity(SEGMENT_BYTES + (1 << 20));
            let mut timed = Duration::ZERO;
            for p in segments {
                let mut plain =
                    PlainSegment::from_raw_body(p.body(), p.first_seq, p.last_seq, p.record_count);
                plain.reserve(1 << 20);
                let started = Instant::now();
                let (segment, left_over) = seal_owned(plain, params, key, scratch).unwrap();
                timed += started.elapsed();
                scratch = left_over;
                drop(segment);
            }
            mbps(bytes, timed)
        })
        .fold(0.0, f64::max)
}

/// The measured path ends in staging (ring → seal → staging); the target store's speed
/// is the network's or the object store's, not ours, so uploads are accepted and dropped.
struct Discard;

impl TargetStore for Discard {
    fn put(&self, _: &VolumeId, _: u64, _: &[u8]) -> changelog::Result<()> {
        Ok(())
    }
    fn delete(&self, _: &VolumeId, _: u64) -> changelog::Result<()> {
        Ok(())
    }
    fn get(&self, _: &VolumeId, _: u64) -> changelog::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn list(&self, _: &VolumeId) -> changelog::Result<Vec<u64>> {
        Ok(Vec::new())
    }
    fn put_blob(&self, _: &VolumeId, _: &str, _: &[u8]) -> changelog::Result<()> {
        Ok(())
    }
    fn get_blob(&self, _: &VolumeId, _: &str) -> changelog::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn delete_blob(&self, _: &VolumeId, _: &str) -> changelog::Result<()> {
        Ok(())
    }
    fn list_blobs(&self, _: &VolumeId) -> changelog::Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn describe(&self) -> String {
        "discard".into()
    }
}

fn pipeline_speed(stream: &Stream, sealers: usize) -> f64 {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
    pipeline_speed_into(stream, sealers, dir.path(), Arc::new(Discard))
}

/// A local-directory store that only has `put`: the uploader writes every segment
/// again instead of linking the staged file (the default `put_staged`).
struct CopyingDirStore(changelog::LocalDirStore);

impl TargetStore for CopyingDirStore {
    fn put(&self, v: &VolumeId, i: u64, b: &[u8]) -> changelog::Result<()> {
        self.0.put(v, i, b)
    }
    fn delete(&self, v: &VolumeId, i: u64) -> changelog::Result<()> {
        self.0.delete(v, i)
    }
    fn get(&self, v: &VolumeId, i: u64) -> changelog::Result<Option<Vec<u8>>> {
        self.0.get(v, i)
    }
    fn list(&self, v: &VolumeId) -> changelog::Result<Vec<u64>> {
        self.0.list(v)
    }
    fn put_blob(&self, v: &VolumeId, n: &str, b: &[u8]) -> changelog::Result<()> {
        self.0.put_blob(v, n, b)
    }
    fn get_blob(&self, v: &VolumeId, n: &str) -> changelog::Result<Option<Vec<u8>>> {
        self.0.get_blob(v, n)
    }
    fn delete_blob(&self, v: &VolumeId, n: &str) -> changelog::Result<()> {
        self.0.delete_blob(v, n)
    }
    fn list_blobs(&self, v: &VolumeId) -> changelog::Result<Vec<String>> {
        self.0.list_blobs(v)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// `STORE_AB=DIR`: the whole path, ring → seal → staging → a local-directory store, with
/// staging and store both under DIR (one file system), the store linking staged files
/// against copying them; rounds alternate and the best of each counts.
fn store_ab(dir: &str, mib: u64) {
    let stream = make_stream("4 KiB random", mib << 20, 4096, true, false);
    let (mut linked, mut copied) = (0f64, 0f64);
    for _ in 0..3 {
        for link in [true, false] {
            let base = tempfile::tempdir_in(dir).expect("bench dir");
            let store = changelog::LocalDirStore::new(base.path().join("store"));
            let store: Arc<dyn TargetStore> = if link {
                Arc::new(store)
            } else {
                Arc::new(CopyingDirStore(store))
            };
            let speed = pipeline_speed_into(&stream, 2, base.path(), store);
            let best = if link { &mut linked } else { &mut copied };
            *best = best.max(speed);
        }
    }
    println!("| ring -> seal -> staging -> local-directory store, 4 KiB random, {mib} MiB, staging and store in {dir} | MB/s |");
    println!("|---|---|");
    println!("| staged segment copied into the store (put) | {copied:.0} |");
    println!("| staged segment hard-linked into the store (put_staged) | {linked:.0} |");
    println!("| ratio linked / copied | {:.2} |", linked / copied);
}

fn pipeline_speed_into(
    stream: &Stream,
    sealers: usize,
    dir: &std::path::Path,
    store: Arc<dyn TargetStore>,
) -> f64 {
    let ring_dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
    let ring_path = ring_dir.path().join("ring");
    let mut producer =
        Producer::create(&ring_path, &RingGeometry::new(256 << 20, 64 << 30)).expect("ring");
    let key = Key::from_bytes([3; 32]);
    let mut config = shipper::ShipperConfig::new(
        VolumeId::new("bench").unwrap(),
        ring_path,
        dir.join("staging"),
        key,
    );
    config.sealers = sealers;
    config.max_segment_bytes = SEGMENT_BYTES;
    let control = Arc::new(shipper::Control::default());
    let started = Instant::now();
    let runner = {
        let control = control.clone();
        std::thread::spawn(move || shipper::run(&config, store, control))
    };
    for (offset, data) in &stream.writes {
        let seq = producer.next_seq();
        let record = RecordRef {
            seq,
            op: Op::Write,
            flags: 0,
            offset: *offset,
            len: data.len() as u32,
            data,
        };
        while producer.try_push(&record).is_err() {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    control.drain();
    runner.join().expect("join").expect("pipeline");
    mbps(stream.bytes(), started.elapsed())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(512);
    if let Ok(dir) = std::env::var("STORE_AB") {
        store_ab(&dir, mib);
        return;
    }
    if let Some(which) = std::env::var_os("PIPELINE_ONLY") {
        // PIPELINE_ONLY=incompressible profiles the incompressible stream instead.
        let noise = which == "incompressible";
        let stream = make_stream("4 KiB random", mib << 20, 4096, true, noise);
        println!(
            "pipeline only, 1 sealer: {:.0} MB/s",
            pipeline_speed(&stream, 1)
        );
        return;
    }
    let streams = [
        make_stream("4 KiB random", mib << 20, 4096, true, false),
        make_stream("1 MiB sequential", mib << 20, 1 << 20, false, false),
        make_stream("4 KiB random, incompressible", mib << 20, 4096, true, true),
    ];
    let key = Key::from_bytes([3; 32]);
    let rc = Aes256Gcm::new(&[3u8; 32].into());
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[3; 32]).unwrap(),
    );
    println!("| stream | lz4 | AES-GCM RustCrypto | AES-GCM ring | seal, 1 core | seal in place, 1 core | pipeline, 1 sealer | ratio | pipeline, 2 sealers | per sealer ratio | lz4 size ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for stream in &streams {
        let segments = stream.segments();
        let mut compressed = 0u64;
        let mut out =
            vec![0u8; lz4_flex::block::get_maximum_output_size(SEGMENT_BYTES + (64 << 10))];
        let lz4 = stage_speed(&segments, |p| {
            compressed += lz4_flex::block::compress_into(p.body(), &mut out).unwrap() as u64;
        });
        let plain: u64 = segments.iter().map(|s| s.body().len() as u64).sum();
        let mut buf = Vec::with_capacity(SEGMENT_BYTES + (64 << 10));
        let aes_rc = stage_speed(&segments, |p| {
            buf.clear();
            buf.extend_from_slice(p.body());
            rc.encrypt_in_place_detached(Nonce::from_slice(&[1; 12]), b"aad", &mut buf)
                .unwrap();
        });
        let aes_ring = stage_speed(&segments, |p| {
            buf.clear();
            buf.extend_from_slice(p.body());
            let nonce = ring::aead::Nonce::assume_unique_for_key([1; 12]);
            let tag = ring_key
                .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(b"aad"), &mut buf)
                .unwrap();
            buf.extend_from_slice(tag.as_ref());
        });
        let params = SealParams {
            volume: VolumeId::new("bench").unwrap(),
            epoch: 1,
            index: 0,
            created_unix_ms: 0,
        };
        let seal_copy = stage_speed(&segments, |p| drop(seal(p, &params, &key).unwrap()));
        let seal1 = seal_owned_speed(&segments, &params, &key);
        let one = pipeline_speed(stream, 1);
        let two = pipeline_speed(stream, 2);
        println!(
            "| {} | {lz4:.0} MB/s | {aes_rc:.0} MB/s | {aes_ring:.0} MB/s | {seal_copy:.0} MB/s | {seal1:.0} MB/s | {one:.0} MB/s | {:.2} | {two:.0} MB/s | {:.2} | {:.2} |",
            stream.name,
            one / seal1,
            two / (2.0 * seal1),
            compressed as f64 / (plain as f64 * 3.0)
        );
    }
}
