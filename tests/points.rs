//! Recovery points: the undo journal, the catalog, point views, retention and rollback,
//! checked against the reference model of the source.
//!
//! A point view at `P` must equal the model replayed through the last seq of segment
//! `P`. That fails if a journal held after-images instead of before-images, if the view
//! took a before-image from the wrong journal (any but the oldest newer than `P`), or if
//! it lost track while segments kept being applied.

use blkfilter::workload::Rng;
use e2e::*;
use std::path::{Path, PathBuf};
use ublk_target::{
    catalog, prune, rollback_steps, rollback_to, Applier, ApplyOptions, PointView, ReplicaPaths,
    Retention, TargetError, ViewOptions,
};

const SIZE: u64 = 8 << 20;

/// The model's image with every record of point `index` applied.
fn model_at(model: &Model, last_seq: u64) -> Vec<u8> {
    let mut r = model.replayer();
    r.advance_to(last_seq + 1);
    r.image
}

/// Reads a whole view in chunks whose size is not a multiple of anything the workload
/// uses, so reads start and end inside overlay pieces.
fn read_view(view: &mut PointView) -> Vec<u8> {
    let mut image = vec![0u8; view.size() as usize];
    let chunk = (192 << 10) + 4096 * 3 + 512;
    let mut pos = 0;
    while pos < image.len() {
        let n = chunk.min(image.len() - pos);
        view.read_at(&mut image[pos..pos + n], pos as u64)
            .expect("view read");
        pos += n;
    }
    image
}

/// Applies every segment in the store to replica `name` (default options).
fn apply_all(fixture: &Fixture, name: &str) -> usize {
    let mut applier = fixture.applier(name, &fixture.key).unwrap();
    applier.apply_available().unwrap()
}

/// SHA-256 of every file in a directory (not recursing), by name.
fn dir_digests(dir: &Path) -> Vec<(String, [u8; 32])> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                file_sha256(&e.path()),
            )
        })
        .collect();
    out.sort();
    out
}

/// The segment of each undo file in `spans`, which must be one segment's each.
fn singles(spans: &[(u64, u64)]) -> Vec<u64> {
    spans
        .iter()
        .map(|&(first, last)| {
            assert_eq!(first, last, "a merged file in {spans:?}");
            last
        })
        .collect()
}

fn undo_path(paths: &ReplicaPaths, index: u64) -> PathBuf {
    paths.journal.join(format!("{index:016x}.undo"))
}

fn every_point_matches(seed: u64) {
    let (fixture, model) = Fixture::shipped(SIZE, seed, 300);
    let segments = apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let catalog = catalog(&paths).unwrap();
    assert!(segments >= 8, "only {segments} segments");
    assert_eq!(
        catalog.points.len(),
        segments,
        "every segment of an undisturbed stream is a crash point, and all are retained"
    );
    assert_eq!(catalog.latest_applied, Some(segments as u64 - 1));
    assert!(catalog.points.last().unwrap().latest);
    assert!(
        std::fs::read(&paths.replica).unwrap() == model.final_image(),
        "the replica holds the latest point"
    );

    let mut replay = model.replayer();
    let mut rng = Rng::new(seed);
    for point in &catalog.points {
        replay.advance_to(point.last_seq + 1);
        let mut view = PointView::open(&paths, point.index).unwrap();
        assert_eq!(view.point().index, point.index);
        assert_eq!(view.point().last_seq, point.last_seq);
        assert!(
            read_view(&mut view) == replay.image,
            "view at point {} differs from the model at seq {}",
            point.index,
            point.last_seq + 1
        );
        // Random small reads land anywhere in the overlay map.
        for _ in 0..50 {
            let len = 1 + rng.below(64 << 10) as usize;
            let offset = rng.below(SIZE - len as u64) as usize;
            let mut buf = vec![0u8; len];
            view.read_at(&mut buf, offset as u64).unwrap();
            assert!(
                buf == replay.image[offset..offset + len],
                "point {}: {len} bytes at {offset}",
                point.index
            );
        }
    }
}

#[test]
fn every_point_view_equals_the_model_seed_1() {
    every_point_matches(1);
}

#[test]
fn every_point_view_equals_the_model_seed_2() {
    every_point_matches(0x5eed_0002);
}

/// A replica file shorter than the disk (here: empty at the start): bytes past its end
/// read as zeroes, in the journals too.
#[test]
fn short_replica_reads_zeroes_past_its_end() {
    let (fixture, model) = Fixture::shipped(SIZE, 3, 200);
    std::fs::File::create(fixture.path("replica")).unwrap();
    apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let options = ViewOptions {
        size: Some(SIZE),
        ..ViewOptions::default()
    };
    for point in catalog(&paths).unwrap().points.iter().step_by(3) {
        let mut view = PointView::open_with(&paths, point.index, &options).unwrap();
        assert!(
            read_view(&mut view) == model_at(&model, point.last_seq),
            "point {}",
            point.index
        );
    }
}

