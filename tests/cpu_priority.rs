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

/// `PF_IO_WORKER` (include/linux/sched.h): an io_uring worker the kernel started.
const PF_IO_WORKER: u64 = 0x10;

/// The scheduling policies of this process's threads named `name`. io_uring workers
/// are left out: one the kernel is starting for a pipeline thread carries that
/// thread's name (and policy) until it names itself `iou-wrk-N` (six "pipeline
/// threads" were seen here once).
fn policies(name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended
        };
        let (head, tail) = stat.rsplit_once(") ").unwrap();
        // Fields after the name start at 3; flags is field 9, policy field 41.
        let field = |n: usize| tail.split(' ').nth(n - 3).unwrap().parse::<u64>().unwrap();
        if head.ends_with(&format!("({name}")) && field(9) & PF_IO_WORKER == 0 {
            out.push(field(41) as u32);
        }
    }
    out
}

/// Polls `f` for up to 30 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "never saw: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The policies of the reader, both sealers, the stager and the uploader: five threads
/// (fewer while they start: a thread carries its name only once it runs).
fn pipeline_policies() -> Vec<u32> {
    ["ship-reader", "ship-sealer", "ship-stager", "ship-uploader"]
        .iter()
        .flat_map(|name| policies(name))
        .collect()
}

/// Whether all pipeline threads run and have `policy`.
fn pipeline_threads(policy: u32) -> bool {
    let threads = pipeline_policies();
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

/// A pipeline shipping a `size`-byte volume in this process, and its source.
struct Shipping {
    fixture: Fixture,
    capture: blkfilter::capture::Capture,
    model: Model,
    control: std::sync::Arc<shipper::Control>,
    shipper: std::thread::JoinHandle<shipper::Result<shipper::RunSummary>>,
}

impl Shipping {
    fn start(size: u64, cpu_priority: CpuPriority, rpo_threshold: Duration) -> Shipping {
        let fixture = Fixture::new(size);
        let capture = fixture.capture(2 * size);
        let mut config = fixture.shipper_config();
        config.cpu_priority = cpu_priority;
        config.sealers = 2;
        config.rpo_threshold = rpo_threshold;
        let (control, shipper) = fixture.spawn_shipper(config);
        Shipping {
            fixture,
            capture,
            model: Model::new(size),
            control,
            shipper,
        }
    }

    fn write(&mut self, ops: impl IntoIterator<Item = blkfilter::workload::WorkOp>) {
        drive(&mut self.capture, &mut self.model, ops);
    }

    fn status(&self) -> Option<shipper::Status> {
        let text = std::fs::read_to_string(self.fixture.path("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Drains, then checks the replica at every point: yielding loses no write.
    fn finish(self) {
        self.control.drain();
        self.shipper.join().unwrap().expect("shipper run");
        apply_and_check_every_point(&self.fixture, &self.model, "replica");
    }
}

fn yielding() {
    let size = 16 << 20;
    // Behind as soon as anything waits 5 ms: streaming writes keep it behind.
    let mut run = Shipping::start(size, CpuPriority::Yield, Duration::from_millis(10));
    eventually("every pipeline thread in SCHED_IDLE while idle", || {
        pipeline_threads(SCHED_IDLE) && run.status().is_some_and(|s| s.background)
    });
    let mut writes = Workload::new(7, size);
    let ring = blkfilter::ring::RingControl::open(&run.fixture.path("ring")).unwrap();
    eventually("normal priority while writes stream in", || {
        // No faster than shipping takes them: a pipeline starved in SCHED_IDLE on a
        // busy machine must slow the writes (as the ring's room does on a device), not
        // overflow the ring. What waits keeps the RPO over its threshold anyway.
        let last = run.model.seqs().last().copied().unwrap_or(0);
        if last.saturating_sub(ring.released_seq()) < 60 {
            run.write(writes.by_ref().take(20));
        }
        pipeline_threads(SCHED_OTHER) && run.status().is_some_and(|s| !s.background)
    });
    // Blocked stages switch when their next item wakes them; the reader polls.
    eventually("back in the background once caught up", || {
        run.status().is_some_and(|s| s.background) && policies("ship-reader") == [SCHED_IDLE]
    });
    run.finish();
}

fn normal() {
    let size = 4 << 20;
    let mut run = Shipping::start(size, CpuPriority::Normal, Duration::from_secs(30));
    eventually("the pipeline running", || {
        run.status().is_some() && pipeline_policies().len() == 5
    });
    let mut writes = Workload::new(3, size);
    for _ in 0..10 {
        run.write(writes.by_ref().take(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            pipeline_threads(SCHED_OTHER),
            "a pipeline thread left SCHED_OTHER or ended: policies {:?}",
            pipeline_policies()
        );
        assert!(!run.status().unwrap().background);
    }
    run.finish();
}
