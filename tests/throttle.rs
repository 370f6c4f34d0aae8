//! The upload limit (`[throttle]`, `--upload-limit`): the uploads of every volume of a
//! shipper share one budget, which holds between any two upload starts; the replicas
//! still converge; SIGHUP re-reads the limit, and a config that does not load keeps the
//! one in force. The checks are lower bounds on time (a slow machine only passes them
//! more easily): without the limit the same uploads finish in a fraction of it.

use blkfilter::workload::Workload;
use changelog::LocalDirStore;
use e2e::*;
use shipper::throttle::{Policy, Rate, Throttle};
use shipper::Status;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Polls `f` for up to 60 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "never saw: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fixture whose ring holds `ops` requests of workload `seed`, with its model.
fn captured(seed: u64, ops: usize) -> (Fixture, Model) {
    let size = 8 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(64 << 20);
    let mut model = Model::new(size);
    drive(
        &mut capture,
        &mut model,
        Workload::new(seed, size).take(ops),
    );
    (fixture, model)
}

#[test]
fn two_volumes_share_one_upload_limit_and_both_replicas_converge() {
    const LIMIT: u64 = 1_000_000;
    let throttle = Arc::new(Throttle::new(Policy::constant(Rate::new(LIMIT))));
    let volumes = [captured(11, 40), captured(12, 40)];
    let stores: Vec<_> = volumes
        .iter()
        .map(|(f, _)| Arc::new(RecordingStore::new(LocalDirStore::new(f.path("store")))))
        .collect();
    // The status's throughput while the uploads go on (sampled from the outside).
    let shipping = std::sync::atomic::AtomicBool::new(true);
    let mut seen_rates = [(0u64, 0u64); 2];
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = [(0u64, 0u64); 2];
            // Once more after the shippers ended: their last status holds the rates of
            // the whole run, should this thread have been starved meanwhile.
            loop {
                let last = !shipping.load(std::sync::atomic::Ordering::Acquire);
                for ((fixture, _), seen) in volumes.iter().zip(&mut seen) {
                    if let Ok(s) = Status::read(&fixture.path("status.json")) {
                        seen.0 = seen.0.max(s.capture_bytes_per_s);
                        seen.1 = seen.1.max(s.upload_bytes_per_s);
                    }
                }
                if last {
                    break seen;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut shippers = Vec::new();
        for ((fixture, _), store) in volumes.iter().zip(&stores) {
            let mut config = fixture.shipper_config();
            config.throttle = throttle.clone();
            config.status_path = Some(fixture.path("status.json"));
            let control = Arc::new(shipper::Control::default());
            control.drain();
            let store = store.clone();
            shippers.push(
                scope.spawn(move || shipper::run(&config, store, control).expect("shipper run")),
            );
        }
        for shipper in shippers {
            shipper.join().unwrap();
        }
        shipping.store(false, std::sync::atomic::Ordering::Release);
        seen_rates = watcher.join().unwrap();
    });

    let mut uploads: Vec<UploadAttempt> = stores.iter().flat_map(|s| s.attempts()).collect();
    uploads.sort_by_key(|u| u.at);
    assert!(uploads.iter().all(|u| u.ok));
    let total: usize = uploads.iter().map(|u| u.bytes).sum();
    let largest = uploads.iter().map(|u| u.bytes).max().unwrap();
    assert!(
        total as u64 >= 2 * LIMIT,
        "only {total} bytes uploaded: too little for the limit to show"
    );
    // Slots are consecutive on one clock: whatever started before an upload fits in
    // the time since the first start, give or take the slot of the segment still on the
    // link and a few ms between a slot's start and the put.
    let first = uploads[0].at;
    let mut before = 0usize;
    for u in &uploads {
        let allowed = LIMIT as f64 * (u.at - first + Duration::from_millis(50)).as_secs_f64()
            + largest as f64;
        assert!(
            before as f64 <= allowed,
            "{before} bytes started in the {:?} before this upload, over {LIMIT} B/s",
            u.at - first
        );
        before += u.bytes;
    }
    for (((fixture, model), store), (capture_rate, upload_rate)) in
        volumes.iter().zip(&stores).zip(seen_rates)
    {
        let status = Status::read(&fixture.path("status.json")).unwrap();
        assert_eq!(status.upload_limit_bytes_per_s, Some(LIMIT));
        assert_eq!(status.upload_limit_window, None);
        // The status counts what the store took, and showed both rates while shipping.
        let stored: usize = store
            .attempts()
            .iter()
            .filter(|u| u.ok)
            .map(|u| u.bytes)
            .sum();
        assert_eq!(status.bytes_uploaded, stored as u64);
        assert!(
            capture_rate > 0 && upload_rate > 0,
            "the status never showed throughput: {capture_rate} / {upload_rate} B/s"
        );
        apply_and_check_every_point(fixture, model, "replica");
    }
    let waited: u64 = volumes
        .iter()
        .map(|(f, _)| {
            Status::read(&f.path("status.json"))
                .unwrap()
                .upload_throttled_ms
        })
        .sum();
    assert!(waited > 0, "no upload waited for the limit");
}