/// A view opened while half the segments are applied stays at its point while the
/// rest is applied by another process; the replica ends at the final image.
#[test]
fn view_stays_at_its_point_while_another_process_applies() {
    let (fixture, model) = Fixture::shipped(SIZE, 21, 300);
    let total = fixture.store_segments().len();
    let half = total / 2;
    let paths = fixture.replica_paths("replica");
    {
        let mut applier = fixture.applier("replica", &fixture.key).unwrap();
        for _ in 0..half {
            applier.apply_next().unwrap().unwrap();
        }
    }
    let points = catalog(&paths).unwrap().points;
    let latest = *points.last().unwrap();
    let older = points[points.len() / 3];
    let mut at_latest = PointView::open(&paths, latest.index).unwrap();
    let mut at_older = PointView::open(&paths, older.index).unwrap();
    let expect_latest = model_at(&model, latest.last_seq);
    let expect_older = model_at(&model, older.last_seq);
    assert!(read_view(&mut at_latest) == expect_latest);

    let mut child = apply_command(&fixture, "replica")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let mut reads = 0;
    loop {
        let running = child.try_wait().unwrap().is_none();
        assert!(
            read_view(&mut at_latest) == expect_latest,
            "view at the then-latest point {} moved while applying (read {reads})",
            latest.index
        );
        assert!(read_view(&mut at_older) == expect_older);
        reads += 1;
        if !running {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(
        at_latest.journals_loaded(),
        total - half,
        "the view picked up the journal of every segment applied after it"
    );
    assert!(std::fs::read(&paths.replica).unwrap() == model.final_image());
    // A view opened now at the same point agrees.
    let mut fresh = PointView::open(&paths, latest.index).unwrap();
    assert!(read_view(&mut fresh) == expect_latest);
}

/// The same within one process: apply on a thread while a view is read.
#[test]
fn view_stays_at_its_point_while_a_thread_applies() {
    let (fixture, model) = Fixture::shipped(SIZE, 22, 300);
    let paths = fixture.replica_paths("replica");
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    for _ in 0..3 {
        applier.apply_next().unwrap().unwrap();
    }
    let point = catalog(&paths).unwrap().points[1];
    let expect = model_at(&model, point.last_seq);
    let mut view = PointView::open(&paths, point.index).unwrap();
    let worker = std::thread::spawn(move || {
        while applier.apply_next().unwrap().is_some() {
            std::thread::yield_now();
        }
    });
    while !worker.is_finished() {
        assert!(read_view(&mut view) == expect, "view moved");
    }
    worker.join().unwrap();
    assert!(read_view(&mut view) == expect);
    assert!(std::fs::read(&paths.replica).unwrap() == model.final_image());
}

#[test]
fn view_writes_go_to_scratch_and_vanish_on_cleanup() {
    let (fixture, model) = Fixture::shipped(SIZE, 31, 250);
    apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let point = catalog(&paths).unwrap().points[2];
    let at_point = model_at(&model, point.last_seq);
    let replica_before = file_sha256(&paths.replica);
    let journals_before = dir_digests(&paths.journal);

    let scratch = fixture.path("my-scratch");
    let mut view = PointView::open_with(
        &paths,
        point.index,
        &ViewOptions {
            name: Some("test-failover".into()),
            scratch: Some(scratch.clone()),
            ..ViewOptions::default()
        },
    )
    .unwrap();
    assert!(paths.journal.join("views/test-failover").exists());
    assert!(scratch.exists());
    let mut expect = at_point.clone();
    let mut rng = Rng::new(5);
    for _ in 0..20 {
        let len = 512 * (1 + rng.below(300)) as usize;
        let offset = 512 * rng.below((SIZE - len as u64) / 512) as usize;
        let mut data = vec![0u8; len];
        rng.fill_half_compressible(&mut data);
        view.write_at(&data, offset as u64).unwrap();
        expect[offset..offset + len].copy_from_slice(&data);
    }
    view.discard(4096, 1 << 20).unwrap();
    expect[4096..4096 + (1 << 20)].fill(0);
    view.write_zeroes(3 << 20, 12345).unwrap();
    expect[3 << 20..(3 << 20) + 12345].fill(0);
    view.write_at(b"after zeroes", (3 << 20) + 100).unwrap();
    expect[(3 << 20) + 100..(3 << 20) + 112].copy_from_slice(b"after zeroes");
    view.flush().unwrap();
    assert!(
        read_view(&mut view) == expect,
        "the view shows its own writes"
    );
    assert!(
        view.write_at(b"x", SIZE).is_err(),
        "writes past the end are refused"
    );

    assert_eq!(
        file_sha256(&paths.replica),
        replica_before,
        "replica touched"
    );
    assert_eq!(
        dir_digests(&paths.journal),
        journals_before,
        "journals touched"
    );
    view.close().unwrap();
    assert!(!scratch.exists(), "scratch left behind");
    assert!(!paths.journal.join("views/test-failover").exists());

    let mut fresh = PointView::open(&paths, point.index).unwrap();
    assert!(
        read_view(&mut fresh) == at_point,
        "a fresh view still sees writes of a closed one"
    );
    drop(fresh);
    assert!(
        std::fs::read_dir(paths.journal.join("scratch"))
            .unwrap()
            .next()
            .is_none(),
        "dropping a view removes its scratch file"
    );
}

#[test]
fn retention_by_count() {
    let (fixture, model) = Fixture::shipped(SIZE, 41, 250);
    let total = apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let all = catalog(&paths).unwrap().points;
    assert_eq!(all.len(), total);

    let report = prune(
        &paths,
        &Retention {
            keep_points: Some(3),
            keep_age: None,
            keep_size: None,
            thin: None,
        },
        changelog::unix_ms_now(),
    )
    .unwrap();
    let left = catalog(&paths).unwrap();
    assert_eq!(report.points_left, 3);
    assert_eq!(
        left.points,
        all[total - 3..],
        "the three newest points remain"
    );
    assert_eq!(
        singles(&left.journals),
        ((total - 2) as u64..total as u64).collect::<Vec<_>>(),
        "exactly the journals the kept points need"
    );
    for p in &left.points {
        let mut view = PointView::open(&paths, p.index).unwrap();
        assert!(read_view(&mut view) == model_at(&model, p.last_seq));
    }
    let dropped = all[total - 4].index;
    let err = PointView::open(&paths, dropped).unwrap_err();
    assert!(matches!(err, TargetError::PointUnavailable { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "points {}..={} exist",
            all[total - 3].index,
            all[total - 1].index
        )) && message.contains("ublk-target points"),
        "{message}"
    );

    // keep_points 1: only the latest, and no journal at all.
    prune(
        &paths,
        &Retention {
            keep_points: Some(1),
            keep_age: None,
            keep_size: None,
            thin: None,
        },
        changelog::unix_ms_now(),
    )
    .unwrap();
    let left = catalog(&paths).unwrap();
    assert_eq!(left.points, all[total - 1..]);
    assert!(left.journals.is_empty());
}

/// The applier prunes after each segment when given a retention.
#[test]
fn applier_keeps_at_most_n_points() {
    let (fixture, model) = Fixture::shipped(SIZE, 42, 200);
    let paths = fixture.replica_paths("replica");
    let mut applier = fixture
        .applier_with(
            "replica",
            &fixture.key,
            &ApplyOptions {
                retention: Retention {
                    keep_points: Some(4),
                    keep_age: None,
                    keep_size: None,
                    thin: None,
                },
                ..ApplyOptions::default()
            },
        )
        .unwrap();
    let mut applied = 0;
    while let Some(a) = applier.apply_next().unwrap() {
        applied += 1;
        assert!(a.pruned.is_some());
        let c = catalog(&paths).unwrap();
        assert_eq!(c.points.len(), applied.min(4));
        assert_eq!(c.points.last().unwrap().index, a.header.index);
    }
    assert!(applied > 4);
    drop(applier);
    let oldest = catalog(&paths).unwrap().points[0];
    let mut view = PointView::open(&paths, oldest.index).unwrap();
    assert!(read_view(&mut view) == model_at(&model, oldest.last_seq));
}

/// The applier keeps what retention retains in memory between segments (reading the
/// catalog once): at every step it must leave exactly what a prune from scratch
/// would, through a view holding old journals, its release, and a restart.
#[test]
fn applier_retention_matches_the_catalog_at_every_step() {
    const KEEP: usize = 5;
    let (fixture, model) = Fixture::shipped(SIZE, 45, 600);
    let paths = fixture.replica_paths("replica");
    let options = ApplyOptions {
        retention: Retention {
            keep_points: Some(KEEP),
            keep_age: None,
            keep_size: None,
            thin: None,
        },
        ..ApplyOptions::default()
    };
    let mut applier = Some(
        fixture
            .applier_with("replica", &fixture.key, &options)
            .unwrap(),
    );
    let mut points = Vec::new();
    let mut view: Option<(PointView, u64)> = None;
    let mut step = 0;
    while let Some(a) = applier.as_mut().unwrap().apply_next().unwrap() {
        step += 1;
        if a.header.flags & changelog::flags::CRASH_POINT != 0 {
            points.push(a.header.index);
        }
        // What retention keeps: the newest KEEP points, and back to a held view's.
        let kept_from = points.len().saturating_sub(KEEP);
        let held = view.as_ref().map(|(_, p)| *p);
        let expect: Vec<u64> = points
            .iter()
            .enumerate()
            .filter(|&(i, p)| i >= kept_from || held.is_some_and(|h| *p >= h))
            .map(|(_, p)| *p)
            .collect();
        let c = catalog(&paths).unwrap();
        let got: Vec<u64> = c.points.iter().map(|p| p.index).collect();
        assert_eq!(got, expect, "step {step}");
        let mut files: Vec<u64> = std::fs::read_dir(&paths.journal)
            .unwrap()
            .filter_map(|e| {
                ublk_target::journal::parse_undo_file_name(
                    &e.unwrap().file_name().to_string_lossy(),
                )
            })
            .collect();
        files.sort_unstable();
        assert_eq!(
            files,
            singles(&c.journals),
            "step {step}: journals outside the run"
        );
        match step {
            10 => {
                let oldest = c.points[0];
                let opened = PointView::open(&paths, oldest.index).unwrap();
                view = Some((opened, oldest.index));
            }
            20 => {
                // A restart: the new applier reads the catalog afresh.
                drop(applier.take());
                applier = Some(
                    fixture
                        .applier_with("replica", &fixture.key, &options)
                        .unwrap(),
                );
            }
            30 => {
                let (mut opened, point) = view.take().unwrap();
                let facts = c.points.iter().find(|p| p.index == point).unwrap();
                assert!(read_view(&mut opened) == model_at(&model, facts.last_seq));
            }
            _ => {}
        }
    }
    assert!(step > 40, "only {step} segments");
}

/// The disk space each undo file takes when nothing is pruned, by segment index.
fn journal_sizes_unpruned(fixture: &Fixture, name: &str) -> std::collections::BTreeMap<u64, u64> {
    use std::os::unix::fs::MetadataExt;
    apply_all(fixture, name);
    let paths = fixture.replica_paths(name);
    std::fs::read_dir(&paths.journal)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let index =
                ublk_target::journal::parse_undo_file_name(&e.file_name().to_string_lossy())?;
            Some((index, e.metadata().unwrap().blocks() * 512))
        })
        .collect()
}

