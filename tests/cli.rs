//! The command lines: help that reads well, and clear errors with a non-zero exit for
//! bad input, before anything is created.

use e2e::bin;
use std::path::Path;
use std::process::Command;

fn run(name: &str, args: &[&str]) -> (bool, String) {
    let (code, text) = run_code(name, args);
    (code == 0, text)
}

/// The exit status and output (stdout, then stderr) of `name ARGS`.
fn run_code(name: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin(name)).args(args).output().expect("run");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().expect("exited"), text)
}

#[test]
fn every_command_has_help() {
    for (name, subs) in [
        (
            "blkfilter",
            &["attach", "recover", "detach", "list", "exercise"][..],
        ),
        (
            "shipper",
            &["keygen", "key", "run", "mark", "resync", "status"][..],
        ),
        (
            "ublk-target",
            &[
                "apply", "points", "prune", "rollback", "failover", "commit", "export", "status",
                "receive", "inspect",
            ][..],
        ),
    ] {
        let (ok, text) = run(name, &["--help"]);
        assert!(ok, "{name} --help failed");
        for sub in subs {
            assert!(text.contains(sub), "{name} --help does not list {sub}");
            let (ok, sub_help) = run(name, &[sub, "--help"]);
            assert!(
                ok && sub_help.contains("Usage:"),
                "{name} {sub} --help: {sub_help}"
            );
        }
    }
}

#[test]
fn attach_without_ublk_in_the_kernel_says_so() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("this kernel has ublk; the VM tests cover attach here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let ring = dir.path().join("ring");
    let (ok, text) = run(
        "blkfilter",
        &[
            "attach",
            "--foreground",
            "--backing",
            backing.to_str().unwrap(),
            "--ring",
            ring.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(
        text.contains("/dev/ublk-control is missing") && text.contains("scripts/vm.sh"),
        "{text}"
    );
}

#[test]
fn attach_with_a_missing_backing_names_it() {
    let (ok, text) = run(
        "blkfilter",
        &[
            "attach",
            "--foreground",
            "--backing",
            "/nonexistent/disk",
            "--ring",
            "/tmp/r",
        ],
    );
    assert!(!ok);
    assert!(
        text.contains("/nonexistent/disk") && text.contains("No such file"),
        "{text}"
    );
}

#[test]
fn shipper_refuses_bad_key_and_missing_ring() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"short").unwrap();
    let d = dir.path().to_str().unwrap();
    let args = [
        "run",
        "--volume",
        "v",
        "--ring",
        "/nonexistent/ring",
        "--staging",
        d,
        "--store",
        d,
        "--key",
    ];
    let (ok, text) = run("shipper", &[&args[..], &[key.to_str().unwrap()]].concat());
    assert!(!ok && text.contains("5 bytes"), "{text}");
    let (ok, _) = run(
        "shipper",
        &["keygen", "--out", dir.path().join("k2").to_str().unwrap()],
    );
    assert!(ok);
    let (ok, text) = run(
        "shipper",
        &[&args[..], &[dir.path().join("k2").to_str().unwrap()]].concat(),
    );
    assert!(!ok && text.contains("/nonexistent/ring"), "{text}");
    let (ok, text) = run(
        "shipper",
        &[
            "run",
            "--volume",
            "../x",
            "--ring",
            "r",
            "--staging",
            d,
            "--store",
            d,
            "--key",
            "k",
        ],
    );
    assert!(!ok && text.contains("invalid volume id"), "{text}");
}

