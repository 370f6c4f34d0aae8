//! Retention at scale (issue #5's recovery points), in one run on the same segments:
//! applying with a retention policy beside applying without one, as the number of
//! retained undo journals grows. Every segment is a recovery point, so a volume that
//! ships a segment a second and keeps 15 days holds over a million journals: what
//! retention costs per segment must not grow with them.
//!
//! Three appliers take the same chain of small segments (one 4 KiB write each, a crash
//! point each) into fresh replicas:
//!
//! * no retention (the baseline: journals pile up, nothing is pruned);
//! * `keep_points` above the chain's length (retention runs after every segment and
//!   finds nothing to drop: its bookkeeping alone);
//! * `keep_points` at a tenth of the chain (it drops one journal per segment once full);
//! * thinning to about one point per hundred segments (intervals of the time sealing a
//!   hundred took; every point already past the horizon): the applier merges a run of
//!   undo files now and then, on a thread of its own, one run at a time;
//! * thinning with every point in the recent past (`thin_after` a day, intervals of an
//!   hour): nothing to thin, so this is the walk over the points alone, which must not
//!   cost more per segment as the recent points pile up.
//!
//! Printed: segments per second over the first and the last tenth of the chain for
//! each (the best of three alternating rounds), and the ratios to the baseline in the
//! same window; then how long reading the
//! catalog takes with every journal retained and with a tenth (it reads them all).
//!
//! Usage: retention [SEGMENTS, default 20000] [DIR, default /dev/shm]

use changelog::{
    flags, seal, Key, LocalDirStore, Op, PlainSegment, RecordRef, SealParams, TargetStore, VolumeId,
};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use ublk_target::{Applier, ApplyOptions, ReplicaPaths, Retention};

const DEVICE: u64 = 64 << 20;
const WRITE: usize = 4096;
/// Rounds of the three appliers, alternating.
const ROUNDS: usize = 3;

/// Seals `count` one-write crash-point segments into `store`.
fn make_store(store: &LocalDirStore, volume: &VolumeId, key: &Key, count: u64) {
    let mut prev = [0u8; 32];
    let mut data = vec![0u8; WRITE];
    for index in 0..count {
        data[..8].copy_from_slice(&index.to_le_bytes());
        let mut plain = PlainSegment::default();
        plain.flags = flags::CRASH_POINT;
        plain.push(&RecordRef {
            seq: index + 1,
            op: Op::Write,
            flags: 0,
            offset: index * WRITE as u64 % DEVICE,
            len: WRITE as u32,
            data: &data,
        });
        let params = SealParams {
            volume: volume.clone(),
            epoch: 42,
            index,
            created_unix_ms: changelog::unix_ms_now(),
        };
        let linked = seal(&plain, &params, key).expect("seal").link(prev);
        store.put(volume, index, &linked.bytes).expect("put");
        prev = linked.digest;
    }
}

/// Applies the whole chain into a fresh replica in `dir` under `retention`; returns
/// the time each segment was done, from the start, and how long reading the
/// replica's catalog then took (what `ublk-target status` and `points` do), in s.
fn apply(
    dir: &Path,
    store: &LocalDirStore,
    volume: &VolumeId,
    key: &Key,
    retention: Retention,
) -> (Vec<f64>, f64) {
    let replica = dir.join("replica.img");
    File::create(&replica).unwrap().set_len(DEVICE).unwrap();
    let paths = ReplicaPaths::new(&replica);
    let mut applier = Applier::open(
        Arc::new(store.clone()),
        volume.clone(),
        key.clone(),
        &replica,
        &paths.state,
        &ApplyOptions {
            retention,
            ..ApplyOptions::default()
        },
    )
    .unwrap();
    let t = Instant::now();
    let mut done = Vec::new();
    applier
        .apply_available_with(&mut |_: &ublk_target::Applied| done.push(t.elapsed().as_secs_f64()))
        .unwrap();
    drop(applier);
    let t = Instant::now();
    ublk_target::catalog(&paths).unwrap();
    let catalog_secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&replica).unwrap();
    std::fs::remove_dir_all(&paths.journal).unwrap();
    std::fs::remove_file(&paths.state).unwrap();
    (done, catalog_secs)
}