/// Retention by journal size, against a model built from the sizes the same undo files
/// take on a twin replica that keeps everything: after every segment the applier keeps
/// the most points whose journals fit, exactly their journals, and says what they take;
/// through a restart (which reads sizes from the catalog) and a `prune` with a
/// smaller limit.
#[test]
fn applier_keeps_the_journals_within_keep_size() {
    let (fixture, model) = Fixture::shipped(SIZE, 46, 600);
    let sizes = journal_sizes_unpruned(&fixture, "twin");
    let total: u64 = sizes.values().sum();
    let keep_size = total / 5;
    let paths = fixture.replica_paths("replica");
    let options = ApplyOptions {
        retention: Retention {
            keep_points: None,
            keep_age: None,
            keep_size: Some(keep_size),
            thin: None,
        },
        ..ApplyOptions::default()
    };
    let open = || {
        fixture
            .applier_with("replica", &fixture.key, &options)
            .unwrap()
    };
    // The points the model keeps after segment `last`: the newest suffix whose
    // journals (every one newer than its oldest point) fit in `limit`.
    let expected = |points: &[u64], last: u64, limit: u64| -> (Vec<u64>, Vec<u64>) {
        let needs = |oldest: u64| (oldest + 1..=last).map(|k| sizes[&k]).sum::<u64>();
        let from = (0..points.len())
            .find(|&i| i + 1 == points.len() || needs(points[i]) <= limit)
            .unwrap_or(0);
        let kept = points[from..].to_vec();
        let journals = kept
            .first()
            .map_or(Vec::new(), |&o| (o + 1..=last).collect());
        (kept, journals)
    };
    let mut applier = Some(open());
    let mut points = Vec::new();
    let (mut step, mut pruned_some) = (0, false);
    while let Some(a) = applier.as_mut().unwrap().apply_next().unwrap() {
        step += 1;
        if a.header.flags & changelog::flags::CRASH_POINT != 0 {
            points.push(a.header.index);
        }
        let (kept, journals) = expected(&points, a.header.index, keep_size);
        let c = catalog(&paths).unwrap();
        let got: Vec<u64> = c.points.iter().map(|p| p.index).collect();
        assert_eq!(got, kept, "step {step}: points");
        assert_eq!(singles(&c.journals), journals, "step {step}: journals");
        assert!(
            c.unused_journals.is_empty() && c.pending.is_none(),
            "step {step}"
        );
        let bytes: u64 = journals.iter().map(|k| sizes[k]).sum();
        assert_eq!(c.journal_bytes, bytes, "step {step}: the catalog's sum");
        let report = a.pruned.expect("retention is configured");
        assert_eq!(
            report.journal_bytes, bytes,
            "step {step}: the applier's sum"
        );
        assert!(
            bytes <= keep_size || kept.len() == 1,
            "step {step}: over the limit"
        );
        pruned_some |= kept.len() < points.len();
        if step == 25 {
            drop(applier.take());
            applier = Some(open());
        }
    }
    assert!(
        step > 40 && pruned_some,
        "{step} segments, pruned: {pruned_some}"
    );
    drop(applier);

    // A smaller limit by hand, then a view at the oldest point left shows the source.
    let last = points[points.len() - 1];
    let report = prune(
        &paths,
        &Retention {
            keep_points: None,
            keep_age: None,
            keep_size: Some(keep_size / 3),
            thin: None,
        },
        changelog::unix_ms_now(),
    )
    .unwrap();
    let (kept, _) = expected(&points, last, keep_size / 3);
    let c = catalog(&paths).unwrap();
    assert_eq!(c.points.iter().map(|p| p.index).collect::<Vec<_>>(), kept);
    assert_eq!(report.journal_bytes, c.journal_bytes);
    let oldest = c.points[0];
    let mut view = PointView::open(&paths, oldest.index).unwrap();
    assert!(read_view(&mut view) == model_at(&model, oldest.last_seq));
}

/// The points thinning keeps with `every` ms intervals, all of them over: the newest
/// of each run of points in one interval, and every point of the latest's interval
/// (its points go only once the latest is no longer the latest).
fn thinned(points: &[ublk_target::RecoveryPoint], every: u64) -> Vec<u64> {
    let interval = |p: &ublk_target::RecoveryPoint| p.created_unix_ms / every;
    let latest = interval(points.last().unwrap());
    points
        .iter()
        .enumerate()
        .filter(|&(i, p)| {
            interval(p) == latest
                || points
                    .get(i + 1)
                    .is_none_or(|next| interval(next) != interval(p))
        })
        .map(|(_, p)| p.index)
        .collect()
}

/// Every point of `paths`' catalog, through a view, equals the model at that point.
fn every_view_matches(paths: &ReplicaPaths, model: &Model) {
    for point in catalog(paths).unwrap().points {
        let mut view = PointView::open(paths, point.index).unwrap();
        assert!(
            read_view(&mut view) == model_at(model, point.last_seq),
            "view at point {} differs from the model",
            point.index
        );
    }
}

/// Thinning keeps the newest point of each interval once it is older than `after`,
/// merging the undo files between kept points: every point kept still shows the
/// source as it was (views, and a rollback through merged files), the merged files
/// take no more than what they replaced, and a crash that left a merged file beside
/// the files it replaced is read through the merged one and cleaned up.
#[test]
fn thinning_keeps_one_point_per_interval_and_each_still_shows_the_source() {
    let (fixture, model) = Fixture::shipped(SIZE, 48, 600);
    apply_all(&fixture, "replica");
    apply_all(&fixture, "twin");
    let paths = fixture.replica_paths("replica");
    let before = catalog(&paths).unwrap();
    let times: Vec<u64> = before.points.iter().map(|p| p.created_unix_ms).collect();
    let spread = times[times.len() - 1] - times[0];
    let every = (spread / 4).max(1);
    let expect = thinned(&before.points, every);
    let merges = expect.len() - 1 - expect.windows(2).filter(|w| w[1] == w[0] + 1).count();
    assert!(
        merges >= 2 && expect.len() >= 3,
        "the segments' times ({times:?}) give too few buckets to merge in"
    );
    let thin = thinning_every(every);
    let later = times[times.len() - 1] + 10 * every;
    prune(&paths, &thin, later).unwrap();
    let after = catalog(&paths).unwrap();
    let kept: Vec<u64> = after.points.iter().map(|p| p.index).collect();
    assert_eq!(kept, expect, "one point per interval (every {every} ms)");
    assert!(
        after.unused_journals.is_empty() && after.damaged.is_empty(),
        "{after:?}"
    );
    assert!(
        after.journals.iter().filter(|(f, l)| f < l).count() >= 2,
        "merged files: {:?}",
        after.journals
    );
    assert!(
        after.journal_bytes <= before.journal_bytes,
        "merged {} bytes against {} before",
        after.journal_bytes,
        before.journal_bytes
    );
    every_view_matches(&paths, &model);
    // Thinning again changes nothing.
    prune(&paths, &thin, later).unwrap();
    assert_eq!(catalog(&paths).unwrap().journals, after.journals);

    // A crash after a merged file was put in place and before the files it replaced
    // were deleted: the twin has them all.
    let twin = fixture.replica_paths("twin");
    for &(first, last) in after.journals.iter().filter(|(f, l)| f < l) {
        let name = ublk_target::journal::span_file_name(first, last);
        std::fs::copy(paths.journal.join(&name), twin.journal.join(&name)).unwrap();
    }
    let crashed = catalog(&twin).unwrap();
    assert!(
        crashed.journals.ends_with(&after.journals),
        "the merged files are used: {:?}",
        crashed.journals
    );
    let crashed_points: Vec<u64> = crashed.points.iter().map(|p| p.index).collect();
    assert!(
        kept.iter().all(|k| crashed_points.contains(k)),
        "{crashed_points:?}"
    );
    assert!(!crashed.unused_journals.is_empty());
    every_view_matches(&twin, &model);
    prune(&twin, &thin, later).unwrap();
    let cleaned = catalog(&twin).unwrap();
    assert!(cleaned.unused_journals.is_empty(), "{cleaned:?}");
    assert_eq!(cleaned.journals, after.journals);
    assert_eq!(cleaned.points, after.points);
    let files = std::fs::read_dir(&twin.journal)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            ublk_target::journal::parse_span_file_name(&name.to_string_lossy()).is_some()
        })
        .count();
    assert_eq!(files, cleaned.journals.len(), "files left beside the run");

    // A rollback through merged files to the oldest point kept, interrupted after
    // its first step (the merged file whose step was recorded is left) and finished.
    let oldest = after.points[0];
    let first = rollback_steps(&paths, oldest.index, Some(1)).unwrap();
    assert!(!first.done && !first.undone.is_empty());
    rollback_to(&paths, oldest.index).unwrap();
    assert!(std::fs::read(&paths.replica).unwrap() == model_at(&model, oldest.last_seq));
}

