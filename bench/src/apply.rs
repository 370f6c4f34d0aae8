//! Recovery-side benchmark (issue #5), in one run on the same data:
//!
//! 1. Apply throughput (`Applier`: authenticate, decompress, save the undo journal,
//!    write with io_uring, fdatasync per segment) beside raw io_uring writes of the same
//!    records to the same kind of replica file, also synced per segment. Goal >= 0.9x.
//!    The two alternate for five rounds, each on a fresh file, after an untimed round
//!    of each: the ratio printed is the median of the rounds' ratios, the MB/s each
//!    side's best round.
//!    Opening the segments alone (AES-GCM + lz4) is printed too, and the Applier's own
//!    time per phase ([`ublk_target::ApplyTimes`]) and its process CPU time per
//!    segment, to show where the time goes. The Applier runs on two threads (opening
//!    the next segment beside journaling and writing the current one) plus a hashing
//!    thread and io_uring's workers, so on a 2-core machine its CPU time, not a single
//!    thread, is what bounds it: the undo journal alone (read, SHA-256 and write of the
//!    before-images) takes over twice the CPU time of the raw writes.
//! 2. Test-failover bring-up: opening a view at the oldest of 20 retained points
//!    (`PointView::open`, what `failover --test` does before the ublk device exists)
//!    plus its first 1 MiB read, for 1 GiB and 8 GiB replicas. Goal: under 2 s.
//! 3. Reads through a view at a point with 999 undo journals after it: random 4 KiB
//!    reads of blocks written since, each from a journal, with as many journals kept
//!    open as the process's open-file limit allows and with the floor of 64 (the others
//!    opened again as reads need them), beside the same reads at a point with fewer
//!    journals after it than that (all open) and beside reading the replica file; each
//!    after an untimed pass of the same reads.
//!
//! Files live on tmpfs (/dev/shm) by default so the disk is not what is measured; on a
//! filesystem that shares blocks (XFS, btrfs; bench/apply-reflink.sh makes an XFS
//! image on tmpfs) the undo journal clones before-images instead of copying them, and
//! the Applier with copied before-images (`--copy-undo`) is measured beside it.
//! Usage: apply [MiB of 64 KiB writes, default 512] [DIR, default /dev/shm]
//!        apply --prepare-views DIR   (only makes the bring-up replicas under DIR, for
//!                                     bench/failover.sh to bring up on real ublk)

use blkfilter::workload::Rng;
use changelog::uring::{IoOp, Uring};
use changelog::{
    flags, seal, ChainCursor, Key, LocalDirStore, Op, PlainSegment, RecordRef, SealParams,
    TargetStore, VolumeId,
};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use ublk_target::{Applier, ApplyOptions, PointView, ReplicaPaths, UndoMethod};

const SEGMENT_BYTES: usize = 8 << 20;
/// Rounds of raw writes and Applier runs, alternating (odd, for a median).
const ROUNDS: usize = 5;

/// Seals `writes` (offset, data) into a chain of segments in `store`; returns them as
/// plain record lists per segment for the raw baseline.
fn make_store(
    store: &LocalDirStore,
    volume: &VolumeId,
    key: &Key,
    writes: &[(u64, Vec<u8>)],
) -> Vec<Vec<(u64, Vec<u8>)>> {
    let mut segments = Vec::new();
    let mut plain = crash_point_segment();
    let mut current = Vec::new();
    let mut prev = [0u8; 32];
    let mut index = 0u64;
    let mut flush = |plain: &mut PlainSegment, current: &mut Vec<(u64, Vec<u8>)>| {
        let params = SealParams {
            volume: volume.clone(),
            epoch: 42,
            index,
            created_unix_ms: changelog::unix_ms_now(),
        };
        let linked = seal(plain, &params, key).expect("seal").link(prev);
        store.put(volume, index, &linked.bytes).expect("put");
        prev = linked.digest;
        index += 1;
        *plain = crash_point_segment();
        segments.push(std::mem::take(current));
    };
    for (i, (offset, data)) in writes.iter().enumerate() {
        plain.push(&RecordRef {
            seq: i as u64 + 1,
            op: Op::Write,
            flags: 0,
            offset: *offset,
            len: data.len() as u32,
            data,
        });
        current.push((*offset, data.clone()));
        if plain.body().len() >= SEGMENT_BYTES {
            flush(&mut plain, &mut current);
        }
    }
    if !plain.is_empty() {
        flush(&mut plain, &mut current);
    }
    segments
}

