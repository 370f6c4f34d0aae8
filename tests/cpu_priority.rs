//! `cpu_priority = yield`: the pipeline threads run under SCHED_IDLE while shipping
//! keeps up, at normal priority while it falls behind (here: the RPO past half of a
//! tiny threshold while writes stream in), and back in the background once caught up;
//! `normal` never leaves SCHED_OTHER. Every write still reaches the replica. Needs
//! CAP_SYS_NICE (CI runs as root).

use blkfilter::workload::Workload;
use e2e::*;
use shipper::priority::CpuPriority;
use std::time::{Duration, Instant};

const SCHED_OTHER: u32 = 0;
const SCHED_IDLE: u32 = 5;

/// The scheduling policies of this process's threads named `name`.
fn policies(name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended
        };
        let (head, tail) = stat.rsplit_once(") ").unwrap();
        if head.ends_with(&format!("({name}")) {
            // Fields after the name start at 3; policy is field 41.
            out.push(tail.split(' ').nth(41 - 3).unwrap().parse().unwrap());
        }
    }
    out
}

fn status(fixture: &Fixture) -> Option<shipper::Status> {
    let text = std::fs::read_to_string(fixture.path("status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Polls `f` for up to 30 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "never saw: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the reader, both sealers, the stager and the uploader all have `policy`.
fn pipeline_threads(policy: u32) -> bool {
    let threads: Vec<u32> = ["ship-reader", "ship-sealer", "ship-stager", "ship-uploader"]
        .iter()
        .flat_map(|name| policies(name))
        .collect();
    threads.len() == 5 && threads.iter().all(|&p| p == policy)
}

/// One test: the checks read every thread of this process by name, so no two
/// pipelines may run at once.
#[test]
fn yield_runs_in_the_background_unless_behind_and_normal_never_does() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (CAP_SYS_NICE) to leave SCHED_IDLE");
        return;
    }
    yielding();
    normal();
}

fn yielding() {
    let size = 16 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(32 << 20);
    let mut model = Model::new(size);
    let mut config = fixture.shipper_config();
    config.cpu_priority = CpuPriority::Yield;
    config.sealers = 2;
    // Behind as soon as anything waits 5 ms: streaming writes keep it behind.
    config.rpo_threshold = Duration::from_millis(10);
    let (control, shipper) = fixture.spawn_shipper(config);

    eventually("every pipeline thread in SCHED_IDLE while idle", || {
        pipeline_threads(SCHED_IDLE) && status(&fixture).is_some_and(|s| s.background)
    });
    let mut writes = Workload::new(7, size);
    eventually("normal priority while writes stream in", || {
        for _ in 0..20 {
            drive(&mut capture, &mut model, writes.next());
        }
        pipeline_threads(SCHED_OTHER) && status(&fixture).is_some_and(|s| !s.background)
    });
    // Blocked stages switch when their next item wakes them; the reader polls.
    eventually("back in the background once caught up", || {
        status(&fixture).is_some_and(|s| s.background) && policies("ship-reader") == [SCHED_IDLE]
    });
    control.drain();
    shipper.join().unwrap().expect("shipper run");
    apply_and_check_every_point(&fixture, &model, "replica");
}

fn normal() {
    let size = 4 << 20;
    let fixture = Fixture::new(size);
    let mut capture = fixture.capture(8 << 20);
    let mut model = Model::new(size);
    let mut config = fixture.shipper_config();
    config.cpu_priority = CpuPriority::Normal;
    config.sealers = 2;
    let (control, shipper) = fixture.spawn_shipper(config);
    eventually("the pipeline running", || status(&fixture).is_some());
    for _ in 0..10 {
        drive(&mut capture, &mut model, Workload::new(3, size).take(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            pipeline_threads(SCHED_OTHER),
            "a pipeline thread left SCHED_OTHER"
        );
        assert!(!status(&fixture).unwrap().background);
    }
    control.drain();
    shipper.join().unwrap().expect("shipper run");
    apply_and_check_every_point(&fixture, &model, "replica");
}