/// Writes a shipper config into `fixture`'s directory (key, staging, store, status
/// files there) with `[throttle] limit` and a `[[volume]]` per (id, ring).
fn write_config(fixture: &Fixture, limit: &str, volumes: &[(&str, &std::path::Path)]) {
    let d = fixture.dir.path().display();
    let mut text = format!(
        "key = \"{d}/key\"\nstaging = \"{d}/staging\"\nstore = \"{d}/store\"\n\
         status_dir = \"{d}\"\nmax_segment_bytes = 262144\ninitial_sync = false\n\
         cpu_priority = \"normal\"\n[throttle]\nlimit = \"{limit}\"\n"
    );
    for (id, ring) in volumes {
        text += &format!("[[volume]]\nid = \"{id}\"\nring = \"{}\"\n", ring.display());
    }
    std::fs::write(fixture.path("shipper.toml"), text).unwrap();
}

/// Two `shipper run --config --volume` processes of one config file, as the systemd
/// units run them, share the config's limit through its throttle clock file.
#[test]
fn shipper_processes_of_one_config_share_its_limit() {
    const LIMIT: u64 = 1_000_000;
    let (a, a_model) = captured(21, 120);
    let (mut b, b_model) = captured(22, 120);
    // b's segments go to a's store as vol1.
    b.volume = changelog::VolumeId::new("vol1").unwrap();
    std::fs::copy(a.path("key"), b.path("key")).unwrap();
    b.key = a.key.clone();
    std::os::unix::fs::symlink(a.path("store"), b.path("store")).unwrap();
    write_config(
        &a,
        "1MB/s",
        &[("vol0", &a.path("ring")), ("vol1", &b.path("ring"))],
    );
    let shippers: Vec<_> = ["vol0", "vol1"]
        .iter()
        .map(|volume| {
            Command::new(bin("shipper"))
                .args(["run", "--drain", "--volume", volume, "--config"])
                .arg(a.path("shipper.toml"))
                .env("RUST_LOG", "warn")
                .spawn()
                .unwrap()
        })
        .collect();
    for mut shipper in shippers {
        assert!(shipper.wait().unwrap().success());
    }
    // The segments as the store has them: size, and when each was put (its inode's
    // change time: the put links the staged file in, moments after the upload
    // started, and then unlinks the staged name), so process start-up does not count.
    let segments: Vec<(u64, Duration)> = ["vol0", "vol1"]
        .iter()
        .flat_map(|v| std::fs::read_dir(a.path("store").join(v)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| {
            let m = std::fs::metadata(p).unwrap();
            let changed = Duration::new(m.ctime() as u64, m.ctime_nsec() as u32);
            (m.len(), changed)
        })
        .collect();
    let total: u64 = segments.iter().map(|s| s.0).sum();
    let largest = segments.iter().map(|s| s.0).max().unwrap();
    let (first, last) = (
        segments.iter().map(|s| s.1).min().unwrap(),
        segments.iter().map(|s| s.1).max().unwrap(),
    );
    let span = last - first;
    // All but the last segment went out between the first and the last start, at
    // most the limit's worth plus one segment. The floor leaves a segment more and
    // half a second for slow puts (the times are those of the links into the store,
    // after each upload's slot), and still lies above total/2 / LIMIT: how long each
    // process alone at the limit would take.
    assert!(
        total >= 6 * largest + 2 * LIMIT,
        "only {total} bytes, segments up to {largest}: too little to show"
    );
    let floor = Duration::from_secs_f64((total - 3 * largest) as f64 / LIMIT as f64)
        .saturating_sub(Duration::from_millis(500));
    assert!(
        span >= floor,
        "{total} bytes went out in {span:?}: faster than {LIMIT} B/s for both together"
    );
    apply_and_check_every_point(&a, &a_model, "replica");
    apply_and_check_every_point(&b, &b_model, "replica");
}

/// `shipper run --config` with a [throttle] table, the volume's ring filled first.
#[test]
fn sighup_rereads_the_limit_and_a_broken_config_keeps_it() {
    let (fixture, model) = captured(13, 40);
    let cfg = fixture.path("shipper.toml");
    let config = |limit: &str| write_config(&fixture, limit, &[("vol0", &fixture.path("ring"))]);
    // Slow enough that uploads are still pending after the reloads below, however
    // slowly this machine takes them.
    config("250kB/s");
    let log = fixture.path("shipper.log");
    let mut shipper = Command::new(bin("shipper"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let status_path = fixture.path("vol0.status.json");
    let status = || Status::read(&status_path).ok();
    eventually("uploads held to 250 kB/s", || {
        status().is_some_and(|s| {
            s.upload_limit_bytes_per_s == Some(250_000)
                && s.upload_throttled_ms > 0
                && s.segments_pending_upload > 0
        })
    });
    let out = Command::new(bin("shipper"))
        .args(["status", "--status"])
        .arg(&status_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("upload limit     0.25 MB/s (2.0 Mbit/s); uploads waited"),
        "{text}"
    );

    let hup = |child: &std::process::Child| {
        // SAFETY: kill with a valid signal to our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    };
    let logged = |what: &str| std::fs::read_to_string(&log).unwrap().contains(what);
    config("fast");
    hup(&shipper);
    eventually("the broken config refused", || {
        logged("keeping the upload limit in force")
    });
    // The status written after that (every 200 ms) still shows the limit.
    let refused_at = changelog::unix_ms_now();
    eventually("a status written after the reload", || {
        status().is_some_and(|s| s.updated_unix_ms > refused_at)
    });
    assert!(shipper.try_wait().unwrap().is_none(), "the shipper exited");
    assert_eq!(status().unwrap().upload_limit_bytes_per_s, Some(250_000));
    assert!(
        status().unwrap().segments_pending_upload > 0,
        "everything was uploaded before the limit was lifted: ship more"
    );

    config("unlimited");
    hup(&shipper);
    eventually("the limit lifted and everything uploaded", || {
        status().is_some_and(|s| {
            s.upload_limit_bytes_per_s.is_none()
                && s.segments_pending_upload == 0
                && s.ring_used_bytes == 0
        })
    });
    assert!(logged("now unlimited"));
    // SAFETY: kill with a valid signal to our own child's pid.
    assert_eq!(unsafe { libc::kill(shipper.id() as i32, libc::SIGTERM) }, 0);
    assert!(shipper.wait().unwrap().success());
    apply_and_check_every_point(&fixture, &model, "replica");

    // A bad --upload-limit is refused before anything starts.
    let out = Command::new(bin("shipper"))
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--upload-limit", "100"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("no unit") && text.contains("400Mbit/s"),
        "{text}"
    );
}