/// A config file with two volumes: one shipper process replicates both.
#[test]
fn config_file_ships_every_volume() {
    use blkfilter::capture::Capture;
    use blkfilter::ring::{Producer, RingGeometry};
    use blkfilter::workload::Workload;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    changelog::Key::generate_file(&d.join("key")).unwrap();
    let size = 4u64 << 20;
    for (i, vol) in ["vol0", "vol1"].iter().enumerate() {
        let backing = d.join(format!("{vol}.img"));
        e2e::sparse_file(&backing, size);
        let ring = Producer::create(
            &d.join(format!("{vol}.ring")),
            &RingGeometry::new(16 << 20, size),
        )
        .unwrap();
        let mut capture = Capture::open(&backing, ring, false).unwrap();
        for op in Workload::new(i as u64 + 10, size).take(100) {
            capture.handle(op.as_request()).unwrap();
        }
    }
    let config = format!(
        "key = \"{0}/key\"\nstaging = \"{0}/staging\"\nstore = \"{0}/store\"\nstatus_dir = \"{0}/status\"\n\
         max_segment_age_ms = 20\ninitial_sync = false\nbacklog_resync_percent = 0\n[[volume]]\nid = \"vol0\"\nring = \"{0}/vol0.ring\"\n\
         [[volume]]\nid = \"vol1\"\nring = \"{0}/vol1.ring\"\n",
        d.display()
    );
    std::fs::write(d.join("shipper.toml"), config).unwrap();
    let cfg = d.join("shipper.toml");
    let (ok, text) = run(
        "shipper",
        &["run", "--config", cfg.to_str().unwrap(), "--drain"],
    );
    assert!(ok, "{text}");
    status_shows_a_table_per_config(&cfg, d);
    // The recovery side applies both volumes from its own config file (an RPO
    // threshold of an hour: the table's health is about applying, not how slow this
    // machine is).
    let target_cfg = d.join("target.toml");
    std::fs::write(
        &target_cfg,
        format!(
            "key = \"{0}/key\"\nstore = \"{0}/store\"\nkeep_points = 3\n\
             rpo_threshold_ms = 3600000\n\
             [[volume]]\nid = \"vol0\"\nreplica = \"{0}/vol0.replica\"\n\
             [[volume]]\nid = \"vol1\"\nreplica = \"{0}/vol1.replica\"\nkeep_points = 2\n",
            d.display()
        ),
    )
    .unwrap();
    let target_cfg = target_cfg.to_str().unwrap();
    for vol in ["vol0", "vol1"] {
        e2e::sparse_file(&d.join(format!("{vol}.replica")), size);
    }
    // Before any apply: every segment in the store waits.
    // Segments only: the store also holds the recovery side's key proofs.
    let waiting = |vol: &str| {
        std::fs::read_dir(d.join("store").join(vol))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                changelog::store::parse_segment_file_name(name.to_str().unwrap()).is_some()
            })
            .count()
    };
    let (ok, text) = run("ublk-target", &["status", "--config", target_cfg]);
    assert!(ok, "{text}");
    for vol in ["vol0", "vol1"] {
        let row = text.lines().find(|l| l.starts_with(vol)).expect(&text);
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], "Warning", "no recovery point yet: {text}");
        // POINTS "0", JOURNALS "0 B".
        assert_eq!(cells[7], waiting(vol).to_string(), "{text}");
        assert!(row.contains("nothing applied yet"), "{text}");
    }
    let shipped = [waiting("vol0"), waiting("vol1")];
    let (ok, text) = run("ublk-target", &["apply", "--config", target_cfg]);
    assert!(ok, "{text}");
    // After: each volume's newest point, its retained points, nothing waiting, and
    // the applied segments gone from the store.
    let (ok, text) = run("ublk-target", &["status", "--config", target_cfg]);
    assert!(ok, "{text}");
    for ((vol, kept), shipped) in [("vol0", 3), ("vol1", 2)].into_iter().zip(shipped) {
        let row = text.lines().find(|l| l.starts_with(vol)).expect(&text);
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], "Healthy", "{text}");
        assert_eq!(cells[2], (shipped - 1).to_string(), "newest point: {text}");
        assert_eq!(waiting(vol), 0, "applied segments left in the store");
        assert_eq!(cells[4], kept.to_string(), "retained points: {text}");
        // POINTS "N (AGE back)", JOURNALS "SIZE UNIT".
        assert_eq!(cells[9], "0", "waiting: {text}");
        assert!(row.ends_with("up to date"), "{text}");
    }
    // The same for Prometheus.
    let (ok, prom) = run(
        "ublk-target",
        &["status", "--config", target_cfg, "--prometheus"],
    );
    assert!(ok, "{prom}");
    for ((vol, kept), shipped) in [("vol0", 3), ("vol1", 2)].into_iter().zip(shipped) {
        for line in [
            format!("ublk_dr_target_up{{volume=\"{vol}\"}} 1"),
            format!(
                "ublk_dr_target_latest_point{{volume=\"{vol}\"}} {}",
                shipped - 1
            ),
            format!("ublk_dr_target_points{{volume=\"{vol}\"}} {kept}"),
            format!("ublk_dr_target_segments_waiting{{volume=\"{vol}\"}} 0"),
            format!("ublk_dr_target_store_reachable{{volume=\"{vol}\"}} 1"),
        ] {
            assert!(prom.lines().any(|l| l == line), "{line:?} missing:\n{prom}");
        }
        let rpo = format!("ublk_dr_target_rpo_seconds{{volume=\"{vol}\"}} ");
        assert!(prom.lines().any(|l| l.starts_with(&rpo)), "{prom}");
    }
    let (ok, json) = run(
        "ublk-target",
        &["status", "vol1", "--config", target_cfg, "--json"],
    );
    assert!(
        ok && json.contains("\"volume\": \"vol1\"") && !json.contains("vol0"),
        "{json}"
    );
    for (vol, kept) in [("vol0", 3), ("vol1", 2)] {
        let replica = d.join(format!("{vol}.replica"));
        let source = std::fs::read(d.join(format!("{vol}.img"))).unwrap();
        assert!(
            std::fs::read(&replica).unwrap() == source,
            "{vol}: replica differs from the source"
        );
        // Each volume's retention: the shared one, or its own.
        let (ok, json) = run(
            "ublk-target",
            &["points", "--replica", replica.to_str().unwrap(), "--json"],
        );
        assert!(ok, "{json}");
        let points = json.matches("\"index\":").count();
        assert_eq!(points, kept, "{vol}: {json}");
        // The same catalog by the volume's name in the config file.
        let (ok, by_name) = run(
            "ublk-target",
            &["points", vol, "--config", target_cfg, "--json"],
        );
        assert!(ok && by_name == json, "{vol}: {by_name}");
    }
    let (ok, text) = run("ublk-target", &["points", "vol9", "--config", target_cfg]);
    assert!(
        !ok && text.contains("vol9") && text.contains("vol0, vol1"),
        "{text}"
    );
    let (ok, text) = run("ublk-target", &["export", "--point", "0", "--out", "x"]);
    assert!(
        !ok && text.contains("VOLUME") && text.contains("--replica"),
        "{text}"
    );
    // One volume of the file; an unknown one is named with the ones there are.
    let (ok, text) = run(
        "ublk-target",
        &["apply", "--config", target_cfg, "--volume", "vol1"],
    );
    assert!(ok && text.contains("vol1.replica"), "{text}");
    let (ok, text) = run(
        "ublk-target",
        &["apply", "--config", target_cfg, "--volume", "vol9"],
    );
    assert!(
        !ok && text.contains("vol9") && text.contains("vol0, vol1"),
        "{text}"
    );
    // A volume whose state cannot be read gets a row saying why, the others theirs.
    std::fs::write(d.join("vol1.replica.state"), b"garbage").unwrap();
    let (ok, text) = run("ublk-target", &["status", "--config", target_cfg]);
    assert!(!ok, "{text}");
    let row = |vol: &str| {
        text.lines()
            .find(|l| l.starts_with(vol))
            .unwrap_or_default()
    };
    assert!(row("vol0").ends_with("up to date"), "{text}");
    assert!(row("vol1").contains("error:"), "{text}");
}

