//! Staging's file system fills up (a 2 MiB tmpfs) while the store is down: the stager
//! waits, the status says Warning with what to do, the shipper keeps running and capture
//! goes on into the ring; once the store is back, uploads free staging, staging resumes
//! and the replica converges to the source with every recovery point intact.
//! Needs root (it mounts the tmpfs).

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
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_staging_file_system_waits_with_a_warning_and_loses_nothing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a small tmpfs for staging");
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
        drive(&mut capture, &mut model, workload.by_ref().take(20));
        std::thread::sleep(Duration::from_millis(20));
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
    drive(&mut capture, &mut model, workload.by_ref().take(20));

    // The store comes back: uploads free staging and everything gets through.
    std::fs::remove_file(&volume_dir).unwrap();
    drive(&mut capture, &mut model, workload.take(20));
    control.drain();
    shipper.join().unwrap().expect("shipper");
    let done = status().unwrap();
    assert!(done.staging_full.is_none(), "{done:?}");
    assert_eq!(done.health(), shipper::Health::Healthy, "{}", done.state());

    let seen = apply_and_check_crash_points(&fixture, &model, "replica");
    assert!(seen.last_is_point && seen.others == 0, "{seen:?}");
    assert!(std::fs::read(fixture.path("replica")).unwrap() == model.final_image());
}
