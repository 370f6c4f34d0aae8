//! Full file systems on either side, made real with small tmpfs mounts (needs root):
//!
//! * Staging fills up while the store is down: the stager waits, the status says
//!   Warning with what to do, the shipper keeps running and capture goes on into the
//!   ring; once the store is back, uploads free staging, staging resumes and the replica
//!   converges to the source with every recovery point intact.
//! * The undo journal's file system fills up while applying: `ublk-target apply` stops
//!   with an error that says what is full and what to do, exits non-zero, and leaves the
//!   replica at a recovery point; once there is room, apply goes on and converges.
//! * A journal file system nine tenths full, with journals that may grow past what is
//!   left, is a Warning in `ublk-target status` before it fills.
//! * The source's backing fills up: a write that fails half-done is not recorded, but
//!   its range is resynced, so the replica gets what the backing holds.

use blkfilter::capture::Request;
use blkfilter::workload::Workload;
use e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("running mount")
            .success();
        assert!(ok, "mounting a tmpfs at {}", at.display());
        SmallFs(at.into())
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("running mount")
            .success();
        assert!(ok, "resizing the tmpfs at {}", self.0.display());
    }
}

/// Whether the test must be skipped: mounting needs root. Says so when it must.
fn skip_unless_root(mount_for: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    if !root {
        eprintln!("skipped: needs root to mount a small tmpfs for {mount_for}");
    }
    !root
}

/// Polls `done` every 50 ms while `child` runs, for at most `limit` since `started`;
/// panics (with `log()`) if the child exits or time runs out.
fn wait_while_running(
    child: &mut std::process::Child,
    started: Instant,
    limit: Duration,
    what: &str,
    log: impl Fn() -> String,
    done: impl Fn() -> bool,
) {
    while !done() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "apply --follow exited: {}",
            log()
        );
        assert!(started.elapsed() < limit, "{what}: {}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_staging_file_system_waits_with_a_warning_and_loses_nothing() {
    if skip_unless_root("staging") {
        return;
    }
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let staging = SmallFs::mount(&fixture.path("small-staging"), "2m");
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::new(size);

    // The store is down from the start (its volume directory is a file), so every
    // staged segment stays in staging.
    let volume_dir = fixture.path("store").join("vol0");
    std::fs::create_dir_all(fixture.path("store")).unwrap();
    std::fs::write(&volume_dir, b"not a directory").unwrap();

    let mut config = fixture.shipper_config();
    config.staging_dir = staging.0.clone();
    config.retry_unit = Duration::from_millis(20);
    let (control, shipper) = fixture.spawn_shipper(config);
    let status = || shipper::Status::read(&fixture.path("status.json")).ok();

    let mut workload = Workload::new(91, size);
    let started = Instant::now();
    let full = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "staging never filled; last status: {:?}",
            status()
        );
        assert!(
            !shipper.is_finished(),
            "the shipper stopped; last status: {:?}",
            status()
        );
        // Small steps, each outlasting a status update (200 ms), so the 64 MiB ring
        // takes what staging cannot without overflowing: an overflow would move the
        // later writes to the dirty bitmap, which this host test does not resync.
        drive(&mut capture, &mut model, workload.by_ref().take(4));
        std::thread::sleep(Duration::from_millis(250));
        if let Some(s) = status().filter(|s| s.staging_full.is_some()) {
            break s;
        }
    };
    // It waits rather than failing: still running a while later, no Critical.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !shipper.is_finished(),
        "the shipper stopped on a full staging"
    );
    let waiting = status().unwrap();
    assert_eq!(waiting.health(), shipper::Health::Warning, "{waiting:?}");
    assert!(waiting.critical.is_none());
    let state = waiting.state();
    assert!(
        state.starts_with("waiting for staging space")
            && state.contains("No space left on device")
            && state.contains("give staging a larger one")
            && state.contains(&staging.0.display().to_string()),
        "{state}"
    );
    assert!(
        full.ring_used_bytes > 0,
        "what is not staged stays in the ring"
    );
    // Capture goes on meanwhile.
    drive(&mut capture, &mut model, workload.by_ref().take(10));

    // The store comes back: uploads free staging and everything gets through.
    std::fs::remove_file(&volume_dir).unwrap();
    drive(&mut capture, &mut model, workload.take(10));
    control.drain();
    shipper.join().unwrap().expect("shipper");
    let done = status().unwrap();
    assert!(done.staging_full.is_none(), "{done:?}");
    assert!(
        !done.ring_overflow,
        "the test overfilled the ring: {done:?}"
    );
    assert_eq!(done.health(), shipper::Health::Healthy, "{}", done.state());

    let seen = apply_and_check_crash_points(&fixture, &model, "replica");
    assert!(seen.last_is_point && seen.others == 0, "{seen:?}");
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

