//! CPU priority of the pipeline threads: with [`CpuPriority::Yield`] (the default of
//! the `shipper` command) the reader, sealers, stager and uploader run under
//! `SCHED_IDLE`, so they take only CPU time the protected application leaves over,
//! and go back to normal priority while shipping is falling behind.
//!
//! Contract:
//!
//! * *Behind* means the ring is at least half full or the RPO has reached half its
//!   threshold; shipping is back in the background once the ring is at most a quarter
//!   full and the RPO below a quarter of the threshold ([`next_background`]). So a
//!   saturated CPU delays shipping by at most about half the RPO threshold and never
//!   overflows the ring on its own, while an idle CPU ships at full speed anyway
//!   (`SCHED_IDLE` threads run whenever a CPU has nothing else to do).
//! * *Normal* is the policy the thread had when it started following (SCHED_OTHER
//!   at the process's nice value, or whatever `chrt` gave the process).
//! * Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` (the root service has it) or a
//!   permissive `RLIMIT_NICE`. [`Priority::new`] checks that on a throwaway thread
//!   first and otherwise runs at normal priority all along: a thread stuck in
//!   `SCHED_IDLE` could starve while the ring fills.
//! * Only threads that call [`ThreadPriority::follow`] change policy; io_uring's
//!   worker threads keep the policy their thread had when it created them.

use std::sync::atomic::{AtomicBool, Ordering};

/// How the pipeline threads are scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CpuPriority {
    /// Background (`SCHED_IDLE`) while shipping keeps up, normal when it falls behind.
    Yield,
    /// Always normal priority (the process's nice value applies).
    Normal,
}

impl CpuPriority {
    /// The default of the `shipper` command and of the config file. (A library
    /// [`crate::ShipperConfig`] starts at `Normal`: its caller decides.)
    pub const SERVICE_DEFAULT: CpuPriority = CpuPriority::Yield;
}

/// Whether shipping should run in the background after seeing `ring_used` of
/// `ring_capacity` bytes and an RPO of `rpo_ms`, given whether it does now (the
/// hysteresis keeps it from flapping at a boundary).
pub fn next_background(
    background: bool,
    ring_used: u64,
    ring_capacity: u64,
    rpo_ms: u64,
    rpo_threshold_ms: u64,
) -> bool {
    let behind = ring_used.saturating_mul(2) >= ring_capacity
        || rpo_ms.saturating_mul(2) >= rpo_threshold_ms;
    let caught_up =
        ring_used.saturating_mul(4) <= ring_capacity && rpo_ms.saturating_mul(4) < rpo_threshold_ms;
    if background {
        !behind
    } else {
        caught_up
    }
}

/// The priority the pipeline threads should have now; shared by them.
#[derive(Debug)]
pub struct Priority {
    yielding: bool,
    background: AtomicBool,
}

impl Priority {
    /// With [`CpuPriority::Yield`], checks that a thread may switch to `SCHED_IDLE`
    /// and back (on a thread of its own, so the caller's policy stays as it is); if
    /// not, logs why and stays normal.
    pub fn new(mode: CpuPriority) -> Priority {
        let probe = || {
            let normal = ThreadPolicy::current()?;
            ThreadPolicy::background().apply()?;
            normal.apply()
        };
        let yielding = mode == CpuPriority::Yield
            && match std::thread::scope(|s| s.spawn(probe).join().expect("probe thread")) {
                Ok(()) => true,
                Err(e) => {
                    log::info!(
                        "cpu priority yield is not available ({e}; it needs CAP_SYS_NICE): shipping at normal priority"
                    );
                    false
                }
            };
        Priority {
            yielding,
            background: AtomicBool::new(yielding),
        }
    }

    /// Re-evaluates from the ring's fill and the RPO ([`next_background`]).
    pub fn update(&self, ring_used: u64, ring_capacity: u64, rpo_ms: u64, rpo_threshold_ms: u64) {
        if !self.yielding {
            return;
        }
        let now = self.background.load(Ordering::Relaxed);
        let next = next_background(now, ring_used, ring_capacity, rpo_ms, rpo_threshold_ms);
        if next != now {
            log::debug!(
                "shipping {}: ring {ring_used} of {ring_capacity} bytes, RPO {rpo_ms} ms",
                if next {
                    "in the background"
                } else {
                    "at normal priority"
                }
            );
            self.background.store(next, Ordering::Relaxed);
        }
    }

    pub fn background(&self) -> bool {
        self.background.load(Ordering::Relaxed)
    }
}

/// One pipeline thread's side: applies [`Priority`] to the calling thread.
pub struct ThreadPriority<'a> {
    shared: &'a Priority,
    /// The thread's policy when it started following: what normal means for it.
    normal: Option<ThreadPolicy>,
    /// Whether the thread is in the background now.
    background: bool,
}