/// A run of undo files that cannot be merged (a journal whose data no longer matches
/// its checksum) is left as it was, with its points, while the other runs are thinned.
#[test]
fn thinning_goes_on_past_a_run_it_cannot_merge() {
    let (fixture, _model) = Fixture::shipped(SIZE, 51, 600);
    apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let before = catalog(&paths).unwrap();
    let times: Vec<u64> = before.points.iter().map(|p| p.created_unix_ms).collect();
    let every = ((times[times.len() - 1] - times[0]) / 4).max(1);
    let expect = thinned(&before.points, every);
    // The first run of files a merge would take: after expect[k], up to expect[k + 1].
    let k = (0..expect.len() - 1)
        .find(|&k| expect[k + 1] > expect[k] + 1)
        .expect("a run to merge");
    let (from, to) = (expect[k], expect[k + 1]);
    let bad = undo_path(&paths, from + 1);
    let mut bytes = std::fs::read(&bad).unwrap();
    if u16::from_le_bytes([bytes[8], bytes[9]]) != 1 {
        eprintln!("skipped: shared undo files carry no checksum of their data");
        return;
    }
    let end = bytes.len() - 1;
    bytes[end] ^= 0xff;
    std::fs::write(&bad, bytes).unwrap();
    prune(
        &paths,
        &thinning_every(every),
        times[times.len() - 1] + 10 * every,
    )
    .unwrap();
    let after = catalog(&paths).unwrap();
    let mut kept = expect.clone();
    kept.extend(
        before
            .points
            .iter()
            .map(|p| p.index)
            .filter(|&i| from < i && i < to),
    );
    kept.sort_unstable();
    assert_eq!(
        after.points.iter().map(|p| p.index).collect::<Vec<_>>(),
        kept,
        "the points between {from} and {to} stay, the others are thinned"
    );
    assert!(bad.exists(), "the damaged journal was touched");
    assert!(
        after.journals.iter().any(|&(first, last)| first < last),
        "nothing else was merged: {:?}",
        after.journals
    );
}

/// The applier thins as it goes: at every step each interval over (but the latest
/// point's) holds one point, and every point still shows the source.
#[test]
fn an_applier_thins_as_it_goes() {
    let (fixture, model) = Fixture::shipped(SIZE, 49, 600);
    let paths = fixture.replica_paths("replica");
    let options = ApplyOptions {
        retention: thinning_every(2),
        ..ApplyOptions::default()
    };
    let mut applier = fixture
        .applier_with("replica", &fixture.key, &options)
        .unwrap();
    let (mut steps, mut merges, mut handed_over) = (0, 0, 0);
    while let Some(a) = applier.apply_next().unwrap() {
        steps += 1;
        assert!(a.pruned.is_some());
        // A merge is started on its own thread and applying goes on: the segment
        // returns without waiting for it.
        handed_over += usize::from(applier.thinning_under_way());
        let c = catalog(&paths).unwrap();
        // Mid-merge the merged file may sit beside the files it replaces, as after a
        // crash: those are the only unused ones.
        assert!(
            c.damaged.is_empty()
                && c.unused_journals.iter().all(|&(first, last)| c
                    .journals
                    .iter()
                    .any(|&(a, b)| a < b && a <= first && last <= b)),
            "{c:?}"
        );
        // One run of undo files merged at a time.
        let merged_now = c.journals.iter().filter(|(f, l)| f < l).count();
        assert!(merged_now <= merges + 1, "step {steps}: {c:?}");
        merges = merged_now.max(merges);
    }
    assert!(
        steps > 20 && merges > 0 && handed_over > 0,
        "{steps} segments, {merges} merged files, {handed_over} handed over"
    );
    // What is left to thin, a merge a call: then every interval over (but the latest
    // point's: its points go once it is not the latest) holds one point.
    let now = changelog::unix_ms_now();
    loop {
        let removed = applier
            .prune(&options.retention, now)
            .unwrap()
            .removed
            .len();
        if removed + applier.finish_thinning().unwrap() == 0 {
            break;
        }
    }
    assert!(!applier.thinning_under_way());
    drop(applier);
    let c = catalog(&paths).unwrap();
    let latest = c.points.last().unwrap().created_unix_ms / 2;
    let over: Vec<u64> = c
        .points
        .iter()
        .map(|p| p.created_unix_ms / 2)
        .filter(|&b| (b + 1) * 2 <= now && b != latest)
        .collect();
    let mut one_each = over.clone();
    one_each.dedup();
    assert_eq!(over, one_each, "an interval over with two points");
    every_view_matches(&paths, &model);
    assert!(std::fs::read(&paths.replica).unwrap() == model.final_image());
}

/// Options for an applier that thins to a point per 2 ms.
fn thinning_options() -> ApplyOptions {
    ApplyOptions {
        retention: thinning_every(2),
        ..ApplyOptions::default()
    }
}

/// An applier with `options` over `fixture`'s replica, run until it has handed a merge
/// of undo files to its thread.
fn applier_mid_merge(fixture: &Fixture, options: &ApplyOptions) -> ublk_target::Applier {
    let mut applier = fixture
        .applier_with("replica", &fixture.key, options)
        .unwrap();
    while !applier.thinning_under_way() {
        applier
            .apply_next()
            .unwrap()
            .expect("a merge before the end");
    }
    applier
}

/// A failover while a merge of undo files is under way on its thread: the rollback
/// abandons the merge (or finds its file in place beside the ones it replaces) and
/// takes the replica to the point all the same; nothing half written is left. And a
/// merge's unfinished file left by a killed applier is deleted by the next one.
#[test]
fn a_rollback_while_a_merge_is_under_way_reaches_its_point() {
    for (seed, oldest) in [(53, false), (54, true)] {
        let (fixture, model) = Fixture::shipped(SIZE, seed, 400);
        let paths = fixture.replica_paths("replica");
        let options = thinning_options();
        let mut applier = fixture
            .applier_with("replica", &fixture.key, &options)
            .unwrap();
        applier.apply_next().unwrap().unwrap();
        // A killed applier's unfinished merged file: not an undo file, and gone once
        // an applier reads the journal again.
        let leftover = paths
            .journal
            .join(".0000000000000001-0000000000000002.undo.tmp");
        std::fs::write(&leftover, b"half a merged undo file").unwrap();
        drop(applier);
        let mut applier = applier_mid_merge(&fixture, &options);
        assert!(!leftover.exists());
        // The oldest point (below every merge) or one in the middle of the history.
        let points = catalog(&paths).unwrap().points;
        let point = if oldest {
            points[0]
        } else {
            points[points.len() / 2]
        };
        let report = applier.rollback_to(point.index).unwrap();
        assert!(report.done, "{report:?}");
        assert!(
            std::fs::read(&paths.replica).unwrap() == model_at(&model, point.last_seq),
            "seed {seed}: the replica is not at point {}",
            point.index
        );
        drop(applier);
        let names: Vec<String> = std::fs::read_dir(&paths.journal)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.ends_with(".tmp")),
            "seed {seed}: {names:?}"
        );
        // Nor an undo file of a segment the rollback undid (a merged one put in place
        // behind its back).
        let spans = ublk_target::journal::Journal::new(&paths.journal)
            .list_spans()
            .unwrap();
        assert!(
            spans.iter().all(|&(_, last)| last <= point.index),
            "seed {seed}: {spans:?} after a rollback to {}",
            point.index
        );
    }
}

/// Retention's limits reaching into a run being merged: the merge is abandoned and the
/// limits apply at once.
#[test]
fn limits_that_reach_into_a_merge_under_way_abandon_it() {
    let (fixture, model) = Fixture::shipped(SIZE, 56, 400);
    let paths = fixture.replica_paths("replica");
    let options = thinning_options();
    let mut applier = applier_mid_merge(&fixture, &options);
    let mut retention = options.retention;
    retention.keep_points = Some(1);
    let report = applier.prune(&retention, changelog::unix_ms_now()).unwrap();
    assert_eq!(report.points_left, 1, "{report:?}");
    assert!(!applier.thinning_under_way());
    drop(applier);
    let c = catalog(&paths).unwrap();
    assert_eq!(c.points.len(), 1, "{c:?}");
    assert!(
        c.unused_journals.is_empty() && c.damaged.is_empty(),
        "{c:?}"
    );
    every_view_matches(&paths, &model);
}

