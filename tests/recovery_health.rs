//! The recovery side's own health (`ublk-target status`, `apply --follow` alerts), and
//! the shipper heartbeat it rests on.
//!
//! A quiet source makes no segments; while its shipper runs, its heartbeats keep the
//! replica's RPO at the recovery site low, so the volume is Healthy there although its
//! newest recovery point is older than the threshold. When the source goes dark (the
//! shipper stops), the RPO grows past the threshold: `status` says Warning and `apply
//! --follow` runs the alert command, the only alarm left when the protected site is
//! gone. A segment that cannot be applied stops `apply`: Critical, at once.
//!
//! A heartbeat vouches only for what is in the store: while segments wait to be
//! uploaded none is written, and the one written after names the chain's end.
//!
//! An `apply --follow` hung in a store call still raises the alarm: a watchdog judges
//! the RPO without the applying thread.
//!
//! A journal size limit that keeps the recovery points from reaching back `keep_age`
//! is a Warning too.

use blkfilter::workload::Workload;
use changelog::heartbeat::Heartbeat;
use changelog::{segment_file_name, LocalDirStore, TargetStore};
use e2e::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;
const THRESHOLD_MS: u64 = 8_000;

fn wait_for(what: &str, limit: Duration, check: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "never saw: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The recovery side's config file for the fixture's volume, replica `replica`.
fn target_config(fixture: &Fixture) -> std::path::PathBuf {
    let path = fixture.path("target.toml");
    std::fs::write(
        &path,
        format!(
            "key = {:?}\nstore = {:?}\nrpo_threshold_ms = {THRESHOLD_MS}\n\
             [[volume]]\nid = \"vol0\"\nreplica = {:?}\n",
            fixture.path("key"),
            fixture.path("store"),
            fixture.path("replica"),
        ),
    )
    .unwrap();
    path
}

/// `ublk-target status --json` of the volume.
fn status(config: &Path) -> serde_json::Value {
    let out = Command::new(bin("ublk-target"))
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows[0].clone()
}

fn age_ms(unix_ms: &serde_json::Value) -> u64 {
    changelog::unix_ms_now().saturating_sub(unix_ms.as_u64().expect("a time"))
}

/// `ublk-target apply --follow` over `config`, each alert appended to `alerts` as
/// "SITE VOLUME PREVIOUS HEALTH STATE", its log in `log`.
fn follow_with_alerts(config: &Path, alerts: &Path, log: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin("ublk-target"))
            .args(["apply", "--follow", "--poll-ms", "50", "--config"])
            .arg(config)
            .args(["--alert-hold-ms", "1000", "--alert-command"])
            .arg(format!(
                "echo \"$UBLK_DR_SITE $UBLK_DR_VOLUME $UBLK_DR_PREVIOUS_HEALTH $UBLK_DR_HEALTH \
                 $UBLK_DR_STATE\" >> {}",
                alerts.display()
            ))
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `BIN status --check ARGS`: its exit status and output.
fn check(bin_name: &str, args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = Command::new(bin(bin_name))
        .args(["status", "--check"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().expect("exited"), text)
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_quiet_source_stays_healthy_and_a_dark_one_raises_the_alarm() {
    let fixture = Fixture::new(SIZE);
    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::new(SIZE);
    drive(&mut capture, &mut model, Workload::new(3, SIZE).take(50));
    let mut shipper_config = fixture.shipper_config();
    shipper_config.heartbeat_interval = Duration::from_millis(200);
    let (control, shipper) = fixture.spawn_shipper(shipper_config);
    let shipper_status = || shipper::Status::read(&fixture.path("status.json")).ok();
    wait_for(
        "the shipper caught up",
        Duration::from_secs(60),
        &mut || shipper_status().is_some_and(|s| s.heartbeat_unix_ms.is_some()),
    );

    sparse_file(&fixture.path("replica"), SIZE);
    let config = target_config(&fixture);
    let alerts = fixture.path("alerts.log");
    let log = fixture.path("apply.log");
    let mut apply = follow_with_alerts(&config, &alerts, &log);
    let alert_lines = || lines_of(&alerts);

    // Quiet: the newest point ages past the threshold, the heartbeats keep the RPO low.
    let mut quiet = serde_json::Value::Null;
    wait_for(
        "the newest point older than the threshold",
        Duration::from_secs(60),
        &mut || {
            quiet = status(&config);
            !quiet["latest_created_unix_ms"].is_null()
                && age_ms(&quiet["latest_created_unix_ms"]) > THRESHOLD_MS + 500
        },
    );
    assert_eq!(quiet["health"], "Healthy", "{quiet:#}");
    assert!(
        quiet["rpo_ms"].as_u64().unwrap() < THRESHOLD_MS,
        "the heartbeat did not count: {quiet:#}"
    );
    assert!(!quiet["heartbeat_unix_ms"].is_null(), "{quiet:#}");
    assert_eq!(
        alert_lines(),
        Vec::<String>::new(),
        "a quiet source is not news"
    );
    let (code, text) = check("ublk-target", &["--config".as_ref(), config.as_os_str()]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("UBLK-DR TARGET OK - 1 volume(s) Healthy, largest RPO ")
            && text.contains(" | 'vol0 rpo'="),
        "{text}"
    );
    let shipper_status = fixture.path("status.json");
    let (code, text) = check(
        "shipper",
        &["--status".as_ref(), shipper_status.as_os_str()],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("UBLK-DR SHIPPER OK - 1 volume(s) Healthy"),
        "{text}"
    );
    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
        "the replica is not the source"
    );

    // Dark: the shipper stops, nothing vouches for the replica any more.
    control.stop();
    shipper.join().unwrap().unwrap();
    let mut dark = serde_json::Value::Null;
    wait_for("status Warning", Duration::from_secs(60), &mut || {
        dark = status(&config);
        dark["health"] == "Warning"
    });
    assert!(dark["rpo_ms"].as_u64().unwrap() > THRESHOLD_MS, "{dark:#}");
    let table = Command::new(bin("ublk-target"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("Warning") && table.contains("not current for"),
        "{table}"
    );
    let prometheus = Command::new(bin("ublk-target"))
        .args(["status", "--prometheus", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&prometheus.stdout);
    assert!(
        text.lines()
            .any(|l| l == "ublk_dr_target_health{volume=\"vol0\"} 1"),
        "{text}"
    );
    let (code, text) = check("ublk-target", &["--config".as_ref(), config.as_os_str()]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.starts_with("UBLK-DR TARGET WARNING - vol0 Warning: not current for"),
        "{text}"
    );
    wait_for(
        "the alert of the dark source",
        Duration::from_secs(60),
        &mut || !alert_lines().is_empty(),
    );
    let lines = alert_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("recovery vol0 Healthy Warning not current for"),
        "{lines:?}"
    );

    // A segment that does not verify stops applying: Critical at once, non-zero exit.
    let next = status(&config)["latest_applied"].as_u64().unwrap() + 1;
    std::fs::write(
        fixture
            .path("store")
            .join("vol0")
            .join(segment_file_name(next)),
        b"not a segment",
    )
    .unwrap();
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = apply.0.try_wait().unwrap() {
            break exit;
        }
        if started.elapsed() > Duration::from_secs(60) {
            panic!(
                "apply --follow did not stop: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        exit.code(),
        Some(3),
        "stopped for an operator, not to be restarted"
    );
    let lines = alert_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].starts_with("recovery vol0 Warning Critical stopped applying:"),
        "{lines:?}"
    );
}

#[test]
fn a_heartbeat_vouches_only_for_what_is_in_the_store() {
    let fixture = Fixture::new(SIZE);
    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::new(SIZE);
    drive(&mut capture, &mut model, Workload::new(4, SIZE).take(40));
    // Segment uploads fail (recoverably) until `up` is set; small objects always work.
    let up = Arc::new(AtomicBool::new(false));
    let store = Arc::new({
        let up = up.clone();
        HookedStore::new(
            LocalDirStore::new(fixture.path("store")),
            move |call| match call {
                StoreCall::Put(_) if !up.load(Ordering::Acquire) => Err(changelog::Error::io(
                    "uploading",
                    std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                )),
                _ => Ok(()),
            },
        )
    });
    let mut config = fixture.shipper_config();
    config.heartbeat_interval = Duration::from_millis(50);
    config.status_path = Some(fixture.path("status.json"));
    let control = Arc::new(shipper::Control::default());
    let shipper = {
        let (store, control) = (store.clone(), control.clone());
        std::thread::spawn(move || shipper::run(&config, store, control))
    };
    let heartbeat = || {
        store
            .get_blob(&fixture.volume, changelog::heartbeat::BLOB_NAME)
            .unwrap()
            .map(|bytes| Heartbeat::open(&fixture.key, &fixture.volume, bytes).unwrap())
    };
    // Everything is staged, nothing uploaded: no heartbeat, however long.
    wait_for("segments staged", Duration::from_secs(60), &mut || {
        shipper::Status::read(&fixture.path("status.json"))
            .is_ok_and(|s| s.segments_pending_upload > 0 && s.retry_attempt > 0)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(heartbeat(), None, "a heartbeat while segments wait");

    // The store is back: once it holds every segment, a heartbeat names the chain's end.
    up.store(true, Ordering::Release);
    wait_for("a heartbeat", Duration::from_secs(60), &mut || {
        heartbeat().is_some()
    });
    let beat = heartbeat().unwrap();
    control.stop();
    let summary = shipper.join().unwrap().unwrap();
    let indexes = store.list(&fixture.volume).unwrap();
    assert_eq!(beat.next_index, indexes.len() as u64, "{indexes:?}");
    assert!(
        beat.vouches_for(&summary.cursor),
        "{beat:?} {:?}",
        summary.cursor
    );
    // And a replica applied up to there holds every write captured.
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    applier.apply_available().unwrap();
    assert!(beat.vouches_for(applier.cursor()));
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

#[test]
fn a_drain_ends_with_a_heartbeat_at_the_chain_end() {
    let fixture = Fixture::new(SIZE);
    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::new(SIZE);
    drive(&mut capture, &mut model, Workload::new(5, SIZE).take(20));
    // A drain takes well under the default interval: only its end writes one.
    let before = changelog::unix_ms_now();
    let summary = fixture.ship_drained();
    let bytes = fixture
        .store()
        .get_blob(&fixture.volume, changelog::heartbeat::BLOB_NAME)
        .unwrap()
        .expect("no heartbeat after the drain");
    let beat = Heartbeat::open(&fixture.key, &fixture.volume, bytes).unwrap();
    assert!(beat.vouches_for(&summary.cursor), "{beat:?}");
    assert!(beat.unix_ms >= before);
}

#[test]
fn a_replica_failed_over_here_ends_apply_follow_quietly() {
    let (fixture, _model) = Fixture::shipped(SIZE, 6, 30);
    sparse_file(&fixture.path("replica"), SIZE);
    let config = target_config(&fixture);
    let ran = |args: &[&str]| {
        let out = Command::new(bin("ublk-target"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, text) = ran(&["apply"]);
    assert!(status.success(), "{text}");
    let points = status_points(&config);
    assert!(points.len() >= 2, "{points:?}");
    let (status, text) = ran(&["rollback", "vol0", "--point", &points[0].to_string()]);
    assert!(status.success(), "{text}");
    let row = self::status(&config);
    assert_eq!(row["health"], "Healthy", "the primary now: {row:#}");

    // The service on a failed-over replica: nothing to follow, no alert, no restart.
    let alerts = fixture.path("alerts.log");
    let command = format!("echo \"$UBLK_DR_HEALTH\" >> {}", alerts.display());
    let (status, text) = ran(&["apply", "--follow", "--alert-command", &command]);
    assert!(status.success(), "{text}");
    assert!(text.contains("was failed over to point"), "{text}");
    assert!(!alerts.exists(), "an alert for a failover");
}

/// `apply --follow` hung in a store call (a directory store on a mount that does not
/// answer: here a FIFO where the heartbeat should be, which blocks its reader) still
/// raises the alarm as the RPO grows: its watchdog judges without the applying thread.
#[test]
fn a_hung_apply_still_raises_the_alarm() {
    let (fixture, model) = Fixture::shipped(SIZE, 7, 30);
    let beat = fixture
        .path("store")
        .join("vol0")
        .join(changelog::heartbeat::BLOB_NAME);
    std::fs::remove_file(&beat).expect("the drain's heartbeat");
    let made = Command::new("mkfifo").arg(&beat).status().unwrap();
    assert!(made.success());
    sparse_file(&fixture.path("replica"), SIZE);
    let config = target_config(&fixture);
    let alerts = fixture.path("alerts.log");
    let log = fixture.path("apply.log");
    let mut apply = follow_with_alerts(&config, &alerts, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Applied, then stuck reading the heartbeat.
    wait_for("the alert", Duration::from_secs(60), &mut || {
        !lines_of(&alerts).is_empty()
    });
    let lines = lines_of(&alerts);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("recovery vol0 Healthy Warning")
            && lines[0].contains("not current for"),
        "{lines:?}"
    );
    wait_for("the stall named", Duration::from_secs(60), &mut || {
        log_text().contains("applying has made no progress for")
    });
    assert!(apply.0.try_wait().unwrap().is_none(), "{}", log_text());
    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == model.final_image(),
        "the replica is not the source"
    );
    // `status` does not hang with it: the store's silence is its answer.
    let (code, text) = check("ublk-target", &["--config".as_ref(), config.as_os_str()]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.starts_with("UBLK-DR TARGET WARNING - vol0 Warning:")
            && text.contains("gave no answer within 10 s"),
        "{text}"
    );

    // The store answers again (with something that is no heartbeat): applying goes on.
    {
        let mut writer = std::fs::OpenOptions::new().write(true).open(&beat).unwrap();
        std::fs::remove_file(&beat).unwrap();
        std::io::Write::write_all(&mut writer, b"not a heartbeat").unwrap();
    }
    wait_for("progress again", Duration::from_secs(60), &mut || {
        log_text().contains("applying makes progress again")
    });
    assert!(log_text().contains("heartbeat, ignored"), "{}", log_text());
    assert!(apply.0.try_wait().unwrap().is_none(), "{}", log_text());
}

/// The recovery points of the config's volume, oldest first.
fn status_points(config: &Path) -> Vec<u64> {
    let out = Command::new(bin("ublk-target"))
        .args(["points", "vol0", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let catalog: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    catalog["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["index"].as_u64().unwrap())
        .collect()
}

/// A journal size limit that keeps the points from reaching back as far as `keep_age`
/// asks is a Warning, in `status` (and its `--check`) and as an alert from `apply
/// --follow`, with what to do; with room for the history it asks for, the volume is
/// Healthy.
#[test]
fn a_size_limit_that_cuts_the_history_short_is_a_warning() {
    use std::os::unix::fs::MetadataExt;
    let (fixture, _model) = Fixture::shipped(SIZE, 47, 300);
    // What the journals take when nothing is pruned, on a twin replica.
    fixture
        .applier("twin", &fixture.key)
        .unwrap()
        .apply_available()
        .unwrap();
    let everything: u64 = std::fs::read_dir(fixture.replica_paths("twin").journal)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum();
    let keep_size = everything / 4;
    sparse_file(&fixture.path("replica"), SIZE);
    let config = fixture.path("target.toml");
    let write_config = |keep_size: u64| {
        std::fs::write(
            &config,
            format!(
                "key = {:?}\nstore = {:?}\nrpo_threshold_ms = 3600000\nkeep_age = \"15d\"\n\
                 keep_size = \"{keep_size}\"\nkeep_applied_segments = true\n\
                 [[volume]]\nid = \"vol0\"\nreplica = {:?}\n",
                fixture.path("key"),
                fixture.path("store"),
                fixture.path("replica"),
            ),
        )
        .unwrap()
    };
    write_config(keep_size);
    let (alerts, log) = (fixture.path("alerts"), fixture.path("apply.log"));
    let apply = follow_with_alerts(&config, &alerts, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the history warning", Duration::from_secs(60), &mut || {
        lines_of(&alerts)
            .iter()
            .any(|a| a.contains("Healthy Warning") && a.contains("recovery points reach back"))
    });
    drop(apply);
    let row = status(&config);
    assert_eq!(row["health"], "Warning", "{row}");
    let bytes = row["journal_bytes"].as_u64().unwrap();
    assert!(
        bytes > 0 && bytes <= keep_size,
        "{bytes} of {keep_size}: {row}"
    );
    let (code, text) = check("ublk-target", &["--config".as_ref(), config.as_os_str()]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("of the 15d00h keep_age: the undo journals fill keep_size"),
        "{text}\n{}",
        log_text()
    );

    // Room for the history asked for: Healthy again.
    write_config(everything * 2);
    let row = status(&config);
    assert_eq!(row["health"], "Healthy", "{row}");
    let (code, text) = check("ublk-target", &["--config".as_ref(), config.as_os_str()]);
    assert_eq!(code, 0, "{text}");
}