impl<'a> ThreadPriority<'a> {
    /// Call on the thread it is for, then [`ThreadPriority::follow`] in its loop.
    pub fn new(shared: &'a Priority) -> ThreadPriority<'a> {
        let normal = match ThreadPolicy::current() {
            Ok(policy) => Some(policy),
            Err(e) => {
                log::warn!("reading this thread's CPU policy: {e}; it stays as it is");
                None
            }
        };
        let mut this = ThreadPriority {
            shared,
            normal,
            background: false,
        };
        this.follow();
        this
    }

    /// Switches the calling thread's policy if the shared priority changed. Cheap
    /// when it did not (one atomic load).
    pub fn follow(&mut self) {
        let want = self.shared.background();
        let Some(normal) = self.normal.filter(|_| want != self.background) else {
            return;
        };
        let policy = if want {
            ThreadPolicy::background()
        } else {
            normal
        };
        match policy.apply() {
            Ok(()) => self.background = want,
            // Checked possible by Priority::new; a failure here leaves the thread as
            // it was and is retried at the next call.
            Err(e) => log::warn!("setting this thread's CPU priority: {e}"),
        }
    }
}

/// A thread's scheduling policy and its parameter.
#[derive(Clone, Copy)]
struct ThreadPolicy {
    policy: libc::c_int,
    priority: libc::c_int,
}

impl ThreadPolicy {
    fn background() -> ThreadPolicy {
        ThreadPolicy {
            policy: libc::SCHED_IDLE,
            priority: 0,
        }
    }

    /// The calling thread's.
    fn current() -> std::io::Result<ThreadPolicy> {
        // SAFETY: pid 0 names the calling thread; no pointers involved.
        let policy = unsafe { libc::sched_getscheduler(0) };
        if policy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid, writable sched_param for the call's duration.
        if unsafe { libc::sched_getparam(0, &mut param) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ThreadPolicy {
            policy,
            priority: param.sched_priority,
        })
    }

    /// Gives it to the calling thread.
    fn apply(self) -> std::io::Result<()> {
        let param = libc::sched_param {
            sched_priority: self.priority,
        };
        // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that
        // lives across the call, which only reads it.
        if unsafe { libc::sched_setscheduler(0, self.policy, &param) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_goes_normal_and_only_caught_up_goes_back() {
        let (cap, rpo) = (1000, 30_000);
        // In the background: stays there until the ring is half full or RPO half the
        // threshold.
        assert!(next_background(true, 499, cap, 14_999, rpo));
        assert!(!next_background(true, 500, cap, 0, rpo));
        assert!(!next_background(true, 0, cap, 15_000, rpo));
        // At normal priority: stays there until both are at a quarter or below.
        assert!(!next_background(false, 300, cap, 0, rpo));
        assert!(!next_background(false, 0, cap, 7_500, rpo));
        assert!(next_background(false, 250, cap, 7_499, rpo));
    }

    #[test]
    fn threads_follow_the_shared_priority() {
        let shared = Priority::new(CpuPriority::Yield);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(shared.yielding, "root may leave SCHED_IDLE");
        } else if !shared.yielding {
            return; // no CAP_SYS_NICE here: nothing to follow (Priority::new logged it)
        }
        let policy = || {
            // SAFETY: pid 0 is the calling thread; no pointers involved.
            unsafe { libc::sched_getscheduler(0) }
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut thread = ThreadPriority::new(&shared);
                assert_eq!(policy(), libc::SCHED_IDLE);
                shared.update(600, 1000, 0, 30_000);
                thread.follow();
                assert_eq!(policy(), libc::SCHED_OTHER);
                shared.update(100, 1000, 0, 30_000);
                thread.follow();
                assert_eq!(policy(), libc::SCHED_IDLE);
            });
        });
        // A thread that started elsewhere (chrt --batch, say) goes back there, and the
        // probe in Priority::new leaves its caller's policy alone.
        std::thread::scope(|s| {
            s.spawn(|| {
                let batch = ThreadPolicy {
                    policy: libc::SCHED_BATCH,
                    priority: 0,
                };
                batch.apply().unwrap();
                let shared = Priority::new(CpuPriority::Yield);
                assert_eq!(policy(), libc::SCHED_BATCH);
                let mut thread = ThreadPriority::new(&shared);
                assert_eq!(policy(), libc::SCHED_IDLE);
                shared.update(600, 1000, 0, 30_000);
                thread.follow();
                assert_eq!(policy(), libc::SCHED_BATCH);
            });
        });
        let normal = Priority::new(CpuPriority::Normal);
        std::thread::scope(|s| {
            s.spawn(|| {
                ThreadPriority::new(&normal);
                assert_eq!(policy(), libc::SCHED_OTHER);
            });
        });
    }
}