/// Views registered while a merge is under way, at points it would thin out: the
/// merge is not booked (its file goes, the files it would replace stay), so every
/// point a view shows is still there and each view still shows its point.
#[test]
fn a_merge_that_views_opened_since_would_undo_is_dropped() {
    let (fixture, model) = Fixture::shipped(SIZE, 55, 400);
    let paths = fixture.replica_paths("replica");
    let mut applier = applier_mid_merge(&fixture, &thinning_options());
    let points = catalog(&paths).unwrap().points;
    let mut views: Vec<(PointView, u64)> = points
        .iter()
        .map(|p| (PointView::open(&paths, p.index).unwrap(), p.last_seq))
        .collect();
    applier.finish_thinning().unwrap();
    assert!(!applier.thinning_under_way());
    let after: Vec<u64> = catalog(&paths)
        .unwrap()
        .points
        .iter()
        .map(|p| p.index)
        .collect();
    let before: Vec<u64> = points.iter().map(|p| p.index).collect();
    assert_eq!(after, before, "a point a view shows was thinned out");
    for (view, last_seq) in &mut views {
        assert!(read_view(view) == model_at(&model, *last_seq));
    }
    for (view, _) in views {
        view.close().unwrap();
    }
    // Without views, thinning goes on (that run is tried again later).
    let merged_files = |paths: &ReplicaPaths| {
        catalog(paths)
            .unwrap()
            .journals
            .iter()
            .filter(|(first, last)| first < last)
            .count()
    };
    let merged_before = merged_files(&paths);
    while applier.apply_next().unwrap().is_some() {}
    applier.finish_thinning().unwrap();
    drop(applier);
    assert!(merged_files(&paths) > merged_before);
    every_view_matches(&paths, &model);
}

/// A view open at an old point while thinning runs (in another process, or after the
/// view last looked): nothing at or after its point changes, so the journals of the
/// segments applied since it opened are still there to load, one by one, and it keeps
/// showing its point; points before it are thinned.
#[test]
fn thinning_leaves_what_an_open_view_needs() {
    let (fixture, model) = Fixture::shipped(SIZE, 50, 600);
    let paths = fixture.replica_paths("replica");
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    let total = fixture.store_segments().len();
    for _ in 0..total / 2 {
        applier.apply_next().unwrap().unwrap();
    }
    drop(applier);
    let points = catalog(&paths).unwrap().points;
    let shown = points[points.len() / 2];
    let mut view = PointView::open(&paths, shown.index).unwrap();
    let expect = model_at(&model, shown.last_seq);
    assert!(read_view(&mut view) == expect);
    // The rest applied while the view is idle, then everything thinned.
    apply_all(&fixture, "replica");
    let all = catalog(&paths).unwrap();
    let times: Vec<u64> = all.points.iter().map(|p| p.created_unix_ms).collect();
    let every = ((times[times.len() - 1] - times[0]) / 8).max(1);
    let thin = thinning_every(every);
    prune(&paths, &thin, times[times.len() - 1] + 10 * every).unwrap();
    let thinned = catalog(&paths).unwrap();
    assert!(
        thinned.points.len() < all.points.len(),
        "nothing thinned below the view"
    );
    assert!(
        thinned
            .journals
            .iter()
            .all(|&(first, last)| first == last || last <= shown.index),
        "a merged file at or after the view's point {}: {:?}",
        shown.index,
        thinned.journals
    );
    assert!(read_view(&mut view) == expect, "the view moved");
    drop(view);
    // Once it is closed, thinning goes on past its point.
    prune(&paths, &thin, times[times.len() - 1] + 10 * every).unwrap();
    assert!(catalog(&paths).unwrap().points.len() < thinned.points.len());
    every_view_matches(&paths, &model);
}

#[test]
fn retention_by_age() {
    let (fixture, _model) = Fixture::shipped(SIZE, 43, 250);
    apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let all = catalog(&paths).unwrap().points;
    let n = all.len();
    // "Now" is a while after a point in the middle; the age limit reaches back to it.
    let pivot = all[n / 2];
    let age = std::time::Duration::from_secs(3600);
    let now = pivot.created_unix_ms + 3_600_000;
    let expect: Vec<_> = all
        .iter()
        .copied()
        .filter(|p| p.created_unix_ms >= pivot.created_unix_ms)
        .collect();
    prune(
        &paths,
        &Retention {
            keep_points: None,
            keep_age: Some(age),
            keep_size: None,
            thin: None,
        },
        now,
    )
    .unwrap();
    assert_eq!(catalog(&paths).unwrap().points, expect);

    // Age 0: everything but the latest is too old, and the latest is always kept.
    prune(
        &paths,
        &Retention {
            keep_points: None,
            keep_age: Some(std::time::Duration::ZERO),
            keep_size: None,
            thin: None,
        },
        now + 10_000_000,
    )
    .unwrap();
    assert_eq!(catalog(&paths).unwrap().points, all[n - 1..]);
}

#[test]
fn pruning_keeps_journals_a_view_needs() {
    let (fixture, model) = Fixture::shipped(SIZE, 44, 250);
    apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let all = catalog(&paths).unwrap().points;
    let held = all[2];
    let expect = model_at(&model, held.last_seq);
    let mut view = PointView::open(&paths, held.index).unwrap();
    // Pruning happens while the view is open; the view was opened first, and another
    // one is opened after the prune.
    let report = prune(
        &paths,
        &Retention {
            keep_points: Some(1),
            keep_age: None,
            keep_size: None,
            thin: None,
        },
        changelog::unix_ms_now(),
    )
    .unwrap();
    assert_eq!(report.held_by.len(), 1);
    assert_eq!(report.held_by[0].point, Some(held.index));
    let left = catalog(&paths).unwrap();
    assert_eq!(left.points.first().unwrap().index, held.index);
    assert_eq!(left.views.len(), 1);
    assert!(read_view(&mut view) == expect);
    let mut second = PointView::open(&paths, held.index).unwrap();
    assert!(read_view(&mut second) == expect);
    drop(second);
    drop(view);

    prune(
        &paths,
        &Retention {
            keep_points: Some(1),
            keep_age: None,
            keep_size: None,
            thin: None,
        },
        changelog::unix_ms_now(),
    )
    .unwrap();
    let left = catalog(&paths).unwrap();
    assert_eq!(left.points, all[all.len() - 1..]);
    assert!(left.views.is_empty());
    assert!(matches!(
        PointView::open(&paths, held.index),
        Err(TargetError::PointUnavailable { .. })
    ));
}

#[test]
fn rollback_to_a_point_survives_interruptions() {
    let (fixture, model) = Fixture::shipped(SIZE, 51, 300);
    let total = apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let all = catalog(&paths).unwrap().points;
    let target = all[total / 3];
    let expect = model_at(&model, target.last_seq);
    assert!(total - 1 - target.index as usize >= 4, "enough to undo");

    // An open view blocks the rollback (it could be served from the replica).
    let view = PointView::open(&paths, target.index).unwrap();
    let err = rollback_to(&paths, target.index).unwrap_err();
    assert!(err.to_string().contains("views are open"), "{err}");
    drop(view);

    // Stop after one step, as a crash between steps would.
    let report = rollback_steps(&paths, target.index, Some(1)).unwrap();
    assert!(!report.done);
    assert_eq!(report.undone, vec![total as u64 - 1]);
    let err = fixture
        .applier("replica", &fixture.key)
        .unwrap()
        .apply_next()
        .unwrap_err();
    assert!(
        matches!(err, TargetError::RolledBack { point } if point == target.index),
        "{err}"
    );

    // A crash after the replica writes of a step, before its state was saved: the state
    // and the journal are as before the step, the replica already partly rolled back.
    let top = total as u64 - 2;
    let state_before = std::fs::read(&paths.state).unwrap();
    let undo_before = std::fs::read(undo_path(&paths, top)).unwrap();
    let report = rollback_steps(&paths, target.index, Some(1)).unwrap();
    assert_eq!(report.undone, vec![top]);
    std::fs::write(&paths.state, &state_before).unwrap();
    std::fs::write(undo_path(&paths, top), &undo_before).unwrap();

    // A crash after a step's state was saved, before its journal was deleted.
    let report = rollback_steps(&paths, target.index, Some(2)).unwrap();
    assert_eq!(report.undone, vec![top, top - 1]);
    let undo_next = undo_path(&paths, top - 2);
    let undo_next_bytes = std::fs::read(&undo_next).unwrap();
    rollback_steps(&paths, target.index, Some(1)).unwrap();
    std::fs::write(&undo_next, undo_next_bytes).unwrap();

    let err = rollback_to(&paths, target.index - 1).unwrap_err();
    assert!(
        err.to_string().contains("already rolled back"),
        "a different point mid-way: {err}"
    );
    let report = rollback_to(&paths, target.index).unwrap();
    assert!(report.done);
    assert!(
        std::fs::read(&paths.replica).unwrap() == expect,
        "replica differs from the model at point {}",
        target.index
    );
    let after = catalog(&paths).unwrap();
    assert_eq!(after.rolled_back_to, Some(target.index));
    assert_eq!(after.latest_applied, Some(target.index));
    assert!(after.journals.is_empty() && after.unused_journals.is_empty());

    // Again: nothing changes.
    let sha = file_sha256(&paths.replica);
    assert!(rollback_to(&paths, target.index).unwrap().undone.is_empty());
    assert_eq!(file_sha256(&paths.replica), sha);

    let err = fixture
        .applier("replica", &fixture.key)
        .unwrap()
        .apply_next()
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "replica was rolled back to point {} for failover",
            target.index
        )),
        "{message}"
    );
    assert!(!err.is_recoverable());
    assert_eq!(file_sha256(&paths.replica), sha);
}

