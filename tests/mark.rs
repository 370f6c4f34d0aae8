//! Operator MARKs through the ring header (`shipper mark`): recorded by the producer
//! after every write before the request, flagged app-consistent in the segment that
//! ends with them; a failing hook records nothing.

use blkfilter::ring::RingControl;
use blkfilter::workload::Workload;
use e2e::*;
use std::process::Command;

#[test]
fn mark_is_recorded_after_earlier_writes_and_flags_its_segment() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(16 << 20);
    let mut model = Model::new(size);
    drive(&mut capture, &mut model, Workload::new(3, size).take(50));
    let last_write = *model.seqs().last().unwrap();

    // `shipper mark` waits for the producer; the producer serves it on its next tick.
    // The volume is named as in the shipper's config file, which gives its ring.
    let config = fixture.path("shipper.toml");
    std::fs::write(
        &config,
        format!(
            "key = \"{}\"\nstaging = \"{}\"\nstore = \"{}\"\n[[volume]]\nid = \"vol0\"\nring = \"{}\"\n",
            fixture.path("key").display(),
            fixture.path("staging").display(),
            fixture.path("store").display(),
            fixture.path("ring").display()
        ),
    )
    .unwrap();
    let marker = std::thread::spawn(move || {
        Command::new(bin("shipper"))
            .args([
                "mark",
                "vol0",
                "--app-consistent",
                "--pre",
                "true",
                "--config",
            ])
            .arg(config)
            .output()
            .unwrap()
    });
    let control = RingControl::open(&fixture.path("ring")).unwrap();
    while !marker.is_finished() {
        capture.tick().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = marker.join().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let seq: u64 = text
        .split("seq ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .expect(&text);
    assert!(seq > last_write, "the MARK must follow every earlier write");
    assert_eq!(control.mark_recorded(1), Some(seq));

    fixture.ship_drained();
    let marked: Vec<_> = fixture
        .store_segments()
        .iter()
        .map(|p| changelog::open(std::fs::read(p).unwrap(), "s", &fixture.key).unwrap())
        .filter(|s| s.header.flags & changelog::flags::APP_CONSISTENT != 0)
        .collect();
    assert_eq!(marked.len(), 1, "exactly one app-consistent segment");
    assert_eq!(marked[0].header.last_seq, seq, "and it ends with the MARK");
}

#[test]
fn failing_pre_hook_or_missing_quiesce_records_nothing() {
    let fixture = Fixture::new(1 << 20);
    let _capture = fixture.capture(4 << 20);
    let ring = fixture.path("ring");
    let run = |args: &[&str]| {
        let out = Command::new(bin("shipper"))
            .arg("mark")
            .args(args)
            .arg("--ring")
            .arg(&ring)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&["--app-consistent"]);
    assert!(!ok && err.contains("--freeze"), "{err}");
    let (ok, err) = run(&["--app-consistent", "--pre", "exit 3"]);
    assert!(!ok && err.contains("pre hook"), "{err}");
    let (ok, err) = run(&["--freeze", "/nonexistent/mnt"]);
    assert!(!ok && err.contains("/nonexistent/mnt"), "{err}");
    // Neither a volume nor a ring.
    let out = Command::new(bin("shipper")).arg("mark").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("VOLUME") && err.contains("--ring"),
        "{err}"
    );
    // No request reached the ring.
    let control = RingControl::open(&ring).unwrap();
    assert_eq!(control.request_mark(false), 1, "the first request ever");
}
