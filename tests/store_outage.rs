//! The target store goes away for a while (its volume directory is replaced by a file,
//! so every upload fails with a real I/O error), then comes back: uploads are retried
//! on the schedule (1, 2, 4, 8, 10, then 30 units; the unit scaled to 20 ms), status
//! says Warning with the error meanwhile, capture goes on, and the replica converges.
//! The alert command hears of the outage once it has held, and of its end.
//!
//! A store that takes an upload and does not answer (a hung mount, a silent network)
//! fails nothing: the status names the upload that has lasted the RPO threshold.

use blkfilter::workload::Workload;
use changelog::LocalDirStore;
use e2e::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn store_outage_is_retried_on_schedule_and_converges() {
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::new(size);
    let unit = Duration::from_millis(20);
    let store = Arc::new(RecordingStore::new(LocalDirStore::new(
        fixture.path("store"),
    )));
    let mut config = fixture.shipper_config();
    config.retry_unit = unit;
    config.status_path = Some(fixture.path("status.json"));
    // The operator's alert command hears of the outage and of its end.
    let alerts = fixture.path("alerts.log");
    config.alert_command = Some(format!(
        "echo \"$UBLK_DR_VOLUME $UBLK_DR_PREVIOUS_HEALTH $UBLK_DR_HEALTH $UBLK_DR_STATE\" >> {}",
        alerts.display()
    ));
    config.alert_hold = Duration::from_millis(300);
    let control = Arc::new(shipper::Control::default());
    let shipper = {
        let (store, control) = (store.clone(), control.clone());
        std::thread::spawn(move || shipper::run(&config, store, control))
    };
    let mut workload = Workload::new(77, size);
    drive(&mut capture, &mut model, workload.by_ref().take(100));

    // The store goes away: its volume directory becomes a file.
    let volume_dir = fixture.path("store").join("vol0");
    std::fs::create_dir_all(&volume_dir).unwrap();
    swap_store_volume(&volume_dir, &fixture.path("store-away"));
    // Down until the shipper has failed seven times and said so (events, not time: a
    // slow machine only makes the outage longer).
    let failures = || store.attempts().iter().filter(|a| !a.ok).count();
    let down_at = Instant::now();
    let mut warned = None;
    while failures() < 7 || warned.is_none() {
        assert!(
            down_at.elapsed() < Duration::from_secs(60),
            "the shipper never retried"
        );
        // Capture continues meanwhile.
        drive(&mut capture, &mut model, workload.by_ref().take(5));
        if let Ok(s) = shipper::Status::read(&fixture.path("status.json")) {
            if s.retry_attempt > 0 {
                warned = Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // It comes back, with what it held.
    swap_store_volume(&volume_dir, &fixture.path("store-away"));
    drive(&mut capture, &mut model, workload.take(50));
    let lines = || {
        std::fs::read_to_string(&alerts)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    control.drain();
    shipper.join().unwrap().expect("shipper");
    let lines = lines();
    assert_eq!(
        lines.len(),
        2,
        "one alert for the outage, one for its end: {lines:?}"
    );
    assert!(
        lines[0].starts_with("vol0 Healthy Warning retrying upload"),
        "{lines:?}"
    );
    assert_eq!(lines[1], "vol0 Warning Healthy replicating");

    let warned = warned.expect("status never showed the retries");
    assert_eq!(warned.health(), shipper::Health::Warning);
    assert!(
        warned.state().contains("retrying upload") && warned.last_error.is_some(),
        "{}",
        warned.state()
    );
    // The failed attempts of the outage: each wait at least the scheduled delay.
    let attempts = store.attempts();
    let first_failure = attempts.iter().position(|a| !a.ok).expect("uploads failed");
    let run: Vec<Instant> = attempts[first_failure..]
        .iter()
        .take_while(|a| !a.ok)
        .map(|a| a.at)
        .collect();
    assert!(run.len() >= 6, "only {} attempts in the outage", run.len());
    let schedule = [1, 2, 4, 8, 10, 30];
    for (i, pair) in run.windows(2).enumerate() {
        let want = unit * schedule[i.min(schedule.len() - 1)];
        let waited = pair[1] - pair[0];
        assert!(
            waited >= want,
            "retry {} after {waited:?}, schedule says {want:?}",
            i + 1
        );
    }
    assert!(attempts.last().unwrap().ok, "the last upload succeeded");

    let seen = apply_and_check_crash_points(&fixture, &model, "replica");
    assert!(seen.last_is_point && seen.others == 0, "{seen:?}");
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

#[test]
fn an_upload_the_store_never_answers_is_named_in_the_status() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::new(size);
    drive(&mut capture, &mut model, Workload::new(78, size).take(40));
    // Segment puts hang until `answer` is set.
    let answer = Arc::new(AtomicBool::new(false));
    let store = Arc::new({
        let answer = answer.clone();
        HookedStore::new(LocalDirStore::new(fixture.path("store")), move |call| {
            if let StoreCall::Put(_) = call {
                while !answer.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Ok(())
        })
    });
    let mut config = fixture.shipper_config();
    config.rpo_threshold = Duration::from_millis(500);
    config.status_path = Some(fixture.path("status.json"));
    let control = Arc::new(shipper::Control::default());
    let shipper = {
        let (store, control) = (store.clone(), control.clone());
        std::thread::spawn(move || shipper::run(&config, store, control))
    };
    let status = || shipper::Status::read(&fixture.path("status.json")).ok();
    let started = Instant::now();
    let hung = loop {
        if let Some(s) = status().filter(|s| s.upload_stalled_ms().is_some()) {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            status()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(hung.health(), shipper::Health::Warning, "{}", hung.state());
    assert!(
        hung.state().starts_with("an upload has been under way for")
            && hung
                .state()
                .ends_with("the store is slow or does not answer"),
        "{}",
        hung.state()
    );
    assert_eq!(hung.retry_attempt, 0, "nothing failed");

    // The store answers: the upload ends, the state with it, and everything ships.
    answer.store(true, Ordering::Release);
    control.drain();
    shipper.join().unwrap().expect("shipper");
    let done = status().unwrap();
    assert_eq!(done.upload_started_unix_ms, None);
    assert_eq!(done.state(), "replicating");
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    applier.apply_available().unwrap();
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}