fn writes(seed: u64, count: usize, len: usize, device: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let mut data = vec![0u8; len];
            rng.fill_half_compressible(&mut data);
            (rng.below(device / len as u64) * len as u64, data)
        })
        .collect()
}

fn sparse(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// Finishes the file system's deferred work (on XFS, freeing the blocks of files just
/// removed happens in the background) so it is not billed to the next timed run.
fn settle(dir: &Path) {
    let dir = File::open(dir).unwrap();
    // SAFETY: syncfs on a descriptor this function owns for the call.
    assert_eq!(unsafe { libc::syncfs(dir.as_raw_fd()) }, 0, "syncfs");
}

/// CPU time of the whole process so far (every thread, io_uring workers included).
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let key = Key::from_bytes([5; 32]);
    if args.first().map(String::as_str) == Some("--prepare-views") {
        // For bench/failover.sh: the same replicas, for `ublk-target failover --test`
        // to bring up on real ublk.
        let dir = Path::new(args.get(1).expect("--prepare-views DIR"));
        for gib in VIEW_GIB {
            let replica =
                prepare_view_replica(&dir.join(format!("g{gib}")), gib, VIEW_POINTS, &key);
            println!("{}", replica.display());
        }
        return;
    }
    let mib: usize = args.first().map_or(512, |a| a.parse().expect("MiB"));
    let root = args.get(1).map_or("/dev/shm", String::as_str);
    let dir = tempfile::tempdir_in(root).expect("bench dir");
    let volume = VolumeId::new("bench").unwrap();
    let device = 1u64 << 30;

    // 1. Apply beside raw io_uring writes.
    let store = LocalDirStore::new(dir.path().join("store"));
    let stream = writes(1, mib * 16, 64 << 10, device);
    let bytes: u64 = stream.iter().map(|(_, d)| d.len() as u64).sum();
    let segments = make_store(&store, &volume, &key, &stream);
    drop(stream);

    // Raw writes and the Applier alternate, ROUNDS times, each on a fresh sparse file
    // removed afterwards (and the file system settled, see `settle`): this machine's
    // speed moves between runs more than the two differ, so the ratio is taken per
    // round (the median is printed) and each side's best round is shown.
    let raw_round = |round: usize| {
        let path = dir.path().join(format!("raw{round}.img"));
        sparse(&path, device);
        let raw = File::options().write(true).open(&path).unwrap();
        let mut uring = Uring::new(64).unwrap();
        let t = Instant::now();
        for records in &segments {
            // Batches of non-overlapping writes, as apply submits them.
            let mut batch: Vec<(u64, u64)> = Vec::new();
            let mut ops = Vec::new();
            for (offset, data) in records {
                let range = (*offset, offset + data.len() as u64);
                if batch.iter().any(|&(s, e)| s < range.1 && range.0 < e) {
                    uring.run_batch(raw.as_raw_fd(), ops.drain(..)).unwrap();
                    batch.clear();
                }
                batch.push(range);
                ops.push(IoOp::Write {
                    offset: *offset,
                    data,
                });
            }
            uring.run_batch(raw.as_raw_fd(), ops).unwrap();
            uring.fsync(raw.as_raw_fd(), true).unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        std::fs::remove_file(&path).unwrap();
        settle(dir.path());
        secs
    };
    let apply_round = |name: &str, copy_undo: bool| {
        let replica = dir.path().join(format!("{name}.img"));
        sparse(&replica, device);
        let paths = ReplicaPaths::new(&replica);
        let mut applier = Applier::open(
            Arc::new(store.clone()),
            volume.clone(),
            key.clone(),
            &replica,
            &paths.state,
            &ApplyOptions {
                copy_undo,
                ..ApplyOptions::default()
            },
        )
        .unwrap();
        let cpu0 = cpu_secs();
        let t = Instant::now();
        let applied = applier.apply_available().unwrap();
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_secs() - cpu0;
        assert_eq!(applied, segments.len());
        let result = (secs, cpu, *applier.times(), applier.undo_method());
        drop(applier);
        std::fs::remove_file(&replica).unwrap();
        std::fs::remove_file(&paths.state).unwrap();
        std::fs::remove_dir_all(&paths.journal).unwrap();
        settle(dir.path());
        result
    };
    let mut raw_secs = Vec::new();
    let mut applied = Vec::new();
    // One untimed round of each first: the first runs on a new file system (or a new
    // machine's memory) are up to 4x slower than the rest, whichever side goes first.
    raw_round(ROUNDS);
    apply_round("warm-up", false);
    for round in 0..ROUNDS {
        raw_secs.push(raw_round(round));
        applied.push(apply_round(&format!("replica{round}"), false));
    }
    let method = applied[0].3;
    let copied = (method != UndoMethod::Copy).then(|| apply_round("copied", true));

    let t = Instant::now();
    let mut cursor = ChainCursor::start(volume.clone());
    for index in store.list(&volume).unwrap() {
        let bytes = store.get(&volume, index).unwrap().unwrap();
        let opened = cursor.open_next(bytes, "s", &key).unwrap();
        cursor.advance(&opened.header, opened.digest);
    }
    let open_secs = t.elapsed().as_secs_f64();

    let best_raw = raw_secs.iter().copied().fold(f64::MAX, f64::min);
    let best = applied
        .iter()
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .expect("a round");
    let (apply_secs, apply_cpu, times) = (best.0, best.1, best.2);
    let mut ratios: Vec<f64> = raw_secs
        .iter()
        .zip(&applied)
        .map(|(raw, apply)| raw / apply.0)
        .collect();
    // Each round in order: raw MB/s, Applier MB/s, ratio.
    let rounds = raw_secs
        .iter()
        .zip(&applied)
        .map(|(raw, apply)| {
            format!(
                "{:.0}/{:.0} = {:.2}",
                mbps(bytes, apply.0),
                mbps(bytes, *raw),
                raw / apply.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    ratios.sort_by(f64::total_cmp);
    println!(
        "| apply, {mib} MiB of 64 KiB writes in {} segments, 1 GiB replica, in {root}; best of {ROUNDS} alternating rounds | MB/s |",
        segments.len()
    );
    println!("|---|---|");
    println!(
        "| raw io_uring writes + fdatasync per segment (baseline) | {:.0} |",
        mbps(bytes, best_raw)
    );
    println!(
        "| open segments alone (chain + AES-GCM + lz4) | {:.0} |",
        mbps(bytes, open_secs)
    );
    let undo = match method {
        UndoMethod::Share { .. } => "before-images sharing the replica's blocks",
        UndoMethod::Copy => "before-images copied",
    };
    println!(
        "| Applier (open + undo journal, {undo} + writes + fdatasync) | {:.0} |",
        mbps(bytes, apply_secs)
    );
    if let Some((secs, _, _, _)) = copied {
        println!(
            "| Applier with before-images copied (--copy-undo), one round | {:.0} |",
            mbps(bytes, secs)
        );
    }
    println!(
        "| ratio apply / raw, median of the rounds' (in order, Applier/raw MB/s: {rounds}) (goal >= 0.9) | {:.2} |",
        ratios[ROUNDS / 2]
    );
    let per_segment = |d: std::time::Duration| d.as_secs_f64() * 1e3 / times.segments.max(1) as f64;
    println!();
    println!(
        "Applier phases in its best round, ms per segment (wall time on the thread running \
         each; {:.2} ms per segment in all, {:.2} ms of CPU): fetch {:.2}, open {:.2}, undo read {:.2}, undo save {:.2}, \
         writes {:.2}, fdatasync {:.2}, state {:.2}",
        apply_secs * 1e3 / times.segments.max(1) as f64,
        apply_cpu * 1e3 / times.segments.max(1) as f64,
        per_segment(times.fetch),
        per_segment(times.open),
        per_segment(times.undo_read),
        per_segment(times.undo_save),
        per_segment(times.write),
        per_segment(times.sync),
        per_segment(times.state),
    );
    println!();

    // 2. Test-failover bring-up for 1 and 8 GiB replicas with 20 retained points.
    println!("| test-failover bring-up, 20 retained points | view open + first 1 MiB read, s |");
    println!("|---|---|");
    for gib in VIEW_GIB {
        let sub = dir.path().join(format!("g{gib}"));
        let replica = prepare_view_replica(&sub, gib, VIEW_POINTS, &key);
        let paths = ReplicaPaths::new(replica);
        let t = Instant::now();
        let mut view = PointView::open(&paths, 0).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        view.read_at(&mut buf, 0).unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "| {gib} GiB replica, point 0 of 0..={} | {secs:.3} |",
            VIEW_POINTS - 1
        );
        view.close().unwrap();
    }
    println!();
    view_reads(&dir.path().join("reads"), &key);
}

/// Part 3: 4 KiB reads through views, each of a block a segment after the view's
/// point wrote, in random order.
fn view_reads(sub: &Path, key: &Key) {
    const POINTS: usize = 1000;
    let replica = prepare_view_replica(sub, 1, POINTS, key);
    let written: Vec<u64> = writes(1, POINTS * 64, 4096, 1 << 30)
        .into_iter()
        .map(|(offset, _)| offset)
        .collect();
    let paths = ReplicaPaths::new(replica.clone());
    let floor = ublk_target::view::OPEN_UNDO_FILES;
    let few = floor / 2;
    let mut rng = Rng::new(3);
    let mut order = |offsets: &[u64]| {
        let mut offsets = offsets.to_vec();
        for i in (1..offsets.len()).rev() {
            offsets.swap(i, rng.below(i as u64 + 1) as usize);
        }
        offsets
    };
    let many_reads = order(&written[64..]);
    let few_reads = order(&written[(POINTS - few) * 64..]);
    let mut buf = vec![0u8; 4096];
    // Reads per second, how many undo files the view kept open, seconds to open it.
    let mut rate = |point: u64, offsets: &[u64], open: Option<usize>| {
        let options = ublk_target::ViewOptions {
            undo_files_open: open,
            ..Default::default()
        };
        let t = Instant::now();
        let mut view = PointView::open_with(&paths, point, &options).unwrap();
        let opening = t.elapsed().as_secs_f64();
        // A first pass untimed: the page cache then holds every journal's data, so
        // the timed pass measures the view, not the first reads of files (on XFS,
        // shared blocks read from the disk).
        for &offset in offsets {
            view.read_at(&mut buf, offset).unwrap();
        }
        let t = Instant::now();
        for &offset in offsets {
            view.read_at(&mut buf, offset).unwrap();
        }
        let rate = offsets.len() as f64 / t.elapsed().as_secs_f64();
        let kept = view.undo_files_kept_open();
        view.close().unwrap();
        (rate, kept, opening)
    };
    let (by_limit, kept, opening) = rate(0, &many_reads, None);
    let (at_floor, ..) = rate(0, &many_reads, Some(floor));
    let (through_few, ..) = rate((POINTS - few - 1) as u64, &few_reads, None);
    let file = File::open(&replica).unwrap();
    let mut read_all = || {
        let t = Instant::now();
        for &offset in &many_reads {
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset).unwrap();
        }
        many_reads.len() as f64 / t.elapsed().as_secs_f64()
    };
    read_all(); // untimed, as for the views
    let direct = read_all();
    let journals = POINTS - 1;
    println!(
        "| random 4 KiB reads of blocks written after the point, 1 GiB replica, {POINTS} \
         points | reads/s |"
    );
    println!("|---|---|");
    println!(
        "| view at point 0: {journals} journals after it, at most {kept} open (by the \
         open-file limit) | {by_limit:.0} |"
    );
    println!("| the same, at most {floor} open (the floor) | {at_floor:.0} |");
    println!(
        "| view at point {}: {few} journals after it, all open | {through_few:.0} |",
        POINTS - few - 1
    );
    println!("| the replica file itself (pread, no view) | {direct:.0} |");
    println!(
        "| ratios to the all-open view: {journals} journals by the limit / at the floor \
         | {:.2} / {:.2} |",
        by_limit / through_few,
        at_floor / through_few
    );
    println!();
    println!(
        "Opening the view at point 0 ({journals} journals: each one's header and extent \
         table; its data is verified at the first read from it): {opening:.3} s"
    );
    let t = Instant::now();
    let points = ublk_target::catalog(&paths).unwrap().points.len();
    println!(
        "The catalog of those {points} points (what `points` and `status` read): {:.3} s",
        t.elapsed().as_secs_f64()
    );
}

/// Replica sizes of the bring-up measurement.
const VIEW_GIB: [u64; 2] = [1, 8];
/// Recovery points (segments of 64 random 4 KiB writes) each bring-up replica keeps.
const VIEW_POINTS: usize = 20;

/// Makes `sub/replica.img` (sparse, `gib` GiB) with `points` applied and retained
/// points 0..points, segments of 64 random 4 KiB writes (those of `writes(gib, ..)`),
/// its state and undo journal beside it where [`ReplicaPaths::new`] (and so
/// `ublk-target failover`) looks for them.
fn prepare_view_replica(sub: &Path, gib: u64, points: usize, key: &Key) -> std::path::PathBuf {
    std::fs::create_dir_all(sub).unwrap();
    let store = LocalDirStore::new(sub.join("store"));
    let stream = writes(gib, points * 64, 4096, gib << 30);
    let volume = VolumeId::new("bringup").unwrap();
    let mut prev = [0u8; 32];
    for (chunk_no, chunk) in stream.chunks(64).enumerate() {
        let mut plain = crash_point_segment();
        for (i, (offset, data)) in chunk.iter().enumerate() {
            plain.push(&RecordRef {
                seq: (chunk_no * 64 + i) as u64 + 1,
                op: Op::Write,
                flags: 0,
                offset: *offset,
                len: data.len() as u32,
                data,
            });
        }
        let params = SealParams {
            volume: volume.clone(),
            epoch: 7,
            index: chunk_no as u64,
            created_unix_ms: changelog::unix_ms_now(),
        };
        let linked = seal(&plain, &params, key).unwrap().link(prev);
        store.put(&volume, chunk_no as u64, &linked.bytes).unwrap();
        prev = linked.digest;
    }
    let replica = sub.join("replica.img");
    sparse(&replica, gib << 30);
    let paths = ReplicaPaths::new(replica.clone());
    let mut applier = Applier::open(
        Arc::new(store),
        volume,
        key.clone(),
        &replica,
        &paths.state,
        &ApplyOptions::default(),
    )
    .unwrap();
    assert_eq!(applier.apply_available().unwrap(), points);
    replica
}

/// An empty segment that is a crash point, as the shipper cuts them.
fn crash_point_segment() -> PlainSegment {
    let mut plain = PlainSegment::default();
    plain.flags = flags::CRASH_POINT;
    plain
}