/// `shipper status` after [`config_file_ships_every_volume`] shipped vol0 and vol1: a
/// table with a row per volume for a config file, the detailed view for one status
/// file (or its row with --table), JSON unchanged, and a volume without a status file
/// named as such (non-zero exit).
fn status_shows_a_table_per_config(cfg: &std::path::Path, d: &std::path::Path) {
    let cfg = cfg.to_str().unwrap();
    let (ok, text) = run("shipper", &["status", "--config", cfg]);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "a header and a row per volume: {text}");
    for column in [
        "VOLUME", "HEALTH", "RPO", "RING", "PENDING", "RESYNC", "IN/OUT", "STATE",
    ] {
        assert!(lines[0].contains(column), "{column} missing: {text}");
    }
    for (line, vol) in lines[1..].iter().zip(["vol0", "vol1"]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], vol, "{text}");
        assert_eq!(cells[1], "Healthy", "{text}");
        assert!(cells[3].ends_with('%'), "ring used in percent: {text}");
        assert_eq!(cells[4], "0", "nothing pending after --drain: {text}");
        assert_eq!(cells[5], "-", "no resync: {text}");
        let rates: Vec<f64> = cells[6].split('/').map(|r| r.parse().unwrap()).collect();
        assert_eq!(rates.len(), 2, "MB/s in/out: {text}");
        assert_eq!(cells[7], "replicating", "{text}");
    }

    let (ok, json) = run("shipper", &["status", "--config", cfg, "--json"]);
    assert!(ok, "{json}");
    let statuses: Vec<shipper::Status> = serde_json::from_str(&json).expect("JSON array");
    let volumes: Vec<&str> = statuses.iter().map(|s| s.volume.as_str()).collect();
    assert_eq!(volumes, ["vol0", "vol1"]);

    // The same figures for Prometheus.
    let (ok, prom) = run("shipper", &["status", "--config", cfg, "--prometheus"]);
    assert!(ok, "{prom}");
    for s in &statuses {
        let v = &s.volume;
        for line in [
            format!("ublk_dr_up{{volume=\"{v}\"}} 1"),
            format!("ublk_dr_health{{volume=\"{v}\"}} 0"),
            format!("ublk_dr_segments_pending{{volume=\"{v}\"}} 0"),
            format!(
                "ublk_dr_uploaded_bytes_total{{volume=\"{v}\"}} {}",
                s.bytes_uploaded
            ),
        ] {
            assert!(prom.lines().any(|l| l == line), "{line:?} missing:\n{prom}");
        }
        assert!(s.bytes_uploaded > 0);
    }

    let one = d.join("status/vol1.status.json");
    let one = one.to_str().unwrap();
    let (ok, text) = run("shipper", &["status", "--status", one]);
    assert!(
        ok && text.contains("volume           vol1") && text.contains("health           Healthy"),
        "the detailed view: {text}"
    );
    let (ok, text) = run("shipper", &["status", "--status", one, "--table"]);
    assert!(
        ok && text.lines().count() == 2 && text.lines().nth(1).unwrap().starts_with("vol1 "),
        "{text}"
    );

    // A volume the shipper never ran for has no status file: its row says so.
    let with_vol2 = d.join("with-vol2.toml");
    let text = std::fs::read_to_string(cfg).unwrap()
        + &format!(
            "[[volume]]\nid = \"vol2\"\nring = \"{}/vol2.ring\"\n",
            d.display()
        );
    std::fs::write(&with_vol2, text).unwrap();
    let (ok, text) = run(
        "shipper",
        &["status", "--config", with_vol2.to_str().unwrap()],
    );
    let row = text.lines().find(|l| l.starts_with("vol2")).unwrap_or("");
    assert!(
        !ok && row.contains(" ? ")
            && row.contains("no status")
            && text.contains("1 of 3 volume(s)"),
        "{text}"
    );
    // The monitoring check: that volume is not shipped, CRITICAL.
    let (code, text) = run_code(
        "shipper",
        &["status", "--check", "--config", with_vol2.to_str().unwrap()],
    );
    assert!(
        code == 2
            && text.starts_with("UBLK-DR SHIPPER CRITICAL - vol2 Critical: no readable status")
            && text.lines().count() == 4,
        "{text}"
    );
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "key = \"/k\"\nstaging = \"/s\"\nstore = \"/t\"\nsealerz = 2\n[[volume]]\nid = \"v\"\nring = \"/r\"\n")
        .unwrap();
    let (ok, text) = run("shipper", &["run", "--config", cfg.to_str().unwrap()]);
    assert!(
        !ok && text.contains("sealerz") && text.contains(cfg.to_str().unwrap()),
        "{text}"
    );
    let (ok, text) = run("shipper", &["run", "--config", "/nonexistent.toml"]);
    assert!(!ok && text.contains("/nonexistent.toml"), "{text}");

    std::fs::write(
        &cfg,
        "key = \"/k\"\nstore = \"/s\"\n[[volume]]\nid = \"v\"\nreplica = \"/r\"\nkeep_age = \"2 weeks\"\n",
    )
    .unwrap();
    let (ok, text) = run("ublk-target", &["apply", "--config", cfg.to_str().unwrap()]);
    assert!(
        !ok && text.contains("keep_age") && text.contains(cfg.to_str().unwrap()),
        "{text}"
    );
    let (ok, text) = run("ublk-target", &["apply", "--config", "/nonexistent.toml"]);
    assert!(!ok && text.contains("/nonexistent.toml"), "{text}");

    // A monitoring check that cannot judge says UNKNOWN (3), and why.
    let (code, text) = run_code(
        "ublk-target",
        &["status", "--check", "--config", cfg.to_str().unwrap()],
    );
    assert!(
        code == 3 && text.starts_with("UBLK-DR TARGET UNKNOWN - ") && text.contains("keep_age"),
        "{text}"
    );
    let (code, text) = run_code(
        "shipper",
        &["status", "--check", "--config", "/nonexistent.toml"],
    );
    assert!(
        code == 3
            && text.starts_with("UBLK-DR SHIPPER UNKNOWN - ")
            && text.contains("/nonexistent.toml"),
        "{text}"
    );
}

/// The systemd units of scripts/systemd load without a warning (an unknown or
/// misspelt key is only a warning to systemd, and the service would then run without
/// it): each verified as an instance, running the binaries built here.
#[test]
fn the_systemd_units_load_without_warnings() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd");
    let bins = bin("shipper").parent().unwrap().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    // All in place first: a timer or a dependency names another unit.
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        let name = name.replace("@.", "@vol0.");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/", &format!("{bins}/"));
        std::fs::write(dir.path().join(&name), text).unwrap();
        names.push(name);
    }
    for name in &names {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(name))
            .output()
            .expect("systemd-analyze (scripts/test.sh installs systemd)");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{name}: {said}"
        );
    }
    assert_eq!(names.len(), 6, "the units in {}", units.display());
}
