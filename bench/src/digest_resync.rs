//! Digest resync benchmark (issue #4), all in one run on the same data:
//!
//! 1. Digest scan speed (reading a file with io_uring and hashing 64 KiB blocks, what
//!    both sides of a resync do) beside plain SHA-256 over the same bytes in memory.
//!    Goal: scan >= 0.9 x SHA-256.
//! 2. Resync of an image with 1% of its blocks changed: bytes sent and time of the
//!    digest resync (replica digests + source compare + sealing the differing blocks
//!    as segments) beside `rsync --inplace --no-whole-file` on the same pair of files.
//!
//! Images live on tmpfs (/dev/shm) so the disk is not what is measured; every block
//! holds half-compressible random data (no zero-block shortcut).
//!
//! Usage: digest-resync [GiB, default 2] [changed percent, default 1]

use blkfilter::workload::Rng;
use changelog::digests::{block_count, block_digest, file_digests, DigestAnswer};
use changelog::{seal, Key, Op, PlainSegment, RecordRef, SealParams, VolumeId};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

const BLOCK: usize = 64 << 10;

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gib: u64 = args.next().map_or(2, |a| a.parse().expect("GiB"));
    let percent: f64 = args.next().map_or(1.0, |a| a.parse().expect("percent"));
    let size = gib << 30;
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
    let (src_path, dst_path, rsync_path) = (
        dir.path().join("source.img"),
        dir.path().join("replica.img"),
        dir.path().join("rsync-replica.img"),
    );

    // Source image, and a replica equal but for `percent` of the blocks.
    let blocks = block_count(size, BLOCK as u32);
    let mut rng = Rng::new(7);
    let mut buf = vec![0u8; 4 << 20];
    let mut src = File::create(&src_path).unwrap();
    let mut dst = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&dst_path)
        .unwrap();
    let mut hasher_input = Vec::with_capacity(size as usize);
    for _ in 0..size / buf.len() as u64 {
        rng.fill_half_compressible(&mut buf);
        src.write_all(&buf).unwrap();
        dst.write_all(&buf).unwrap();
        hasher_input.extend_from_slice(&buf);
    }
    let changed = ((blocks as f64 * percent / 100.0).round() as u64).max(1);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < changed {
        picked.insert(rng.below(blocks));
    }
    for &b in &picked {
        let mut bytes = [0u8; 16];
        dst.read_exact_at(&mut bytes, b * BLOCK as u64 + 1000)
            .unwrap();
        bytes.iter_mut().for_each(|x| *x ^= 0xff);
        dst.write_all_at(&bytes, b * BLOCK as u64 + 1000).unwrap();
    }
    drop((src, dst));
    std::fs::copy(&dst_path, &rsync_path).unwrap();

    // 1. Scan speed beside SHA-256 on the same bytes.
    let t = Instant::now();
    let mem: Vec<[u8; 32]> = hasher_input
        .chunks(BLOCK)
        .map(|c| Sha256::digest(c).into())
        .collect();
    let sha_secs = t.elapsed().as_secs_f64();
    drop(hasher_input);
    let t = Instant::now();
    let scanned =
        file_digests(&File::open(&src_path).unwrap(), size, BLOCK as u32, |_| {}).unwrap();
    let scan_secs = t.elapsed().as_secs_f64();
    assert_eq!(mem, scanned, "scan and plain SHA-256 disagree");
    println!("| digest scan ({gib} GiB, 64 KiB blocks) | GB/s |");
    println!("|---|---|");
    println!(
        "| SHA-256 in memory (baseline) | {:.2} |",
        gbps(size, sha_secs)
    );
    println!(
        "| file_digests (io_uring read + SHA-256) | {:.2} |",
        gbps(size, scan_secs)
    );
    println!("| ratio (goal >= 0.9) | {:.2} |", sha_secs / scan_secs);
    println!();

    // 2. Digest resync: what the recovery side computes, what the source side compares
    // and sends (sealed segments of the differing blocks plus the digest answer).
    let key = Key::from_bytes([1; 32]);
    let t = Instant::now();
    let replica =
        file_digests(&File::open(&dst_path).unwrap(), size, BLOCK as u32, |_| {}).unwrap();
    let answer = DigestAnswer {
        gen: 1,
        block_bytes: BLOCK as u32,
        blocks: None,
        device_bytes: size,
        digests: replica,
    }
    .seal(&key, "bench")
    .unwrap();
    let t_replica = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let src = File::open(&src_path).unwrap();
    let mut block = vec![0u8; BLOCK];
    let mut differing = Vec::new();
    let answer = DigestAnswer::open(&key, "bench", 1, "answer", answer.clone())
        .map(|a| (a, answer.len()))
        .unwrap();
    for (i, digest) in answer.0.digests.iter().enumerate() {
        src.read_exact_at(&mut block, (i * BLOCK) as u64).unwrap();
        if block_digest(&block) != *digest {
            differing.push(i);
        }
    }
    let mut plain = PlainSegment::default();
    let mut sealed_bytes = 0u64;
    let params = SealParams {
        volume: VolumeId::new("bench").unwrap(),
        epoch: 1,
        index: 0,
        created_unix_ms: 0,
    };
    for (seq, &i) in differing.iter().enumerate() {
        src.read_exact_at(&mut block, (i * BLOCK) as u64).unwrap();
        plain.push(&RecordRef {
            seq: seq as u64 + 1,
            op: Op::Write,
            flags: 0,
            offset: (i * BLOCK) as u64,
            len: BLOCK as u32,
            data: &block,
        });
    }
    if !plain.is_empty() {
        sealed_bytes += seal(&plain, &params, &key)
            .unwrap()
            .link([0; 32])
            .bytes
            .len() as u64;
    }
    let t_source = t.elapsed().as_secs_f64();
    assert_eq!(
        differing.len() as u64,
        changed,
        "found exactly the changed blocks"
    );
    let ours_bytes = sealed_bytes + answer.1 as u64;

    // rsync on the same pair (a fresh copy of the replica).
    let t = Instant::now();
    let out = std::process::Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--stats"])
        .arg(&src_path)
        .arg(&rsync_path)
        .output()
        .expect("rsync (apt install rsync)");
    let t_rsync = t.elapsed().as_secs_f64();
    let stats = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("0").replace(',', ""))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let rsync_bytes = field("Total bytes sent:") + field("Total bytes received:");
    println!(
        "| resync, {gib} GiB image, {changed} of {blocks} blocks ({percent}%) changed | bytes sent | % of image | time s |"
    );
    println!("|---|---|---|---|");
    println!(
        "| ublk-dr digest resync (replica digests {t_replica:.2} s + source compare and seal {t_source:.2} s) | {} | {:.2} | {:.2} |",
        ours_bytes,
        ours_bytes as f64 * 100.0 / size as f64,
        t_replica + t_source
    );
    println!(
        "| rsync --inplace --no-whole-file | {} | {:.2} | {:.2} |",
        rsync_bytes,
        rsync_bytes as f64 * 100.0 / size as f64,
        t_rsync
    );
}