/// Segments per second between the `from`th and the `to`th segment done.
fn rate(done: &[f64], from: usize, to: usize) -> f64 {
    let start = if from == 0 { 0.0 } else { done[from - 1] };
    (to - from) as f64 / (done[to - 1] - start)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: u64 = args
        .first()
        .map_or(20_000, |a| a.parse().expect("SEGMENTS"));
    let base = args.get(1).map_or("/dev/shm", String::as_str);
    let dir = tempfile::Builder::new()
        .prefix("ublk-dr-retention-bench")
        .tempdir_in(base)
        .unwrap();
    let key = Key::from_bytes([7; 32]);
    let volume = VolumeId::new("bench").unwrap();
    let store = LocalDirStore::new(dir.path().join("store"));
    let sealing = Instant::now();
    make_store(&store, &volume, &key, count);
    let every_ms = (sealing.elapsed().as_millis() as u64 * 100 / count).max(1);

    let n = count as usize;
    let tenth = n / 10;
    let windows = [(0, tenth), (n - tenth, n)];
    let runs = [
        ("no retention (baseline)", Retention::default()),
        (
            "keep_points above the chain (retention finds nothing to drop)",
            Retention {
                keep_points: Some(n + 1),
                keep_age: None,
                keep_size: None,
                thin: None,
            },
        ),
        (
            "keep_points a tenth of the chain (one journal dropped per segment)",
            Retention {
                keep_points: Some(tenth),
                keep_age: None,
                keep_size: None,
                thin: None,
            },
        ),
        (
            "thinning to a point per ~100 segments (undo files merged as it goes)",
            Retention {
                thin: Some(ublk_target::points::Thinning {
                    after: std::time::Duration::ZERO,
                    every: std::time::Duration::from_millis(every_ms),
                }),
                ..Retention::default()
            },
        ),
        (
            "thinning, every point recent (thin_after 1 day: the walk alone)",
            Retention {
                thin: Some(ublk_target::points::Thinning {
                    after: std::time::Duration::from_secs(86_400),
                    every: std::time::Duration::from_secs(3_600),
                }),
                ..Retention::default()
            },
        ),
    ];
    // The best of each, over rounds that alternate: this machine's speed drifts more
    // between runs than retention costs.
    let mut catalogs = vec![f64::MAX; runs.len()];
    let mut rates = vec![vec![0f64; windows.len()]; runs.len()];
    for _ in 0..ROUNDS {
        for (i, (_, retention)) in runs.iter().enumerate() {
            let (done, catalog_secs) = apply(dir.path(), &store, &volume, &key, *retention);
            assert_eq!(done.len(), n);
            catalogs[i] = catalogs[i].min(catalog_secs);
            for (w, &(a, b)) in windows.iter().enumerate() {
                rates[i][w] = rates[i][w].max(rate(&done, a, b));
            }
        }
    }
    println!(
        "| apply {n} one-write segments (each a recovery point), in {base}; best of {ROUNDS} alternating rounds | segments/s, segments 1-{tenth} | segments/s, segments {}-{n} | ratio to baseline, first | ratio to baseline, last |",
        n - tenth + 1
    );
    println!("|---|---|---|---|---|");
    for ((name, _), r) in runs.iter().zip(&rates) {
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} | {:.2} |",
            r[0],
            r[1],
            r[0] / rates[0][0],
            r[1] / rates[0][1]
        );
    }
    println!(
        "\nReading the catalog afterwards (`ublk-target status`, `points`; an applier's \
         first prune): {:.0} ms with {n} journals retained, {:.0} ms with {tenth}, {:.0} ms \
         thinned (intervals of {every_ms} ms).",
        catalogs[0] * 1e3,
        catalogs[2] * 1e3,
        catalogs[3] * 1e3
    );
}