#[test]
fn rollback_to_the_latest_point_only_stops_applying() {
    let (fixture, model) = Fixture::shipped(4 << 20, 52, 120);
    let total = apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    let report = applier.rollback_to(total as u64 - 1).unwrap();
    assert!(report.done && report.undone.is_empty());
    assert!(std::fs::read(&paths.replica).unwrap() == model.final_image());
    assert!(matches!(
        applier.apply_next(),
        Err(TargetError::RolledBack { .. })
    ));
}

#[test]
fn damaged_undo_files_are_refused() {
    let (fixture, model) = Fixture::shipped(SIZE, 61, 250);
    // Copied before-images, which carry the checksum this test damages (shared ones,
    // on XFS, have none).
    let options = ApplyOptions {
        copy_undo: true,
        ..ApplyOptions::default()
    };
    let mut applier = fixture
        .applier_with("replica", &fixture.key, &options)
        .unwrap();
    let total = applier.apply_available().unwrap() as u64;
    drop(applier);
    let paths = fixture.replica_paths("replica");
    let k = total / 2;
    let replica_sha = file_sha256(&paths.replica);
    let state_before = std::fs::read(&paths.state).unwrap();

    // A flipped bit in the before-images: found by the data checksum.
    let path = undo_path(&paths, k);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let at = bad.len() - 10;
    bad[at] ^= 0x04;
    std::fs::write(&path, &bad).unwrap();
    // A view opens (data is checked before the first read from a journal, not when
    // it loads), and the reads that need that journal fail, naming it.
    let mut view = PointView::open(&paths, k - 2).unwrap();
    let err = first_read_error(&mut view).expect("a read of the damaged journal");
    let message = err.to_string();
    assert!(matches!(err, TargetError::Journal { .. }), "{message}");
    assert!(
        message.contains(&path.display().to_string()) && message.contains("checksum"),
        "{message}"
    );
    assert!(
        first_read_error(&mut view).is_some(),
        "read again, it still fails"
    );
    drop(view);
    let err = rollback_to(&paths, k - 2).unwrap_err();
    assert!(matches!(err, TargetError::Journal { .. }), "{err}");
    // Points that do not need it still work.
    let p = catalog(&paths).unwrap().find(k).copied().unwrap();
    let mut view = PointView::open(&paths, k).unwrap();
    assert!(read_view(&mut view) == model_at(&model, p.last_seq));
    drop(view);

    // A damaged header: the catalog stops there and says so.
    let mut bad = good.clone();
    bad[60] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let c = catalog(&paths).unwrap();
    assert_eq!(c.damaged.len(), 1, "{:?}", c.damaged);
    assert_eq!(c.points.first().unwrap().index, k);
    assert!(c.table().contains("DAMAGED"));
    let err = PointView::open(&paths, k - 1).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");

    // Truncated.
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let err = PointView::open(&paths, k - 1).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let err = rollback_to(&paths, k - 1).unwrap_err();
    assert!(matches!(err, TargetError::Journal { .. }), "{err}");

    assert_eq!(file_sha256(&paths.replica), replica_sha, "replica touched");
    assert_eq!(
        std::fs::read(&paths.state).unwrap(),
        state_before,
        "state moved"
    );
    std::fs::write(&path, &good).unwrap();
    let mut view = PointView::open(&paths, k - 2).unwrap();
    let p = catalog(&paths).unwrap().find(k - 2).copied().unwrap();
    assert!(read_view(&mut view) == model_at(&model, p.last_seq));
}

/// The error of the first 64 KiB read of `view`, front to back, that fails.
fn first_read_error(view: &mut PointView) -> Option<TargetError> {
    const CHUNK: u64 = 64 << 10;
    let mut buf = vec![0u8; CHUNK as usize];
    (0..view.size() / CHUNK).find_map(|i| view.read_at(&mut buf, i * CHUNK).err())
}

/// A crash after a segment's undo journal was saved (and maybe some of its writes
/// done) but before the applied position moved: re-applying keeps the first journal,
/// which alone holds the true before-images.
#[test]
fn reapply_after_a_crash_keeps_the_first_undo_file() {
    let (fixture, model) = Fixture::shipped(SIZE, 71, 250);
    let paths = fixture.replica_paths("replica");
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    let mut checked = 0;
    let mut prev: Option<ublk_target::PointFacts> = None;
    loop {
        let state_before = std::fs::read(&paths.state).ok();
        let Some(applied) = applier.apply_next().unwrap() else {
            break;
        };
        assert!(applied.journal_saved);
        let index = applied.header.index;
        if index % 3 == 1 {
            let undo = std::fs::read(undo_path(&paths, index)).unwrap();
            // Lose the position update.
            drop(applier);
            std::fs::write(&paths.state, state_before.unwrap()).unwrap();
            // The view at the previous point sees the pending journal already.
            let p = prev.unwrap();
            let mut view = PointView::open(&paths, p.index).unwrap();
            assert!(
                read_view(&mut view) == model_at(&model, p.last_seq),
                "view at {} with segment {index} half-applied",
                p.index
            );
            drop(view);
            applier = fixture.applier("replica", &fixture.key).unwrap();
            let again = applier.apply_next().unwrap().unwrap();
            assert_eq!(again.header.index, index);
            let mut view = PointView::open(&paths, p.index).unwrap();
            assert!(
                read_view(&mut view) == model_at(&model, p.last_seq),
                "view at {} after re-applying {index}",
                p.index
            );
            assert!(!again.journal_saved, "the first journal must be kept");
            assert_eq!(std::fs::read(undo_path(&paths, index)).unwrap(), undo);
            checked += 1;
        }
        prev = Some(ublk_target::PointFacts::from_header(&applied.header));
    }
    assert!(checked >= 3);
    assert!(std::fs::read(&paths.replica).unwrap() == model.final_image());
}

/// Whether `dir`'s filesystem can share blocks between files (XFS, btrfs), found
/// independently of the code under test: one block cloned with FICLONE.
fn can_share_blocks(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let src = dir.join("probe-src");
    std::fs::write(&src, vec![7u8; 64 << 10]).unwrap();
    let src = std::fs::File::open(src).unwrap();
    let dest = std::fs::File::create(dir.join("probe-dest")).unwrap();
    // SAFETY: FICLONE takes the source descriptor as its argument; both files are open.
    unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) == 0 }
}

/// The format version of undo journal `index` and the length of its before-images.
fn undo_version(paths: &ReplicaPaths, index: u64) -> (u16, u64) {
    let bytes = std::fs::read(undo_path(paths, index)).unwrap();
    let data_len = u64::from_le_bytes(bytes[200..208].try_into().unwrap());
    (u16::from_le_bytes([bytes[8], bytes[9]]), data_len)
}

/// Where the fixture's filesystem can share blocks (scripts/test.sh runs this file a
/// second time with TMPDIR on XFS), every journal with data shares the replica's
/// former blocks (version 2); elsewhere, or with `copy_undo`, they are copied
/// (version 1). The model checks of this file hold for both.
#[test]
fn undo_files_share_blocks_where_the_filesystem_can() {
    let (fixture, model) = Fixture::shipped(SIZE, 91, 200);
    let sharing = can_share_blocks(fixture.dir.path());
    eprintln!(
        "{}: sharing blocks is {}possible here",
        fixture.dir.path().display(),
        if sharing { "" } else { "im" }
    );
    for (name, copy_undo) in [("shared", false), ("copied", true)] {
        let options = ApplyOptions {
            copy_undo,
            ..ApplyOptions::default()
        };
        let mut applier = fixture.applier_with(name, &fixture.key, &options).unwrap();
        let total = applier.apply_available().unwrap() as u64;
        let shares = sharing && !copy_undo;
        let method = applier.undo_method();
        assert_eq!(
            matches!(method, ublk_target::UndoMethod::Share { .. }),
            shares,
            "{name}: {method:?}"
        );
        drop(applier);
        let paths = fixture.replica_paths(name);
        let mut shared = 0;
        for index in 0..total {
            let (version, data_len) = undo_version(&paths, index);
            // A segment that changes nothing has nothing to share: always version 1.
            let want = if !shares || data_len == 0 { 1 } else { 2 };
            assert_eq!(version, want, "{name}: undo {index} ({data_len} bytes)");
            shared += usize::from(version == 2);
        }
        assert!(
            !sharing || copy_undo || shared * 2 > total as usize,
            "{shared}"
        );
        assert!(std::fs::read(&paths.replica).unwrap() == model.final_image());
        let first = catalog(&paths).unwrap().points[0];
        let mut view = PointView::open(&paths, first.index).unwrap();
        assert!(
            read_view(&mut view) == model_at(&model, first.last_seq),
            "{name}"
        );
    }
}