#[test]
fn a_full_journal_file_system_stops_apply_with_a_clear_error_at_a_point() {
    if skip_unless_root("the undo journal") {
        return;
    }
    let size = 8 << 20;
    let (fixture, model) = Fixture::shipped(size, 5, 300);
    let segments = fixture.store_segments().len();
    sparse_file(&fixture.path("replica"), size);
    let journal = SmallFs::mount(&fixture.path("small-journal"), "1m");
    let apply = || {
        let mut cmd = apply_command(&fixture, "replica");
        cmd.arg("--journal")
            .arg(journal.0.join("j"))
            .env("RUST_LOG", "warn");
        cmd
    };

    let out = apply().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "apply succeeded on a full journal");
    assert!(
        stderr.contains("saving undo journal")
            && stderr.matches("No space left on device").count() == 1
            && stderr.contains("A file system is full: free space"),
        "{stderr}"
    );
    // The undo file that did not fit is gone, not left half-written holding space.
    let leftovers: Vec<_> = std::fs::read_dir(journal.0.join("j"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "left in the journal: {leftovers:?}");
    // The replica is at the recovery point the state file names, not in between.
    let paths = fixture.replica_paths("replica");
    let state = || {
        ublk_target::ApplyState::load(&paths.state, None)
            .unwrap()
            .expect("a state file")
    };
    let stopped_at = state();
    let applied = stopped_at.cursor.next_index as usize;
    assert!(
        applied > 0 && applied < segments,
        "the journal should fill part-way ({applied} of {segments} applied)"
    );
    let mut replay = model.replayer();
    replay.advance_to(stopped_at.cursor.next_seq);
    assert!(
        file_sha256(&fixture.path("replica")) == sha256(&replay.image),
        "the replica is not at point {}",
        applied - 1
    );

    // `apply --follow` (the service) keeps running on a full disk, warns, retries, and
    // goes on once there is room.
    let log = fixture.path("follow.log");
    let mut follower = apply()
        .args(["--follow", "--poll-ms", "50"])
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap();
    let started = Instant::now();
    wait_while_running(
        &mut follower,
        started,
        Duration::from_secs(30),
        "no retry warning",
        log_text,
        || log_text().contains("retrying in"),
    );
    journal.resize("64m");
    wait_while_running(
        &mut follower,
        started,
        Duration::from_secs(60),
        "never caught up",
        log_text,
        || state().cursor.next_index as usize >= segments && log_text().contains("applying again"),
    );
    follower.kill().unwrap();
    follower.wait().unwrap();
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}

/// `ublk-target status` warns before the journal's file system fills (applying would
/// stop there): over nine tenths full with journals that may grow past what is left is
/// a Warning that says so; a `keep_size` that fits in the space left is not.
#[test]
fn a_nearly_full_journal_file_system_is_a_warning() {
    if skip_unless_root("the undo journal") {
        return;
    }
    let size = 4 << 20;
    let (fixture, _model) = Fixture::shipped(size, 6, 120);
    sparse_file(&fixture.path("replica"), size);
    let journal = SmallFs::mount(&fixture.path("small-journal"), "16m");
    let out = apply_command(&fixture, "replica")
        .arg("--journal")
        .arg(journal.0.join("j"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config = fixture.path("target.toml");
    let write_config = |retention: &str| {
        std::fs::write(
            &config,
            format!(
                "key = {:?}\nstore = {:?}\nrpo_threshold_ms = 3600000\n{retention}\n\
                 [[volume]]\nid = \"vol0\"\nreplica = {:?}\njournal = {:?}\n",
                fixture.path("key"),
                fixture.path("store"),
                fixture.path("replica"),
                journal.0.join("j"),
            ),
        )
        .unwrap()
    };
    let status = || {
        let out = Command::new(bin("ublk-target"))
            .args(["status", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    write_config("");
    let text = status();
    assert!(text.contains("Healthy") && !text.contains("full"), "{text}");

    // Fill it to within 1 MiB of the end.
    let used_by_journals: u64 = std::fs::read_dir(journal.0.join("j"))
        .unwrap()
        .map(|e| {
            use std::os::unix::fs::MetadataExt;
            e.unwrap().metadata().unwrap().blocks() * 512
        })
        .sum();
    let filler = vec![7u8; ((15 << 20) - used_by_journals) as usize];
    std::fs::write(journal.0.join("filler"), filler).unwrap();
    let text = status();
    assert!(
        text.contains("Warning")
            && text.contains("file system is 9")
            && text.contains("% full (")
            && text.contains("applying stops when it is full"),
        "{text}"
    );
    // Journals bounded to what is left: nothing to fear from them.
    write_config(&format!(
        "keep_size = \"{}\"",
        used_by_journals + (512 << 10)
    ));
    let text = status();
    assert!(text.contains("Healthy") && !text.contains("full"), "{text}");
}

#[test]
fn a_write_that_fails_on_a_full_backing_is_resynced_not_lost() {
    if skip_unless_root("the backing") {
        return;
    }
    // The source's backing: an 8 MiB sparse file on a 1 MiB tmpfs.
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let small = SmallFs::mount(&fixture.path("small-backing"), "1m");
    let backing = small.0.join("backing");
    sparse_file(&backing, size);
    std::fs::remove_file(fixture.path("backing")).unwrap();
    std::os::unix::fs::symlink(&backing, fixture.path("backing")).unwrap();
    let mut capture = fixture.capture(16 << 20);

    let first = vec![0x11; 512 << 10];
    capture
        .handle(Request::Write {
            offset: 0,
            data: &first,
        })
        .expect("the first write fits");
    // Half of this one fits: a short write, then ENOSPC. The request fails, but the
    // backing has changed.
    let second = vec![0x22; 1 << 20];
    let err = capture
        .handle(Request::Write {
            offset: 2 << 20,
            data: &second,
        })
        .expect_err("the disk is full");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    let on_disk = std::fs::read(&backing).unwrap();
    assert!(
        on_disk[2 << 20..3 << 20].contains(&0x22),
        "the failed write changed nothing, so this test shows nothing"
    );
    // The resync pass (on the next tick) sends what the backing holds there.
    capture.tick().unwrap();
    drop(capture);
    fixture.ship_drained();
    let mut applier = fixture.applier("replica", &fixture.key).unwrap();
    applier.apply_available().unwrap();
    assert!(
        std::fs::read(fixture.path("replica")).unwrap() == on_disk,
        "the replica misses what the failed write left on the source"
    );
}
