//! kill -9 of the shipper and of the applier at random moments under load: after
//! restarts everything converges, every record reaches the store exactly once, and the
//! replica equals the reference model at every recovery point (I4, I5).

use blkfilter::workload::{Rng, Workload};
use e2e::*;
use std::process::Child;
use std::time::Duration;

fn spawn_shipper(fixture: &Fixture, drain: bool) -> Child {
    let mut cmd = shipper_command(fixture);
    cmd.args([
        "--max-segment-age-ms",
        "10",
        "--max-segment-bytes",
        "131072",
        "--retry-unit-ms",
        "2",
        "--no-initial-sync",
        // An 8 MiB disk: a burst staged while the store lags must not drop the
        // backlog here (every record must reach the store).
        "--backlog-resync-percent",
        "0",
    ]);
    if drain {
        cmd.arg("--drain");
    }
    cmd.spawn().expect("spawn shipper")
}

fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
    child.wait().expect("reap");
}

fn shipper_killed_under_load(seed: u64) {
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::new(size);
    let mut rng = Rng::new(seed);
    let mut shipper = spawn_shipper(&fixture, false);
    let mut workload = Workload::new(seed, size).with_max_io(256 << 10);
    for _round in 0..5 {
        // Writes keep flowing while the shipper runs, dies and restarts.
        drive(
            &mut capture,
            &mut model,
            workload.by_ref().take(40 + rng.below(40) as usize),
        );
        std::thread::sleep(Duration::from_millis(5 + rng.below(60)));
        kill9(&mut shipper);
        drive(&mut capture, &mut model, workload.by_ref().take(20));
        shipper = spawn_shipper(&fixture, false);
    }
    std::thread::sleep(Duration::from_millis(rng.below(30)));
    kill9(&mut shipper);
    let status = spawn_shipper(&fixture, true).wait().unwrap();
    assert!(status.success(), "draining shipper failed: {status}");

    assert_eq!(
        store_seqs(&fixture),
        model.seqs(),
        "nothing lost, nothing shipped twice"
    );
    let segments = apply_and_check_every_point(&fixture, &model, "replica");
    assert!(segments > 5);
    assert!(
        std::fs::read(fixture.path("replica")).unwrap()
            == std::fs::read(fixture.path("backing")).unwrap()
    );
}

#[test]
fn shipper_kill9_seed_1() {
    shipper_killed_under_load(1);
}

#[test]
fn shipper_kill9_seed_2() {
    shipper_killed_under_load(2);
}

#[test]
fn shipper_kill9_seed_3() {
    shipper_killed_under_load(3);
}

fn spawn_applier(fixture: &Fixture, follow: bool) -> Child {
    let mut cmd = apply_command(fixture, "replica");
    cmd.args(["--poll-ms", "1"]).env("RUST_LOG", "warn");
    if follow {
        cmd.arg("--follow");
    }
    cmd.spawn().expect("spawn ublk-target")
}

#[test]
fn applier_killed_while_applying_converges() {
    let size = 8 << 20;
    let (fixture, model) = Fixture::shipped(size, 7, 400);
    let total = fixture.store_segments().len();
    sparse_file(&fixture.path("replica"), size);

    let mut rng = Rng::new(99);
    for _ in 0..8 {
        let mut applier = spawn_applier(&fixture, true);
        std::thread::sleep(Duration::from_millis(2 + rng.below(40)));
        kill9(&mut applier);
    }
    assert!(spawn_applier(&fixture, false).wait().unwrap().success());
    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
        "replica converged"
    );
    let state: changelog::ChainCursor =
        bincode_state(&fixture.path("replica.state")).expect("applier state after the final run");
    assert_eq!(
        state.next_index as usize, total,
        "every segment applied, the cursor at the end"
    );
}

/// Re-applying a segment whose cursor update was lost (a crash between the replica
/// writes and the state write) gives the same replica (I5).
#[test]
fn reapplying_a_segment_is_idempotent() {
    let (fixture, model) = Fixture::shipped(4 << 20, 11, 200);

    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    let mut checked = 0;
    loop {
        let before = std::fs::read(fixture.path("replica.state")).ok();
        let Some(_) = applier.apply_next().unwrap() else {
            break;
        };
        let after_once = file_sha256(&fixture.path("replica"));
        // Lose the cursor update, as a crash right before it would.
        match &before {
            Some(bytes) => std::fs::write(fixture.path("replica.state"), bytes).unwrap(),
            None => std::fs::remove_file(fixture.path("replica.state")).unwrap(),
        }
        drop(applier); // it holds the journal lock
        applier = fixture.applier("replica", &fixture.key).unwrap();
        applier
            .apply_next()
            .unwrap()
            .expect("the same segment again");
        assert_eq!(
            file_sha256(&fixture.path("replica")),
            after_once,
            "re-apply changed the replica"
        );
        checked += 1;
    }
    assert!(checked > 3);
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

fn bincode_state(path: &std::path::Path) -> Option<changelog::ChainCursor> {
    let applier_state = std::fs::read(path).ok()?;
    ublk_target::apply::decode_state(&applier_state).ok()
}