/// `ublk-target apply` says how undo journals keep before-images, as sharing or
/// copying decides what applying costs (this file runs on ext4 or tmpfs and on XFS).
#[test]
fn apply_says_whether_undo_journals_share_or_copy() {
    let (fixture, model) = Fixture::shipped(4 << 20, 93, 40);
    let sharing = can_share_blocks(fixture.dir.path());
    sparse_file(&fixture.path("replica"), fixture.size);
    let out = apply_command(&fixture, "replica").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let says = if sharing {
        "undo journals share the replica's blocks"
    } else {
        "undo journals copy before-images"
    };
    assert!(stderr.contains(says), "wanted {says:?}: {stderr}");
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

/// Only one writer per replica: a second applier (or a rollback) is refused while
/// one runs.
#[test]
fn one_writer_per_replica() {
    let (fixture, _model) = Fixture::shipped(4 << 20, 81, 60);
    let paths = fixture.replica_paths("replica");
    let applier = fixture.applier("replica", &fixture.key).unwrap();
    let Err(err) = fixture.applier("replica", &fixture.key) else {
        panic!("a second applier was allowed");
    };
    assert!(matches!(err, TargetError::Busy { .. }), "{err}");
    let err = rollback_to(&paths, 0).unwrap_err();
    assert!(matches!(err, TargetError::Busy { .. }), "{err}");
    drop(applier);
    let _again: Applier = fixture.applier("replica", &fixture.key).unwrap();
}

fn cli(args: &[&str], fixture: &Fixture) -> (bool, String) {
    let out = std::process::Command::new(bin("ublk-target"))
        .args(args)
        .arg("--replica")
        .arg(fixture.path("replica"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn command_line() {
    let (fixture, model) = Fixture::shipped(SIZE, 91, 200);
    std::fs::File::create(fixture.path("replica"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let out = apply_command(&fixture, "replica")
        .args(["--keep-points", "5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let (ok, text) = cli(&["points"], &fixture);
    assert!(ok, "{text}");
    assert!(text.contains("latest, on the replica"), "{text}");
    let (ok, json) = cli(&["points", "--json"], &fixture);
    assert!(ok, "{json}");
    let paths = fixture.replica_paths("replica");
    let c = catalog(&paths).unwrap();
    assert_eq!(c.points.len(), 5);
    assert!(json.contains(&format!("\"index\": {}", c.points[0].index)));

    let oldest = c.points[0];
    let out_file = fixture.path("exported");
    let (ok, text) = cli(
        &[
            "export",
            "--point",
            &oldest.index.to_string(),
            "--out",
            out_file.to_str().unwrap(),
        ],
        &fixture,
    );
    assert!(ok, "{text}");
    assert!(std::fs::read(&out_file).unwrap() == model_at(&model, oldest.last_seq));

    // A mistyped replica: refused, and nothing is created next to it.
    let out = std::process::Command::new(bin("ublk-target"))
        .args(["prune", "--keep-points", "1", "--replica"])
        .arg(fixture.path("replcia"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert!(!fixture.path("replcia.journal").exists());

    let (ok, text) = cli(&["prune", "--keep-age", "3w"], &fixture);
    assert!(!ok && text.contains("unknown unit"), "{text}");
    let (ok, text) = cli(&["prune", "--keep-points", "0"], &fixture);
    assert!(!ok && text.contains("at least 1"), "{text}");
    let (ok, text) = cli(&["prune"], &fixture);
    assert!(!ok && text.contains("--keep-points"), "{text}");
    let (ok, text) = cli(&["prune", "--keep-size", "lots"], &fixture);
    assert!(!ok && text.contains("is not a size"), "{text}");
    let (ok, text) = cli(&["prune", "--keep-points", "2"], &fixture);
    assert!(
        ok && text.contains("2 point(s) left, undo journals on"),
        "{text}"
    );

    let (ok, text) = cli(
        &["rollback", "--point", &oldest.index.to_string()],
        &fixture,
    );
    assert!(!ok, "a pruned point");
    assert!(
        text.contains("is not available") && text.contains("exist"),
        "{text}"
    );
    let target = catalog(&paths).unwrap().points[0];
    let (ok, text) = cli(
        &["rollback", "--point", &target.index.to_string()],
        &fixture,
    );
    assert!(ok, "{text}");
    assert!(std::fs::read(&paths.replica).unwrap() == model_at(&model, target.last_seq));
    let out = apply_command(&fixture, "replica").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("rolled back to point"),
        "{stderr}"
    );
    let (ok, text) = cli(&["points"], &fixture);
    assert!(ok && text.contains("ROLLED BACK"), "{text}");
}

/// The latest segment applied to the replica at `paths`.
fn latest_index(paths: &ReplicaPaths) -> u64 {
    catalog(paths).unwrap().latest_applied.unwrap()
}

/// Does to `paths`' journal what thinning did to `twin`'s (applied identically): puts
/// each merged file the twin has and `paths` lacks in place, then deletes the files it
/// replaces. Returns the spans deleted.
fn merge_as_the_twin_did(paths: &ReplicaPaths, twin: &ReplicaPaths) -> Vec<(u64, u64)> {
    let journal = ublk_target::journal::Journal::new(&paths.journal);
    let mut deleted = Vec::new();
    for (first, last) in catalog(twin).unwrap().journals {
        let name = ublk_target::journal::span_file_name(first, last);
        if first == last || paths.journal.join(&name).exists() {
            continue;
        }
        std::fs::copy(twin.journal.join(&name), paths.journal.join(&name)).unwrap();
        for span in journal.list_spans().unwrap() {
            if first <= span.0 && span.1 <= last && span != (first, last) {
                std::fs::remove_file(journal.path_of_span(span)).unwrap();
                deleted.push(span);
            }
        }
    }
    deleted
}

/// Ships `ops` requests of `workload`, at most one request's worth per segment (a
/// segment is cut as soon as it holds 4 KiB), so `ops` requests make about `ops`
/// segments.
fn ship_small_segments(
    fixture: &Fixture,
    capture: &mut blkfilter::capture::Capture,
    model: &mut Model,
    workload: &mut blkfilter::workload::Workload,
    ops: usize,
) {
    drive(capture, model, workload.by_ref().take(ops));
    let mut config = fixture.shipper_config();
    config.max_segment_bytes = 4 << 10;
    let control = std::sync::Arc::new(shipper::Control::default());
    control.drain();
    shipper::run(&config, fixture.store(), control).expect("shipper run");
}

/// Sleeps until the wall clock is `past_ms` into the next multiple of `every_ms`.
fn sleep_into_next_interval(every_ms: u64, past_ms: u64) {
    let now = changelog::unix_ms_now();
    let next = (now / every_ms + 1) * every_ms + past_ms;
    std::thread::sleep(std::time::Duration::from_millis(next - now));
}

/// Runs `ublk-target ARGS --replica REPLICA` allowed `open_files` open files at most
/// (`prlimit`: it cannot raise its soft limit past that hard one); asserts it succeeds
/// and returns what it said.
fn ublk_target_with_open_files(open_files: u64, args: &[&str], paths: &ReplicaPaths) -> String {
    let out = std::process::Command::new("prlimit")
        .arg(format!("--nofile={open_files}:{open_files}"))
        .arg("--")
        .arg(bin("ublk-target"))
        .args(args)
        .arg("--replica")
        .arg(&paths.replica)
        .env("RUST_LOG", "warn")
        .output()
        .expect("prlimit (util-linux)");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    said
}

/// A merge holds one of the files it merges open at a time: `prune` thins a run of
/// undo files longer than its open-file limit (`prlimit`, which `ublk-target` cannot
/// raise past the hard limit it sets) and every point it keeps still shows the source.
#[test]
fn a_run_longer_than_the_open_file_limit_is_merged() {
    const EVERY_MS: u64 = 4000;
    const OPEN_FILES: u64 = 40;
    let fixture = Fixture::new(SIZE);
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::new(SIZE);
    let mut workload = blkfilter::workload::Workload::new(57, SIZE);
    // A few points in one interval, a long run in the next (merged into a file that
    // undoes it to the first interval's newest point), the latest in a third.
    sleep_into_next_interval(EVERY_MS, 50);
    ship_small_segments(&fixture, &mut capture, &mut model, &mut workload, 3);
    sleep_into_next_interval(EVERY_MS, 50);
    ship_small_segments(&fixture, &mut capture, &mut model, &mut workload, 300);
    sleep_into_next_interval(EVERY_MS, 50);
    ship_small_segments(&fixture, &mut capture, &mut model, &mut workload, 1);
    apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let before = catalog(&paths).unwrap();
    let expect = thinned(&before.points, EVERY_MS);
    let longest_run = expect.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest_run > 2 * OPEN_FILES,
        "the longest run to merge has {longest_run} files (kept: {expect:?}), too few \
         to need more than {OPEN_FILES} open files"
    );

    let said = ublk_target_with_open_files(
        OPEN_FILES,
        &["prune", "--thin-after", "0s", "--thin-every", "4s"],
        &paths,
    );
    assert!(!said.contains("WARN"), "{said}");
    let after = catalog(&paths).unwrap();
    assert_eq!(
        after.points.iter().map(|p| p.index).collect::<Vec<_>>(),
        expect,
        "{said}"
    );
    assert!(
        after
            .journals
            .iter()
            .any(|&(first, last)| last - first >= longest_run - 1),
        "{:?}",
        after.journals
    );
    every_view_matches(&paths, &model);
}

/// A rollback holds one undo file open at a time: one through more files than its
/// open-file limit reaches its point.
#[test]
fn a_rollback_through_more_files_than_it_may_open_reaches_its_point() {
    const OPEN_FILES: u64 = 40;
    let fixture = Fixture::new(SIZE);
    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::new(SIZE);
    let mut workload = blkfilter::workload::Workload::new(58, SIZE);
    ship_small_segments(&fixture, &mut capture, &mut model, &mut workload, 200);
    apply_all(&fixture, "replica");
    let paths = fixture.replica_paths("replica");
    let points = catalog(&paths).unwrap().points;
    let (oldest, latest) = (points[0], points[points.len() - 1]);
    assert!(
        latest.index - oldest.index > 2 * OPEN_FILES,
        "points {}..={} are too few",
        oldest.index,
        latest.index
    );
    ublk_target_with_open_files(
        OPEN_FILES,
        &["rollback", "--point", &oldest.index.to_string()],
        &paths,
    );
    assert!(std::fs::read(&paths.replica).unwrap() == model_at(&model, oldest.last_seq));
}

/// A view keeps a bounded number of undo files open: `export` of a point with more
/// files after it than its open-file limit allows shows the point. A view keeping few
/// open shows its point through every change a merge under way when it registered can
/// make to what it loaded: files merged (and merged again), a merged file dropped
/// (read through the files it replaced), newer journals beside them; and one at a
/// point such a merge undoes past fails its reads, naming the point.
#[test]
fn a_view_through_more_undo_files_than_it_keeps_open_shows_its_point() {
    let fixture = Fixture::new(SIZE);
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::new(SIZE);
    let mut workload = blkfilter::workload::Workload::new(59, SIZE);
    ship_small_segments(&fixture, &mut capture, &mut model, &mut workload, 400);
    apply_all(&fixture, "replica");
    apply_all(&fixture, "twin");
    let paths = fixture.replica_paths("replica");
    let before = catalog(&paths).unwrap();
    let oldest = before.points[0];
    let expect = model_at(&model, oldest.last_seq);
    let open_files = ublk_target::view::OPEN_UNDO_FILES as u64 + 40;
    assert!(
        before.journals.len() as u64 > 2 * open_files,
        "{} undo files are too few",
        before.journals.len()
    );

    let out = fixture.path("exported");
    let point = oldest.index.to_string();
    let out_arg = out.to_str().unwrap();
    ublk_target_with_open_files(
        open_files,
        &["export", "--point", &point, "--out", out_arg],
        &paths,
    );
    assert!(std::fs::read(&out).unwrap() == expect, "export");

    let options = ViewOptions {
        undo_files_open: Some(4),
        ..ViewOptions::default()
    };
    let mut view = PointView::open_with(&paths, oldest.index, &options).unwrap();
    assert_eq!(view.undo_files_kept_open(), 4);
    assert!(read_view(&mut view) == expect);
    // What merges do to the directory, made by thinning the twin: the merged files put
    // in place, then the files they replace deleted.
    let twin = fixture.replica_paths("twin");
    let times: Vec<u64> = before.points.iter().map(|p| p.created_unix_ms).collect();
    let every = ((times[times.len() - 1] - times[0]) / 8).max(1);
    let later = times[times.len() - 1] + 100 * every;
    prune(&twin, &thinning_every(every), later).unwrap();
    let replaced = merge_as_the_twin_did(&paths, &twin);
    assert!(
        replaced.iter().all(|&(first, _)| first > oldest.index) && replaced.len() > 8,
        "{replaced:?}"
    );
    assert!(read_view(&mut view) == expect, "through the merged files");

    // Merged again, coarser (intervals twice as long, so each holds two of the
    // earlier ones): files the view reads through merged files are merged into bigger
    // ones. And a second view, at a point that coarser merge thins out, as a view
    // registered just after the applier listed the views to book it: its reads fail
    // rather than show a later point.
    prune(&twin, &thinning_every(2 * every), later).unwrap();
    let coarse: Vec<(u64, u64)> = catalog(&twin).unwrap().journals;
    let thinned_out = catalog(&paths)
        .unwrap()
        .points
        .into_iter()
        .find(|p| {
            coarse
                .iter()
                .any(|&(first, last)| first <= p.index && p.index < last)
        })
        .expect("a point the coarser merge undoes past");
    let one_open = ViewOptions {
        undo_files_open: Some(1),
        ..ViewOptions::default()
    };
    let mut crossed = PointView::open_with(&paths, thinned_out.index, &one_open).unwrap();
    assert!(read_view(&mut crossed) == model_at(&model, thinned_out.last_seq));
    // A merged file a view loaded (in place beside the files it replaces, not yet
    // booked) that the applier then drops (a view registered meanwhile needs the
    // points it thins out): read through the files it would have replaced.
    let journal = ublk_target::journal::Journal::new(&paths.journal);
    let &dropped_span = coarse
        .iter()
        .find(|&&span| span.0 < span.1 && !journal.path_of_span(span).exists())
        .expect("a coarser merged file");
    let dropped_path = journal.path_of_span(dropped_span);
    std::fs::copy(
        twin.journal.join(dropped_path.file_name().unwrap()),
        &dropped_path,
    )
    .unwrap();
    let run = journal
        .run_from(oldest.index, latest_index(&paths))
        .unwrap()
        .unwrap();
    assert!(run.contains(&dropped_span), "{run:?}");
    let mut loaded_dropped = PointView::open_with(&paths, oldest.index, &one_open).unwrap();
    assert!(read_view(&mut loaded_dropped) == expect);
    std::fs::remove_file(&dropped_path).unwrap();
    assert!(
        read_view(&mut loaded_dropped) == expect,
        "through the run it stood for"
    );
    let replaced = merge_as_the_twin_did(&paths, &twin);
    assert!(
        replaced.iter().any(|&(first, last)| first < last),
        "no merged file merged again: {replaced:?}"
    );
    assert!(read_view(&mut view) == expect, "through files merged twice");
    assert!(
        read_view(&mut loaded_dropped) == expect,
        "through it, made again"
    );
    drop(loaded_dropped);
    let err = first_read_error(&mut crossed).expect("a read through the coarser merge");
    assert!(
        err.to_string()
            .contains(&format!("also undoes point {}", thinned_out.index)),
        "{err}"
    );
    drop(crossed);

    // Segments applied since: the view loads their journals beside the merged files.
    ship_small_segments(&fixture, &mut capture, &mut model, &mut workload, 20);
    apply_all(&fixture, "replica");
    let loaded = view.journals_loaded();
    assert!(read_view(&mut view) == expect, "with newer journals");
    assert!(view.journals_loaded() > loaded);
    view.close().unwrap();
}
