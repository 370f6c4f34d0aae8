//! Consistency groups end to end: two volumes attached with one group clock, an
//! application whose every write to volume B depends on the write to volume A it just
//! finished, cuts made while it runs; after shipping and applying both, the recovery
//! points of each cut, one per volume, must together be the group's state at the cut
//! (every record of the group below the cut's seq, on both volumes) — so B never holds
//! a write whose A write is missing.

use blkfilter::capture::{Capture, Captured};
use blkfilter::ring::{Cut, GroupClock, Producer, RingGeometry};
use blkfilter::workload::WorkOp;
use e2e::*;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const SIZE: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const WRITES: u64 = 3000;
/// The workload cuts the group itself every this many writes.
const CUT_EVERY: u64 = 200;

fn grouped_capture(fixture: &Fixture, clock: &std::path::Path) -> Capture {
    let mut producer =
        Producer::create(&fixture.path("ring"), &RingGeometry::new(64 << 20, SIZE)).unwrap();
    producer.join_group(GroupClock::open_or_create(clock).unwrap());
    Capture::open(&fixture.path("backing"), producer, false).unwrap()
}

/// Write number `n`: block `n % blocks`, filled with `n`.
fn write(n: u64) -> WorkOp {
    let data = n.to_le_bytes().repeat((BLOCK / 8) as usize);
    WorkOp::Write {
        offset: n % (SIZE / BLOCK) * BLOCK,
        data,
    }
}

fn record(capture: &mut Capture, model: &mut Model, op: WorkOp) {
    match capture.handle(op.as_request()).unwrap() {
        Captured::Recorded(seq) => model.record(seq, op),
        Captured::MarkedDirty(_) => panic!("the ring is sized not to overflow"),
    }
}

/// Ships everything in `fixture`'s ring and applies it to its replica "replica".
fn ship_and_apply(fixture: &Fixture) {
    fixture.ship_drained();
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    applier.apply_available().unwrap();
}

/// Runs `command`, which must fail with `expect` in its error output.
fn refused(command: &mut Command, expect: &str) {
    let out = command.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{command:?} succeeded");
    assert!(err.contains(expect), "{expect:?} not in {err}");
}

/// The image of replica `name` at `point`.
fn point_image(fixture: &Fixture, name: &str, point: u64) -> Vec<u8> {
    let mut view = ublk_target::PointView::open(&fixture.replica_paths(name), point).unwrap();
    let mut image = vec![0u8; SIZE as usize];
    view.read_at(&mut image, 0).unwrap();
    view.close().unwrap();
    image
}

/// The image of `model` with every record below `seq`.
fn model_image(model: &Model, seq: u64) -> Vec<u8> {
    let mut replay = model.replayer();
    replay.advance_to(seq);
    replay.image
}

/// The newest write number an image holds (0 for none).
fn newest_write(image: &[u8]) -> u64 {
    image
        .chunks(BLOCK as usize)
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
        .max()
        .unwrap()
}

#[test]
fn each_cut_is_one_crash_state_of_both_volumes() {
    let (a, b) = (Fixture::new(SIZE), Fixture::new(SIZE));
    let clock_path = a.path("group.clock");
    let (mut capture_a, mut capture_b) = (
        grouped_capture(&a, &clock_path),
        grouped_capture(&b, &clock_path),
    );
    // Cuts race with the writes from a thread of their own; the workload also cuts
    // every CUT_EVERY writes, so some always fall inside it however threads are
    // scheduled, half of them between a write to A and the write to B after it.
    let done = Arc::new(AtomicBool::new(false));
    let clock = Arc::new(GroupClock::open(&clock_path).unwrap());
    let cutter = {
        let (done, clock) = (done.clone(), clock.clone());
        std::thread::spawn(move || {
            let mut cuts = Vec::<Cut>::new();
            while !done.load(Ordering::Relaxed) {
                cuts.push(clock.cut().unwrap());
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            cuts
        })
    };
    let (mut model_a, mut model_b) = (Model::new(SIZE), Model::new(SIZE));
    let mut cuts = Vec::new();
    for n in 1..=WRITES {
        // B's write is issued only after A's is acknowledged: it depends on it.
        record(&mut capture_a, &mut model_a, write(n));
        if n % CUT_EVERY == 0 {
            cuts.push(clock.cut().unwrap());
        }
        record(&mut capture_b, &mut model_b, write(n));
        if n % CUT_EVERY == CUT_EVERY / 2 {
            cuts.push(clock.cut().unwrap());
        }
    }
    done.store(true, Ordering::Relaxed);
    cuts.extend(cutter.join().unwrap());
    let cuts: BTreeMap<u64, u64> = cuts.into_iter().map(|c| (c.number, c.seq)).collect();
    // The housekeeping tick records the cuts made after each volume's last write.
    capture_a.tick().unwrap();
    capture_b.tick().unwrap();
    for f in [&a, &b] {
        ship_and_apply(f);
    }

    let catalogs = vec![
        (
            "a".to_string(),
            ublk_target::catalog(&a.replica_paths("replica")).unwrap(),
        ),
        (
            "b".to_string(),
            ublk_target::catalog(&b.replica_paths("replica")).unwrap(),
        ),
    ];
    let common = ublk_target::group_cuts::common_points(&catalogs);
    let covered: u64 = common.iter().map(|g| g.last - g.first + 1).sum();
    assert_eq!(covered, cuts.len() as u64, "every cut is a group point");
    let mut mid_workload = 0;
    for g in &common {
        for cut in g.first..=g.last {
            let seq = cuts[&cut];
            let (point_a, point_b) = (g.points[0].1.index, g.points[1].1.index);
            let image_a = point_image(&a, "replica", point_a);
            let image_b = point_image(&b, "replica", point_b);
            assert!(
                image_a == model_image(&model_a, seq) && image_b == model_image(&model_b, seq),
                "cut {cut}: a point {point_a} / b point {point_b} differ from the volumes' \
                 records below seq {seq}"
            );
            // What the application sees: B's newest write never runs ahead of A's.
            let (newest_a, newest_b) = (newest_write(&image_a), newest_write(&image_b));
            assert!(
                newest_b == newest_a || newest_b + 1 == newest_a,
                "cut {cut}: B holds write {newest_b}, A only {newest_a}"
            );
            if newest_a > 0 && newest_a < WRITES {
                mid_workload += 1;
            }
        }
    }
    assert!(
        mid_workload >= 3,
        "only {mid_workload} cuts fell inside the workload"
    );

    // The CLI lists the same cuts, and a cut with no point is refused by name.
    let out = Command::new(bin("ublk-target"))
        .arg("group-points")
        .arg("--replica")
        .arg(a.path("replica"))
        .arg("--replica")
        .arg(b.path("replica"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().count(), 1 + common.len(), "{text}");
    assert!(text.contains(&format!("{:016x}", clock.id())), "{text}");
    refused(
        Command::new(bin("ublk-target"))
            .args(["failover", "--test", "--group-cut", "999999", "--replica"])
            .arg(a.path("replica")),
        "no recovery point at group cut 999999",
    );
    refused(
        Command::new(bin("ublk-target"))
            .arg("group-points")
            .arg("--replica")
            .arg(a.path("replica")),
        "at least two volumes",
    );
    // A mistyped clock is named, not created.
    let missing = a.path("no-such.clock");
    refused(
        Command::new(bin("shipper")).arg("group-cut").arg(&missing),
        "does not exist",
    );
    assert!(!missing.exists());
}

/// An applier that prunes as it applies keeps every retained point's cuts, and its
/// cut file does not grow with the points it dropped.
#[test]
fn an_applier_pruning_as_it_goes_keeps_the_cuts_of_its_points() {
    const KEEP: usize = 3;
    let fixture = Fixture::new(SIZE);
    let clock_path = fixture.path("group.clock");
    let mut capture = grouped_capture(&fixture, &clock_path);
    let clock = GroupClock::open(&clock_path).unwrap();
    let mut model = Model::new(SIZE);
    for n in 1..=600 {
        record(&mut capture, &mut model, write(n));
        if n % 10 == 0 {
            clock.cut().unwrap();
        }
    }
    capture.tick().unwrap();
    fixture.ship_drained();
    // The reference: every point, every cut.
    fixture
        .applier("reference", &fixture.key)
        .unwrap()
        .apply_available()
        .unwrap();
    let reference = ublk_target::catalog(&fixture.replica_paths("reference")).unwrap();
    let with_cuts = reference
        .points
        .iter()
        .filter(|p| p.group_cuts.is_some())
        .count();
    assert!(with_cuts >= 30, "only {with_cuts} points at cuts");

    let paths = fixture.replica_paths("replica");
    let options = ublk_target::ApplyOptions {
        retention: ublk_target::Retention {
            keep_points: Some(KEEP),
            keep_age: None,
            keep_size: None,
            thin: None,
        },
        ..Default::default()
    };
    let mut applier = fixture
        .applier_with("replica", &fixture.key, &options)
        .unwrap();
    while let Some(applied) = applier.apply_next().unwrap() {
        let points = ublk_target::catalog(&paths).unwrap().points;
        assert!(points.len() <= KEEP);
        for p in &points {
            let expect = reference.find(p.index).expect("a reference point");
            assert_eq!(p.group_cuts, expect.group_cuts, "point {}", p.index);
        }
        let lines = ublk_target::group_cuts::load(&paths.journal).unwrap().len();
        assert!(
            lines <= KEEP + 16 + 1,
            "segment {}: {lines} cut lines for {KEEP} points",
            applied.header.index
        );
    }
}

/// Thinning keeps, of each interval over, its newest point at a group cut where it
/// has one (so that the volumes of a group keep the same cuts), and each point kept
/// shows the volume as it was.
#[test]
fn thinning_keeps_the_newest_cut_of_each_interval() {
    let fixture = Fixture::new(SIZE);
    let clock_path = fixture.path("group.clock");
    let mut capture = grouped_capture(&fixture, &clock_path);
    let clock = GroupClock::open(&clock_path).unwrap();
    let mut model = Model::new(SIZE);
    // Rounds shipped one by one, every third ending at a cut: points with and
    // without cuts.
    for round in 0..30 {
        for n in 1..=20 {
            record(&mut capture, &mut model, write(round * 20 + n));
        }
        if round % 3 == 0 {
            clock.cut().unwrap();
        }
        capture.tick().unwrap();
        fixture.ship_drained();
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    fixture
        .applier("replica", &fixture.key)
        .unwrap()
        .apply_available()
        .unwrap();
    let paths = fixture.replica_paths("replica");
    let all = ublk_target::catalog(&paths).unwrap().points;
    let times: Vec<u64> = all.iter().map(|p| p.created_unix_ms).collect();
    let spread = times[times.len() - 1] - times[0];
    // The model: per run of points in one interval, the newest at a cut, else the
    // newest, stays; the points between two that stay go; the latest point's interval
    // waits (see below). Intervals as long as make a cut the choice where a newer
    // point without one shares its interval.
    let model_for = |every: u64| {
        // A point at a cut is filed under the time the cut was made (here just before
        // its segment was sealed, so the order stays that of the points).
        let interval = |p: &ublk_target::RecoveryPoint| filing_time(p) / every;
        let last = all.len() - 1;
        let mut stays = vec![false; all.len()];
        let mut chose_a_cut = false;
        let mut start = 0;
        for (i, p) in all.iter().enumerate() {
            if all
                .get(i + 1)
                .is_some_and(|next| interval(next) == interval(p))
            {
                continue;
            }
            if i == last {
                // The latest point's interval waits for a newer point (its choice may
                // change yet): all of it stays, and so do the points back to the one
                // that stays before it (that pair is not merged yet).
                let before = (0..start).rev().find(|&k| stays[k]).unwrap_or(start);
                stays[before..].fill(true);
                break;
            }
            let at_cut = (start..=i).rev().find(|&k| all[k].group_cuts.is_some());
            chose_a_cut |= at_cut.is_some_and(|c| c != i);
            stays[at_cut.unwrap_or(i)] = true;
            start = i + 1;
        }
        let staying: Vec<usize> = (0..all.len()).filter(|&k| stays[k]).collect();
        let expect: Vec<u64> = (0..all.len())
            .filter(|&k| stays[k] && k >= staying[0])
            .map(|k| all[k].index)
            .collect();
        chose_a_cut.then_some(expect)
    };
    let (every, expect) = (2..40)
        .map(|parts| (spread / parts).max(1))
        .find_map(|every| model_for(every).map(|expect| (every, expect)))
        .unwrap_or_else(|| {
            let seen: Vec<_> = all
                .iter()
                .map(|p| (p.index, p.created_unix_ms, p.group_cuts.is_some()))
                .collect();
            panic!("no interval length makes a cut the choice over a newer point: {seen:?}")
        });
    let retention = thinning_every(every);
    ublk_target::prune(&paths, &retention, times[times.len() - 1] + 10 * every).unwrap();
    let kept = ublk_target::catalog(&paths).unwrap().points;
    assert_eq!(
        kept.iter().map(|p| p.index).collect::<Vec<_>>(),
        expect,
        "intervals of {every} ms"
    );
    for p in &kept {
        let reference = all.iter().find(|q| q.index == p.index).unwrap();
        assert_eq!(p.group_cuts, reference.group_cuts, "point {}", p.index);
        assert!(
            point_image(&fixture, "replica", p.index) == model_image(&model, p.last_seq + 1),
            "point {}",
            p.index
        );
    }
}

/// When a point counts as made for thinning: its first cut's time, else its own.
fn filing_time(p: &ublk_target::RecoveryPoint) -> u64 {
    p.group_cuts
        .and_then(|c| c.first_unix_ms)
        .unwrap_or(p.created_unix_ms)
}

/// The cut numbers `points` are at.
fn cuts_of(points: &[ublk_target::RecoveryPoint]) -> Vec<u64> {
    points
        .iter()
        .filter_map(|p| p.group_cuts)
        .flat_map(|c| c.first..=c.last)
        .collect()
}

#[test]
fn thinning_keeps_the_same_cuts_on_every_volume_however_late_each_sealed_them() {
    let (a, b) = (Fixture::new(SIZE), Fixture::new(SIZE));
    let clock_path = a.path("group.clock");
    let mut captures = [
        grouped_capture(&a, &clock_path),
        grouped_capture(&b, &clock_path),
    ];
    let clock = GroupClock::open(&clock_path).unwrap();
    let mut models = [Model::new(SIZE), Model::new(SIZE)];
    // Every round ends at a cut; volume B records and seals it 15 ms after A, as a
    // shipper with a longer batch would, so an interval boundary can fall between
    // the two seals of one cut.
    for round in 0..40 {
        for (capture, model) in captures.iter_mut().zip(&mut models) {
            for n in 1..=5 {
                record(capture, model, write(round * 5 + n));
            }
        }
        clock.cut().unwrap();
        captures[0].tick().unwrap();
        a.ship_drained();
        std::thread::sleep(std::time::Duration::from_millis(15));
        captures[1].tick().unwrap();
        b.ship_drained();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut catalogs = Vec::new();
    for fixture in [&a, &b] {
        fixture
            .applier("replica", &fixture.key)
            .unwrap()
            .apply_available()
            .unwrap();
        catalogs.push(ublk_target::catalog(&fixture.replica_paths("replica")).unwrap());
    }
    for catalog in &catalogs {
        assert!(
            catalog.points[1..].iter().all(|p| p
                .group_cuts
                .is_some_and(|c| c.first_unix_ms.is_some_and(|t| t <= p.created_unix_ms))),
            "every point but the first is at a cut, with the cut's time"
        );
    }
    // Intervals for which the newest cut by each volume's own seal times differs
    // between the volumes: one boundary at least falls between the seals of a cut.
    let newest_cut_by_seal = |catalog: &ublk_target::Catalog, every: u64| {
        let mut newest = BTreeMap::new();
        for p in catalog.points.iter().filter(|p| p.group_cuts.is_some()) {
            newest.insert(p.created_unix_ms / every, p.group_cuts.unwrap().last);
        }
        newest.into_values().collect::<Vec<_>>()
    };
    let times: Vec<u64> = catalogs[0]
        .points
        .iter()
        .map(|p| p.created_unix_ms)
        .collect();
    let spread = times[times.len() - 1] - times[0];
    let every = (3..30)
        .map(|parts| spread / parts)
        .find(|&every| {
            newest_cut_by_seal(&catalogs[0], every) != newest_cut_by_seal(&catalogs[1], every)
        })
        .expect("an interval length with a boundary between the seals of one cut");
    let now = times[times.len() - 1] + 10 * every;
    let mut kept = Vec::new();
    for (fixture, model) in [&a, &b].into_iter().zip(&models) {
        let paths = fixture.replica_paths("replica");
        ublk_target::prune(&paths, &thinning_every(every), now).unwrap();
        let points = ublk_target::catalog(&paths).unwrap().points;
        for p in &points {
            assert!(
                point_image(fixture, "replica", p.index) == model_image(model, p.last_seq + 1),
                "point {}",
                p.index
            );
        }
        kept.push(points);
    }
    let (kept_a, kept_b) = (cuts_of(&kept[0]), cuts_of(&kept[1]));
    assert!(
        kept_a.len() < cuts_of(&catalogs[0].points).len(),
        "thinned: {kept_a:?}"
    );
    assert_eq!(
        kept_a, kept_b,
        "both volumes keep the same cuts (intervals of {every} ms)"
    );
    let named: Vec<(String, ublk_target::Catalog)> = ["a", "b"]
        .into_iter()
        .zip(&kept)
        .map(|(name, points)| {
            let catalog = ublk_target::Catalog {
                points: points.clone(),
                ..Default::default()
            };
            (name.to_string(), catalog)
        })
        .collect();
    let common: Vec<u64> = ublk_target::group_cuts::common_points(&named)
        .iter()
        .flat_map(|g| g.first..=g.last)
        .collect();
    assert_eq!(common, kept_a, "each kept cut is a group point");
}

#[test]
fn an_app_consistent_cut_waits_for_every_volume_and_is_flagged_on_each() {
    let (a, b) = (Fixture::new(SIZE), Fixture::new(SIZE));
    let clock_path = a.path("group.clock");
    let mut captures = [
        grouped_capture(&a, &clock_path),
        grouped_capture(&b, &clock_path),
    ];
    let (mut model_a, mut model_b) = (Model::new(SIZE), Model::new(SIZE));
    record(&mut captures[0], &mut model_a, write(1));
    record(&mut captures[1], &mut model_b, write(1));
    // `shipper group-cut` returns once both producers recorded the cut; their
    // housekeeping tick does that here, as the ublk server's timer does.
    let cutter = {
        let (clock, ring_a, ring_b) = (clock_path.clone(), a.path("ring"), b.path("ring"));
        std::thread::spawn(move || {
            Command::new(bin("shipper"))
                .arg("group-cut")
                .arg(clock)
                .args(["--app-consistent", "--pre", "true", "--ring"])
                .arg(ring_a)
                .arg("--ring")
                .arg(ring_b)
                .output()
                .unwrap()
        })
    };
    while !cutter.is_finished() {
        for capture in &mut captures {
            capture.tick().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = cutter.join().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("app-consistent group cut 1 "), "{text}");
    record(&mut captures[0], &mut model_a, write(2));
    for f in [&a, &b] {
        ship_and_apply(f);
        let catalog = ublk_target::catalog(&f.replica_paths("replica")).unwrap();
        let point = catalog
            .points
            .iter()
            .find(|p| p.group_cuts.is_some_and(|c| c.contains(1)))
            .expect("a point at cut 1");
        assert!(point.app_consistent, "{point:?}");
    }

    // Pruning drops the cut lines of the points it drops.
    let paths = a.replica_paths("replica");
    let retention = ublk_target::Retention {
        keep_points: Some(1),
        keep_age: None,
        keep_size: None,
        thin: None,
    };
    ublk_target::prune(&paths, &retention, changelog::unix_ms_now()).unwrap();
    let left = ublk_target::group_cuts::load(&paths.journal).unwrap();
    let points = ublk_target::catalog(&paths).unwrap().points;
    assert!(
        left.keys().all(|i| points.iter().any(|p| p.index == *i)) && points.len() == 1,
        "cut lines {left:?} for points {points:?}"
    );

    // A ring outside the group is refused by name, and nothing is cut.
    let other = Fixture::new(SIZE);
    let _alone = other.capture(16 << 20);
    refused(
        Command::new(bin("shipper"))
            .arg("group-cut")
            .arg(&clock_path)
            .arg("--ring")
            .arg(other.path("ring")),
        "is not in the consistency group",
    );
    assert_eq!(GroupClock::open(&clock_path).unwrap().cuts(), 1);
}

/// `ublk-target plan` with a config naming both volumes.
fn plan_command(config: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(bin("ublk-target"));
    command.arg("plan").args(args).arg("--config").arg(config);
    command
}

fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{command:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn a_plan_chooses_one_cut_for_all_its_volumes_and_changes_nothing_when_one_cannot_fail_over() {
    let (a, b) = (Fixture::new(SIZE), Fixture::new(SIZE));
    let clock_path = a.path("group.clock");
    let (mut capture_a, mut capture_b) = (
        grouped_capture(&a, &clock_path),
        grouped_capture(&b, &clock_path),
    );
    let clock = GroupClock::open(&clock_path).unwrap();
    let (mut model_a, mut model_b) = (Model::new(SIZE), Model::new(SIZE));
    for n in 1..=6 {
        record(&mut capture_a, &mut model_a, write(n));
        record(&mut capture_b, &mut model_b, write(n));
        if n % 2 == 0 {
            clock.cut().unwrap();
        }
    }
    // Written after the last cut: each volume's latest point is past every cut.
    record(&mut capture_a, &mut model_a, write(7));
    record(&mut capture_b, &mut model_b, write(7));
    for (capture, f) in [(&mut capture_a, &a), (&mut capture_b, &b)] {
        capture.tick().unwrap();
        ship_and_apply(f);
    }
    let config = a.path("target.toml");
    std::fs::write(
        &config,
        format!(
            "key = \"/etc/ublk-dr/key\"\nstore = \"{}\"\n\
             [[volume]]\nid = \"a\"\nreplica = \"{}\"\n\
             [[volume]]\nid = \"b\"\nreplica = \"{}\"\n\
             [[plan]]\nname = \"pair\"\n\
             [[plan.step]]\nvolumes = [\"a\"]\npost = \"true\"\n\
             [[plan.step]]\nvolumes = [\"b\"]\n",
            a.path("store").display(),
            a.path("replica").display(),
            b.path("replica").display()
        ),
    )
    .unwrap();
    let catalogs = || [&a, &b].map(|f| ublk_target::catalog(&f.replica_paths("replica")).unwrap());
    let before = catalogs();
    let named: Vec<(String, ublk_target::Catalog)> = ["a", "b"]
        .map(String::from)
        .into_iter()
        .zip(before.clone())
        .collect();
    let common = ublk_target::group_cuts::common_points(&named);
    let last = common.last().expect("cuts on both volumes");
    assert_eq!(last.last, 3);

    // The default choice is the latest cut both volumes have: cut 3, not each one's
    // latest point.
    let shown = stdout_of(&mut plan_command(&config, &["show", "pair"]));
    assert!(shown.contains("at group cut 3 (clock"), "{shown}");
    for (name, p) in &last.points {
        assert!(
            shown.contains(&format!("    {name}: point {} (", p.index)),
            "{name} {p:?}: {shown}"
        );
    }
    // The same as JSON, for scripts.
    let json: serde_json::Value = serde_json::from_str(&stdout_of(&mut plan_command(
        &config,
        &["show", "pair", "--json"],
    )))
    .unwrap();
    let indexes: Vec<u64> = json[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|step| step["volumes"].as_array().unwrap().iter())
        .map(|v| v["point"]["index"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = last.points.iter().map(|(_, p)| p.index).collect();
    assert_eq!(indexes, expected, "{json}");
    assert!(json[0]["error"].is_null(), "{json}");
    // `status` shows the plan's point and its age beside the volumes.
    let status = stdout_of(
        Command::new(bin("ublk-target"))
            .arg("status")
            .arg("--config")
            .arg(&config),
    );
    let row = status
        .lines()
        .find(|l| l.starts_with("pair "))
        .expect(&status);
    assert!(
        row.contains("latest-cut") && row.contains("group cut 3 (clock"),
        "{status}"
    );
    let latest = stdout_of(&mut plan_command(
        &config,
        &["show", "pair", "--point", "latest"],
    ));
    for (name, catalog) in named.iter() {
        let p = catalog.latest_point().unwrap();
        assert!(
            latest.contains(&format!("    {name}: point {} (", p.index)),
            "{latest}"
        );
        assert!(last.points.iter().all(|(_, q)| q.index != p.index));
    }

    // Refusals, each before anything changed.
    refused(
        &mut plan_command(&config, &["failover", "pair", "--point", "cut:99"]),
        "group cut 99 has no recovery point on every one of a, b",
    );
    refused(
        &mut plan_command(&config, &["failover", "pair", "--test", "--from-step", "3"]),
        "plan pair has steps 1..=2",
    );
    refused(
        &mut plan_command(&config, &["commit", "pair"]),
        "a, b not failed over, or the rollback did not finish; nothing committed",
    );
    refused(
        &mut plan_command(&config, &["show", "shop"]),
        "plan shop is not in it (it has pair)",
    );
    // b cannot be rolled back while a view of it is open: a, in the step before it, is
    // not rolled back either.
    let view =
        ublk_target::PointView::open(&b.replica_paths("replica"), last.points[1].1.index).unwrap();
    refused(
        &mut plan_command(&config, &["failover", "pair"]),
        "volume b cannot fail over",
    );
    view.close().unwrap();
    if !std::path::Path::new("/dev/ublk-control").exists() {
        refused(
            &mut plan_command(&config, &["failover", "pair"]),
            "/dev/ublk-control is missing",
        );
    }
    let after = catalogs();
    for (was, is) in before.iter().zip(&after) {
        assert_eq!(is.rolled_back_to, None);
        assert_eq!(was.points, is.points);
    }
}
